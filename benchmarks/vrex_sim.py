"""The V-Rex simulator against the paper: fit, every reported point, the sweeps of Fig. 13, the ablation of
Fig. 16, sensitivity plots, and a sweep driven by a real ReSV trace. Prints tables, writes
results/vrex_sim.json and results/vrex_sim_*.png.

    python benchmarks/vrex_sim.py            # ~40 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lfmsift.hw import fit as hwfit
from lfmsift.hw.energy import step_energy
from lfmsift.hw.report import compare, plot_compare, plot_sensitivity, sensitivity
from lfmsift.hw.sim import DEFAULT_CALIBRATION, Scenario, simulate
from lfmsift.hw.trace import load_trace
from lfmsift.results import write_json

ROOT = Path(__file__).resolve().parents[1]


def ablation(calib) -> list[dict]:
    """Fig. 16: 40K cache, batch 1, frame stage, against AGX Orin + FlexGen."""
    systems = [("AGX+FlexGen", Scenario("agx_orin", "flexgen", 40960)),
               ("AGX+ReSV", Scenario("agx_orin", "resv", 40960)),
               ("V-Rex8-KVPU", Scenario("vrex8", "resv", 40960, kvmu=False)),
               ("V-Rex8-All", Scenario("vrex8", "resv", 40960))]
    reports = {name: simulate(s, calib) for name, s in systems}
    base = reports["AGX+FlexGen"]
    base_e = step_energy(base, calib)["total"]
    rows = []
    for name, r in reports.items():
        rows.append({"system": name, "latency_ms": r.latency_s * 1e3, "speedup": base.latency_s / r.latency_s,
                     "energy_reduction": base_e / step_energy(r, calib)["total"],
                     "prediction_share": r.predict_s / r.latency_s, "link_requests": r.link_requests})
    return rows


def dpe_per_operation(calib) -> list[dict]:
    """V-Rex48 batch-8 frame efficiency under the shipped DPE reading (its power while it works) and under
    the per-operation one (its power x FLOPs / peak), with the step's energy split."""
    from lfmsift.hw.specs import get_platform

    p = get_platform("vrex48")
    watts = sum(p.core.blocks[b].power_mw for b in ("dpe", "vpe")) * 1e-3 * p.cores
    rows = []
    for cache in (1024, 40960):
        r = simulate(Scenario("vrex48", "resv", cache, 8), calib)
        e = step_energy(r, calib)
        per_op = e["total"] - e["dpe"] - e["vpe"] + watts * r.flops / p.peak_flops
        rows.append({"cache": cache, "energy_j": e, "tops_per_w_busy": r.dense_flops / e["total"] / 1e12,
                     "tops_per_w_per_operation": r.dense_flops / per_op / 1e12})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "vrex_sim.json"))
    parser.add_argument("--trace", default=str(ROOT / "results" / "stream_vtest_smolvlm_resv.json"))
    parser.add_argument("--skip-fit", action="store_true", help="Use the shipped defaults instead of refitting.")
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.time()
    calib = DEFAULT_CALIBRATION if args.skip_fit else hwfit.fit()
    knobs = hwfit.knob_values(calib)
    points = hwfit.residuals(calib)
    print(f"{'point':48s} {'used':6s} {'paper':>8s} {'model':>8s} {'error':>7s}")
    for p in points:
        print(f"{p['name']:48s} {'check' if p['group'] == 'check' else 'fit':6s} {p['paper']:8.3g} "
              f"{p['model']:8.3g} {p['error']:+7.1%}")
    sweeps = {}
    for platform, batches in (("vrex8", (1, 4)), ("vrex48", (1, 8))):
        for batch in batches:
            for stage in ("frame", "text"):
                key = f"{platform}_b{batch}_{stage}"
                sweeps[key] = compare(platform, batch=batch, stage=stage, calib=calib)
                plot_compare(sweeps[key], out.with_name(f"{out.stem}_{key}.png"))
                print(f"\n{key}: " + "  ".join(
                    f"{r['cache'] // 1024}K {r['latency_ms']:.0f} ms ({r['speedup']:.1f}x, E {r['energy_gain']:.1f}x)"
                    for r in sweeps[key]))
    fig16 = ablation(calib)
    print("\nFig. 16 (40K, batch 1, frame):")
    for r in fig16:
        print(f"  {r['system']:12s} {r['latency_ms']:8.1f} ms  speedup {r['speedup']:5.2f}x  "
              f"energy {r['energy_reduction']:5.2f}x  prediction {r['prediction_share']:.0%}")
    dpe = dpe_per_operation(calib)
    for r in dpe:
        print(f"V-Rex48 b8 {r['cache'] // 1024}K: {r['tops_per_w_busy']:.2f} TOPS/W (DPE while working), "
              f"{r['tops_per_w_per_operation']:.2f} (DPE per operation); PCIe {r['energy_j']['pcie']:.1f} of "
              f"{r['energy_j']['total']:.1f} J")
    sens = sensitivity(calib)
    plot_sensitivity(sens, out.with_name(f"{out.stem}_sensitivity.png"))
    trace = load_trace(args.trace)
    traced = {stage: compare("vrex8", stage=stage, calib=calib, trace=trace) for stage in ("frame", "text")}
    print(f"\ntrace {trace.source}: frame ratio {trace.frame_ratio:.1%}, text {trace.text_ratio:.2%}, "
          f"{trace.tokens_per_cluster:.1f} tokens/cluster")
    for stage, rows in traced.items():
        print(f"  {stage}: " + "  ".join(f"{r['cache'] // 1024}K {r['latency_ms']:.0f} ms ({r['speedup']:.1f}x)"
                                         for r in rows))
    write_json(out, {
        "task": "vrex_sim", "seconds": round(time.time() - t0, 1), "fitted": not args.skip_fit,
        "knobs": knobs, "points": points, "sweeps": sweeps, "fig16": fig16, "dpe_per_operation": dpe,
        "sensitivity": sens,
        "trace": {"source": trace.source, "frame_ratio": trace.frame_ratio, "text_ratio": trace.text_ratio,
                  "tokens_per_cluster": trace.tokens_per_cluster, "sweeps": traced},
    }, command=["python", *sys.argv])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
