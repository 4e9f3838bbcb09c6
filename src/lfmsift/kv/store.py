"""A tiered KV store: recent tokens on the compute device, the rest in host memory and, past a byte
budget, on disk (memory-mapped), stored group-contiguous (V-Rex §V-C, Fig. 12).

Tokens arrive in *groups* chosen by the retriever (ReSV: hash clusters; per-frame blocks or pages for
other retrievers; text segments). A group stays on the device while it is *open*; when the device
budget is exceeded the least recently used open groups are closed and each is written to the host tier
as one contiguous run, so fetching a selected cluster later moves one run instead of scattered tokens.
The host tier is a ring buffer: when it is full its oldest runs spill, still contiguous, to an
append-only memory-mapped file. Budgets are bytes; every write is planned first and raises
``KVBudgetError`` before anything changes when it cannot fit, so nothing is lost.

Layout of every tier: (2, num_kv_heads, slots, head_dim) — K and V planes, each head's run contiguous.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEVICE, HOST, DISK = 0, 1, 2
TIER_NAMES = ("device", "host", "disk")


class KVBudgetError(RuntimeError):
    """The KV cache does not fit the configured byte budgets."""


@dataclass(frozen=True)
class TierBudget:
    """Byte budgets of the whole store (all layers); ``None`` means unlimited.

    ``device_bytes`` bounds the recent window kept on the compute device, ``host_bytes`` the offloaded
    KV in host memory, ``disk_bytes`` the memory-mapped files under ``disk_dir`` (a temporary directory
    when not given). Each layer gets an equal share.
    """

    device_bytes: int | None = None
    host_bytes: int | None = None
    disk_bytes: int | None = None
    disk_dir: str | Path | None = None

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")


def parse_bytes(text: str | int | None) -> int | None:
    """``"512M"``, ``"2G"``, ``"64k"``, ``"1000"`` (binary units) -> bytes; ``None``/``"none"`` -> unlimited."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t in ("", "none", "inf", "unlimited"):
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = units.get(t[-1], 1)
    try:
        value = float(t[:-1] if t[-1] in units else t)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a byte size (e.g. 512M, 2G, none)") from None
    if value < 0:
        raise ValueError(f"byte size must be >= 0, got {text!r}")
    return int(value * scale)


@dataclass(frozen=True)
class EvictionPlan:
    """What one append will do (``LayerKVStore.plan``): groups closed, tokens spilled to disk, and the
    chunk's tokens per group."""

    evict: list[int]
    spill: int
    incoming: dict[int, int]


class _Growable:
    """A 1-D int64 CPU array with amortized appends."""

    def __init__(self, dtype: torch.dtype = torch.int64) -> None:
        self.data = torch.zeros(64, dtype=dtype)
        self.size = 0

    def extend(self, values: torch.Tensor) -> None:
        need = self.size + values.numel()
        if need > self.data.numel():
            bigger = torch.zeros(max(need, 2 * self.data.numel()), dtype=self.data.dtype)
            bigger[: self.size] = self.data[: self.size]
            self.data = bigger
        self.data[self.size : need] = values.to(self.data.dtype)
        self.size = need

    @property
    def view(self) -> torch.Tensor:
        return self.data[: self.size]


def count_runs(slots: torch.Tensor) -> int:
    """Number of maximal runs of consecutive slots in a sorted 1-D tensor (one transfer each)."""
    if slots.numel() == 0:
        return 0
    return int((slots[1:] - slots[:-1] != 1).sum()) + 1


class LayerKVStore:
    """K/V of one layer across the device, host and disk tiers (capacities in tokens)."""

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        device_tokens: int | None,
        host_tokens: int | None,
        disk_tokens: int | None,
        disk_path: Path,
    ) -> None:
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.caps = (device_tokens, host_tokens, disk_tokens)
        self.disk_path = disk_path
        self.token_bytes = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        # Per token: tier, slot in that tier, group.
        self.tier, self.slot, self.group = _Growable(torch.int8), _Growable(), _Growable()
        # Device tier: dense slots in arrival order; groups with tokens here are open.
        self._dev = torch.zeros(2, num_kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        self._dev_tokens = torch.zeros(0, dtype=torch.int64)
        self._last_use: dict[int, int] = {}  # open group -> last chunk that added to it
        self._clock = 0
        # Host tier: a ring of runs (group, offset, length, token ids), oldest first.
        self._host = torch.zeros(2, num_kv_heads, 0, head_dim, dtype=dtype)
        self._host_runs: deque[tuple[int, int, int, torch.Tensor]] = deque()
        self._host_tail = 0
        self._host_used = 0
        self._disk: torch.Tensor | None = None
        self._disk_tail = 0
        self.moved = {"fetched_host": 0, "fetched_disk": 0, "offloaded_host": 0, "spilled_disk": 0}
        self.runs = {"host": 0, "disk": 0}
        self.peak = [0, 0, 0]

    # -- occupancy ---------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.tier.size

    def tokens_in(self, tier: int) -> int:
        return (self._dev_tokens.numel(), self._host_used, self._disk_tail)[tier]

    def bytes_in(self, tier: int) -> int:
        return self.tokens_in(tier) * self.token_bytes

    def open_groups(self) -> list[int]:
        return list(self._last_use)

    def check_room(self, incoming: int) -> None:
        """Raise ``KVBudgetError`` unless ``incoming`` more tokens fit even if every token now on the device
        and in host memory had to spill to disk (checked before a forward pass, so a refused chunk leaves
        the cache and the retriever's index untouched)."""
        dev_cap, host_cap, disk_cap = self.caps
        if dev_cap is not None and incoming > dev_cap:
            raise KVBudgetError(
                f"a chunk of {incoming} tokens needs {incoming * self.token_bytes} bytes per layer on the device, "
                f"above the device budget of {dev_cap * self.token_bytes} bytes per layer; raise device_bytes"
            )
        if disk_cap is not None and dev_cap is not None:
            worst = self._disk_tail + self.tokens_in(DEVICE) + self.tokens_in(HOST) + incoming - dev_cap
            if worst > disk_cap:
                raise KVBudgetError(
                    f"the stream is about to exceed its disk budget ({disk_cap * self.token_bytes} bytes per layer, "
                    f"{self._disk_tail * self.token_bytes} used); raise disk_bytes or start a new session"
                )

    # -- writes ------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, groups: torch.Tensor) -> list[int]:
        """Store one chunk (keys/values: (num_kv_heads, tokens, head_dim), groups: (tokens,)).

        Returns the groups closed (offloaded) to make room on the device, so a retriever can stop
        adding tokens to them. Raises ``KVBudgetError`` before any change when the chunk cannot fit.
        """
        n = keys.shape[1]
        groups = groups.to(torch.int64).cpu()
        plan = self.plan(groups)  # raises before any state changes
        self._clock += 1
        for g in plan.incoming:
            self._last_use[g] = self._clock
        evict = plan.evict
        first = self.num_tokens
        token_ids = torch.arange(first, first + n)
        dev_slot = self._dev_tokens.numel()
        self._dev = torch.cat([self._dev, torch.stack([keys, values]).to(self.device, self.dtype)], dim=2)
        self._dev_tokens = torch.cat([self._dev_tokens, token_ids])
        self.tier.extend(torch.full((n,), DEVICE))
        self.slot.extend(torch.arange(dev_slot, dev_slot + n))
        self.group.extend(groups)
        if evict:
            self._offload(evict)
        self._note_peaks()
        return evict

    def plan(self, groups: torch.Tensor) -> EvictionPlan:
        """What appending a chunk whose tokens belong to ``groups`` would do, without doing it: the
        groups closed (least recently used first; a group the chunk adds to counts its new tokens too,
        since they leave with it), and the tokens that would spill from the host ring to disk. Raises
        ``KVBudgetError`` when the chunk cannot fit."""
        groups = groups.to(torch.int64).cpu()
        ids, counts = torch.unique(groups, return_counts=True)
        incoming = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        evict, size = self._plan_eviction(groups.numel(), incoming)
        runs = [size.get(g, 0) + incoming.get(g, 0) for g in evict]
        spill = self._simulate_spill([r for r in runs if r])
        disk_cap = self.caps[DISK]
        if disk_cap is not None and self._disk_tail + spill > disk_cap:
            raise KVBudgetError(
                f"offloading needs {(self._disk_tail + spill) * self.token_bytes} bytes per layer on disk, above the "
                f"disk budget of {disk_cap * self.token_bytes} bytes per layer; raise disk_bytes or host_bytes"
            )
        return EvictionPlan(evict, spill, incoming)

    def touch(self, groups: torch.Tensor | list[int]) -> None:
        """Mark open ``groups`` as used now (a selection read them), so least-recently-used eviction keeps
        the groups the retriever keeps choosing; closed or unknown groups are ignored."""
        self._clock += 1
        for g in torch.as_tensor(groups, dtype=torch.int64).unique().tolist():
            if g in self._last_use:
                self._last_use[g] = self._clock

    def _device_group_sizes(self) -> dict[int, int]:
        """Tokens each open group holds on the device."""
        ids, counts = torch.unique(self.group.view[self._dev_tokens], return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))

    def _plan_eviction(self, incoming: int, arriving: dict[int, int]) -> tuple[list[int], dict[int, int]]:
        """Least recently used open groups to close so that the device holds ``incoming`` more tokens
        (``arriving``: tokens of the chunk per group; those of a closed group leave with it), and the device
        token count of each open group (computed only when something must go). The groups the chunk adds
        to count as used now."""
        cap = self.caps[DEVICE]
        if cap is None:
            return [], {}
        if incoming > cap:
            raise KVBudgetError(
                f"a chunk of {incoming} tokens needs {incoming * self.token_bytes} bytes per layer on the device, "
                f"above the device budget of {cap * self.token_bytes} bytes per layer; raise device_bytes"
            )
        over = self._dev_tokens.numel() + incoming - cap
        if over <= 0:
            return [], {}
        size = self._device_group_sizes()
        now = self._clock + 1
        last = {g: (now if g in arriving else t) for g, t in self._last_use.items()}
        evict, freed = [], 0
        for g in sorted(last, key=lambda g: (last[g], g)):
            if freed >= over:
                break
            if g in arriving and g not in size:
                continue  # a group only arriving now has nothing on the device yet
            evict.append(g)
            freed += size.get(g, 0) + arriving.get(g, 0)
        return evict, size

    def _simulate_spill(self, sizes: list[int]) -> int:
        """Tokens that writing runs of ``sizes`` to the host ring would spill to disk (no state change)."""
        cap = self.caps[HOST]
        if cap is None:
            return 0
        tail, spilled = self._host_tail, 0
        runs = deque((off, length) for _, off, length, _ in self._host_runs)
        for n in sizes:
            if n > cap:
                spilled += n
                continue
            if tail + n > cap:  # wrap: the runs left at the end are the oldest, they spill first
                while runs and runs[0][0] >= tail:
                    spilled += runs.popleft()[1]
                tail = 0
            while runs and runs[0][0] < tail + n and tail < runs[0][0] + runs[0][1]:
                spilled += runs.popleft()[1]
            runs.append((tail, n))
            tail += n
        return spilled

    def _offload(self, groups: list[int]) -> None:
        """Close ``groups``: write each as one contiguous run to the host ring (spilling its oldest runs to
        disk), then compact the device tier."""
        dev_groups = self.group.view[self._dev_tokens]
        keep = torch.ones(self._dev_tokens.numel(), dtype=torch.bool)
        for g in groups:
            self._last_use.pop(g, None)
            member = (dev_groups == g).nonzero().flatten()
            if member.numel() == 0:
                continue
            keep[member] = False
            kv = self._dev[:, :, member.to(self.device)].to("cpu")
            self._write_host(g, kv, self._dev_tokens[member])
        kept = keep.nonzero().flatten()
        self._dev = self._dev[:, :, kept.to(self.device)]
        self._dev_tokens = self._dev_tokens[kept]
        self.slot.data[self._dev_tokens] = torch.arange(self._dev_tokens.numel())

    def _write_host(self, group: int, kv: torch.Tensor, tokens: torch.Tensor) -> None:
        n, cap = tokens.numel(), self.caps[HOST]
        self.moved["offloaded_host"] += n * self.token_bytes
        if cap is not None and n > cap:
            self._write_disk(kv, tokens)
            return
        if cap is not None and self._host_tail + n > cap:
            # Wrap. The runs between the tail and the end are the oldest: they spill first, so the deque
            # stays ordered by age = by offset from the tail.
            while self._host_runs and self._host_runs[0][1] >= self._host_tail:
                self._spill_oldest()
            self._host_tail = 0
        while cap is not None and self._host_runs and self._host_runs[0][1] < self._host_tail + n \
                and self._host_tail < self._host_runs[0][1] + self._host_runs[0][2]:
            self._spill_oldest()
        end = self._host_tail + n
        if end > self._host.shape[2]:
            grown = max(end, 2 * self._host.shape[2]) if cap is None else min(cap, max(end, 2 * self._host.shape[2]))
            bigger = torch.zeros(2, self.num_kv_heads, grown, self.head_dim, dtype=self.dtype)
            bigger[:, :, : self._host.shape[2]] = self._host
            self._host = bigger.pin_memory() if self.device.type == "cuda" else bigger
        self._host[:, :, self._host_tail : end] = kv
        self.tier.data[tokens] = HOST
        self.slot.data[tokens] = torch.arange(self._host_tail, end)
        self._host_runs.append((group, self._host_tail, n, tokens))
        self._host_tail = end
        self._host_used += n

    def _spill_oldest(self) -> None:
        _, off, length, run_tokens = self._host_runs.popleft()
        self._write_disk(self._host[:, :, off : off + length].clone(), run_tokens)
        self._host_used -= length

    def _write_disk(self, kv: torch.Tensor, tokens: torch.Tensor) -> None:
        n, cap = tokens.numel(), self.caps[DISK]
        if self._disk is None:
            slots = cap if cap is not None else 1 << 14
            self.disk_path.parent.mkdir(parents=True, exist_ok=True)
            flat = torch.from_file(str(self.disk_path), shared=True, size=2 * self.num_kv_heads * slots * self.head_dim,
                                   dtype=self.dtype)
            self._disk = flat.view(2, self.num_kv_heads, slots, self.head_dim)
        if self._disk_tail + n > self._disk.shape[2]:
            if cap is not None:  # plan() prevents this; keep the invariant loud
                raise KVBudgetError("disk tier overflow")
            self._remap_disk(2 * (self._disk_tail + n))
        self._disk[:, :, self._disk_tail : self._disk_tail + n] = kv
        self.tier.data[tokens] = DISK
        self.slot.data[tokens] = torch.arange(self._disk_tail, self._disk_tail + n)
        self._disk_tail += n
        self.moved["spilled_disk"] += n * self.token_bytes

    def _remap_disk(self, slots: int) -> None:
        """Unlimited disk tier: grow the file (copying the planes, since the layout is per plane)."""
        old = self._disk
        tmp = self.disk_path.with_suffix(".grow")
        flat = torch.from_file(str(tmp), shared=True, size=2 * self.num_kv_heads * slots * self.head_dim, dtype=self.dtype)
        new = flat.view(2, self.num_kv_heads, slots, self.head_dim)
        new[:, :, : self._disk_tail] = old[:, :, : self._disk_tail]
        del old
        tmp.replace(self.disk_path)
        self._disk = new

    def _note_peaks(self) -> None:
        for t in (DEVICE, HOST, DISK):
            self.peak[t] = max(self.peak[t], self.bytes_in(t))

    # -- reads -------------------------------------------------------------------------------------------
    def gather(self, token_ids: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (tokens, head_dim) of ``token_ids`` for one KV head, on the compute device.

        Host and disk reads are sorted by slot so each stored run moves as one transfer; moved bytes and
        runs are counted. Order of the returned tokens follows tier then slot (attention over a set of
        past tokens does not depend on their order)."""
        token_ids = token_ids.cpu()
        tiers = self.tier.data[token_ids]
        slots = self.slot.data[token_ids]
        head_bytes = self.token_bytes // self.num_kv_heads
        parts = []
        for t, src in ((DEVICE, self._dev), (HOST, self._host), (DISK, self._disk)):
            sel = torch.sort(slots[tiers == t]).values
            if sel.numel() == 0:
                continue
            # Read only the span the selection covers (index_select on a strided view of a whole
            # memory-mapped tier would touch all of it).
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            span = src[:, head, lo:hi]
            if t == DEVICE:
                parts.append(span.index_select(1, (sel - lo).to(self.device)))
                continue
            chunk = span.index_select(1, sel - lo)
            parts.append(chunk.to(self.device, non_blocking=True))
            name = TIER_NAMES[t]
            self.moved[f"fetched_{name}"] += sel.numel() * head_bytes
            self.runs[name] += count_runs(sel)
        if not parts:
            empty = torch.zeros(0, self.head_dim, dtype=self.dtype, device=self.device)
            return empty, empty
        kv = torch.cat(parts, dim=1)
        return kv[0], kv[1]

    def stats(self) -> dict:
        return {
            "tokens": self.num_tokens,
            "bytes": {TIER_NAMES[t]: self.bytes_in(t) for t in (DEVICE, HOST, DISK)},
            "peak_bytes": {TIER_NAMES[t]: self.peak[t] for t in (DEVICE, HOST, DISK)},
            "moved_bytes": dict(self.moved),
            "runs_fetched": dict(self.runs),
        }


class TieredKVStore:
    """Per-layer ``LayerKVStore``s sharing one ``TierBudget`` (split equally across layers)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, budget: TierBudget | None = None) -> None:
        budget = budget or TierBudget()
        self.budget = budget
        token_bytes = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

        def per_layer(total: int | None) -> int | None:
            return None if total is None else total // max(num_layers, 1) // token_bytes

        if budget.disk_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lfmsift-kv-")
            disk_dir = Path(self._tmp.name)
        else:
            self._tmp = None
            disk_dir = Path(budget.disk_dir)
        caps = (per_layer(budget.device_bytes), per_layer(budget.host_bytes), per_layer(budget.disk_bytes))
        self.layers = [
            LayerKVStore(num_kv_heads, head_dim, dtype, device, *caps, disk_path=disk_dir / f"layer{i:03d}.kv")
            for i in range(num_layers)
        ]

    def __getitem__(self, layer: int) -> LayerKVStore:
        return self.layers[layer]

    def stats(self) -> dict:
        per = [s.stats() for s in self.layers]
        total = {
            key: {name: sum(p[key][name] for p in per) for name in per[0][key]}
            for key in ("bytes", "peak_bytes", "moved_bytes", "runs_fetched")
        } if per else {}
        budget = {"device": self.budget.device_bytes, "host": self.budget.host_bytes, "disk": self.budget.disk_bytes}
        return {"budget_bytes": budget, **total}

    def close(self) -> None:
        """Drop the disk files (kept only while the store lives)."""
        for layer in self.layers:
            layer._disk = None
        if self._tmp is not None:
            self._tmp.cleanup()
