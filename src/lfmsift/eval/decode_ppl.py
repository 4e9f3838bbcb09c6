"""Teacher-forced decode perplexity: the metric that exercises a model's decode path.

Plain perplexity scores every token from one parallel forward pass, so an online pruning method is only
ever seen through its prefill partition. Here each sample is a prompt of P tokens, prefilled once with a
KV cache, followed by N decode steps that feed the true next token one at a time; the N predictions made
by the decode steps are scored:

    sample = t_0 .. t_{P-1} | t_P .. t_{P+N}
    prefill t_0..t_{P-1}; step j feeds t_{P+j} and predicts t_{P+j+1}, j = 0..N-1.

The prediction of t_P (made by the prefill) is not scored. Samples are consecutive non-overlapping slices
of the tokenized text; models whose tokenizer adds BOS get it before each prompt (see `perplexity`).
Samples are decoded in batches of `batch_size` without padding; batch-shared pruning masks (POP) are then
shared by those samples, as in the paper (which evaluates with batch 10).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lfmsift.eval.perplexity import resolve_bos, score_batches, tokenize_text
from lfmsift.models.adapters import cache_argument


@dataclass
class DecodePerplexityResult:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    samples: int
    prompt_len: int
    new_tokens: int
    batch_size: int
    add_bos: bool

    def to_dict(self) -> dict:
        return asdict(self)


def decode_samples(ids: torch.Tensor, prompt_len: int, new_tokens: int, samples: int) -> torch.Tensor:
    """(samples, prompt_len + new_tokens + 1) consecutive non-overlapping slices of `ids`."""
    if prompt_len < 1 or new_tokens < 1 or samples < 1:
        raise ValueError(f"prompt_len, new_tokens and samples must be >= 1; got {prompt_len}, {new_tokens}, {samples}")
    length = prompt_len + new_tokens + 1
    available = ids.numel() // length
    if available < samples:
        raise ValueError(f"The text holds {available} samples of {length} tokens; {samples} were asked for")
    return ids[: samples * length].view(samples, length)


@torch.no_grad()
def decode_nll(model, batch: torch.Tensor, prompt_len: int, bos_id: int | None) -> tuple[float, int]:
    """Summed NLL of the decode-step predictions for a (b, P + N + 1) batch, and the count."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    prompt = batch[:, :prompt_len]
    if bos_id is not None:
        prompt = torch.cat([torch.full_like(prompt[:, :1], bos_id), prompt], dim=1)
    out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    nll = torch.zeros((), dtype=torch.float64, device=device)
    steps = batch.shape[1] - prompt_len - 1
    for j in range(steps):
        fed = batch[:, prompt_len + j : prompt_len + j + 1]
        out = model(input_ids=fed, **cache_argument(model, cache), use_cache=True)
        cache = out.past_key_values
        target = batch[:, prompt_len + j + 1]
        nll += F.cross_entropy(out.logits[:, -1].float(), target, reduction="sum").double()
    return nll.item(), steps * batch.shape[0]


def decode_perplexity(
    model,
    tokenizer,
    text: str,
    prompt_len: int = 128,
    new_tokens: int = 128,
    samples: int = 16,
    batch_size: int = 1,
    add_bos: bool | None = None,
    progress: bool = True,
) -> DecodePerplexityResult:
    """Decode perplexity of `model` on `text` (see the module docstring)."""
    ids = tokenize_text(tokenizer, text)
    chunks = decode_samples(ids, prompt_len, new_tokens, samples)
    add_bos, bos_id = resolve_bos(tokenizer, add_bos)
    model.eval()
    nll_sum, count = score_batches(
        chunks, batch_size, lambda batch: decode_nll(model, batch, prompt_len, bos_id), "decode perplexity",
        "sample", progress,
    )
    return DecodePerplexityResult(
        perplexity=math.exp(nll_sum / count),
        nll_sum=nll_sum,
        tokens_scored=count,
        samples=samples,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=batch_size,
        add_bos=bool(add_bos),
    )
