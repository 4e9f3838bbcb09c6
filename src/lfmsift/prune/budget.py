"""Pruning budgets: convert a model-level parameter-reduction target into an FFN-only ratio.

POP prunes only FFN channels, while the baselines prune attention and FFN. To remove the same share of
parameters, the FFN ratio is raised per decoder layer:

    r_ffn = r_target * (P_attn + P_ffn) / P_ffn

with P counting the weights of the q/k/v/o projections and of the FFN of that layer (embeddings, norms and
the LM head excluded). For MoE layers P_ffn counts only the activated routed experts (top_k experts of one
token; router and shared expert excluded), as the paper's Table 8 does. This reproduces Table 8, e.g. 29.9%
for Llama-2-7B and 24.8% for Llama-3.1-8B at a 20% target.
"""

from __future__ import annotations

from lfmsift.models.adapters import DecoderLayerView, GatedFFN, MoEFFN


def attention_weight_count(layer: DecoderLayerView) -> int:
    """Weights of the q, k, v and o projections (biases and norms excluded)."""
    a = layer.attention
    return sum(p.weight.numel() for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))


def ffn_weight_count(layer: DecoderLayerView) -> int:
    """Weights of the dense FFN, or of top_k routed experts for an MoE layer."""
    ffn = layer.ffn
    if isinstance(ffn, GatedFFN):
        return sum(p.weight.numel() for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
    if isinstance(ffn, MoEFFN):
        return ffn.top_k * ffn.experts.expert_parameters()
    raise TypeError(f"Unknown FFN view {type(ffn).__name__}")


def ffn_ratio_for_target(target: float, attention_weights: int, ffn_weights: int) -> float:
    """The FFN ratio that removes `target` of attention + FFN weights by pruning the FFN alone."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"The target must be in [0, 1); got {target}")
    share = ffn_weights / (attention_weights + ffn_weights)
    r = target / share
    if r >= 1.0:
        raise ValueError(
            f"A target of {target:g} cannot be reached by pruning FFNs only: they hold {share:.1%} of the "
            f"attention + FFN weights of this layer. Use a target below {share:g}."
        )
    return r


def layer_ffn_ratio(layer: DecoderLayerView, target: float) -> float:
    """`ffn_ratio_for_target` with the weight counts of one decoder layer."""
    return ffn_ratio_for_target(target, attention_weight_count(layer), ffn_weight_count(layer))
