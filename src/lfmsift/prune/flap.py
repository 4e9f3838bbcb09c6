"""FLAP: fluctuation-based adaptive structured pruning with bias compensation (An et al., AAAI 2024).

Follows FLAP's repository defaults (metric ``WIFV``, structure ``AL-AM``, bias compensation on):

- Fluctuation metric of input column j of ``o_proj`` / ``down_proj``: ``Var_calib(X_j) * ||W_{:,j}||_2^2``;
  the attention metric is squared.
- Per layer, each module's metrics are standardised (``(s - mean) / std``); a head takes the mean of its
  ``head_dim`` standardised columns.
- One global threshold over all heads and channels of all layers, chosen so the kept parameters are the
  closest to ``(1 - target)`` of attention + FFN: each head weighs as many channels as it has parameters
  (``(2 + 2 kv/heads) * head_dim * hidden / (3 * hidden)``, 512/3 on Llama-7B as in the repo).
- Removed columns are compensated by a bias: ``b = W[:, removed] @ mean_calib(X[removed])`` added to the
  output of ``o_proj`` / ``down_proj``.

Differences from the reference: calibration on PTB, not C4 (the POP paper) or WikiText-2 (FLAP's repo,
which is our evaluation set); at least one head and one channel stay in every layer (the repo can empty a
module, which our sliced attention cannot represent); with grouped-query attention a key/value head goes
only with all of its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfmsift.models.adapters import ModelView
from lfmsift.prune.calibration import CalibratedMethod
from lfmsift.prune.registry import Plan, PruningMethod, register
from lfmsift.prune.structured import LayerMask, masks_plan, mean_bias


def fluctuation_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's WIFV: ``Var(X_j) * sum_i W_ij^2`` per input column j (float64)."""
    return variance.double().to(weight.device) * weight.detach().double().square().sum(0)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` (unbiased std, as ``torch.std``)."""
    return (x - x.mean()) / x.std()


def global_threshold(scores: torch.Tensor, weights: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """FLAP's AL-AM threshold: sort scores descending, take the one where the cumulative weight is closest
    to `keep_fraction` of the total; structures scoring strictly above it are kept."""
    order = torch.argsort(scores, descending=True)
    cum = torch.cumsum(weights[order], 0)
    at = torch.argmin((cum - weights.sum() * keep_fraction).abs())
    return scores[order[at]]


def _keep_at_least_one(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if keep.any():
        return keep
    keep = keep.clone()
    keep[scores.argmax()] = True
    return keep


@register("flap")
@dataclass
class FLAP(CalibratedMethod, PruningMethod):
    """FLAP (WIFV metric, adaptive global structure AL-AM, bias compensation)."""

    bias_compensation: bool = True

    def plan(self, model, view: ModelView) -> Plan:
        stats = self.calibration_stats(model, view)
        summary = {
            "target": self.target,
            "calibration": stats.source,
            "calib_tokens": stats.samples * stats.seqlen,
            "bias_compensation": self.bias_compensation,
        }
        if self.target == 0:
            return masks_plan(view, [LayerMask() for _ in view.layers], summary)
        head_scores, ffn_scores, head_weights = [], [], []
        for layer, a_stats, f_stats in zip(view.layers, stats.attention, stats.ffn):
            a = layer.attention
            cols = standardize(fluctuation_scores(a.o_proj.weight, a_stats.variance) ** 2)
            head_scores.append(cols.reshape(-1, a.head_dim).mean(1))
            ffn_scores.append(standardize(fluctuation_scores(layer.ffn.down_proj.weight, f_stats.variance)))
            hidden = a.q_proj.in_features
            head_params = (2 + 2 * a.num_kv_heads / a.num_heads) * a.head_dim * hidden
            head_weights.append(torch.full((a.num_heads,), head_params / (3 * hidden), dtype=torch.float64))
        scores = torch.cat([torch.cat(head_scores), torch.cat(ffn_scores)]).cpu()
        weights = torch.cat([torch.cat(head_weights), torch.ones(sum(s.numel() for s in ffn_scores), dtype=torch.float64)])
        threshold = global_threshold(scores, weights, 1.0 - self.target)
        masks = []
        for layer, hs, fs, a_stats, f_stats in zip(view.layers, head_scores, ffn_scores, stats.attention, stats.ffn):
            keep_h = _keep_at_least_one(hs.cpu(), hs.cpu() > threshold)
            keep_c = _keep_at_least_one(fs.cpu(), fs.cpu() > threshold)
            mask = LayerMask(heads=torch.nonzero(keep_h).flatten(), channels=torch.nonzero(keep_c).flatten())
            if self.bias_compensation:
                a = layer.attention
                removed_cols = torch.nonzero(~keep_h.repeat_interleave(a.head_dim)).flatten()
                if removed_cols.numel():
                    mask.o_bias = mean_bias(a.o_proj.weight, a_stats.mean, removed_cols)
                removed_ch = torch.nonzero(~keep_c).flatten()
                if removed_ch.numel():
                    mask.down_bias = mean_bias(layer.ffn.down_proj.weight, f_stats.mean, removed_ch)
            masks.append(mask)
        return masks_plan(view, masks, summary)
