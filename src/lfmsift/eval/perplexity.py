"""Perplexity with the standard protocol of the pruning literature (SparseGPT, Wanda, FLAP, POP).

The evaluation text is tokenized once as a whole (no special tokens), cut into non-overlapping windows
of ``seqlen`` tokens (the incomplete tail is dropped), and each window is scored independently:
perplexity = exp(total negative log-likelihood / number of predicted tokens).

BOS: models that need a beginning-of-sequence token (Gemma) get one prepended to every window, so that
all ``seqlen`` text tokens of the window are predicted (the first from BOS). Models whose tokenizer does
not add BOS (Llama-2 style without it, SmolLM2) see the bare window, whose first token is context only
and ``seqlen - 1`` tokens are predicted. `add_bos=None` decides from the tokenizer: BOS is prepended when
the tokenizer itself adds it to encoded text.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    windows: int
    windows_available: int
    seqlen: int
    add_bos: bool
    text_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer prepends its BOS token to encoded text (Gemma, Llama-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, without special tokens."""
    if not text:
        raise ValueError("Cannot compute perplexity of an empty text")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def make_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows; the tail shorter than seqlen is dropped."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if windows is None else min(windows, available)
    if n <= 0:
        raise ValueError(f"windows must be positive, got {windows}")
    return ids[: n * seqlen].view(n, seqlen)


def resolve_bos(tokenizer, add_bos: bool | None) -> tuple[bool, int | None]:
    """(add_bos, bos_id): None decides from the tokenizer; asking for BOS without one is an error."""
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    bos_id = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    return bool(add_bos), bos_id


def score_batches(chunks: torch.Tensor, batch_size: int, nll_fn, desc: str, unit: str, progress: bool):
    """Sum `nll_fn(batch) -> (nll, count)` over batches of rows of `chunks`, with a progress bar."""
    nll_sum, count = 0.0, 0
    bar = tqdm(total=chunks.shape[0], desc=desc, unit=unit, disable=not progress)
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size]
        nll, n = nll_fn(batch)
        nll_sum += nll
        count += n
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    bar.close()
    return nll_sum, count


@torch.no_grad()
def window_nll(model, batch: torch.Tensor, bos_id: int | None) -> tuple[float, int]:
    """Summed next-token NLL of a (b, seqlen) batch of windows and the number of predicted tokens.

    With `bos_id`, BOS is prepended and every window token is predicted.
    """
    device = next(model.parameters()).device
    inputs = batch.to(device)
    if bos_id is not None:
        bos = torch.full((inputs.shape[0], 1), bos_id, dtype=inputs.dtype, device=device)
        inputs = torch.cat([bos, inputs], dim=1)
    logits = model(input_ids=inputs, use_cache=False).logits[:, :-1].float()
    targets = inputs[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel()


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 1024,
    windows: int | None = None,
    batch_size: int = 1,
    add_bos: bool | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on `text` (see the module docstring for the protocol).

    Args:
        seqlen: window length in text tokens (1024 by default here; the papers use 2048 or 4096 for 7B).
        windows: score only the first N windows (all by default).
        batch_size: windows per forward pass.
        add_bos: prepend BOS to each window; None decides from the tokenizer.
    """
    ids = tokenize_text(tokenizer, text)
    chunks = make_windows(ids, seqlen, windows)
    model.eval()
    add_bos, bos_id = resolve_bos(tokenizer, add_bos)
    nll_sum, count = score_batches(
        chunks, batch_size, lambda batch: window_nll(model, batch, bos_id), "perplexity", "window", progress
    )
    return PerplexityResult(
        perplexity=math.exp(nll_sum / count),
        nll_sum=nll_sum,
        tokens_scored=count,
        windows=chunks.shape[0],
        windows_available=ids.numel() // seqlen,
        seqlen=seqlen,
        add_bos=bool(add_bos),
        text_tokens=ids.numel(),
    )
