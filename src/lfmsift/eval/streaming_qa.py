"""Streaming evaluations of KV retrieval on real text: what a retriever's fetched tokens cost in quality.

- **Recall perplexity**: real WikiText-2 paragraphs are streamed in chunks (as "frames": every chunk goes
  through retrieval); afterwards the opening of a paragraph seen long before (in the first half of the
  stream) is presented and the rest of it is scored, teacher-forced. With the full cache a model copies the
  paragraph it has seen (low perplexity); a retriever that misses its tokens cannot.
- **Needle retrieval**: a sentence with a random passcode is planted at a chosen depth of a long stream of
  real WikiText-2 text; at the end the model is asked for the passcode (its answer opened with "The secret
  passcode is", so a small chat model answers with the number at once); a trial succeeds when the greedy
  answer contains it. Run the full cache first to find the lengths at which the model itself succeeds.

Both build their token streams once (``recall_task`` / ``needle_trials``) so every retriever sees the same
tokens; ``run_recall`` / ``run_needle`` stream them through a ``StreamingSession`` and return quality plus
the session's retrieval statistics (fetched ratio per stage, per layer and KV head).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from lfmsift.kv.retriever import Retriever
from lfmsift.stream.session import StreamingSession

HEADING = re.compile(r"^\s*=+ .* =+\s*$")


@dataclass
class RecallProbe:
    prompt: list[int]
    target: list[int]
    start: int                 # token offset of the paragraph in the stream


@dataclass
class RecallTask:
    chunks: list[list[int]]
    probes: list[RecallProbe]
    stream_tokens: int


def paragraphs(text: str) -> list[str]:
    """WikiText-2 paragraphs: non-empty lines that are not section headings."""
    return [line.strip() for line in text.split("\n") if line.strip() and not HEADING.match(line)]


def recall_task(tokenizer, text: str, stream_tokens: int = 4096, chunk_tokens: int = 256, probes: int = 8,
                prompt_tokens: int = 32, target_tokens: int = 64, offset: int = 0) -> RecallTask:
    """Paragraphs from ``offset`` concatenated into a stream of about ``stream_tokens`` tokens, cut into
    chunks; probes on paragraphs (long enough for prompt + target) that lie in the first half, evenly spaced."""
    if stream_tokens < 2 * (prompt_tokens + target_tokens) or chunk_tokens < 1 or probes < 1:
        raise ValueError("stream too short for its probes, or chunk_tokens / probes < 1")
    ids: list[int] = []
    spans = []
    for para in paragraphs(text)[offset:]:
        piece = tokenizer(para + "\n", add_special_tokens=False)["input_ids"]
        spans.append((len(ids), piece))
        ids.extend(piece)
        if len(ids) >= stream_tokens:
            break
    if len(ids) < stream_tokens:
        raise ValueError(f"the text gives only {len(ids)} tokens, {stream_tokens} asked")
    ids = ids[:stream_tokens]
    need = prompt_tokens + target_tokens
    eligible = [(start, piece) for start, piece in spans if len(piece) >= need and start + need <= stream_tokens // 2]
    if len(eligible) < probes:
        raise ValueError(f"only {len(eligible)} paragraphs of >= {need} tokens in the first half; lower probes")
    step = len(eligible) / probes
    chosen = [eligible[int(i * step)] for i in range(probes)]
    return RecallTask(
        chunks=[ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)],
        probes=[RecallProbe(piece[:prompt_tokens], piece[prompt_tokens:need], start) for start, piece in chosen],
        stream_tokens=len(ids),
    )


def run_recall(model, tokenizer, retriever: Retriever, task: RecallTask, budget=None) -> dict:
    """Stream the task's chunks, score every probe; perplexity over all probes' target tokens."""
    with StreamingSession(model, tokenizer, retriever=retriever, budget=budget, chat=False) as session:
        for chunk in task.chunks:
            session.feed_tokens(chunk)
        nll = count = 0
        per_probe = []
        for probe in task.probes:
            n, c = session.score(probe.prompt, probe.target)
            nll, count = nll + n, count + c
            per_probe.append(math.exp(n / c))
        stats = session.stats()
    return {"ppl": math.exp(nll / count), "per_probe_ppl": per_probe, "stats": stats}


@dataclass
class NeedleTrial:
    chunks: list[list[int]]
    answer: str
    length: int
    depth: float
    question: str = "What is the secret passcode?"
    answer_prefix: str = " The secret passcode is"  # so a small chat model answers with the number at once
    meta: dict = field(default_factory=dict)


def needle_trials(tokenizer, text: str, lengths: list[int], depths: list[float], seeds: list[int],
                  chunk_tokens: int = 256) -> list[NeedleTrial]:
    """One trial per (length, depth, seed): ``length`` tokens of real text (a different stretch per seed) with
    "The secret passcode is NNNN." inserted at ``depth`` of it."""
    filler = tokenizer(" ".join(paragraphs(text)), add_special_tokens=False)["input_ids"]
    trials = []
    for seed in seeds:
        rng = random.Random(seed)
        value = str(rng.randint(1000, 9999))
        needle = tokenizer(f"\nThe secret passcode is {value}. Remember it.\n", add_special_tokens=False)["input_ids"]
        for length in lengths:
            body = length - len(needle)
            start = (seed * 7919) % max(1, len(filler) - body)
            base = filler[start : start + body]
            if len(base) < body:
                raise ValueError(f"the text is too short for a {length}-token needle stream")
            for depth in depths:
                if not 0.0 <= depth <= 1.0:
                    raise ValueError(f"depth must be in [0, 1], got {depth}")
                at = int(depth * body)
                ids = base[:at] + needle + base[at:]
                trials.append(NeedleTrial([ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)],
                                          value, length, depth, meta={"seed": seed}))
    return trials


def run_needle(model, tokenizer, retriever: Retriever, trials: list[NeedleTrial], max_new_tokens: int = 6,
               budget=None) -> dict:
    """Success rate of the trials; the stage retrieval ratios are averaged over them, the per-layer ones are
    the last trial's (the longest stream when lengths are given in increasing order)."""
    results = []
    sums = {"frame": [0.0, 0.0], "text": [0.0, 0.0]}  # retrieval ratio, fetched ratio: summed over trials
    layers: dict = {}
    for trial in trials:
        with StreamingSession(model, tokenizer, retriever=retriever, budget=budget) as session:
            for chunk in trial.chunks:
                session.feed_tokens(chunk)
            answer = session.ask(trial.question, max_new_tokens=max_new_tokens, answer_prefix=trial.answer_prefix)
            stats = session.stats()
        ok = trial.answer in answer.text
        ratios = {f"{stage}_{what}": stats[f"{stage}_stage"].get(f"{what}_ratio")
                  for stage in sums for what in ("retrieval", "fetched")}
        results.append({"length": trial.length, "depth": trial.depth, "answer": trial.answer,
                        "generated": answer.text, "success": ok, **trial.meta, **ratios})
        for stage, acc in sums.items():
            acc[0] += stats[f"{stage}_stage"]["retrieval_ratio"] or 0.0
            acc[1] += stats[f"{stage}_stage"].get("fetched_ratio") or 0.0
        layers = stats["frame_stage"]["layers"]
    n = len(trials)
    return {"accuracy": sum(r["success"] for r in results) / n, "trials": results,
            "stats": {f"{stage}_stage": {"retrieval_ratio": acc[0] / n, "fetched_ratio": acc[1] / n,
                                         **({"layers": layers} if stage == "frame" else {})}
                      for stage, acc in sums.items()}}


# A small word list for the keys of the multi-key task (common, single-meaning, distinct tokens).
KEY_WORDS = ("apple", "river", "candle", "violin", "garden", "rocket", "pencil", "harbor", "window", "tiger",
             "mirror", "basket", "castle", "meadow", "lantern", "anchor")


@dataclass
class MultiKeyTrial:
    """A RULER-style stream: several "The special code for KEY is NNNN." facts at several depths of real
    text, then one question per key, asked one after another in the same session (follow-ups)."""

    chunks: list[list[int]]
    facts: list[tuple[str, str, float]]  # (key, value, depth)
    length: int
    meta: dict = field(default_factory=dict)


def multikey_trials(tokenizer, text: str, length: int, keys: int, seeds: list[int],
                    chunk_tokens: int = 256) -> list[MultiKeyTrial]:
    """One trial per seed: ``keys`` facts spread evenly over depths 0.05-0.95 of ``length`` tokens of real
    text (a different stretch, different keys and values per seed)."""
    if not 1 <= keys <= len(KEY_WORDS):
        raise ValueError(f"keys must be in 1..{len(KEY_WORDS)}, got {keys}")
    filler = tokenizer(" ".join(paragraphs(text)), add_special_tokens=False)["input_ids"]
    trials = []
    for seed in seeds:
        rng = random.Random(1000 + seed)
        words = rng.sample(KEY_WORDS, keys)
        values = [str(rng.randint(1000, 9999)) for _ in words]
        depths = [0.05 + 0.9 * i / max(1, keys - 1) for i in range(keys)] if keys > 1 else [0.5]
        facts = [tokenizer(f"\nThe special code for {w} is {v}.\n", add_special_tokens=False)["input_ids"]
                 for w, v in zip(words, values)]
        body = length - sum(len(f) for f in facts)
        start = (seed * 104_729 + 17) % max(1, len(filler) - body)
        base = filler[start : start + body]
        if len(base) < body:
            raise ValueError(f"the text is too short for a {length}-token stream")
        ids, prev = [], 0
        for fact, depth in zip(facts, depths):
            at = int(depth * body)
            ids += base[prev:at] + fact
            prev = at
        ids += base[prev:]
        trials.append(MultiKeyTrial([ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)],
                                    list(zip(words, values, depths)), length, {"seed": seed}))
    return trials


def run_multikey(model, tokenizer, retriever: Retriever, trials: list[MultiKeyTrial], max_new_tokens: int = 6,
                 budget=None) -> dict:
    """Per fact: does the greedy answer to "What is the special code for KEY?" contain its value. Facts are
    asked in a shuffled order (fixed per trial), each answer staying in the cache for the next question."""
    items = []
    sums = {"frame": 0.0, "text": 0.0, "frame_fetched": 0.0, "text_fetched": 0.0}
    for trial in trials:
        order = list(range(len(trial.facts)))
        random.Random(trial.meta.get("seed", 0)).shuffle(order)
        with StreamingSession(model, tokenizer, retriever=retriever, budget=budget) as session:
            for chunk in trial.chunks:
                session.feed_tokens(chunk)
            for asked, i in enumerate(order):
                key, value, depth = trial.facts[i]
                answer = session.ask(f"What is the special code for {key}?", max_new_tokens=max_new_tokens,
                                     answer_prefix=f" The special code for {key} is")
                items.append({"seed": trial.meta.get("seed"), "key": key, "value": value, "depth": depth,
                              "asked": asked, "generated": answer.text, "success": value in answer.text})
            stats = session.stats()
        for stage in ("frame", "text"):
            sums[stage] += stats[f"{stage}_stage"]["retrieval_ratio"] or 0.0
            sums[f"{stage}_fetched"] += stats[f"{stage}_stage"].get("fetched_ratio") or 0.0
    n = len(trials)
    return {"accuracy": sum(r["success"] for r in items) / len(items), "items": items,
            "stats": {"frame_stage": {"retrieval_ratio": sums["frame"] / n, "fetched_ratio": sums["frame_fetched"] / n,
                                      "layers": stats["frame_stage"]["layers"]},
                      "text_stage": {"retrieval_ratio": sums["text"] / n, "fetched_ratio": sums["text_fetched"] / n}}}
