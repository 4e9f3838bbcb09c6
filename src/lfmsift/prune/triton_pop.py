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
- `pop_decode_step`: gate/up over the Candidate rows first, the selection on a side stream while gate/up
  runs over the Retained rows, then one down pass over the Retained + selected rows (`select_and_down`,
  the earlier schedule, overlaps the selection with a down pass over R and needs a second down launch);
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
    def _select_kernel(h_ptr, cn_ptr, idx_ptr, cnt_ptr, B, n_r, n_cand, k, n_top, stride_hb,
                       BLOCK_C: tl.constexpr, COUNT: tl.constexpr):
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
        if COUNT:  # how many of the selected were in the prefill's top set (the first n_top Candidates)
            tl.atomic_add(cnt_ptr, tl.sum((sel & (offs < n_top)).to(tl.int64), axis=0))

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
    def _gated_gemv_kernel(x_ptr, g_ptr, u_ptr, h_ptr, B, n, K, stride_xb, stride_wn, stride_hb,
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
            wg = tl.load(g_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
            wu = tl.load(u_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
            acc_g += tl.dot(xv, wg)
            acc_u += tl.dot(xv, wu)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
        tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=bmask[:, None] & nmask[None, :])


# Launch parameters, chosen on an H100 by `benchmarks/pop_gpu_tune.py` (results/pop_gpu_tune_h100.json).
GATED_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 2, "num_stages": 3}
DOWN_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 32, "K_PER_PROG": 256, "num_warps": 4}


def gated_rows(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor,
               config: dict | None = None) -> torch.Tensor:
    """``out = silu(x gate^T) * (x up^T)`` for row slices ``gate`` / ``up`` (m, hidden) of equal row stride;
    ``out`` (tokens, m) may be a column range of a larger buffer."""
    tokens, hidden = x.shape
    m = gate.shape[0]
    if m == 0:
        return out
    cfg = {**GATED_CONFIG, **(config or {})}
    block_n = cfg.pop("BLOCK_N")
    _gated_gemv_kernel[(triton.cdiv(m, block_n),)](
        x, gate, up, out, tokens, m, hidden, x.stride(0), gate.stride(0), out.stride(0),
        BLOCK_B=max(16, triton.next_power_of_2(tokens)), BLOCK_N=block_n, **cfg,
    )
    return out


def gated_gemv(x: torch.Tensor, gate_up: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``silu(x W_g^T) * (x W_u^T)`` for a stacked (2n, hidden) slice ``[W_g; W_u]``: one pass over its rows.

    `x` is (tokens, hidden) with at most 64 tokens (decode); returns (tokens, n) in x's dtype.
    """
    n = gate_up.shape[0] // 2
    h = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    return gated_rows(x, gate_up[:n], gate_up[n:], h, config)


def pop_decode_step(x: torch.Tensor, gate_up: torch.Tensor, n_retained: int, cand_col_norms_sq: torch.Tensor,
                    rows: torch.Tensor, index: torch.Tensor, k: int, side: torch.cuda.Stream,
                    overlap: torch.Tensor | None = None, n_top: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """POP's whole decode step with the selection off the critical path: gate/up over the Candidate rows
    first, then — while a side stream selects the k best Candidates from those activations — gate/up over
    the Retained rows, then one down pass over the Retained + selected rows. Returns (h, float32 output).

    `gate_up` is the stacked slice (R rows then C rows, gate then up); `index` (int32, n_keep) holds
    ``arange(|R|)`` and receives the selected positions behind it. Fork/join between two streams: safe
    inside a CUDA graph capture. `overlap` / `n_top`: see `select_candidates`.
    """
    n = gate_up.shape[0] // 2
    h = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    gated_rows(x, gate_up[n_retained:n], gate_up[n + n_retained:], h[:, n_retained:])
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        select_candidates(h, cand_col_norms_sq, index, n_retained, k, overlap, n_top)
    gated_rows(x, gate_up[:n_retained], gate_up[n : n + n_retained], h[:, :n_retained])
    main.wait_stream(side)
    h.record_stream(side)
    return h, gathered_down(h, rows, index)


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


def select_candidates(h: torch.Tensor, cand_col_norms_sq: torch.Tensor, index: torch.Tensor, n_retained: int, k: int,
                      overlap: torch.Tensor | None = None, n_top: int = 0):
    """Write the positions (in the slice) of the k best Candidates into ``index[n_retained:]``.

    `h` is (tokens, |R u C|) with R first; `index` (int32, n_keep) already holds ``arange(|R|)``. With
    `overlap` (an int64 scalar tensor), add to it how many of the chosen are among the first `n_top`
    Candidates (those in the prefill's top set: Candidates are ordered by prefill rank).
    """
    n_cand = cand_col_norms_sq.numel()
    block = max(16, triton.next_power_of_2(n_cand))
    counter = overlap if overlap is not None else index
    _select_kernel[(1,)](h, cand_col_norms_sq, index, counter, h.shape[0], n_retained, n_cand, k, n_top, h.stride(0),
                         BLOCK_C=block, COUNT=overlap is not None, num_warps=8)


def gathered_down(h: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None,
                  config: dict | None = None):
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
    cfg = {**DOWN_CONFIG, **(config or {})}
    grid = (triton.cdiv(hidden, cfg["BLOCK_N"]), triton.cdiv(index.numel(), cfg["K_PER_PROG"]))
    _gathered_down_kernel[grid](h, rows, index, out, tokens, index.numel(), hidden, h.stride(0), rows.stride(0),
                                out.stride(0), BLOCK_B=block_b, **cfg)
    return out
