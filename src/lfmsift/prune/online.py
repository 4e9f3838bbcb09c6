"""POP and its two ablation variants as registered pruning methods: ``pop``, ``static``, ``reselect``.

All three prune FFN intermediate channels only, with no calibration, and re-partition at every new prompt:

- ``pop``: Retained / Candidate / Pruned partition at prefill, Candidates re-selected at each decode step.
- ``static``: the paper's Variant 1, the prefill top-(1 - r) set reused for every decode step.
- ``reselect``: the paper's Variant 2, full re-selection over all channels at every decode step.

The ratio is given either directly (``ffn_ratio``) or as a model-level parameter-reduction ``target``,
converted per decoder layer with `budget.layer_ffn_ratio` (the paper's Table 8 rule). ``gamma`` is the
width of the Candidate band (delta = gamma / 2 around r; DESIGN.md's reading of the paper's partition
fraction); it only affects ``pop``.

Mixture-of-experts layers get `experts.POPExperts` in place of their fused routed experts (per-expert
partitions; the target converts with the activated experts only). A shared expert stays dense unless
``prune_shared_expert=True``, which gives it a `POPFFN` at the same ratio (not counted in the budget).
``weights`` says what the Triton decode kernels read on CUDA: per-prompt weight slices (``"slices"``, the
default and the fastest) or the model's own rows through a channel index (``"index"``, no per-prompt copy);
see `pop.POPFFN`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lfmsift.models.adapters import MoEFFN, ModelView
from lfmsift.prune.budget import layer_ffn_ratio
from lfmsift.prune.experts import POPExperts
from lfmsift.prune.partition import check_ratio
from lfmsift.prune.pop import POPFFN, PromptContext
from lfmsift.prune.registry import Plan, PruneHandle, PruningMethod, Swap, register


def _prompt_hook(context: PromptContext):
    """Pre-hook on the decoder stack: mark new prompts and pass the current tokens' pad mask."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache")  # transformers >= 5.24 passes it as `cache`, earlier as `past_key_values`
        if cache is None:
            cache = kwargs.get("past_key_values")
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Reading the cache length would sync: under a CUDA graph capture one token is a decode step and
            # several are a prompt (GraphDecoder captures prefills from an emptied cache).
            past = 0 if x is not None and x.shape[1] > 1 else 1
        else:
            past = 0 if cache is None else int(cache.get_seq_length())
        if past == 0:
            context.prompt_id += 1
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and x is not None and mask.shape[0] == x.shape[0]:
            context.token_mask = mask[:, -x.shape[1]:]
        else:
            context.token_mask = None
        return None

    return hook


@dataclass
class _OnlinePruning(PruningMethod):
    ffn_ratio: float | None = None
    target: float | None = None
    gamma: float = 0.1
    prune_shared_expert: bool = False
    weights: str = "slices"  # what the Triton decode kernels read: see POPFFN ("slices" or "index")
    mode = "pop"

    def __post_init__(self) -> None:
        if (self.ffn_ratio is None) == (self.target is None):
            raise ValueError(f"{self.name}: give exactly one of ffn_ratio= or target=")
        if self.gamma < 0:
            raise ValueError(f"{self.name}: gamma must be >= 0; got {self.gamma}")
        if self.weights not in ("slices", "index"):
            raise ValueError(f"{self.name}: weights must be 'slices' or 'index'; got {self.weights!r}")

    @property
    def delta(self) -> float:
        return self.gamma / 2 if self.mode == "pop" else 0.0

    def plan(self, model, view: ModelView) -> Plan:
        context = PromptContext()
        swaps, ratios = [], []
        for layer in view.layers:
            r = self.ffn_ratio if self.ffn_ratio is not None else layer_ffn_ratio(layer, self.target)
            check_ratio(r, self.delta)
            ratios.append(r)
            ffn = layer.ffn
            if isinstance(ffn, MoEFFN):  # routed experts in place; router (and shared expert) untouched
                pop = POPExperts(ffn.experts, ffn.top_k, r, self.delta, self.mode, context, self.weights)
                swaps.append(Swap(ffn.module, "experts", ffn.experts.module, pop, layer.index))
                shared = ffn.shared_expert
                if self.prune_shared_expert and shared is not None:
                    attr = view.arch.shared_expert
                    shared_pop = POPFFN(shared, r, self.delta, self.mode, context, weights=self.weights)
                    swaps.append(Swap(ffn.module, attr, shared.module, shared_pop, layer.index))
            else:
                pop = POPFFN(ffn, r, self.delta, self.mode, context, weights=self.weights)
                swaps.append(Swap(layer.module, layer.ffn_attr, ffn.module, pop, layer.index))
        summary = {
            "mode": self.mode,
            "target": self.target,
            "ffn_ratio": sum(ratios) / len(ratios),
            "gamma": self.gamma if self.mode == "pop" else None,
            "layers_pruned": len({s.layer for s in swaps}),
        }
        return Plan(swaps=swaps, pre_hooks=[(view.language_model, _prompt_hook(context), True)], summary=summary)

    def stats(self, handle: PruneHandle) -> dict[str, Any]:
        layers = [dict(layer=s.layer, **s.replacement.stats()) for s in handle.plan.swaps]
        keys = ("prefill_flops", "prefill_flops_dense", "decode_flops", "decode_flops_dense", "decode_flops_static")
        tot = {k: sum(row[k] for row in layers) for k in keys}
        tot.update(
            channels_computed_per_decode_step=sum(row["channels_computed_per_decode_step"] for row in layers),
            channels_used_per_decode_step=sum(row["channels_used_per_decode_step"] for row in layers),
            d_ff=sum(row["d_ff"] for row in layers),
            prefill_tokens=layers[0]["prefill_tokens"] if layers else 0,
            decode_tokens=layers[0]["decode_tokens"] if layers else 0,
            decode_steps=layers[0]["decode_steps"] if layers else 0,
        )
        ratio = lambda a, b: (a / b) if b else None  # noqa: E731
        tot["prefill_flops_vs_dense"] = ratio(tot["prefill_flops"], tot["prefill_flops_dense"])
        tot["decode_flops_vs_dense"] = ratio(tot["decode_flops"], tot["decode_flops_dense"])
        tot["decode_extra_flops_vs_static"] = ratio(
            tot["decode_flops"] - tot["decode_flops_static"], tot["decode_flops_dense"]
        )
        overl = [row["decode_overlap_with_prefill"] for row in layers if row["decode_overlap_with_prefill"] is not None]
        tot["decode_overlap_with_prefill"] = sum(overl) / len(overl) if overl else None
        for row in layers:
            row["prefill_flops_vs_dense"] = ratio(row["prefill_flops"], row["prefill_flops_dense"])
            row["decode_flops_vs_dense"] = ratio(row["decode_flops"], row["decode_flops_dense"])
        return {"total": tot, "layers": layers}

    def reset_stats(self, handle: PruneHandle) -> None:
        for s in handle.plan.swaps:
            s.replacement.reset_counters()


@register("pop")
@dataclass
class POP(_OnlinePruning):
    """Partition-guided Online Pruning (R / C / P at prefill, Candidate re-selection per decode step)."""

    mode = "pop"


@register("static")
@dataclass
class StaticPrefillMask(_OnlinePruning):
    """POP's Variant 1: the prefill top-(1 - r) channels are used for every decode step (gamma unused)."""

    mode = "static"


@register("reselect")
@dataclass
class FullReselection(_OnlinePruning):
    """POP's Variant 2: every decode step re-scores all channels and keeps the top (1 - r) (gamma unused)."""

    mode = "reselect"
