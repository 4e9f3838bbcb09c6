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
only with all of its query heads. Mixture-of-experts layers (the POP paper runs FLAP on MoE models without
saying how): each routed expert's channels are scored on the calibration tokens routed to it and
standardised together per layer; in the global threshold an expert channel weighs top_k / E of a dense
channel (it is active for that share of tokens), so the target counts activated weights as POP's does;
each expert keeps at least one channel and gets its own compensation bias (its routed tokens' mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfmsift.models.adapters import ModelView, MoEFFN
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
        head_scores, ffn_scores, head_weights, ffn_weights = [], [], [], []
        for layer, a_stats, f_stats in zip(view.layers, stats.attention, stats.ffn):
            a = layer.attention
            cols = standardize(fluctuation_scores(a.o_proj.weight, a_stats.variance) ** 2)
            head_scores.append(cols.reshape(-1, a.head_dim).mean(1))
            hidden = a.q_proj.in_features
            head_params = (2 + 2 * a.num_kv_heads / a.num_heads) * a.head_dim * hidden
            head_weights.append(torch.full((a.num_heads,), head_params / (3 * hidden), dtype=torch.float64))
            if isinstance(layer.ffn, MoEFFN):  # one standardisation over all experts' channels of the layer
                e = layer.ffn.experts
                raw = [fluctuation_scores(e.down_proj[i], s.variance) for i, s in enumerate(f_stats)]
                ffn_scores.append(standardize(torch.cat(raw)))
                share = layer.ffn.top_k / e.num_experts  # an expert channel is active for top_k / E of tokens
                ffn_weights.append(torch.full((ffn_scores[-1].numel(),), share, dtype=torch.float64))
            else:
                ffn_scores.append(standardize(fluctuation_scores(layer.ffn.down_proj.weight, f_stats.variance)))
                ffn_weights.append(torch.ones(ffn_scores[-1].numel(), dtype=torch.float64))
        scores = torch.cat([torch.cat(head_scores), torch.cat(ffn_scores)]).cpu()
        weights = torch.cat([torch.cat(head_weights), torch.cat(ffn_weights)])
        threshold = global_threshold(scores, weights, 1.0 - self.target)
        masks = []
        for layer, hs, fs, a_stats, f_stats in zip(view.layers, head_scores, ffn_scores, stats.attention, stats.ffn):
            keep_h = _keep_at_least_one(hs.cpu(), hs.cpu() > threshold)
            mask = LayerMask(heads=torch.nonzero(keep_h).flatten())
            if self.bias_compensation:
                a = layer.attention
                removed_cols = torch.nonzero(~keep_h.repeat_interleave(a.head_dim)).flatten()
                if removed_cols.numel():
                    mask.o_bias = mean_bias(a.o_proj.weight, a_stats.mean, removed_cols)
            if isinstance(layer.ffn, MoEFFN):
                e = layer.ffn.experts
                per_expert = fs.cpu().reshape(e.num_experts, e.intermediate_size)
                keeps = [_keep_at_least_one(x, x > threshold) for x in per_expert]
                mask.experts = [torch.nonzero(k).flatten() for k in keeps]
                if self.bias_compensation:
                    mask.expert_bias = [
                        mean_bias(e.down_proj[i], f_stats[i].mean, torch.nonzero(~k).flatten()) if (~k).any() else None
                        for i, k in enumerate(keeps)
                    ]
            else:
                keep_c = _keep_at_least_one(fs.cpu(), fs.cpu() > threshold)
                mask.channels = torch.nonzero(keep_c).flatten()
                removed_ch = torch.nonzero(~keep_c).flatten()
                if self.bias_compensation and removed_ch.numel():
                    mask.down_bias = mean_bias(layer.ffn.down_proj.weight, f_stats.mean, removed_ch)
            masks.append(mask)
        return masks_plan(view, masks, summary)
