"""Where the parts that lfmsift rewrites live in each supported Hugging Face architecture.

Pruning (POP and its baselines) replaces gated FFNs and fused experts; KV retrieval hooks attention and
needs the rotary embedding. Rather than sprinkling attribute names over those modules, `describe(model)`
returns one `ModelView`: the decoder layers of the language model, and for each layer a view of its
attention and of its FFN (dense `GatedFFN` or `MoEFFN` with fused experts, router and optional shared
expert). Views hold references to the live modules, so code that edits a view edits the model.

Architectures are recognised by the `model_type` of their Hugging Face config (the class registry of
transformers), never by guessing from module names. Anything else raises `UnsupportedModelError`, which
lists what is supported.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """One supported architecture family.

    Attributes:
        name: short name used in messages and in `tiny.py`.
        model_types: config `model_type` values of the top-level model that belong to this family.
        text_model_type: `model_type` of the language model inside (differs for VLMs).
        moe: True when (some) decoder layers have a routed fused-expert FFN.
        vlm: True for vision-language models (the language decoder is pruned / hooked).
        shared_expert: attribute of the sparse MoE block holding a dense shared expert, if any.
        shared_expert_gate: attribute of the sigmoid gate scaling the shared expert's output, if any.
    """

    name: str
    model_types: tuple[str, ...]
    text_model_type: str
    moe: bool = False
    vlm: bool = False
    shared_expert: str | None = None
    shared_expert_gate: str | None = None


SUPPORTED: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), "llama"),
    ArchSpec("mistral", ("mistral",), "mistral"),
    ArchSpec("qwen2", ("qwen2",), "qwen2"),
    ArchSpec("qwen3", ("qwen3",), "qwen3"),
    ArchSpec("gemma3_text", ("gemma3_text",), "gemma3_text"),
    ArchSpec("smolvlm", ("smolvlm",), "llama", vlm=True),
    ArchSpec("mixtral", ("mixtral",), "mixtral", moe=True),
    ArchSpec(
        "qwen2_moe",
        ("qwen2_moe",),
        "qwen2_moe",
        moe=True,
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    ArchSpec("qwen3_moe", ("qwen3_moe",), "qwen3_moe", moe=True),
    ArchSpec("olmoe", ("olmoe",), "olmoe", moe=True),
)

_BY_MODEL_TYPE: dict[str, ArchSpec] = {t: spec for spec in SUPPORTED for t in spec.model_types}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one lfmsift knows how to rewrite."""


class AlreadyModifiedError(RuntimeError):
    """The model already carries lfmsift replacements (a handle was not removed)."""


def supported_model_types() -> list[str]:
    """The config `model_type` values lfmsift supports, in registry order."""
    return [t for spec in SUPPORTED for t in spec.model_types]


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what} is not supported by lfmsift. Supported architectures (config model_type): "
        f"{', '.join(supported_model_types())}."
    )


def arch_spec(config) -> ArchSpec:
    """The `ArchSpec` for a Hugging Face config (or raise `UnsupportedModelError`)."""
    model_type = getattr(config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise _unsupported(f"Model type {model_type!r} ({type(config).__name__})")
    return spec


# ----------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------


@dataclass
class GatedFFN:
    """A dense gated FFN: `down(act(gate(x)) * up(x))`.

    Intermediate channel i is row i of `gate_proj.weight` and `up_proj.weight` and column i of
    `down_proj.weight`.
    """

    module: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def hidden_size(self) -> int:
        return self.gate_proj.in_features

    @property
    def intermediate_size(self) -> int:
        return self.gate_proj.out_features

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


@dataclass
class FusedExperts:
    """The fused routed experts of transformers 5.x.

    `gate_up_proj` is (E, 2I, H): rows [0, I) are the gate projection and rows [I, 2I) the up projection
    of each expert; `down_proj` is (E, H, I). Expert e computes
    `down_proj[e] @ (act(gate_up[e][:I] @ x) * (gate_up[e][I:] @ x))`.
    """

    module: nn.Module
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.module.gate_up_proj

    @property
    def down_proj(self) -> nn.Parameter:
        return self.module.down_proj

    @property
    def num_experts(self) -> int:
        return self.module.gate_up_proj.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.module.down_proj.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.module.down_proj.shape[1]

    def expert_parameters(self) -> int:
        """Parameters of one routed expert."""
        return (self.gate_up_proj.numel() + self.down_proj.numel()) // self.num_experts


@dataclass
class MoEFFN:
    """A sparse MoE block: a router choosing `top_k` of the fused experts, plus an optional shared expert."""

    module: nn.Module
    router: nn.Module
    experts: FusedExperts
    top_k: int
    shared_expert: GatedFFN | None = None
    shared_expert_gate: nn.Module | None = None

    def active_parameters(self) -> int:
        """Parameters used per token: the router, top_k routed experts and the shared expert (and gate)."""
        n = sum(p.numel() for p in self.router.parameters())
        n += self.top_k * self.experts.expert_parameters()
        if self.shared_expert is not None:
            n += self.shared_expert.num_parameters()
        if self.shared_expert_gate is not None:
            n += sum(p.numel() for p in self.shared_expert_gate.parameters())
        return n


@dataclass
class AttentionView:
    """Self-attention of one decoder layer: projections, head layout and per-layer attention type."""

    module: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    layer_type: str | None = None  # e.g. "sliding_attention" / "full_attention" (Gemma-3, Mistral)
    sliding_window: int | None = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


@dataclass
class DecoderLayerView:
    """One decoder layer; `ffn_attr` is the attribute of `module` holding the FFN (to swap it)."""

    index: int
    module: nn.Module
    attention: AttentionView
    ffn: GatedFFN | MoEFFN
    ffn_attr: str = "mlp"

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoEFFN)


@dataclass
class ModelView:
    """The parts of a supported model that lfmsift works on."""

    arch: ArchSpec
    model: nn.Module
    language_model: nn.Module  # the decoder stack (has .layers, .embed_tokens, .norm, .rotary_emb)
    text_config: object
    layers: list[DecoderLayerView] = field(default_factory=list)

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    def rotary(self, layer: int, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) of the rotary embedding used by decoder layer `layer` at `position_ids`.

        Gemma-3 keeps one rotary embedding per attention type (local/global); others have one.
        """
        rope = self.rotary_emb
        params = inspect.signature(rope.forward).parameters
        if "layer_type" in params:
            return rope(x, position_ids, self.layers[layer].attention.layer_type)
        return rope(x, position_ids)


# ----------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------


def _find_language_model(model: nn.Module, text_model_type: str) -> nn.Module:
    """The module holding the decoder layers: the first whose config is the text model and has `.layers`."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        layers = getattr(module, "layers", None)
        if (
            cfg is not None
            and getattr(cfg, "model_type", None) == text_model_type
            and isinstance(layers, nn.ModuleList)
            and hasattr(module, "embed_tokens")
        ):
            return module
    raise _unsupported(
        f"{type(model).__name__} (no decoder stack of type {text_model_type!r} with .layers was found)"
    )


def _gated_ffn(module: nn.Module, where: str) -> GatedFFN:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise _unsupported(f"The FFN at {where} ({type(module).__name__}, missing {', '.join(missing)})")
    return GatedFFN(module, module.gate_proj, module.up_proj, module.down_proj, module.act_fn)


def _moe_ffn(module: nn.Module, spec: ArchSpec, where: str) -> MoEFFN:
    experts = module.experts
    if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        raise _unsupported(
            f"The experts at {where} ({type(experts).__name__}: lfmsift expects the fused 'gate_up_proj' / "
            "'down_proj' layout of transformers 5.x)"
        )
    router = module.gate
    top_k = getattr(router, "top_k", None) or getattr(module, "top_k", None)
    if top_k is None:
        raise _unsupported(f"The router at {where} ({type(router).__name__}, no top_k)")
    shared = None
    shared_gate = None
    if spec.shared_expert and hasattr(module, spec.shared_expert):
        shared = _gated_ffn(getattr(module, spec.shared_expert), f"{where}.{spec.shared_expert}")
        if spec.shared_expert_gate:
            shared_gate = getattr(module, spec.shared_expert_gate, None)
    return MoEFFN(
        module=module,
        router=router,
        experts=FusedExperts(experts, experts.act_fn),
        top_k=int(top_k),
        shared_expert=shared,
        shared_expert_gate=shared_gate,
    )


def _attention(module: nn.Module, config, index: int) -> AttentionView:
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_heads = module.q_proj.out_features // head_dim
    num_kv_heads = module.k_proj.out_features // head_dim
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[index] if layer_types else None
    # Sliding-window layers: declared per layer (Gemma-3, Qwen2), or model-wide (Mistral) unless the
    # config switches it off (Qwen*: use_sliding_window=False).
    sliding = getattr(module, "sliding_window", None)
    if sliding is None and layer_type != "full_attention" and getattr(config, "use_sliding_window", True):
        sliding = getattr(config, "sliding_window", None)
    return AttentionView(
        module=module,
        q_proj=module.q_proj,
        k_proj=module.k_proj,
        v_proj=module.v_proj,
        o_proj=module.o_proj,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_norm=getattr(module, "q_norm", None),
        k_norm=getattr(module, "k_norm", None),
        layer_type=layer_type,
        sliding_window=sliding,
    )


def describe(model: nn.Module) -> ModelView:
    """Resolve a supported model into a `ModelView` (or raise `UnsupportedModelError`)."""
    spec = arch_spec(model.config)
    lm = _find_language_model(model, spec.text_model_type)
    config = lm.config
    view = ModelView(arch=spec, model=model, language_model=lm, text_config=config)
    for i, layer in enumerate(lm.layers):
        where = f"layers[{i}]"
        mlp = getattr(layer, "mlp", None)
        attn = getattr(layer, "self_attn", None)
        if mlp is None or attn is None:
            raise _unsupported(f"Decoder layer {where} ({type(layer).__name__}, no .mlp / .self_attn)")
        parts = (mlp, attn, getattr(mlp, "experts", None), getattr(mlp, spec.shared_expert or "", None))
        for part in parts:
            if getattr(part, "lfmsift_replacement", False):
                raise AlreadyModifiedError(
                    f"Decoder layer {where} already holds an lfmsift {type(part).__name__}: remove() the handle "
                    "that installed it before applying another method"
                )
        ffn = _moe_ffn(mlp, spec, where + ".mlp") if hasattr(mlp, "experts") else _gated_ffn(mlp, where + ".mlp")
        view.layers.append(DecoderLayerView(i, layer, _attention(attn, config, i), ffn))
    return view


def cache_argument(model: nn.Module, cache) -> dict:
    """The keyword that passes a KV cache to ``model``'s forward: ``cache`` where the installed transformers
    takes it (``past_key_values`` is deprecated there), ``past_key_values`` on earlier releases."""
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache}
