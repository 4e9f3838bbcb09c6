"""The hash-cluster (HC) table and online leader clustering of keys (ReSV step 2, V-Rex §IV-B, Fig. 8).

Each new token is compared, by the Hamming distance of its hash bits, with the *open* clusters (those
that still live in the device-resident recent window) and with the clusters founded earlier in the same
chunk; it joins the nearest one when the distance is below ``threshold`` (7 of 32 bits in the paper),
else it founds a new cluster. ``threshold=0`` clusters nothing (every token its own cluster: the paper's
"ReSV without clustering" of Fig. 19). Ties go to the most recently founded cluster. A cluster keeps its
founder's hash (leader clustering, the digest's A4: the HCU only XORs and counts, it never re-hashes);
its representative key is the running mean of its members' post-RoPE keys, per KV head. Closed
clusters (offloaded to host or disk) are still scored but accept no new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lfmsift.kv.hashing import hamming

DEFAULT_HAMMING_THRESHOLD = 7
_BITS64 = (1 << 64) - 1


def _grow(t: torch.Tensor, needed: int, dim: int = 0, fill: float = 0) -> torch.Tensor:
    """Return ``t`` enlarged along ``dim`` (capacity doubling) so that it holds at least ``needed`` rows;
    new rows hold ``fill``."""
    if t.shape[dim] >= needed:
        return t
    shape = list(t.shape)
    shape[dim] = max(needed, 2 * shape[dim], 16)
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


@dataclass
class HashClusterTable:
    """Clusters of one layer: founder hash, per-KV-head mean key, token count, open flag.

    Member token lists live in the KV store (each stored token records its cluster), so the table holds
    exactly what the paper's HC table holds apart from the members.
    """

    num_kv_heads: int
    head_dim: int
    threshold: int = DEFAULT_HAMMING_THRESHOLD
    device: torch.device | str = "cpu"
    size: int = 0
    _hashes: torch.Tensor = field(init=False, repr=False)
    _reps: torch.Tensor = field(init=False, repr=False)
    _counts: torch.Tensor = field(init=False, repr=False)
    _open: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.threshold:
            raise ValueError(f"Hamming threshold must be >= 0, got {self.threshold}")
        self._hashes = torch.zeros(0, dtype=torch.int64)
        self._reps = torch.zeros(self.num_kv_heads, 0, self.head_dim, dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._open = torch.zeros(0, dtype=torch.bool)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def hashes(self) -> torch.Tensor:
        return self._hashes[: self.size]

    @property
    def representatives(self) -> torch.Tensor:
        """(num_kv_heads, clusters, head_dim) mean post-RoPE key of each cluster, fp32."""
        return self._reps[:, : self.size]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[: self.size]

    @property
    def is_open(self) -> torch.Tensor:
        return self._open[: self.size]

    # -- updates -----------------------------------------------------------------------------------------
    def assign(self, keys: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
        """Cluster the tokens of one chunk in order; return their cluster ids (tokens,) int64.

        keys: (num_kv_heads, tokens, head_dim) post-RoPE keys; hashes: (tokens,) from ``hash_bits``.
        """
        tokens = hashes.shape[0]
        if keys.shape != (self.num_kv_heads, tokens, self.head_dim):
            raise ValueError(f"keys must be ({self.num_kv_heads}, {tokens}, {self.head_dim}), got {tuple(keys.shape)}")
        hashes = hashes.cpu()
        open_ids = self.is_open.nonzero().flatten()
        # Distances to the clusters that were open before this chunk, all tokens at once.
        old = hamming(hashes[:, None], self._hashes[open_ids][None, :]) if open_ids.numel() else None
        old_ids = open_ids.tolist()
        founded: list[tuple[int, int]] = []  # (cluster id, founder hash) founded in this chunk, in order
        assigned = []
        next_id = self.size
        for t, h in enumerate(hashes.tolist()):
            best_id, best_d = -1, self.threshold
            # Most recent first so that ties keep the most recently founded cluster.
            for cid, ch in reversed(founded):
                d = ((h ^ ch) & _BITS64).bit_count()  # hashes are 64-bit patterns (may be negative)
                if d < best_d:
                    best_id, best_d = cid, d
            if old is not None:
                row = old[t]
                d_min = int(row.min())
                if d_min < best_d:
                    best_d = d_min
                    best_id = old_ids[int((row == d_min).nonzero().max())]
            if best_id < 0:
                best_id = next_id
                next_id += 1
                founded.append((best_id, h))
            assigned.append(best_id)
        ids = torch.tensor(assigned, dtype=torch.int64)
        self._add(ids, keys, founded, next_id)
        return ids

    def _add(self, ids: torch.Tensor, keys: torch.Tensor, founded: list[tuple[int, int]], new_size: int) -> None:
        self._hashes = _grow(self._hashes, new_size)
        self._reps = _grow(self._reps, new_size, dim=1)
        self._counts = _grow(self._counts, new_size)
        self._open = _grow(self._open, new_size)
        for cid, h in founded:
            self._hashes[cid] = h
            self._open[cid] = True
        dev_ids = ids.to(self._reps.device)
        old_n = self._counts[:new_size].clone()
        sums = torch.zeros(self.num_kv_heads, new_size, self.head_dim, dtype=torch.float32, device=self._reps.device)
        sums.index_add_(1, dev_ids, keys.to(self._reps.device, torch.float32))
        self._counts[:new_size].index_add_(0, dev_ids, torch.ones_like(dev_ids))
        touched = torch.unique(dev_ids)
        n_new = self._counts[touched].to(torch.float32)
        self._reps[:, touched] = (self._reps[:, touched] * old_n[touched].to(torch.float32)[None, :, None]
                                  + sums[:, touched]) / n_new[None, :, None]
        self.size = new_size

    def close(self, ids: torch.Tensor | list[int]) -> None:
        """Mark clusters closed: they were offloaded out of the recent window and accept no new tokens."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.numel():
            self._open[ids] = False

    # -- accounting --------------------------------------------------------------------------------------
    def nbytes(self, num_tokens: int, key_bytes: int = 2) -> int:
        """HC-table bytes as the paper counts them: per cluster a mean key of all KV heads (``key_bytes``
        per value, bf16 by default), a 4-byte hash and a 4-byte count; per member token a 4-byte index."""
        per_cluster = self.num_kv_heads * self.head_dim * key_bytes + 4 + 4
        return self.size * per_cluster + 4 * num_tokens
