"""The streaming KV cache of the GPU path: the reference's rules with the data and decisions on the device.

``DeviceStreamingCache`` is a second implementation of ``StreamingKVCache`` (same chunk protocol, same
attention function ``"lfmsift_stream"``, same statistics), built so that a layer never waits for the host:

1. the retriever's *device index* (``Retriever.device_index``: ReSV's ``DeviceReSVIndex``, full fetch,
   StreamingLLM) clusters the chunk and selects clusters as device tensors; a retriever without one runs
   its reference index, whose results are read back (the statistics say so: ``host_reads_in_layers``);
2. the selection becomes, per KV head, an ascending list of past stream positions and a count, by a cumsum
   and a scatter on the device (text positions always kept, ``keep_first`` / ``keep_recent`` added);
3. one gather launch reads those positions from the ``RingKVStore`` (old positions from pinned host
   memory over the link, recent ones from the device ring) into a preallocated buffer, the chunk's own K/V
   behind them;
4. ``attend_gathered`` attends every query head in one call, the mask built from the counts;
5. the chunk is appended to the store (ring slot and host slot known from its position).

``selection="previous_layer"`` (V-Rex's prefetch): layer l's queries and index choose layer l + 1's
tokens, and on CUDA their gather runs on a side stream while layer l finishes and layer l + 1 projects
its queries; layer l + 1 waits on an event before its attention. The first full-attention layer fetches
every past token. Two buffers alternate between consecutive layers.

Clusters close when their newest member leaves the device ring (``cluster_window="store"``, the paper's
"clustering within the recent KV cache"); the reference closes the groups its LRU store offloads, so the
two agree exactly when nothing is offloaded (``cluster_window=None`` turns closing off). Batch 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lfmsift.kv.attention import attend_gathered, chunk_mask
from lfmsift.kv.cache import FRAME, STAGES, StreamingKVCache, _Usage
from lfmsift.kv.device_store import RingKVStore, RingLayerStore
from lfmsift.kv.retriever import LayerIndex
from lfmsift.kernels.compiled import fused
from lfmsift.kernels.kv_gather import gather_positions

log = logging.getLogger(__name__)

_ALIGN = 16  # gathered buffer lengths are rounded up to this (aligned masks for the SDPA kernels)


class HostIndexAdapter(LayerIndex):
    """A reference index on the device path: its ids and masks are moved to the device (a host read per
    layer and chunk; for retrievers that have no device index)."""

    def __init__(self, index: LayerIndex, device: torch.device) -> None:
        self.index, self.device = index, device

    def assign(self, keys: torch.Tensor, position: int | None = None) -> torch.Tensor:
        return self.index.assign(keys).to(self.device)

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None):
        mask = self.index.select(queries, stage, hint)
        return None if mask is None else mask.to(self.device)

    def visited_fraction(self) -> torch.Tensor | None:
        return self.index.visited_fraction()

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        return self.index.stats(num_tokens, value_bytes)


@fused
def select_positions(clusters: torch.Tensor, groups: torch.Tensor, frame: torch.Tensor, first: int, recent: int,
                     frames: int, arange: torch.Tensor, total: torch.Tensor, columns: torch.Tensor):
    """From a cluster selection (kv_heads, clusters) to what each KV head fetches: every past position whose
    cluster is selected (text positions always), plus the first ``first`` and last ``recent`` of the
    ``frames`` streamed positions; returns the keep mask, the ascending positions and their counts per
    head (``compact``), and adds the usage counts to ``total`` (``count_selected``)."""
    keep = torch.where(frame, clusters.index_select(1, groups.clamp(min=0)), True)
    if first or recent:
        order = frame.cumsum(0) - 1  # index of each streamed token in the stream
        keep = keep | (frame & ((order < first) | (order >= frames - recent)))
    total += keep.to(torch.float32) @ columns
    positions, counts = compact.eager(keep, arange)
    return keep, positions, counts


@fused
def compact(keep: torch.Tensor, arange: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``keep`` (kv_heads, past): the kept positions in ascending order (then unused entries) and
    their count. ``arange``: (kv_heads, past) view of ``arange(past)``."""
    heads, past = keep.shape
    rank = torch.where(keep, keep.cumsum(1) - 1, past)  # past: a discarded column
    positions = torch.zeros(heads, past + 1, dtype=torch.int64, device=keep.device)
    positions.scatter_(1, rank, arange)
    return positions[:, :past].contiguous(), keep.sum(1)


@fused
def count_selected(total: torch.Tensor, keep: torch.Tensor, columns: torch.Tensor) -> None:
    """``total`` (kv_heads, 3) += the kept positions counted against the chunk's columns (one product)."""
    total += keep.to(torch.float32) @ columns


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass
class DeviceStreamingCache(StreamingKVCache):
    """KV cache of one streaming session on the device path (batch 1). See the module docstring."""

    cluster_window: int | None | str = "store"

    def _setup_storage(self) -> None:
        self.store = RingKVStore(len(self.full_layers), self.num_kv_heads, self.head_dim, self.dtype, self.device,
                                 self.budget)
        window = self.store.layers[0].window if self.store.layers else None
        cluster_window = window if self.cluster_window == "store" else self.cluster_window
        self.indexes: dict[int, LayerIndex] = {}
        self.host_reads = False
        for layer in self.full_layers:
            index = self.retriever.device_index(layer, self.num_kv_heads, self.head_dim, self.device, cluster_window)
            if index is None:
                index = HostIndexAdapter(self.retriever.index(layer, self.num_kv_heads, self.head_dim, self.device),
                                         self.device)
                self.host_reads = True
            self.indexes[layer] = index
        if self.host_reads:
            log.info("retriever %r has no device index: its index runs on the host in every layer",
                     self.retriever.name)

        # Per stage and layer, summed over chunks on the device: (kv_heads, 3) selected frame tokens, selected
        # offloaded frame tokens, selected offloaded tokens of any kind. Per stage on the host: chunks and
        # past frame tokens counted, and (on the device) offloaded past frame tokens, the same for every layer.
        self._selected = {stage: {layer: torch.zeros(self.num_kv_heads, 3, device=self.device)
                                  for layer in self.full_layers} for stage in STAGES}
        self._visited = {stage: {layer: None for layer in self.full_layers} for stage in STAGES}
        self._counted = {stage: [0, 0] for stage in STAGES}  # chunks with past frames, their past frame tokens
        self._offloaded = {stage: torch.zeros((), device=self.device) for stage in STAGES}
        self._chunk: _ChunkState | None = None
        self._buffers = [torch.zeros(2, self.num_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
                         for _ in range(2)]
        self._side = torch.cuda.Stream(self.device) \
            if self.device.type == "cuda" and self.retriever.selection == "previous_layer" else None
        self.frames_seen = 0  # streamed (frame) tokens stored before the current chunk
        self._adding = False  # inside add_chunk

    # -- chunk protocol ------------------------------------------------------------------------------------
    def begin(self, kind: str, tokens: int | None = None) -> None:
        """As ``StreamingKVCache.begin``; the device path needs ``tokens`` to make room before the forward
        pass (tier growth, gather buffers), so that no layer allocates or waits."""
        if tokens is None:
            raise ValueError("the device streaming path needs the chunk's token count: begin(kind, tokens)")
        super().begin(kind, tokens)
        self.store.reserve(tokens)
        past = self.seen
        length = _round_up(past + tokens, _ALIGN)
        for i, buffer in enumerate(self._buffers):
            if buffer.shape[2] < length:
                self._buffers[i] = torch.zeros(2, self.num_kv_heads, max(length, 2 * buffer.shape[2]), self.head_dim,
                                               dtype=self.dtype, device=self.device)
        if self.store.layers:
            self._chunk = _ChunkState.of(self.store[0], past, tokens, length)
            if self.frames_seen and not self._adding:  # a chunk added by add_chunk selects nothing
                self._counted[kind][0] += 1
                self._counted[kind][1] += self.frames_seen
                self._offloaded[kind] += self._chunk.columns[:, 1].sum()

    def end(self, tokens: int) -> None:
        if self.kind == FRAME:
            self.frames_seen += tokens
        super().end(tokens)

    def add_chunk(self, keys: list[torch.Tensor], values: list[torch.Tensor], kind: str = FRAME) -> None:
        """Store a chunk whose K/V were computed elsewhere (a dense prefill, a saved prefix) as if it had been
        streamed: clustered by the retriever's index (frames), appended to every full-attention layer, no
        attention computed. ``keys`` / ``values``: per full-attention layer, (kv_heads, tokens, head_dim)
        post-RoPE."""
        if any(self.sliding):
            raise ValueError("add_chunk needs a model whose layers all attend fully (no sliding-window layers)")
        if len(keys) != len(self.full_layers) or len(values) != len(self.full_layers):
            raise ValueError(f"add_chunk takes K and V of {len(self.full_layers)} layers, got {len(keys)} and {len(values)}")
        tokens = keys[0].shape[1]
        self._adding = True
        try:
            self.begin(kind, tokens)
        finally:
            self._adding = False
        for slot, layer in enumerate(self.full_layers):
            store = self.store[slot]
            if kind == FRAME:
                groups = self.indexes[layer].assign(keys[slot], store.tokens)
            else:
                groups = torch.full((tokens,), self._text_group, dtype=torch.int64, device=self.device)
            store.append(keys[slot], values[slot], groups)
        self.end(tokens)

    # -- the attention path --------------------------------------------------------------------------------
    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        layer = module.layer_idx
        if query.shape[0] != 1:
            raise ValueError(f"streaming sessions run batch 1, got a batch of {query.shape[0]}")
        q, k, v = query[0], key[0], value[0]
        if self.sliding[layer]:
            return self._window_attention(layer, q, k, v, scaling, self.view.layers[layer].attention.sliding_window)
        slot = self._slot[layer]
        store, index = self.store[slot], self.indexes[layer]
        past, tokens = store.tokens, k.shape[1]
        early = self.retriever.selects_before_assign
        hint = self._hint(layer)
        if early:
            clusters = index.select(q, self.kind, hint)
        if self.kind == FRAME:
            groups = index.assign(k, past)
        else:
            groups = torch.full((tokens,), self._text_group, dtype=torch.int64, device=self.device)
        if not early:
            clusters = index.select(q, self.kind, hint)
        if self.retriever.selection == "same_layer":
            keep, positions, counts = self._select(layer, store, clusters, past)
            buffer = self._gather(slot % 2, store, positions, counts)
        else:
            keep, buffer, counts = self._prefetched(layer, slot, store)
            nxt = self._next_full_layer(layer)
            if nxt is not None:
                self._prefetch(nxt, *self._select(nxt, store, clusters, past))
        if self.trace is not None:
            self.trace.append((layer, self.kind, keep))
        buffer[:, :, past : past + tokens] = torch.stack([k, v]).to(buffer.dtype)
        chunk = self._chunk
        out = attend_gathered(q, buffer[:, :, : chunk.length], counts, past, scaling,
                              chunk.attention_mask(q.shape[0] // self.num_kv_heads))
        self._note_visited(layer)
        store.append(k, v, groups)
        return out[None]

    def _select(self, layer: int, store: RingLayerStore, clusters: torch.Tensor | None, past: int):
        """What ``layer`` attends to, from cluster selection ``clusters`` over ``store``'s positions (``None``:
        every position): (kv_heads, past) keep mask, ascending positions per head and their counts; the
        usage counters of ``layer`` are updated on the device."""
        chunk, total = self._chunk, self._selected[self.kind][layer]
        if clusters is None:
            total += chunk.columns.sum(0)
            return chunk.dense()
        if clusters.shape[1] == 0:  # no cluster yet: the text positions only
            keep = (~chunk.frame).expand(self.num_kv_heads, -1).contiguous()
            count_selected(total, keep, chunk.columns)
            return (keep, *compact(keep, chunk.positions))
        return select_positions(clusters, store.groups[:past], chunk.frame, self.retriever.keep_first,
                                self.retriever.keep_recent, self.frames_seen, chunk.positions, total, chunk.columns)

    def _gather(self, which: int, store: RingLayerStore, positions: torch.Tensor, counts: torch.Tensor
                ) -> torch.Tensor:
        """The selected positions' K/V gathered into buffer ``which`` (host and ring tiers, one launch)."""
        buffer = self._buffers[which]
        gather_positions(store.host, store.ring, store.split, positions, counts, buffer)
        return buffer

    def _prefetched(self, layer: int, slot: int, store: RingLayerStore):
        """previous_layer: the selection made for ``layer`` by the previous layer (waiting for its gather),
        or every past token for the first full-attention layer."""
        pending = self._pending.pop(layer, None)
        if pending is None:
            self._selected[self.kind][layer] += self._chunk.columns.sum(0)
            keep, positions, counts = self._chunk.dense()
            return keep, self._gather(slot % 2, store, positions, counts), counts
        keep, buffer, counts, event = pending
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return keep, buffer, counts

    def _prefetch(self, layer: int, keep: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> None:
        """Start gathering ``layer``'s selected positions (on the side stream when there is one)."""
        slot = self._slot[layer]
        store = self.store[slot]
        if self._side is None:
            self._pending[layer] = (keep, self._gather(slot % 2, store, positions, counts), counts, None)
            return
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            buffer = self._gather(slot % 2, store, positions, counts)
            event = torch.cuda.Event()
            event.record(self._side)
        positions.record_stream(self._side)
        counts.record_stream(self._side)
        self._pending[layer] = (keep, buffer, counts, event)

    def _note_visited(self, layer: int) -> None:
        """The visited fraction of the bucketed WiCSum, summed on the device (same_layer, as the reference)."""
        visited = self.indexes[layer].visited_fraction()
        if visited is not None and self.frames_seen and self.retriever.selection == "same_layer":
            held = self._visited[self.kind][layer]
            self._visited[self.kind][layer] = visited if held is None else held + visited

    # -- statistics ----------------------------------------------------------------------------------------
    def _stored_frame_tokens(self) -> int:
        return sum(int((s.groups[: s.tokens] >= 0).sum()) for s in self.store.layers)

    def _usage_now(self) -> None:
        """Fill the reference's per-layer ``_Usage`` records from the device counters (reads them)."""
        kv = self.num_kv_heads
        self.usage = {stage: {} for stage in STAGES}
        for stage in STAGES:
            chunks, frames = self._counted[stage]
            offloaded = float(self._offloaded[stage])
            for layer in self.full_layers:
                counts = self._selected[stage][layer].double().cpu()
                visited = self._visited[stage][layer]
                self.usage[stage][layer] = _Usage(
                    counts[:, 0], torch.full((kv,), float(frames), dtype=torch.float64), counts[:, 1],
                    torch.full((kv,), offloaded, dtype=torch.float64), chunks,
                    None if visited is None else visited.cpu(), chunks if visited is not None else 0)

    def fetched_host_tokens(self) -> int:
        """(token, KV head) pairs read from the host tier so far, every layer and stage (reads the device)."""
        return int(sum(float(t[:, 2].sum()) for per_layer in self._selected.values() for t in per_layer.values()))

    def stats(self) -> dict:
        self._usage_now()
        out = super().stats()
        out["path"] = "device"
        out["host_reads_in_layers"] = self.host_reads
        head_bytes = self.store.layers[0].token_bytes // self.num_kv_heads if self.store.layers else 0
        out["store"]["moved_bytes"]["fetched_host"] = self.fetched_host_tokens() * head_bytes
        return out


@dataclass
class _ChunkState:
    """What every layer of one chunk shares: the past's frame / offloaded masks as count columns, the
    position list a selection scatters from, and the chunk's part of the attention mask."""

    past: int
    tokens: int
    length: int
    frame: torch.Tensor  # (past,) bool: streamed (frame) positions
    columns: torch.Tensor  # (past, 3) fp32: frame, frame & offloaded, offloaded
    positions: torch.Tensor  # (kv_heads, past) int64 view of arange(past)
    _built: dict

    @classmethod
    def of(cls, store: RingLayerStore, past: int, tokens: int, length: int) -> _ChunkState:
        frame = store.groups[:past] >= 0
        offloaded = torch.arange(past, device=frame.device) < store.split
        columns = torch.stack([frame, frame & offloaded, offloaded], 1).to(torch.float32)
        positions = torch.arange(past, device=frame.device).expand(store.num_kv_heads, -1)
        return cls(past, tokens, length, frame, columns, positions, {})

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every past position kept: (keep mask, positions, counts), built once per chunk."""
        if "dense" not in self._built:
            heads, past = self.positions.shape
            self._built["dense"] = (torch.ones(heads, past, dtype=torch.bool, device=self.frame.device),
                                    self.positions.contiguous(),
                                    torch.full((heads,), past, dtype=torch.int64, device=self.frame.device))
        return self._built["dense"]

    def attention_mask(self, group: int) -> torch.Tensor:
        """(group * tokens, length) bool: the rows' view of the chunk itself (causal), built once per chunk."""
        if group not in self._built:
            self._built[group] = chunk_mask(self.past, self.length, self.tokens, group, self.frame.device)
        return self._built[group]
