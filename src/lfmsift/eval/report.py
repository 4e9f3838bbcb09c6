"""Tables and figures of a pruning comparison (`harness.run_comparison` JSON).

`markdown_table` gives one row per method and target with each task's headline metric (perplexity, lm-eval
``acc_norm`` in %, generation agreement token F1 and exact match in %), the QA average and the measured
parameter reduction. `figures` plots QA accuracy, perplexity and agreement against the target, one line
per method, with the dense model as a horizontal reference.
"""

from __future__ import annotations

import math
from pathlib import Path

from lfmsift.eval.harness import TASK_KINDS
from lfmsift.results import save_figure

QA_KIND = "choice"
LABELS = {
    "wikitext2": "WikiText-2 ppl",
    "ptb": "PTB ppl",
    "decode_ppl": "decode ppl",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
    "piqa": "PIQA",
    "winogrande": "WinoG",
    "gen_agreement": "gen F1 / EM",
}


def _grid(doc: dict) -> tuple[dict, list[tuple[str, float]], list[str]]:
    cells: dict[tuple[str, float, str], dict] = {}
    runs: list[tuple[str, float]] = []
    tasks: list[str] = []
    for r in doc["rows"]:
        key = (r["method"], float(r["target"]))
        cells[(*key, r["task"])] = r
        if key not in runs:
            runs.append(key)
        if r["task"] not in tasks:
            tasks.append(r["task"])
    tasks.sort(key=lambda t: list(TASK_KINDS).index(t))
    runs.sort(key=lambda mt: (mt[1], mt[0] != "dense"))
    return cells, runs, tasks


def _fmt(row: dict | None, task: str) -> str:
    if row is None:
        return "–"
    m = row["metrics"]
    kind = TASK_KINDS[task]
    if kind in ("perplexity", "decode_ppl"):
        return f"{m['perplexity']:.2f}"
    if kind == QA_KIND:
        return f"{100 * m['acc_norm']:.1f}"
    return f"{100 * m['token_f1']:.1f} / {100 * m['exact_match']:.0f}"


def qa_average(cells: dict, method: str, target: float, tasks: list[str]) -> float | None:
    qa = [t for t in tasks if TASK_KINDS[t] == QA_KIND]
    vals = [cells[(method, target, t)]["metrics"]["acc_norm"] for t in qa if (method, target, t) in cells]
    return 100 * sum(vals) / len(vals) if qa and len(vals) == len(qa) else None


def markdown_table(doc: dict) -> str:
    """The comparison as a markdown table (see the module docstring)."""
    cells, runs, tasks = _grid(doc)
    has_qa = any(TASK_KINDS[t] == QA_KIND for t in tasks)
    head = ["method", "target", "weights removed"] + [LABELS.get(t, t) for t in tasks] + (["QA avg"] if has_qa else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, target in runs:
        any_row = next((cells[(method, target, t)] for t in tasks if (method, target, t) in cells), None)
        info = any_row.get("method_info", {}) if any_row else {}
        if method == "dense":
            removed = "0%"
        elif "achieved_reduction" in info:
            removed = f"{100 * info['achieved_reduction']:.1f}%"
        elif "ffn_ratio" in info:
            removed = f"FFN {100 * info['ffn_ratio']:.1f}%"
        else:
            removed = f"{100 * target:.0f}% (uniform)"
        row = [method, f"{100 * target:.0f}%", removed] + [_fmt(cells.get((method, target, t)), t) for t in tasks]
        if has_qa:
            avg = qa_average(cells, method, target, tasks)
            row.append("–" if avg is None else f"{avg:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def figures(doc: dict, path: str | Path) -> Path:
    """QA average, perplexities and agreement against the target; one PNG with one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, runs, tasks = _grid(doc)
    methods = [m for m in dict.fromkeys(m for m, _ in runs) if m != "dense"]
    panels = []
    if any(TASK_KINDS[t] == QA_KIND for t in tasks):
        panels.append(("QA average acc_norm (%)", lambda m, t: qa_average(cells, m, t, tasks), False))
    for t in tasks:
        if TASK_KINDS[t] in ("perplexity", "decode_ppl"):
            panels.append((LABELS[t], lambda m, tt, t=t: _metric(cells, m, tt, t, "perplexity"), True))
    if "gen_agreement" in tasks:
        panels.append(
            ("generation agreement token F1 (%)", lambda m, tt: _pct(_metric(cells, m, tt, "gen_agreement", "token_f1")), False)
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, get, log) in zip(axes[0], panels):
        dense = get("dense", 0.0)
        if dense is not None:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        for m in methods:
            pts = ([(0.0, dense)] if dense is not None else []) + [(t, get(m, t)) for mm, t in runs if mm == m]
            pts = [(t, v) for t, v in pts if v is not None and math.isfinite(v)]
            if pts:
                ax.plot([100 * t for t, _ in pts], [v for _, v in pts], marker="o", label=m)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("target (% of attention + FFN weights)")
        ax.set_xticks([0] + sorted({round(100 * t) for _, t in runs if t > 0}))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(doc["header"]["model"], fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _metric(cells, method, target, task, key):
    row = cells.get((method, target, task))
    return None if row is None else row["metrics"][key]


def _pct(v):
    return None if v is None else 100 * v


def fidelity_table(doc: dict) -> str:
    """A fidelity comparison (`harness.run_fidelity_comparison` JSON) as a markdown table.

    KL(dense || pruned) in nats per next token (all positions, the prefill's prediction, the decode
    steps'), top-1 agreement of teacher-forced predictions, and agreement of the greedy continuations.
    """
    head = ["method", "target", "weights removed", "KL", "KL prefill", "KL decode", "top-1 %", "gen F1 %",
            "gen EM %", "prefix %", "FFN decode FLOPs vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = list(dict.fromkeys(r["method"] for r in doc["rows"]))  # the order they were run in
    rows = sorted(doc["rows"], key=lambda r: (float(r["target"]), methods.index(r["method"])))
    for r in rows:
        m, info = r["metrics"], r.get("method_info", {})
        if "achieved_reduction" in info:
            removed = f"{100 * info['achieved_reduction']:.1f}%"
        elif "ffn_ratio" in info:
            removed = f"FFN {100 * info['ffn_ratio']:.1f}%"
        else:
            removed = "–"
        flops = info.get("decode_flops_vs_dense")
        kl_decode = m["kl_decode"]
        lines.append("| " + " | ".join([
            r["method"], f"{100 * float(r['target']):.0f}%", removed, f"{m['kl']:.3f}", f"{m['kl_first']:.3f}",
            "–" if kl_decode is None else f"{kl_decode:.3f}", f"{100 * m['top1']:.1f}", f"{100 * m['token_f1']:.1f}",
            f"{100 * m['exact_match']:.0f}", f"{100 * m['prefix']:.1f}", "–" if flops is None else f"{flops:.3f}",
        ]) + " |")
    return "\n".join(lines) + "\n"
