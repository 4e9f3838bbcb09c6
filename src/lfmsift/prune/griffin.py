"""GRIFFIN: prompt-conditioned FFN expert selection, fixed for the whole generation (Dong et al., COLM 2024).

At a new prompt the FFN runs dense; from its intermediate activations ``Z = act(x W_gate^T) * (x W_up^T)``
each token's row is normalised (``Z_t / ||Z_t||_2``) and channel j scores ``s_j = ||Zbar_{:, j}||_2`` over the
prompt tokens. The top ``round((1 - r) d_ff)`` channels become the "experts": gate/up rows and down columns
are sliced once, and every later token of that prompt (decode) uses only them. No calibration.

Readings: GRIFFIN's code assumes batch size 1; here the score sums over the batch's real tokens (pad
positions excluded), so a batch shares one expert set, like POP's masks. GRIFFIN prunes FFNs only, so it
gets POP's converted FFN ratio for a model-level `target` (`budget.layer_ffn_ratio`). Its prefill output is
dense (GRIFFIN computes the full FFN while selecting), so a single forward pass -- perplexity, one-pass
multiple-choice scoring -- sees the dense model; only tokens after the prompt are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lfmsift.models.adapters import GatedFFN, ModelView
from lfmsift.prune.budget import layer_ffn_ratio
from lfmsift.prune.online import _prompt_hook
from lfmsift.prune.pop import PromptContext
from lfmsift.prune.registry import Plan, PruneHandle, PruningMethod, Swap, register


def griffin_scores(z: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``||Z_{:, j} / ||Z_t||_2||_2`` over all real tokens: GRIFFIN's expert statistic (float32)."""
    z = z.float()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if token_mask is not None:
        z = z * token_mask.to(z.dtype).unsqueeze(-1)
    return z.reshape(-1, z.shape[-1]).square().sum(0).sqrt()


class GriffinFFN(nn.Module):
    """A gated FFN that selects its experts at each new prompt and uses only them afterwards."""

    lfmsift_replacement = True

    def __init__(self, ffn: GatedFFN, ffn_ratio: float, context: PromptContext):
        super().__init__()
        if not 0.0 <= ffn_ratio < 1.0:
            raise ValueError(f"griffin: the FFN ratio must be in [0, 1); got {ffn_ratio}")
        if ffn.gate_proj.bias is not None or ffn.up_proj.bias is not None:
            raise TypeError("griffin: gate/up projections with a bias are not supported")
        self.dense = ffn.module
        self._ffn = ffn
        self.ffn_ratio = float(ffn_ratio)
        self.keep = max(1, round((1.0 - ffn_ratio) * ffn.intermediate_size))
        self.context = context
        self._prompt_id: int | None = None
        self.experts: torch.Tensor | None = None
        self.w_gate = self.w_up = self.w_down = None
        self.prefill_tokens = self.decode_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts is None or self._prompt_id != self.context.prompt_id:
            return self._prefill(x)
        self.decode_tokens += x.shape[0] * x.shape[1]
        h = self._ffn.act_fn(nn.functional.linear(x, self.w_gate)) * nn.functional.linear(x, self.w_up)
        return nn.functional.linear(h, self.w_down, self._ffn.down_proj.bias)

    @torch.no_grad()
    def _prefill(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] == 0:
            raise ValueError("griffin needs a non-empty prompt to select its experts")
        f = self._ffn
        z = f.act_fn(f.gate_proj(x)) * f.up_proj(x)
        mask = self.context.token_mask
        mask = mask.to(x.device) if mask is not None and mask.shape == x.shape[:-1] else None
        scores = griffin_scores(z, mask)
        self.experts = torch.sort(torch.topk(scores, self.keep).indices).values
        self.w_gate = f.gate_proj.weight.index_select(0, self.experts)
        self.w_up = f.up_proj.weight.index_select(0, self.experts)
        self.w_down = f.down_proj.weight.index_select(1, self.experts).contiguous()
        self._prompt_id = self.context.prompt_id
        self.prefill_tokens += x.shape[0] * x.shape[1]
        return f.down_proj(z)


@register("griffin")
@dataclass
class Griffin(PruningMethod):
    """GRIFFIN: FFN experts selected from the prompt, fixed for its generation (see the module docstring)."""

    target: float | None = None
    ffn_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.ffn_ratio is None) == (self.target is None):
            raise ValueError("griffin: give exactly one of ffn_ratio= or target=")

    def plan(self, model, view: ModelView) -> Plan:
        context = PromptContext()
        swaps, ratios = [], []
        for layer in view.layers:
            if not isinstance(layer.ffn, GatedFFN):
                raise TypeError(f"griffin: decoder layer {layer.index} has routed experts; GRIFFIN prunes dense gated "
                                "FFNs (for MoE use pop, static, reselect, wanda_sp or flap)")
            r = self.ffn_ratio if self.ffn_ratio is not None else layer_ffn_ratio(layer, self.target)
            ratios.append(r)
            swaps.append(Swap(layer.module, layer.ffn_attr, layer.ffn.module, GriffinFFN(layer.ffn, r, context), layer.index))
        summary = {"target": self.target, "ffn_ratio": sum(ratios) / len(ratios), "layers_pruned": len(swaps)}
        return Plan(swaps=swaps, pre_hooks=[(view.language_model, _prompt_hook(context), True)], summary=summary)

    def stats(self, handle: PruneHandle) -> dict[str, Any]:
        ffns = handle.replacements
        return {
            "prefill_tokens": ffns[0].prefill_tokens if ffns else 0,
            "decode_tokens": ffns[0].decode_tokens if ffns else 0,
            "channels_per_decode_token": sum(f.keep for f in ffns),
            "d_ff": sum(f._ffn.intermediate_size for f in ffns),
        }
