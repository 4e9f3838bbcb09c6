"""`lfmsift.load`: one call from a name, a directory or a hub id to a supported (model, tokenizer) pair."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lfmsift.models.adapters import arch_spec
from lfmsift.models.zoo import NAMED_MODELS, convert_gguf

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or a name such as 'bf16' / 'float32'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded."""


def resolve_path(name_or_path: str) -> str:
    """The directory or hub id that `from_pretrained` should read for `name_or_path`.

    Named models (see `lfmsift.models.zoo.NAMED_MODELS`) are converted into the cache on first use.
    """
    if name_or_path in NAMED_MODELS:
        return str(convert_gguf(NAMED_MODELS[name_or_path]))
    return name_or_path


def _smolvlm_smollm2(dtype: torch.dtype, data_dir=None):
    from lfmsift.models.vlm import smolvlm_from_text_model

    text, tokenizer = load("smollm2-135m", dtype=dtype)
    return smolvlm_from_text_model(text, tokenizer)


def _smollm2_moe(dtype: torch.dtype, data_dir=None):
    from lfmsift.models.moefy import build_smollm2_moe

    return build_smollm2_moe(dtype, data_dir)


# Models assembled from named ones (nothing is downloaded): name -> builder(dtype, data_dir) -> (model, processor).
BUILT_MODELS = {
    # SmolVLM-256M's architecture with the real SmolLM2-135M-Instruct text model and a seeded vision tower.
    "smolvlm-smollm2-135m": _smolvlm_smollm2,
    # SmolLM2-135M as a Qwen2-MoE: shared expert of 384 channels + 16 routed experts of 72 (top-10), router
    # fitted on PTB: lfmsift.models.moefy.
    "smollm2-135m-moe": _smollm2_moe,
}


def load(
    name_or_path: str,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    data_dir=None,
):
    """Load a supported model and its tokenizer.

    Args:
        name_or_path: a named model (``smollm2-135m``, ``gemma3-270m``), a built one
            (``smolvlm-smollm2-135m``: see ``lfmsift.models.vlm``; ``smollm2-135m-moe``: see
            ``lfmsift.models.moefy``), a local Hugging Face directory, or a hub id (needs the hub to be reachable).
        dtype: weights dtype (a torch dtype or 'float32' / 'bf16' / 'fp16').
        device: where to put the model.
        data_dir: evaluation data directory for built models that calibrate on text (``smollm2-135m-moe``).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode. For vision-language models (SmolVLM) the second
        item is the processor, which carries the tokenizer as ``.tokenizer``.

    Raises:
        UnsupportedModelError: the architecture is not supported (checked from the config, before weights
            are read); the message lists what is supported.
        ModelLoadError: the name is neither a named model, a directory, nor a reachable hub id.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    torch_dtype = parse_dtype(dtype)
    if name_or_path in BUILT_MODELS:
        model, processor = BUILT_MODELS[name_or_path](torch_dtype, data_dir)
        return model.to(device).eval(), processor
    source = resolve_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError / ValueError / hub errors here
        local = Path(source).expanduser()
        hint = (
            f"the directory {local} has no loadable config.json"
            if local.exists()
            else "it is not a named model ("
            + ", ".join(NAMED_MODELS)
            + "), not an existing directory, and the Hugging Face hub did not provide it"
        )
        raise ModelLoadError(f"Cannot load {name_or_path!r}: {hint}. Cause: {exc}") from exc

    spec = arch_spec(config)  # fail fast, before reading weights
    if getattr(config, "lfmsift_moefy", None) is not None:  # its router is lfmsift's: see models.moefy
        from lfmsift.models.moefy import load_moe

        model, tokenizer = load_moe(source, torch_dtype)
        return model.to(device).eval(), tokenizer
    auto_model = AutoModelForImageTextToText if spec.vlm else AutoModelForCausalLM
    model = auto_model.from_pretrained(source, dtype=torch_dtype)
    model.to(device).eval()
    tokenizer = AutoProcessor.from_pretrained(source) if spec.vlm else AutoTokenizer.from_pretrained(source)
    logger.info("Loaded %s (%s, %s) from %s", name_or_path, spec.name, torch_dtype, source)
    return model, tokenizer
