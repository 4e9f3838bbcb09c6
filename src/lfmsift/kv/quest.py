"""Quest (Tang et al., ICML 2024): pages of keys with elementwise min / max, top pages per head.

Rules from the public code (digest §5.4): the cache is cut into pages of ``page_size`` consecutive tokens
(16); each page keeps the elementwise minimum and maximum of its keys; a query's page score is
``sum_d max(q_d * min_d, q_d * max_d)``, an upper bound of ``q . k`` over the page; the top
``max(min_pages, budget / page_size)`` pages are attended. Quest runs only while decoding: prefill (here
the frame stage, and any chunk of more than one query row: a question's prefill, as the reference's
``q_len > 1`` branch; unless ``prefill``) and the first ``dense_layers`` layers (2) attend densely. The
budget is ``token_budget`` tokens when given (the reference's ``--token_budget``: ``max(3, budget // 16)``
pages), else ``budget`` as a fraction of the stored frame tokens. Follows ``evaluation/quest_attention.py``
of mit-han-lab/Quest.

With GQA, one selection per KV head: a page's score is the maximum over the query heads of the group and
over the chunk's rows (the upper bound that any of them could reach). Pages fill with consecutive frame
tokens in arrival order (a page may span two frames); ``budget`` is a fraction of the stored frame tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lfmsift.kv.retriever import LayerIndex, Retriever, _ChunkIndex, register


def page_scores(queries: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Upper bounds (kv_heads, pages): ``queries`` (heads, rows, dim) against ``page_min`` / ``page_max``
    (kv_heads, pages, dim); max over the rows and the query heads of each KV group."""
    heads, rows, dim = queries.shape
    kv_heads = page_min.shape[0]
    q = queries.float().reshape(kv_heads, heads // kv_heads * rows, 1, dim)
    bound = torch.maximum(q * page_min.float()[:, None], q * page_max.float()[:, None]).sum(-1)
    return bound.amax(1)


class QuestIndex(LayerIndex):
    def __init__(self, config: Quest, num_kv_heads: int, head_dim: int) -> None:
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.page_min = torch.zeros(num_kv_heads, 0, head_dim)
        self.page_max = torch.zeros(num_kv_heads, 0, head_dim)
        self.fill = 0  # tokens in the last page
        self.tokens = 0

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.float().cpu()
        size = self.config.page_size
        ids = torch.empty(keys.shape[1], dtype=torch.int64)
        pos = 0
        while pos < keys.shape[1]:
            if self.fill == 0 or self.fill == size:  # open a page
                empty = torch.full((self.num_kv_heads, 1, keys.shape[2]), math.inf)
                self.page_min = torch.cat([self.page_min, empty], 1)
                self.page_max = torch.cat([self.page_max, -empty], 1)
                self.fill = 0
            take = min(size - self.fill, keys.shape[1] - pos)
            part = keys[:, pos : pos + take]
            self.page_min[:, -1] = torch.minimum(self.page_min[:, -1], part.amin(1))
            self.page_max[:, -1] = torch.maximum(self.page_max[:, -1], part.amax(1))
            ids[pos : pos + take] = self.page_min.shape[1] - 1
            self.fill += take
            pos += take
        self.tokens += keys.shape[1]
        return ids

    def pages_kept(self) -> int:
        pages = self.page_min.shape[1]
        if self.config.token_budget is not None:  # the reference: max(3, token_budget // chunk_size)
            want = min(self.tokens, self.config.token_budget) // self.config.page_size
        else:
            want = math.ceil(self.config.budget * self.tokens / self.config.page_size)
        return min(pages, max(self.config.min_pages, want))

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor | None:
        if not self.config.prefill and (stage == "frame" or queries.shape[1] > 1):
            return None  # the reference attends densely whenever q_len > 1
        pages = self.page_min.shape[1]
        mask = torch.zeros(self.num_kv_heads, pages, dtype=torch.bool)
        if pages:
            scores = page_scores(queries.cpu(), self.page_min, self.page_max)
            top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.pages_kept()]
            mask.scatter_(1, top, True)
        return mask

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        return {"pages": self.page_min.shape[1], "index_bytes": 2 * self.page_min.numel() * value_bytes}


@register
@dataclass
class Quest(Retriever):
    """Quest: query-aware top pages by min/max upper bound, per KV head, while decoding."""

    name: ClassVar[str] = "quest"
    budget: float = 0.5
    token_budget: int | None = None
    page_size: int = 16
    min_pages: int = 3
    dense_layers: int = 2
    prefill: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}")
        if self.token_budget is not None and self.token_budget < 0:
            raise ValueError(f"token_budget must be >= 0 or None, got {self.token_budget}")
        if self.page_size < 1 or self.min_pages < 0 or self.dense_layers < 0:
            raise ValueError("page_size must be >= 1, min_pages and dense_layers >= 0")

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        if layer < self.dense_layers:
            return _ChunkIndex()
        return QuestIndex(self, num_kv_heads, head_dim)
