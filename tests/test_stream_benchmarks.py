"""The streaming benchmarks run end to end (on the CPU, at toy sizes) and report what they claim to.

``benchmarks/stream_gpu.py --tiny`` drives the same code as on a GPU (prefix built by a dense prefill and
``add_chunk``, lockstep batches, the paper-ratio index); its timings mean nothing here, its bytes and
ratios are checked against what each method must fetch.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_stream_gpu_benchmark_rows_carry_the_bytes_each_method_fetches(tmp_path):
    bench = _load("stream_gpu")
    out = tmp_path / "stream_gpu.json"
    assert bench.main(["--tiny", "--layers", "2", "--caches", "128,512", "--frames", "2", "--decode", "2",
                       "--window", "64", "--batches", "1,2", "--methods", "full,resv:same_layer",
                       "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {(r["method"], r["ratio_mode"], r["batch"], r["cache_tokens"]): r for r in record["rows"]}
    assert len(rows) == 2 * 2 * 2 + 2 * 2  # full (measured), resv (measured, paper); 2 batches, 2 lengths
    for key in ("frame_ms", "tpot_ms", "fetched_bytes_per_frame", "h2d_gbps", "pinned_gbps", "of_limit"):
        assert all(key in r for r in record["rows"])
    head_dim, kv_heads, layers = 32, 2, 2
    for batch in (1, 2):
        full = rows[("full", "measured", batch, 512)]
        assert full["frame_retrieval_ratio"] == 1.0
        # every offloaded position of every layer, KV head and stream, K and V in fp32 (2 frames of 11 tokens)
        offloaded = full["past_tokens_first_frame"] - 64 + 11 / 2
        assert full["past_tokens_first_frame"] > 512
        assert full["fetched_bytes_per_frame"] == offloaded * batch * kv_heads * layers * head_dim * 2 * 4
        paper = rows[("resv", "paper", batch, 512)]
        assert 0.32 <= paper["frame_retrieval_ratio"] <= 0.45
        assert 0 < paper["fetched_bytes_per_frame"] < full["fetched_bytes_per_frame"]


def test_stream_ops_counts_more_operations_for_resv_than_for_full_fetch(tmp_path):
    bench = _load("stream_ops")
    out = tmp_path / "ops.json"
    assert bench.main(["--frames", "8", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["sdpa (dense cache)"]["over_sdpa_per_layer"] == 0
    assert 0 < rows["full"]["over_sdpa_per_layer"] < rows["resv"]["over_sdpa_per_layer"]
    assert rows["resv"]["launch_ops_on_cpu"] > 0  # the CPU forms of the walk and the gather ran, uncounted


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))


def test_resv_sensitivity_reads_one_knob_at_a_time_with_wilson_intervals(tmp_path):
    bench = _load("resv_sensitivity")
    assert bench.wilson(0, 9)[1] == pytest.approx(1.96 ** 2 / (9 + 1.96 ** 2))  # hand: 0 successes
    lo, hi = bench.wilson(9, 9)
    assert hi == 1.0 and lo == pytest.approx(9 / (9 + 1.96 ** 2))

    def run(options, successes, retriever="resv"):
        trials = [{"success": i < successes} for i in range(4)]
        return {"task": "needle", "retriever": retriever, "options": options, "quality": {"trials": trials},
                "frame_fetched": 0.1, "text_fetched": 0.01, "frame_ratio": 0.2, "text_ratio": 0.02}

    runs = {"a": run({"ratio": 0.3}, 0), "b": run({"ratio": 0.3, "hash_bits": 64}, 2),
            "c": run({"ratio": 0.3, "hash_bits": 64, "keep_recent": 8}, 4),  # two knobs: on no axis
            "d": run({"ratio": 0.1, "score_mode": "shifted"}, 3), "e": run({}, 4, "full")}
    series = bench.series(runs, "needle", "hash_bits")
    assert [(r["value"], r["accuracy"]) for r in series] == [(32, 0.0), (64, 0.5)]
    assert [(r["value"], r["accuracy"]) for r in bench.series(runs, "needle", "ratio:shifted")] == [(0.1, 0.75)]
    assert bench.series(runs, "needle", "hamming_threshold")[0]["value"] == 7  # only the paper's rule
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps({"runs": runs, "commands": ["x"]}))
    out = tmp_path / "sens.json"
    assert bench.main(["--ablation", str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["full_accuracy"] == 1.0
