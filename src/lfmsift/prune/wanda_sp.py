"""Wanda-sp: structured Wanda, as implemented in FLAP's repository (``prune_wanda_sp``).

Score of input column j of ``o_proj`` / ``down_proj``: ``S_j = mean_i |W_ij| * ||X_j||_2`` with ``||X_j||``
the norm of column j of the calibration inputs. FFN: the ``int(r * d_ff)`` channels with the lowest
``S_j`` go (rows of gate/up, columns of down). Attention: a head scores the sum of ``S_j`` over its
``head_dim`` columns and the ``int(r * num_heads)`` lowest heads go. The same ratio r = the model-level
target in every layer and module; no bias compensation.

Differences from the reference: calibration on PTB (`calibration`), not C4; all statistics come from one
dense pass, whereas the repo recomputes each layer's calibration inputs after pruning the layers before it;
with grouped-query attention a key/value head goes only with all of its query heads (see `structured`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfmsift.models.adapters import ModelView
from lfmsift.prune.calibration import CalibratedMethod
from lfmsift.prune.registry import Plan, PruningMethod, register
from lfmsift.prune.structured import LayerMask, masks_plan


def wanda_column_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """``mean_i |W_ij| * sqrt(sum_sq_j)`` for each input column j (float64)."""
    return weight.detach().double().abs().mean(0) * sum_sq.double().to(weight.device).sqrt()


def keep_top(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of all but the `remove` lowest scores."""
    keep = scores.numel() - remove
    return torch.sort(torch.topk(scores, keep).indices).values


@register("wanda_sp")
@dataclass
class WandaSP(CalibratedMethod, PruningMethod):
    """Static structured Wanda: uniform ratio `target` on the heads and the FFN channels of every layer."""

    def plan(self, model, view: ModelView) -> Plan:
        stats = self.calibration_stats(model, view)
        masks = []
        for layer, a_stats, f_stats in zip(view.layers, stats.attention, stats.ffn):
            a = layer.attention
            head_scores = wanda_column_scores(a.o_proj.weight, a_stats.total_sq).reshape(-1, a.head_dim).sum(1)
            ffn_scores = wanda_column_scores(layer.ffn.down_proj.weight, f_stats.total_sq)
            masks.append(
                LayerMask(
                    heads=keep_top(head_scores, int(self.target * a.num_heads)),
                    channels=keep_top(ffn_scores, int(self.target * ffn_scores.numel())),
                )
            )
        summary = {"target": self.target, "calibration": stats.source, "calib_tokens": stats.samples * stats.seqlen}
        return masks_plan(view, masks, summary)
