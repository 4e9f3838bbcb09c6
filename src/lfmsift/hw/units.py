"""Cycle and time models of the individual units, small enough to check by hand.

- ``roofline_time``: an operation on the LXE or a GPU takes the longer of its compute time and its
  device-memory time (each at an achieved fraction of the peak).
- ``hcu_cycles``: the HCU compares each new token's hash with the open clusters' hashes. Reading (a) of the
  digest's §4.7: each of the N_HCU-h XOR accumulators compares one token hash with N_HCU-w cluster hashes
  per cycle (XOR, popcount, compare with Th_hd), so a token costs ceil(open / (h * w)) cycles.
- ``wtu_walk`` / ``wtu_cycles``: the WTU's early-exit bucket walk (§V-B, Fig. 11). A preprocess pass over
  the row computes the weighted sum, min and max; then buckets are visited from the top score range down,
  each visit a pass of the bucket sorters over the row (N_WTU-w lanes per cycle), until the running weighted
  sum exceeds the threshold. Same rule as ``lfmsift.kv.wicsum.wicsum_bucketed`` (it reuses its buckets).
- ``transfer_time``: a fetch over the link is a number of requests (contiguous runs); each costs a fixed
  overhead besides its bytes, which is what makes per-token scatter slow and the KVMU's cluster-contiguous
  runs fast (§V-C).
"""

from __future__ import annotations

import math

import torch

from lfmsift.hw.specs import CoreSpec
from lfmsift.hw.workload import Work
from lfmsift.kv.wicsum import bucket_of


def roofline_time(work: Work, peak_flops: float, utilization: float, bandwidth: float, efficiency: float) -> float:
    """Seconds for ``work`` at ``utilization`` of ``peak_flops`` and ``efficiency`` of ``bandwidth``."""
    if not (0 < utilization <= 1 and 0 < efficiency <= 1):
        raise ValueError(f"utilization and efficiency must be in (0, 1], got {utilization}, {efficiency}")
    return max(work.flops / (peak_flops * utilization), work.bytes / (bandwidth * efficiency))


def hcu_cycles(new_tokens: int, open_clusters: int, core: CoreSpec) -> int:
    """Cycles for the HCU to cluster ``new_tokens`` hashes against ``open_clusters`` cluster hashes."""
    lanes = core.hcu_accumulators * core.hcu_width
    return new_tokens * max(1, math.ceil(open_clusters / lanes))


def wtu_walk(scores: torch.Tensor, counts: torch.Tensor, ratio: float, buckets: int) -> int:
    """Number of buckets the WTU visits on one row before the running weighted sum exceeds
    ``ratio`` x the row's weighted sum (Fig. 11); a row whose weighted sum is <= 0 takes its top bucket."""
    s = scores.to(torch.float64).flatten()
    w = s * counts.to(s)
    total = w.sum()
    if total <= 0:
        return 1
    per_bucket = torch.zeros(buckets, dtype=s.dtype).scatter_add_(0, bucket_of(s, buckets), w)
    return int((per_bucket.cumsum(0) > ratio * total).to(torch.int8).argmax()) + 1


def wtu_cycles(clusters: int, buckets_visited: float, core: CoreSpec) -> float:
    """Cycles for one row: a preprocess pass plus one sorter pass per visited bucket."""
    lanes = core.wtu_cores * core.wtu_width
    return math.ceil(clusters / lanes) * (1 + buckets_visited)


def transfer_time(nbytes: float, requests: float, bandwidth: float, request_overhead_s: float) -> float:
    """Seconds to move ``nbytes`` in ``requests`` contiguous runs over a link of ``bandwidth`` bytes/s."""
    if nbytes <= 0:
        return 0.0
    return nbytes / bandwidth + requests * request_overhead_s
