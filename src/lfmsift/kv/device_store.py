"""The KV store of the GPU streaming path: a device ring of recent positions over a pinned host tier.

Per full-attention layer, every stream position p is written twice when it arrives: into a device ring of
``window`` slots (slot p % window) and into a host tier (slot p) in pinned memory, by one kernel that
stores into both (``kernels.kv_append``: a strided copy into pinned memory would stage through pageable
memory and hold the host). Positions older than the last ``window`` are read from the host tier only, in place over
the link (``kernels.kv_gather.gather_positions``), so a selection never stages through pageable memory and
no copy call is issued per run. Every slot is known from the position alone: nothing is planned on the
host from device data, so appending and reading never wait for the device.

Layout of both tiers: (2, num_kv_heads, slots, head_dim), K and V planes, each head's slots contiguous. The
host tier is in arrival order, not cluster order: the clusters a selection takes are known only on the
device, and the gather reads scattered tokens at close to the link's rate (``benchmarks/kv_gather.py``).

Streams of a batch advance in lockstep (same chunk lengths): their KV heads are stacked as the store's heads
(stream b's at ``[b * kv, (b + 1) * kv)``), so one gather serves them all; each stream keeps its own cluster
ids (``groups``: (streams, positions)).

Budgets (``TierBudget``, split equally across layers, shared by a batch's streams): ``device_bytes`` sets the ring (``None``: every
position stays on the device, the ring grows and nothing is offloaded), ``host_bytes`` caps the host tier.
The host tier grows by doubling in ``reserve``, called once per chunk before the forward pass (a growth
waits for the copies in flight into the old buffer; it happens O(log n) times). There is no disk tier on
this path: a ``disk_bytes`` budget is refused with a pointer to the reference store.
"""

from __future__ import annotations

import torch

from lfmsift.kernels.kv_append import append_positions
from lfmsift.kv.store import KVBudgetError, TierBudget


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="cpu" if pinned else device, pin_memory=pinned)


class RingLayerStore:
    """K/V and cluster ids of one layer's stream positions (see the module docstring)."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 window: int | None, host_tokens: int | None, streams: int = 1) -> None:
        if window is not None and window < 1:
            raise KVBudgetError(f"the device budget holds {window} tokens per layer; raise device_bytes")
        self.num_kv_heads, self.head_dim, self.dtype, self.streams = num_kv_heads, head_dim, dtype, streams
        self.device = torch.device(device)
        self.window, self.host_cap = window, host_tokens
        self.token_bytes = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.pinned = self.device.type == "cuda"
        self.tokens = 0
        self.ring = _zeros((2, num_kv_heads, window or 64, head_dim), dtype, self.device)
        self.host = self.ring if window is None else _zeros((2, num_kv_heads, 64, head_dim), dtype, self.device,
                                                            pinned=self.pinned)
        self.groups = torch.full((streams, 64), -1, dtype=torch.int64, device=self.device)

    # -- occupancy -------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.tokens

    @property
    def split(self) -> int:
        """Positions below this are offloaded (read from the host tier); the rest are in the ring."""
        return 0 if self.window is None else max(0, self.tokens - self.window)

    def bytes_in(self) -> dict[str, int]:
        on_device = self.tokens if self.window is None else min(self.tokens, self.window)
        return {"device": on_device * self.token_bytes, "host": self.split * self.token_bytes}

    def check_room(self, incoming: int) -> None:
        """Raise ``KVBudgetError`` unless ``incoming`` more tokens fit (nothing changes either way)."""
        if self.window is not None and incoming > self.window:
            raise KVBudgetError(
                f"a chunk of {incoming} tokens needs {incoming * self.token_bytes} bytes per layer on the device, "
                f"above the device budget of {self.window * self.token_bytes} bytes per layer; raise device_bytes")
        if self.host_cap is not None and self.window is not None \
                and self.tokens + incoming - self.window > self.host_cap:
            raise KVBudgetError(
                f"the stream is about to exceed its host budget ({self.host_cap * self.token_bytes} bytes per "
                f"layer, {self.split * self.token_bytes} used); raise host_bytes or start a new session")

    def reserve(self, incoming: int, slots: int = 0) -> None:
        """Make room for ``incoming`` more positions (checked first; growth by doubling), and for at least
        ``slots`` cluster ids (the padded past a graph-captured step reads)."""
        self.check_room(incoming)
        need = max(self.tokens + incoming, slots)
        if need > self.groups.shape[1]:
            grown = torch.full((self.streams, max(need, 2 * self.groups.shape[1])), -1, dtype=torch.int64,
                               device=self.device)
            grown[:, : self.tokens] = self.groups[:, : self.tokens]
            self.groups = grown
        if self.window is None:
            if need > self.ring.shape[2]:
                self.ring = self._grown(self.ring, need, pinned=False)
                self.host = self.ring
        elif need > self.host.shape[2]:
            if self.pinned:
                torch.cuda.current_stream(self.device).synchronize()  # copies in flight target the old buffer
            self.host = self._grown(self.host, need, pinned=self.pinned)

    def _grown(self, t: torch.Tensor, need: int, pinned: bool) -> torch.Tensor:
        out = _zeros((2, self.num_kv_heads, max(need, 2 * t.shape[2]), self.head_dim), self.dtype, t.device,
                     pinned=pinned)
        out[:, :, : self.tokens].copy_(t[:, :, : self.tokens])
        return out

    # -- writes ----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, groups: torch.Tensor) -> None:
        """Store one chunk: keys/values (num_kv_heads, tokens, head_dim), groups (streams, tokens) (or
        (tokens,) for one stream) cluster ids (-1 or below for text). ``reserve`` must have made room."""
        self.append_kv(torch.stack([keys, values]), groups)

    def append_kv(self, kv: torch.Tensor, groups: torch.Tensor) -> None:
        """``append`` with K and V already stacked: (2, num_kv_heads, tokens, head_dim)."""
        n = kv.shape[2]
        start = self.tokens
        if start + n > self.groups.shape[1] or (self.window is None and start + n > self.ring.shape[2]):
            raise RuntimeError("RingLayerStore.append without reserve")
        kv = kv.to(self.dtype)
        self.groups[:, start : start + n] = groups.reshape(self.streams, n)
        if self.window is None:
            self.ring[:, :, start : start + n] = kv
        else:  # ring slot p % window and host slot p, in one launch on CUDA (no staging, no wait)
            append_positions(kv, self.ring, self.host, start)
        self.tokens += n

    def append_at(self, kv: torch.Tensor, groups: torch.Tensor, start: torch.Tensor) -> None:
        """``append_kv`` at the stream position held by the device scalar ``start`` (which must equal
        ``tokens``), changing nothing on the host: a step captured in a CUDA graph writes this way, and
        ``advance`` counts the tokens afterwards. ``reserve`` must have made room."""
        n = kv.shape[2]
        kv = kv.to(self.dtype)
        positions = start.reshape(1) + torch.arange(n, device=self.device)
        self.groups.index_copy_(1, positions, groups.reshape(self.streams, n))
        append_positions(kv, self.ring, self.ring if self.window is None else self.host, start.reshape(1))

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` positions written by ``append_at``."""
        self.tokens += tokens


class RingKVStore:
    """One ``RingLayerStore`` per full-attention layer, sharing a ``TierBudget``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, budget: TierBudget | None = None, streams: int = 1) -> None:
        budget = budget or TierBudget()
        if budget.disk_bytes is not None or budget.disk_dir is not None:
            raise ValueError("the device streaming path keeps offloaded KV in pinned host memory and has no disk "
                             "tier; drop disk_bytes / disk_dir or use the reference path (path='reference')")
        self.budget = budget
        token_bytes = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

        def per_layer(total: int | None) -> int | None:
            return None if total is None else total // max(num_layers, 1) // token_bytes

        self.layers = [RingLayerStore(num_kv_heads, head_dim, dtype, device, per_layer(budget.device_bytes),
                                      per_layer(budget.host_bytes), streams) for _ in range(num_layers)]

    def __getitem__(self, layer: int) -> RingLayerStore:
        return self.layers[layer]

    def reserve(self, incoming: int, slots: int = 0) -> None:
        for store in self.layers:  # check every layer before growing any
            store.check_room(incoming)
        for store in self.layers:
            store.reserve(incoming, slots)

    def close(self) -> None:
        """Release the tiers (pinned host memory included)."""
        for store in self.layers:
            store.ring = store.host = store.groups = None

    def stats(self) -> dict:
        """Bytes per tier now and at their peak (the tiers only grow, so the peak is the present), bytes
        written to the host tier; what was fetched is counted on the device by the cache."""
        held = [s.bytes_in() for s in self.layers]
        now = {tier: sum(h[tier] for h in held) for tier in ("device", "host")} | {"disk": 0}
        written = sum(s.tokens * s.token_bytes for s in self.layers if s.window is not None)
        return {
            "budget_bytes": {"device": self.budget.device_bytes, "host": self.budget.host_bytes, "disk": None},
            "bytes": now,
            "peak_bytes": dict(now),
            "moved_bytes": {"fetched_host": 0, "fetched_disk": 0, "offloaded_host": written, "spilled_disk": 0},
            "runs_fetched": {"host": None, "disk": None},  # runs are not counted on the device path
        }
