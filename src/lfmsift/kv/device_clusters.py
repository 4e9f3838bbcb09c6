"""The HC table on the compute device: leader clustering of a chunk with no host synchronisation.

The same rules as ``HashClusterTable`` (its docstring), a second implementation for the GPU path:

- the table (founder hash bits, per-KV-head key sums, counts, newest member) lives in device tensors grown
  by doubling; its true size is a device scalar, and the host keeps only an upper bound (the previous bound
  plus the chunk's tokens), so growing and slicing never read the device;
- hashes are kept as 0/1 bit rows, so the Hamming distances of all the chunk's tokens to all clusters are
  one matrix product (``|a| + |b| - 2 a.b``, exact in fp32), the closed slots masked; ties go to the
  highest id, as in the reference;
- the in-chunk walk (which tokens found a cluster) is ``kernels.cluster_walk.founders``; given the founders,
  each token's cluster, the founders' bits, the counts and the key sums are vectorized; a cluster's mean key
  is its key sum over its count (the reference updates a running mean: the same value up to rounding);
- a cluster is *open* while it has not been closed by ``close`` and, with a ``window``, while its newest
  member is among the last ``window`` stream positions (the recent KV cache kept on the device: the paper
  clusters "within the recent KV cache").

A step captured in a CUDA graph cannot change host state, nor shapes between replays: ``prepare`` (on the
host, before the step) fixes the slots scanned to the bound rounded up to a bucket and makes room;
``assign_at`` then clusters with the chunk's position as a device scalar and writes the size in place;
``finish`` (after the step) moves the bound on. The extra slots are empty (count 0), so
WiCSum weighs them nothing.

The bound is tightened without waiting: on CUDA each ``assign`` starts an asynchronous copy of the size
into pinned memory and, once a later call finds that copy complete (an event query, not a wait), the
bound becomes the copied size plus the tokens assigned since, so the slots WiCSum scores track the real
table a chunk or two behind. On the CPU the size is read directly. ``sync_bound()`` reads it now.
"""

from __future__ import annotations

import torch

from lfmsift.kernels import cluster_assign
from lfmsift.kernels.cluster_walk import founders
from lfmsift.kernels.compiled import fused
from lfmsift.kv.clusters import DEFAULT_HAMMING_THRESHOLD
from lfmsift.kv.clusters import _grow as _grown

_FAR = float(1 << 20)  # a distance no threshold reaches
_GONE = -(1 << 62)  # ``newest`` of an empty or closed slot: older than any window


def unpack_bits(hashes: torch.Tensor, bits: int) -> torch.Tensor:
    """(tokens, bits) fp32 0/1 rows of packed int64 hashes (bit j of hash -> column j)."""
    shifts = torch.arange(bits, device=hashes.device)
    return ((hashes[:, None] >> shifts) & 1).to(torch.float32)


def pack_bits(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_bits``: (n, bits) 0/1 -> (n,) int64."""
    weights = torch.pow(2, torch.arange(rows.shape[1], device=rows.device, dtype=torch.int64))
    return (rows.to(torch.int64) * weights).sum(-1)


def hamming_rows(a: torch.Tensor, a_ones: torch.Tensor, b: torch.Tensor, b_ones: torch.Tensor) -> torch.Tensor:
    """(n, m) Hamming distances of 0/1 rows a (n, bits) and b (m, bits), with their bit counts, as one
    product: |a| + |b| - 2 a.b (small integers: exact in fp32)."""
    return torch.addmm(b_ones[None, :], a, b.T, alpha=-2.0) + a_ones[:, None]


@fused
def chunk_distances(rows: torch.Tensor, bits: torch.Tensor, ones: torch.Tensor, newest: torch.Tensor, lowest: int,
                    earlier: torch.Tensor, threshold: float):
    """Everything of a chunk's assignment before the walk. For each token (0/1 ``rows``): the distance to
    the nearest open cluster (newest member at or after ``lowest``; ``_FAR`` if none) and, among the
    nearest, the highest id; the distances between the chunk's tokens; ``close[t, f]``: f earlier than t
    and within the threshold; whether t may found a cluster (no open cluster within the threshold)."""
    row_ones = rows.sum(1)
    d = hamming_rows(rows, row_ones, bits, ones)
    d = torch.where((newest >= lowest)[None, :], d, _FAR)
    old_min = d.min(1).values
    ids = torch.arange(bits.shape[0], device=rows.device)
    old_arg = torch.where(d == old_min[:, None], ids, -1).max(1).values
    d_in = hamming_rows(rows, row_ones, rows, row_ones)
    return old_min, old_arg, d_in, (d_in < threshold) & earlier, old_min >= threshold


@fused
def assign_and_write(d_in: torch.Tensor, close: torch.Tensor, founder: torch.Tensor, old_min: torch.Tensor,
                     old_arg: torch.Tensor, size: torch.Tensor, threshold: float, rows: torch.Tensor,
                     keys: torch.Tensor, position: int, bits: torch.Tensor, ones: torch.Tensor, sums: torch.Tensor,
                     counts: torch.Tensor, newest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's cluster given the founders (the nearest earlier founder, ties to the most recent; an old
    cluster only when strictly closer), then the table writes: founders' bits in their new slots (the
    others' into the spare last slot), key sums, counts, newest positions. Returns (clusters, new size)."""
    tokens = rows.shape[0]
    arange_t = torch.arange(tokens, device=rows.device)
    d_f = torch.where(close & founder[None, :], d_in, _FAR)
    f_min = d_f.min(1).values
    f_arg = torch.where((d_f == f_min[:, None]) & (d_f < _FAR), arange_t, -1).max(1).values
    new_id = size + founder.cumsum(0) - 1
    join_old = old_min < torch.clamp(f_min, max=threshold)
    cluster = torch.where(join_old, old_arg, torch.where(founder, new_id, new_id[f_arg.clamp(min=0)]))
    slot = torch.where(founder, new_id, bits.shape[0] - 1)
    bits.index_copy_(0, slot, rows)
    ones.index_copy_(0, slot, rows.sum(1))
    sums.index_add_(1, cluster, keys)
    counts.index_add_(0, cluster, torch.ones_like(cluster))
    newest.scatter_reduce_(0, cluster, position + arange_t, "amax")
    return cluster, size + founder.sum()


class DeviceClusterTable:
    """Clusters of one layer on ``device``: see the module docstring."""

    def __init__(self, num_kv_heads: int, head_dim: int, threshold: int = DEFAULT_HAMMING_THRESHOLD,
                 device: torch.device | str = "cpu", window: int | None = None, bits: int = 64) -> None:
        if threshold < 0:
            raise ValueError(f"Hamming threshold must be >= 0, got {threshold}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.num_kv_heads, self.head_dim, self.threshold, self.window = num_kv_heads, head_dim, threshold, window
        self.bits = bits
        self.device = torch.device(device)
        self.bound = 0  # host-side upper bound of the number of clusters
        self.scan: int | None = None  # slots a graph-captured step scans (``prepare``); None: the bound
        self.size = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0  # stream positions seen (the chunk's first position is the caller's)
        # The one-launch assignment (``kernels.cluster_assign``, opt-in) keeps packed hashes; the PyTorch
        # path keeps 0/1 bit rows, with one spare row past the capacity for the writes of tokens that found
        # nothing (``assign_and_write``).
        self.fused = cluster_assign.enabled() and cluster_assign.available(self.device)
        self._hashes = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._bits = torch.zeros(1, bits, dtype=torch.float32, device=self.device)
        self._ones = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._sums = torch.zeros(num_kv_heads, 1, head_dim, dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._newest = torch.full((1,), _GONE, dtype=torch.int64, device=self.device)
        self._size_copy: tuple | None = None  # (event, pinned size, bound when copied) in flight
        self._earlier: dict[int, torch.Tensor] = {}  # per chunk length: (T, T) strictly-lower-triangular mask

    # -- views over the first ``slots`` slots ----------------------------------------------------------------
    @property
    def slots(self) -> int:
        """The slots selections score: the bound, or the padded count fixed by ``prepare``."""
        return self.bound if self.scan is None else self.scan

    @property
    def valid(self) -> torch.Tensor:
        """(slots,) bool: the slots that hold clusters."""
        return self._counts[: self.slots] > 0

    @property
    def hashes(self) -> torch.Tensor:
        """(bound,) int64 founder hashes (0 in empty slots)."""
        return self._hashes[: self.slots] if self.fused else pack_bits(self._bits[: self.slots])

    @property
    def representatives(self) -> torch.Tensor:
        """(num_kv_heads, bound, head_dim) fp32 mean post-RoPE key of each slot (0 in empty slots)."""
        counts = self._counts[: self.slots].clamp(min=1).to(torch.float32)
        return self._sums[:, : self.slots] / counts[None, :, None]

    @property
    def sums(self) -> torch.Tensor:
        """(num_kv_heads, slots, head_dim) fp32 key sums."""
        return self._sums[:, : self.slots]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[: self.slots]

    def is_open(self, position: int | None = None) -> torch.Tensor:
        """(bound,) bool: not closed, not empty, and (with a window) with a member among the last ``window``
        positions before ``position`` (default: the positions seen)."""
        position = self.seen if position is None else position
        lowest = _GONE // 2 if self.window is None else position - self.window
        return self._newest[: self.slots] >= lowest

    # -- updates -------------------------------------------------------------------------------------------
    def assign(self, keys: torch.Tensor, hashes: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Cluster one chunk in order; return its tokens' cluster ids (tokens,) int64 on the device.

        keys: (num_kv_heads, tokens, head_dim) post-RoPE; hashes: (tokens,) int64 from ``hash_bits``;
        ``position``: the stream position of the chunk's first token (default: the positions seen so far)."""
        if not self.fused:
            return self.assign_bits(keys, unpack_bits(hashes.to(self.device), self.bits), position)
        tokens = hashes.shape[0]
        if keys.shape != (self.num_kv_heads, tokens, self.head_dim):
            raise ValueError(f"keys must be ({self.num_kv_heads}, {tokens}, {self.head_dim}), got {tuple(keys.shape)}")
        position = self.seen if position is None else position
        self._tighten_bound()
        lowest = _GONE // 2 if self.window is None else position - self.window
        self._grow(self.bound + tokens + 1)
        cluster = torch.zeros(0, dtype=torch.int64, device=self.device)
        if tokens:
            cluster, self.size = cluster_assign.assign_chunk(
                hashes.to(self.device), keys.to(self.device), position, lowest, self.threshold, self.bound,
                self.size, self._hashes, self._counts, self._newest, self._sums)
        self.bound += tokens
        self.seen = max(self.seen, position + tokens)
        return cluster

    def assign_bits(self, keys: torch.Tensor, rows: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """``assign`` with the hashes as (tokens, bits) fp32 0/1 rows (what ``DeviceReSVIndex`` computes)."""
        tokens = rows.shape[0]
        if keys.shape != (self.num_kv_heads, tokens, self.head_dim):
            raise ValueError(f"keys must be ({self.num_kv_heads}, {tokens}, {self.head_dim}), got {tuple(keys.shape)}")
        if rows.shape[1] != self.bits:
            raise ValueError(f"hash rows must have {self.bits} bits, got {rows.shape[1]}")
        position = self.seen if position is None else position
        self._tighten_bound()
        lowest = _GONE // 2 if self.window is None else position - self.window
        # An empty table scores one empty slot: the spare, never open.
        slots = max(self.bound, 1)
        old_min, old_arg, d_in, close, can_found = chunk_distances(
            rows, self._bits[:slots], self._ones[:slots], self._newest[:slots], lowest, self._earlier_mask(tokens),
            float(self.threshold))
        founder = founders(close, can_found)
        self._grow(self.bound + tokens + 1)
        cluster = torch.zeros(0, dtype=torch.int64, device=self.device)
        if tokens:
            cluster, self.size = assign_and_write(
                d_in, close, founder, old_min, old_arg, self.size, float(self.threshold), rows,
                keys.to(self.device, torch.float32), position, self._bits, self._ones, self._sums, self._counts,
                self._newest)
        self.bound += tokens
        self.seen = max(self.seen, position + tokens)
        return cluster

    # -- graph-captured steps ------------------------------------------------------------------------------
    def prepare(self, tokens: int, bucket: int) -> None:
        """Before a step whose assignment runs ``assign_at`` (host only): tighten the bound, fix the slots
        scanned to the bound plus ``tokens`` rounded up to ``bucket``, and make room (the spare slot past
        them)."""
        self._tighten_bound()
        self.scan = -(-max(self.bound + tokens, 1) // bucket) * bucket
        self._grow(self.scan + 1)

    def assign_at(self, keys: torch.Tensor, codes: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``assign`` (``codes``: packed hashes, with the assignment kernel) or ``assign_bits`` (``codes``: 0/1
        rows) at the stream position held by the device scalar ``position``, over the slots fixed by
        ``prepare``, changing nothing on the host (the size is written in place)."""
        tokens = codes.shape[0]
        if self.scan is None or self.scan < self.bound + tokens:
            raise RuntimeError("DeviceClusterTable.assign_at without prepare")
        if self.fused:
            cluster, size = cluster_assign.assign_chunk(
                codes, keys.to(self.device), position.reshape(1), _GONE // 2, self.threshold, self.scan, self.size,
                self._hashes, self._counts, self._newest, self._sums, self.window)
            self.size.copy_(size)
            return cluster
        rows = codes
        lowest = position - self.window if self.window is not None else _GONE // 2
        old_min, old_arg, d_in, close, can_found = chunk_distances(
            rows, self._bits[: self.scan], self._ones[: self.scan], self._newest[: self.scan], lowest,
            self._earlier_mask(tokens), float(self.threshold))
        founder = founders(close, can_found)
        cluster, size = assign_and_write(
            d_in, close, founder, old_min, old_arg, self.size, float(self.threshold), rows,
            keys.to(self.device, torch.float32), position, self._bits, self._ones, self._sums, self._counts,
            self._newest)
        self.size.copy_(size)
        return cluster

    def finish(self, tokens: int) -> None:
        """After a prepared step that clustered ``tokens`` tokens with ``assign_at``: move the bound and the
        positions on; selections score the bound again until the next ``prepare``."""
        self.bound += tokens
        self.seen += tokens
        self.scan = None

    def _earlier_mask(self, tokens: int) -> torch.Tensor:
        if tokens not in self._earlier:
            self._earlier[tokens] = torch.ones(tokens, tokens, dtype=torch.bool, device=self.device).tril(-1)
        return self._earlier[tokens]

    def _grow(self, need: int) -> None:
        """Slots for ``need`` clusters, the last one spare: it takes the writes of tokens that found nothing."""
        if self.fused:
            self._hashes = _grown(self._hashes, need)
        else:
            self._bits = _grown(self._bits, need)
            self._ones = _grown(self._ones, need)
        self._sums = _grown(self._sums, need, dim=1)
        self._counts = _grown(self._counts, need)
        self._newest = _grown(self._newest, need, fill=_GONE)

    def _tighten_bound(self) -> None:
        """Lower the bound to a size copied earlier plus what was assigned since (see the module docstring)."""
        if self.device.type != "cuda":
            self.bound = int(self.size)
            return
        if self._size_copy is not None and self._size_copy[0].query():
            _, size, bound_then = self._size_copy
            # the size then, plus at most one new cluster per token assigned since
            self.bound = min(self.bound, int(size) + self.bound - bound_then)
            self._size_copy = None
        if self._size_copy is None:
            size = torch.empty((), dtype=torch.int64, pin_memory=True)
            size.copy_(self.size, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._size_copy = (event, size, self.bound)

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` stream positions that were not clustered (text), so the window moves on."""
        self.seen += tokens

    def close(self, ids: torch.Tensor | list[int]) -> None:
        """Mark clusters closed (they accept no new tokens); ``ids`` may live on any device."""
        ids = torch.as_tensor(ids, dtype=torch.int64).to(self.device)
        if ids.numel():
            self._newest[ids] = _GONE

    def sync_bound(self) -> int:
        """Read the true size (one host read) and make it the bound; returns it. A size copy still in flight
        is dropped: it was taken against the old bound, which no longer bounds what was assigned since."""
        self.bound = int(self.size)
        self._size_copy = None
        return self.bound

    def nbytes(self, num_tokens: int, key_bytes: int = 2) -> torch.Tensor:
        """HC-table bytes as ``HashClusterTable.nbytes`` counts them, as a device scalar (no host read)."""
        per_cluster = self.num_kv_heads * self.head_dim * key_bytes + 4 + 4
        return self.size * per_cluster + 4 * num_tokens
