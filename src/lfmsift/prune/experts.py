"""POP inside the routed experts of a mixture-of-experts FFN.

transformers 5.x keeps the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE fused in one module
(``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) called as ``experts(x, top_k_index, top_k_weights)``
after the router has chosen. `POPExperts` takes the place of that module, so the router (and a shared
expert) are untouched, and runs one `POPFFN` per expert over views of the fused weights (no copy of the
expert weights beyond POPFFN's own per-prompt slices):

- Partitions are per expert, from the tokens routed to that expert in the prompt's prefill (pad positions
  excluded from its scores; an expert reached only by padding is computed densely and stays unpartitioned).
- An expert that no prompt token reached is partitioned on its first use during decoding, from the tokens
  routed to it at that step (DESIGN.md's reading of the paper's open point; counted as ``late_partitions``).
- A decode step computes gate/up over Retained + Candidate channels of each expert the router picked, and
  down_proj over Retained + the selected Candidates: experts not picked are not touched at all.

The ratio r applies to every routed expert's intermediate channels; the model-level target converts with
the activated routed experts only (`budget.ffn_weight_count`: top_k experts), as the paper's Table 8 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lfmsift.models.adapters import FusedExperts, GatedFFN
from lfmsift.prune.pop import POPFFN, Mode, PromptContext


@dataclass(frozen=True)
class ExpertProjection:
    """One projection of one expert: a (out, in) view of a fused expert weight, callable like nn.Linear."""

    weight: torch.Tensor
    bias = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def routed(top_k_index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, top-k slot, token) of every expert that some token was routed to, as in transformers'
    expert loops: ``pos[j], tok[j]`` say that token ``tok[j]`` chose the expert in its slot ``pos[j]``.
    Indices >= `num_experts` (expert-parallel padding) are skipped."""
    with torch.no_grad():
        hot = F.one_hot(top_k_index.clamp(max=num_experts), num_experts + 1)[..., :-1]
        hot = hot.permute(2, 1, 0)  # (E, top_k, tokens)
        hit = hot.sum(dim=(1, 2)).nonzero().flatten().tolist()
    return [(e, *torch.where(hot[e])) for e in hit]


def expert_ffn(experts: FusedExperts, e: int) -> GatedFFN:
    """Expert `e` of fused experts as a `GatedFFN` view (no copy: its projections are views)."""
    inter = experts.intermediate_size
    w = experts.gate_up_proj
    return GatedFFN(
        module=None,
        gate_proj=ExpertProjection(w[e, :inter]),
        up_proj=ExpertProjection(w[e, inter:]),
        down_proj=ExpertProjection(experts.down_proj[e]),
        act_fn=experts.act_fn,
    )


@dataclass
class ExpertCounters:
    """Routing-level counts of one `POPExperts` (the per-expert FLOPs are in each expert's POPFFN)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    prefill_assignments: int = 0  # (token, expert) pairs
    decode_assignments: int = 0
    experts_partitioned_at_prefill: int = 0
    late_partitions: int = 0  # experts first partitioned by a decode step
    pad_only_experts: int = 0  # experts reached only by padding at prefill (computed densely)

    def reset(self) -> None:
        self.__init__()


class POPExperts(nn.Module):
    """POP (or its ``static`` / ``reselect`` variants) in place of a fused routed-experts module.

    Args:
        experts: the view of the fused experts; the module is kept (as ``dense``) and restored on removal.
        top_k: experts per token (for the per-token accounting only; routing is the router's).
        ffn_ratio, delta, mode: as for `POPFFN`, applied to every expert.
        context: the model's `PromptContext` (None: a forward of more than one token starts a prompt).
    """

    lfmsift_replacement = True

    def __init__(
        self,
        experts: FusedExperts,
        top_k: int,
        ffn_ratio: float,
        delta: float = 0.05,
        mode: Mode = "pop",
        context: PromptContext | None = None,
        weights: str = "slices",
    ):
        super().__init__()
        self.dense = experts.module
        self.num_experts = experts.num_experts
        self.top_k = int(top_k)
        self.mode = mode
        self.owns_context = context is None
        self.context = context if context is not None else PromptContext()
        self.experts = nn.ModuleList(
            POPFFN(expert_ffn(experts, e), ffn_ratio, delta, mode, self.context, weights=weights)
            for e in range(self.num_experts)
        )
        self.sizes = self.experts[0].sizes
        self.ffn_ratio = self.experts[0].ffn_ratio
        self.counters = ExpertCounters()
        self._fused = experts
        self._prompt_id: int | None = None

    def _dense_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self._fused.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self._fused.act_fn(gate) * up, self._fused.down_proj[e])

    def _flat_token_mask(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        mask = self.context.token_mask
        if mask is None or mask.numel() != tokens:
            return None
        return mask.reshape(-1).to(device)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        if self.owns_context and (tokens > 1 or self._prompt_id is None):
            self.context.prompt_id += 1
        prefill = self._prompt_id != self.context.prompt_id
        if prefill and tokens == 0:
            raise ValueError("POP needs a non-empty prompt: the prefill scores channels from its tokens")
        self._prompt_id = self.context.prompt_id
        c = self.counters
        mask = self._flat_token_mask(tokens, hidden_states.device) if prefill else None
        out = torch.zeros_like(hidden_states)
        for e, pos, tok in routed(top_k_index, self.num_experts):
            x = hidden_states[tok]
            expert = self.experts[e]
            if prefill and mask is not None and not bool(mask[tok].any()):
                y = self._dense_expert(e, x)  # only padding reached it: no statistics to partition from
                c.pad_only_experts += 1
            else:
                if expert.needs_partition(x):
                    if prefill:
                        c.experts_partitioned_at_prefill += 1
                    else:
                        c.late_partitions += 1
                y = expert(x, token_mask=None if mask is None else mask[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        if prefill:
            c.prefill_tokens += tokens
            c.prefill_assignments += int(top_k_index.numel())
        else:
            c.decode_tokens += tokens
            c.decode_steps += 1
            c.decode_assignments += int(top_k_index.numel())
        return out

    # -- accounting ------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        self.counters.reset()
        for expert in self.experts:
            expert.reset_counters()

    def stats(self) -> dict:
        """The keys of `POPFFN.stats` per token (top_k experts), plus routing counts.

        FLOPs sum over all (token, expert) assignments; ``*_dense`` is the same assignments computed
        with every channel, so the router's choices are identical on both sides of each ratio.
        """
        s, c = self.sizes, self.counters
        rows = [expert.stats() for expert in self.experts]
        total = lambda key: sum(row[key] for row in rows)  # noqa: E731
        steps = [(row["decode_overlap_with_prefill"], row["decode_steps"]) for row in rows if row["decode_steps"]]
        overlap = sum(o * n for o, n in steps) / sum(n for _, n in steps) if steps else None
        one = rows[0]
        return {
            "mode": self.mode,
            "ffn_ratio": self.ffn_ratio,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_d_ff": s.d_ff,
            "d_ff": self.top_k * s.d_ff,
            "retained": one["retained"],
            "candidates": one["candidates"],
            "pruned": one["pruned"],
            "channels_computed_per_decode_step": self.top_k * one["channels_computed_per_decode_step"],
            "channels_used_per_decode_step": self.top_k * one["channels_used_per_decode_step"],
            "prompts": max(row["prompts"] for row in rows),
            "prefill_tokens": c.prefill_tokens,
            "decode_tokens": c.decode_tokens,
            "decode_steps": c.decode_steps,
            "prefill_assignments": c.prefill_assignments,
            "decode_assignments": c.decode_assignments,
            "experts_partitioned_at_prefill": c.experts_partitioned_at_prefill,
            "late_partitions": c.late_partitions,
            "pad_only_experts": c.pad_only_experts,
            "prefill_flops": total("prefill_flops"),
            "prefill_flops_dense": total("prefill_flops_dense"),
            "decode_flops": total("decode_flops"),
            "decode_flops_dense": total("decode_flops_dense"),
            "decode_flops_static": total("decode_flops_static"),
            "decode_overlap_with_prefill": overlap,
        }
