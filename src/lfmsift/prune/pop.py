"""The POP FFN: a drop-in replacement of a gated FFN that computes only the channels POP keeps.

Prefill (a new prompt) computes gate/up for all d_ff channels, scores them (`scoring.channel_scores`),
splits them into Retained / Candidate / Pruned (`partition.partition`) and writes its output with the top
round((1 - r) d_ff) channels. It then fixes, once per prompt, the channels later steps need — as contiguous
weight slices (each channel's gate and up rows side by side, its down_proj column as a row), which the
Triton kernels of `triton_pop` read on CUDA and PyTorch's matmuls elsewhere; or, with ``weights="index"``
on CUDA, as an int32 channel index through which the kernels read the model's own rows (no per-prompt copy):

- ``pop``: the channels of R u C, ordered R first, then C by prefill score. A decode step computes gate/up
  over these |R u C| channels, scores the Candidates on the current token(s), keeps the top k_sel, and runs
  down_proj on the R channels plus the k_sel selected ones. Pruned channels are never touched.
- ``static`` (the paper's Variant 1): the kept set only; decode reuses the prefill mask.
- ``reselect`` (Variant 2): decode computes all channels, scores all, keeps the top round((1 - r) d_ff).

Nothing is multiplied by a zero mask: every matmul has only the channels it needs.

Which forward starts a new prompt is told by `PromptContext`, which the handle updates from a pre-hook on
the decoder stack (an empty or absent KV cache means a new prompt; the 2-D attention mask gives the pad
positions to leave out of the scores). Used on its own, without a context, a forward of more than one
token starts a new prompt. A multi-token forward that continues a cached prompt is treated as one decode
step over all its tokens (Eq. 3 aggregates over tokens). Masks are shared by the batch, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lfmsift.models.adapters import GatedFFN
from lfmsift.prune.partition import Partition, PartitionSizes, partition, partition_sizes
from lfmsift.prune import triton_pop
from lfmsift.prune.scoring import channel_scores, down_column_norms

Mode = Literal["pop", "static", "reselect"]
MODES: tuple[str, ...] = ("pop", "static", "reselect")


@dataclass
class PromptContext:
    """Shared by the POP FFNs of one model: which prompt is running and which positions are padding."""

    prompt_id: int = 0
    token_mask: torch.Tensor | None = None  # (batch, tokens of the current forward); 0 = padding


@dataclass
class LayerCounters:
    """What one POP FFN computed, accumulated until `reset`."""

    prefill_tokens: int = 0
    prefill_flops: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_flops: float = 0.0
    prompts: int = 0
    overlap_fixed: int = 0  # used channels known (without a device sync) to be in the prefill top set
    overlap_acc: torch.Tensor | None = field(default=None, repr=False)  # the same, counted on the device

    def reset(self) -> None:
        self.__init__()


class POPFFN(nn.Module):
    """POP in place of one gated FFN (see the module docstring).

    Args:
        ffn: the view of the FFN to replace; its module is kept (as ``dense``) and restored on removal.
        ffn_ratio: r, the fraction of intermediate channels pruned per token.
        delta: half the Candidate band (gamma / 2). Ignored (0) for ``static`` and ``reselect``.
        mode: ``pop``, ``static`` or ``reselect``.
        context: shared `PromptContext` (None: a multi-token forward starts a new prompt).
        kernels: ``auto`` runs the decode steps of ``pop`` and ``static`` as Triton kernels on CUDA tensors
            (`triton_pop`) when the FFN is SiLU-gated without gate/up biases and a step has at most 64 tokens;
            ``torch`` always uses PyTorch ops over per-prompt weight slices. Both compute the same rule.
        weights: what the Triton kernels read. ``slices`` (default): per prompt, the gate/up rows of the
            computed channels are copied side by side into one (n, 2, hidden) buffer and their down_proj columns
            into (n, hidden) rows, refilled in place for every prompt; every weight a step reads is then
            contiguous, and a one-token step runs the selection inside its gate/up launch
            (`triton_pop.sliced_step`): the fastest form. ``index``: no per-prompt copy; the kernels read the
            model's own rows through an int32 channel index (slower by a few microseconds per layer on an H100,
            see docs/results.md). Both keep down_proj transposed once per model (a third of the FFN weights);
            the slices add 3n rows per layer (n = |R u C| for pop, the kept set for static: at the 40% target
            of Llama-2-7B about 0.45 of the FFN weights). The PyTorch path always uses the slices.
    """

    lfmsift_replacement = True

    def __init__(
        self,
        ffn: GatedFFN,
        ffn_ratio: float,
        delta: float = 0.05,
        mode: Mode = "pop",
        context: PromptContext | None = None,
        kernels: str = "auto",
        weights: str = "slices",
    ):
        super().__init__()
        if kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be 'auto' (Triton on CUDA when available) or 'torch'; got {kernels!r}")
        if weights not in ("slices", "index"):
            raise ValueError(f"weights must be 'slices' (per-prompt contiguous copies) or 'index' (the model's "
                             f"rows read in place); got {weights!r}")
        self.kernels = kernels
        self.weights = weights
        if mode not in MODES:
            raise ValueError(f"Unknown POP mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        self.ffn_ratio = float(ffn_ratio)
        self.delta = float(delta) if mode == "pop" else 0.0
        self.sizes: PartitionSizes = partition_sizes(ffn.intermediate_size, self.ffn_ratio, self.delta)
        self.dense = ffn.module
        self.act_fn = ffn.act_fn
        self._silu = type(ffn.act_fn).__name__ in ("SiLU", "SiLUActivation")  # the fused Triton kernel's activation
        self.hidden_size = ffn.hidden_size
        self.context = context
        self.counters = LayerCounters()
        self.register_buffer("col_norms", down_column_norms(ffn.down_proj.weight.detach()), persistent=False)
        self.register_buffer("col_norms_sq", self.col_norms.square(), persistent=False)
        self._views = ffn
        self._prompt_id: int | None = None
        self.partition: Partition | None = None
        self._clear_slices()

    # -- weights ---------------------------------------------------------------------------------

    @property
    def _gate(self) -> nn.Linear:
        return self._views.gate_proj

    @property
    def _up(self) -> nn.Linear:
        return self._views.up_proj

    @property
    def _down(self) -> nn.Linear:
        return self._views.down_proj

    def _clear_slices(self) -> None:
        self.w_gate_up: torch.Tensor | None = None  # (n, 2, hidden): each channel's gate and up rows side by side
        self.b_gate_up: torch.Tensor | None = None  # (n, 2)
        self.w_down_rows: torch.Tensor | None = None  # (n, hidden): down_proj columns of the slice, as rows
        self.down_t: torch.Tensor | None = None  # (d_ff, hidden): down_proj transposed, built once
        self.cand_col_norms_sq: torch.Tensor | None = None  # squared down-column norms of C (pop)
        self.w_down_used: torch.Tensor | None = None  # (n_keep, hidden): R rows, then this step's Candidates
        self.retained_pos: torch.Tensor | None = None  # arange(|R|)
        self._down_used_for: Partition | None = None  # the partition w_down_used was filled for
        self.rank: torch.Tensor | None = None  # prefill rank of every channel (reselect overlap)
        self.chan: torch.Tensor | None = None  # int32: the channels a decode step computes (Triton path)
        self.down_index: torch.Tensor | None = None  # int32 (n_keep,): arange(|R|), then the selected (Triton)
        self.down_rows: torch.Tensor | None = None  # int32 (n_keep,): their channels (Triton)
        self.keep_index: torch.Tensor | None = None  # int32 (n_keep,): the prefill's kept set by id (Triton)
        self.cand_in_top: torch.Tensor | None = None  # int8 (|C|,): Candidate in the prefill top set (Triton)
        self.down_acc = None  # triton_pop.DownAccumulator of the down pass (Triton path)
        self.cand_scratch = None  # triton_pop.CandidateScratch or RankScratch of the decode step (Triton path)
        self.slice_chan: torch.Tensor | None = None  # int32 arange(n): the slices' own rows (Triton, >1 token)
        self._indexed = False  # this prompt's decode runs the Triton kernels (over `chan` or the slices)
        self._sliced = False  # ... over the slices, built in `chan`'s order
        self._slices_for: Partition | None = None  # the partition w_gate_up / w_down_rows were built for

    @staticmethod
    def _reuse(buf: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """`buf` if it already has this shape, dtype and device, else a new empty tensor."""
        if buf is not None and buf.shape == shape and buf.dtype == like.dtype and buf.device == like.device:
            return buf
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def _transposed_down(self) -> torch.Tensor:
        """down_proj as (d_ff, hidden) rows, copied once: row gathers from it are contiguous copies.

        Costs one extra copy of down_proj per layer (a third of the FFN weights) while POP is applied;
        gathering columns of the original layout per prompt is an order of magnitude slower.
        """
        w = self._down.weight
        if self.down_t is None or self.down_t.dtype != w.dtype or self.down_t.device != w.device:
            self.down_t = w.detach().t().contiguous()
        return self.down_t

    @torch.no_grad()
    def _build_slices(self, channels: torch.Tensor) -> None:
        """Contiguous gate/up rows and down rows of `channels`, in that order (once per prompt).

        Each channel's gate and up rows lie side by side (one matmul over the (2n, hidden) view gives them
        interleaved; a one-token Triton program reads both in one contiguous pass). The sizes depend only on
        d_ff and the ratios, so the buffers are allocated on the first prompt and refilled in place afterwards
        (a captured decode step stays valid). They are detached: POP is an inference method.
        """
        g, u = self._gate, self._up
        n, hid = channels.numel(), self.hidden_size
        self.w_gate_up = self._reuse(self.w_gate_up, (n, 2, hid), g.weight)
        torch.index_select(g.weight, 0, channels, out=self.w_gate_up[:, 0])
        torch.index_select(u.weight, 0, channels, out=self.w_gate_up[:, 1])
        if g.bias is not None:
            self.b_gate_up = torch.stack([g.bias.index_select(0, channels), u.bias.index_select(0, channels)], 1)
        self.w_down_rows = self._reuse(self.w_down_rows, (n, hid), g.weight)
        torch.index_select(self._transposed_down(), 0, channels, out=self.w_down_rows)
        self._slices_for = self.partition

    def _computed_channels(self, part: Partition) -> torch.Tensor:
        """The channels a decode step computes gate/up for (R then C by prefill rank; or the kept set)."""
        return part.computed if self.mode == "pop" else part.keep

    def _set_channel_index(self, part: Partition) -> None:
        """Fill the Triton path's int32 channel vectors in place (same addresses for every prompt).

        One kernel reads the sets from the prefill scores, with no sort (`triton_pop.partition_index`). R and C
        are each in channel-id order: the kernels then read weight rows in address order (read in
        prefill-rank order, rows scatter over the matrix and the down pass ran ~40% slower on an H100). The
        Candidates' prefill ranks survive as flags (in the top n_keep or not) for the overlap count; pop also
        gets the Candidates' squared down-column norms here.
        """
        s, dev = part.sizes, part.scores.device
        n_used = s.n_computed if self.mode == "pop" else s.n_keep
        if self.chan is None or self.chan.numel() != n_used or self.chan.device != dev:
            self.chan = torch.empty(n_used, dtype=torch.int32, device=dev)
            self.down_index = torch.arange(s.n_keep, dtype=torch.int32, device=dev)  # pop rewrites after |R|
            self.down_rows = torch.empty(s.n_keep, dtype=torch.int32, device=dev)
            self.keep_index = torch.empty(s.n_keep, dtype=torch.int32, device=dev)
            self.cand_in_top = torch.empty(s.n_candidates, dtype=torch.int8, device=dev)
            self.cand_col_norms_sq = torch.empty(s.n_candidates, dtype=torch.float32, device=dev)
        pop = self.mode == "pop"
        triton_pop.partition_index(part.scores, s.n_retained, s.n_keep, s.n_computed, self.chan, self.down_rows,
                                   self.keep_index, self.cand_in_top if pop else None,
                                   self.col_norms_sq if pop else None, self.cand_col_norms_sq if pop else None)

    def _ensure_slices(self) -> None:
        """Build the weight slices of the current prompt if its decode so far ran indexed (a step of more
        than 64 tokens falls back to PyTorch's matmuls)."""
        if self._slices_for is not self.partition:  # in the channel index's order when there is one
            self._build_slices(self.chan.long() if self._indexed else self._computed_channels(self.partition))

    # -- forward ---------------------------------------------------------------------------------

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The context's pad mask for the tokens of `x` ((batch, seq, h), or (batch * seq, h) flattened)."""
        mask = self.context.token_mask if self.context is not None else None
        if mask is None or mask.numel() != x.shape[:-1].numel():
            return None
        return mask.reshape(x.shape[:-1]).to(x.device)

    def needs_partition(self, x: torch.Tensor) -> bool:
        """Whether this forward partitions (a new prompt, or the first use of this FFN in the prompt)."""
        if self.context is not None:
            return self._prompt_id != self.context.prompt_id or self.partition is None
        return x.shape[1] > 1 or self.partition is None

    def _down_out(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        bias = self._down.bias
        return F.linear(h, rows.t()) if bias is None else F.linear(h, rows.t(), bias)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` is (batch, seq, hidden) or (tokens, hidden); `token_mask` (its leading dims, 0 = padding)
        overrides the context's pad mask for the scores of a partitioning forward."""
        if self.needs_partition(x):
            return self._prefill(x, token_mask)
        return self._decode(x)

    def _prefill(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[:-1].numel() == 0:
            raise ValueError("POP needs a non-empty prompt: the prefill scores channels from its tokens")
        g, u = self._gate, self._up
        h = self.act_fn(g(x)) * u(x)  # all channels: prefill needs every score
        mask = token_mask if token_mask is not None else self._token_mask(x)
        scores = channel_scores(h, self.col_norms, mask)
        part = partition(scores, self.ffn_ratio, self.delta)
        self.partition = part
        self._prompt_id = self.context.prompt_id if self.context is not None else None
        s = part.sizes
        # Every per-prompt tensor a decode step reads is refilled in place, so a decode step captured in a CUDA
        # graph stays valid for later prompts (same addresses, new contents).
        self._indexed = self.mode != "reselect" and self._kernels_fit(x)
        self._sliced = self._indexed and self.weights == "slices"
        if self._indexed:  # the channel vectors; with "index", the kernels read the channels' rows in place
            self._set_channel_index(part)
            if self._sliced:
                self._build_slices(self.chan.long())
                n = self.chan.numel()
                if self.slice_chan is None or self.slice_chan.numel() != n or self.slice_chan.device != x.device:
                    self.slice_chan = torch.arange(n, dtype=torch.int32, device=x.device)
        elif self.mode != "reselect":
            self._build_slices(self._computed_channels(part))
            if self.mode == "pop":
                self.cand_col_norms_sq = self._reuse(self.cand_col_norms_sq, (s.n_candidates,), self.col_norms_sq)
                torch.index_select(self.col_norms_sq, 0, part.candidates, out=self.cand_col_norms_sq)
                self._down_used()
        if self.mode == "reselect":  # decode uses the full weights; keep the prefill ranks to measure overlap
            self.rank = torch.empty_like(part.order)
            self.rank[part.order] = torch.arange(part.order.numel(), device=part.order.device)
            self.w_down_rows = self._transposed_down()
            out = self._down_out(h.index_select(-1, part.keep), self.w_down_rows.index_select(0, part.keep))
        elif self._indexed:  # the kept rows in address order (a faster gather)
            keep = self.keep_index
            out = self._down_out(h.index_select(-1, keep), self._transposed_down().index_select(0, keep))
        else:  # the first n_keep rows of the slice are the kept set
            out = self._down_out(h.index_select(-1, part.keep), self.w_down_rows[: s.n_keep])
        tokens = x.shape[:-1].numel()
        c = self.counters
        if c.overlap_acc is None:
            c.overlap_acc = torch.zeros((), dtype=torch.long, device=x.device)
        c.prompts += 1
        c.prefill_tokens += tokens
        c.prefill_flops += tokens * (2 * self.hidden_size * (2 * s.d_ff + s.n_keep) + 3 * s.d_ff)
        return out

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sizes
        c = self.counters
        tokens = x.shape[:-1].numel()
        hid = self.hidden_size
        indexed = self._indexed and tokens <= 64
        if not indexed and self.mode != "reselect":
            self._ensure_slices()
        if self.mode == "static" or (self.mode == "pop" and s.k_select == s.n_candidates):
            # every computed channel is used (static; pop with no choice to make: gamma = 0, or all needed)
            if indexed:
                out = self._add_down_bias(self._triton_step(x, every_channel=True).reshape(*x.shape[:-1], hid))
            else:
                out = self._down_out(self._gated(x)[..., : s.n_keep], self.w_down_rows[: s.n_keep])
            c.overlap_fixed += s.n_keep
            n_gated = s.n_keep if self.mode == "static" else s.n_computed
            flops = tokens * (2 * hid * (2 * n_gated + s.n_keep) + 3 * n_gated)
        elif self.mode == "pop":
            n_r, k = s.n_retained, s.k_select
            if indexed:  # Triton: two launches, the selection inside one of them
                out = self._add_down_bias(self._triton_step(x, every_channel=False).reshape(*x.shape[:-1], hid))
                c.overlap_fixed += n_r  # the selection kernel counted the chosen in the prefill top set
            else:
                h = self._gated(x)  # (.., |R u C|), R first, then C by prefill rank
                sel = self._select(h[..., n_r:], self.cand_col_norms_sq, k) + n_r
                # down_proj over R + the selected Candidates: their rows are gathered behind the R rows of a
                # persistent buffer, so one matmul reads exactly |R| + k rows.
                rows = self._down_used()
                torch.index_select(self.w_down_rows, 0, sel, out=rows[n_r:])
                used = h.index_select(-1, torch.cat((self.retained_pos, sel)))
                out = self._down_out(used, rows)
                c.overlap_fixed += n_r
                if self._indexed:  # slices in channel order (built for a long step): flags say the rank
                    c.overlap_acc.add_(self.cand_in_top.index_select(0, sel - n_r).sum())
                else:
                    c.overlap_acc.add_((sel < s.n_keep).sum())  # slice order = prefill rank
            score_flops = 2 * tokens * s.n_candidates
            flops = tokens * 2 * hid * (2 * s.n_computed + s.n_keep) + tokens * 3 * s.n_computed + score_flops
        else:  # reselect
            g, u = self._gate, self._up
            h = self.act_fn(g(x)) * u(x)
            sel = self._select(h, self.col_norms_sq, s.n_keep)
            out = self._down_out(h.index_select(-1, sel), self.w_down_rows.index_select(0, sel))
            c.overlap_acc.add_((self.rank.index_select(0, sel) < s.n_keep).sum())
            flops = tokens * 2 * hid * (2 * s.d_ff + s.n_keep) + tokens * 3 * s.d_ff + 2 * tokens * s.d_ff
        c.decode_tokens += tokens
        c.decode_steps += 1
        c.decode_flops += flops
        return out

    def _triton_step(self, x: torch.Tensor, every_channel: bool) -> torch.Tensor:
        """A decode step on the Triton kernels, (tokens, hidden) out: gate/up over the computed channels and
        the down pass over those used — all of them (`every_channel`: static, or pop with no Candidate band),
        else R and the k_select best Candidates. Over the slices (one token: `triton_pop.sliced_step`; more:
        the index kernels over the slices' own rows) or through the channel index into the model's rows."""
        s = self.sizes
        tokens = x.shape[:-1].numel()
        flat = x.reshape(-1, self.hidden_size).contiguous()
        acc = self._accumulator(tokens, x.device)
        n = self.chan.numel()
        n_r, k = (n, 0) if every_channel else (s.n_retained, s.k_select)
        overlap, in_top = (None, None) if every_channel else (self.counters.overlap_acc, self.cand_in_top)
        if self._sliced and tokens == 1:
            scratch = None if every_channel else self._candidate_scratch(tokens, x.device)
            return triton_pop.sliced_step(flat, self.w_gate_up, self.w_down_rows, n_r, self.cand_col_norms_sq,
                                          self.down_index, k, acc, scratch, overlap, in_top)[1]
        if self._sliced:  # the slices' rows are their own channels: chan = rows = arange
            gate, up, down = self.w_gate_up[:, 0], self.w_gate_up[:, 1], self.w_down_rows
            chan, rows = self.slice_chan, self.down_index
        else:
            gate, up, down = self._gate.weight, self._up.weight, self._transposed_down()
            chan, rows = self.chan, self.down_rows
        if every_channel:
            h = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
            if self._sliced:  # every slice row, in order: no index at all
                triton_pop.gated_rows(flat, gate, up, h)
                return triton_pop.kept_down(h, down, self.down_index, n, n, acc)
            triton_pop.gated_rows(flat, gate, up, h, chan=chan)
            return triton_pop.gathered_down(h, down, self.down_index, rows=rows, acc=acc)
        return triton_pop.pop_decode_step(flat, gate, up, chan, n_r, self.cand_col_norms_sq, down, self.down_index,
                                          rows, k, acc, self._candidate_scratch(tokens, x.device), overlap,
                                          in_top)[1]

    def _down_used(self) -> torch.Tensor:
        """(n_keep, hidden) rows for the PyTorch decode: the R rows, then each step's selected Candidates.

        Refilled once per partition (at prefill, so a captured decode step stays valid); only the PyTorch path
        needs this copy of n_keep rows.
        """
        if self._down_used_for is not self.partition:
            n_r = self.sizes.n_retained
            self.w_down_used = self._reuse(self.w_down_used, (self.sizes.n_keep, self.hidden_size), self.w_down_rows)
            self.w_down_used[:n_r] = self.w_down_rows[:n_r]
            if self.retained_pos is None or self.retained_pos.device != self.w_down_rows.device:
                self.retained_pos = torch.arange(n_r, device=self.w_down_rows.device)
            self._down_used_for = self.partition
        return self.w_down_used

    def _kernels_fit(self, x: torch.Tensor) -> bool:
        """Whether this FFN's decode can run the Triton kernels (SiLU gate, no gate/up bias, CUDA)."""
        return (self.kernels == "auto" and self._silu and self._gate.bias is None and self._up.bias is None
                and triton_pop.available(x))

    def _accumulator(self, tokens: int, device: torch.device):
        self.down_acc = triton_pop.DownAccumulator.for_shape(self.down_acc, tokens, self.hidden_size, device)
        return self.down_acc

    def _candidate_scratch(self, tokens: int, device: torch.device):
        """Scratch of POP's Triton step: a `RankScratch` for `triton_pop.sliced_step` (one token over the
        slices) and for `triton_pop.ranked_step`; a `CandidateScratch` for the one-launch gate/up + selection
        (`triton_pop.gated_select`) where `triton_pop.use_gated_select` says it pays."""
        s = self.sizes
        if (self._sliced and tokens == 1) or not triton_pop.use_gated_select(s.n_retained, s.n_candidates, device):
            self.cand_scratch = triton_pop.RankScratch.for_shape(self.cand_scratch, s.n_candidates, device)
            return self.cand_scratch
        self.cand_scratch = triton_pop.CandidateScratch.for_shape(self.cand_scratch, tokens, s.n_candidates,
                                                                  triton_pop.GATED_SELECT_SPLIT, device)
        return self.cand_scratch

    def _add_down_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self._down.bias is None else out + self._down.bias

    @staticmethod
    def _select(h: torch.Tensor, col_norms_sq: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the k channels of `h` with the highest decode-step POP score.

        Ranks by ||H_i||^2 * ||W_down[:, i]||^2, the square of `scoring.channel_scores` (same order, two
        fewer ops per step). Decode tokens are never padding, so no mask is applied.
        """
        if h.dtype != torch.float32:
            h = h.float()
        sq = h.square().reshape(-1, h.shape[-1])
        if sq.shape[0] > 1:
            sq = sq.sum(0)
        return torch.topk(sq.reshape(-1) * col_norms_sq, k, sorted=False).indices

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        """act(gate) * up over the slice's channels: one matmul, its outputs gate/up interleaved per channel."""
        n, _, hid = self.w_gate_up.shape
        bias = None if self.b_gate_up is None else self.b_gate_up.reshape(2 * n)
        gu = F.linear(x, self.w_gate_up.reshape(2 * n, hid), bias).unflatten(-1, (n, 2))
        return self.act_fn(gu[..., 0]) * gu[..., 1]

    # -- accounting ------------------------------------------------------------------------------

    def channels_computed_per_step(self) -> int:
        """Channels whose gate/up a decode step computes."""
        s = self.sizes
        return {"pop": s.n_computed, "static": s.n_keep, "reselect": s.d_ff}[self.mode]

    def dense_flops_per_token(self) -> int:
        s = self.sizes
        return 2 * self.hidden_size * 3 * s.d_ff + 3 * s.d_ff

    def reset_counters(self) -> None:
        self.counters.reset()

    def stats(self) -> dict:
        s, c = self.sizes, self.counters
        dense = self.dense_flops_per_token()
        static_per_token = 2 * self.hidden_size * 3 * s.n_keep + 3 * s.n_keep
        overlap = None
        if c.decode_steps:
            used_in_keep = c.overlap_fixed + (0 if c.overlap_acc is None else int(c.overlap_acc))
            overlap = used_in_keep / (c.decode_steps * s.n_keep)
        return {
            "mode": self.mode,
            "ffn_ratio": self.ffn_ratio,
            "d_ff": s.d_ff,
            "retained": s.n_retained if self.mode == "pop" else s.n_keep,
            "candidates": s.n_candidates if self.mode == "pop" else (s.d_ff if self.mode == "reselect" else 0),
            "pruned": s.n_pruned if self.mode == "pop" else (s.d_ff - s.n_keep if self.mode == "static" else 0),
            "channels_computed_per_decode_step": self.channels_computed_per_step(),
            "channels_used_per_decode_step": s.n_keep,
            "prompts": c.prompts,
            "prefill_tokens": c.prefill_tokens,
            "decode_tokens": c.decode_tokens,
            "decode_steps": c.decode_steps,
            "prefill_flops": c.prefill_flops,
            "prefill_flops_dense": c.prefill_tokens * dense,
            "decode_flops": c.decode_flops,
            "decode_flops_dense": c.decode_tokens * dense,
            "decode_flops_static": c.decode_tokens * static_per_token,
            "decode_overlap_with_prefill": overlap,
        }
