"""Tiny random-weight models of every supported architecture, for fast tests.

The configs keep each family's structure (grouped-query attention, q/k norms, Gemma-3's local/global
layers, fused routed experts, Qwen2-MoE's shared expert, SmolVLM's vision tower + connector) at sizes
that run in milliseconds on a CPU. Weights are random (seeded), so these models are for exactness and
plumbing tests, never for quality.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolVLMConfig,
)

from lfmsift.models.adapters import SUPPORTED

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(_COMMON, num_hidden_layers=2)


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_COMMON, sliding_window=64)


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(**_COMMON)


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(**_COMMON, head_dim=16)


def _gemma3_text() -> PretrainedConfig:
    return Gemma3TextConfig(
        **dict(_COMMON, num_hidden_layers=3, num_key_value_heads=1),
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )


def _smolvlm() -> PretrainedConfig:
    text = dict(_COMMON)
    text.pop("tie_word_embeddings")
    return SmolVLMConfig(
        text_config=dict(model_type="llama", **text),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=VOCAB - 1,
        tie_word_embeddings=False,
    )


def _mixtral() -> PretrainedConfig:
    return MixtralConfig(**_MOE, num_local_experts=4, num_experts_per_tok=2)


def _qwen2_moe() -> PretrainedConfig:
    return Qwen2MoeConfig(
        **_MOE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )


def _qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(**_MOE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _olmoe() -> PretrainedConfig:
    return OlmoeConfig(**_MOE, num_experts=4, num_experts_per_tok=2)


TINY_CONFIGS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma3_text": _gemma3_text,
    "smolvlm": _smolvlm,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}
assert set(TINY_CONFIGS) == {spec.name for spec in SUPPORTED}, "every supported architecture needs a tiny config"


def tiny_config(arch: str) -> PretrainedConfig:
    """A tiny config of architecture `arch` (one of `TINY_CONFIGS`)."""
    try:
        return TINY_CONFIGS[arch]()
    except KeyError:
        raise ValueError(f"No tiny config for {arch!r}; available: {', '.join(TINY_CONFIGS)}") from None


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random-weight model of architecture `arch` in eval mode (seeded, so reproducible)."""
    config = tiny_config(arch)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if arch == "smolvlm" else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    return model.eval()
