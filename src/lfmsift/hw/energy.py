"""Energy of a simulated step, per unit, and energy efficiency in GOPS/W.

V-Rex (§VI-A: per-unit power of Table III, LPDDR5/HBM2e energy, PCIe at 3 W per lane, SSD power):
- DPE and VPE: their Table III power while the MAC arrays work: the compute-bound share of every operation
  at the achieved utilization (a memory-bound phase leaves them waiting for data rather than switching);
- HCU and WTU: their power while busy; the KVMU while the link moves KV; the LXE's on-chip memory always;
- device memory: bits moved x pJ/bit; PCIe: 3 W x lanes while it transfers; the SSD: its active power while
  serving reads, idle power otherwise; host DDR4: pJ/bit;
- the rest of the board (controllers, DRAM background, regulators): ``Calibration.static_w`` of the
  platform for the whole step — a knob the paper does not give, fitted to its energy points.
GPUs (§VI-A: power measured with nvidia-smi / tegrastats): the measured power of Table I for the whole step.
Those tools report the GPU module, not the SSD or the PCIe link, and the paper's gains match that reading
(its energy gain / speedup ratio falls from 2.5 at 1K to 1.4 at 40K on the edge, as V-Rex's link and SSD
energy, which only its side counts, grow with the fetched volume).

Efficiency is the dense workload's operations (``StepReport.dense_flops``, the same for every method)
per joule, so a method that skips work is credited with the time and energy it saves.
"""

from __future__ import annotations

from lfmsift.hw.sim import DEFAULT_CALIBRATION, Calibration, StepReport
from lfmsift.hw.specs import get_platform


def step_energy(report: StepReport, calib: Calibration = DEFAULT_CALIBRATION) -> dict[str, float]:
    """Joules per component of one simulated step (keys sum to ``total``)."""
    s = report.scenario
    p = get_platform(s.platform)
    t = report.latency_s
    link_s = report.busy_s.get("link", 0.0) + report.busy_s.get("writeback", 0.0)
    out: dict[str, float] = {}
    if p.kind == "gpu":
        out["gpu_system"] = p.system_power_w * t
    else:
        read_s = report.busy_s.get("link", 0.0)
        out["pcie"] = p.link.watts_per_lane * p.link.lanes * link_s
        out["offload"] = p.offload.active_power_w * read_s + p.offload.idle_power_w * max(t - read_s, 0.0) \
            + report.link_bytes * 8 * p.offload.pj_per_bit * 1e-12
        core, cores = p.core, p.cores
        watts = {name: block.power_mw * 1e-3 * cores for name, block in core.blocks.items()}
        out["dpe"] = watts["dpe"] * report.compute_s
        out["vpe"] = watts["vpe"] * report.compute_s
        out["lxe_sram"] = watts["lxe_sram"] * t
        out["hcu"] = watts["hcu"] * report.busy_s.get("hcu", 0.0)
        out["wtu"] = watts["wtu"] * report.busy_s.get("wtu", 0.0)
        out["kvmu"] = watts["kvmu"] * read_s
        out["dram"] = report.dram_bytes * 8 * p.memory.pj_per_bit * 1e-12
        out["static"] = dict(calib.static_w).get(p.name, 0.0) * t
    out["total"] = sum(out.values())
    return out


def gops_per_watt(report: StepReport, calib: Calibration = DEFAULT_CALIBRATION) -> float:
    """Dense-workload operations per joule, in GOPS/W (= Gop/J)."""
    return report.dense_flops / step_energy(report, calib)["total"] / 1e9
