"""A SmolVLM-architecture VLM around a real SmolLM2 text model, and a frame processor for it.

SmolVLM-256M is SmolLM2-135M plus a SigLIP-B/16 vision tower at 512 px and a pixel-shuffle connector
(scale 4: 64 tokens per image). Its weights are not reachable here, so ``smolvlm_from_text_model``
builds that architecture with the *real* pretrained text model (copied exactly; the new special-token
embeddings are the mean of the existing ones) and a vision tower and connector initialised from a fixed
seed. Text-only inputs give exactly the text model's logits; image tokens carry untrained features, so
results on frames measure fidelity (pruned or retrieved vs full), not task accuracy.

``FrameProcessor`` turns ``text`` containing ``<image>`` plus images into input ids and pixel values the
way SmolVLM's processor does for an unsplit image (``<fake_token_around_image><global-img>`` + 64
``<image>`` + ``<fake_token_around_image>``), without the video processor's torchvision dependency.
Real SmolVLM / SmolVLM2 checkpoints load with their own processor through ``lfmsift.load``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

FAKE_IMAGE, IMAGE, GLOBAL_IMAGE, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<global-img>", \
    "<end_of_utterance>"

# The vision tower of SmolVLM-256M (SigLIP base, patch 16, 512 px) and its connector.
SMOLVLM_256M_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 512,
    "patch_size": 16,
}
SMOLVLM_256M_SCALE_FACTOR = 4


@dataclass
class FrameProcessor:
    """Processor of a SmolVLM-architecture model for single unsplit images (one per ``<image>``)."""

    tokenizer: Any
    image_processor: Any
    image_seq_len: int

    def __call__(self, text: str, images: list[Image.Image] | None = None, return_tensors: str = "pt") -> dict:
        images = images or []
        if text.count(IMAGE) != len(images):
            raise ValueError(f"text has {text.count(IMAGE)} {IMAGE} markers for {len(images)} images")
        expanded = text.replace(IMAGE, FAKE_IMAGE + GLOBAL_IMAGE + IMAGE * self.image_seq_len + FAKE_IMAGE)
        out = dict(self.tokenizer(expanded, add_special_tokens=False, return_tensors="pt"))
        if images:
            pixels = self.image_processor(images=[[im] for im in images], return_tensors="pt")
            out["pixel_values"] = pixels["pixel_values"]
            if "pixel_attention_mask" in pixels:
                out["pixel_attention_mask"] = pixels["pixel_attention_mask"]
        return out

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def _image_processor(image_size: int):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )


def smolvlm_from_text_model(
    text_model: torch.nn.Module,
    tokenizer: Any,
    vision: dict | None = None,
    scale_factor: int = SMOLVLM_256M_SCALE_FACTOR,
    seed: int = 0,
) -> tuple[torch.nn.Module, FrameProcessor]:
    """Build a SmolVLM around a Llama-architecture causal LM (SmolLM2); returns (model, processor)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    if text_model.config.model_type != "llama":
        raise ValueError(f"the SmolVLM text model is Llama-architecture, got {text_model.config.model_type!r}")
    vision = dict(SMOLVLM_256M_VISION, **(vision or {}))
    tok = copy.deepcopy(tokenizer)
    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok.add_special_tokens({"additional_special_tokens": [FAKE_IMAGE, IMAGE, END_OF_UTTERANCE, GLOBAL_IMAGE, *rows]},
                           replace_extra_special_tokens=False)
    text_cfg = text_model.config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text_cfg.pop(key, None)
    old_vocab = text_model.config.vocab_size
    text_cfg["vocab_size"] = len(tok)
    config = SmolVLMConfig(
        text_config=text_cfg,
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=bool(text_model.config.tie_word_embeddings),
    )
    dtype = next(text_model.parameters()).dtype
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmolVLMForConditionalGeneration(config).to(dtype)
    state = {k.removeprefix("model."): v for k, v in text_model.state_dict().items() if k.startswith("model.")}
    embed = state["embed_tokens.weight"]
    extended = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tok) - old_vocab, -1)], 0)
    state["embed_tokens.weight"] = extended
    model.model.text_model.load_state_dict(state, strict=True)
    head = text_model.get_output_embeddings().weight
    with torch.no_grad():
        if model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr():
            model.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(len(tok) - old_vocab, -1)]))
    model.generation_config.eos_token_id = text_model.generation_config.eos_token_id
    seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // scale_factor**2
    processor = FrameProcessor(tok, _image_processor(vision["image_size"]), seq_len)
    return model.eval(), processor
