"""Streaming chunks replayed from CUDA graphs: the host issues one graph per chunk instead of every kernel.

On the device path a frame of a 32-layer model is some thousands of small kernels (projections, clustering,
WiCSum, compaction, gather, attention, append), and issuing them one by one from Python costs the host far
more than the GPU spends running them: the step is bound by the host, not by the bytes it moves. A CUDA
graph records the kernels of one chunk's forward once and replays them with one launch.

A graph replays fixed kernels on fixed tensors, so ``DeviceStreamingCache.begin_step`` prepares each chunk
so that its forward has the same shapes as the last one of its kind (the past padded to a multiple of
``bucket`` positions, the cluster tables' scanned slots likewise) and reads everything that changes from
chunk to chunk (past length, streamed tokens, text group, offloaded split, positions) from device tensors
filled before the replay; the forward changes no host state, and ``end`` counts the tokens afterwards. The
step's *shape key* says when a graph can be replayed: a new key (the past crossed a bucket, a tier or
table grew, another chunk length) runs that chunk eagerly (compiling what needs compiling), and the next
chunk of the same key is captured, then replayed. Graphs of older keys are dropped (``keep`` most recent).

``GraphedStream(model, cache)(kind, inputs_embeds=... | input_ids=...)`` streams one chunk and returns the
logits of its last token; ``graphs=False`` runs the same prepared steps eagerly (the CPU path, and the
oracle for the graphs in the tests).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lfmsift.kv.device_cache import DeviceStreamingCache
from lfmsift.models.adapters import cache_argument

DEFAULT_BUCKET = 2048


class GraphedStream:
    """Runs one stream's chunks through prepared steps of ``cache``, replayed from CUDA graphs on CUDA."""

    def __init__(self, model: nn.Module, cache: DeviceStreamingCache, bucket: int = DEFAULT_BUCKET,
                 graphs: bool | None = None, keep: int = 4) -> None:
        if not isinstance(cache, DeviceStreamingCache):
            raise TypeError(f"GraphedStream needs a DeviceStreamingCache, got {type(cache).__name__}")
        if bucket < 1 or keep < 1:
            raise ValueError(f"bucket and keep must be >= 1, got {bucket} and {keep}")
        self.model, self.cache, self.bucket, self.keep = model, cache, bucket, keep
        self.graphs = cache.device.type == "cuda" if graphs is None else graphs
        if self.graphs and cache.device.type != "cuda":
            raise ValueError("graphs=True needs the cache on a CUDA device")
        self._ran: set = set()  # keys run eagerly once (compiled, accumulators allocated)
        self._captured: OrderedDict = OrderedDict()  # key -> (graph, static input, static positions, logits)
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    @torch.no_grad()
    def __call__(self, kind: str, inputs_embeds: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Stream one chunk of ``kind`` (``"frame"`` / ``"text"``), given as (1, tokens, hidden) embeddings or
        (1, tokens) ids; returns the logits of its last token, (1, vocab)."""
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("give exactly one of inputs_embeds and input_ids")
        x = inputs_embeds if input_ids is None else input_ids
        if x.ndim != (3 if input_ids is None else 2) or x.shape[0] != 1 or x.shape[1] == 0:
            raise ValueError(f"a chunk is (1, tokens{', hidden' if input_ids is None else ''}) with tokens >= 1, "
                             f"got {tuple(x.shape)}")
        cache, tokens = self.cache, x.shape[1]
        key = (cache.begin_step(kind, tokens, self.bucket), input_ids is None, x.dtype, x.shape[2:])
        positions = torch.arange(cache.seen, cache.seen + tokens, device=cache.device)[None]
        try:
            if not self.graphs or key not in self._ran:
                logits = self._forward(x, positions, input_ids is None)
                self._ran.add(key)
                self.counts["eager"] += 1
            else:
                logits = self._replay(key, x, positions)
        except BaseException:
            cache.cancel_step()
            raise
        cache.end(tokens)
        return logits

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, embeds: bool) -> torch.Tensor:
        inputs = {"inputs_embeds": x} if embeds else {"input_ids": x}
        out = self.model(**inputs, position_ids=positions, **cache_argument(self.model, self.cache), use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def _replay(self, key, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if key not in self._captured:
            static_x, static_positions = x.clone(), positions.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a private pool: a graph's blocks are never another's
                logits = self._forward(static_x, static_positions, key[1])
            self._captured[key] = (graph, static_x, static_positions, logits)
            self.counts["captured"] += 1
            while len(self._captured) > self.keep:
                self._captured.popitem(last=False)
        self._captured.move_to_end(key)
        graph, static_x, static_positions, logits = self._captured[key]
        static_x.copy_(x)
        static_positions.copy_(positions)
        graph.replay()
        self.counts["replayed"] += 1
        return logits.clone()
