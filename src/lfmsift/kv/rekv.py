"""ReKV (Di et al., ICLR 2025): whole frames retrieved by their mean key, one choice per layer for all heads.

Rules from the public code (digest §5.4): when a frame leaves the local window its block gets a
representative key, the mean of its keys; GQA keys are expanded to all query heads and the heads are
concatenated into one vector. At retrieval the queries of the chunk are averaged over its rows (heads
concatenated), the block logits are the inner products with the representatives, and the top blocks are
taken — one selection per layer, shared by all heads. V-Rex applies this at frame time as well as at
question time (its Table II: 58.4% / 31.2%), which ``frame_retrieval`` (default on) follows.

As in ReKV's question answering, a question (a text chunk of several query rows) retrieves once and its
decode steps attend to the blocks it chose (``once_per_question``; ``False`` re-selects at every step).
ReKV's always-attended ``n_init`` tokens are the session's text here, and its local window ``n_local`` is
``keep_recent`` (the README's 15,000 tokens exceeds our streams; ``lfmsift kv-eval`` sets it to 256).
Follows ``model/attention/kv_cache_manager.py`` and ``rekv_attention.py`` of Becomebright/ReKV.

Differences from ReKV's code, kept the same for every retriever here: keys are stored after RoPE at their
original positions (ReKV stores them before RoPE and re-assigns positions), and the current chunk always
attends to itself. ``block_tokens`` splits a chunk into blocks (for text streams; a video frame is one
block, as in ReKV); the budget is ``topk`` blocks or else ``fraction`` of the blocks (V-Rex's accuracy study
caps fixed top-k methods at 50%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lfmsift.kv.retriever import LayerIndex, Retriever, register


def block_logits(query_mean: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """Logits (blocks,) of ReKV: ``query_mean`` (heads, dim) against ``representatives`` (blocks,
    kv_heads, dim), KV heads expanded to their query heads and all heads concatenated."""
    heads, kv_heads = query_mean.shape[0], representatives.shape[1]
    expanded = representatives.repeat_interleave(heads // kv_heads, dim=1)  # (blocks, heads, dim)
    return torch.einsum("hd,bhd->b", query_mean.float(), expanded.float())


def top_blocks(logits: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest logits (ties to the earlier block)."""
    order = torch.sort(logits, descending=True, stable=True).indices
    return order[: max(0, min(count, logits.numel()))]


class ReKVIndex(LayerIndex):
    def __init__(self, config: ReKV, num_kv_heads: int) -> None:
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.representatives: list[torch.Tensor] = []  # per block (kv_heads, dim), fp32
        self._held: torch.Tensor | None = None  # the last question's selection, reused while decoding

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        tokens = keys.shape[1]
        size = self.config.block_tokens or tokens
        ids = []
        for start in range(0, tokens, size):
            self.representatives.append(keys[:, start : start + size].float().mean(1).cpu())
            ids.append(torch.full((min(size, tokens - start),), len(self.representatives) - 1, dtype=torch.int64))
        return torch.cat(ids)

    def budget(self, blocks: int) -> int:
        if self.config.topk is not None:
            return min(self.config.topk, blocks)
        return max(1, math.ceil(self.config.fraction * blocks))

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor | None:
        blocks = len(self.representatives)
        if stage == "frame" and not self.config.frame_retrieval:
            return None
        if stage == "text" and queries.shape[1] == 1 and self.config.once_per_question \
                and self._held is not None and self._held.shape[1] == blocks:
            return self._held  # a decode step: the blocks the question retrieved
        mask = torch.zeros(self.num_kv_heads, blocks, dtype=torch.bool)
        if blocks:
            logits = block_logits(queries.float().mean(1).cpu(), torch.stack(self.representatives))
            mask[:, top_blocks(logits, self.budget(blocks))] = True
        self._held = mask if stage == "text" else None
        return mask

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        reps = len(self.representatives)
        return {"blocks": reps, "index_bytes": reps * self.num_kv_heads * (
            self.representatives[0].shape[-1] if reps else 0) * value_bytes}


@register
@dataclass
class ReKV(Retriever):
    """ReKV: top blocks (frames) by mean key, shared by all heads of a layer."""

    name: ClassVar[str] = "rekv"
    topk: int | None = None
    fraction: float = 0.5
    block_tokens: int | None = None
    frame_retrieval: bool = True
    once_per_question: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.block_tokens is not None and self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        return ReKVIndex(self, num_kv_heads)
