"""The platforms V-Rex is evaluated on, and its core, as the paper specifies them.

Every constant cites where it comes from: "Table I" / "Table III" / "§x" are the V-Rex paper (HPCA 2026,
arXiv 2512.12284; numbers as in ``../shared/papers/vrex_digest.md``), "[derived]" says how a constant
follows from others, "[assumed]" marks a value the paper does not give, with the reason for the choice.
What the paper leaves open and this simulator fits to its reported points lives in
``lfmsift.hw.sim.Calibration``, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

KB = 1000
KiB = 1024
GB = 1e9
MHZ = 1e6


@dataclass(frozen=True)
class Block:
    """One block of a V-Rex core: area and power from Table III."""

    area_mm2: float
    power_mw: float


@dataclass(frozen=True)
class CoreSpec:
    """One V-Rex core (§VI-A, Table III): the LXE (DPE + VPE, from the LPU) and the DRE (HCU, WTU, KVMU)."""

    dpe_trees: int = 64          # N_DPE-h MAC trees (Table III)
    dpe_width: int = 64          # N_DPE-w inputs per tree (Table III)
    vpe_units: int = 1           # N_VPE-h (Table III)
    vpe_width: int = 64          # N_VPE-w (Table III)
    hcu_accumulators: int = 1    # N_HCU-h parallel XOR accumulators (Table III)
    hcu_width: int = 16          # N_HCU-w inputs each (Table III)
    wtu_cores: int = 1           # N_WTU-h (Table III)
    wtu_width: int = 16          # N_WTU-w lanes each (Table III)
    clock_hz: float = 800 * MHZ  # 0.8 V, 800 MHz, 14 nm (§VI-A)
    process_nm: int = 14         # Synopsys Design Compiler, 14 nm (§VI-A)
    lxe_sram_bytes: int = 384 * KiB  # on-chip memory of the LXE (§VI-A)
    # DRE SRAM, Fig. 10 labels: current hash-bit 128 B + key-cache hash-bit 4 KB + score 8 KB + token count
    # 8 KB = 20.125 KB, the total §VI-A gives.
    dre_sram_bytes: int = 128 + 4 * KiB + 8 * KiB + 8 * KiB
    blocks: dict[str, Block] = field(default_factory=lambda: {
        "dpe": Block(1.37, 2311.39),        # Table III
        "vpe": Block(0.14, 122.06),         # Table III
        "lxe_sram": Block(0.34, 118.94),    # Table III, "LXE: on-chip memory"
        "hcu": Block(0.01, 2.99),           # Table III, "DRE: KVPU-HCU"
        "wtu": Block(0.02, 39.04),          # Table III, "DRE: KVPU-WTU"
        "kvmu": Block(0.01, 15.01),         # Table III, "DRE: KVMU"
    })
    # Table III totals; the per-block areas are rounded to 0.01 mm2, so shares use the table's percentages.
    area_mm2: float = 1.89
    power_mw: float = 2609.43
    area_share: dict[str, float] = field(default_factory=lambda: {
        "dpe": 0.7279, "vpe": 0.0718, "lxe_sram": 0.1798, "hcu": 0.0028, "wtu": 0.0123, "kvmu": 0.0053,
    })

    DRE_BLOCKS = ("hcu", "wtu", "kvmu")

    @property
    def peak_flops(self) -> float:
        """[derived] (64 x 64 DPE MACs + 64 VPE lanes) x 2 FLOP x 0.8 GHz = 6.656 TFLOPS; x 8 = 53.25 and
        x 48 = 319.5 match Table I's 53.3 / 319.5, so Table I counts the VPE lanes as MACs too."""
        return (self.dpe_trees * self.dpe_width + self.vpe_units * self.vpe_width) * 2 * self.clock_hz

    @property
    def dre_area_share(self) -> float:
        """DRE share of the core area (abstract: 2.0%)."""
        return sum(self.area_share[b] for b in self.DRE_BLOCKS)

    @property
    def dre_power_share(self) -> float:
        """DRE share of the core power from Table III's milliwatts (abstract: 2.2%; §VI-F's text says 2.4%)."""
        return sum(self.blocks[b].power_mw for b in self.DRE_BLOCKS) / self.power_mw


@dataclass(frozen=True)
class Memory:
    """Device memory (Table I) and its access energy."""

    kind: str
    bandwidth: float        # bytes/s
    capacity: float         # bytes
    bus_bits: int
    pj_per_bit: float       # [assumed] access energy, see the constants below


@dataclass(frozen=True)
class Link:
    """The device <-> offload link (Table I). PCIe energy: 3 W per lane at full load (§VI-A)."""

    name: str
    bandwidth: float        # bytes/s, per direction
    lanes: int
    watts_per_lane: float = 3.0


@dataclass(frozen=True)
class OffloadTarget:
    """Where offloaded KV lives (Table I): an NVMe SSD (edge) or host DDR4 (server)."""

    kind: Literal["ssd", "host"]
    name: str
    read_bandwidth: float   # bytes/s of the target itself (the link usually binds first)
    active_power_w: float   # while serving reads
    idle_power_w: float
    pj_per_bit: float = 0.0  # host DRAM access energy (the SSD's is in its active power)


# [assumed] DRAM access energies. The paper takes LPDDR5 energy from Kim (Hot Chips 2016) and Lee et al.
# (IISWC 2017) without quoting a number; these are common published figures: LPDDR5 ~4 pJ/bit, HBM2/2e
# ~3.9 pJ/bit (O'Connor et al., MICRO 2017), DDR4 ~15 pJ/bit (incl. I/O, a host DIMM).
LPDDR5_PJ_PER_BIT = 4.0
HBM2E_PJ_PER_BIT = 3.9
DDR4_PJ_PER_BIT = 15.0

LPDDR5 = Memory("LPDDR5", 204.8 * GB, 32 * GB, 256, LPDDR5_PJ_PER_BIT)        # Table I (AGX Orin, V-Rex8)
HBM2E = Memory("HBM2e", 1935 * GB, 80 * GB, 5120, HBM2E_PJ_PER_BIT)           # Table I (A100, V-Rex48)
PCIE3_X4 = Link("PCIe 3.0 x4", 4 * GB, 4)                                    # Table I (edge)
PCIE4_X16 = Link("PCIe 4.0 x16", 32 * GB, 16)                                # Table I (server)
# Kioxia BG6 (§VI-A names it for SSD power): 6 GB/s sequential read (vendor datasheet). [assumed] power:
# ~4.5 W active read and ~0.05 W idle, typical of M.2 client NVMe drives (the paper gives no number).
KIOXIA_BG6 = OffloadTarget("ssd", "M.2 NVMe SSD (Kioxia BG6)", 6 * GB, 4.5, 0.05)
# Host DDR4 behind PCIe 4.0 x16 (Table I); its bandwidth far exceeds the link. [assumed] ~3 W active.
HOST_DDR4 = OffloadTarget("host", "CPU DDR4", 100 * GB, 3.0, 0.5, DDR4_PJ_PER_BIT)


@dataclass(frozen=True)
class Platform:
    """One system of Table I."""

    name: str
    kind: Literal["vrex", "gpu"]
    peak_flops: float        # BF16 (V-Rex, A100) / FP16 (AGX Orin), Table I
    memory: Memory
    link: Link
    offload: OffloadTarget
    system_power_w: float    # Table I; for GPUs nvidia-smi / tegrastats measurements (§VI-A)
    area_mm2: float          # §VI-A / Table I
    cores: int = 0
    core: CoreSpec | None = None
    description: str = ""

    @property
    def peak_tflops(self) -> float:
        return self.peak_flops / 1e12


CORE = CoreSpec()

PLATFORMS: dict[str, Platform] = {
    "agx_orin": Platform("agx_orin", "gpu", 54e12, LPDDR5, PCIE3_X4, KIOXIA_BG6, 40.0, 200.0,
                         description="NVIDIA Jetson AGX Orin (edge GPU baseline)"),
    "vrex8": Platform("vrex8", "vrex", 8 * CORE.peak_flops, LPDDR5, PCIE3_X4, KIOXIA_BG6, 35.0, 15.12,
                      cores=8, core=CORE, description="V-Rex8: 8 cores, edge"),
    "a100": Platform("a100", "gpu", 312e12, HBM2E, PCIE4_X16, HOST_DDR4, 300.0, 826.0,
                     description="NVIDIA A100 80GB (server GPU baseline)"),
    "vrex48": Platform("vrex48", "vrex", 48 * CORE.peak_flops, HBM2E, PCIE4_X16, HOST_DDR4, 203.68, 90.57,
                       cores=48, core=CORE, description="V-Rex48: 48 cores, server"),
}
# The GPU each V-Rex system is compared with (§VI-A: identical memory, link and offload target).
BASELINE_GPU = {"vrex8": "agx_orin", "vrex48": "a100"}


def get_platform(name: str) -> Platform:
    """A platform of Table I by name; an unknown name lists the known ones."""
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; known: {', '.join(PLATFORMS)}")
    return PLATFORMS[key]
