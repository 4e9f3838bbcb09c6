"""The V-Rex simulator: specs against the paper's tables, unit cycle counts on hand-computed cases, the event
model on a case checked by hand, and the fitted defaults against the paper's points."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lfmsift.hw import fit as hwfit
from lfmsift.hw.energy import gops_per_watt, step_energy
from lfmsift.hw.methods import get_method
from lfmsift.hw.report import compare, parse_caches, sensitivity
from lfmsift.hw.sim import DEFAULT_CALIBRATION, Scenario, ratio_scale, simulate
from lfmsift.hw.specs import CORE, PLATFORMS, get_platform
from lfmsift.hw.trace import load_trace, trace_from_stats
from lfmsift.hw.units import hcu_cycles, roofline_time, transfer_time, wtu_cycles, wtu_walk
from lfmsift.hw.workload import LLAMA3_8B, LLMShape, Work
from lfmsift.kv.wicsum import wicsum_bucketed

ROOT = Path(__file__).resolve().parents[1]


# -- specs (Tables I and III) ----------------------------------------------------------------------------
def test_core_peak_matches_table_one():
    assert CORE.peak_flops == pytest.approx(6.656e12)
    assert PLATFORMS["vrex8"].peak_flops / 1e12 == pytest.approx(53.3, rel=2e-3)
    assert PLATFORMS["vrex48"].peak_flops / 1e12 == pytest.approx(319.5, rel=2e-3)


def test_dre_share_and_sram_match_the_paper():
    assert CORE.dre_area_share == pytest.approx(0.0204, abs=1e-4)   # abstract: 2.0%
    assert CORE.dre_power_share == pytest.approx(0.0219, abs=1e-4)  # abstract: 2.2%
    assert CORE.dre_sram_bytes == 20.125 * 1024
    assert sum(b.power_mw for b in CORE.blocks.values()) == pytest.approx(CORE.power_mw, abs=0.01)
    assert sum(b.area_mm2 for b in CORE.blocks.values()) == pytest.approx(CORE.area_mm2, abs=1e-9)


def test_llama3_8b_shape():
    assert LLAMA3_8B.total_params == pytest.approx(8.03e9, rel=2e-3)
    assert LLAMA3_8B.kv_bytes_per_token * LLAMA3_8B.layers == 128 * 1024  # digest §1.3: 128 KiB per token


def test_unknown_platform_and_method_are_named():
    with pytest.raises(ValueError, match="vrex8"):
        get_platform("tpu")
    with pytest.raises(ValueError, match="resv"):
        get_method("h2o")
    with pytest.raises(ValueError, match="runs on the GPUs"):
        Scenario("vrex8", "rekv")


# -- units on hand-computed cases ------------------------------------------------------------------------
def test_hcu_pass_cycles():
    # 11 new tokens against 40 open clusters, 16 comparisons per cycle: 11 x ceil(40 / 16) = 33
    assert hcu_cycles(11, 40, CORE) == 33
    assert hcu_cycles(11, 0, CORE) == 11  # a pass still takes a cycle per token


def test_wtu_walk_exits_at_the_known_bucket():
    # 20 buckets of width 2 over scores 0..40: 40, 39 -> bucket 0; 30, 29 -> bucket 5; 10 -> 15; 0 -> 19.
    scores = torch.tensor([40.0, 39.0, 30.0, 29.0, 10.0, 0.0])
    counts = torch.tensor([5, 5, 10, 2, 14, 7])
    # weighted: 200 195 300 58 140 0 = 893; threshold 0.5 x 893 = 446.5; bucket 0 holds 395, bucket 5
    # brings it to 753 > 446.5, so the walk visits buckets 0..5: six buckets.
    assert wtu_walk(scores, counts, 0.5, 20) == 6
    mask, _ = wicsum_bucketed(scores, counts, 0.5, 20)  # the same rule in lfmsift.kv selects those 4
    assert mask.tolist() == [True, True, True, True, False, False]
    assert wtu_cycles(6, 6, CORE) == 7                  # ceil(6 / 16) x (1 preprocess + 6 buckets)
    assert wtu_cycles(1280, 3.2, CORE) == pytest.approx(80 * 4.2)


def test_wtu_walk_of_the_paper_figure_eleven():
    # Fig. 11: scores 0..40, weighted sum 1000, threshold 800, the walk exits when the sum reaches 802.
    scores = torch.tensor([40.0, 36.0, 31.0, 25.0, 22.0, 0.0])
    counts = torch.tensor([5, 5, 12, 2, 9, 3])        # 200 + 180 + 372 + 50 + 198 + 0 = 1000 (weighted)
    # cumulative by bucket: 200 (b0), 380 (b2), 752 (b4), 802 (b7) > 800 -> exits at bucket 7: 8 visited
    assert wtu_walk(scores, counts, 0.8, 20) == 8
    assert wtu_walk(scores, counts, 0.1, 20) == 1


def test_pcie_transfer_of_a_known_run():
    mib = 1024 * 1024
    assert transfer_time(mib, 1, 4e9, 1e-6) == pytest.approx(mib / 4e9 + 1e-6)
    assert transfer_time(mib, 256, 4e9, 1e-6) == pytest.approx(mib / 4e9 + 256e-6)  # 4 KiB scatter
    assert transfer_time(0, 0, 4e9, 1e-6) == 0.0


def test_roofline_time():
    work = Work(flops=1e12, bytes=1e9)
    assert roofline_time(work, 1e13, 1.0, 1e11, 1.0) == pytest.approx(0.1)   # compute-bound
    assert roofline_time(work, 1e14, 1.0, 1e10, 0.5) == pytest.approx(0.2)   # memory-bound at half bw
    with pytest.raises(ValueError):
        roofline_time(work, 1e14, 0.0, 1e10, 0.5)


# -- the event model on a case checked by hand -------------------------------------------------------------
TINY = LLMShape("tiny", layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32, ffn=128, vocab=256)
PLAIN = replace(DEFAULT_CALIBRATION, lxe_dram_efficiency=1.0, lxe_layer_overhead_s=0.0, ssd_link_efficiency=1.0,
                ssd_request_s=0.0)


@pytest.mark.parametrize("cache", [100_000, 10])
def test_end_to_end_decode_step_by_hand(cache):
    """FlexGen decode step on V-Rex8, 2 layers: layer 0 pinned (dense, no fetch); layer 1's full fetch is
    issued after layer 0's QKV and overlaps layer 0's attention + FFN and layer 1's QKV."""
    report = simulate(Scenario("vrex8", "flexgen", cache, 1, "text", model=TINY, vision=None), PLAIN)
    bw = 204.8e9
    kv = 2 * 32 * 2                                          # K + V of one token, one KV head, bf16
    q = (64 * (64 + 2 * 32) * 2 + kv) / bw                   # QKV weights + the new token's KV
    attn = (cache + 1) * kv / bw                             # dense over the cache + the new token
    ffn = (64 * 64 + 3 * 64 * 128) * 2 / bw                  # O projection + gate/up/down
    head = 64 * 256 * 2 / bw
    fetch = cache * kv / 4e9                                 # one run over PCIe 3.0 x4
    expected = max(2 * q + attn + ffn, q + fetch) + attn + ffn + head
    assert report.latency_s == pytest.approx(expected, rel=1e-9)
    assert report.busy_s["link"] == pytest.approx(fetch)
    assert report.busy_s.get("stall", 0.0) == pytest.approx(max(0.0, q + fetch - (2 * q + attn + ffn)), abs=1e-12)


def test_kvmu_runs_beat_scatter_and_ratios_shrink_fetches():
    kvmu = simulate(Scenario("vrex8", "resv", 40960))
    scatter = simulate(Scenario("vrex8", "resv", 40960, kvmu=False))
    assert kvmu.link_bytes == pytest.approx(scatter.link_bytes)
    assert kvmu.link_requests * 32 == pytest.approx(scatter.link_requests)
    assert kvmu.latency_s < scatter.latency_s
    small = simulate(Scenario("vrex8", "resv", 40960, frame_ratio=0.05))
    assert small.ratio == 0.05 and small.link_bytes < kvmu.link_bytes
    full = simulate(Scenario("vrex8", "flexgen", 40960))
    assert full.ratio == 1.0 and full.fetched_tokens == 40960
    assert full.latency_s > kvmu.latency_s
    with pytest.raises(ValueError):
        simulate(Scenario("vrex8", "resv", 40960, frame_ratio=1.5))
    with pytest.raises(ValueError, match="fetches everything"):
        Scenario("vrex8", "flexgen", 40960, frame_ratio=0.5)


def test_a_stage_without_selection_streams_whole_layers():
    # InfiniGen selects only while generating: its frame stage fetches the offloaded part as one run per layer
    frame = simulate(Scenario("agx_orin", "infinigen", 40960))
    assert frame.ratio == 1.0 and frame.link_requests == LLAMA3_8B.layers - 1
    text = simulate(Scenario("agx_orin", "infinigen", 40960, stage="text"))
    assert text.ratio == pytest.approx(0.068) and text.predict_s > 0
    assert text.link_requests == pytest.approx(31 * 8 * 0.068 * (40960 - DEFAULT_CALIBRATION.resident_window))


def test_batch_and_cache_grow_the_step():
    one = simulate(Scenario("vrex48", "resv", 20480))
    four = simulate(Scenario("vrex48", "resv", 20480, batch=4))
    assert one.latency_s < four.latency_s < 4 * one.latency_s  # weights are read once per step
    assert simulate(Scenario("a100", "flexgen", 40960)).latency_s > simulate(Scenario("a100", "flexgen", 1024)).latency_s


def test_ratio_scale_interpolates():
    c = replace(DEFAULT_CALIBRATION, resv_ratio_scale=((1000, 1.0), (4000, 0.25)))
    assert ratio_scale(c, 500) == 1.0
    assert ratio_scale(c, 2000) == pytest.approx(0.5)
    assert ratio_scale(c, 9000) == 0.25


# -- energy ---------------------------------------------------------------------------------------------
def test_energy_components():
    r = simulate(Scenario("vrex8", "resv", 20480))
    e = step_energy(r)
    assert e["total"] == pytest.approx(sum(v for k, v in e.items() if k != "total"))
    assert e["pcie"] == pytest.approx(12.0 * (r.busy_s["link"] + r.busy_s["writeback"]))  # 4 lanes x 3 W
    assert e["dpe"] == pytest.approx(8 * 2.31139 * r.compute_s)
    g = simulate(Scenario("agx_orin", "flexgen", 20480))
    assert step_energy(g)["total"] == pytest.approx(40.0 * g.latency_s)
    assert gops_per_watt(r) > gops_per_watt(g)


# -- the fit ----------------------------------------------------------------------------------------------
def test_fitted_defaults_reproduce_the_batch_one_performance_points():
    rows = [r for r in hwfit.residuals() if r["group"] == "performance"]
    assert len(rows) >= 20
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) < 0.15, worst
    edge = {r["name"]: r["model"] for r in rows}
    assert edge["V-Rex8 frame latency 1K (ms)"] == pytest.approx(121, rel=0.06)
    assert edge["V-Rex8 frame latency 10K (ms)"] == pytest.approx(198, rel=0.02)


def test_fit_recovers_a_knob():
    points = [p for p in hwfit.PAPER_POINTS if p.name.startswith("V-Rex8 TPOT")]
    start = replace(DEFAULT_CALIBRATION, lxe_dram_efficiency=0.5)
    fitted = hwfit._fit_group(start, {"lxe_dram_efficiency": (0.3, 1.0)}, points)
    assert fitted.lxe_dram_efficiency == pytest.approx(DEFAULT_CALIBRATION.lxe_dram_efficiency, rel=0.05)
    assert hwfit.get_knob(hwfit.set_knobs(start, {"resv_ratio_scale@20480": 0.5}), "resv_ratio_scale@20480") == 0.5


# -- traces, sweeps, CLI -------------------------------------------------------------------------------------
def test_trace_from_a_real_stream_run():
    trace = load_trace(ROOT / "results" / "stream_vtest_smolvlm_resv.json")
    assert trace.retriever == "resv"
    assert 0 < trace.frame_ratio < 1 and 0 < trace.text_ratio < trace.frame_ratio
    assert trace.tokens_per_cluster and len(trace.layer_frame_ratios) == 30
    scenario = trace.scenario(Scenario("vrex8", "resv", 40960))
    assert simulate(scenario).ratio == pytest.approx(trace.frame_ratio)
    assert trace.calibration(DEFAULT_CALIBRATION).tokens_per_cluster == pytest.approx(trace.tokens_per_cluster)


def test_bad_traces_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_trace(bad)
    with pytest.raises(ValueError, match="no retrieval statistics"):
        trace_from_stats({"answers": []})


def test_parse_caches():
    assert parse_caches("1k, 5k,40k,2048") == [1024, 5120, 40960, 2048]
    for bad in ("", "abc", "-1k"):
        with pytest.raises(ValueError):
            parse_caches(bad)


def test_compare_and_sensitivity():
    rows = compare("vrex48", [1024, 40960], batch=2, stage="text")
    assert [r["cache"] for r in rows] == [1024, 40960]
    assert rows[0]["baseline"]["platform"] == "a100" and rows[1]["speedup"] > rows[0]["speedup"] > 1
    data = sensitivity(caches=[1024, 40960], ratios=[0.05, 0.5])
    fps = data["fps_by_ratio"]["vrex8"]
    assert fps[0] > fps[1]
    assert all(len(v) == 2 for v in data["fps_by_cache"].values())


def test_cli_simulate(tmp_path):
    from typer.testing import CliRunner

    from lfmsift.cli import app

    out = tmp_path / "sim.json"
    result = CliRunner().invoke(app, ["simulate", "--platform", "vrex8", "--cache", "1k,40k", "--stage", "both",
                                      "--json", str(out), "--plot", str(tmp_path / "sim.png")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["sweeps"]) == {"frame", "text"}
    assert math.isclose(data["sweeps"]["frame"][0]["cache"], 1024)
    assert (tmp_path / "sim_frame.png").exists() and (tmp_path / "sim_text.png").exists()
    bad = CliRunner().invoke(app, ["simulate", "--cache", "lots"])
    assert bad.exit_code == 2 and "cache length" in bad.output
