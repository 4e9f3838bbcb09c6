"""The HC table on the compute device: leader clustering of a chunk with no host synchronisation.

The same rules as ``HashClusterTable`` (its docstring), a second implementation for the GPU path:

- the table (founder hashes, per-KV-head mean keys, counts, newest member) lives in device tensors grown by
  doubling; its true size is a device scalar, and the host keeps only an upper bound (the previous bound plus
  the chunk's tokens), so growing and slicing never read the device;
- distances of all the chunk's tokens to the old open clusters are one XOR + popcount over (tokens x bound),
  the invalid and closed slots masked; ties go to the highest id, as in the reference;
- the in-chunk walk (which tokens found a cluster) is ``kernels.cluster_walk.founders``; given the founders,
  each token's cluster, the new hashes, the counts and the running means are vectorized;
- a cluster is *open* while it has not been closed by ``close`` and, with a ``window``, while its newest
  member is among the last ``window`` stream positions (the recent KV cache kept on the device: the paper
  clusters "within the recent KV cache").

The bound is tightened without waiting: on CUDA each ``assign`` starts an asynchronous copy of the size
into pinned memory and, once a later call finds that copy complete (an event query, not a wait), the
bound becomes the copied size plus the tokens assigned since, so the slots WiCSum scores track the real
table a chunk or two behind. On the CPU the size is read directly. ``sync_bound()`` reads it now.
"""

from __future__ import annotations

import torch

from lfmsift.kernels.cluster_walk import founders
from lfmsift.kv.clusters import DEFAULT_HAMMING_THRESHOLD
from lfmsift.kv.hashing import hamming

_FAR = 1 << 30  # a distance no threshold reaches


def _grown(t: torch.Tensor, needed: int, dim: int = 0) -> torch.Tensor:
    """``t`` with at least ``needed`` entries along ``dim`` (capacity doubling, zero-filled)."""
    if t.shape[dim] >= needed:
        return t
    shape = list(t.shape)
    shape[dim] = max(needed, 2 * shape[dim], 64)
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class DeviceClusterTable:
    """Clusters of one layer on ``device``: see the module docstring."""

    def __init__(self, num_kv_heads: int, head_dim: int, threshold: int = DEFAULT_HAMMING_THRESHOLD,
                 device: torch.device | str = "cpu", window: int | None = None) -> None:
        if threshold < 0:
            raise ValueError(f"Hamming threshold must be >= 0, got {threshold}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.num_kv_heads, self.head_dim, self.threshold, self.window = num_kv_heads, head_dim, threshold, window
        self.device = torch.device(device)
        self.bound = 0  # host-side upper bound of the number of clusters
        self.size = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0  # stream positions seen (the chunk's first position is the caller's)
        self._hashes = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._means = torch.zeros(num_kv_heads, 0, head_dim, dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._newest = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._closed = torch.zeros(0, dtype=torch.bool, device=self.device)
        self._size_copy: tuple | None = None  # (event, pinned size, bound when copied) in flight

    # -- views over the first ``bound`` slots ----------------------------------------------------------------
    @property
    def valid(self) -> torch.Tensor:
        """(bound,) bool: the slots that hold clusters."""
        return torch.arange(self.bound, device=self.device) < self.size

    @property
    def hashes(self) -> torch.Tensor:
        return self._hashes[: self.bound]

    @property
    def representatives(self) -> torch.Tensor:
        """(num_kv_heads, bound, head_dim) fp32 mean post-RoPE key of each slot (0 in invalid slots)."""
        return self._means[:, : self.bound]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[: self.bound]

    def is_open(self, position: int | None = None) -> torch.Tensor:
        """(bound,) bool: valid, not closed, and (with a window) with a member among the last ``window``
        positions before ``position`` (default: the positions seen)."""
        position = self.seen if position is None else position
        open_ = self.valid & ~self._closed[: self.bound]
        if self.window is not None:
            open_ &= self._newest[: self.bound] >= position - self.window
        return open_

    # -- updates -------------------------------------------------------------------------------------------
    def assign(self, keys: torch.Tensor, hashes: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Cluster one chunk in order; return its tokens' cluster ids (tokens,) int64 on the device.

        keys: (num_kv_heads, tokens, head_dim) post-RoPE; hashes: (tokens,) int64 from ``hash_bits``;
        ``position``: the stream position of the chunk's first token (default: the positions seen so far;
        text chunks that are not clustered still advance it through ``advance``)."""
        tokens = hashes.shape[0]
        if keys.shape != (self.num_kv_heads, tokens, self.head_dim):
            raise ValueError(f"keys must be ({self.num_kv_heads}, {tokens}, {self.head_dim}), got {tuple(keys.shape)}")
        position = self.seen if position is None else position
        self._tighten_bound()
        hashes = hashes.to(self.device)
        arange_t = torch.arange(tokens, device=self.device)
        # Old open clusters: nearest distance and, among ties, the highest id.
        if self.bound:
            d_old = hamming(hashes[:, None], self.hashes[None, :])
            d_old = torch.where(self.is_open(position)[None, :], d_old, _FAR)
            old_min = d_old.min(1).values
            ids = torch.arange(self.bound, device=self.device)
            old_arg = torch.where(d_old == old_min[:, None], ids, -1).max(1).values
        else:
            old_min = torch.full((tokens,), _FAR, dtype=torch.int64, device=self.device)
            old_arg = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        d_in = hamming(hashes[:, None], hashes[None, :])
        close = (d_in < self.threshold) & (arange_t[None, :] < arange_t[:, None])
        founder = founders(close, old_min >= self.threshold)
        # Nearest earlier founder (ties: the most recent) and each token's cluster.
        d_f = torch.where(close & founder[None, :], d_in, _FAR)
        f_min = d_f.min(1).values if tokens else d_f.new_zeros(0)
        f_arg = torch.where((d_f == f_min[:, None]) & (d_f < _FAR), arange_t, -1).max(1).values if tokens \
            else f_min
        new_id = self.size + founder.cumsum(0) - 1
        join_old = old_min < torch.clamp(f_min, max=self.threshold)
        cluster = torch.where(join_old, old_arg, torch.where(founder, new_id, new_id[f_arg.clamp(min=0)]))
        self._update(cluster, keys, hashes, founder, position + arange_t, tokens)
        self.seen = max(self.seen, position + tokens)
        return cluster

    def _update(self, cluster: torch.Tensor, keys: torch.Tensor, hashes: torch.Tensor, founder: torch.Tensor,
                positions: torch.Tensor, tokens: int) -> None:
        """Write the chunk's clusters: founders' hashes, counts, running means (the reference's arithmetic:
        ``(mean * n_old + chunk_sum) / n_new``) and newest positions; grow the slots first."""
        need = self.bound + tokens
        self._hashes = _grown(self._hashes, need)
        self._means = _grown(self._means, need, dim=1)
        self._counts = _grown(self._counts, need)
        self._newest = _grown(self._newest, need)
        self._closed = _grown(self._closed, need)
        if tokens == 0:
            return
        first = (cluster[:, None] == cluster[None, :]).to(torch.int8).argmax(1)  # first member in the chunk
        chunk_sum = torch.zeros(self.num_kv_heads, tokens, self.head_dim, dtype=torch.float32, device=self.device)
        chunk_sum.index_add_(1, first, keys.to(self.device, torch.float32))
        chunk_n = torch.zeros(tokens, dtype=torch.int64, device=self.device).index_add_(
            0, first, torch.ones_like(first))
        old_n = self._counts[cluster]
        n_new = old_n + chunk_n[first]
        means = (self._means[:, cluster] * old_n.to(torch.float32)[None, :, None] + chunk_sum[:, first]) \
            / n_new.to(torch.float32)[None, :, None]
        self._means[:, cluster] = means  # members of one cluster write the same value
        self._counts[cluster] = n_new
        is_new = cluster >= self.size
        self._hashes[cluster] = torch.where(is_new, hashes[first], self._hashes[cluster])
        self._newest.scatter_reduce_(0, cluster, positions, "amax")
        self.size = self.size + founder.sum()
        self.bound = need

    def _tighten_bound(self) -> None:
        """Lower the bound to a size copied earlier plus what was assigned since (see the module docstring)."""
        if self.device.type != "cuda":
            self.bound = int(self.size)
            return
        if self._size_copy is not None and self._size_copy[0].query():
            _, size, bound_then = self._size_copy
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
            self._closed[ids] = True

    def sync_bound(self) -> int:
        """Read the true size (one host read) and make it the bound; returns it."""
        self.bound = int(self.size)
        return self.bound

    def nbytes(self, num_tokens: int, key_bytes: int = 2) -> torch.Tensor:
        """HC-table bytes as ``HashClusterTable.nbytes`` counts them, as a device scalar (no host read)."""
        per_cluster = self.num_kv_heads * self.head_dim * key_bytes + 4 + 4
        return self.size * per_cluster + 4 * num_tokens
