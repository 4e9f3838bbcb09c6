"""Real video decoding for streaming sessions: PyAV, fps sampling, resizing, clear errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image


class VideoError(ValueError):
    """A video file that is missing, empty, corrupt or has no video stream."""


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its index among sampled frames, its time in seconds, and the RGB image."""

    index: int
    time: float
    image: Image.Image


def _resized(image: Image.Image, size: int | tuple[int, int] | None) -> Image.Image:
    if size is None:
        return image
    if isinstance(size, int):
        scale = size / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR)


def frames(
    path: str | Path,
    fps: float | None = 2.0,
    size: int | tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> Iterator[Frame]:
    """Decode ``path`` and yield frames sampled at ``fps`` (``None``: every decoded frame).

    Sampling keeps the first decoded frame at or after each instant k / fps, so a 10 fps clip read at
    2 fps yields every fifth frame. ``size``: the longer side in pixels (aspect kept) or an exact
    (width, height). Raises ``VideoError`` for a missing, unreadable or empty file.
    """
    path = Path(path)
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot open {path} as a video: {err}") from err
    with container:
        if not container.streams.video:
            raise VideoError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yielded, next_time, start = 0, 0.0, None
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else float(frame.index)
                start = t if start is None else start
                if fps is not None and t + 1e-9 < next_time:
                    continue
                yield Frame(yielded, t, _resized(frame.to_image(), size))
                yielded += 1
                if fps is not None:  # the next instant start + k / fps strictly after t
                    next_time = start + (math.floor((t - start) * fps + 1e-9) + 1) / fps
                if max_frames is not None and yielded >= max_frames:
                    return
        except av.error.FFmpegError as err:
            raise VideoError(f"{path} is corrupt after {yielded} frames: {err}") from err
        if yielded == 0:
            raise VideoError(f"{path} contains no decodable video frames")
