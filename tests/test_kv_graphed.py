"""Prepared (graph-capturable) streaming steps against the device path's own per-chunk steps.

Oracle: ``DeviceStreamingCache`` driven by ``begin`` / forward / ``end`` (itself checked against the
reference cache in ``test_kv_device.py``). A prepared step pads the past to a bucket and reads its per-chunk
values from device scalars; it must give the same logits, the same selections (hence ratios) and the same
stored tokens. On CUDA the same stream also runs replayed from CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from lfmsift.kv import TierBudget, get_retriever
from lfmsift.kv.cache import install, uninstall
from lfmsift.kv.device_cache import DeviceStreamingCache
from lfmsift.kv.graphed import GraphedStream
from lfmsift.models.adapters import cache_argument, describe
from lfmsift.models.tiny import tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CHUNKS = [(6, "text")] + [(8, "frame")] * 14 + [(5, "text"), (1, "text"), (1, "text"), (8, "frame"), (3, "text"),
                                               (1, "text")]
RETRIEVERS = [
    ("full", {}),
    ("resv", {}),
    ("resv", {"buckets": 20}),
    ("resv", {"buckets": 20, "selection": "previous_layer"}),
    ("resv_shifted", {"keep_first": 4, "keep_recent": 8}),
    ("resv", {"include_current": False, "buckets": 20}),
]


def _budget(model, tokens: int) -> TierBudget:
    cfg = model.config
    token_bytes = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    return TierBudget(device_bytes=tokens * token_bytes * cfg.num_hidden_layers)


def _run(model, ids, retriever, budget, stepped: bool, graphs: bool = False, bucket: int = 32):
    cache = DeviceStreamingCache(describe(model), retriever, budget)
    install(cache)
    logits, start = [], 0
    try:
        runner = GraphedStream(model, cache, bucket=bucket, graphs=graphs) if stepped else None
        with torch.no_grad():
            for n, kind in CHUNKS:
                chunk = ids[:, start : start + n]
                if runner is not None:
                    logits.append(runner(kind, input_ids=chunk).float().cpu())
                else:
                    cache.begin(kind, n)
                    logits.append(model(chunk, **cache_argument(model, cache)).logits[:, -1].float().cpu())
                    cache.end(n)
                start += n
        stored = [(s.tokens, s.groups[:, : s.tokens].cpu(), s.host[:, :, : s.split].cpu()) for s in cache.store.layers]
        return torch.cat(logits), cache.stats(), stored, runner
    finally:
        uninstall(cache)
        cache.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, options", RETRIEVERS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                           for n, o in RETRIEVERS])
def test_prepared_steps_give_the_per_chunk_path_exactly(device, name, options):
    """Logits, retrieval and fetched ratios, the stored K/V (host tier included) and the tokens' groups."""
    _check_prepared_steps(device, name, options)


def _assign_kernel_device() -> str | None:
    import os

    from lfmsift.kernels import cluster_assign

    if cluster_assign.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.skipif(_assign_kernel_device() is None,
                    reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1; numpy < 2)")
@pytest.mark.parametrize("options", [{"buckets": 20}, {"buckets": 20, "selection": "previous_layer"}],
                         ids=["same_layer", "previous_layer"])
def test_prepared_steps_with_the_assignment_kernel_give_the_per_chunk_path(monkeypatch, options):
    """The one-launch clustering reads the chunk's position from the device in a prepared step."""
    monkeypatch.setenv("LFMSIFT_ASSIGN_KERNEL", "1")
    _check_prepared_steps(_assign_kernel_device(), "resv", options)


def _check_prepared_steps(device, name, options):
    model = tiny_model("llama", seed=0, dtype=torch.float32).to(device)
    ids = torch.randint(0, 250, (1, sum(n for n, _ in CHUNKS)), generator=torch.Generator().manual_seed(1)).to(device)
    budget = _budget(model, 40)  # a device window of 40 tokens: most of the stream is read from the host tier
    want, want_stats, want_stored, _ = _run(model, ids, get_retriever(name, **options), budget, stepped=False)
    got, stats, stored, _ = _run(model, ids, get_retriever(name, **options), budget, stepped=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for stage in ("frame_stage", "text_stage"):
        for ratio in ("retrieval_ratio", "fetched_ratio"):
            assert stats[stage][ratio] == pytest.approx(want_stats[stage][ratio]), (stage, ratio)
    assert stats["store"]["moved_bytes"] == want_stats["store"]["moved_bytes"]
    assert stats["store"]["bytes"]["host"] > 0
    for (tokens, groups, host), (want_tokens, want_groups, want_host) in zip(stored, want_stored):
        assert tokens == want_tokens
        assert torch.equal((groups >= 0), (want_groups >= 0))  # frames and text at the same positions
        torch.testing.assert_close(host, want_host)
    if name.startswith("resv"):
        assert stats["index"]["clusters"] == want_stats["index"]["clusters"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, options", [("full", {}), ("resv", {"buckets": 20}),
                                           ("resv", {"buckets": 20, "selection": "previous_layer"})],
                         ids=["full", "resv", "resv-previous"])
def test_steps_replayed_from_cuda_graphs_give_the_eager_steps(name, options):
    model = tiny_model("llama", seed=0, dtype=torch.float32).to("cuda")
    ids = torch.randint(0, 250, (1, sum(n for n, _ in CHUNKS)), generator=torch.Generator().manual_seed(1)).cuda()
    budget = _budget(model, 40)
    want, want_stats, _, _ = _run(model, ids, get_retriever(name, **options), budget, stepped=False)
    got, stats, _, runner = _run(model, ids, get_retriever(name, **options), budget, stepped=True, graphs=True,
                                 bucket=128)  # the past crosses one bucket
    assert runner.counts["replayed"] >= 10 and runner.counts["captured"] >= 2  # most chunks came from graphs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for stage in ("frame_stage", "text_stage"):
        assert stats[stage]["retrieval_ratio"] == pytest.approx(want_stats[stage]["retrieval_ratio"])


def test_prepared_steps_refuse_what_they_cannot_capture_and_change_nothing():
    model = tiny_model("gemma3_text", seed=0, dtype=torch.float32)
    cache = DeviceStreamingCache(describe(model), get_retriever("resv"))
    with pytest.raises(ValueError, match="sliding-window"):
        cache.begin_step("frame", 8)
    assert cache.seen == 0 and cache._step is None
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    for name in ("streamingllm", "rekv"):
        cache = DeviceStreamingCache(describe(model), get_retriever(name))
        with pytest.raises(ValueError, match="graph-capturable"):
            cache.begin_step("frame", 8)
    cache = DeviceStreamingCache(describe(model), get_retriever("resv", center_keys=True))
    with pytest.raises(ValueError, match="center_keys"):
        cache.begin_step("frame", 8)
    cache = DeviceStreamingCache(describe(model), get_retriever("resv"))
    with pytest.raises(ValueError, match="kind"):
        cache.begin_step("audio", 8)
    with pytest.raises(ValueError, match="tokens >= 1"):
        cache.begin_step("frame", 0)
    assert cache.seen == 0 and cache._step is None
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStream(model, cache, graphs=True)
    runner = GraphedStream(model, cache, graphs=False)
    with pytest.raises(ValueError, match="exactly one"):
        runner("frame")
    with pytest.raises(ValueError, match="tokens >= 1"):
        runner("frame", input_ids=torch.zeros(1, 0, dtype=torch.int64))
    assert cache.seen == 0
