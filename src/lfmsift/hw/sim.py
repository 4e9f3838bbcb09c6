"""A discrete-event model (simpy) of one frame step or one decode step of a streaming video LLM.

Per layer the compute engine (V-Rex's LXE, or the GPU) runs QKV generation, then — for a method that
predicts — the prediction for the *next* layer (V-Rex: hash bits and Q x K_cluster^T on the LXE, clustering
on the HCU and the bucket walk on the WTU; a GPU runs every step as kernels), then waits for this layer's
fetched KV, then attention and O-projection + FFN. The link (PCIe to the SSD or host memory) serves the
fetches in order; a fetch for layer l + 1 is issued as soon as its selection is known, so it overlaps
layer l's attention and FFN (the paper's Figs. 5 and 17; all baselines prefetch the same way, §V-A).
FlexGen fetches layer l + 1 in full while layer l computes. Layer 0 has no previous layer to predict it:
its KV stays on the device and it attends densely (``Calibration.pin_first_layer``).

What the paper leaves open is in ``Calibration``: achieved fractions of peak compute and bandwidth,
the per-request cost of a fetch, the device-resident window, how ReSV's ratio changes with the cache
length, and the board's static power (see ``lfmsift.hw.energy``). Defaults are fitted to the paper's reported points
(``lfmsift.hw.fit``; the fit and its residuals are in ``docs/hardware.md``).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import simpy

from lfmsift.hw.methods import Method, get_method
from lfmsift.hw.specs import Platform, get_platform
from lfmsift.hw.units import hcu_cycles, roofline_time, transfer_time, wtu_cycles
from lfmsift.hw.workload import LLAMA3_8B, SIGLIP_L_384, TOKENS_PER_FRAME, LLMShape, VisionShape, Work

Stage = Literal["frame", "text"]
HASH_BITS = 32              # N_hp (§VI-E)
INFINIGEN_PARTIAL = 0.2     # partial weight ratio of InfiniGen's released scripts (digest §5.4)


@dataclass(frozen=True)
class Calibration:
    """Knobs the paper does not give. Defaults: the fit to the paper's points (``lfmsift.hw.fit``)."""

    # Fitted (``lfmsift simulate --fit`` prints the fit; docs/hardware.md discusses each value):
    lxe_dram_efficiency: float = 0.828     # fraction of DRAM bandwidth the LXE achieves streaming weights
    lxe_utilization: float = 0.230         # fraction of peak FLOPs on compute-bound work (the vision encoder)
    lxe_layer_overhead_s: float = 175e-6   # per layer and step: synchronising the cores, filling the pipeline
    gpu_dram_efficiency: float = 0.464
    gpu_utilization: float = 0.0748        # absorbs all of a GPU frame step beyond weights, KV and fetch
    gpu_launch_s: float = 59.7e-6          # per kernel (framework and launch overhead)
    gpu_sort_rate: float = 74.5e6          # elements/s of a GPU's top-k / sort / scan over scores
    ssd_link_efficiency: float = 0.844     # achieved fraction of min(link, SSD) bandwidth, contiguous reads
    host_link_efficiency: float = 0.593    # the same for host memory behind PCIe
    ssd_request_s: float = 40.8e-9         # per read request beyond its bytes
    host_request_s: float = 119e-9
    resident_window: int = 6003            # recent tokens per stream kept in device memory (§V-C "capacity")
    # ReSV's ratios (Table II, measured on short COIN clips) times this scale at each cache length of the
    # latency sweep, interpolated log-linearly (the paper calibrates every method's ratio per point, §V-A).
    # 1K and 5K lie inside the resident window, where the scale changes nothing that is fetched.
    resv_ratio_scale: tuple[tuple[int, float], ...] = ((1024, 1.0), (5120, 1.0), (10240, 3.0), (20480, 0.890),
                                                       (40960, 0.432))
    # board power besides the units, DRAM accesses, link and SSD (controllers, DRAM background), per platform
    static_w: tuple[tuple[str, float], ...] = (("vrex48", 11.87), ("vrex8", 9.884))
    # From the paper or fixed by choice:
    gpu_kernels_per_layer: int = 12        # dense decoder layer (norms, QKV, RoPE, attention, O, FFN, adds)
    tokens_per_cluster: float = 32.0     # §VI-B: 32 tokens per cluster on average
    wtu_buckets: int = 20                # Fig. 11's example
    wtu_buckets_visited: float = 3.2     # §V-B: ~16% of a row is processed before the exit (0.16 x 20)
    pin_first_layer: bool = True

    def link_efficiency(self, platform: Platform) -> float:
        return self.ssd_link_efficiency if platform.offload.kind == "ssd" else self.host_link_efficiency

    def request_s(self, platform: Platform) -> float:
        return self.ssd_request_s if platform.offload.kind == "ssd" else self.host_request_s


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class Scenario:
    """One step to simulate: a platform, a method, the cache length per stream, batch and stage."""

    platform: str
    method: str = "resv"
    cache: int = 1024
    batch: int = 1
    stage: Stage = "frame"
    kvmu: bool = True            # V-Rex's cluster-contiguous KV mapping (off: V-Rex8-KVPU of Fig. 16)
    frame_ratio: float | None = None   # override the method's ratios (e.g. from a trace)
    text_ratio: float | None = None
    model: LLMShape = LLAMA3_8B
    vision: VisionShape | None = SIGLIP_L_384
    tokens_per_frame: int = TOKENS_PER_FRAME

    def __post_init__(self) -> None:
        if self.stage not in ("frame", "text"):
            raise ValueError(f"stage must be 'frame' or 'text', got {self.stage!r}")
        if self.cache < 0 or self.batch < 1 or self.tokens_per_frame < 1:
            raise ValueError("cache must be >= 0, batch and tokens_per_frame >= 1")
        platform, method = get_platform(self.platform), get_method(self.method)
        if platform.kind == "vrex" and method.name not in ("resv", "flexgen"):
            raise ValueError(f"{platform.name} runs ReSV (or a full fetch); {method.name} runs on the GPUs")
        for r in (self.frame_ratio, self.text_ratio):
            if r is not None and not 0.0 < r <= 1.0:
                raise ValueError(f"retrieval ratios must be in (0, 1], got {r}")
            if r is not None and method.predictor == "none":
                raise ValueError(f"{method.name} fetches everything; a retrieval ratio needs a selecting method")

    @property
    def rows(self) -> int:
        """Query rows of the step over all streams."""
        return self.batch * (self.tokens_per_frame if self.stage == "frame" else 1)


@dataclass
class StepReport:
    """Latency of one step and what it used: busy seconds per unit, bytes per memory, FLOPs."""

    scenario: Scenario
    latency_s: float
    busy_s: dict[str, float]
    dram_bytes: float
    link_bytes: float
    link_requests: float
    flops: float
    compute_s: float              # seconds the MAC arrays are working (compute-bound parts of operations)
    dense_flops: float
    ratio: float                  # fraction of the cache attended in layers >= 1
    fetched_tokens: float         # per stream and layer >= 1
    device_bytes: float
    fits: bool
    layers: list[dict] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return 1.0 / self.latency_s

    @property
    def predict_s(self) -> float:
        """Time the compute engine spent on KV prediction."""
        return self.busy_s.get("predict", 0.0)


# ------------------------------------------------------------------------------------------------------
def ratio_scale(calib: Calibration, cache: int) -> float:
    """``Calibration.resv_ratio_scale`` at ``cache``: log-linear between its points, constant beyond them."""
    points = sorted(calib.resv_ratio_scale)
    if cache <= points[0][0]:
        return points[0][1]
    for (c0, s0), (c1, s1) in itertools.pairwise(points):
        if cache <= c1:
            t = math.log(cache / c0) / math.log(c1 / c0)
            return math.exp((1 - t) * math.log(s0) + t * math.log(s1))
    return points[-1][1]


def method_ratio(method: Method, stage: Stage, cache: int, calib: Calibration) -> float | None:
    """The fraction of the cache a method attends to at this cache length (None: no selection). Fixed top-k
    methods keep their Table II ratio; ReSV's adaptive ratio follows the cache (``resv_ratio_scale``)."""
    r = method.ratio(stage)
    if r is None or not method.adaptive:
        return r
    return min(1.0, r * ratio_scale(calib, cache))


@dataclass
class _Layer:
    qkv: float = 0.0
    predict: float = 0.0          # on the compute engine, for the next layer
    hcu: float = 0.0
    wtu: float = 0.0
    fetch: float = 0.0            # over the link, this layer's KV
    attention: float = 0.0
    ffn: float = 0.0
    writeback: float = 0.0        # this frame's new KV to the offload target


class _Plan:
    """Per-layer durations and counts of one scenario (pure arithmetic, no events)."""

    def __init__(self, s: Scenario, calib: Calibration) -> None:
        self.s, self.calib = s, calib
        self.platform = p = get_platform(s.platform)
        self.method = m = get_method(s.method)
        self.gpu = p.kind == "gpu"
        override = s.frame_ratio if s.stage == "frame" else s.text_ratio
        # a measured ratio (a trace) is taken as it is; otherwise the method's, at this cache length
        self.ratio = override if override is not None else method_ratio(m, s.stage, s.cache, calib)
        self.peak = p.peak_flops
        self.util = calib.gpu_utilization if self.gpu else calib.lxe_utilization
        self.eff = calib.gpu_dram_efficiency if self.gpu else calib.lxe_dram_efficiency
        self.link_bw = min(p.link.bandwidth, p.offload.read_bandwidth) * calib.link_efficiency(p)
        self.request_s = calib.request_s(p)
        self.run = m.run if not (m.run == "cluster" and (self.gpu or not s.kvmu)) else "token"
        if self.ratio is None:  # no selection in this stage: the offloaded part streams whole
            self.run = "layer"
        self.predicts = m.predicts(s.stage) or override is not None
        window = calib.resident_window if m.windowed else 0
        self.offloaded = max(s.cache - window, 0)
        self.resident = s.cache - self.offloaded
        self.dram_bytes = 0.0
        self.flops = 0.0
        self.compute_s = 0.0          # time the MAC arrays work (at the achieved utilization)
        self.link_bytes = 0.0
        self.link_requests = 0.0
        self.fetched = (self.ratio if self.ratio is not None else 1.0) * self.offloaded
        self.attended = (self.ratio if self.ratio is not None else 1.0) * s.cache

    def op(self, work: Work) -> float:
        self.dram_bytes += work.bytes
        self.flops += work.flops
        t = roofline_time(work, self.peak, self.util, self.platform.memory.bandwidth, self.eff)
        self.compute_s += min(t, work.flops / (self.peak * self.util))
        return t + (self.calib.gpu_launch_s if self.gpu else 0.0)

    def kernels(self, count: int) -> float:
        return count * self.calib.gpu_launch_s if self.gpu else 0.0

    def fetch(self, tokens: float) -> float:
        s, mdl = self.s, self.s.model
        if tokens <= 0:
            return 0.0
        nbytes = s.batch * tokens * mdl.kv_bytes_per_token
        requests = s.batch * {
            "layer": 1.0,
            "frame": tokens / s.tokens_per_frame,
            "cluster": mdl.kv_heads * tokens / self.calib.tokens_per_cluster,
            "token": mdl.kv_heads * tokens,
        }[self.run]
        self.link_bytes += nbytes
        self.link_requests += requests
        self.dram_bytes += nbytes  # written into device memory
        return transfer_time(nbytes, requests, self.link_bw, self.request_s)

    def predictor(self) -> tuple[float, float, float]:
        """(compute-engine seconds, HCU seconds, WTU seconds) of one layer's prediction."""
        s, m, mdl, c = self.s, self.method, self.s.model, self.calib
        rows, cache = s.rows, s.cache
        frame = s.stage == "frame"
        if m.predictor == "resv":
            clusters = max(1.0, cache / c.tokens_per_cluster)
            score = Work(2 * rows * mdl.q_dim * clusters, s.batch * clusters * mdl.kv_dim * mdl.value_bytes)
            hashing = Work(2 * rows * mdl.kv_dim * HASH_BITS, 0.0) if frame else Work()
            score_rows = rows * mdl.heads
            if self.gpu:  # every step as kernels: sequential leader clustering, a sort per row, a gather
                launches = (1 + 3 * s.tokens_per_frame if frame else 0) + 1 + 4 + 2
                sort = (score_rows * clusters + s.batch * cache) / c.gpu_sort_rate
                return self.op(hashing + score) + self.kernels(launches) + sort, 0.0, 0.0
            core, cores = self.platform.core, self.platform.cores
            hz = core.clock_hz
            open_clusters = math.ceil(min(cache, c.resident_window) / c.tokens_per_cluster)
            hcu = s.batch * hcu_cycles(s.tokens_per_frame, open_clusters, core) / cores / hz if frame else 0.0
            wtu = score_rows * wtu_cycles(math.ceil(clusters), c.wtu_buckets_visited, core) / cores / hz
            return self.op(hashing + score), hcu, wtu
        if m.predictor == "infinigen":
            part = INFINIGEN_PARTIAL
            qpart = Work(2 * rows * mdl.hidden * part * mdl.q_dim, mdl.hidden * part * mdl.q_dim * mdl.value_bytes)
            scores = Work(2 * rows * mdl.q_dim * part * cache, s.batch * cache * part * mdl.kv_dim * mdl.value_bytes)
            sort = rows * mdl.heads * cache / c.gpu_sort_rate
            return self.op(qpart + scores) + self.kernels(5) + sort, 0.0, 0.0
        if m.predictor == "rekv":
            blocks = cache / s.tokens_per_frame
            scores = Work(2 * s.batch * mdl.q_dim * blocks, s.batch * blocks * mdl.q_dim * mdl.value_bytes)
            return self.op(scores) + self.kernels(3) + s.batch * blocks / c.gpu_sort_rate, 0.0, 0.0
        raise AssertionError(m.predictor)

    def layers(self) -> list[_Layer]:
        s, mdl, c = self.s, self.s.model, self.calib
        rows, new = s.rows, (s.tokens_per_frame if s.stage == "frame" else 1)
        out = []
        for layer in range(mdl.layers):
            first = layer == 0 and c.pin_first_layer
            lay = _Layer()
            lay.qkv = self.op(mdl.qkv(rows)) + (self.kernels(c.gpu_kernels_per_layer - 3) if self.gpu
                                                else c.lxe_layer_overhead_s)
            if self.predicts and layer + 1 < mdl.layers:
                lay.predict, lay.hcu, lay.wtu = self.predictor()
            attended = (s.cache if first else self.attended) + new
            lay.fetch = 0.0 if first else self.fetch(self.fetched)
            lay.attention = self.op(mdl.attention(rows, attended, s.batch))
            lay.ffn = self.op(mdl.out_and_ffn(rows))
            if self.offloaded > 0 and not first:
                nbytes = rows * mdl.kv_bytes_per_token
                lay.writeback = nbytes / (self.platform.link.bandwidth * c.link_efficiency(self.platform))
            out.append(lay)
        return out

    def device_bytes(self) -> float:
        s, mdl, c = self.s, self.s.model, self.calib
        weights = mdl.total_params * mdl.value_bytes + (s.vision.params * s.vision.value_bytes if s.vision else 0)
        per_layer = mdl.kv_bytes_per_token
        resident = self.resident * per_layer * (mdl.layers - 1)
        pinned = s.cache * per_layer if c.pin_first_layer else 0
        staging = 2 * self.fetched * per_layer  # double-buffered fetch of one layer
        index = (s.cache / c.tokens_per_cluster) * (mdl.kv_dim * mdl.value_bytes + 8) * mdl.layers \
            if self.method.predictor == "resv" else 0
        return weights + s.batch * (resident + pinned + staging + index)


def simulate(scenario: Scenario, calib: Calibration = DEFAULT_CALIBRATION) -> StepReport:
    """Run one step through the event model and report its latency and resource use."""
    plan = _Plan(scenario, calib)
    s, mdl = scenario, scenario.model
    layers = plan.layers()
    vision = plan.op(s.vision.frames(s.batch)) if (s.stage == "frame" and s.vision) else 0.0
    head = plan.op(mdl.lm_head(s.batch))

    env = simpy.Environment()
    compute, hcu, wtu = simpy.Resource(env), simpy.Resource(env), simpy.Resource(env)
    link, link_out = simpy.Resource(env), simpy.Resource(env)
    ready = [env.event() for _ in layers]
    busy: dict[str, float] = defaultdict(float)

    def use(resource, name: str, seconds: float):
        if seconds <= 0:
            return
        with resource.request() as req:
            yield req
            yield env.timeout(seconds)
            busy[name] += seconds

    def fetch(layer: int, after=None):
        if after is not None:
            yield after
        yield from use(link, "link", layers[layer].fetch)
        ready[layer].succeed()

    def select_then_fetch(layer: int):
        yield from use(wtu, "wtu", layers[layer - 1].wtu)
        yield from fetch(layer)

    def step():
        yield from use(compute, "vision", vision)
        if layers[0].fetch > 0:
            yield from fetch(0)
        else:
            ready[0].succeed()
        for i, lay in enumerate(layers):
            yield from use(compute, "qkv", lay.qkv)
            env.process(use(hcu, "hcu", lay.hcu))
            env.process(use(link_out, "writeback", lay.writeback))
            if i + 1 < len(layers):
                if plan.predicts:
                    yield from use(compute, "predict", lay.predict)
                    env.process(select_then_fetch(i + 1))
                else:
                    env.process(fetch(i + 1))
            waited = env.now
            yield ready[i]
            busy["stall"] += env.now - waited
            yield from use(compute, "attention", lay.attention)
            yield from use(compute, "ffn", lay.ffn)
        yield from use(compute, "lm_head", head)

    env.process(step())
    env.run()
    device = plan.device_bytes()
    return StepReport(
        scenario=s, latency_s=env.now, busy_s=dict(busy), dram_bytes=plan.dram_bytes, link_bytes=plan.link_bytes,
        link_requests=plan.link_requests, flops=plan.flops, compute_s=plan.compute_s,
        dense_flops=mdl.dense_step_flops(s.rows, s.cache, s.batch) + (
            s.vision.frames(s.batch).flops if (s.stage == "frame" and s.vision) else 0.0),
        ratio=plan.ratio if plan.ratio is not None else 1.0, fetched_tokens=plan.fetched,
        device_bytes=device, fits=device <= get_platform(s.platform).memory.capacity,
        layers=[vars(lay) for lay in layers],
    )
