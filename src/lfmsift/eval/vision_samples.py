"""Vision-language inputs from real video and real images, for fidelity measurements on a VLM.

Each sample is one user turn in SmolVLM's chat format, ``<|im_start|>User:<image>...<image>{question}
<end_of_utterance>\\nAssistant:``, with its images: consecutive frames of a video clip (decoded with PyAV at
`fps`) or one still image. The processor is either lfmsift's `FrameProcessor` (the built SmolVLM) or a real
SmolVLM / SmolVLM2 processor loaded with ``lfmsift.load`` (it takes the images nested per sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lfmsift.models.vlm import IMAGE, FrameProcessor
from lfmsift.stream.video import frames

VIDEO_QUESTIONS = (
    "What are the people in these frames doing?",
    "Describe the scene shown in these frames.",
    "How many people can you see, and where are they walking?",
    "What changes between the first and the last frame?",
)
IMAGE_QUESTIONS = (
    "Describe this image in detail.",
    "Who or what is shown in this picture?",
)


@dataclass
class VisionSample:
    name: str
    question: str
    images: list[Image.Image] = field(repr=False)
    inputs: dict = field(repr=False)


def encode(processor, question: str, images: list[Image.Image]) -> dict:
    """Model inputs (batch 1) for `question` about `images`, in the model's chat format (module docstring)."""
    if isinstance(processor, FrameProcessor):
        turn = [{"role": "user", "content": IMAGE * len(images) + question}]
        prompt = processor.tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        return processor(prompt, images)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(processor(text=[prompt], images=[images], return_tensors="pt"))


def video_clips(path: str | Path, clips: int, frames_per_clip: int, fps: float = 1.0, size: int | None = None):
    """`clips` lists of `frames_per_clip` consecutive frames sampled at `fps` from a real video."""
    if clips < 1 or frames_per_clip < 1:
        raise ValueError(f"clips and frames_per_clip must be >= 1; got {clips}, {frames_per_clip}")
    images = [f.image for f in frames(path, fps=fps, size=size, max_frames=clips * frames_per_clip)]
    if len(images) < clips * frames_per_clip:
        raise ValueError(
            f"{path} gives {len(images)} frames at {fps} fps; {clips} clips of {frames_per_clip} need more"
        )
    return [images[i * frames_per_clip : (i + 1) * frames_per_clip] for i in range(clips)]


def vision_samples(
    processor,
    video: str | Path | None = None,
    images: tuple[str | Path, ...] = (),
    clips: int = 4,
    frames_per_clip: int = 2,
    fps: float = 1.0,
) -> list[VisionSample]:
    """Samples from `clips` clips of `video` (one question each, cycling `VIDEO_QUESTIONS`) and from each
    still image (every question of `IMAGE_QUESTIONS`)."""
    samples = []
    if video is not None:
        for i, clip in enumerate(video_clips(video, clips, frames_per_clip, fps)):
            q = VIDEO_QUESTIONS[i % len(VIDEO_QUESTIONS)]
            samples.append(VisionSample(f"{Path(video).name}#clip{i}", q, clip, encode(processor, q, clip)))
    for path in images:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as im:
            image = im.convert("RGB")
        for j, q in enumerate(IMAGE_QUESTIONS):
            samples.append(VisionSample(f"{path.name}#q{j}", q, [image], encode(processor, q, [image])))
    if not samples:
        raise ValueError("no samples: give a video, images, or both")
    return samples


def sample_image() -> Path:
    """A real photograph that installs with matplotlib (Grace Hopper, ``mpl-data/sample_data``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
