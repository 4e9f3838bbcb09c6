"""Leader clustering of one chunk in one Triton launch: distances, the walk, the assignment and the writes.

The same rule as ``DeviceClusterTable.assign`` (and so as ``HashClusterTable.assign``): each token joins the
nearest earlier founder of its chunk or the nearest cluster open before the chunk when closer than the
Hamming threshold (ties: the most recent founder; an old cluster only when strictly closer, the highest id
among equally near old ones), else it founds a cluster. One program does it all for a chunk (a chunk is
tens of tokens): it scans the old clusters' packed hashes block by block (XOR + SWAR popcount, masked by
open: newest member at or after ``lowest``), walks the chunk in order with the founder flags in registers,
gives each token its cluster, and writes the table: the founders' hashes, counts (atomic add), newest
positions (atomic max), key sums (atomic add) and the new size. It replaces some fifty small tensor
operations per layer (``benchmarks/stream_ops.py``).

``assign_chunk(hashes, keys, position, lowest, threshold, bound, size, table...)`` -> (cluster ids, new size).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU machines and CI run the PyTorch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None


def enabled() -> bool:
    """Opt-in (``LFMSIFT_ASSIGN_KERNEL=1``) until the kernel has been checked and timed on a GPU; its rule is
    tested against the PyTorch form under Triton's interpreter and, where CUDA is, on the GPU."""
    return os.environ.get("LFMSIFT_ASSIGN_KERNEL", "0") in ("1", "true", "yes")


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    FAR = tl.constexpr(1 << 20)  # a distance no threshold reaches

    @triton.jit
    def _popcount(x):
        """Set bits of each int64 bit pattern (SWAR; the masks drop what an arithmetic shift copies in)."""
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        x = x + (x >> 32)
        return x & 0x7F

    @triton.jit
    def _assign_kernel(hashes, keys, cluster_out, size_in, size_out, table_hashes, counts, newest, sums,
                       tokens, bound, capacity, position, lowest, threshold,
                       KV: tl.constexpr, DIM: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                       POSITION_ON_DEVICE: tl.constexpr, LOWEST_IS_WINDOW: tl.constexpr):
        if POSITION_ON_DEVICE:  # a graph-captured step: the chunk's position is read, ``lowest`` may be a window
            position = tl.load(position)
            if LOWEST_IS_WINDOW:
                lowest = position - lowest
        tt = tl.arange(0, BT)
        in_chunk = tt < tokens
        h = tl.load(hashes + tt, mask=in_chunk, other=0)
        # Old open clusters: nearest distance per token and the highest id among the nearest.
        best_d = tl.full([BT], FAR, dtype=tl.int64)
        best_id = tl.full([BT], -1, dtype=tl.int64)
        for c0 in range(0, bound, BC):
            cc = c0 + tl.arange(0, BC)
            in_table = cc < bound
            ch = tl.load(table_hashes + cc, mask=in_table, other=0)
            nw = tl.load(newest + cc, mask=in_table, other=-(1 << 62))
            is_open = in_table & (nw >= lowest)
            d = _popcount(h[:, None] ^ ch[None, :])
            d = tl.where(is_open[None, :], d, FAR)
            d_min = tl.min(d, axis=1)
            d_id = tl.max(tl.where(d == d_min[:, None], cc[None, :].to(tl.int64), -1), axis=1)
            best_id = tl.where(d_min < best_d, d_id, tl.where(d_min == best_d, tl.maximum(best_id, d_id), best_id))
            best_d = tl.minimum(best_d, d_min)
        can_found = best_d >= threshold
        # The walk: token t founds a cluster unless an earlier founder of the chunk is within the threshold.
        founder = tl.zeros([BT], dtype=tl.int32)
        for t in range(tokens):
            h_t = tl.sum(tl.where(tt == t, h, 0), axis=0)
            near = (_popcount(h ^ h_t) < threshold) & (tt < t)
            blocked = tl.sum(tl.where(near, founder, 0), axis=0) > 0
            can_t = tl.sum(tl.where(tt == t, can_found.to(tl.int32), 0), axis=0) > 0
            founder = tl.where(tt == t, (can_t & (blocked == 0)).to(tl.int32), founder)
        # Each token's cluster: the nearest earlier founder (ties: the most recent), an old one if closer.
        d_in = _popcount(h[:, None] ^ h[None, :])
        close = (d_in < threshold) & (tt[None, :] < tt[:, None]) & (founder[None, :] > 0)
        d_f = tl.where(close, d_in, FAR)
        f_min = tl.min(d_f, axis=1)
        f_arg = tl.max(tl.where((d_f == f_min[:, None]) & (d_f < FAR), tt[None, :], -1), axis=1)
        size = tl.load(size_in)
        rank = tl.cumsum(founder, axis=0) - 1  # among the chunk's founders
        f_rank = tl.sum(tl.where((tt[None, :] <= f_arg[:, None]) & (founder[None, :] > 0), 1, 0), axis=1) - 1
        join_old = best_d < tl.minimum(f_min, threshold)
        is_founder = founder > 0
        cluster = tl.where(join_old, best_id, size + tl.where(is_founder, rank, f_rank).to(tl.int64))
        tl.store(cluster_out + tt, cluster, mask=in_chunk)
        tl.store(size_out, size + tl.sum(founder, axis=0).to(tl.int64))
        # The table: founders' hashes, counts, newest positions, key sums.
        tl.store(table_hashes + cluster, h, mask=in_chunk & is_founder)
        tl.atomic_add(counts + cluster, tl.full([BT], 1, dtype=tl.int64), mask=in_chunk)
        tl.atomic_max(newest + cluster, position + tt.to(tl.int64), mask=in_chunk)
        dd = tl.arange(0, DIM)
        for head in tl.static_range(KV):
            k = tl.load(keys + (head * tokens + tt[:, None]) * DIM + dd[None, :], mask=in_chunk[:, None], other=0.0)
            tl.atomic_add(sums + ((head * capacity + cluster[:, None]) * DIM + dd[None, :]), k, mask=in_chunk[:, None])


def assign_chunk(hashes: torch.Tensor, keys: torch.Tensor, position: int | torch.Tensor, lowest: int,
                 threshold: int, bound: int, size: torch.Tensor, table_hashes: torch.Tensor, counts: torch.Tensor,
                 newest: torch.Tensor, sums: torch.Tensor, window: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's clusters (tokens,) int64 and the new size (a 0-dim tensor); the table tensors (packed
    hashes, counts, newest, key sums (kv_heads, capacity, head_dim) fp32) are updated in place and must hold
    ``bound + tokens`` slots. No host read. ``position`` may be a one-element int64 device tensor (a step
    captured in a CUDA graph); then, with a ``window``, the open clusters are those whose newest member is at
    or after ``position - window`` (``lowest`` is used otherwise)."""
    tokens = hashes.shape[0]
    kv, capacity, dim = sums.shape
    if keys.shape != (kv, tokens, dim):
        raise ValueError(f"keys must be ({kv}, {tokens}, {dim}), got {tuple(keys.shape)}")
    if dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two for the assignment kernel, got {dim}")
    cluster = torch.empty(tokens, dtype=torch.int64, device=hashes.device)
    new_size = torch.empty((), dtype=torch.int64, device=hashes.device)
    bt = max(16, triton.next_power_of_2(max(tokens, 1)))
    bc = max(16, 4096 // bt)
    on_device = torch.is_tensor(position)
    windowed = on_device and window is not None
    _assign_kernel[(1,)](hashes.contiguous(), keys.to(torch.float32).contiguous(), cluster, size, new_size,
                         table_hashes, counts, newest, sums, tokens, bound, capacity, position,
                         window if windowed else lowest, threshold, KV=kv, DIM=dim, BT=bt, BC=bc,
                         POSITION_ON_DEVICE=on_device, LOWEST_IS_WINDOW=windowed)
    return cluster, new_size
