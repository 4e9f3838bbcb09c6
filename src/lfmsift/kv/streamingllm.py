"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks + a recent window; everything between is evicted.

The first ``sinks`` streamed tokens (4) and the last ``window`` are kept, for every head and in both stages;
the rest is never attended again (destructive: here the store keeps it, but no selection can bring it
back, which is the same to the model). The streamed content is what is evicted; text (system prompt,
questions, answers) stays, as for every retriever here, and the model's own first tokens are part of that
text. StreamingLLM re-assigns positions inside its cache; here keys keep the positions they were written
with, like every other retriever, so the comparison isolates which tokens are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lfmsift.kv.retriever import LayerIndex, Retriever, register


def sink_window_mask(tokens: int, sinks: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(tokens,) bool: the first ``sinks`` and the last ``window`` of ``tokens`` streamed tokens."""
    idx = torch.arange(tokens, device=device)
    return (idx < sinks) | (idx >= tokens - window)


class SinkWindowIndex(LayerIndex):
    """One group per streamed token (groups are token order)."""

    def __init__(self, config: StreamingLLM, num_kv_heads: int, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.tokens = 0
        self.device = device  # where ids and masks are made ("cpu" for the reference path)

    def assign(self, keys: torch.Tensor, position: int | None = None) -> torch.Tensor:
        ids = torch.arange(self.tokens, self.tokens + keys.shape[1], dtype=torch.int64, device=self.device)
        self.tokens += keys.shape[1]
        return ids

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor:
        keep = sink_window_mask(self.tokens, self.config.sinks, self.config.window, self.device)
        return keep.expand(self.num_kv_heads, -1).clone()


@register
@dataclass
class StreamingLLM(Retriever):
    """Attention sinks + recent window (tokens of the stream)."""

    name: ClassVar[str] = "streamingllm"
    sinks: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"sinks and window must be >= 0, got {self.sinks}, {self.window}")

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        return SinkWindowIndex(self, num_kv_heads)

    def device_index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device,
                     window: int | None = None) -> LayerIndex:
        return SinkWindowIndex(self, num_kv_heads, device)
