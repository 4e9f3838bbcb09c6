"""The streaming cache and session: full retrieval equals the plain model; budgets hold; clear errors."""

from __future__ import annotations

import pytest
import torch

from lfmsift.kv import ReSV, TierBudget, get_retriever
from lfmsift.kv.cache import new_cache, uninstall
from lfmsift.models.tiny import tiny_model


def _stream_logits(model, ids, retriever, budget, chunk=8):
    cache = new_cache(model, retriever, budget)
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                cache.begin("frame")
                outs.append(model(ids[:, start : start + chunk], past_key_values=cache).logits)
                cache.end(min(chunk, ids.shape[1] - start))
        return torch.cat(outs, 1), cache.stats()
    finally:
        uninstall(cache)
        cache.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "mistral"])
def test_full_retrieval_through_the_tiers_equals_the_plain_model(arch, tmp_path):
    model = tiny_model(arch, seed=0, dtype=torch.float32)
    ids = torch.randint(0, 250, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    budget = TierBudget(device_bytes=10_000, host_bytes=10_000, disk_dir=tmp_path)
    got, stats = _stream_logits(model, ids, get_retriever("full"), budget)
    assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()
    assert stats["frame_stage"]["retrieval_ratio"] in (None, 1.0)


def test_resv_selects_fewer_tokens_and_respects_budgets(tmp_path):
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    ids = torch.randint(0, 250, (1, 320), generator=torch.Generator().manual_seed(1))
    budget = TierBudget(device_bytes=20_000, host_bytes=40_000, disk_bytes=10**6, disk_dir=tmp_path)
    for selection in ("same_layer", "previous_layer"):
        _, stats = _stream_logits(model, ids, ReSV(selection=selection, buckets=20), budget, chunk=16)
        frame = stats["frame_stage"]
        assert 0 < frame["retrieval_ratio"] < 1
        layers = frame["layers"]
        if selection == "previous_layer":
            assert layers[0]["per_kv_head"] == [1.0] * len(layers[0]["per_kv_head"])  # layer 0 dense
        else:
            assert all(0 < layer["visited_fraction"] <= 1 for layer in layers.values())
        store = stats["store"]
        for tier in ("device", "host", "disk"):
            assert store["peak_bytes"][tier] <= store["budget_bytes"][tier]
        assert store["bytes"]["disk"] > 0 and store["moved_bytes"]["fetched_host"] > 0
        assert stats["index"]["clusters"] > 0 and 0 < stats["index"]["hc_table_vs_kv"] < 1


def test_streaming_rejects_batches_and_bare_modules():
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    cache = new_cache(model, get_retriever("full"))
    try:
        cache.begin("frame")
        with pytest.raises(ValueError, match="batch 1"):
            model(torch.zeros(2, 4, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError, match="chunk kind"):
            cache.begin("audio")
    finally:
        uninstall(cache)
        cache.close()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # attention restored after uninstall
    with pytest.raises(ValueError, match="known: .*resv"):
        get_retriever("nope")
    with pytest.raises(ValueError, match="selection"):
        ReSV(selection="next_layer")
    with pytest.raises(ValueError, match="ratio"):
        ReSV(ratio=1.5)
