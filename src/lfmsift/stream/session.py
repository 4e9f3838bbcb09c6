"""A streaming session: frames (or text chunks) arrive one by one, questions come at any time.

Every ``feed`` is one iterative-prefill pass over the new tokens only; the KV cache grows without bound
in a ``TieredKVStore`` and each layer attends only to what the retriever selects (V-Rex §II, §IV).
``ask`` prefills the question and decodes greedily over the retrieved cache; the answer stays in the
cache, so follow-up questions see it. Works with any supported causal LM (text chunks as "frames") and
with VLMs whose processor turns ``frame_text`` plus an image into input ids and pixel values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lfmsift.kv.cache import FRAME, TEXT, build_cache, install, uninstall
from lfmsift.kv.device_cache import DeviceStreamingCache
from lfmsift.kv.graphed import GraphedStream
from lfmsift.kv.retriever import Retriever, get_retriever
from lfmsift.kv.store import TierBudget
from lfmsift.models.adapters import cache_argument, describe
from lfmsift.stream.video import Frame

log = logging.getLogger(__name__)

_MARK_Q, _MARK_A, _MARK_B = "\x01LFMSIFT_Q\x01", "\x01LFMSIFT_A\x01", "\x01LFMSIFT_B\x01"


@dataclass(frozen=True)
class ChatParts:
    """Text around the stream: ``preamble`` opens the conversation (system prompt + user turn), the
    question is followed by ``answer_open``, and ``next_turn`` closes an answer and opens the next user turn."""

    preamble: str
    answer_open: str
    next_turn: str
    question_prefix: str = ""


def chat_parts(tokenizer: Any, system_prompt: str | None = None) -> ChatParts:
    """Derive ``ChatParts`` from the tokenizer's chat template (plain-text fallback without one)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if getattr(tokenizer, "chat_template", None):
        def render(messages):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        one = render([*system, {"role": "user", "content": _MARK_Q}])
        two = render([*system, {"role": "user", "content": _MARK_A}, {"role": "assistant", "content": _MARK_B},
                      {"role": "user", "content": _MARK_Q}])
        preamble, answer_open = one.split(_MARK_Q)
        next_turn = two.split(_MARK_B)[1].split(_MARK_Q)[0]
        return ChatParts(preamble, answer_open, next_turn)
    return _plain_parts(system_prompt)


def _plain_parts(system_prompt: str | None = None) -> ChatParts:
    """Question / Answer framing for models without a chat template (or ``chat=False``)."""
    return ChatParts((system_prompt + "\n") if system_prompt else "", "\nAnswer:", "\n", "\nQuestion: ")


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    logits: torch.Tensor | None = None  # (steps, vocab) fp32, when asked for


@dataclass
class StreamingSession:
    """Stream frames or text chunks into ``model``; ask questions over the retrieved KV cache.

    ``retriever``: a ``Retriever`` or a registered name (``"resv"``, ``"full"``); ``budget``: byte budgets
    of the KV tiers; ``cache_path``: ``auto`` / ``device`` / ``reference`` (``lfmsift.kv.cache.build_cache``); ``frame_text``: the text a VLM processor expands into one frame's image tokens.
    ``graphs``: run chunks given as tokens as prepared steps of the device path (``lfmsift.kv.graphed``),
    replayed from CUDA graphs on CUDA (the same steps eagerly elsewhere); image frames and ``score`` run
    as usual.
    Use as a context manager (or call ``close()``) to restore the model's attention and drop disk files.
    """

    model: nn.Module
    processor: Any
    retriever: Retriever | str = "resv"
    budget: TierBudget | None = None
    system_prompt: str | None = None
    frame_text: str = "<image>"
    chat: bool = True
    cache_path: str = "auto"
    graphs: bool = False
    frames_fed: int = field(default=0, init=False)
    chunks_fed: int = field(default=0, init=False)
    text_tokens: int = field(default=0, init=False)
    frame_tokens: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.retriever, str):
            self.retriever = get_retriever(self.retriever)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.view = describe(self.model)
        self.cache = build_cache(self.view, self.retriever, self.budget or TierBudget(), self.cache_path)
        self._graphed = None
        if self.graphs:
            if not isinstance(self.cache, DeviceStreamingCache):
                raise ValueError("graphs=True runs on the device path: use cache_path='device' (or 'auto' on CUDA)")
            self._graphed = GraphedStream(self.model, self.cache)
        install(self.cache)
        self.parts = chat_parts(self.tokenizer, self.system_prompt) if self.chat else _plain_parts(self.system_prompt)
        self._started = False
        self.device = next(self.model.parameters()).device
        self._stop = self._stop_ids()

    def _stop_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.tokenizer, "eos_token_id", None),
                       getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # -- forward passes ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, kind: str, **extra) -> torch.Tensor:
        if input_ids.numel() == 0:
            raise ValueError("nothing to feed: the input tokenizes to zero tokens")
        if self._graphed is not None and not extra:
            logits = self._graphed(kind, input_ids=input_ids.to(self.device))[0]
        else:
            self.cache.begin(kind, input_ids.shape[1])
            logits = self.model(input_ids=input_ids.to(self.device), **cache_argument(self.model, self.cache),
                                use_cache=True, logits_to_keep=1, **extra).logits[0, -1]
            self.cache.end(input_ids.shape[1])
        if kind == TEXT:
            self.text_tokens += input_ids.shape[1]
        else:
            self.frame_tokens += input_ids.shape[1]
        return logits.float()

    def _tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)

    def _start(self) -> None:
        if not self._started:
            self._started = True
            bos = getattr(self.tokenizer, "bos_token_id", None)
            ids = self._tokens(self.parts.preamble)
            if bos is not None and getattr(self.tokenizer, "add_bos_token", False) and \
                    (ids.numel() == 0 or ids[0, 0] != bos):
                ids = torch.cat([torch.tensor([[bos]]), ids], 1)
            if ids.numel():
                self._forward(ids, TEXT)

    # -- public API ----------------------------------------------------------------------------------------
    def feed(self, item: str | Frame | Image.Image | np.ndarray) -> int:
        """Prefill one frame (an image, a ``Frame`` or an HxWx3 array) or one text chunk; return its token count."""
        self._start()
        if isinstance(item, str):
            ids = self._tokens(item)
            if ids.numel() == 0:
                raise ValueError("empty text chunk")
            self._forward(ids, FRAME)
        else:
            image = item.image if isinstance(item, Frame) else item
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise TypeError(f"feed() takes text, a Frame, a PIL image or an array, got {type(item).__name__}")
            if not hasattr(self.processor, "image_processor"):
                raise TypeError(f"{type(self.model).__name__} with {type(self.processor).__name__} takes no images; "
                                "feed text chunks or use a vision-language model and its processor")
            inputs = self.processor(text=self.frame_text, images=[image.convert("RGB")], return_tensors="pt")
            ids = inputs.pop("input_ids")
            inputs.pop("attention_mask", None)
            extra = {k: v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in inputs.items()}
            self._forward(ids, FRAME, **extra)
            self.frames_fed += 1
        self.chunks_fed += 1
        return ids.shape[1]

    def feed_tokens(self, token_ids: list[int] | torch.Tensor) -> int:
        """Prefill one chunk of streamed text given as token ids (no re-tokenization); return its length."""
        self._start()
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
        if ids.numel() == 0:
            raise ValueError("empty chunk")
        self._forward(ids, FRAME)
        self.chunks_fed += 1
        return ids.shape[1]

    @torch.no_grad()
    def score(self, prompt_ids: list[int] | torch.Tensor, target_ids: list[int] | torch.Tensor) -> tuple[float, int]:
        """Teacher-forced negative log-likelihood (sum, count) of ``target_ids`` after ``prompt_ids``, both
        prefilled as one text chunk over the retrieved cache (which keeps them, like any text)."""
        self._start()
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        target = torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)
        if prompt.numel() == 0 or target.numel() == 0:
            raise ValueError("score() needs a non-empty prompt and target")
        ids = torch.cat([prompt, target])[None]
        self.cache.begin(TEXT, ids.shape[1])
        out = self.model(input_ids=ids.to(self.device), **cache_argument(self.model, self.cache), use_cache=True)
        self.cache.end(ids.shape[1])
        self.text_tokens += ids.shape[1]
        logits = out.logits[0, prompt.numel() - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits, target.to(logits.device), reduction="sum")
        return float(nll), int(target.numel())

    def ask(self, question: str, max_new_tokens: int = 64, keep_logits: bool = False,
            forced: list[int] | None = None, answer_prefix: str = "") -> Answer:
        """Prefill the question and decode greedily; the answer stays in the cache for follow-ups.
        ``forced``: feed these tokens instead of the greedy ones (teacher forcing, e.g. a reference answer),
        so that the logits of every step are comparable with the reference's. ``answer_prefix``: text the
        answer starts with, prefilled with the question (not part of the returned answer)."""
        if not question.strip():
            raise ValueError("empty question")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if forced is not None and not forced:
            raise ValueError("forced answer is empty")
        self._start()
        prompt = self.parts.question_prefix + question + self.parts.answer_open
        logits = self._forward(torch.cat([self._tokens(prompt), self._tokens(answer_prefix)], 1), TEXT)
        generated, kept = [], []
        steps = len(forced) if forced is not None else max_new_tokens
        for step in range(steps):
            if keep_logits:
                kept.append(logits.cpu())
            token = int(forced[step]) if forced is not None else int(logits.argmax())
            generated.append(token)
            if token in self._stop or step + 1 == steps:
                break
            logits = self._forward(torch.tensor([[token]]), TEXT)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        self._close_turn(generated)
        return Answer(text, generated, torch.stack(kept) if keep_logits else None)

    def _close_turn(self, generated: list[int]) -> None:
        """Feed the last generated token (not fed yet) and the text that opens the next user turn."""
        last, closing = generated[-1], self.parts.next_turn
        if last in self._stop:
            stop_text = self.tokenizer.decode([last])
            closing = closing[len(stop_text):] if closing.startswith(stop_text) else closing
        ids = torch.tensor([[last]])
        self._forward(torch.cat([ids, self._tokens(closing)], 1) if closing else ids, TEXT)

    def stats(self) -> dict:
        out = self.cache.stats()
        out["session"] = {"frames": self.frames_fed, "chunks": self.chunks_fed, "frame_tokens": self.frame_tokens,
                          "text_tokens": self.text_tokens}
        return out

    def close(self) -> None:
        uninstall(self.cache)
        self.cache.close()

    def __enter__(self) -> StreamingSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
