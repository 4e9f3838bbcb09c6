"""Triton kernels for POP's decode step on CUDA GPUs (the PyTorch path in `pop` runs everywhere else).

A POP decode step, after gate/up over the Retained + Candidate slice, must (1) keep the k Candidates with
the highest ``sum_b h^2 * ||W_down[:, i]||^2`` and (2) run down_proj over the Retained rows plus those k
rows. With PyTorch these are a float cast, a square, a sum, ``topk`` (about 20 us on an H100 for ~1,100
values), a gather copy of the k rows and a GEMV whose weight is laid
out as rows (cuBLAS reads it at about half the bandwidth of the usual layout). Here:

- `select_candidates`: one program scores every Candidate, finds the k-th largest score by a bitwise
  binary search and writes the positions of exactly k of them (ties at the k-th score broken by position)
  behind the |R| Retained positions of a persistent index vector;
- `gated_gemv`: gate and up over the contiguous slice in one pass, SiLU and product fused, so the
  intermediate gate/up outputs never go to memory;
- `select_and_down`: the selection on a side stream, overlapped with the down pass over the Retained
  rows, then the selected rows;
- `gathered_down`: a split-K GEMV over the rows named by that index vector (R rows, then the selected
  Candidate rows) of the row-major down slice; each program reads whole 2-byte x BLOCK_N row segments
  and accumulates ``h[:, rows] @ W[rows, cols]`` with the tensor cores into a float32 output by atomic adds.

No row outside R + selected is read. Both kernels are CUDA-graph safe (fixed shapes, no host sync).
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU machines and CI run the PyTorch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device."""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _select_kernel(h_ptr, cn_ptr, idx_ptr, B, n_r, n_cand, k, stride_hb, BLOCK_C: tl.constexpr):
        offs = tl.arange(0, BLOCK_C)
        cmask = offs < n_cand
        score = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for b in range(B):
            hv = tl.load(h_ptr + b * stride_hb + n_r + offs, mask=cmask, other=0.0).to(tl.float32)
            score += hv * hv
        cn = tl.load(cn_ptr + offs, mask=cmask, other=0.0)
        score = score * cn
        # The k-th largest score by a bitwise binary search: scores are >= 0, so their float32 bit patterns,
        # read as int32, order as the values do; 31 counting passes find the largest pattern t with at
        # least k scores >= t (a sort of the 2,048 slots took three times as long).
        bits = tl.where(cmask, score.to(tl.int32, bitcast=True), -1)
        t = 0
        for i in tl.static_range(31):
            trial = t | (1 << (30 - i))
            count = tl.sum((bits >= trial).to(tl.int32), axis=0)
            t = tl.where(count >= k, trial, t)
        gt = bits > t
        eq = (bits == t) & cmask
        n_gt = tl.sum(gt.to(tl.int32), axis=0)
        eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
        sel = gt | (eq & (eq_rank <= k - n_gt))
        dest = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + n_r + dest, n_r + offs, mask=sel)

    @triton.jit
    def _gathered_down_kernel(h_ptr, w_ptr, idx_ptr, out_ptr, B, K, N, stride_hb, stride_wk, stride_ob,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                              K_PER_PROG: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        nmask = offs_n < N
        bmask = offs_b < B
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_PER_PROG
        for k0 in range(0, K_PER_PROG, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            rows = tl.load(idx_ptr + offs_k, mask=kmask, other=0)
            w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=kmask[:, None] & nmask[None, :],
                        other=0.0)
            hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + rows[None, :], mask=bmask[:, None] & kmask[None, :],
                         other=0.0)
            acc += tl.dot(hv, w)
        tl.atomic_add(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], acc,
                      mask=bmask[:, None] & nmask[None, :])


if triton is not None:

    @triton.jit
    def _gated_gemv_kernel(x_ptr, w_ptr, h_ptr, B, n, K, stride_xb, stride_wn, stride_hb,
                           BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        nmask = offs_n < n
        bmask = offs_b < B
        acc_g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            xv = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=bmask[:, None] & kmask[None, :],
                         other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wg = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
            wu = tl.load(w_ptr + (offs_n[None, :] + n) * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
            acc_g += tl.dot(xv, wg)
            acc_u += tl.dot(xv, wu)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
        tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=bmask[:, None] & nmask[None, :])


def gated_gemv(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(x W_g^T) * (x W_u^T)`` for a stacked (2n, hidden) slice ``[W_g; W_u]``: one pass over its rows.

    `x` is (tokens, hidden) with at most 64 tokens (decode); returns (tokens, n) in x's dtype.
    """
    tokens, hidden = x.shape
    n = gate_up.shape[0] // 2
    h = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    block_n = 16
    _gated_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, gate_up, h, tokens, n, hidden, x.stride(0), gate_up.stride(0), h.stride(0),
        BLOCK_B=max(16, triton.next_power_of_2(tokens)), BLOCK_N=block_n, BLOCK_K=256, num_warps=4, num_stages=4,
    )
    return h


def select_and_down(h: torch.Tensor, cand_col_norms_sq: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
                    n_retained: int, k: int, side: torch.cuda.Stream) -> torch.Tensor:
    """POP's decode down projection: the Retained rows run while the Candidates are selected on `side`.

    The down pass over R does not depend on the selection, so the single-program selection overlaps it
    (fork/join between two streams: safe inside a CUDA graph capture); the selected rows follow.
    """
    main = torch.cuda.current_stream(h.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        select_candidates(h, cand_col_norms_sq, index, n_retained, k)
    out = torch.zeros((h.shape[0], rows.shape[1]), dtype=torch.float32, device=h.device)
    if n_retained:
        gathered_down(h, rows, index[:n_retained], out)
    main.wait_stream(side)
    h.record_stream(side)
    return gathered_down(h, rows, index[n_retained:], out)


def select_candidates(h: torch.Tensor, cand_col_norms_sq: torch.Tensor, index: torch.Tensor, n_retained: int, k: int):
    """Write the positions (in the slice) of the k best Candidates into ``index[n_retained:]``.

    `h` is (tokens, |R u C|) with R first; `index` (int32, n_keep) already holds ``arange(|R|)``.
    """
    n_cand = cand_col_norms_sq.numel()
    block = max(16, triton.next_power_of_2(n_cand))
    _select_kernel[(1,)](h, cand_col_norms_sq, index, h.shape[0], n_retained, n_cand, k, h.stride(0),
                         BLOCK_C=block, num_warps=8)


def gathered_down(h: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None):
    """``h[:, index] @ rows[index]`` in float32 (tokens, hidden): down_proj over the indexed rows only.

    With `out` given, the product is *added* to it (so a step can run the Retained rows and the selected
    Candidate rows as two launches into one accumulator).
    """
    tokens, hidden = h.shape[0], rows.shape[1]
    if tokens > 64:
        raise ValueError("gathered_down is a decode kernel: at most 64 tokens per call")
    if out is None:
        out = torch.zeros((tokens, hidden), dtype=torch.float32, device=h.device)
    block_b = max(16, triton.next_power_of_2(tokens))
    block_n, block_k, k_per_prog = 128, 64, 512
    grid = (triton.cdiv(hidden, block_n), triton.cdiv(index.numel(), k_per_prog))
    _gathered_down_kernel[grid](h, rows, index, out, tokens, index.numel(), hidden, h.stride(0), rows.stride(0),
                                out.stride(0), BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n,
                                K_PER_PROG=k_per_prog, num_warps=4)
    return out
