"""InfiniGen (Lee et al., OSDI 2024) and InfiniGenP (V-Rex's extension of it to frame prefill).

Rules from the public code (digest §5.4):
- Skewing: per head an orthogonal matrix ``A`` from the SVD of sample queries, applied to queries and keys
  (``q A . k A = q . k``), so that a few columns carry most of ``q . k``.
- Partial columns: the ``partial_ratio`` (0.2) columns with the largest column sums of ``|Q A|``; a partial
  key cache keeps only those columns of the skewed keys.
- Speculation for layer l, made at layer l - 1: the previous layer's attention input times layer l's query
  projection (RoPE, then the skew), dotted with the partial keys -> approximate logits; a token counts if its
  logit exceeds ``max - alpha`` (alpha 5, the Llama accuracy code); the count is averaged over heads, capped
  at ``budget`` x the tokens, and each head takes its top-``count`` tokens.

Readings of ours (the paper's code is for decode and MHA): the skew and the columns come from an offline
pass over calibration text (``calibrate``, as the reference's skewing and partial-weight generation run
before serving; ``lfmsift kv-eval`` calibrates on PTB), else from the first ``calibration_rows`` query rows
the layer sees in the stream (the speedup code also picks columns at prefill; selection is dense until then); with GQA the skew is per KV head from its query heads' rows, and a
token's speculative logit is its maximum over the group's query heads and over the chunk's rows (a frame's
rows for InfiniGenP). InfiniGen selects only while generating (frame stage dense), InfiniGenP in both
stages; InfiniGen's question prefill (several query rows) is dense, as the reference's prefill is. The
speculative queries come from the cache (``needs_hint``); layer 0 attends densely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lfmsift.kv.retriever import LayerIndex, Retriever, _ChunkIndex, register


def skew_and_columns(queries: torch.Tensor, partial_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From sample queries (rows, dim): the skew ``A`` (dim, dim), right singular vectors of the queries,
    and the indices of the ``ceil(partial_ratio * dim)`` columns of ``Q A`` with the largest sum of |.|."""
    q = queries.double()
    _, _, vh = torch.linalg.svd(q, full_matrices=True)
    skew = vh.T
    cols = max(1, math.ceil(partial_ratio * q.shape[1]))
    columns = torch.sort((q @ skew).abs().sum(0), descending=True, stable=True).indices[:cols]
    return skew.float(), torch.sort(columns).values


def speculative_count(logits: torch.Tensor, alpha: float, cap: int) -> int:
    """InfiniGen's token count: per head the tokens whose logit exceeds the head's max - ``alpha``,
    averaged over heads (``logits``: (heads, tokens)), rounded, capped at ``cap`` (at least 1)."""
    if logits.shape[-1] == 0:
        return 0
    above = (logits > logits.amax(-1, keepdim=True) - alpha).sum(-1).double().mean()
    return int(max(1, min(cap, round(float(above)))))


class InfiniGenIndex(LayerIndex):
    """Per layer: the skew, its columns and the partial key cache (one group per streamed token)."""

    def __init__(self, config: InfiniGen, num_kv_heads: int, head_dim: int, scaling: float,
                 calibrated: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.config = config
        self.num_kv_heads, self.head_dim, self.scaling = num_kv_heads, head_dim, scaling
        self.samples: list[torch.Tensor] = []       # query rows per KV head, until the skew is fixed
        self.pending: list[torch.Tensor] = []       # raw keys written before the skew is fixed
        self.skew: torch.Tensor | None = None       # (kv_heads, dim, dim)
        self.columns: torch.Tensor | None = None    # (kv_heads, cols)
        if calibrated is not None:                  # offline: fixed before the stream starts
            self.skew, self.columns = calibrated
        self.partial = torch.zeros(num_kv_heads, 0, len(self.columns[0]) if calibrated is not None else 0)
        self.tokens = 0

    def _project(self, keys: torch.Tensor) -> torch.Tensor:
        """Skewed partial keys (kv_heads, tokens, cols)."""
        skewed = torch.einsum("htd,hde->hte", keys.float(), self.skew)
        return torch.gather(skewed, 2, self.columns[:, None, :].expand(-1, keys.shape[1], -1))

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.cpu()
        ids = torch.arange(self.tokens, self.tokens + keys.shape[1], dtype=torch.int64)
        self.tokens += keys.shape[1]
        if self.skew is None:
            self.pending.append(keys.float())
        else:
            self.partial = torch.cat([self.partial, self._project(keys)], 1)
        return ids

    def _calibrate(self, queries: torch.Tensor) -> None:
        heads, rows, dim = queries.shape
        grouped = queries.float().cpu().reshape(self.num_kv_heads, heads // self.num_kv_heads * rows, dim)
        self.samples.append(grouped)
        sample = torch.cat(self.samples, 1)
        if sample.shape[1] < self.config.calibration_rows:
            return
        pairs = [skew_and_columns(sample[h], self.config.partial_ratio) for h in range(self.num_kv_heads)]
        self.skew = torch.stack([p[0] for p in pairs])
        self.columns = torch.stack([p[1] for p in pairs])
        self.samples.clear()
        pending = torch.cat(self.pending, 1) if self.pending else torch.zeros(self.num_kv_heads, 0, dim)
        self.partial = self._project(pending)
        self.pending.clear()

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.skew is None:
            self._calibrate(queries)
        if hint is None or self.skew is None or (not self.config.prefill and (stage == "frame" or hint.shape[1] > 1)):
            return None  # InfiniGen speculates only while decoding: any multi-row prefill is dense
        heads, rows, dim = hint.shape
        q = hint.float().cpu().reshape(self.num_kv_heads, heads // self.num_kv_heads * rows, dim)
        q_partial = torch.gather(torch.einsum("hrd,hde->hre", q, self.skew), 2,
                                 self.columns[:, None, :].expand(-1, q.shape[1], -1))
        logits = torch.einsum("hrc,htc->hrt", q_partial, self.partial).amax(1) * self.scaling  # (kv_heads, tokens)
        mask = torch.zeros(self.num_kv_heads, self.tokens, dtype=torch.bool)
        count = speculative_count(logits, self.config.alpha, math.ceil(self.config.budget * self.tokens))
        if count:
            top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :count]
            mask.scatter_(1, top, True)
        return mask

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        return {"index_bytes": self.partial.numel() * value_bytes}


@register
@dataclass
class InfiniGen(Retriever):
    """InfiniGen: speculative top tokens per head from partial skewed keys, while generating."""

    name: ClassVar[str] = "infinigen"
    needs_hint: ClassVar[bool] = True
    alpha: float = 5.0
    budget: float = 0.5
    partial_ratio: float = 0.2
    calibration_rows: int = 64
    prefill: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection != "same_layer":
            raise ValueError("InfiniGen speculates from the previous layer itself; use selection='same_layer'")
        if not 0.0 < self.budget <= 1.0 or not 0.0 < self.partial_ratio <= 1.0:
            raise ValueError("budget and partial_ratio must be fractions in (0, 1]")
        if self.alpha <= 0 or self.calibration_rows < 1:
            raise ValueError("alpha must be > 0 and calibration_rows >= 1")

    def _calibration_table(self) -> dict:
        if not hasattr(self, "_calibration"):
            self._calibration: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        return self._calibration

    def calibrate(self, model, tokenizer, text: str, tokens: int = 512) -> None:
        """Offline skew and partial columns, as the reference computes them before serving: the post-RoPE
        queries of every layer over ``tokens`` tokens of ``text`` (one dense forward through a streaming
        session), grouped per KV head. Indexes made afterwards start with them instead of calibrating on the
        stream's first ``calibration_rows`` rows."""
        from lfmsift.stream.session import StreamingSession

        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) < 2:
            raise ValueError("the calibration text is too short")
        collector = _QueryCollector()
        with StreamingSession(model, tokenizer, retriever=collector, chat=False) as session:
            session.feed_tokens(ids)
        table = self._calibration_table()
        table.clear()
        for layer, queries in collector.queries.items():
            heads, rows, dim = queries.shape
            kv_heads = collector.kv_heads[layer]
            grouped = queries.float().cpu().reshape(kv_heads, heads // kv_heads * rows, dim)
            pairs = [skew_and_columns(grouped[h], self.partial_ratio) for h in range(kv_heads)]
            table[layer] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        return InfiniGenIndex(self, num_kv_heads, head_dim, head_dim ** -0.5,
                              self._calibration_table().get(layer))


class _QueryIndex(_ChunkIndex):
    def __init__(self, owner: _QueryCollector, layer: int, num_kv_heads: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer
        owner.kv_heads[layer] = num_kv_heads

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> None:
        self.owner.queries[self.layer] = queries.detach()
        return None


class _QueryCollector(Retriever):
    """Dense attention that keeps each layer's last post-RoPE queries (InfiniGen's offline calibration)."""

    name: ClassVar[str] = "_queries"

    def __init__(self) -> None:
        super().__init__()
        self.queries: dict[int, torch.Tensor] = {}
        self.kv_heads: dict[int, int] = {}

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        return _QueryIndex(self, layer, num_kv_heads)


@register
@dataclass
class InfiniGenP(InfiniGen):
    """InfiniGenP (V-Rex's baseline): InfiniGen applied during frame prefill too."""

    name: ClassVar[str] = "infinigen_p"
    prefill: bool = True
