"""WiCSum's bucketed rule (the WTU's early exit) for every query row of a layer in one Triton launch.

The same rule as ``lfmsift.kv.wicsum.select_clusters_padded`` with ``buckets`` set and raw scores, over a
device index's padded table (empty slots: count 0, never selected): per row, the weighted sum of the scores
and the valid maximum and minimum (first pass), the per-bucket weighted mass in registers (second pass), the
exit bucket, and the row's selection and visited share (third pass). A row whose weighted sum is <= 0 takes
its top cluster (``nonpositive="top"``) or is shifted by its minimum first (``"shifted"``), as in the
reference. Everything is float64, as in the reference. It replaces some sixty small tensor operations per
layer by one launch (``benchmarks/stream_ops.py`` counts them).

``wicsum_rows(scores, counts, ratio, buckets, shifted)``: scores (kv_heads, rows, clusters) fp32, counts
(clusters,) -> (kv_heads, clusters) union of the rows' selections, the visited share per KV head (mean
over rows), the number of rows with a weighted sum <= 0. ``available(scores)``: whether it can run.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU machines and CI run the PyTorch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

BLOCK_CLUSTERS = 256


def enabled() -> bool:
    """Opt-in (``LFMSIFT_WICSUM_KERNEL=1``) until the kernel has been checked and timed on a GPU; its rule is
    tested against the PyTorch form under Triton's interpreter and, where CUDA is, on the GPU."""
    return os.environ.get("LFMSIFT_WICSUM_KERNEL", "0") in ("1", "true", "yes")


def available(scores: torch.Tensor) -> bool:
    """CUDA tensors, or any under Triton's interpreter (``TRITON_INTERPRET=1``, for testing on a CPU)."""
    return triton is not None and (scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _bucket(s, hi, lo, BUCKETS: tl.constexpr):
        """``bucket_of``: floor((hi - s) / width), width = (hi - lo) / buckets; 0 when the width is 0."""
        width = (hi - lo) / BUCKETS
        wide = width > 0
        b = tl.where(wide, tl.floor((hi - s) / tl.where(wide, width, 1.0)), 0.0)
        b = tl.where(b != b, 0.0, b)  # NaN -> 0, as nan_to_num
        b = tl.minimum(tl.maximum(b, 0.0), BUCKETS - 1.0)
        return b.to(tl.int32)

    @triton.jit
    def _wicsum_rows_kernel(scores, counts, ratio_ptr, rowmask, seen_out, nonpos_out, clusters,
                            SHIFT: tl.constexpr, BUCKETS: tl.constexpr, BUCKETS_P2: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * clusters
        cols = tl.arange(0, BLOCK)
        ratio = tl.load(ratio_ptr)
        # Pass 1: weighted sum, valid max (first index of it) and min, valid slots.
        tot_v = tl.zeros([BLOCK], dtype=tl.float64)
        hi_v = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
        hi_i = tl.zeros([BLOCK], dtype=tl.int32)
        lo_v = tl.full([BLOCK], float("inf"), dtype=tl.float64)
        valid_v = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, clusters, BLOCK):
            idx = start + cols
            inside = idx < clusters
            s = tl.load(scores + base + idx, mask=inside, other=0.0).to(tl.float64)
            n = tl.load(counts + idx, mask=inside, other=0.0)
            valid = n > 0
            tot_v += tl.where(valid, s * n, 0.0)
            better = valid & (s > hi_v)
            hi_i = tl.where(better, idx, hi_i)
            hi_v = tl.where(better, s, hi_v)
            lo_v = tl.minimum(lo_v, tl.where(valid, s, float("inf")))
            valid_v += valid.to(tl.int32)
        total = tl.sum(tot_v, axis=0)
        hi = tl.max(hi_v, axis=0)
        top = tl.min(tl.where(hi_v == hi, hi_i, 2147483647), axis=0)
        lo = tl.min(lo_v, axis=0)
        valid_count = tl.sum(valid_v, axis=0)
        tl.store(nonpos_out + row, (total <= 0).to(tl.int8))
        # The non-positive shift: s - min for the whole row, its sum recomputed over the shifted scores.
        offset = total * 0.0  # float64, as the shift below
        if SHIFT:
            if total <= 0:
                offset = lo
                tot2 = tl.zeros([BLOCK], dtype=tl.float64)
                for start in range(0, clusters, BLOCK):
                    idx = start + cols
                    inside = idx < clusters
                    s = tl.load(scores + base + idx, mask=inside, other=0.0).to(tl.float64) - offset
                    n = tl.load(counts + idx, mask=inside, other=0.0)
                    tot2 += tl.where(n > 0, s * n, 0.0)
                total = tl.sum(tot2, axis=0)
        hi = hi - offset
        lo = lo - offset
        positive = total > 0
        threshold = ratio * total
        # Pass 2: weighted mass per bucket, then the exit bucket (the first whose cumulative mass exceeds it).
        k = tl.arange(0, BUCKETS_P2)
        hist = tl.zeros([BUCKETS_P2], dtype=tl.float64)
        for start in range(0, clusters, BLOCK):
            idx = start + cols
            inside = idx < clusters
            s = tl.load(scores + base + idx, mask=inside, other=0.0).to(tl.float64) - offset
            n = tl.load(counts + idx, mask=inside, other=0.0)
            w = tl.where(n > 0, s * n, 0.0)
            b = _bucket(s, hi, lo, BUCKETS)
            for j in tl.static_range(BUCKETS):
                mass = tl.sum(tl.where(b == j, w, 0.0), axis=0)
                hist += tl.where(k == j, mass, 0.0)
        over = (tl.cumsum(hist, axis=0) > threshold) & (k < BUCKETS)
        exit_bucket = tl.min(tl.where(over, k, BUCKETS_P2), axis=0)
        exit_bucket = tl.where(exit_bucket == BUCKETS_P2, 0, exit_bucket)
        # Pass 3: the row's selection and its visited share.
        seen_v = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, clusters, BLOCK):
            idx = start + cols
            inside = idx < clusters
            s = tl.load(scores + base + idx, mask=inside, other=0.0).to(tl.float64) - offset
            n = tl.load(counts + idx, mask=inside, other=0.0)
            valid = n > 0
            b = _bucket(s, hi, lo, BUCKETS)
            visited = b <= exit_bucket
            take = tl.where(positive, visited, idx == top) & valid
            seen = tl.where(positive, visited, b == 0) & valid
            seen_v += seen.to(tl.int32)
            tl.store(rowmask + base + idx, take.to(tl.int8), mask=inside)
        share = tl.sum(seen_v, axis=0).to(tl.float64) / tl.maximum(valid_count, 1).to(tl.float64)
        tl.store(seen_out + row, share)


def wicsum_rows(scores: torch.Tensor, counts: torch.Tensor, ratio: float, buckets: int, shifted: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module docstring. One launch over every (KV head, row); no host read."""
    kv, rows, clusters = scores.shape
    scores = scores.contiguous()
    rowmask = torch.empty(kv, rows, clusters, dtype=torch.int8, device=scores.device)
    seen = torch.empty(kv, rows, dtype=torch.float64, device=scores.device)
    nonpositive = torch.empty(kv, rows, dtype=torch.int8, device=scores.device)
    ratio_t = torch.full((1,), ratio, dtype=torch.float64, device=scores.device)
    launch(scores, counts.to(torch.float64), ratio_t, rowmask, seen, nonpositive, shifted, buckets)
    return rowmask.any(1), seen.mean(-1), nonpositive.sum()


def launch(scores: torch.Tensor, counts: torch.Tensor, ratio: torch.Tensor, rowmask: torch.Tensor,
           seen: torch.Tensor, nonpositive: torch.Tensor, shifted: bool, buckets: int) -> None:
    """The kernel: per (KV head, row), the row's selection into ``rowmask``, its visited share into ``seen``
    and whether its weighted sum was <= 0 into ``nonpositive``."""
    kv, rows, clusters = scores.shape
    _wicsum_rows_kernel[(kv * rows,)](scores, counts, ratio, rowmask, seen, nonpositive, clusters, SHIFT=shifted,
                                     BUCKETS=buckets, BUCKETS_P2=triton.next_power_of_2(buckets),
                                     BLOCK=BLOCK_CLUSTERS)
