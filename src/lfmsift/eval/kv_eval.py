"""The streaming evaluation of KV retrievers (`lfmsift kv-eval`): quality against fetched tokens.

Every retriever runs the same token streams (``lfmsift.eval.streaming_qa``: recall perplexity, needle
retrieval; ``lfmsift.eval.fidelity.stream_fidelity``: answers after real video frames, against the full
cache). Each is run at its default budget and, with ``sweep``, over its budget knob, so quality can be
compared at equal fetched ratios. Results go to one JSON file, written after every run and resumed from
(finished runs are skipped); ``write_reports`` adds the Table II-style markdown table, the quality-vs-ratio
figure and the per-layer x per-KV-head heat map of the frame-stage ratios (the paper's Fig. 20).
"""

from __future__ import annotations

import json
import math
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lfmsift.kv.retriever import get_retriever
from lfmsift.results import save_figure

log = logging.getLogger(__name__)

TASKS = ("recall", "needle", "multikey", "video")
# Defaults: ReSV as in the paper; fixed-budget methods at V-Rex's accuracy setting ("up to 50%").
DEFAULTS: dict[str, dict] = {
    "full": {}, "resv": {"ratio": 0.3}, "rekv": {"fraction": 0.5, "keep_recent": 256}, "infinigen": {"budget": 0.5},
    "infinigen_p": {"budget": 0.5}, "quest": {"budget": 0.5}, "streamingllm": {"window": 1024},
}
SWEEPS: dict[str, list[dict]] = {
    "full": [],
    "resv": [*({"ratio": r} for r in (0.1, 0.5, 0.7)),
             # the score readings the paper leaves open (lfmsift.kv.wicsum.transform_scores)
             {"ratio": 0.1, "score_mode": "shifted"}, {"ratio": 0.3, "score_mode": "shifted"},
             {"ratio": 0.9, "score_mode": "softmax"}],
    "rekv": [{"fraction": f, "keep_recent": 256} for f in (0.1, 0.25)],
    "infinigen": [{"budget": b} for b in (0.1, 0.25)],
    "infinigen_p": [{"budget": b} for b in (0.1, 0.25)],
    "quest": [{"budget": b} for b in (0.1, 0.25)],
    "streamingllm": [{"window": w} for w in (256, 512)],
}
# ReSV's readings the paper leaves open, one change from the defaults each (``--ablation``): the score
# domain and the Sum <= 0 fallback, whether the chunk's own clusters enter WiCSum, which layer selects,
# the always-kept sinks / recent window, hyperplanes and Hamming threshold (the paper's §VI-E).
ABLATIONS: dict[str, list[dict]] = {
    "resv": [{"nonpositive": "shifted"}, {"include_current": False}, {"keep_recent": 256},
             {"selection": "previous_layer"}, {"hamming_threshold": 0},
             {"center_keys": True}, {"center_keys": True, "keep_recent": 256},
             {"nonpositive": "shifted", "hamming_threshold": 0},
             {"score_mode": "shifted", "ratio": 0.1}, {"score_mode": "shifted", "ratio": 0.05},
             {"score_mode": "softmax", "ratio": 0.9}, {"score_mode": "softmax", "ratio": 0.9, "hamming_threshold": 4},
             {"score_mode": "softmax", "ratio": 0.9, "hamming_threshold": 0},
             {"nonpositive": "shifted", "include_current": False}, {"keep_first": 4},
             {"score_mode": "softmax", "ratio": 0.5}, {"score_mode": "softmax", "ratio": 0.7},
             {"hash_bits": 16}, {"hash_bits": 64}, {"hamming_threshold": 4}, {"hamming_threshold": 10},
             {"buckets": 20}],
    # the baselines that predict, with V-Rex's prefetch reading (layer l's choice fetched for layer l + 1)
    "resv_shifted": [{"selection": "previous_layer"}],
    "rekv": [{"selection": "previous_layer"}],
    "quest": [{"selection": "previous_layer"}],
}


@dataclass
class KVEvalConfig:
    """Sizes of the tasks (defaults fit a 135M model on 2 CPU cores in well under an hour)."""

    stream_tokens: int = 4096
    chunk_tokens: int = 128
    probes: int = 8
    prompt_tokens: int = 32
    target_tokens: int = 64
    needle_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    needle_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    needle_seeds: list[int] = field(default_factory=lambda: [0])  # one passcode and text stretch per seed
    needle_min_accuracy: float = 2 / 3
    multikey_length: int = 2048
    multikey_keys: int = 4
    multikey_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    video: str | None = None
    frames: int = 24
    fps: float = 1.0
    questions: list[str] = field(default_factory=lambda: [
        "What is happening in the video?", "How many people can you see?", "Describe the place."])
    new_tokens: int = 24
    device_tokens: int | None = 512  # the recent window each layer keeps on the device; None: unbounded


def run_key(retriever: str, options: dict, task: str) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{task}|{retriever}|{opts}"


def plan(retrievers: list[str], tasks: list[str], sweep: bool, ablation: bool = False
         ) -> list[tuple[str, dict, str]]:
    """(retriever, options, task) of every run, full first in each task (it sets the needle lengths);
    ``ablation`` adds each retriever's ``ABLATIONS`` (options on top of its defaults)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    runs = []
    for task in tasks:
        for name in sorted(retrievers, key=lambda n: n != "full"):
            get_retriever(name)  # an unknown name fails here, before any model work
            runs.append((name, dict(DEFAULTS.get(name, {})), task))
            if sweep:
                runs.extend((name, dict(o), task) for o in SWEEPS.get(name, []))
            if ablation:
                runs.extend((name, {**DEFAULTS.get(name, {}), **o}, task) for o in ABLATIONS.get(name, []))
    return runs


def device_budget(model, device_tokens: int | None):
    """The ``TierBudget`` that keeps ``device_tokens`` tokens of every retrieved layer on the device."""
    import torch

    from lfmsift.kv.store import TierBudget
    from lfmsift.models.adapters import describe

    if device_tokens is None:
        return None
    if device_tokens < 1:
        raise ValueError(f"device_tokens must be >= 1 or None, got {device_tokens}")
    view = describe(model)
    full = [layer.attention for layer in view.layers if layer.attention.sliding_window is None]
    item = torch.empty((), dtype=next(view.language_model.parameters()).dtype).element_size()
    token_bytes = 2 * full[0].num_kv_heads * full[0].head_dim * item
    return TierBudget(device_bytes=device_tokens * token_bytes * len(full))


def _summary(stats: dict) -> dict:
    frame, text = stats.get("frame_stage") or {}, stats.get("text_stage") or {}
    def per_head(stage):
        return {str(k): v.get("per_kv_head") for k, v in (stage.get("layers") or {}).items()}

    return {"frame_ratio": frame.get("retrieval_ratio"), "text_ratio": text.get("retrieval_ratio"),
            "frame_fetched": frame.get("fetched_ratio"), "text_fetched": text.get("fetched_ratio"),
            "frame_layers": per_head(frame), "text_layers": per_head(text)}


def run_kv_eval(model, processor, model_name: str, retrievers: list[str], tasks: list[str], out: str | Path,
                config: KVEvalConfig | None = None, sweep: bool = True, data_dir=None, command: str | None = None,
                progress=None, ablation: bool = False) -> dict:
    """Run every planned (retriever, options, task) not yet in ``out``; return the whole document."""
    from lfmsift.eval.data import load_text
    from lfmsift.eval.streaming_qa import (
        multikey_trials, needle_trials, recall_task, run_multikey, run_needle, run_recall,
    )
    from lfmsift.results import environment

    config = config or KVEvalConfig()
    out = Path(out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    if doc and doc.get("model") != model_name:
        raise ValueError(f"{out} holds results for {doc.get('model')!r}, not {model_name!r}; use another --out")
    doc.setdefault("model", model_name)
    doc.setdefault("runs", {})
    if "config" in doc and doc["runs"] and doc["config"].get("device_tokens") != config.device_tokens:
        raise ValueError(f"{out} holds runs with device_tokens={doc['config'].get('device_tokens')}, not "
                         f"{config.device_tokens}; use another --out")
    doc["config"] = {k: v for k, v in vars(config).items()}
    budget = device_budget(model, config.device_tokens)
    commands = doc.setdefault("commands", [c for c in [doc.pop("command", None)] if c])
    if command and command not in commands:
        commands.append(command)
    doc["environment"] = environment()
    tokenizer = getattr(processor, "tokenizer", processor)
    cache: dict = {}

    def text():
        if "text" not in cache:
            cache["text"] = load_text("wikitext2", data_dir=data_dir)
        return cache["text"]

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=float) + "\n")

    runs = plan(retrievers, tasks, sweep, ablation)
    for i, (name, options, task) in enumerate(runs):
        key = run_key(name, options, task)
        if key in doc["runs"]:
            continue
        if progress:
            progress(i, len(runs), key)
        retriever = get_retriever(name, **options)
        if hasattr(retriever, "calibrate"):  # InfiniGen's offline skew, on text the streams never use
            retriever.calibrate(model, tokenizer, load_text("ptb", data_dir=data_dir))
        if task == "recall":
            if "recall" not in cache:
                cache["recall"] = recall_task(tokenizer, text(), config.stream_tokens, config.chunk_tokens,
                                              config.probes, config.prompt_tokens, config.target_tokens)
            result = run_recall(model, tokenizer, retriever, cache["recall"], budget=budget)
            quality = {"ppl": result["ppl"], "per_probe_ppl": result["per_probe_ppl"]}
        elif task == "needle":
            lengths = doc.get("needle_lengths")
            if lengths is None:  # the full cache decides which lengths the model itself can do
                trials = needle_trials(tokenizer, text(), config.needle_lengths, config.needle_depths,
                                       config.needle_seeds, config.chunk_tokens)
                result = run_needle(model, tokenizer, get_retriever("full"), trials, budget=budget)
                by_length = {n: [t["success"] for t in result["trials"] if t["length"] == n]
                             for n in config.needle_lengths}
                doc["needle_full_by_length"] = {str(n): sum(v) / len(v) for n, v in by_length.items()}
                ok = [n for n, v in by_length.items() if sum(v) / len(v) >= config.needle_min_accuracy]
                doc["needle_lengths"] = lengths = ok or [min(config.needle_lengths)]
                save()
            trials = needle_trials(tokenizer, text(), lengths, config.needle_depths, config.needle_seeds,
                                   config.chunk_tokens)
            result = run_needle(model, tokenizer, retriever, trials, budget=budget)
            quality = {"accuracy": result["accuracy"], "trials": result["trials"]}
        elif task == "multikey":
            trials = multikey_trials(tokenizer, text(), config.multikey_length, config.multikey_keys,
                                     config.multikey_seeds, config.chunk_tokens)
            result = run_multikey(model, tokenizer, retriever, trials, budget=budget)
            quality = {"accuracy": result["accuracy"], "items": result["items"]}
        else:
            from lfmsift.eval.fidelity import stream_fidelity, stream_reference
            from lfmsift.stream.video import frames as read_frames

            if not hasattr(processor, "image_processor"):
                raise ValueError(f"the video task needs a vision-language model; {model_name} takes text only")
            if not config.video:
                raise ValueError("the video task needs a video file (--video)")
            if "frames" not in cache:
                cache["frames"] = [f.image for f in read_frames(config.video, fps=config.fps,
                                                                max_frames=config.frames)]
                if not cache["frames"]:
                    raise ValueError(f"no frames decoded from {config.video}")
                cache["reference"] = stream_reference(model, processor, cache["frames"], config.questions,
                                                      config.new_tokens, budget=budget)
            result = stream_fidelity(model, processor, retriever, cache["frames"], config.questions,
                                     cache["reference"], budget=budget)
            quality = {k: result[k] for k in ("kl", "kl_first", "top1", "tokens")}
        doc["runs"][key] = {"retriever": name, "options": options, "task": task, "quality": quality,
                            "default": options == DEFAULTS.get(name, {}), **_summary(result["stats"])}
        save()
    return doc


def _items(run: dict) -> list[bool]:
    quality = run["quality"]
    return [bool(i["success"]) for i in quality.get("trials") or quality.get("items") or []]


def paired_comparison(run_a: dict, run_b: dict) -> dict:
    """Two runs of the same task on the same items (needle trials or multi-key questions): successes of
    each, the items only one got right, the difference in accuracy with a 95% interval (Wald on the paired
    differences, with the continuity correction of Fleiss) and the exact two-sided McNemar p-value."""
    a, b = _items(run_a), _items(run_b)
    if not a or len(a) != len(b):
        raise ValueError("the runs must have per-item results on the same items")
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    diff = (only_a - only_b) / n
    half = 1.96 * math.sqrt(max(0.0, (only_a + only_b) / n - diff ** 2) / n) + 1 / n
    discordant = only_a + only_b
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant \
        if discordant else 1.0
    return {"items": n, "a": sum(a), "b": sum(b), "only_a": only_a, "only_b": only_b, "difference": diff,
            "interval": (max(-1.0, diff - half), min(1.0, diff + half)), "mcnemar_p": min(1.0, 2 * tail)}


# Two-sided 95% quantiles of Student's t by degrees of freedom (1-30); beyond, the normal's 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_ppl_ratio(run_a: dict, run_b: dict) -> dict:
    """Two recall runs on the same probes: the geometric mean over probes of ppl_a / ppl_b with a 95% interval
    (Student's t on the paired differences of log perplexity)."""
    a, b = run_a["quality"].get("per_probe_ppl"), run_b["quality"].get("per_probe_ppl")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        raise ValueError("the runs must have per-probe perplexities on the same (two or more) probes")
    diffs = [math.log(x) - math.log(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return {"probes": n, "ratio": math.exp(mean), "interval": (math.exp(mean - half), math.exp(mean + half))}


# -- reports ----------------------------------------------------------------------------------------------
QUALITY = {"recall": ("ppl", "recall ppl", False), "needle": ("accuracy", "needle acc.", True),
           "multikey": ("accuracy", "multi-key acc.", True),
           "video": ("kl", "video KL", False)}


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(doc: dict) -> str:
    """Table II form: per retriever at its default budget, quality per task and fetched ratios."""
    runs = [r for r in doc["runs"].values() if r["default"]]
    tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
    names = sorted({r["retriever"] for r in runs}, key=lambda n: (n != "full", n))
    head = ["method", "options"]
    for t in tasks:
        head += [QUALITY[t][1]] + (["video top-1"] if t == "video" else []) + [
            f"{t} attended % frame / text", f"{t} fetched % frame / text"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        row = [n, ", ".join(f"{k}={v}" for k, v in DEFAULTS.get(n, {}).items()) or "-"]
        for t in tasks:
            r = next((x for x in runs if x["retriever"] == n and x["task"] == t), None)
            if r is None:
                row += ["-"] * (4 if t == "video" else 3)
                continue
            q = r["quality"][QUALITY[t][0]]
            row.append(f"{100 * q:.0f}%" if t in ("needle", "multikey") else f"{q:.3f}" if t == "video" else f"{q:.2f}")
            if t == "video":
                row.append(f"{100 * r['quality']['top1']:.1f}%")
            row.append(f"{_pct(r['frame_ratio'])} / {_pct(r['text_ratio'])}")
            row.append(f"{_pct(r.get('frame_fetched'))} / {_pct(r.get('text_fetched'))}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def series(run: dict) -> str:
    """The line a run belongs to in the figure: the retriever, and ReSV's score reading when not raw."""
    mode = run["options"].get("score_mode")
    return run["retriever"] + (f" ({mode})" if mode and mode != "raw" else "")


def figure(doc: dict, path: str | Path) -> Path:
    """Quality against the fetched ratio (frame stage and text stage), every run of every retriever."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in doc["runs"].values())]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    names = sorted({series(r) for r in doc["runs"].values()})
    colors = {n: matplotlib.colormaps["tab10"](i % 10) for i, n in enumerate(names)}
    for row, task in zip(axes, tasks):
        key, label, _ = QUALITY[task]
        for n in names:
            runs = sorted((r for r in doc["runs"].values() if r["task"] == task and series(r) == n),
                          key=lambda r: r["text_ratio"] or 0)
            if not runs:
                continue
            for ax, stage in zip(row, ("frame_ratio", "text_ratio")):
                xs = [100 * (r[stage] if r[stage] is not None else 1.0) for r in runs]
                ys = [r["quality"][key] for r in runs]
                ax.plot(xs, ys, "o-" if len(runs) > 1 else "o", color=colors[n], label=n)
        for ax, stage in zip(row, ("frame stage", "text stage")):
            ax.set_xlabel(f"attended past streamed tokens, {stage} (%)")
            ax.set_ylabel(label)
            ax.set_xscale("log")
            if task == "recall":
                ax.set_yscale("log")
            ax.set_title(f"{task}: {label} vs {stage} ratio")
        row[0].legend(fontsize=7)
    fig.suptitle(f"{doc['model']}: quality against fetched tokens (lfmsift kv-eval)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def heatmap(doc: dict, path: str | Path) -> Path:
    """Per layer x KV head retrieval ratio of each retriever at its default budget (the paper's Fig. 20):
    the frame stage where the retriever selects there, else the text stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    task_order = {t: i for i, t in enumerate(("video", "recall", "needle", "multikey"))}
    chosen: dict[str, tuple[dict, str]] = {}
    for r in sorted(doc["runs"].values(), key=lambda r: (task_order[r["task"]], str(sorted(r["options"].items())))):
        name = series(r)  # defaults, and ReSV under each other score reading (its smallest ratio)
        if r["retriever"] == "full" or name in chosen or (not r["default"] and name == r["retriever"]):
            continue
        stage = "frame" if (r["frame_ratio"] or 1.0) < 1.0 else "text"
        if r.get(f"{stage}_layers"):
            chosen[name] = (r, stage)
    if not chosen:
        raise ValueError("no per-layer ratios to draw")
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.3 * len(chosen) + 1.5, 5.5), squeeze=False)
    for ax, (name, (r, stage)) in zip(axes[0], sorted(chosen.items())):
        layers = r[f"{stage}_layers"]
        grid = np.array([layers[k] for k in sorted(layers, key=int)]) * 100
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "score_mode")
        ax.set_title(f"{name}\n{opts}\n{r['task']}, {stage} stage\nmean {np.mean(grid):.1f}%", fontsize=7)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(grid.shape[1]))
    axes[0][0].set_ylabel("layer")
    fig.suptitle(f"{doc['model']}: tokens fetched per layer and KV head (cf. V-Rex Fig. 20)", y=0.99)
    fig.subplots_adjust(top=0.8, right=0.9, wspace=0.35)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.12, 0.012, 0.66]), label="retrieval ratio (%)")
    return save_figure(fig, path, dpi=110)


def write_reports(doc: dict, out: str | Path) -> dict[str, Path]:
    """``<out>.md`` (table), ``<out>.png`` (quality vs ratio), ``<out>_heatmap.png`` next to the JSON."""
    out = Path(out)
    md = out.with_suffix(".md")
    commands = doc.get("commands") or [doc.get("command")]
    lines = [f"# KV retrieval on {doc['model']}\n", "Commands:\n", *(f"    {c}" for c in commands), ""]
    if "needle_full_by_length" in doc:
        lines.append("Needle accuracy of the full cache by stream length: " + ", ".join(
            f"{k}: {100 * v:.0f}%" for k, v in doc["needle_full_by_length"].items())
                     + f"; lengths used: {doc['needle_lengths']}\n")
    lines.append(markdown_table(doc))
    md.write_text("\n".join(lines))
    paths = {"table": md, "figure": figure(doc, out.with_suffix(".png"))}
    try:
        paths["heatmap"] = heatmap(doc, out.with_name(out.stem + "_heatmap.png"))
    except ValueError:
        pass
    return paths

