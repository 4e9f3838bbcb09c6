"""Calibration statistics for the static baselines (Wanda-sp, FLAP) and Probe Pruning's history.

The baselines score attention heads by the inputs of ``o_proj`` and FFN channels by the inputs of
``down_proj``. One dense forward pass over calibration text, with forward hooks on those projections,
collects per layer and per input column: the token count, the sum and the sum of squares (float64, so the
mean, the population variance and the squared norm are exact), and optionally the mean square at each
sequence position (Probe Pruning's per-position history).

Calibration text defaults to PTB (``ptb``; any text file works), cut into `samples` consecutive windows of
`seqlen` tokens. The papers used C4 (Wanda-sp, FLAP and PP in the POP paper: 2,000 x 1,024 tokens; FLAP's
own repo: WikiText-2); C4 is not available offline and WikiText-2 is our evaluation set, so PTB stands in.
All statistics come from the dense model in one pass (FLAP's adaptive structure does the same; Wanda-sp in
FLAP's repo re-runs each layer after pruning the previous ones -- see `wanda_sp`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lfmsift.eval.data import load_text
from lfmsift.eval.perplexity import make_windows, resolve_bos, tokenize_text
from lfmsift.models.adapters import ModelView, MoEFFN, describe
from lfmsift.prune.experts import routed

logger = logging.getLogger(__name__)


@dataclass
class ColumnStats:
    """Running statistics of the input columns of one projection."""

    count: int = 0
    total: torch.Tensor | None = None  # sum over tokens, per column (float64)
    total_sq: torch.Tensor | None = None  # sum of squares over tokens, per column (float64)
    position_sq: torch.Tensor | None = None  # (positions, columns) sum of squares over samples (float64)
    position_count: torch.Tensor | None = None  # (positions,) samples seen at each position
    track_positions: bool = False

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add a batch of inputs ``x`` (batch, tokens, columns); `mask` (batch, tokens) marks real tokens."""
        x = x.detach().double()
        if mask is not None:
            x = x * mask.to(x.dtype).unsqueeze(-1)
            n = int(mask.sum())
        else:
            n = x.shape[0] * x.shape[1]
        flat = x.reshape(-1, x.shape[-1])
        s, sq = flat.sum(0), flat.square().sum(0)
        self.total = s if self.total is None else self.total.to(s.device) + s
        self.total_sq = sq if self.total_sq is None else self.total_sq.to(sq.device) + sq
        self.count += n
        if self.track_positions:
            pos_sq = x.square().sum(0)  # (tokens, columns)
            pos_n = (mask.sum(0) if mask is not None else torch.full((x.shape[1],), x.shape[0])).double()
            if self.position_sq is None:
                self.position_sq, self.position_count = pos_sq, pos_n.to(pos_sq.device)
            else:
                t = max(self.position_sq.shape[0], pos_sq.shape[0])
                self.position_sq = _pad_rows(self.position_sq, t) + _pad_rows(pos_sq, t)
                self.position_count = _pad_rows(self.position_count, t) + _pad_rows(pos_n.to(pos_sq.device), t)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.total_sq / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over calibration tokens (FLAP's fluctuation)."""
        return (self.mean_sq - self.mean.square()).clamp_min(0)

    def position_mean_sq(self) -> torch.Tensor:
        """(positions, columns): mean over calibration samples of x^2 at each position."""
        return self.position_sq / self.position_count.clamp_min(1).unsqueeze(-1)


def ffn_column_stats(layer, positions: bool = False) -> ColumnStats | list[ColumnStats]:
    """Empty statistics for the down-projection inputs of `layer`'s FFN (one per routed expert for MoE)."""
    if isinstance(layer.ffn, MoEFFN):  # zeros, so an expert no calibration token reached has statistics too
        n = layer.ffn.experts.intermediate_size
        zeros = lambda: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return [ColumnStats(total=zeros(), total_sq=zeros()) for _ in range(layer.ffn.experts.num_experts)]
    return ColumnStats(track_positions=positions)


def ffn_input_hooks(layer, stats: ColumnStats | list[ColumnStats]) -> list:
    """Forward hooks adding the down-projection inputs of `layer`'s FFN to `stats`; returns the handles.

    Dense FFN: the inputs of ``down_proj``. MoE: the fused experts have no per-expert module to hook, so a
    hook on the experts recomputes ``act(gate) * up`` of each expert for the tokens routed to it.
    """
    ffn = layer.ffn
    if not isinstance(ffn, MoEFFN):
        return [ffn.down_proj.register_forward_hook(lambda m, i, o: stats.add(i[0], None))]
    experts = ffn.experts
    inter = experts.intermediate_size

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        for e, _, tok in routed(index, experts.num_experts):
            w = experts.gate_up_proj[e]
            x = hidden[tok]
            h = experts.act_fn(x @ w[:inter].T) * (x @ w[inter:].T)
            stats[e].add(h.unsqueeze(0), None)

    return [experts.module.register_forward_hook(hook, with_kwargs=True)]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad])


@dataclass
class CalibrationStats:
    """Per decoder layer: statistics of the ``o_proj`` inputs and of the ``down_proj`` inputs.

    For a mixture-of-experts layer ``ffn[i]`` is a list with one `ColumnStats` per routed expert, built
    from the tokens the router sent to that expert (see `ffn_input_hooks`).
    """

    attention: list[ColumnStats] = field(default_factory=list)
    ffn: list[ColumnStats | list[ColumnStats]] = field(default_factory=list)
    samples: int = 0
    seqlen: int = 0
    source: str = ""


def calibration_windows(tokenizer, text: str, samples: int, seqlen: int) -> torch.Tensor:
    """`samples` consecutive windows of `seqlen` tokens of `text` (fewer if the text is short)."""
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seqlen:
        raise ValueError(f"The calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return make_windows(ids, seqlen, samples)


def text_windows(tokenizer, calibration: str, samples: int, seqlen: int, data_dir=None):
    """(calibration windows of `calibration` text, BOS id to prepend or None)."""
    windows = calibration_windows(tokenizer, load_text(calibration, data_dir), samples, seqlen)
    return windows, resolve_bos(tokenizer, None)[1]


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer,
    calibration: str = "ptb",
    samples: int = 64,
    seqlen: int = 512,
    batch_size: int = 8,
    positions: bool = False,
    data_dir=None,
    view: ModelView | None = None,
    progress: bool = False,
) -> CalibrationStats:
    """Run the dense model over calibration text and collect `CalibrationStats`.

    Args:
        calibration: a text set name (``ptb``) or a text file path. Never the evaluation text.
        samples, seqlen: number and length of the calibration windows.
        positions: also keep per-position mean squares (Probe Pruning's history).
    """
    windows, bos_id = text_windows(tokenizer, calibration, samples, seqlen, data_dir)
    stats = collect_windows(model, windows, bos_id, batch_size, positions, view, progress)
    stats.source = str(calibration)
    logger.info("Calibrated on %d x %d tokens of %s", stats.samples, seqlen, calibration)
    return stats


@torch.no_grad()
def collect_windows(
    model: nn.Module,
    windows: torch.Tensor,
    bos_id: int | None = None,
    batch_size: int = 8,
    positions: bool = False,
    view: ModelView | None = None,
    progress: bool = False,
) -> CalibrationStats:
    """`collect` on token windows already cut: (samples, seqlen) ids, BOS prepended when `bos_id` is set."""
    view = view or describe(model)
    stats = CalibrationStats(
        attention=[ColumnStats(track_positions=positions) for _ in view.layers],
        ffn=[ffn_column_stats(layer, positions) for layer in view.layers],
        samples=windows.shape[0],
        seqlen=windows.shape[1],
        source="token windows",
    )
    handles = []
    for layer, a_stats, f_stats in zip(view.layers, stats.attention, stats.ffn):
        handles.append(layer.attention.o_proj.register_forward_hook(lambda m, i, o, s=a_stats: s.add(i[0], None)))
        handles.extend(ffn_input_hooks(layer, f_stats))
    device = next(model.parameters()).device
    batches = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="calibration", unit="batch")
    try:
        for start in batches:
            batch = windows[start : start + batch_size].to(device)
            if bos_id is not None:
                batch = torch.cat([torch.full((batch.shape[0], 1), bos_id, device=device), batch], dim=1)
            view.language_model(input_ids=batch, use_cache=False)  # the decoder stack: no LM-head logits
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclass
class CalibratedMethod:
    """Settings shared by the methods that calibrate (`wanda_sp`, `flap`, `probe`).

    Either pass `calib_stats` (from `collect`, e.g. to reuse one calibration for several targets; or a
    function returning them, called only by methods that use them) or a `tokenizer` so the method can
    calibrate itself on `calibration` text.
    """

    target: float = 0.2
    tokenizer: object = None
    calib_stats: CalibrationStats | Callable[[], CalibrationStats] | None = None
    calibration: str = "ptb"
    calib_samples: int = 64
    calib_seqlen: int = 512
    data_dir: object = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"{self.name}: the target must be in [0, 1); got {self.target}")
        if self.calib_stats is None and self.tokenizer is None:
            raise ValueError(f"{self.name} calibrates on text: pass tokenizer= (or precomputed calib_stats=)")

    def calibration_stats(self, model, view: ModelView, positions: bool = False) -> CalibrationStats:
        stats = self.calib_stats() if callable(self.calib_stats) else self.calib_stats
        if stats is not None and (not positions or stats.attention[0].position_sq is not None):
            return stats
        return collect(
            model, self.tokenizer, self.calibration, self.calib_samples, self.calib_seqlen,
            positions=positions, data_dir=self.data_dir, view=view,
        )
