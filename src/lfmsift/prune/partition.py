"""POP's Retained / Candidate / Pruned split and the per-step Candidate selection (pure functions).

With target FFN ratio r and partition width delta (= gamma / 2), the prefill scores' quantiles
``q_{r-delta}`` and ``q_{r+delta}`` split the d_ff channels into

- Retained  R: score >= q_{r+delta}       -> d_ff - round((r + delta) d_ff) channels, always computed;
- Candidate C: between the two quantiles  -> re-scored at every decode step;
- Pruned    P: score <= q_{r-delta}       -> round((r - delta) d_ff) channels, never computed again.

Quantiles are nearest-rank: q_a is the score at ascending rank round(a d_ff), so the counts above are
exact (ties are broken by a stable sort) and the sets are ordered: every R score >= every C score >= every P score. Each decode step keeps
``k_sel = round((1 - r) d_ff) - |R|`` Candidates, so exactly round((1 - r) d_ff) channels are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def check_ratio(ffn_ratio: float, delta: float) -> None:
    """Raise ValueError unless 0 <= r < 1 and the band [r - delta, r + delta] lies inside [0, 1]."""
    if not 0.0 <= ffn_ratio < 1.0:
        raise ValueError(f"The FFN pruning ratio must be in [0, 1); got {ffn_ratio}")
    if delta < 0:
        raise ValueError(f"gamma must be >= 0; got gamma = {2 * delta}")
    if ffn_ratio - delta < -1e-9 or ffn_ratio + delta > 1.0 + 1e-9:
        raise ValueError(
            f"gamma = {2 * delta:g} is too large for the FFN ratio {ffn_ratio:g}: the Candidate band "
            f"[r - gamma/2, r + gamma/2] = [{ffn_ratio - delta:g}, {ffn_ratio + delta:g}] must lie in [0, 1]. "
            f"Use gamma <= {2 * min(ffn_ratio, 1 - ffn_ratio):g} (gamma = 0 gives a static prefill mask)."
        )


@dataclass(frozen=True)
class PartitionSizes:
    d_ff: int
    n_retained: int  # |R|
    n_computed: int  # |R| + |C|: channels whose gate/up a POP decode step computes
    n_keep: int  # round((1 - r) d_ff): channels used per token

    @property
    def n_candidates(self) -> int:
        return self.n_computed - self.n_retained

    @property
    def n_pruned(self) -> int:
        return self.d_ff - self.n_computed

    @property
    def k_select(self) -> int:
        """Candidates kept per decode step."""
        return self.n_keep - self.n_retained


def partition_sizes(d_ff: int, ffn_ratio: float, delta: float) -> PartitionSizes:
    """Sizes of R, R u C and the kept set for d_ff channels (see the module docstring)."""
    check_ratio(ffn_ratio, delta)
    n_keep = d_ff - round(ffn_ratio * d_ff)
    n_retained = d_ff - round(min(ffn_ratio + delta, 1.0) * d_ff)
    n_computed = d_ff - round(max(ffn_ratio - delta, 0.0) * d_ff)
    return PartitionSizes(d_ff, min(n_retained, n_keep), max(n_computed, n_keep), n_keep)


@dataclass(frozen=True)
class Partition:
    """Channels of one FFN ranked by prefill score: ``order[:n_retained]`` is R, then C, then P.

    ``order[:n_keep]`` (R and the upper part of C) is the set the prefill output is written with. The order
    (a stable descending sort of `scores`) is computed on first use: the GPU path reads the sets straight
    from the scores (`triton_pop.partition_index`) and never sorts.
    """

    scores: torch.Tensor  # (d_ff,) prefill scores
    sizes: PartitionSizes

    @cached_property
    def order(self) -> torch.Tensor:
        """(d_ff,) channel ids by descending prefill score; ties: the lower id first."""
        return torch.argsort(self.scores, descending=True, stable=True)

    @property
    def retained(self) -> torch.Tensor:
        return self.order[: self.sizes.n_retained]

    @property
    def candidates(self) -> torch.Tensor:
        return self.order[self.sizes.n_retained : self.sizes.n_computed]

    @property
    def pruned(self) -> torch.Tensor:
        return self.order[self.sizes.n_computed :]

    @property
    def computed(self) -> torch.Tensor:
        """R then C: the rows a decode step computes."""
        return self.order[: self.sizes.n_computed]

    @property
    def keep(self) -> torch.Tensor:
        """The top round((1 - r) d_ff) channels by prefill score."""
        return self.order[: self.sizes.n_keep]


def partition(scores: torch.Tensor, ffn_ratio: float, delta: float) -> Partition:
    """Split channels by their prefill `scores` (1-D) into R / C / P."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per channel); got shape {tuple(scores.shape)}")
    return Partition(scores, partition_sizes(scores.numel(), ffn_ratio, delta))


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k highest `scores` (in descending order of score)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.topk(scores, k, sorted=True).indices
