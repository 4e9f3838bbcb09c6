"""Triton kernels for POP's decode step on CUDA GPUs (the PyTorch path in `pop` runs everywhere else).

A POP decode step must (1) compute gate/up for the Retained + Candidate channels, (2) keep the k
Candidates with the highest ``sum_b h^2 * ||W_down[:, i]||^2`` and (3) run down_proj over the Retained
channels plus those k. With PyTorch these are a gathered weight slice per prompt, a float cast, a square,
a sum, ``topk`` (about 20 us on an H100 for ~1,100 values), a gather copy of the k rows and a GEMV whose
weight is laid out as rows (cuBLAS reads it at about half the bandwidth of the usual layout). The kernels
read either per-prompt slices (`sliced_step`, `kept_down`: every row contiguous) or the model's own weight
rows in place through a channel index (the others; given the slices' own rows and an identity index, they
also run over the slices).

- `sliced_step`: one token over the slices in two launches — gate/up one channel per program (gate and up
  rows side by side), the Candidates first and rankers behind them that pick the k best while the Retained
  channels stream, then `kept_down`: the down pass over the Retained rows (no index) and the chosen ones,
  launched as a programmatic dependent launch on Hopper and later (`dependent_launch`);
- `gated_rows`: gate and up over the rows named by a channel index, SiLU and product fused, so the
  intermediate gate/up outputs never go to memory;
- `select_candidates`: one program scores every Candidate, finds the k-th largest score by a bitwise
  binary search and writes the positions of exactly k of them (ties at the k-th score broken by position)
  behind the |R| Retained positions of a persistent index vector;
- `gathered_down`: a split-K GEMV over the down_proj rows (down_proj stored transposed, once per model)
  named by a row vector aligned with that index vector (the selection writes both, so the kernel has no
  second indirection); each program reads whole 2-byte x BLOCK_N row segments and accumulates
  ``h[:, index] @ W[rows, cols]`` with the tensor cores into a float32 accumulator by atomic adds. With a `DownAccumulator`, the last program of each column block (an atomic ticket) writes the
  output in the model's dtype and zeroes the accumulator and ticket behind it: no zero-fill kernel
  before, no cast kernel after;
- `partition_index`: the prefill's partition with no sort — each channel's rank in the stable descending
  order of the scores by pairwise comparison, then R, C and the kept set written in channel order (the
  channel vectors the kernels below read);
- `gated_select`: gate/up over R + C and the selection in one launch — the Candidate rows first, each
  block split along the hidden dimension so that it finishes early; each block's last slice writes its
  activations and scores, then ranks its Candidates against all of them once every block has (the
  Retained programs stream meanwhile and never wait);
- `ranked_step`: gate/up over R + C writing the Candidates' scores, then a down pass whose first programs
  rank the Candidates while the programs over the Retained rows stream (the programs over the chosen rows
  wait for the ranking);
- `pop_decode_step`: two launches, either `gated_select` then the down pass over the Retained + selected
  rows, or `ranked_step` (`use_gated_select` says which); what POP runs for 2-64 tokens, and for one token
  with ``weights="index"``.

No weight row outside R + C is read, and of C's down rows only the selected. All kernels are CUDA-graph safe (fixed shapes, no host sync).
Channel vectors are sorted by channel id within R and within C, so rows are read in address order.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def _select_kernel(h_ptr, cn_ptr, idx_ptr, chan_ptr, rows_ptr, top_ptr, cnt_ptr, B, n_r, n_cand, k, stride_hb,
                       BLOCK_C: tl.constexpr, ROWS: tl.constexpr, COUNT: tl.constexpr):
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
        if ROWS:  # the weight rows of the selected, for the down pass (no second indirection there)
            tl.store(rows_ptr + n_r + dest, tl.load(chan_ptr + n_r + offs, mask=sel, other=0), mask=sel)
        if COUNT:  # how many of the selected were in the prefill's top set
            in_top = tl.load(top_ptr + offs, mask=sel, other=0) != 0
            tl.atomic_add(cnt_ptr, tl.sum((sel & in_top).to(tl.int64), axis=0))

    @triton.jit
    def _down_partial(h_ptr, w_ptr, idx_ptr, rows_ptr, k_lo, k_hi, pid_n, B, N, stride_hb, stride_wk,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, K_PER_PROG: tl.constexpr,
                      HAS_ROWS: tl.constexpr, n_direct=0, DIRECT: tl.constexpr = False):
        """float32 ``h[:, idx[k_lo:k_hi]] @ w[rows[k_lo:k_hi], pid_n-th BLOCK_N columns]`` (k_hi - k_lo at most
        K_PER_PROG). The index is read past L1 (another program of the launch may have just written it).
        With DIRECT (slices: rows are positions), positions below n_direct are their own index: no index read."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        nmask = offs_n < N
        bmask = offs_b < B
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_PER_PROG, BLOCK_K):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < k_hi
            if DIRECT:
                listed = offs_k >= n_direct
                pos = tl.where(listed, tl.load(idx_ptr + offs_k, mask=kmask & listed, other=0, cache_modifier=".cg"),
                               offs_k)
            else:
                pos = tl.load(idx_ptr + offs_k, mask=kmask, other=0, cache_modifier=".cg")  # columns of h
            rows = tl.load(rows_ptr + offs_k, mask=kmask, other=0, cache_modifier=".cg") if HAS_ROWS else pos
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + pos[None, :], mask=bmask[:, None] & kmask[None, :],
                         other=0.0)
            acc += tl.dot(hv, w)
        return acc

    @triton.jit
    def _down_add(acc, acc_ptr, ticket_ptr, out_ptr, pid_n, n_progs, B, N, stride_ob, BLOCK_B: tl.constexpr,
                  BLOCK_N: tl.constexpr, FINISH: tl.constexpr):
        """Add a program's partial sums to the float32 accumulator; with FINISH, the last of the n_progs
        programs of this column block (by ticket) writes the output and leaves accumulator and ticket at zero
        for the next call.

        The partial sums go in with relaxed atomics; the ticket, taken by one thread after a CTA barrier, is
        acq_rel, which orders the whole program's sums before it and the last program's reads after it (the
        release / acquire pattern of CUTLASS's split-K semaphore). An acq_rel atomic per thread put a GPU-wide
        memory barrier in every thread; relaxed sums made the step faster (docs/results.md has the
        timings). Without FINISH the end of the launch orders the sums before whatever reads them."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        tile = offs_b[:, None] * stride_ob + offs_n[None, :]
        tmask = (offs_b < B)[:, None] & (offs_n < N)[None, :]
        tl.atomic_add(acc_ptr + tile, acc, mask=tmask, sem="relaxed")
        if FINISH:
            tl.debug_barrier()
            ticket = tl.atomic_add(ticket_ptr + pid_n, 1)
            if ticket == n_progs - 1:
                total = tl.load(acc_ptr + tile, mask=tmask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=tmask)
                # every thread's load is in before any zero goes out: the compiler may give the load and the
                # store different thread layouts, so another thread could otherwise zero a sum first
                tl.debug_barrier()
                tl.store(acc_ptr + tile, tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), mask=tmask)
                tl.atomic_xchg(ticket_ptr + pid_n, 0)

    @triton.jit
    def _gathered_down_kernel(h_ptr, w_ptr, idx_ptr, rows_ptr, acc_ptr, ticket_ptr, out_ptr, B, K, N, stride_hb,
                              stride_wk, stride_ob, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_N: tl.constexpr, K_PER_PROG: tl.constexpr, HAS_ROWS: tl.constexpr,
                              FINISH: tl.constexpr):
        pid_n = tl.program_id(0)
        k_lo = tl.program_id(1) * K_PER_PROG
        acc = _down_partial(h_ptr, w_ptr, idx_ptr, rows_ptr, k_lo, tl.minimum(k_lo + K_PER_PROG, K), pid_n, B, N,
                            stride_hb, stride_wk, BLOCK_B, BLOCK_K, BLOCK_N, K_PER_PROG, HAS_ROWS)
        _down_add(acc, acc_ptr, ticket_ptr, out_ptr, pid_n, tl.num_programs(1), B, N, stride_ob, BLOCK_B, BLOCK_N,
                  FINISH)

    @triton.jit
    def _ranked_down_kernel(h_ptr, w_ptr, idx_ptr, rows_ptr, chan_ptr, score_ptr, top_ptr, cnt_ptr, flag_ptr,
                            acc_ptr, ticket_ptr, out_ptr, B, N, n_r, n_c, k, stride_hb, stride_wk, stride_ob,
                            BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                            K_PER_PROG: tl.constexpr, RANK_I: tl.constexpr, RANK_J: tl.constexpr,
                            COUNT: tl.constexpr):
        """The down pass of `ranked_step`, the Candidate selection in its first programs.

        Programs [0, n_rank) each rank RANK_I Candidates against all |C| scores (final: the previous launch
        wrote them): score greater, or equal at a lower position; rank < k are written at their rank behind
        the Retained positions, then ``flag[0]`` counts the program done. The rest run the down pass by
        (row chunk, column block), column blocks fastest: the Retained chunks first, which need no selection,
        then the chunks of the chosen rows, whose programs wait until ``flag[0]`` reaches n_rank. They are
        counted through in ``flag[1]``; the last resets both to zero. The waiters only wait on programs of
        lower index, which never wait, so the waits cannot hold up the launch."""
        pid = tl.program_id(0)
        n_rank = tl.cdiv(n_c, RANK_I)
        n_cb = tl.cdiv(N, BLOCK_N)
        n_rch = tl.cdiv(n_r, K_PER_PROG)
        n_sch = tl.cdiv(k, K_PER_PROG)
        if pid < n_rank:
            offs_i = pid * RANK_I + tl.arange(0, RANK_I)
            imask = offs_i < n_c
            si = tl.load(score_ptr + offs_i, mask=imask, other=0.0)
            rank = tl.zeros((RANK_I,), dtype=tl.int32)
            for j0 in range(0, n_c, RANK_J):
                offs_j = j0 + tl.arange(0, RANK_J)
                sj = tl.load(score_ptr + offs_j, mask=offs_j < n_c, other=-1.0)
                ahead = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (offs_j[None, :] < offs_i[:, None]))
                rank += tl.sum(ahead.to(tl.int32), axis=1)
            chosen = imask & (rank < k)
            tl.store(idx_ptr + n_r + rank, n_r + offs_i, mask=chosen)
            tl.store(rows_ptr + n_r + rank, tl.load(chan_ptr + n_r + offs_i, mask=chosen, other=0), mask=chosen)
            if COUNT:  # how many of the chosen were in the prefill's top set
                in_top = tl.load(top_ptr + offs_i, mask=chosen, other=0) != 0
                tl.atomic_add(cnt_ptr, tl.sum((chosen & in_top).to(tl.int64), axis=0))
            _fence_all_threads(rank)
            tl.debug_barrier()
            tl.atomic_add(flag_ptr, 1)
        else:
            q = pid - n_rank
            chunk = q // n_cb
            pid_n = q % n_cb
            k_lo = chunk * K_PER_PROG
            k_hi = tl.minimum(k_lo + K_PER_PROG, n_r)
            if chunk >= n_rch:  # rows of chosen Candidates: once every Candidate is ranked
                seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
                while seen < n_rank:
                    seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
                k_lo = n_r + (chunk - n_rch) * K_PER_PROG
                k_hi = tl.minimum(k_lo + K_PER_PROG, n_r + k)
                if tl.atomic_add(flag_ptr + 1, 1) == n_sch * n_cb - 1:  # the last waiter through
                    tl.atomic_xchg(flag_ptr + 1, 0)
                    tl.atomic_xchg(flag_ptr, 0)
            acc = _down_partial(h_ptr, w_ptr, idx_ptr, rows_ptr, k_lo, k_hi, pid_n, B, N, stride_hb, stride_wk,
                                BLOCK_B, BLOCK_K, BLOCK_N, K_PER_PROG, True)
            _down_add(acc, acc_ptr, ticket_ptr, out_ptr, pid_n, n_rch + n_sch, B, N, stride_ob, BLOCK_B, BLOCK_N,
                      True)

    @triton.jit
    def _gated_dots(x_ptr, g_ptr, u_ptr, row_off, nmask, offs_b, bmask, k_lo, k_hi, K, stride_xb,
                    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """float32 ``x[:, k_lo:k_hi] @ gate[rows, k_lo:k_hi]^T`` and the same for up, rows at `row_off`."""
        acc_g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            xv = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=bmask[:, None] & kmask[None, :],
                         other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wg = tl.load(g_ptr + row_off[None, :] + offs_k[:, None], mask=wmask, other=0.0)
            wu = tl.load(u_ptr + row_off[None, :] + offs_k[:, None], mask=wmask, other=0.0)
            acc_g += tl.dot(xv, wg)
            acc_u += tl.dot(xv, wu)
        return acc_g, acc_u

    @triton.jit
    def _gated_block(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, block, B, n, K, stride_xb, stride_wn, stride_hb,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_CHAN: tl.constexpr):
        """``h[:, cols] = silu(x gate[rows]^T) * (x up[rows]^T)`` for the block-th BLOCK_N of the n columns."""
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        nmask = offs_n < n
        bmask = offs_b < B
        rows = tl.load(chan_ptr + offs_n, mask=nmask, other=0) if HAS_CHAN else offs_n
        acc_g, acc_u = _gated_dots(x_ptr, g_ptr, u_ptr, rows.to(tl.int64) * stride_wn, nmask, offs_b, bmask, 0, K, K,
                                   stride_xb, BLOCK_B, BLOCK_N, BLOCK_K)
        h = (acc_g / (1.0 + tl.exp(-acc_g)) * acc_u).to(h_ptr.dtype.element_ty)  # silu(gate) * up
        tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_n[None, :], h, mask=bmask[:, None] & nmask[None, :])
        return h

    @triton.jit
    def _candidate_scores(h, B, cn, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
        """float32 ``sum_b h[b]^2 * cn`` per column of an activation tile (BLOCK_B, BLOCK_N), summed token by
        token as `select_candidates` sums, so both give the same bits for the same h."""
        offs_b = tl.arange(0, BLOCK_B)
        hf = h.to(tl.float32)
        score = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for b in range(B):
            hb = tl.sum(tl.where(offs_b[:, None] == b, hf, 0.0), axis=0)
            score += hb * hb
        return score * cn

    @triton.jit
    def _gated_gemv_kernel(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, B, n, K, stride_xb, stride_wn, stride_hb,
                           BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           HAS_CHAN: tl.constexpr):
        _gated_block(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, tl.program_id(0), B, n, K, stride_xb, stride_wn, stride_hb,
                     BLOCK_B, BLOCK_N, BLOCK_K, HAS_CHAN)

    @triton.jit
    def _gated_scored_kernel(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, cn_ptr, score_ptr, B, n, n_r, K, stride_xb,
                             stride_wn, stride_hb, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """`_gated_gemv_kernel` over R + C whose blocks with Candidate columns (from n_r on) also write their
        float32 scores, summed token by token from the stored activations as `select_candidates` sums."""
        block = tl.program_id(0)
        h = _gated_block(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, block, B, n, K, stride_xb, stride_wn, stride_hb,
                         BLOCK_B, BLOCK_N, BLOCK_K, True)
        if block * BLOCK_N + BLOCK_N > n_r:
            offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
            cand = (offs_n < n) & (offs_n >= n_r)
            score = _candidate_scores(h, B, tl.load(cn_ptr + offs_n - n_r, mask=cand, other=0.0), BLOCK_B, BLOCK_N)
            tl.store(score_ptr + offs_n - n_r, score, mask=cand)

    @triton.jit
    def _fence_all_threads(x):
        """``fence.acq_rel.gpu`` in every thread (x: an int32 tensor with an element in each thread): this
        program's earlier global writes are then visible GPU-wide before a CTA barrier and one thread's
        atomic announce them (a fence in that thread alone does not wait for the other warps' writes)."""
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _gated_rank_kernel(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, part_ptr, score_ptr, ticket_ptr, done_ptr, cn_ptr,
                           idx_ptr, rows_ptr, top_ptr, cnt_ptr, B, n_r, n_c, k, K, stride_xb, stride_wn, stride_hb,
                           BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                           BLOCK_C: tl.constexpr, COUNT: tl.constexpr):
        """Gate/up over R + C and the Candidate selection in one launch, the selection spread over the
        Candidate blocks (see `gated_select`).

        The first SPLIT x (Candidate row blocks) programs each take 1/SPLIT of the hidden dimension of a
        block of Candidate rows and store their partial sums in their own slot of ``part``; the last slice
        of a block (by ticket) adds the slots up and writes the block's h. Those block finishers then wait
        for each other (``done`` counts finished blocks and only grows: the call's target is the next
        multiple of the block count) and each ranks its Candidates against all of C (score greater, or
        equal at a lower position): rank < k are chosen and written at their rank behind the Retained
        positions. The Retained programs after them never wait, so the waits cannot hold up a launch."""
        pid = tl.program_id(0)
        n_cblocks = tl.cdiv(n_c, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        bmask = offs_b < B
        if pid < n_cblocks * SPLIT:
            cb = pid // SPLIT
            sl = pid % SPLIT
            k_len = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
            offs_c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = offs_c < n_c
            rows = tl.load(chan_ptr + n_r + offs_c, mask=cmask, other=0)
            acc_g, acc_u = _gated_dots(x_ptr, g_ptr, u_ptr, rows.to(tl.int64) * stride_wn, cmask, offs_b, bmask,
                                       sl * k_len, tl.minimum(sl * k_len + k_len, K), K, stride_xb, BLOCK_B, BLOCK_N,
                                       BLOCK_K)
            tile = offs_b[:, None] * n_c + offs_c[None, :]
            tmask = bmask[:, None] & cmask[None, :]
            tl.store(part_ptr + (2 * sl) * B * n_c + tile, acc_g, mask=tmask)
            tl.store(part_ptr + (2 * sl + 1) * B * n_c + tile, acc_u, mask=tmask)
            _fence_all_threads(tile)
            tl.debug_barrier()
            ticket = tl.atomic_add(ticket_ptr + cb, 1)
            if ticket == SPLIT - 1:  # every slice of this block is in: its activations and scores
                tl.atomic_xchg(ticket_ptr + cb, 0)
                gs = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                us = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(SPLIT):
                    gs += tl.load(part_ptr + (2 * j) * B * n_c + tile, mask=tmask, other=0.0, cache_modifier=".cg")
                    us += tl.load(part_ptr + (2 * j + 1) * B * n_c + tile, mask=tmask, other=0.0, cache_modifier=".cg")
                h = (gs / (1.0 + tl.exp(-gs)) * us).to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + offs_b[:, None] * stride_hb + n_r + offs_c[None, :], h, mask=tmask)
                mine = _candidate_scores(h, B, tl.load(cn_ptr + offs_c, mask=cmask, other=0.0), BLOCK_B, BLOCK_N)
                tl.store(score_ptr + offs_c, mine, mask=cmask)
                _fence_all_threads(tile)
                tl.debug_barrier()
                old = tl.atomic_add(done_ptr, 1)
                target = (old // n_cblocks + 1) * n_cblocks
                seen = tl.atomic_add(done_ptr, 0, sem="acquire")
                while seen < target:  # the other Candidate blocks' scores
                    seen = tl.atomic_add(done_ptr, 0, sem="acquire")
                # every score in one load (one round trip to L2: those are slow beside the streaming
                # programs), then each of this block's Candidates counted against them
                offs_j = tl.arange(0, BLOCK_C)
                sj = tl.load(score_ptr + offs_j, mask=offs_j < n_c, other=-1.0, cache_modifier=".cg")
                lane = tl.arange(0, BLOCK_N)
                rank = tl.zeros((BLOCK_N,), dtype=tl.int32)
                for i in tl.static_range(BLOCK_N):
                    m_i = tl.sum(tl.where(lane == i, mine, 0.0), axis=0)
                    ahead = (sj > m_i) | ((sj == m_i) & (offs_j < cb * BLOCK_N + i))
                    rank = tl.where(lane == i, tl.sum(ahead.to(tl.int32), axis=0), rank)
                chosen = cmask & (rank < k)
                tl.store(idx_ptr + n_r + rank, n_r + offs_c, mask=chosen)
                tl.store(rows_ptr + n_r + rank, rows, mask=chosen)
                if COUNT:  # how many of the chosen were in the prefill's top set
                    in_top = tl.load(top_ptr + offs_c, mask=chosen, other=0) != 0
                    tl.atomic_add(cnt_ptr, tl.sum((chosen & in_top).to(tl.int64), axis=0))
        else:  # a block of Retained rows (the first n_r columns)
            _gated_block(x_ptr, g_ptr, u_ptr, chan_ptr, h_ptr, pid - n_cblocks * SPLIT, B, n_r, K, stride_xb, stride_wn,
                         stride_hb, BLOCK_B, BLOCK_N, BLOCK_K, True)

    @triton.jit
    def _rank_kernel(sc_ptr, rank_ptr, n, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """rank[i] = #{j: s_j > s_i} + #{j < i: s_j == s_i}: the position of channel i in a stable descending
        sort. One float comparison per pair away from i's own column block (blocks before it count
        s_j >= s_i, blocks after it s_j > s_i); BLOCK_J is a multiple of BLOCK_I."""
        pid = tl.program_id(0)
        offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        si = tl.load(sc_ptr + offs_i, mask=offs_i < n, other=0.0)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.int32)
        mixed = (pid * BLOCK_I) // BLOCK_J * BLOCK_J  # the column block holding i's own block
        for j0 in range(0, mixed, BLOCK_J):
            sj = tl.load(sc_ptr + j0 + tl.arange(0, BLOCK_J))
            acc += (sj[None, :] >= si[:, None]).to(tl.int32)
        offs_j = mixed + tl.arange(0, BLOCK_J)
        sj = tl.load(sc_ptr + offs_j, mask=offs_j < n, other=-1.0)
        acc += ((sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (offs_j[None, :] < offs_i[:, None]))
                ).to(tl.int32)
        for j0 in range(mixed + BLOCK_J, n, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            sj = tl.load(sc_ptr + offs_j, mask=offs_j < n, other=-1.0)
            acc += (sj[None, :] > si[:, None]).to(tl.int32)
        tl.store(rank_ptr + offs_i, tl.sum(acc, axis=1), mask=offs_i < n)

    @triton.jit
    def _compact_kernel(rank_ptr, cn_ptr, chan_ptr, rows_ptr, keep_ptr, top_ptr, ccn_ptr, n, n_r, n_keep, n_comp,
                        POP: tl.constexpr, BLOCK: tl.constexpr):
        """Write the channels of R (rank < n_r), C (n_r <= rank < n_comp) and the kept set (rank < n_keep),
        each in channel order: a block's offset in each list counts the members in the blocks before it."""
        pid = tl.program_id(0)
        before_r = tl.zeros((BLOCK,), dtype=tl.int32)
        before_k = tl.zeros((BLOCK,), dtype=tl.int32)
        before_c = tl.zeros((BLOCK,), dtype=tl.int32)
        for j0 in range(0, pid * BLOCK, BLOCK):
            rj = tl.load(rank_ptr + j0 + tl.arange(0, BLOCK))
            before_r += (rj < n_r).to(tl.int32)
            before_k += (rj < n_keep).to(tl.int32)
            before_c += ((rj >= n_r) & (rj < n_comp)).to(tl.int32)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        rank = tl.load(rank_ptr + offs, mask=offs < n, other=n)
        in_keep = rank < n_keep
        keep_at = tl.sum(before_k, axis=0) + tl.cumsum(in_keep.to(tl.int32), axis=0) - 1
        tl.store(keep_ptr + keep_at, offs, mask=in_keep)
        if POP:  # R then C, each in channel order; R's rows head the down pass's row vector
            in_r = rank < n_r
            in_c = (rank >= n_r) & (rank < n_comp)
            r_at = tl.sum(before_r, axis=0) + tl.cumsum(in_r.to(tl.int32), axis=0) - 1
            c_at = tl.sum(before_c, axis=0) + tl.cumsum(in_c.to(tl.int32), axis=0) - 1
            tl.store(chan_ptr + r_at, offs, mask=in_r)
            tl.store(rows_ptr + r_at, offs, mask=in_r)
            tl.store(chan_ptr + n_r + c_at, offs, mask=in_c)
            tl.store(top_ptr + c_at, in_keep.to(tl.int8), mask=in_c)
            tl.store(ccn_ptr + c_at, tl.load(cn_ptr + offs, mask=in_c, other=0.0), mask=in_c)
        else:  # static: the kept set, in channel order
            tl.store(chan_ptr + keep_at, offs, mask=in_keep)
            tl.store(rows_ptr + keep_at, offs, mask=in_keep)

    @triton.jit
    def _pair_row(x_ptr, w_ptr, h_ptr, i, K, BLOCK_K: tl.constexpr):
        """One token's ``h[i] = silu(x . gate_i) * (x . up_i)`` from side-by-side slice rows (gate_i then up_i,
        2K contiguous elements at ``w_ptr + 2Ki``): one program streams both rows in one pass."""
        base = i.to(tl.int64) * 2 * K
        acc_g = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            kmask = offs < K
            xv = tl.load(x_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
            acc_g += tl.load(w_ptr + base + offs, mask=kmask, other=0.0).to(tl.float32) * xv
            acc_u += tl.load(w_ptr + base + K + offs, mask=kmask, other=0.0).to(tl.float32) * xv
        gs = tl.sum(acc_g, axis=0)
        us = tl.sum(acc_u, axis=0)
        h = (gs / (1.0 + tl.exp(-gs)) * us).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + i, h)
        return h

    @triton.jit
    def _sliced_select_kernel(x_ptr, w_ptr, h_ptr, cn_ptr, score_ptr, cnt_ptr, idx_ptr, top_ptr, ovl_ptr, n_r, n_c, k,
                              K, BLOCK_K: tl.constexpr, RANK_I: tl.constexpr, RANK_J: tl.constexpr,
                              COUNT: tl.constexpr, TRIGGER: tl.constexpr = False):
        """One token's gate/up over the R + C slice rows with the Candidate selection inside (`sliced_step`).

        Programs [0, n_c): one Candidate channel each (slice row n_r + pid): its activation and float32 score,
        then counted in ``cnt[0]`` (a CTA barrier, then one release atomic: the pattern of a cooperative grid
        barrier). Programs [n_c, n_c + n_rank): rankers of RANK_I Candidates each; once ``cnt[0]`` reaches n_c,
        each counts, for each of its Candidates, the scores greater or equal at a lower position (the rule of
        `select_candidates`, so the same set for the same h) and writes rank < k at its rank into
        ``idx[n_r:]``; they are counted through in ``cnt[1]`` and the last resets both counters. The rest: the
        Retained channels (rows 0..n_r). The rankers wait only on lower programs, which never wait, and they
        start while the Candidates finish, so the ranking is over long before the Retained rows are streamed.
        With TRIGGER, every program's last act is griddepcontrol.launch_dependents (`dependent_launch`)."""
        pid = tl.program_id(0)
        n_rank = tl.cdiv(n_c, RANK_I)
        if pid < n_c:
            h = _pair_row(x_ptr, w_ptr, h_ptr, n_r + pid, K, BLOCK_K).to(tl.float32)
            tl.store(score_ptr + pid, h * h * tl.load(cn_ptr + pid))
            tl.debug_barrier()
            tl.atomic_add(cnt_ptr, 1, sem="release")
        elif pid < n_c + n_rank:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
            while seen < n_c:
                seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
            offs_i = (pid - n_c) * RANK_I + tl.arange(0, RANK_I)
            imask = offs_i < n_c
            si = tl.load(score_ptr + offs_i, mask=imask, other=0.0, cache_modifier=".cg")
            rank = tl.zeros((RANK_I,), dtype=tl.int32)
            for j0 in range(0, n_c, RANK_J):
                offs_j = j0 + tl.arange(0, RANK_J)
                sj = tl.load(score_ptr + offs_j, mask=offs_j < n_c, other=-1.0, cache_modifier=".cg")
                ahead = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (offs_j[None, :] < offs_i[:, None]))
                rank += tl.sum(ahead.to(tl.int32), axis=1)
            chosen = imask & (rank < k)
            tl.store(idx_ptr + n_r + rank, n_r + offs_i, mask=chosen)
            if COUNT:  # how many of the chosen were in the prefill's top set
                in_top = tl.load(top_ptr + offs_i, mask=chosen, other=0) != 0
                tl.atomic_add(ovl_ptr, tl.sum((chosen & in_top).to(tl.int64), axis=0))
            if tl.atomic_add(cnt_ptr + 1, 1) == n_rank - 1:  # the last ranker through
                tl.atomic_xchg(cnt_ptr + 1, 0)
                tl.atomic_xchg(cnt_ptr, 0)
        else:
            _pair_row(x_ptr, w_ptr, h_ptr, pid - n_c - n_rank, K, BLOCK_K)
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _kept_down_kernel(h_ptr, w_ptr, idx_ptr, acc_ptr, ticket_ptr, out_ptr, B: tl.constexpr, N, n_r, n_keep,
                          stride_hb, stride_wk, stride_ob, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr, K_PER_PROG: tl.constexpr, WAIT: tl.constexpr = False):
        """``h[:, used] @ w[used]`` over contiguous slice rows: used = 0..n_r (no index read), then
        ``idx[n_r:n_keep]`` (the chosen Candidates' rows). Split-K by (row chunk, column block), finished
        as in `gathered_down` (`_down_add`). With WAIT (a dependent launch), every program first waits
        (griddepcontrol.wait) until the launch before it has completed and its writes are visible. The token
        count B is a compile-time constant (one compile per batch size): at one token the finish is one row of
        atomics and stores, not BLOCK_B predicated rows."""
        if WAIT:
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        n_cb = tl.cdiv(N, BLOCK_N)
        chunk = pid // n_cb
        pid_n = pid % n_cb
        k_lo = chunk * K_PER_PROG
        k_hi = tl.minimum(k_lo + K_PER_PROG, n_keep)
        acc = _down_partial(h_ptr, w_ptr, idx_ptr, idx_ptr, k_lo, k_hi, pid_n, B, N, stride_hb, stride_wk, BLOCK_B,
                            BLOCK_K, BLOCK_N, K_PER_PROG, False, n_r, True)
        _down_add(acc, acc_ptr, ticket_ptr, out_ptr, pid_n, tl.cdiv(n_keep, K_PER_PROG), B, N, stride_ob, BLOCK_B,
                  BLOCK_N, True)


# Launch parameters, chosen on an H100 by `benchmarks/pop_gpu_tune.py` (results/pop_gpu_tune_h100.json).
GATED_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 2, "num_stages": 3}
DOWN_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 32, "K_PER_PROG": 256, "num_warps": 4}
RANK_CONFIG = {"BLOCK_I": 16, "BLOCK_J": 512, "num_warps": 4}
# `ranked_step`'s down pass at one token: chunks of 128 rows per program (on an H100 the faster of 128 and
# 256 at one token; at ten tokens 256 is)
DOWN_CONFIG_ONE_TOKEN = {"K_PER_PROG": 128}
RANKED_DOWN_RANK_I, RANKED_DOWN_RANK_J = 16, 256  # Candidates ranked per program, scores compared per pass
GATED_SELECT_SPLIT = 4  # slices of the hidden dimension per block of Candidate rows in `gated_select`
# `sliced_step` (one token over per-prompt slices, tuned on an H100): gate/up one channel per program,
# 2,048 elements per load (the best of 7 settings); the down pass in chunks of 128 rows up to 40 chunks,
# 256 beyond (each the faster at the Llama-2-7B / Llama-3.1-8B targets; docs/results.md has the timings).
SLICED_GATED_CONFIG = {"BLOCK_K": 2048, "num_warps": 8}
SLICED_DOWN_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
SLICED_DOWN_MAX_CHUNKS_OF_128 = 40
# `sliced_step`'s down pass as a programmatic dependent launch (`dependent_launch`): "auto" (where the GPU and
# Triton have it) or "never".
SLICED_DEPENDENT_LAUNCH = "auto"
# When POP's step runs gate/up + selection as one launch (`gated_select`) rather than `ranked_step`:
# "auto" (`use_gated_select`), "always" (where it may run) or "never".
GATED_SELECT = "auto"
GATED_SELECT_MIN_RETAINED_PER_CANDIDATE = 5  # "auto": |R| >= 5 |C| (see `use_gated_select`)


def gated_rows(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor,
               config: dict | None = None, chan: torch.Tensor | None = None) -> torch.Tensor:
    """``out = silu(x gate[rows]^T) * (x up[rows]^T)`` for x (tokens, hidden), at most 64 tokens.

    Without `chan`, ``rows`` are all rows of ``gate`` / ``up`` (row slices of equal row stride); with
    `chan` (int32), the rows it names, read in place. ``out`` (tokens, rows) may be a column range of a
    larger buffer.
    """
    tokens, hidden = x.shape
    m = gate.shape[0] if chan is None else chan.numel()
    if m == 0:
        return out
    cfg = {**GATED_CONFIG, **(config or {})}
    block_n = cfg.pop("BLOCK_N")
    _gated_gemv_kernel[(triton.cdiv(m, block_n),)](
        x, gate, up, gate if chan is None else chan, out, tokens, m, hidden, x.stride(0), gate.stride(0),
        out.stride(0), BLOCK_B=max(16, triton.next_power_of_2(tokens)), BLOCK_N=block_n,
        HAS_CHAN=chan is not None, **cfg,
    )
    return out


@dataclass
class DownAccumulator:
    """Persistent float32 partial sums and per-column-block tickets of `gathered_down` for one layer.

    Both stay zero between calls (the kernel's last program per column block resets them), so a decode
    step needs no zero-fill kernel. Sized for `tokens` x `hidden`; `for_shape` reallocates when needed.
    """

    acc: torch.Tensor
    tickets: torch.Tensor

    @classmethod
    def for_shape(cls, current: "DownAccumulator | None", tokens: int, hidden: int,
                  device: torch.device) -> "DownAccumulator":
        if current is not None and current.acc.shape == (tokens, hidden) and current.acc.device == device:
            return current
        n_blocks = triton.cdiv(hidden, DOWN_CONFIG["BLOCK_N"])
        return cls(torch.zeros((tokens, hidden), dtype=torch.float32, device=device),
                   torch.zeros(n_blocks, dtype=torch.int32, device=device))


def pop_decode_step(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, chan: torch.Tensor, n_retained: int,
                    cand_col_norms_sq: torch.Tensor, down_t: torch.Tensor, index: torch.Tensor,
                    down_rows: torch.Tensor, k: int, acc: DownAccumulator,
                    scratch: "CandidateScratch | RankScratch", overlap: torch.Tensor | None = None,
                    in_top: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """POP's whole decode step in two launches. Returns (h, output in x's dtype).

    `chan` (int32) names the R channels then the C channels (rows of `gate` / `up` / `down_t`: the model's
    own weights, down_proj transposed; or the slices' rows, `chan` then an identity); h's columns follow it. `index` / `down_rows` (int32, n_keep) hold
    the R positions / channels and receive the selected ones behind them. With a `CandidateScratch`, gate/up
    and the selection are one launch (`gated_select`), then the down pass; with a `RankScratch`, gate/up
    (writing the Candidates' scores), then the down pass with the selection in its first programs
    (`ranked_step`). `use_gated_select` says which pays. `overlap` / `in_top`: see `select_candidates`.
    """
    if isinstance(scratch, RankScratch):
        return ranked_step(x, gate, up, chan, n_retained, cand_col_norms_sq, down_t, index, down_rows, k, acc,
                           scratch, overlap, in_top)
    h = gated_select(x, gate, up, chan, n_retained, cand_col_norms_sq, index, down_rows, k, scratch, overlap, in_top)
    return h, gathered_down(h, down_t, index, rows=down_rows, acc=acc)


@dataclass
class RankScratch:
    """Persistent scratch of `ranked_step` for one layer: the Candidates' float32 scores and two int32
    counters (ranking programs done, waiters through), zero between calls."""

    scores: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def for_shape(cls, current: object, n_cand: int, device: torch.device) -> "RankScratch":
        """`current` if it is a RankScratch of this size (any other previous scratch is replaced)."""
        if isinstance(current, cls) and current.scores.numel() == n_cand and current.scores.device == device:
            return current
        return cls(torch.zeros(n_cand, dtype=torch.float32, device=device),
                   torch.zeros(2, dtype=torch.int32, device=device))


def ranked_step(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, chan: torch.Tensor, n_retained: int,
                cand_col_norms_sq: torch.Tensor, down_t: torch.Tensor, index: torch.Tensor, rows: torch.Tensor,
                k: int, acc: DownAccumulator, scratch: RankScratch, overlap: torch.Tensor | None = None,
                in_top: torch.Tensor | None = None, down_config: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """POP's decode step with the selection at the head of the down pass; returns (h, output in x's dtype).

    Launch 1: gate/up over R + C; the blocks holding Candidates also write their scores. Launch 2: its first
    programs rank the Candidates (16 each, against all scores; the rule of `select_candidates`, so the same
    set for the same h) and write the chosen at their rank into ``index[n_retained:]`` / ``rows[n_retained:]``,
    while the programs over the Retained rows stream; the programs over the chosen rows wait for the ranking.
    No chain of round trips inside gate/up (as in `gated_select`), no side stream: the selection costs the
    down pass a few microseconds of its start. `down_config` overrides `DOWN_CONFIG` (and
    `DOWN_CONFIG_ONE_TOKEN` at one token).
    """
    tokens, hidden = x.shape
    n = chan.numel()
    n_cand = n - n_retained
    if scratch.scores.numel() != n_cand:
        raise ValueError(f"scratch for {scratch.scores.numel()} Candidates does not fit {n_cand}")
    out_dim = down_t.shape[1]
    gcfg = dict(GATED_CONFIG)
    block_n = gcfg.pop("BLOCK_N")
    block_b = max(16, triton.next_power_of_2(tokens))
    h = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    _gated_scored_kernel[(triton.cdiv(n, block_n),)](
        x, gate, up, chan, h, cand_col_norms_sq, scratch.scores, tokens, n, n_retained, hidden, x.stride(0),
        gate.stride(0), h.stride(0), BLOCK_B=block_b, BLOCK_N=block_n, **gcfg)
    dcfg = {**DOWN_CONFIG, **(DOWN_CONFIG_ONE_TOKEN if tokens == 1 else {}), **(down_config or {})}
    n_cb = triton.cdiv(out_dim, dcfg["BLOCK_N"])
    if acc.acc.shape != (tokens, out_dim) or acc.tickets.numel() < n_cb:
        raise ValueError(f"accumulator of shape {tuple(acc.acc.shape)} does not fit ({tokens}, {out_dim})")
    if k == 0:  # nothing to choose (no waiter would reset the ranking's counter): the Retained rows alone
        return h, gathered_down(h, down_t, index, rows=rows, acc=acc)
    out = torch.empty((tokens, out_dim), dtype=x.dtype, device=x.device)
    count = overlap is not None and in_top is not None
    chunks = triton.cdiv(n_retained, dcfg["K_PER_PROG"]) + triton.cdiv(k, dcfg["K_PER_PROG"])
    grid = (triton.cdiv(n_cand, RANKED_DOWN_RANK_I) + n_cb * chunks,)
    _ranked_down_kernel[grid](
        h, down_t, index, rows, chan, scratch.scores, in_top if count else index, overlap if count else index,
        scratch.counters, acc.acc, acc.tickets, out, tokens, out_dim, n_retained, n_cand, k, h.stride(0),
        down_t.stride(0), out.stride(0), BLOCK_B=block_b, RANK_I=RANKED_DOWN_RANK_I, RANK_J=RANKED_DOWN_RANK_J,
        COUNT=count, **dcfg)
    return h, out


@dataclass
class CandidateScratch:
    """Persistent scratch of `gated_select` for one layer: float32 partial gate/up sums of the Candidate
    rows (one slot per slice of the hidden dimension), their scores, one ticket per block of Candidate rows
    (zero between calls) and a count of finished blocks that only grows (int64)."""

    partial: torch.Tensor
    scores: torch.Tensor
    tickets: torch.Tensor
    done: torch.Tensor

    @classmethod
    def for_shape(cls, current: object, tokens: int, n_cand: int, split: int,
                  device: torch.device) -> "CandidateScratch":
        shape = (2 * split, tokens, n_cand)
        if isinstance(current, cls) and current.partial.shape == shape and current.partial.device == device:
            return current
        n_blocks = triton.cdiv(n_cand, GATED_CONFIG["BLOCK_N"])
        return cls(torch.zeros(shape, dtype=torch.float32, device=device),
                   torch.zeros(n_cand, dtype=torch.float32, device=device),
                   torch.zeros(n_blocks, dtype=torch.int32, device=device),
                   torch.zeros(1, dtype=torch.int64, device=device))


def use_gated_select(n_retained: int, n_cand: int, device: torch.device) -> bool:
    """Whether POP's step runs `gated_select` (one launch for gate/up and the selection, then the down pass)
    instead of `ranked_step` (gate/up, then the down pass with the selection at its head).

    It may run while its Candidate block finishers, which wait for each other, take at most one program
    slot per streaming multiprocessor (the rest stay free for the programs they wait on). It pays where the
    Retained rows stream long enough to hide the Candidates' chain of dependent round trips to L2 (partial
    sums, scores, a count, the ranking). Against the earlier split step (three launches) on an H100 it was
    as fast or up to 8% faster at |R| >= 6.5 |C| (Llama-2-7B / Llama-3.1-8B FFN at the 20% target) and
    between 4% faster and 5% slower at |R| <= 4.6 |C| (the 40% targets), hence "auto" from |R| >= 5 |C|.
    Against `ranked_step`, which replaced the split step and is faster than it at 40%, the 20% targets were
    mixed in one run (Llama-2-7B 79.7 against 81.8 us at one token, 88.9 against 87.9 at ten; Llama-3.1-8B
    114.4 against 113.3 and 127.7 against 125.2): the rule is kept. `GATED_SELECT` overrides the choice
    ("always" / "never").
    """
    if GATED_SELECT == "never" or not _finishers_fit(n_cand, device):
        return False
    return GATED_SELECT == "always" or n_retained >= GATED_SELECT_MIN_RETAINED_PER_CANDIDATE * n_cand


def dependent_launch(device: torch.device) -> bool:
    """Whether `sliced_step` issues its down pass as a programmatic dependent launch (PDL: NVIDIA compute
    capability 9.0 and later, a Triton with ``tl.extra.cuda.gdc_wait``; `SLICED_DEPENDENT_LAUNCH` "never"
    turns it off).

    Every program of the gate/up launch signals griddepcontrol.launch_dependents as its last act, so the down
    launch's programs are placed on the SMs as the gate/up launch's last programs end, instead of after the
    launch has retired and the next one has been set up; each waits (griddepcontrol.wait) until the gate/up
    launch has completed and its writes are visible, so the results are those of two plain launches. The gain
    is small: on an H100 (paired CUDA-graph replays of the FFN module at one token, `benchmarks/pop_gpu.py`
    rows ``pop`` against ``pop:serial`` in results/pop_gpu_h100.json and results/pop_gpu_b1_machines_h100.json)
    0-1.0 us, e.g. Llama-2-7B 48.7-49.1 against 49.2-49.3 us at the 40% target.
    The trigger sits at the end of the programs: at their start it was as fast at 40% but up to 4 us slower
    at Llama-3.1-8B's 20% target (the waiting down programs hold SM slots through the gate/up launch's tail).
    """
    if SLICED_DEPENDENT_LAUNCH not in ("auto", "never"):
        raise ValueError(f"SLICED_DEPENDENT_LAUNCH must be 'auto' or 'never'; got {SLICED_DEPENDENT_LAUNCH!r}")
    if SLICED_DEPENDENT_LAUNCH == "never" or triton is None or device.type != "cuda" or torch.version.hip:
        return False
    if not hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _finishers_fit(n_cand: int, device: torch.device) -> bool:
    """At least one and at most one Candidate block per streaming multiprocessor (see `use_gated_select`)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 0 < triton.cdiv(n_cand, GATED_CONFIG["BLOCK_N"]) <= sms


def gated_select(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, chan: torch.Tensor, n_retained: int,
                 cand_col_norms_sq: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, k: int,
                 scratch: CandidateScratch, overlap: torch.Tensor | None = None,
                 in_top: torch.Tensor | None = None) -> torch.Tensor:
    """Gate/up over R + C and the selection of the k best Candidates in one launch; returns h (tokens, |R u C|).

    The Candidate rows run first, each block split ``scratch.partial.shape[0] // 2`` ways along the hidden
    dimension so that it finishes while the Retained rows still stream; each block's finisher ranks its
    Candidates against all (the rule of `select_candidates`: the same set for the same h) and writes the
    chosen into ``index[n_retained:]`` / ``rows[n_retained:]`` at their rank. `overlap` / `in_top`: see
    `select_candidates`. The block finishers wait for each other, so at most one Candidate block per
    streaming multiprocessor is allowed (`use_gated_select`).
    """
    tokens, hidden = x.shape
    n_cand = cand_col_norms_sq.numel()
    split = scratch.partial.shape[0] // 2
    if not _finishers_fit(n_cand, x.device):
        raise ValueError(f"gated_select takes at least one and at most one block of {GATED_CONFIG['BLOCK_N']} "
                         f"Candidates per streaming multiprocessor; got {n_cand} Candidates")
    if scratch.partial.shape[1:] != (tokens, n_cand):
        raise ValueError(f"scratch of shape {tuple(scratch.partial.shape)} does not fit ({tokens}, {n_cand})")
    cfg = dict(GATED_CONFIG)
    block_n = cfg.pop("BLOCK_N")
    h = torch.empty((tokens, chan.numel()), dtype=x.dtype, device=x.device)
    count = overlap is not None and in_top is not None
    grid = (triton.cdiv(n_cand, block_n) * split + triton.cdiv(n_retained, block_n),)
    _gated_rank_kernel[grid](
        x, gate, up, chan, h, scratch.partial, scratch.scores, scratch.tickets, scratch.done, cand_col_norms_sq,
        index, rows, in_top if count else index, overlap if count else index, tokens, n_retained, n_cand, k, hidden,
        x.stride(0), gate.stride(0), h.stride(0), BLOCK_B=max(16, triton.next_power_of_2(tokens)), BLOCK_N=block_n,
        SPLIT=split, BLOCK_C=triton.next_power_of_2(n_cand), COUNT=count, **cfg)
    return h


def select_candidates(h: torch.Tensor, cand_col_norms_sq: torch.Tensor, index: torch.Tensor, n_retained: int, k: int,
                      overlap: torch.Tensor | None = None, in_top: torch.Tensor | None = None,
                      chan: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """Write the positions (columns of h) of the k best Candidates into ``index[n_retained:]``.

    `h` is (tokens, |R u C|) with R first; `index` (int32, n_keep) already holds the R positions. With
    `chan` and `rows`, also write the selected Candidates' channels (``chan[position]``) into
    ``rows[n_retained:]``. With `overlap` (an int64 scalar tensor) and `in_top` (one flag per Candidate),
    add to it how many of the chosen are flagged (those in the prefill's top set).
    """
    n_cand = cand_col_norms_sq.numel()
    block = max(16, triton.next_power_of_2(n_cand))
    count = overlap is not None and in_top is not None
    write_rows = chan is not None and rows is not None
    _select_kernel[(1,)](h, cand_col_norms_sq, index, chan if write_rows else index, rows if write_rows else index,
                         in_top if count else index, overlap if count else index, h.shape[0], n_retained, n_cand, k,
                         h.stride(0), BLOCK_C=block, ROWS=write_rows, COUNT=count, num_warps=8)


def gathered_down(h: torch.Tensor, weight_rows: torch.Tensor, index: torch.Tensor,
                  config: dict | None = None, rows: torch.Tensor | None = None,
                  acc: DownAccumulator | None = None) -> torch.Tensor:
    """``h[:, index] @ weight_rows[rows]``: down_proj over the indexed rows only, for h (tokens, n) with at
    most 64 tokens and `weight_rows` row-major (down_proj transposed). `rows` (int32, aligned with `index`)
    names the weight row of each indexed column of h; omitted, the row is the column itself.

    With `acc`, returns the product in h's dtype, finished inside the kernel (see `DownAccumulator`);
    otherwise in float32, accumulated into a zero-filled output.
    """
    tokens, hidden = h.shape[0], weight_rows.shape[1]
    if tokens > 64:
        raise ValueError("gathered_down is a decode kernel: at most 64 tokens per call")
    cfg = {**DOWN_CONFIG, **(config or {})}
    grid = (triton.cdiv(hidden, cfg["BLOCK_N"]), triton.cdiv(index.numel(), cfg["K_PER_PROG"]))
    if acc is not None:
        if acc.acc.shape != (tokens, hidden) or acc.tickets.numel() < grid[0]:
            raise ValueError(f"accumulator of shape {tuple(acc.acc.shape)} does not fit ({tokens}, {hidden})")
        target, partial, tickets = torch.empty((tokens, hidden), dtype=h.dtype, device=h.device), acc.acc, acc.tickets
    else:
        target = torch.zeros((tokens, hidden), dtype=torch.float32, device=h.device)
        partial, tickets = target, index
    _gathered_down_kernel[grid](h, weight_rows, index, index if rows is None else rows, partial, tickets, target,
                                tokens, index.numel(), hidden, h.stride(0), weight_rows.stride(0), target.stride(0),
                                BLOCK_B=max(16, triton.next_power_of_2(tokens)), HAS_ROWS=rows is not None,
                                FINISH=acc is not None, **cfg)
    return target


def partition_index(scores: torch.Tensor, n_retained: int, n_keep: int, n_computed: int, chan: torch.Tensor,
                    rows: torch.Tensor, keep: torch.Tensor, in_top: torch.Tensor | None = None,
                    col_norms_sq: torch.Tensor | None = None, cand_col_norms_sq: torch.Tensor | None = None,
                    rank_config: dict | None = None) -> None:
    """POP's prefill partition as the channel vectors the decode kernels read, with no sort (two launches).

    The sets are those of `partition.partition` (the top n_retained / n_keep / n_computed of the finite,
    non-negative `scores`, ties to the lower channel id), each written in channel-id order: ``keep`` (int32,
    n_keep) the kept set. With `in_top` (pop): ``chan`` = R then C, ``rows[:n_retained]`` = R, ``in_top``
    flags the Candidates in the kept set and ``cand_col_norms_sq`` gets their squared down-column norms from
    `col_norms_sq`. Without (static): ``chan`` = ``rows`` = the kept set. `rank_config` overrides
    `RANK_CONFIG`.
    """
    n = scores.numel()
    pop = in_top is not None
    rank = torch.empty(n, dtype=torch.int32, device=scores.device)  # each channel's place in the order
    cfg = {**RANK_CONFIG, **(rank_config or {})}
    _rank_kernel[(triton.cdiv(n, cfg["BLOCK_I"]),)](scores, rank, n, **cfg)
    _compact_kernel[(triton.cdiv(n, 1024),)](rank, col_norms_sq if pop else scores, chan, rows, keep,
                                             in_top if pop else keep, cand_col_norms_sq if pop else scores, n,
                                             n_retained, n_keep, n_computed, POP=pop, BLOCK=1024, num_warps=4)


def sliced_step(x: torch.Tensor, gate_up: torch.Tensor, down_rows: torch.Tensor, n_retained: int,
                cand_col_norms_sq: torch.Tensor | None, index: torch.Tensor, k: int, acc: DownAccumulator,
                scratch: RankScratch | None, overlap: torch.Tensor | None = None,
                in_top: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's POP step over per-prompt slices, in two launches; returns (h, output in x's dtype).

    `gate_up` (n, 2, hidden) holds each computed channel's gate and up rows side by side, R first, then C;
    `down_rows` (n, hidden) their down_proj columns as rows, in the same order. Launch 1: gate/up, one
    channel per program (both rows in one contiguous pass), the Candidates first; rankers behind them wait
    for the Candidates' scores and write the k best positions (the rule of `select_candidates`) at their
    rank into ``index[n_retained:]`` while the Retained channels stream. Launch 2: the down pass over rows
    0..n_retained (contiguous, no index read) and the chosen rows (`_kept_down_kernel`), a programmatic
    dependent launch where the GPU has it (`dependent_launch`). No weight outside
    R + C is read, and of C's down rows only the chosen. With no Candidates (static, or every Candidate
    used: pass ``n_retained = n``, ``k = 0``), gate/up and the down pass over all n rows.
    `overlap` / `in_top`: see `select_candidates`.
    """
    tokens, hidden = x.shape
    if tokens != 1:
        raise ValueError(f"sliced_step computes one token; got {tokens} (use pop_decode_step over the slices)")
    n = gate_up.shape[0]
    n_cand = n - n_retained
    if gate_up.shape != (n, 2, hidden) or not gate_up.is_contiguous():
        raise ValueError(f"gate_up must be a contiguous (n, 2, {hidden}) slice; got {tuple(gate_up.shape)}")
    if n_cand and (scratch is None or scratch.scores.numel() != n_cand):
        raise ValueError(f"a RankScratch for {n_cand} Candidates is needed")
    h = torch.empty((1, n), dtype=x.dtype, device=x.device)
    count = overlap is not None and in_top is not None and n_cand > 0
    cfg = dict(SLICED_GATED_CONFIG)
    block_k = min(cfg.pop("BLOCK_K"), triton.next_power_of_2(hidden))
    # with no Candidates, no program reads the scores, norms or counters: any tensor stands in
    cn, scores, counters = (cand_col_norms_sq, scratch.scores, scratch.counters) if n_cand else (h, h, index)
    grid = (n + triton.cdiv(n_cand, RANKED_DOWN_RANK_I),)
    dependent = dependent_launch(x.device)
    _sliced_select_kernel[grid](
        x, gate_up, h, cn, scores, counters, index, in_top if count else index, overlap if count else index,
        n_retained, n_cand, k, hidden, BLOCK_K=block_k, RANK_I=RANKED_DOWN_RANK_I, RANK_J=RANKED_DOWN_RANK_J,
        COUNT=count, TRIGGER=dependent, **cfg)
    return h, kept_down(h, down_rows, index, n_retained, n_retained + k, acc, dependent=dependent)


def kept_down(h: torch.Tensor, down_rows: torch.Tensor, index: torch.Tensor, n_retained: int, n_keep: int,
              acc: DownAccumulator, config: dict | None = None, dependent: bool = False) -> torch.Tensor:
    """``h[:, used] @ down_rows[used]`` in h's dtype, for used = 0..n_retained then ``index[n_retained:n_keep]``
    (positions into the slice, which are also columns of h); at most 64 tokens. The first n_retained rows are
    read with no index, so the down pass over a slice needs no index loads ahead of its weight loads.
    `dependent`: launched as a programmatic dependent launch whose programs wait for the launch before it
    (only where `dependent_launch` is true)."""
    tokens, hidden = h.shape[0], down_rows.shape[1]
    if tokens > 64:
        raise ValueError("kept_down is a decode kernel: at most 64 tokens per call")
    cfg = {**SLICED_DOWN_CONFIG, **(config or {})}
    if "K_PER_PROG" not in cfg:
        cfg["K_PER_PROG"] = 128 if triton.cdiv(n_keep, 128) <= SLICED_DOWN_MAX_CHUNKS_OF_128 else 256
    n_cb = triton.cdiv(hidden, cfg["BLOCK_N"])
    if acc.acc.shape != (tokens, hidden) or acc.tickets.numel() < n_cb:
        raise ValueError(f"accumulator of shape {tuple(acc.acc.shape)} does not fit ({tokens}, {hidden})")
    out = torch.empty((tokens, hidden), dtype=h.dtype, device=h.device)
    if n_keep == 0:
        return out.zero_()
    if dependent:
        cfg["launch_pdl"] = True
    _kept_down_kernel[(n_cb * triton.cdiv(n_keep, cfg["K_PER_PROG"]),)](
        h, down_rows, index, acc.acc, acc.tickets, out, tokens, hidden, n_retained, n_keep, h.stride(0),
        down_rows.stride(0), out.stride(0), BLOCK_B=max(16, triton.next_power_of_2(tokens)), WAIT=dependent, **cfg)
    return out
