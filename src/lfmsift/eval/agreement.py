"""Generation agreement: do a pruned model's greedy continuations match the dense model's?

The POP paper's generation tasks (CoQA, GSM8K, HumanEval...) need their own data and graders; what they
reward is a decode path that keeps producing what the dense model would. This measures that directly on
real text: each sample is a prompt of `prompt_len` tokens of the text, both models continue it greedily for
`new_tokens` tokens, and the continuations are compared:

- ``exact_match``: fraction of samples whose continuation equals the dense one token for token;
- ``token_f1``: SQuAD-style F1 of the two continuations as bags of token ids, averaged over samples;
- ``prefix``: mean length of the common prefix, as a fraction of `new_tokens` (where they first diverge).

Greedy decoding runs a fixed number of steps (no early stop at EOS) with a KV cache, so both sides decode
the same number of tokens through the model's decode path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch

from lfmsift.eval.perplexity import make_windows, resolve_bos, tokenize_text
from lfmsift.models.adapters import cache_argument


@dataclass
class AgreementResult:
    exact_match: float
    token_f1: float
    prefix: float
    samples: int
    prompt_len: int
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def agreement_prompts(tokenizer, text: str, prompt_len: int = 64, samples: int = 16, add_bos: bool | None = None):
    """(samples, prompt_len [+1 with BOS]) prompt ids cut from consecutive slices of `text`."""
    ids = tokenize_text(tokenizer, text)
    prompts = make_windows(ids, prompt_len, samples)
    if prompts.shape[0] < samples:
        raise ValueError(f"The text holds {prompts.shape[0]} prompts of {prompt_len} tokens; {samples} were asked for")
    _, bos_id = resolve_bos(tokenizer, add_bos)
    if bos_id is not None:
        prompts = torch.cat([torch.full((prompts.shape[0], 1), bos_id, dtype=prompts.dtype), prompts], dim=1)
    return prompts


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, batch_size: int = 8) -> torch.Tensor:
    """(samples, new_tokens) greedy continuations, `batch_size` prompts at a time."""
    device = next(model.parameters()).device
    outs = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start : start + batch_size].to(device)
        out = model(input_ids=ids, use_cache=True)
        cache, tokens = out.past_key_values, []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            tokens.append(nxt)
            if len(tokens) == new_tokens:
                break
            out = model(input_ids=nxt, **cache_argument(model, cache), use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        outs.append(torch.cat(tokens, dim=1).cpu())
    return torch.cat(outs)


def token_f1(a: list[int], b: list[int]) -> float:
    """F1 of two token sequences as bags (SQuAD's token F1 on ids)."""
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(candidate: torch.Tensor, reference: torch.Tensor, prompt_len: int = 0) -> AgreementResult:
    """`AgreementResult` of two (samples, new_tokens) continuations."""
    if candidate.shape != reference.shape:
        raise ValueError(f"Continuations differ in shape: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    n, t = reference.shape
    rows = [(c.tolist(), r.tolist()) for c, r in zip(candidate, reference)]
    return AgreementResult(
        exact_match=sum(c == r for c, r in rows) / n,
        token_f1=sum(token_f1(c, r) for c, r in rows) / n,
        prefix=sum(common_prefix(c, r) for c, r in rows) / (n * t),
        samples=n,
        prompt_len=prompt_len,
        new_tokens=t,
    )
