"""The POP FFN: a drop-in replacement of a gated FFN that computes only the channels POP keeps.

Prefill (a new prompt) computes gate/up for all d_ff channels, scores them (`scoring.channel_scores`),
splits them into Retained / Candidate / Pruned (`partition.partition`) and writes its output with the top
round((1 - r) d_ff) channels. It then lays out, once per prompt, contiguous weight slices of the channels
later steps need:

- ``pop``: gate/up rows and down columns (stored as rows) of R u C, ordered R first, then C by prefill
  score. A decode step runs one matmul over these 2|R u C| rows, scores the Candidates on the current
  token(s), keeps the top k_sel, and runs down_proj on the R rows plus the k_sel gathered Candidate rows.
  Pruned channels are never touched.
- ``static`` (the paper's Variant 1): slices of the kept set only; decode reuses the prefill mask.
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
        kernels: ``auto`` runs POP's Candidate selection and gathered down projection as Triton kernels on
            CUDA tensors (`triton_pop`), ``torch`` always uses the PyTorch ops; both compute the same rule.
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
    ):
        super().__init__()
        if kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be 'auto' (Triton on CUDA when available) or 'torch'; got {kernels!r}")
        self.kernels = kernels
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
        self.w_gate_up: torch.Tensor | None = None  # (2n, hidden): gate rows then up rows of the slice
        self.b_gate_up: torch.Tensor | None = None
        self.w_down_rows: torch.Tensor | None = None  # (n, hidden): down_proj columns of the slice, as rows
        self.down_t: torch.Tensor | None = None  # (d_ff, hidden): down_proj transposed, built once
        self.cand_col_norms_sq: torch.Tensor | None = None  # squared down-column norms of C (pop)
        self.w_down_used: torch.Tensor | None = None  # (n_keep, hidden): R rows, then this step's Candidates
        self.retained_pos: torch.Tensor | None = None  # arange(|R|)
        self._down_used_for: Partition | None = None  # the partition w_down_used was filled for
        self.rank: torch.Tensor | None = None  # prefill rank of every channel (reselect overlap)
        self.down_index: torch.Tensor | None = None  # int32 (n_keep,): arange(|R|), then the selected (Triton)
        self._side_stream = None  # CUDA stream the Candidate selection runs on (Triton path)

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

        The sizes depend only on d_ff and the ratios, so the buffers are allocated on the first prompt and
        refilled in place afterwards. They are detached: POP is an inference method.
        """
        g, u = self._gate, self._up
        n, hid = channels.numel(), self.hidden_size
        self.w_gate_up = self._reuse(self.w_gate_up, (2 * n, hid), g.weight)
        torch.index_select(g.weight, 0, channels, out=self.w_gate_up[:n])
        torch.index_select(u.weight, 0, channels, out=self.w_gate_up[n:])
        if g.bias is not None:
            self.b_gate_up = torch.cat([g.bias.index_select(0, channels), u.bias.index_select(0, channels)])
        self.w_down_rows = self._reuse(self.w_down_rows, (n, hid), g.weight)
        torch.index_select(self._transposed_down(), 0, channels, out=self.w_down_rows)

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
        triton = self.mode != "reselect" and self.kernels == "auto" and triton_pop.available(x)
        if self.mode == "pop":
            self._build_slices(part.computed)
            # Every per-prompt tensor a decode step reads is refilled in place, so a decode step captured in
            # a CUDA graph stays valid for later prompts (same addresses, new contents).
            self.cand_col_norms_sq = self._reuse(self.cand_col_norms_sq, (s.n_candidates,), self.col_norms_sq)
            torch.index_select(self.col_norms_sq, 0, part.candidates, out=self.cand_col_norms_sq)
            if not triton:  # the Triton decode reads R + selected rows in place and needs no gathered copy
                self._down_used()
        elif self.mode == "static":
            self._build_slices(part.keep)
        if triton and (self.down_index is None or self.down_index.device != x.device):
            # static keeps arange(n_keep); pop rewrites the part after |R| at every step
            self.down_index = torch.arange(s.n_keep, dtype=torch.int32, device=x.device)
        if self.mode == "reselect":  # decode uses the full weights; keep the prefill ranks to measure overlap
            self.rank = torch.empty_like(part.order)
            self.rank[part.order] = torch.arange(part.order.numel(), device=part.order.device)
            self.w_down_rows = self._transposed_down()
            out = self._down_out(h.index_select(-1, part.keep), self.w_down_rows.index_select(0, part.keep))
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
        if self.mode == "static":
            h = self._gated(x)  # (.., n_keep)
            if self._use_triton(x) and self.down_index is not None:  # row-major down slice: Triton GEMV
                out = triton_pop.gathered_down(h.reshape(-1, h.shape[-1]), self.w_down_rows, self.down_index)
                out = out.to(x.dtype).reshape(*x.shape[:-1], hid)
                if self._down.bias is not None:
                    out = out + self._down.bias
            else:
                out = self._down_out(h, self.w_down_rows)
            c.overlap_fixed += s.n_keep
            flops = tokens * (2 * hid * 3 * s.n_keep + 3 * s.n_keep)
        elif self.mode == "pop":
            n_r, k = s.n_retained, s.k_select
            fused = (k != s.n_candidates and self._use_triton(x) and self.down_index is not None
                     and self.b_gate_up is None and self._silu)
            if not fused:
                h = self._gated(x)  # (.., |R u C|), R first, then C by prefill rank
            if k == s.n_candidates:  # no choice to make (gamma = 0, or every candidate is needed)
                out = self._down_out(h[..., : s.n_keep], self.w_down_rows[: s.n_keep])
                c.overlap_fixed += s.n_keep
                score_flops = 0
            elif fused:  # Triton: the selection runs beside gate/up over R, one down launch
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(x.device)
                _, out = triton_pop.pop_decode_step(x.reshape(-1, hid).contiguous(), self.w_gate_up, n_r,
                                                    self.cand_col_norms_sq, self.w_down_rows, self.down_index, k,
                                                    self._side_stream, c.overlap_acc, s.n_keep - n_r)
                out = out.to(x.dtype).reshape(*x.shape[:-1], hid)
                if self._down.bias is not None:
                    out = out + self._down.bias
                c.overlap_fixed += n_r  # the selection kernel counted the chosen in the prefill top set
                score_flops = 2 * tokens * s.n_candidates
            else:
                sel = self._select(h[..., n_r:], self.cand_col_norms_sq, k) + n_r
                # down_proj over R + the selected Candidates: their rows are gathered behind the R rows of a
                # persistent buffer, so one matmul reads exactly |R| + k rows.
                rows = self._down_used()
                torch.index_select(self.w_down_rows, 0, sel, out=rows[n_r:])
                used = h.index_select(-1, torch.cat((self.retained_pos, sel)))
                out = self._down_out(used, rows)
                c.overlap_fixed += n_r
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

    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.kernels == "auto" and x.shape[:-1].numel() <= 64 and triton_pop.available(x)

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
        if self._use_triton(x) and self.b_gate_up is None and self._silu:
            flat = x.reshape(-1, x.shape[-1])
            return triton_pop.gated_gemv(flat.contiguous(), self.w_gate_up).reshape(*x.shape[:-1], -1)
        gu = F.linear(x, self.w_gate_up, self.b_gate_up)
        gate, up = gu.chunk(2, dim=-1)
        return self.act_fn(gate) * up

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
