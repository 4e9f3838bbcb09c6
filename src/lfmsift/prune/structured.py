"""Physically smaller decoder layers: remove attention heads and FFN channels by slicing weights.

The baselines that prune structures (Wanda-sp, FLAP, Probe Pruning, GRIFFIN) all end in the same place: a
layer whose q/o projections have fewer heads and whose gate/up/down projections have fewer intermediate
channels. This module builds those smaller modules from a `LayerMask` (which heads and channels to keep,
plus optional bias compensation); the original modules are left untouched, so restoring the model is
swapping them back.

Attention heads and grouped-query attention: a query head is removed by dropping its rows of ``q_proj`` and
its columns of ``o_proj``. Its key/value head is shared with the other query heads of its group, so it is
removed only when every query head of the group is (then its rows of ``k_proj``/``v_proj`` go, and the KV
cache holds fewer heads). The kept query heads no longer form equal groups, so the pruned attention maps
each kept query head to its key/value head with an index (``lfmsift_kv_index``) in a thin attention function
registered as ``lfmsift_heads``, which then calls the model's own implementation (sdpa or eager). The pruned
attention is a shallow clone of the original module with its own config copy, so nothing global changes.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lfmsift.models.adapters import AttentionView, DecoderLayerView, FusedExperts, GatedFFN, ModelView, MoEFFN
from lfmsift.prune.experts import routed
from lfmsift.prune.registry import Plan, Swap

ATTENTION_NAME = "lfmsift_heads"


@dataclass
class LayerMask:
    """What one decoder layer keeps.

    Attributes:
        heads: indices of the kept query heads (None: attention untouched).
        channels: indices of the kept FFN intermediate channels (None: FFN untouched).
        o_bias: bias added to the output of the pruned ``o_proj`` (FLAP's compensation), or None.
        down_bias: bias added to the output of the pruned ``down_proj``, or None.
    """

    heads: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    experts: list[torch.Tensor] | None = None  # MoE: kept channels of each routed expert
    expert_bias: list[torch.Tensor | None] | None = None  # MoE: bias added to each expert's down output


# ----------------------------------------------------------------------------------------------------
# Pure slicing
# ----------------------------------------------------------------------------------------------------


def slice_linear(
    linear: nn.Linear,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
) -> nn.Linear:
    """A new `nn.Linear` with only `rows` (outputs) and `cols` (inputs) of `linear`'s weight.

    `extra_bias` (out_features after slicing) is added to the bias; the layer gains one if it had none.
    """
    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    b = linear.bias.detach() if linear.bias is not None else None
    if b is not None and rows is not None:
        b = b.index_select(0, rows.to(b.device))
    if extra_bias is not None:
        extra = extra_bias.to(device=w.device, dtype=w.dtype)
        b = extra if b is None else b + extra
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    out.requires_grad_(False)
    return out


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection laid out head after head."""
    heads = heads.long()
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def kv_layout(heads: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept KV heads, index of each kept query head's KV head among the kept KV heads).

    Query head h uses KV head ``h // (num_heads // num_kv_heads)``; a KV head is kept while any of its
    query heads is.
    """
    group = num_heads // num_kv_heads
    kv_of_query = heads.long() // group
    kept_kv = torch.unique(kv_of_query)
    position = torch.full((num_kv_heads,), -1, dtype=torch.long)
    position[kept_kv] = torch.arange(kept_kv.numel())
    return kept_kv, position[kv_of_query]


def mean_bias(weight: torch.Tensor, mean_input: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: ``W[:, removed] @ mean_input[removed]`` (float32)."""
    removed = removed.long().to(weight.device)
    return weight.detach().float().index_select(1, removed) @ mean_input.float().to(weight.device)[removed]


# ----------------------------------------------------------------------------------------------------
# Smaller modules
# ----------------------------------------------------------------------------------------------------


class SlicedFFN(nn.Module):
    """A gated FFN with only some intermediate channels: ``down(act(gate(x)) * up(x))`` on smaller weights."""

    lfmsift_replacement = True

    def __init__(self, ffn: GatedFFN, channels: torch.Tensor, down_bias: torch.Tensor | None = None):
        super().__init__()
        channels = channels.long().to(ffn.gate_proj.weight.device)
        self.gate_proj = slice_linear(ffn.gate_proj, rows=channels)
        self.up_proj = slice_linear(ffn.up_proj, rows=channels)
        self.down_proj = slice_linear(ffn.down_proj, cols=channels, extra_bias=down_bias)
        self.act_fn = ffn.act_fn
        self.register_buffer("channels", channels, persistent=False)

    @property
    def intermediate_size(self) -> int:
        return self.gate_proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SlicedExperts(nn.Module):
    """Routed experts with only some intermediate channels each (counts may differ between experts).

    Same call as the fused experts of transformers 5.x, ``experts(x, top_k_index, top_k_weights)``, and the
    same loop over the experts the router picked; expert e multiplies only its kept channels and adds its
    optional bias (FLAP's compensation) before the routing weight, as the expert's own output.
    """

    lfmsift_replacement = True

    def __init__(self, experts: FusedExperts, channels: list[torch.Tensor], biases: list | None = None):
        super().__init__()
        if len(channels) != experts.num_experts:
            raise ValueError(f"{len(channels)} channel sets for {experts.num_experts} experts")
        inter = experts.intermediate_size
        w, d = experts.gate_up_proj.detach(), experts.down_proj.detach()
        gate_up, down, bias = [], [], []
        for e, c in enumerate(channels):
            if c.numel() == 0:
                raise ValueError(f"expert {e}: at least one channel must be kept")
            c = c.long().to(w.device)
            gate_up.append(torch.cat([w[e, :inter].index_select(0, c), w[e, inter:].index_select(0, c)]))
            down.append(d[e].index_select(1, c).contiguous())
            b = None if biases is None else biases[e]
            bias.append(None if b is None else b.to(device=w.device, dtype=w.dtype))
        self.gate_up = gate_up
        self.down = down
        self.bias = bias
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.channels = [c.long().cpu() for c in channels]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, pos, tok in routed(top_k_index, self.num_experts):
            gate, up = F.linear(hidden_states[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down[e], self.bias[e])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def pruned_attention(attn: AttentionView, heads: torch.Tensor, o_bias: torch.Tensor | None = None) -> nn.Module:
    """A clone of `attn.module` that computes only the query heads `heads` (sorted indices).

    The clone shares every submodule except the four projections, which are sliced copies, and carries
    its own copy of the config pointing at the ``lfmsift_heads`` attention function.
    """
    module = attn.module
    heads = torch.sort(heads.long().cpu()).values
    kept_kv, kv_index = kv_layout(heads, attn.num_heads, attn.num_kv_heads)
    d = attn.head_dim
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._forward_hooks = type(module._forward_hooks)()
    clone._forward_pre_hooks = type(module._forward_pre_hooks)()
    clone.q_proj = slice_linear(attn.q_proj, rows=head_rows(heads, d))
    kv_rows = None if kept_kv.numel() == attn.num_kv_heads else head_rows(kept_kv, d)
    clone.k_proj = slice_linear(attn.k_proj, rows=kv_rows)
    clone.v_proj = slice_linear(attn.v_proj, rows=kv_rows)
    clone.o_proj = slice_linear(attn.o_proj, cols=head_rows(heads, d), extra_bias=o_bias)
    config = copy.copy(module.config)
    clone.lfmsift_inner_attention = module.config._attn_implementation or "sdpa"
    config._attn_implementation = ATTENTION_NAME
    clone.config = config
    clone.num_key_value_groups = 1
    clone.register_buffer("lfmsift_kv_index", kv_index.to(attn.q_proj.weight.device), persistent=False)
    clone.register_buffer("lfmsift_heads", heads.to(attn.q_proj.weight.device), persistent=False)
    clone.lfmsift_replacement = True
    return clone


def head_pruned_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function of pruned attention clones: give each kept query head its own KV head, then
    run the model's own implementation (sdpa / eager / ...)."""
    index = module.lfmsift_kv_index
    key = key.index_select(1, index)
    value = value.index_select(1, index)
    inner = module.lfmsift_inner_attention
    if inner == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    else:
        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, head_pruned_attention)


# ----------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------


def layer_swaps(layer: DecoderLayerView, mask: LayerMask) -> list[Swap]:
    """The module swaps that make `layer` keep what `mask` says (nothing for a full mask)."""
    swaps = []
    a = layer.attention
    if mask.heads is not None and (mask.heads.numel() < a.num_heads or mask.o_bias is not None):
        if mask.heads.numel() == 0:
            raise ValueError(f"layer {layer.index}: at least one attention head must be kept")
        attr = _attr_name(layer.module, a.module)
        swaps.append(Swap(layer.module, attr, a.module, pruned_attention(a, mask.heads, mask.o_bias), layer.index))
    ffn = layer.ffn
    if mask.experts is not None:
        if not isinstance(ffn, MoEFFN):
            raise TypeError(f"layer {layer.index}: expert masks need a routed-experts FFN, not {type(ffn).__name__}")
        full = all(c.numel() == ffn.experts.intermediate_size for c in mask.experts)
        if not full or (mask.expert_bias is not None and any(b is not None for b in mask.expert_bias)):
            sliced = SlicedExperts(ffn.experts, mask.experts, mask.expert_bias)
            swaps.append(Swap(ffn.module, "experts", ffn.experts.module, sliced, layer.index))
    if mask.channels is not None:
        if not isinstance(ffn, GatedFFN):
            raise TypeError(f"layer {layer.index}: channel masks need a dense gated FFN, not {type(ffn).__name__}")
        if mask.channels.numel() == 0:
            raise ValueError(f"layer {layer.index}: at least one FFN channel must be kept")
        if mask.channels.numel() < ffn.intermediate_size or mask.down_bias is not None:
            swaps.append(
                Swap(layer.module, layer.ffn_attr, ffn.module, SlicedFFN(ffn, mask.channels, mask.down_bias), layer.index)
            )
    return swaps


def _attr_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise RuntimeError(f"{type(child).__name__} is not a direct child of {type(parent).__name__}")


def masks_plan(view: ModelView, masks: list[LayerMask], summary: dict | None = None) -> Plan:
    """A registry `Plan` applying one `LayerMask` per decoder layer, with the achieved reduction."""
    if len(masks) != len(view.layers):
        raise ValueError(f"{len(masks)} layer masks for {len(view.layers)} decoder layers")
    swaps = [s for layer, m in zip(view.layers, masks) for s in layer_swaps(layer, m)]
    info = dict(summary or {})
    info.update(reduction_summary(view, masks))
    return Plan(swaps=swaps, summary=info)


def reduction_summary(view: ModelView, masks: list[LayerMask]) -> dict:
    """Heads, channels and attention + FFN weights kept, against the dense model.

    MoE layers count their activated weights (top_k experts, of the average kept size), the same measure
    as the budget of the online methods (`budget.ffn_weight_count`).
    """
    dense = kept = 0
    heads = heads_kept = channels = channels_kept = 0
    for layer, m in zip(view.layers, masks):
        a, f = layer.attention, layer.ffn
        d, hidden = a.head_dim, a.q_proj.in_features
        nh = m.heads.numel() if m.heads is not None else a.num_heads
        nkv = kv_layout(m.heads.cpu(), a.num_heads, a.num_kv_heads)[0].numel() if m.heads is not None else a.num_kv_heads
        attn_dense = 2 * hidden * d * (a.num_heads + a.num_kv_heads)
        attn_kept = 2 * hidden * d * (nh + nkv)
        if isinstance(f, MoEFFN):  # activated weights: top_k experts of the average kept size
            e = f.experts
            n_e = [c.numel() for c in m.experts] if m.experts is not None else [e.intermediate_size] * e.num_experts
            dense += attn_dense + f.top_k * 3 * hidden * e.intermediate_size
            kept += attn_kept + f.top_k * 3 * hidden * sum(n_e) / len(n_e)
            channels += e.intermediate_size * e.num_experts
            channels_kept += sum(n_e)
        else:
            nc = m.channels.numel() if m.channels is not None else f.intermediate_size
            dense += attn_dense + 3 * hidden * f.intermediate_size
            kept += attn_kept + 3 * hidden * nc
            channels += f.intermediate_size
            channels_kept += nc
        heads += a.num_heads
        heads_kept += nh
    return {
        "heads_kept": heads_kept,
        "heads": heads,
        "channels_kept": channels_kept,
        "channels": channels,
        "weights_kept_fraction": kept / dense,
        "achieved_reduction": 1 - kept / dense,
    }
