"""ReSV's sensitivity to its knobs (V-Rex §VI-E) on a stored ablation: hash bits, Hamming threshold, ratio.

Reads the per-item runs of a ``lfmsift kv-eval --ablation`` file (the needle or multi-key task) and, per
knob, plots task accuracy (with its 95% Wilson interval over the items) and the share of the past streamed
tokens attended to (V-Rex's retrieval ratio, beside Table II's 32.7% / 2.5%) and fetched from the host, while
the stream is prefilled and while answering, each knob varied from the
paper's rule (32 bits, threshold 7, ratio 0.3) with the rest held. Nothing is re-run: the figure is only as
wide as the ablation it reads (``lfmsift.eval.kv_eval.ABLATIONS``).

    python benchmarks/resv_sensitivity.py --ablation results/kv_ablation_smollm2-135m.json \
        --json results/resv_sensitivity_smollm2-135m.json --png results/resv_sensitivity_smollm2-135m.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PAPER = {"hash_bits": 32, "hamming_threshold": 7, "ratio": 0.3}
# knob -> (label, the options that must hold besides the knob, the knob's value in the paper's rule)
KNOBS = {
    "hash_bits": ("hash bits (threshold 7)", {}, 32),
    "hamming_threshold": ("Hamming threshold (32 bits)", {}, 7),
    "ratio:shifted": ("ratio, score_mode=shifted", {"score_mode": "shifted"}, None),
    "ratio:softmax": ("ratio, score_mode=softmax", {"score_mode": "softmax"}, None),
}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _items(run: dict) -> list[bool]:
    """Per-item success of a needle run (``trials``) or a multi-key run (``items``)."""
    quality = run["quality"]
    return [bool(t["success"]) for t in quality.get("trials") or quality.get("items")]


def series(runs: dict, task: str, knob: str) -> list[dict]:
    """The ReSV runs of ``task`` that differ from the paper's rule in ``knob`` only (and the paper's rule
    itself where the knob's paper value belongs on the axis), sorted by the knob's value."""
    name = knob.split(":")[0]
    _, fixed, paper_value = KNOBS[knob]
    out = []
    for run in runs.values():
        if run["task"] != task or run["retriever"] != "resv":
            continue
        options = dict(run["options"])
        value = options.pop(name, PAPER.get(name))
        if any(options.pop(k, None) != v for k, v in fixed.items()):
            continue
        if any(options.get(k, PAPER[k]) != PAPER[k] for k in PAPER if k != name) or \
                set(options) - set(PAPER):
            continue
        if not fixed and value == paper_value and run["options"].get(name) is not None:
            continue  # the paper's rule spelled out: counted once, as the bare rule
        items = _items(run)
        out.append({"value": value, "accuracy": sum(items) / len(items), "items": len(items),
                    "interval": wilson(sum(items), len(items)), "frame_fetched": run["frame_fetched"],
                    "text_fetched": run["text_fetched"], "frame_attended": run["frame_ratio"],
                    "text_attended": run["text_ratio"], "options": run["options"]})
    return sorted(out, key=lambda r: r["value"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", type=Path, required=True, help="a kv-eval JSON holding ReSV's ablation")
    parser.add_argument("--task", default="needle")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    doc = json.loads(args.ablation.read_text())
    runs = doc["runs"]
    full = next((r for r in runs.values() if r["task"] == args.task and r["retriever"] == "full"), None)
    table = {knob: series(runs, args.task, knob) for knob in KNOBS}
    if not any(table.values()):
        print(f"no ReSV ablation runs of task {args.task!r} in {args.ablation}", file=sys.stderr)
        return 2
    print(f"{'knob':34s} {'value':>6s}  {'accuracy [95% CI]':22s} {'attended % frame / text':>24s} "
          f"{'fetched % frame / text':>24s}")
    for knob, rows in table.items():
        for r in rows:
            lo, hi = r["interval"]
            print(f"{KNOBS[knob][0]:34s} {r['value']:>6g}  {r['accuracy']:5.2f} [{lo:.2f}, {hi:.2f}]"
                  f"{100 * r['frame_attended']:15.1f} / {100 * r['text_attended']:4.1f}"
                  f"{100 * r['frame_fetched']:18.1f} / {100 * r['text_fetched']:.1f}")
    if full is not None:
        items = _items(full)
        print(f"full cache: {sum(items)}/{len(items)}")
    record = {"command": " ".join(["python", "benchmarks/resv_sensitivity.py", *(argv if argv is not None
                                                                               else sys.argv[1:])]),
              "source": str(args.ablation), "source_commands": doc.get("commands"), "task": args.task,
              "full_accuracy": None if full is None else sum(_items(full)) / len(_items(full)),
              "knobs": {knob: rows for knob, rows in table.items()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    if args.png:
        plot(table, record["full_accuracy"], args.task, args.png)
    return 0


def plot(table: dict, full_accuracy: float | None, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = [k for k, rows in table.items() if rows]
    fig, axes = plt.subplots(2, len(knobs), figsize=(3.6 * len(knobs), 5.6), squeeze=False)
    for col, knob in enumerate(knobs):
        rows = table[knob]
        x = [r["value"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        err = [[a - r["interval"][0] for a, r in zip(acc, rows)], [r["interval"][1] - a for a, r in zip(acc, rows)]]
        top, bottom = axes[0][col], axes[1][col]
        top.errorbar(x, acc, yerr=err, marker="o", capsize=3)
        if full_accuracy is not None:
            top.axhline(full_accuracy, color="gray", ls="--", lw=1, label="full cache")
        top.set_ylim(-0.05, 1.05)
        top.set_title(KNOBS[knob][0], fontsize=9)
        top.set_ylabel(f"{task} accuracy" if col == 0 else "")
        bottom.plot(x, [100 * r["frame_attended"] for r in rows], marker="o", color="C0", label="attended, frames")
        bottom.plot(x, [100 * r["text_attended"] for r in rows], marker="s", color="C1", label="attended, answering")
        bottom.plot(x, [100 * r["frame_fetched"] for r in rows], marker="o", color="C0", ls="--", alpha=0.5,
                    label="fetched, frames")
        bottom.plot(x, [100 * r["text_fetched"] for r in rows], marker="s", color="C1", ls="--", alpha=0.5,
                    label="fetched, answering")
        bottom.axhline(32.7, color="C0", ls=":", lw=1)
        bottom.axhline(2.5, color="C1", ls=":", lw=1)
        bottom.set_ylabel("% of past streamed tokens" if col == 0 else "")
        bottom.set_xlabel(knob.split(":")[0])
        if col == 0:
            top.legend(fontsize=7)
            bottom.legend(fontsize=7, title="dotted: V-Rex Table II", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
