"""Retrievers: which stored KV groups each layer and KV head attends to, behind one registry.

A retriever builds one ``LayerIndex`` per attention layer. The streaming cache calls, per chunk:
``assign(keys)`` to put the chunk's selectable tokens (frame tokens) into groups — the unit the KV
store keeps contiguous and moves as one run — then ``select(queries, stage, hint)`` for the groups each
KV head needs, and ``close(groups)`` when the store offloads groups out of the device window. Text tokens
never go through a retriever: the cache keeps them always. ``stage`` is ``"frame"`` while frames (or
streamed text chunks) are prefilled and ``"text"`` for questions and answers; ``hint`` is, for retrievers
with ``needs_hint`` (InfiniGen), this layer's queries as predicted from the previous layer's attention
input.

Adding a retriever is adding a small dataclass with ``name`` and ``index()``, decorated ``@register``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

SELECTION_MODES = ("same_layer", "previous_layer")


class LayerIndex(ABC):
    """A retriever's per-layer index over stored groups (group ids are 0, 1, 2, ... per layer)."""

    @abstractmethod
    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Group ids (tokens,) for a chunk of post-RoPE keys (num_kv_heads, tokens, head_dim)."""

    @abstractmethod
    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        """(num_kv_heads, groups) bool: the groups each KV head needs for post-RoPE queries
        (num_heads, rows, head_dim); ``None`` means every group."""

    def close(self, groups: list[int]) -> None:
        """Groups offloaded out of the device window (they accept no new tokens)."""

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        """Index size for ``num_tokens`` stored tokens whose K/V values take ``value_bytes`` each."""
        return {}

    def visited_fraction(self) -> torch.Tensor | None:
        """Per KV head, the fraction of scores the last ``select`` had to visit (early exit), if measured."""
        return None

    # Device indexes whose steps can be captured in CUDA graphs (``kv.graphed``) set ``graphable`` and take,
    # per chunk: ``prepare_step`` on the host before the forward (fix shapes, make room), ``assign(keys,
    # position)`` with ``position`` a device scalar and ``select`` changing no host state, then
    # ``finish_step`` on the host after it (the host-side counts of the chunk).
    graphable: bool = False

    def prepare_step(self, kind: str, tokens: int, bucket: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot run steps captured in CUDA graphs")

    def finish_step(self, kind: str, tokens: int, rows: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot run steps captured in CUDA graphs")

    def step_key(self) -> tuple:
        """What a prepared step's kernels depend on beyond the cache's shapes (capacities, padded sizes)."""
        return ()


@dataclass
class Retriever(ABC):
    """Base of all retrievers. ``selection``: which layer's queries choose the tokens of a layer —
    ``same_layer`` (exact) or ``previous_layer`` (V-Rex's prefetch: layer l's queries and index pick
    the tokens that layer l + 1 fetches; layer 0 attends densely).

    ``keep_first`` / ``keep_recent``: streamed (selectable) tokens that every layer attends to whatever
    the selection — the first ``keep_first`` of the stream (attention sinks, as StreamingLLM keeps them)
    and the last ``keep_recent`` (a local window, as ReKV's ``n_local``). Both 0 by default: the rules
    as their papers state them.
    """

    name: ClassVar[str] = ""
    needs_hint: ClassVar[bool] = False
    selection: str = "same_layer"
    keep_first: int = 0
    keep_recent: int = 0

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {SELECTION_MODES}, got {self.selection!r}")
        if self.keep_first < 0 or self.keep_recent < 0:
            raise ValueError(f"keep_first and keep_recent must be >= 0, got {self.keep_first}, {self.keep_recent}")

    @property
    def selects_before_assign(self) -> bool:
        """Whether a chunk's selection is made before its own tokens enter the index (so the chunk's
        clusters take no part of the selection's budget); ``False``: the index is updated first."""
        return False

    @abstractmethod
    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex: ...

    def device_index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device,
                     window: int | None = None) -> LayerIndex | None:
        """The index of the device streaming path, whose ``assign(keys, position)`` and ``select`` return
        device tensors without reading the device back (``window``: the recent positions kept on the device);
        ``None`` when this retriever has none (the device path then runs ``index`` and reads its results
        back in every layer)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


RETRIEVERS: dict[str, type[Retriever]] = {}


def register(cls: type[Retriever]) -> type[Retriever]:
    RETRIEVERS[cls.name] = cls
    return cls


def get_retriever(name: str, **options) -> Retriever:
    """Build a registered retriever by name; an unknown name lists the known ones."""
    if name not in RETRIEVERS:
        raise ValueError(f"unknown retriever {name!r}; known: {', '.join(sorted(RETRIEVERS))}")
    return RETRIEVERS[name](**options)


class _ChunkIndex(LayerIndex):
    """One group per chunk (frame), every group selected."""

    def __init__(self) -> None:
        self.groups = 0

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        self.groups += 1
        return torch.full((keys.shape[1],), self.groups - 1, dtype=torch.int64)

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> None:
        return None

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        return {"groups": self.groups}


class _DeviceChunkIndex(LayerIndex):
    """One group per chunk on the device path, every group selected."""

    graphable = True

    def __init__(self, device: torch.device) -> None:
        self.device, self.groups = device, 0

    def assign(self, keys: torch.Tensor, position: int | torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_tensor(position):  # a graph-captured step: the chunk's first position names its group
            return position.reshape(1).expand(keys.shape[1])
        self.groups += 1
        return torch.full((keys.shape[1],), self.groups - 1, dtype=torch.int64, device=self.device)

    def prepare_step(self, kind: str, tokens: int, bucket: int) -> None:
        pass

    def finish_step(self, kind: str, tokens: int, rows: int) -> None:
        self.groups += kind == "frame"

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> None:
        return None

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        return {"groups": self.groups}


@register
@dataclass
class Full(Retriever):
    """Everything is fetched (the FlexGen baseline: full offload, full fetch). Groups are whole frames,
    so offloaded frames still move as one run each."""

    name: ClassVar[str] = "full"

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        return _ChunkIndex()

    def device_index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device,
                     window: int | None = None) -> LayerIndex:
        return _DeviceChunkIndex(device)
