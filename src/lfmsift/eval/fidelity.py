"""Fidelity to a reference on the same inputs: agreement of generated tokens and KL of next-token distributions.

Where there is no ground truth to score against (a VLM whose vision tower is not the published one; a
retriever against the full KV cache), what a cheaper model must do is follow the reference. For each sample
(a dict of model inputs: ``input_ids`` and, for a VLM, ``pixel_values``...), batch size 1:

- the reference decodes `new_tokens` tokens greedily (a fixed count, no stop at EOS) and records the
  log-distribution of every next token: position 0 comes from the prefill, positions 1.. from decode steps
  that feed its own tokens through the KV cache;
- the candidate is run *teacher-forced* on the reference's tokens through the same prefill + decode path,
  giving ``KL(reference || candidate)`` at every position (``kl_first``: the prefill's prediction;
  ``kl_decode``: the decode steps', where online pruning acts) and the share of positions whose argmax
  agrees (``top1``);
- the candidate also decodes greedily on its own; its continuation is compared with the reference's by
  `agreement.compare` (exact match, token F1, common prefix).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lfmsift.eval.agreement import compare


@dataclass
class Reference:
    """The reference's greedy tokens (samples of (new_tokens,)) and their log-probabilities (new_tokens, vocab)."""

    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor]


@dataclass
class FidelityResult:
    kl: float
    kl_first: float
    kl_decode: float | None
    top1: float
    exact_match: float
    token_f1: float
    prefix: float
    samples: int
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _to(inputs: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@torch.no_grad()
def decode(model, inputs: dict, new_tokens: int, forced: torch.Tensor | None = None):
    """Prefill `inputs` (batch 1), then `new_tokens - 1` decode steps; returns (tokens, logprobs).

    Each step feeds the previous token: the greedy one, or ``forced[j]`` when given (teacher forcing).
    ``logprobs`` is (new_tokens, vocab) float32 on the CPU: the distribution of each next token.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1; got {new_tokens}")
    if forced is not None and forced.numel() < new_tokens:
        raise ValueError(f"{forced.numel()} forced tokens for {new_tokens} positions")
    device = next(model.parameters()).device
    inputs = _to(inputs, device)
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("fidelity runs one sample at a time (batch size 1)")
    out = model(**inputs, use_cache=True)
    mask = inputs.get("attention_mask")
    tokens, logprobs = [], []
    for j in range(new_tokens):
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        logprobs.append(lp.cpu())
        tok = forced[j].to(device) if forced is not None else lp.argmax()
        tokens.append(int(tok))
        if j == new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        step = {"input_ids": tok.reshape(1, 1), "past_key_values": out.past_key_values, "use_cache": True}
        if mask is not None:
            step["attention_mask"] = mask
        out = model(**step)
    return torch.tensor(tokens), torch.stack(logprobs)


def reference(model, samples: list[dict], new_tokens: int) -> Reference:
    """Greedy tokens and next-token log-probabilities of the reference model on every sample."""
    runs = [decode(model, s, new_tokens) for s in samples]
    return Reference([t for t, _ in runs], [lp for _, lp in runs])


def kl_divergence(ref_logprobs: torch.Tensor, cand_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || cand) per row of two (positions, vocab) log-probability tensors (float64)."""
    p = ref_logprobs.double()
    return (p.exp() * (p - cand_logprobs.double())).sum(-1)


def measure(model, samples: list[dict], ref: Reference) -> FidelityResult:
    """`FidelityResult` of `model` (e.g. pruned) against `ref` on the same samples."""
    if len(samples) != len(ref.tokens):
        raise ValueError(f"{len(samples)} samples for a reference of {len(ref.tokens)}")
    new_tokens = ref.tokens[0].numel()
    kls, hits, own = [], [], []
    for sample, tokens, ref_lp in zip(samples, ref.tokens, ref.logprobs):
        _, cand_lp = decode(model, sample, new_tokens, forced=tokens)
        kls.append(kl_divergence(ref_lp, cand_lp))
        hits.append((cand_lp.argmax(-1) == tokens).double())  # the reference's tokens are its argmax
        own.append(decode(model, sample, new_tokens)[0])
    kl = torch.stack(kls)  # (samples, new_tokens)
    agree = compare(torch.stack(own), torch.stack(ref.tokens))
    return FidelityResult(
        kl=float(kl.mean()),
        kl_first=float(kl[:, 0].mean()),
        kl_decode=float(kl[:, 1:].mean()) if new_tokens > 1 else None,
        top1=float(torch.stack(hits).mean()),
        exact_match=agree.exact_match,
        token_f1=agree.token_f1,
        prefix=agree.prefix,
        samples=len(samples),
        new_tokens=new_tokens,
    )


# -- streaming sessions (a KV retriever against the full cache) ---------------------------------------------
@dataclass
class StreamReference:
    """The full cache's answers to each question after a stream: greedy tokens and next-token log-probs."""

    tokens: list[list[int]]
    logprobs: list[torch.Tensor]


def _stream(model, processor, retriever, frames, budget=None):
    from lfmsift.stream.session import StreamingSession

    session = StreamingSession(model, processor, retriever=retriever, budget=budget)
    for frame in frames:
        session.feed(frame)
    return session


def stream_reference(model, processor, frames, questions: list[str], new_tokens: int, budget=None) -> StreamReference:
    """Stream ``frames`` with the full cache and answer ``questions`` in turn (each answer stays in the
    cache for the next question): ``new_tokens`` greedy tokens each (a stop token ends an answer early)."""
    from lfmsift.kv.retriever import Full

    tokens, logprobs = [], []
    with _stream(model, processor, Full(), frames, budget) as session:
        for q in questions:
            answer = session.ask(q, max_new_tokens=new_tokens, keep_logits=True)
            tokens.append(answer.token_ids)
            logprobs.append(torch.log_softmax(answer.logits, -1))
    return StreamReference(tokens, logprobs)


def stream_fidelity(model, processor, retriever, frames, questions: list[str], ref: StreamReference,
                    budget=None) -> dict:
    """Stream ``frames`` through ``retriever`` and answer ``questions`` teacher-forced on the reference's
    answers (so every question sees the same conversation): mean ``KL(full || retriever)`` per answer token
    (``kl_first``: the first token, predicted right after the question's prefill), the share of tokens whose
    argmax is the reference's (``top1``), and the session's retrieval statistics."""
    if len(questions) != len(ref.tokens):
        raise ValueError(f"{len(questions)} questions for a reference of {len(ref.tokens)} answers")
    kls, firsts, hits = [], [], []
    with _stream(model, processor, retriever, frames, budget) as session:
        for q, tokens, ref_lp in zip(questions, ref.tokens, ref.logprobs):
            answer = session.ask(q, max_new_tokens=len(tokens), keep_logits=True, forced=tokens)
            cand = torch.log_softmax(answer.logits, -1)
            kl = kl_divergence(ref_lp, cand)
            kls.append(kl)
            firsts.append(float(kl[0]))
            hits.append((cand.argmax(-1) == torch.tensor(tokens)).double())
        stats = session.stats()
    kl = torch.cat(kls)
    return {"kl": float(kl.mean()), "kl_first": sum(firsts) / len(firsts), "top1": float(torch.cat(hits).mean()),
            "tokens": int(kl.numel()), "stats": stats}
