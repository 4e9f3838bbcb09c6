"""An lm-evaluation-harness model backed by an lfmsift model, optionally pruned by any registered method.

    from lfmsift.eval.lm_eval_adapter import LfmsiftLM
    lm = LfmsiftLM("smollm2-135m", method="pop", target=0.2)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

or, after ``import lfmsift.eval.lm_eval_adapter``, ``lm_eval.simple_evaluate(model="lfmsift",
model_args="model=smollm2-135m,method=flap,target=0.2")``. Needs ``pip install lfmsift[lmeval]``; tasks
that download data need the hub, local JSONL task configs do not.

Scoring is the same code as `multiple_choice` (lm-eval's tokenisation of context/continuation pairs,
left-padded batches, BOS as the tokenizer does), so a local task scored through lm-eval and through
``lfmsift eval`` gives the same numbers. Requests are batched in the order lm-eval gives them; online
methods (POP, PP, GRIFFIN) share their masks across a batch, so `batch_size` changes their results.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lfmsift.eval.multiple_choice import continuation_scores, encode_pair
from lfmsift.eval.perplexity import resolve_bos


@register_model("lfmsift")
class LfmsiftLM(LM):
    """lm-eval `LM` over a (pruned) lfmsift model.

    Args:
        model: a model object, or a name / directory / hub id for `lfmsift.models.load`.
        tokenizer: needed with a model object.
        method: a registered pruning method (``pop``, ``flap``...), or None / ``dense``.
        batch_size: requests per forward pass.
        max_length: window for rolling log-likelihoods (default: the model's max positions, at most 2048).
        **settings: the method's settings (``target=0.2``, ``gamma=0.1``...); strings from lm-eval's
            ``model_args`` are converted to numbers.
    """

    def __init__(
        self,
        model: Any = "smollm2-135m",
        tokenizer=None,
        method: str | None = None,
        batch_size: int = 1,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        **settings,
    ):
        super().__init__()
        if isinstance(model, str):
            from lfmsift.models import load

            model, tokenizer = load(model, dtype=dtype, device=device)
        if tokenizer is None:
            raise ValueError("LfmsiftLM needs the tokenizer of a model object")
        self.model = model.eval()
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.batch_size = int(batch_size)
        _, self.bos_id = resolve_bos(self.tokenizer, None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048
        self.max_length = int(max_length or min(limit, 2048))
        self.handle = None
        if method and method != "dense":
            from lfmsift.eval.harness import CALIBRATED
            from lfmsift.prune import apply

            settings = {k: _number(v) for k, v in settings.items()}
            if method in CALIBRATED:
                settings.setdefault("tokenizer", self.tokenizer)
            self.handle = apply(self.model, method, **settings)

    # -- lm-eval interface -------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *r.args, self.bos_id) for r in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        prefix = self.bos_id if self.bos_id is not None else (self.tokenizer.eos_token_id or 0)
        for r in requests:
            ids = self.tokenizer.encode(r.args[0], add_special_tokens=False)
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(ids, prefix, self.max_length, context_len=1)
            ]
            pairs = [(list(ctx) + list(cont), len(cont)) for ctx, cont in windows]
            out.append(sum(score for score, _ in self._score(pairs)))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        device = next(self.model.parameters()).device
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until", []) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tokenizer.encode(context, add_special_tokens=False)
            if self.bos_id is not None:
                ids = [self.bos_id] + ids
            gen = self.model.generate(
                torch.tensor([ids], device=device), max_new_tokens=max_new, do_sample=False,
                pad_token_id=self.pad_id,
            )
            text = self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

    # -- helpers ------------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        out = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            out += continuation_scores(self.model, [p[0] for p in batch], [p[1] for p in batch], self.pad_id)
        return out

    def close(self) -> None:
        """Restore the dense model."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _number(v):
    if not isinstance(v, str):
        return v
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
