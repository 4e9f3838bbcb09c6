"""Sweeps of the simulator against a baseline, and their figures.

``compare`` runs one platform (V-Rex with ReSV by default) and its baseline (the GPU of Table I with
FlexGen) over cache lengths, and returns one row per cache length: latency, FPS (frame stage) or TPOT
(text stage), speedup, energy efficiency and its gain, and the per-unit time and energy breakdown.
``plot_compare`` draws a sweep; ``plot_sensitivity`` draws FPS against the cache length for every platform
and against the retrieval ratio.
"""

from __future__ import annotations

from pathlib import Path

from lfmsift.hw.energy import gops_per_watt, step_energy
from lfmsift.hw.sim import DEFAULT_CALIBRATION, Calibration, Scenario, StepReport, simulate
from lfmsift.hw.specs import BASELINE_GPU, get_platform
from lfmsift.hw.trace import Trace
from lfmsift.results import save_figure


def parse_caches(text: str) -> list[int]:
    """``"1k,5k,40k"`` -> [1024, 5120, 40960] (K = 1024 tokens); plain integers are token counts."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise ValueError(f"cannot read cache length {part!r} (use e.g. 1k,5k,10k or 2048)") from None
        if value < 0:
            raise ValueError(f"cache length must be >= 0, got {part!r}")
        out.append(value)
    if not out:
        raise ValueError("no cache lengths given")
    return out


def _row(report: StepReport, calib: Calibration) -> dict:
    energy = step_energy(report, calib)
    return {
        "latency_ms": report.latency_s * 1e3,
        "per_second": 1.0 / report.latency_s,
        "gops_per_w": gops_per_watt(report, calib),
        "energy_mj": energy["total"] * 1e3,
        "retrieval_ratio": report.ratio,
        "fetched_tokens_per_layer": report.fetched_tokens,
        "link_mb": report.link_bytes / 1e6,
        "device_gb": report.device_bytes / 1e9,
        "fits_device_memory": report.fits,
        "busy_ms": {k: v * 1e3 for k, v in sorted(report.busy_s.items())},
        "energy_breakdown_mj": {k: v * 1e3 for k, v in energy.items() if k != "total"},
    }


def compare(platform: str = "vrex8", caches: list[int] | None = None, batch: int = 1, stage: str = "frame",
            method: str = "resv", baseline: str | None = None, baseline_method: str = "flexgen",
            calib: Calibration = DEFAULT_CALIBRATION, trace: Trace | None = None, kvmu: bool = True) -> list[dict]:
    """One row per cache length: the platform and its baseline side by side."""
    caches = caches or [1024, 5120, 10240, 20480, 40960]
    baseline = baseline or BASELINE_GPU.get(get_platform(platform).name)
    if trace is not None:
        calib = trace.calibration(calib)
    rows = []
    for cache in caches:
        scenario = Scenario(platform, method, cache, batch, stage, kvmu=kvmu)
        if trace is not None:
            scenario = trace.scenario(scenario)
        row = {"cache": cache, "batch": batch, "stage": stage, "platform": platform, "method": method,
               **_row(simulate(scenario, calib), calib)}
        if baseline:
            base = Scenario(baseline, baseline_method, cache, batch, stage)
            if trace is not None and baseline_method != "flexgen":
                base = trace.scenario(base)
            b = _row(simulate(base, calib), calib)
            row["baseline"] = {"platform": baseline, "method": baseline_method, **b}
            row["speedup"] = b["latency_ms"] / row["latency_ms"]
            row["energy_gain"] = b["energy_mj"] / row["energy_mj"]
        rows.append(row)
    return rows


def _stacked(ax, rows: list[dict], key: str, title: str) -> None:
    """Stacked bars per cache length of a per-unit breakdown (``busy_ms`` or ``energy_breakdown_mj``)."""
    import matplotlib

    units = sorted({u for r in rows for u in r[key] if u != "stall"})
    labels = [f"{r['cache'] / 1024:g}K" for r in rows]
    bottom = [0.0] * len(rows)
    colors = matplotlib.colormaps["tab20"]
    for i, unit in enumerate(units):
        values = [r[key].get(unit, 0.0) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=unit, color=colors(i % 20))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title(title)
    ax.set_xlabel("KV cache")
    ax.legend(fontsize=6, ncol=2)


def plot_compare(rows: list[dict], path: str | Path) -> Path:
    """Latency, rate, speedup and energy efficiency against the cache length (one sweep), and the
    platform's busy time and energy per unit at each cache length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = [r["cache"] / 1024 for r in rows]
    first = rows[0]
    label = f"{first['platform']}+{first['method']}"
    rate = "FPS" if first["stage"] == "frame" else "tokens/s"
    fig, grid = plt.subplots(2, 3, figsize=(15, 7.5))
    axes = grid.flatten()
    has_base = "baseline" in first
    base_label = f"{first['baseline']['platform']}+{first['baseline']['method']}" if has_base else ""
    for ax, key, title in ((axes[0], "latency_ms", "latency per step (ms)"), (axes[1], "per_second", rate),
                           (axes[3], "gops_per_w", "energy efficiency (GOPS/W)")):
        ax.plot(caches, [r[key] for r in rows], "o-", label=label)
        if has_base:
            ax.plot(caches, [r["baseline"][key] for r in rows], "s--", label=base_label)
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV cache (K tokens)")
    if has_base:
        axes[2].plot(caches, [r["speedup"] for r in rows], "o-", label="speedup")
        axes[2].plot(caches, [r["energy_gain"] for r in rows], "^-", label="energy gain")
        axes[2].set_title(f"over {base_label}")
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("KV cache (K tokens)")
        axes[2].legend()
    axes[0].legend()
    _stacked(axes[4], rows, "busy_ms", f"{label}: busy time per unit (ms; units overlap)")
    _stacked(axes[5], rows, "energy_breakdown_mj", f"{label}: energy per unit (mJ)")
    fig.suptitle(f"{label}, batch {first['batch']}, {first['stage']} stage (lfmsift.hw simulator)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


SENSITIVITY_SYSTEMS = (("vrex8", "resv"), ("agx_orin", "flexgen"), ("agx_orin", "resv"), ("agx_orin", "rekv"),
                       ("vrex48", "resv"), ("a100", "flexgen"), ("a100", "resv"))


def sensitivity(calib: Calibration = DEFAULT_CALIBRATION, caches: list[int] | None = None,
                ratios: list[float] | None = None, ratio_cache: int = 40960) -> dict:
    """FPS (batch 1, frame stage) against the cache length per system, and against ReSV's frame-stage
    retrieval ratio at ``ratio_cache`` tokens on both V-Rex systems."""
    caches = caches or [1024, 2048, 5120, 10240, 20480, 40960, 81920]
    ratios = ratios or [0.01, 0.02, 0.05, 0.1, 0.2, 0.327, 0.5, 0.75, 1.0]
    by_cache = {f"{p}+{m}": [simulate(Scenario(p, m, c), calib).fps for c in caches]
                for p, m in SENSITIVITY_SYSTEMS}
    by_ratio = {p: [simulate(Scenario(p, "resv", ratio_cache, frame_ratio=r), calib).fps for r in ratios]
                for p in ("vrex8", "vrex48")}
    return {"caches": caches, "fps_by_cache": by_cache, "ratios": ratios, "ratio_cache": ratio_cache,
            "fps_by_ratio": by_ratio}


def plot_sensitivity(data: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    ks = [c / 1024 for c in data["caches"]]
    for name, fps in data["fps_by_cache"].items():
        a.plot(ks, fps, "o-" if name.startswith("vrex") else "s--", label=name)
    a.axhline(2.0, color="grey", lw=0.8, ls=":", label="2 FPS (real time, §VI-B)")
    a.set(xscale="log", yscale="log", xlabel="KV cache (K tokens)", ylabel="frames per second",
          title="FPS against the cache length (batch 1)")
    a.set_xscale("log", base=2)
    a.legend(fontsize=7)
    for name, fps in data["fps_by_ratio"].items():
        b.plot([100 * r for r in data["ratios"]], fps, "o-", label=f"{name}+resv")
    b.set(xscale="log", xlabel="frame-stage retrieval ratio (%)", ylabel="frames per second",
          title=f"FPS against the retrieval ratio ({data['ratio_cache'] // 1024}K cache)")
    b.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)

