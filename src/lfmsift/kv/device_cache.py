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
two agree exactly when nothing is offloaded (``cluster_window=None`` turns closing off).

``begin_step`` instead of ``begin`` prepares a *step* that ``kv.graphed`` can capture in a CUDA graph and
replay: every shape is fixed by buckets (the past padded up to a multiple of ``bucket`` positions, the
chunk's own K/V after the padded past, the cluster tables' scanned slots likewise), every per-chunk value
(past length, streamed tokens, text group, offloaded split) is a device scalar filled before the forward,
and the forward changes no host state: ``end`` counts the tokens afterwards (one stream, full-attention
layers, retrievers whose device index is ``graphable``).

``streams=B``: B streams advancing in lockstep in one forward (the paper's batches of 4 and 8 streams); each
stream clusters and selects with its own indexes, the stores and buffers stack the streams' KV heads, so the
compaction, the gather and the attention are one call each for the whole batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lfmsift.kv.attention import attend_gathered, chunk_mask
from lfmsift.kv.cache import FRAME, STAGES, StreamingKVCache, _Usage, always_kept
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


def kept_positions(clusters: torch.Tensor, groups: torch.Tensor, frame: torch.Tensor, first: int, recent: int,
                   frames: int | torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(kv_heads, past) bool: every past position whose cluster is selected (text positions always), plus the
    first ``first`` and last ``recent`` of the ``frames`` streamed positions; ``valid``: the positions that
    hold a token (a padded past), the others never kept."""
    keep = torch.where(frame, clusters.index_select(1, groups.clamp(min=0)), True if valid is None else valid)
    if first or recent:
        keep = keep | always_kept(frame, first, recent, frames)
    return keep


@fused
def select_positions(clusters: torch.Tensor, groups: torch.Tensor, frame: torch.Tensor, first: int, recent: int,
                     frames: int | torch.Tensor, arange: torch.Tensor, total: torch.Tensor, columns: torch.Tensor,
                     valid: torch.Tensor | None = None):
    """From a cluster selection (kv_heads, clusters) to what each KV head fetches: every past position whose
    cluster is selected (text positions always), plus the first ``first`` and last ``recent`` of the
    ``frames`` streamed positions; returns the keep mask, the ascending positions and their counts per
    head (``compact``), and adds the usage counts to ``total`` (``count_selected``). ``valid``: as in
    ``kept_positions``."""
    keep = kept_positions(clusters, groups, frame, first, recent, frames, valid)
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
    """KV cache of ``streams`` streaming sessions advancing in lockstep (same chunk kinds and lengths; 1 by
    default) on the device path. See the module docstring.

    With several streams the model runs one forward for all of them (batch = streams): each stream has its
    own index per layer (its clusters, its selection), while the stores hold the streams' KV heads side by
    side, so that one compaction, one gather and one attention call serve the whole batch. Budgets are for
    the whole batch. ``StreamingSession`` drives one stream; batches are driven through ``begin`` / the
    model's forward / ``end`` with (streams, tokens) inputs."""

    cluster_window: int | None | str = "store"
    streams: int = 1

    def _setup_storage(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.streams > 1 and any(self.sliding):
            raise ValueError("several streams need a model whose layers all attend fully (no sliding-window layers)")
        if self.streams > 1 and self.retriever.needs_hint:
            raise ValueError(f"retriever {self.retriever.name!r} predicts queries from the previous layer and runs "
                             "one stream at a time; use streams=1")
        heads = self.streams * self.num_kv_heads  # the store's heads: every stream's KV heads
        self.store = RingKVStore(len(self.full_layers), heads, self.head_dim, self.dtype, self.device, self.budget,
                                 self.streams)
        window = self.store.layers[0].window if self.store.layers else None
        cluster_window = window if self.cluster_window == "store" else self.cluster_window
        self.host_reads = False
        # stream_indexes[b][layer]: stream b's index of a layer; ``indexes`` is stream 0's (the statistics').
        self.stream_indexes: list[dict[int, LayerIndex]] = []
        for _ in range(self.streams):
            indexes = {}
            for layer in self.full_layers:
                index = self.retriever.device_index(layer, self.num_kv_heads, self.head_dim, self.device,
                                                    cluster_window)
                if index is None:
                    index = HostIndexAdapter(self.retriever.index(layer, self.num_kv_heads, self.head_dim,
                                                                  self.device), self.device)
                    self.host_reads = True
                indexes[layer] = index
            self.stream_indexes.append(indexes)
        self.indexes = self.stream_indexes[0]
        if self.host_reads:
            log.info("retriever %r has no device index: its index runs on the host in every layer",
                     self.retriever.name)

        # Per stage and layer, summed over chunks on the device: (store heads, 3) selected frame tokens,
        # selected offloaded frame tokens, selected offloaded tokens of any kind. Per stage on the host:
        # chunks and past frame tokens counted, and (on the device) offloaded past frame tokens, the same
        # for every layer and stream.
        self._selected = {stage: {layer: torch.zeros(heads, 3, device=self.device)
                                  for layer in self.full_layers} for stage in STAGES}
        self._visited = {stage: {layer: None for layer in self.full_layers} for stage in STAGES}
        self._counted = {stage: [0, 0] for stage in STAGES}  # chunks with past frames, their past frame tokens
        self._offloaded = {stage: torch.zeros((), device=self.device) for stage in STAGES}
        self._chunk: _ChunkState | None = None
        self._buffers = [torch.zeros(2, heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
                         for _ in range(2)]
        self._side = torch.cuda.Stream(self.device) \
            if self.device.type == "cuda" and self.retriever.selection == "previous_layer" else None
        self.frames_seen = 0  # streamed (frame) tokens of each stream stored before the current chunk
        self._adding = False  # inside add_chunk
        # A prepared step (``begin_step``): its shapes, and the per-chunk values the forward reads on the device.
        self._step: _Step | None = None
        self._scalars = torch.zeros(4, dtype=torch.int64, device=self.device)  # past, frames, text group, split

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
                self._buffers[i] = torch.zeros(2, buffer.shape[1], max(length, 2 * buffer.shape[2]), self.head_dim,
                                               dtype=self.dtype, device=self.device)
        if self.store.layers:
            self._chunk = _ChunkState.of(self.store[0], past, tokens, length)
            if self.frames_seen and not self._adding:  # a chunk added by add_chunk selects nothing
                self._counted[kind][0] += 1
                self._counted[kind][1] += self.frames_seen
                self._offloaded[kind] += self._chunk.columns[:, 1].sum()

    def begin_step(self, kind: str, tokens: int, bucket: int = 2048) -> tuple:
        """``begin`` for a step whose forward can be captured in a CUDA graph (module docstring). Checks
        everything first (nothing changes on an error). Returns the step's *shape key*: two steps with equal
        keys run the same kernels on the same tensors, so one captured graph serves both."""
        if self.streams != 1 or any(self.sliding):
            raise ValueError("steps captured in CUDA graphs need one stream and a model whose layers all attend "
                             "fully (no sliding-window layers)")
        if self.retriever.needs_hint or self.trace is not None:
            raise ValueError(f"retriever {self.retriever.name!r} or a selection trace needs host work in every "
                             "layer; steps captured in CUDA graphs cannot run it")
        if not all(index.graphable for index in self.indexes.values()):
            raise ValueError(f"retriever {self.retriever.name!r} has no graph-capturable device index; the ones "
                             "that have: full, resv, resv_shifted")
        if tokens < 1 or bucket < 1:
            raise ValueError(f"a step needs tokens >= 1 and bucket >= 1, got {tokens} and {bucket}")
        StreamingKVCache.begin(self, kind, tokens)  # checks the kind and the budgets
        past = self.seen
        padded = _round_up(max(past, 1), bucket)
        self.store.reserve(tokens, slots=padded)
        length = _round_up(padded + tokens, _ALIGN)
        for i, buffer in enumerate(self._buffers):
            if buffer.shape[2] < length:
                self._buffers[i] = torch.zeros(2, buffer.shape[1], max(length, 2 * buffer.shape[2]), self.head_dim,
                                               dtype=self.dtype, device=self.device)
        for index in self.indexes.values():
            index.prepare_step(kind, tokens, bucket)
        window = self.store.layers[0].window if self.store.layers else None
        split = 0 if window is None else max(0, past - window)
        self._fill_scalars(past, split)
        self._step = _Step(kind, padded, tokens, length, counted=self.frames_seen > 0)
        self._chunk = None
        if self.frames_seen:
            self._counted[kind][0] += 1
            self._counted[kind][1] += self.frames_seen
        return (self._step.key(), tuple(b.shape for b in self._buffers),
                tuple((s.ring.shape, s.host.shape, s.groups.shape) for s in self.store.layers),
                tuple(index.step_key() for index in self.indexes.values()))

    def _fill_scalars(self, past: int, split: int) -> None:
        """The step's device scalars, filled by launches (no host-to-device copy from pageable memory)."""
        for i, value in enumerate((past, self.frames_seen, self._text_group, split)):
            self._scalars[i].fill_(value)

    def end(self, tokens: int) -> None:
        step, self._step = self._step, None
        if step is not None:
            for store in self.store.layers:
                store.advance(tokens)
            for index in self.indexes.values():
                index.finish_step(self.kind, tokens, self.num_heads * tokens)
            self._chunk = None
        if self.kind == FRAME:
            self.frames_seen += tokens
        super().end(tokens)

    def cancel_step(self) -> None:
        """After a prepared step's forward failed: its tokens are not counted (the indexes close their
        bookkeeping as if they had been, so their bounds stay bounds); the session goes on."""
        step, self._step = self._step, None
        if step is not None:
            for index in self.indexes.values():
                index.finish_step(self.kind, step.tokens, 0)
            self._chunk = None

    def add_chunk(self, keys: list[torch.Tensor], values: list[torch.Tensor], kind: str = FRAME) -> None:
        """Store a chunk whose K/V were computed elsewhere (a dense prefill, a saved prefix) as if it had been
        streamed: clustered by each stream's index (frames), appended to every full-attention layer, no
        attention computed. ``keys`` / ``values``: per full-attention layer, (streams * kv_heads, tokens,
        head_dim) post-RoPE, stream by stream."""
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
            per_stream = keys[slot].reshape(self.streams, self.num_kv_heads, tokens, self.head_dim)
            store.append(keys[slot], values[slot], self._groups(layer, per_stream, store.tokens, tokens))
        self.end(tokens)

    def _groups(self, layer: int, keys: torch.Tensor, past: int, tokens: int) -> torch.Tensor:
        """(streams, tokens) group ids of a chunk: each stream's clusters (frames) or the text segment."""
        if self.kind != FRAME:
            return torch.full((self.streams, tokens), self._text_group, dtype=torch.int64, device=self.device)
        ids = [self.stream_indexes[b][layer].assign(keys[b], past) for b in range(self.streams)]
        return ids[0][None] if self.streams == 1 else torch.stack(ids)

    # -- the attention path --------------------------------------------------------------------------------
    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        layer = module.layer_idx
        batch = query.shape[0]
        if batch != self.streams:
            raise ValueError(f"this cache holds {self.streams} stream(s) (batch {self.streams}), got a batch of {batch}")
        if self.sliding[layer]:
            out = self._window_attention(layer, query[0], key[0], value[0], scaling,
                                         self.view.layers[layer].attention.sliding_window)
            return out
        if self._step is not None:
            return self._attend_step(layer, query, key, value, scaling)
        slot = self._slot[layer]
        store = self.store[slot]
        past, tokens = store.tokens, key.shape[2]
        early = self.retriever.selects_before_assign
        hint = self._hint(layer)
        if early:
            clusters = self._clusters(layer, query, hint)
        groups = self._groups(layer, key, past, tokens)
        if not early:
            clusters = self._clusters(layer, query, hint)
        keep, buffer, counts = self._fetch(layer, slot, store, clusters, past)
        if self.trace is not None:
            self.trace.append((layer, self.kind, keep))
        k = key.reshape(batch * self.num_kv_heads, tokens, self.head_dim)
        v = value.reshape(batch * self.num_kv_heads, tokens, self.head_dim)
        kv = torch.stack([k, v])
        buffer[:, :, past : past + tokens] = kv
        chunk = self._chunk
        heads = query.shape[1]
        out = attend_gathered(query.reshape(batch * heads, tokens, self.head_dim), buffer[:, :, : chunk.length],
                              counts, past, scaling, chunk.attention_mask(heads // self.num_kv_heads), chunk.slots)
        self._note_visited(layer)
        store.append_kv(kv, groups)
        return out.reshape(tokens, batch, heads, self.head_dim).transpose(0, 1)

    def _attend_step(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scaling: float) -> torch.Tensor:
        """``attend`` in a prepared step: the padded shapes and device scalars of ``begin_step``, no host
        state changed (the store's count moves on in ``end``)."""
        step, slot = self._step, self._slot[layer]
        store, index = self.store[slot], self.indexes[layer]
        padded, tokens = step.padded, key.shape[2]
        if self._chunk is None:  # built inside the (captured) forward, from the device scalars
            self._chunk = _ChunkState.padded(store, self._scalars, padded, tokens, step.length)
            if step.counted:
                self._offloaded[self.kind] += self._chunk.columns[:, 1].sum()
        past = self._scalars[0:1]
        early = self.retriever.selects_before_assign
        if early:
            clusters = [index.select(query[0], self.kind)]
        if self.kind == FRAME:
            groups = index.assign(key[0], past)[None]
        else:
            groups = self._scalars[2:3].expand(1, tokens)
        if not early:
            clusters = [index.select(query[0], self.kind)]
        keep, buffer, counts = self._fetch(layer, slot, store, clusters, padded)
        k = key.reshape(self.num_kv_heads, tokens, self.head_dim)
        v = value.reshape(self.num_kv_heads, tokens, self.head_dim)
        kv = torch.stack([k, v])
        buffer[:, :, padded : padded + tokens] = kv
        chunk, heads = self._chunk, query.shape[1]
        out = attend_gathered(query.reshape(heads, tokens, self.head_dim), buffer[:, :, : chunk.length], counts,
                              padded, scaling, chunk.attention_mask(heads // self.num_kv_heads), chunk.slots)
        if step.counted:
            self._note_visited(layer)
        store.append_at(kv, groups, past)
        return out.reshape(tokens, 1, heads, self.head_dim).transpose(0, 1)

    def _fetch(self, layer: int, slot: int, store: RingLayerStore, clusters: list, past: int):
        """The past K/V ``layer`` attends to, gathered: (keep mask, buffer, counts). ``same_layer``: selected
        from this layer's clusters now; ``previous_layer``: the prefetch the previous layer started, and
        this layer's clusters start the next layer's."""
        if self.retriever.selection == "same_layer":
            keep, positions, counts = self._select(layer, store, clusters, past)
            return keep, self._gather(slot % 2, store, positions, counts), counts
        keep, buffer, counts = self._prefetched(layer, slot, store)
        nxt = self._next_full_layer(layer)
        if nxt is not None:
            self._prefetch(nxt, *self._select(nxt, store, clusters, past))
        return keep, buffer, counts

    def _clusters(self, layer: int, query: torch.Tensor, hint: torch.Tensor | None) -> list:
        """Each stream's cluster selection of ``layer`` (``None`` entries: every group)."""
        return [self.stream_indexes[b][layer].select(query[b], self.kind, hint) for b in range(self.streams)]

    def _select(self, layer: int, store: RingLayerStore, clusters: list, past: int):
        """What ``layer`` attends to, from each stream's cluster selection over ``store``'s positions:
        (store heads, past) keep mask, ascending positions per head and their counts; the usage counters of
        ``layer`` are updated on the device."""
        chunk, total = self._chunk, self._selected[self.kind][layer]
        if all(c is None for c in clusters):
            total += chunk.columns.sum(0)
            return chunk.dense()
        if self.streams == 1 and clusters[0].shape[1]:
            frames = self.frames_seen if chunk.valid is None else self._scalars[1]
            return select_positions(clusters[0], store.groups[0, :past], chunk.frame, self.retriever.keep_first,
                                    self.retriever.keep_recent, frames, chunk.positions, total, chunk.columns,
                                    chunk.valid)
        keep = torch.cat([self._kept(c, store.groups[b, :past]) for b, c in enumerate(clusters)])
        count_selected(total, keep, chunk.columns)
        return (keep, *compact(keep, chunk.positions))

    def _kept(self, clusters: torch.Tensor | None, groups: torch.Tensor) -> torch.Tensor:
        """(kv_heads, past) keep mask of one stream (text always; no cluster yet: the text only)."""
        frame = self._chunk.frame
        if clusters is None:
            return torch.ones(self.num_kv_heads, frame.shape[0], dtype=torch.bool, device=self.device)
        if clusters.shape[1] == 0:
            return (~frame).expand(self.num_kv_heads, -1).contiguous()
        return kept_positions(clusters, groups, frame, self.retriever.keep_first, self.retriever.keep_recent,
                              self.frames_seen)

    def _gather(self, which: int, store: RingLayerStore, positions: torch.Tensor, counts: torch.Tensor
                ) -> torch.Tensor:
        """The selected positions' K/V gathered into buffer ``which`` (host and ring tiers, one launch)."""
        buffer = self._buffers[which]
        split = store.split if self._step is None else self._scalars[3:4]
        gather_positions(store.host, store.ring, split, positions, counts, buffer)
        return buffer

    def _prefetched(self, layer: int, slot: int, store: RingLayerStore):
        """previous_layer: the selection made for ``layer`` by the previous layer (waiting for its gather),
        or every past token for the first full-attention layer."""
        pending = self._pending.pop(layer, None)
        if pending is None:
            self._selected[self.kind][layer] += self._chunk.columns.sum(0)
            keep, positions, counts = self._chunk.dense()
            return keep, self._gather(slot % 2, store, positions, counts), counts
        keep, buffer, counts, event, _ = pending
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return keep, buffer, counts

    def _prefetch(self, layer: int, keep: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> None:
        """Start gathering ``layer``'s selected positions (on the side stream when there is one)."""
        slot = self._slot[layer]
        store = self.store[slot]
        if self._side is None:
            self._pending[layer] = (keep, self._gather(slot % 2, store, positions, counts), counts, None, positions)
            return
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            buffer = self._gather(slot % 2, store, positions, counts)
            event = torch.cuda.Event()
            event.record(self._side)
        if not torch.cuda.is_current_stream_capturing():  # in a capture, the pending entry keeps them alive
            positions.record_stream(self._side)
            counts.record_stream(self._side)
        self._pending[layer] = (keep, buffer, counts, event, positions)

    def _note_visited(self, layer: int) -> None:
        """The visited fraction of the bucketed WiCSum (mean over the streams), summed on the device
        (same_layer, as the reference)."""
        if not self.frames_seen or self.retriever.selection != "same_layer":
            return
        fractions = [indexes[layer].visited_fraction() for indexes in self.stream_indexes]
        if any(f is None for f in fractions):
            return
        visited = fractions[0] if self.streams == 1 else torch.stack(fractions).mean(0)
        held = self._visited[self.kind][layer]
        if held is None:
            self._visited[self.kind][layer] = visited.clone()
        else:
            held += visited  # in place: a captured step adds to the same counter

    # -- statistics ----------------------------------------------------------------------------------------
    def _stored_frame_tokens(self) -> int:
        return sum(int((s.groups[:, : s.tokens] >= 0).sum()) for s in self.store.layers)

    def _usage_now(self) -> None:
        """Fill the reference's per-layer ``_Usage`` records from the device counters (reads them); with
        several streams, each KV head's counts are summed over the streams."""
        kv, b = self.num_kv_heads, self.streams
        self.usage = {stage: {} for stage in STAGES}
        for stage in STAGES:
            chunks, frames = self._counted[stage]
            frames *= b
            offloaded = float(self._offloaded[stage]) * b
            for layer in self.full_layers:
                counts = self._selected[stage][layer].double().cpu().reshape(b, kv, 3).sum(0)
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
        head_bytes = self.store.layers[0].token_bytes // self.store.layers[0].num_kv_heads if self.store.layers else 0
        out["store"]["moved_bytes"]["fetched_host"] = self.fetched_host_tokens() * head_bytes
        return out


@dataclass
class _Step:
    """The host-side shape of a prepared step: its kind, the padded past, its tokens, the gathered length."""

    kind: str
    padded: int
    tokens: int
    length: int
    counted: bool  # streamed tokens precede it: its selections are counted

    def key(self) -> tuple:
        return (self.kind, self.padded, self.tokens, self.length, self.counted)


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
    slots: torch.Tensor  # (length,) arange of the gathered buffer's slots
    _built: dict
    valid: torch.Tensor | None = None  # (past,) bool in a prepared step: the padded positions that hold tokens
    count: torch.Tensor | None = None  # (1,) int64 in a prepared step: the past length

    @classmethod
    def of(cls, store: RingLayerStore, past: int, tokens: int, length: int) -> _ChunkState:
        frame = store.groups[0, :past] >= 0  # streams advance in lockstep: the same kinds everywhere
        offloaded = torch.arange(past, device=frame.device) < store.split
        columns = torch.stack([frame, frame & offloaded, offloaded], 1).to(torch.float32)
        slots = torch.arange(length, device=frame.device)
        positions = slots[:past].expand(store.num_kv_heads, -1)
        return cls(past, tokens, length, frame, columns, positions, slots, {})

    @classmethod
    def padded(cls, store: RingLayerStore, scalars: torch.Tensor, padded: int, tokens: int, length: int
               ) -> _ChunkState:
        """The state of a prepared step: ``padded`` past slots of which the first ``scalars[0]`` hold tokens,
        those below ``scalars[3]`` offloaded (device scalars: nothing read back)."""
        slots = torch.arange(length, device=scalars.device)
        j = slots[:padded]
        valid = j < scalars[0]
        frame = (store.groups[0, :padded] >= 0) & valid
        offloaded = j < scalars[3]
        columns = torch.stack([frame, frame & offloaded, offloaded & valid], 1).to(torch.float32)
        positions = j.expand(store.num_kv_heads, -1)
        return cls(padded, tokens, length, frame, columns, positions, slots, {}, valid, scalars[0:1])

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every past position kept: (keep mask, positions, counts), built once per chunk."""
        if "dense" not in self._built:
            heads, past = self.positions.shape
            device = self.frame.device
            if self.valid is None:
                keep = torch.ones(heads, past, dtype=torch.bool, device=device)
                counts = torch.full((heads,), past, dtype=torch.int64, device=device)
            else:
                keep, counts = self.valid.expand(heads, -1), self.count.expand(heads)
            self._built["dense"] = (keep, self.positions.contiguous(), counts)
        return self._built["dense"]

    def attention_mask(self, group: int) -> torch.Tensor:
        """(group * tokens, length) bool: the rows' view of the chunk itself (causal), built once per chunk."""
        if group not in self._built:
            self._built[group] = chunk_mask(self.past, self.length, self.tokens, group, self.frame.device)
        return self._built[group]
