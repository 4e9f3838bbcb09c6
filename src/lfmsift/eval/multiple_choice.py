"""Zero-shot multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Each choice is a request ``(context, continuation)``; its score is the summed log-probability of the
continuation tokens given the context. ``acc`` takes the highest score, ``acc_norm`` the highest score per
character of the choice (lm-eval's length normalisation). Prompt formats follow lm-eval's task
configs: ARC and PIQA ``"Question: {query}\\nAnswer:"``, OpenBookQA ``"{query}"``, choices as
``" {choice}"``. WinoGrande-style questions (``sentence`` with one ``_``) use partial scoring: the context is
the sentence up to the blank with the option filled in, the continuation the rest of the sentence, whose
likelihood is compared across options.

Tokenisation follows lm-eval: the pair is encoded as a whole and the continuation is what follows the
encoded context (trailing spaces of the context move to the continuation). Models whose tokenizer adds BOS
get it first (as `perplexity` does).

The choices of one question form one batch (left-padded, real positions given), scored in one forward
pass of context + continuation -- lm-eval's protocol, which the POP paper used. Online methods (POP, PP,
GRIFFIN) therefore see each question's choices as one batch and share its masks across choices; GRIFFIN's
prefill is dense by design, so a single pass scores it like the dense model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from lfmsift.eval.data import BlankQuestion, ChoiceQuestion
from lfmsift.eval.perplexity import resolve_bos

TEMPLATES: dict[str, str] = {
    "arc_easy": "Question: {query}\nAnswer:",
    "arc_challenge": "Question: {query}\nAnswer:",
    "piqa": "Question: {query}\nAnswer:",
    "openbookqa": "{query}",
}
DEFAULT_TEMPLATE = "{query}"


@dataclass
class ChoiceResult:
    """Scores of one question: log-likelihood and continuation length (characters) of each choice."""

    id: str
    label: int
    loglik: list[float]
    chars: list[int]

    @property
    def pred(self) -> int:
        return max(range(len(self.loglik)), key=lambda i: self.loglik[i])

    @property
    def pred_norm(self) -> int:
        return max(range(len(self.loglik)), key=lambda i: self.loglik[i] / max(1, self.chars[i]))


@dataclass
class MultipleChoiceResult:
    task: str
    acc: float
    acc_norm: float
    questions: int
    acc_stderr: float
    details: list[ChoiceResult] = field(default_factory=list, repr=False)

    def to_dict(self, details: bool = False) -> dict:
        d = asdict(self)
        if not details:
            d.pop("details")
        return d


def requests(question: ChoiceQuestion | BlankQuestion) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of a question, one per choice."""
    if isinstance(question, BlankQuestion):
        before, after = question.split()
        rest = " " + after.strip()
        return [(before + option, rest) for option in question.options]
    context = TEMPLATES.get(question.task, DEFAULT_TEMPLATE).format(query=question.query)
    return [(context, " " + choice) for choice in question.choices]


def encode_pair(tokenizer, context: str, continuation: str, bos_id: int | None) -> tuple[list[int], int]:
    """(token ids of context + continuation, number of continuation tokens), lm-eval style."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    n_cont = len(whole) - len(ctx)
    if n_cont <= 0:
        raise ValueError(f"The continuation {continuation!r} encodes to no tokens after its context")
    if bos_id is not None:
        whole = [bos_id] + whole
    return whole, n_cont


@torch.no_grad()
def continuation_logliks(model, sequences: list[list[int]], n_cont: list[int], pad_id: int) -> list[float]:
    """Summed log-probabilities of the last `n_cont[i]` tokens of each sequence, in one left-padded batch."""
    return [score for score, _ in continuation_scores(model, sequences, n_cont, pad_id)]


@torch.no_grad()
def continuation_scores(
    model, sequences: list[list[int]], n_cont: list[int], pad_id: int
) -> list[tuple[float, bool]]:
    """(summed log-probability, whether greedy decoding would produce it) of the last `n_cont[i]` tokens of
    each sequence, in one left-padded batch (lm-eval's ``loglikelihood`` pair)."""
    device = next(model.parameters()).device
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = max(n_cont) + 1
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        logits_to_keep=keep,
    )
    logp = F.log_softmax(out.logits[:, -keep:].float(), dim=-1)  # logits of the last `keep` positions
    scores = []
    for i, n in enumerate(n_cont):
        targets = ids[i, length - n:].to(logp.device)
        pred = logp[i, keep - 1 - n : keep - 1]  # position p predicts token p + 1
        greedy = bool((pred.argmax(-1) == targets).all())
        scores.append((pred.gather(-1, targets[:, None]).sum().item(), greedy))
    return scores


def score_question(model, tokenizer, question, bos_id: int | None, pad_id: int) -> ChoiceResult:
    """Log-likelihood of every choice of `question` (one batch)."""
    pairs = requests(question)
    encoded = [encode_pair(tokenizer, c, x, bos_id) for c, x in pairs]
    logliks = continuation_logliks(model, [e[0] for e in encoded], [e[1] for e in encoded], pad_id)
    # acc_norm divides by the characters of the choice itself, as lm-eval does (not its leading space)
    if isinstance(question, BlankQuestion):
        chars = [len(x.strip()) for _, x in pairs]
    else:
        chars = [len(c) for c in question.choices]
    return ChoiceResult(question.id, question.label, logliks, chars)


def multiple_choice(
    model,
    tokenizer,
    questions: list[ChoiceQuestion | BlankQuestion],
    task: str | None = None,
    add_bos: bool | None = None,
    progress: bool = True,
) -> MultipleChoiceResult:
    """Zero-shot accuracy (``acc``, ``acc_norm``) of `model` on `questions` (see the module docstring)."""
    if not questions:
        raise ValueError("No questions to score")
    _, bos_id = resolve_bos(tokenizer, add_bos)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model.eval()
    it = questions
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(questions, desc=task or questions[0].task, unit="q", leave=False)
    details = [score_question(model, tokenizer, q, bos_id, pad_id) for q in it]
    n = len(details)
    acc = sum(d.pred == d.label for d in details) / n
    acc_norm = sum(d.pred_norm == d.label for d in details) / n
    stderr = (acc * (1 - acc) / max(1, n - 1)) ** 0.5
    return MultipleChoiceResult(task or questions[0].task, acc, acc_norm, n, stderr, details)
