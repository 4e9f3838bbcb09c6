"""The pruning comparison: every method x target x task on one model, resumable, into one JSON file.

    results = run_comparison(model, tokenizer, "smollm2-135m", ["dense", "pop", "flap"], [0.2, 0.4],
                             ["wikitext2", "decode_ppl", "arc_easy", "gen_agreement"], EvalSettings(),
                             "results/eval_smollm2.json")

Each finished (method, target, task) row is written to the JSON file at once; a run started again with the
same settings skips the rows already there, so an interrupted run continues where it stopped. ``dense`` is
evaluated once (target 0). ``flap`` and ``probe`` share one calibration pass
per model (Wanda-sp calibrates layer by layer on its own). Methods that prune attention and FFN (``wanda_sp``, ``flap``, ``probe``) get the model-level
target directly; FFN-only methods (``pop``, ``static``, ``reselect``, ``griffin``) get it converted per layer
to an FFN ratio (`lfmsift.prune.budget`), as in the POP paper.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lfmsift.eval.agreement import agreement_prompts, compare, greedy
from lfmsift.eval.data import load_questions, load_text
from lfmsift.eval.decode_ppl import decode_perplexity
from lfmsift.eval.multiple_choice import multiple_choice
from lfmsift.eval.perplexity import perplexity
from lfmsift.prune import METHODS, apply, pruned
from lfmsift.prune.calibration import collect

logger = logging.getLogger(__name__)

CALIBRATED = ("wanda_sp", "flap", "probe")
TASK_KINDS = {
    "wikitext2": "perplexity",
    "ptb": "perplexity",
    "decode_ppl": "decode_ppl",
    "arc_easy": "choice",
    "arc_challenge": "choice",
    "openbookqa": "choice",
    "piqa": "choice",
    "winogrande": "choice",
    "gen_agreement": "agreement",
}
TASKS = tuple(TASK_KINDS)
# The metric each task is summarised by in tables and figures.
HEADLINE = {"perplexity": "perplexity", "decode_ppl": "perplexity", "choice": "acc_norm", "agreement": "token_f1"}


@dataclass
class EvalSettings:
    """Sizes of each task (CPU-friendly defaults; the papers use whole sets) and the calibration.

    Perplexity: `ppl_windows` windows of `ppl_seqlen` tokens. Decode perplexity: `decode_samples` prompts of
    `decode_prompt` tokens, `decode_new` teacher-forced decode steps, batches of `decode_batch`. Multiple
    choice: the first `mc_limit` questions of each set (None: all). Generation agreement: `agree_samples`
    prompts of `agree_prompt` tokens of `agree_text`, `agree_new` greedy tokens. Calibration (wanda_sp,
    flap, probe): `calib_samples` windows of `calib_seqlen` tokens of `calibration`.
    """

    ppl_text: str = "wikitext2"
    ppl_seqlen: int = 512
    ppl_windows: int | None = 16
    decode_text: str = "wikitext2"
    decode_prompt: int = 64
    decode_new: int = 64
    decode_samples: int = 8
    decode_batch: int = 4
    mc_limit: int | None = 100
    agree_text: str = "wikitext2"
    agree_prompt: int = 64
    agree_new: int = 32
    agree_samples: int = 16
    agree_batch: int = 8
    calibration: str = "ptb"
    calib_samples: int = 64
    calib_seqlen: int = 512
    gamma: float = 0.1


def check_names(methods: list[str], tasks: list[str]) -> None:
    """Raise a ValueError naming the known methods / tasks for any unknown one."""
    known_methods = ["dense", *sorted(METHODS)]
    bad = [m for m in methods if m not in known_methods]
    if bad:
        raise ValueError(f"Unknown method(s) {', '.join(bad)}; known: {', '.join(known_methods)}")
    bad = [t for t in tasks if t not in TASK_KINDS]
    if bad:
        raise ValueError(f"Unknown task(s) {', '.join(bad)}; known: {', '.join(TASKS)}")


def method_settings(
    method: str, target: float, settings: EvalSettings, tokenizer, calib_stats, data_dir=None
) -> dict[str, Any]:
    """Keyword settings of `lfmsift.prune.apply` for `method` at a model-level `target`."""
    if method in CALIBRATED:
        return dict(
            target=target, tokenizer=tokenizer, calib_stats=calib_stats, calibration=settings.calibration,
            calib_samples=settings.calib_samples, calib_seqlen=settings.calib_seqlen, data_dir=data_dir,
        )
    if method == "pop":
        return dict(target=target, gamma=settings.gamma)
    return dict(target=target)


def _row_key(method: str, target: float, task: str) -> str:
    return f"{method}|{target:g}|{task}"


class ResultsFile:
    """The JSON file of a comparison: settings, rows, and the dense reference continuations."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = Path(path)
        self.header = header
        self.rows: dict[str, dict] = {}
        self.reference: list[list[int]] | None = None
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            previous = {k: v for k, v in old.get("header", {}).items() if k != "command"}
            if previous == header:
                self.rows = {_row_key(r["method"], r["target"], r["task"]): r for r in old.get("rows", [])}
                self.reference = old.get("reference")
                logger.info("Resuming %s: %d rows done", self.path, len(self.rows))
            else:
                logger.warning("%s holds a run with other settings; starting over", self.path)

    def has(self, method: str, target: float, task: str) -> bool:
        return _row_key(method, target, task) in self.rows

    def add(self, row: dict) -> None:
        self.rows[_row_key(row["method"], row["target"], row["task"])] = row
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"header": self.header, "rows": list(self.rows.values()), "reference": self.reference}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)


def _summary(stats: dict) -> dict:
    keys = ("ffn_ratio", "achieved_reduction", "heads_kept", "heads", "channels_kept", "channels", "layer_ratio")
    return {k: stats[k] for k in keys if k in stats}


def _compute(stats: dict) -> dict | None:
    """What an online method computed during one task: FLOPs against dense, channels per decode step and,
    for MoE layers, how the per-expert partitions were made (None for static methods)."""
    if "total" not in stats:
        return None
    t = stats["total"]
    keys = ("prefill_flops_vs_dense", "decode_flops_vs_dense", "channels_computed_per_decode_step",
            "channels_used_per_decode_step", "d_ff", "decode_steps", "decode_overlap_with_prefill")
    out = {k: t[k] for k in keys if k in t}
    for k in ("experts_partitioned_at_prefill", "late_partitions", "pad_only_experts"):
        values = [row[k] for row in stats["layers"] if k in row]
        if values:
            out[k] = sum(values)
    return out


def run_comparison(
    model,
    tokenizer,
    model_name: str,
    methods: list[str],
    targets: list[float],
    tasks: list[str],
    settings: EvalSettings | None = None,
    out_path: str | os.PathLike = "results/eval.json",
    data_dir=None,
    command: str | None = None,
    progress: bool = True,
) -> ResultsFile:
    """Evaluate every method at every target on every task; see the module docstring."""
    settings = settings or EvalSettings()
    check_names(methods, tasks)
    for t in targets:
        if not 0.0 < t < 1.0:
            raise ValueError(f"Targets must be in (0, 1); got {t}")
    header = {"model": model_name, "settings": asdict(settings), "data_dir": str(data_dir) if data_dir else None}
    results = ResultsFile(out_path, header)
    results.header = {**header, "command": command}
    data = _TaskData(tokenizer, settings, data_dir)
    model.eval()

    if "gen_agreement" in tasks and results.reference is None:
        prompts = data.agreement_prompts()
        results.reference = greedy(model, prompts, settings.agree_new, settings.agree_batch).tolist()
        results.save()

    calib = {}

    def calib_stats():
        if "stats" not in calib:
            calib["stats"] = collect(
                model, tokenizer, settings.calibration, settings.calib_samples, settings.calib_seqlen,
                positions=True, data_dir=data_dir, progress=progress,
            )
        return calib["stats"]

    runs = [("dense", 0.0)] if "dense" in methods else []
    runs += [(m, t) for m in methods if m != "dense" for t in targets]
    for method, target in runs:
        todo = [t for t in tasks if not results.has(method, target, t)]
        if not todo:
            continue
        handle = None
        if method != "dense":
            # the shared calibration is passed lazily: only methods that read it (flap, probe, one-pass
            # wanda_sp) run it, once per model
            shared = calib_stats if method in CALIBRATED else None
            handle = apply(model, method, **method_settings(method, target, settings, tokenizer, shared, data_dir))
        try:
            info = _summary(handle.stats()) if handle is not None else {}
            for task in todo:
                logger.info("%s target %g: %s", method, target, task)
                start = time.perf_counter()
                if handle is not None:
                    handle.reset_stats()
                metrics = _evaluate(model, tokenizer, task, data, results.reference, progress)
                row = dict(method=method, target=target, task=task, metrics=metrics, method_info=info)
                compute = _compute(handle.stats()) if handle is not None else None
                if compute:
                    row["compute"] = compute
                row["seconds"] = round(time.perf_counter() - start, 2)
                results.add(row)
        finally:
            if handle is not None:
                handle.remove()
    return results


class _TaskData:
    """Loads each task's data once."""

    def __init__(self, tokenizer, settings: EvalSettings, data_dir):
        self.tokenizer, self.settings, self.data_dir = tokenizer, settings, data_dir
        self._cache: dict[str, Any] = {}

    def get(self, key: str, load: Callable[[], Any]):
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def text(self, name: str) -> str:
        return self.get("text:" + name, lambda: load_text(name, self.data_dir))

    def questions(self, name: str):
        return self.get("qa:" + name, lambda: load_questions(name, self.data_dir, self.settings.mc_limit))

    def agreement_prompts(self) -> torch.Tensor:
        s = self.settings
        return self.get(
            "agree", lambda: agreement_prompts(self.tokenizer, self.text(s.agree_text), s.agree_prompt, s.agree_samples)
        )


def _evaluate(model, tokenizer, task: str, data: _TaskData, reference, progress: bool) -> dict:
    s = data.settings
    kind = TASK_KINDS[task]
    if kind == "perplexity":
        r = perplexity(model, tokenizer, data.text(task), s.ppl_seqlen, s.ppl_windows, progress=progress)
        return r.to_dict() if hasattr(r, "to_dict") else asdict(r)
    if kind == "decode_ppl":
        r = decode_perplexity(
            model, tokenizer, data.text(s.decode_text), s.decode_prompt, s.decode_new, s.decode_samples,
            s.decode_batch, progress=progress,
        )
        return r.to_dict()
    if kind == "choice":
        return multiple_choice(model, tokenizer, data.questions(task), task, progress=progress).to_dict()
    prompts = data.agreement_prompts()
    out = greedy(model, prompts, s.agree_new, s.agree_batch)
    return compare(out, torch.tensor(reference), prompts.shape[1]).to_dict()


def headline(row: dict) -> float:
    """The one number a row is summarised by (perplexity, acc_norm or token F1)."""
    return row["metrics"][HEADLINE[TASK_KINDS[row["task"]]]]


__all__ = ["EvalSettings", "ResultsFile", "TASKS", "check_names", "headline", "run_comparison"]


def run_fidelity_comparison(
    model,
    samples: list[dict],
    model_name: str,
    methods: list[str],
    targets: list[float],
    new_tokens: int,
    settings: EvalSettings | None = None,
    out_path: str | os.PathLike = "results/fidelity.json",
    tokenizer=None,
    data_dir=None,
    command: str | None = None,
    sample_names: list[str] | None = None,
) -> ResultsFile:
    """Fidelity (`fidelity.measure`) of every method at every target against the dense model.

    Same resumable JSON as `run_comparison` (task ``fidelity``); the dense reference is recomputed on each
    call (its log-probabilities are not stored), and its greedy tokens go in the file's ``reference``.
    Calibrated baselines calibrate on text (`settings.calibration`) through the language decoder.
    """
    from lfmsift.eval import fidelity

    settings = settings or EvalSettings()
    check_names(methods, [])
    header = {"model": model_name, "settings": asdict(settings), "new_tokens": new_tokens,
              "samples": sample_names or len(samples), "data_dir": str(data_dir) if data_dir else None}
    results = ResultsFile(out_path, header)
    results.header = {**header, "command": command}
    model.eval()
    runs = [(m, t) for m in methods if m != "dense" for t in targets]
    if all(results.has(m, t, "fidelity") for m, t in runs):
        return results
    ref = fidelity.reference(model, samples, new_tokens)
    results.reference = [t.tolist() for t in ref.tokens]
    results.save()
    for method, target in runs:
        if results.has(method, target, "fidelity"):
            continue
        start = time.perf_counter()
        with pruned(model, method, **method_settings(method, target, settings, tokenizer, None, data_dir)) as h:
            metrics = fidelity.measure(model, samples, ref).to_dict()
            stats = h.stats()
            info = _summary(stats)
            if "total" in stats:
                info["decode_flops_vs_dense"] = stats["total"]["decode_flops_vs_dense"]
        row = dict(method=method, target=target, task="fidelity", metrics=metrics, method_info=info)
        row["seconds"] = round(time.perf_counter() - start, 2)
        results.add(row)
    return results
