"""Attention of a chunk over its gathered past, reading only the tokens each KV head selected.

The device streaming path gathers, per KV head h, its ``counts[h]`` selected past tokens to the front of a
buffer of fixed length, with the chunk's own K/V at ``[start, start + tokens)`` (``kv.attention``). A masked
SDPA call over that buffer reads and scores every slot, selected or not: at ReSV's ratios most of them are
masked out, and in a profile of a frame on an H200 the masked call was the largest GPU cost of the step. This
kernel is split-K flash attention over exactly the selected slots: programs over (KV head, block of past
slots, block of query rows) skip the blocks past the head's count (read from the device, so nothing waits),
one more program per head attends to the chunk itself causally, and the partial softmax states are merged by
a few tensor operations. The query heads of a GQA group are rows of their KV head, as in ``attend_gathered``.

``gathered_attention(query, buffer, counts, start, scaling)`` returns what ``attend_gathered`` returns. It is
opt-in (``LFMSIFT_ATTENTION_KERNEL=1``; otherwise the masked SDPA call runs) until its tests have passed on a
GPU: they pass under Triton's interpreter in fp32, whose bf16 tile products are wrong, so bf16 is checked on
CUDA only. It can be captured in a CUDA graph (no host read, launch shapes from the buffer's shape only).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU machines and CI run the SDPA path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

BLOCK_N = 64  # past slots per inner step
ITERS = 4  # inner steps per program: a program covers BLOCK_N * ITERS past slots


def enabled() -> bool:
    return os.environ.get("LFMSIFT_ATTENTION_KERNEL", "0") in ("1", "true", "yes")


def available(query: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether the kernel can run: Triton, CUDA tensors (or Triton's interpreter), a power-of-two head size
    of at least 16."""
    if triton is None or not enabled():
        return False
    dim = query.shape[-1]
    if dim < 16 or dim & (dim - 1):
        return False
    return (query.is_cuda and buffer.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 inputs: exact products, not TF32
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _online_step(qt, kt, vt, seen, m_i, l_i, acc, scale, IEEE: tl.constexpr):
        """One block of keys folded into a running softmax (max, sum, weighted values) of each query row."""
        s = tl.where(seen, _dot(qt, tl.trans(kt), IEEE) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)

    @triton.jit
    def _partial_kernel(q, buffer, counts, acc_out, m_out, l_out, rows, tokens, start, length, scale, splits,
                        KV_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        ITERS: tl.constexpr, IEEE: tl.constexpr):
        h = tl.program_id(0)
        split = tl.program_id(1)
        block = tl.program_id(2)
        r = block * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < rows
        d = tl.arange(0, DIM)
        h64 = h.to(tl.int64)
        qt = tl.load(q + (h64 * rows + r)[:, None] * DIM + d[None, :], mask=live[:, None], other=0.0)
        keys = buffer + h64 * length * DIM
        values = buffer + (KV_HEADS + h64) * length * DIM
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)  # finite: a block with nothing seen adds nothing
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, DIM], tl.float32)
        if split < splits - 1:  # a block of the head's selected past: slots [0, counts[h])
            n = tl.load(counts + h)
            lo = split * (BLOCK_N * ITERS)
            if lo < n:
                for it in tl.static_range(ITERS):
                    j = lo + it * BLOCK_N + tl.arange(0, BLOCK_N)
                    seen = j < n
                    slot = j[:, None].to(tl.int64) * DIM + d[None, :]
                    kt = tl.load(keys + slot, mask=seen[:, None], other=0.0)
                    vt = tl.load(values + slot, mask=seen[:, None], other=0.0)
                    m_i, l_i, acc = _online_step(qt, kt, vt, seen[None, :], m_i, l_i, acc, scale, IEEE)
        else:  # the chunk itself: row g * tokens + t sees [start, start + t]
            t = r % tokens
            for n0 in range(0, tokens, BLOCK_N):
                jj = n0 + tl.arange(0, BLOCK_N)
                inside = jj < tokens
                slot = (start + jj)[:, None].to(tl.int64) * DIM + d[None, :]
                kt = tl.load(keys + slot, mask=inside[:, None], other=0.0)
                vt = tl.load(values + slot, mask=inside[:, None], other=0.0)
                seen = inside[None, :] & (jj[None, :] <= t[:, None])
                m_i, l_i, acc = _online_step(qt, kt, vt, seen, m_i, l_i, acc, scale, IEEE)
        state = (h64 * splits + split) * rows + r
        tl.store(acc_out + state[:, None] * DIM + d[None, :], acc, mask=live[:, None])
        tl.store(m_out + state, m_i, mask=live)
        tl.store(l_out + state, l_i, mask=live)


def gathered_attention(query: torch.Tensor, buffer: torch.Tensor, counts: torch.Tensor, start: int,
                       scaling: float) -> torch.Tensor:
    """query (heads, tokens, head_dim); buffer (2, kv_heads, length, head_dim) with head h's selected past at
    ``[0, counts[h])`` and the chunk at ``[start, start + tokens)``. Returns (tokens, heads, head_dim)."""
    heads, tokens, dim = query.shape
    kv_heads, length = buffer.shape[1], buffer.shape[2]
    if heads % kv_heads or buffer.shape[0] != 2 or buffer.shape[3] != dim or counts.shape != (kv_heads,):
        raise ValueError(f"query {tuple(query.shape)}, buffer {tuple(buffer.shape)} and counts {tuple(counts.shape)} "
                         "do not fit (heads, tokens, dim), (2, kv_heads, length, dim), (kv_heads,)")
    if start + tokens > length:
        raise ValueError(f"the chunk's slots [{start}, {start + tokens}) pass the buffer's {length}")
    rows = heads // kv_heads * tokens
    q = query.to(buffer.dtype).contiguous()  # (kv_heads, rows, dim): a group's heads are its rows
    buffer = buffer.contiguous()
    counts = counts.contiguous()  # the kernel reads counts[h] at offset h (an expanded scalar is copied)
    splits = triton.cdiv(start, BLOCK_N * ITERS) + 1  # past blocks, then the chunk
    block_r = max(16, min(64, triton.next_power_of_2(rows)))
    acc = torch.empty(kv_heads, splits, rows, dim, dtype=torch.float32, device=query.device)
    m = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    grid = (kv_heads, splits, triton.cdiv(rows, block_r))
    _partial_kernel[grid](q, buffer, counts, acc, m, l, rows, tokens, start, length, scaling, splits,
                          KV_HEADS=kv_heads, DIM=dim, BLOCK_R=block_r, BLOCK_N=BLOCK_N, ITERS=ITERS,
                          IEEE=buffer.dtype == torch.float32)
    weight = torch.exp(m - m.amax(1, keepdim=True))  # every row sees itself: each row has a finite maximum
    out = (acc * weight[..., None]).sum(1) / (l * weight).sum(1)[..., None]
    return out.to(query.dtype).reshape(heads, tokens, dim).transpose(0, 1)
