"""The device-resident ReSV index (the GPU streaming path's) against the reference and brute force.

Oracles: ``HashClusterTable`` / ``ReSVIndex`` (the reference implementation of the same rules, run on the
same inputs), a pure-Python walk for the founders, and the bucket walk on the valid clusters alone for the
padded bucketed rule. Every test runs on the CPU; on a machine with CUDA it also runs there (Triton walk),
and one test checks that the frame path never reads the device back (CUDA's sync debug mode).
"""

from __future__ import annotations

import pytest
import torch

from lfmsift.kernels.cluster_walk import founders, founders_reference
from lfmsift.kv.clusters import HashClusterTable
from lfmsift.kv.device_clusters import DeviceClusterTable
from lfmsift.kv.resv import ReSV
from lfmsift.kv.wicsum import wicsum_bucket_walk, wicsum_bucketed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _python_founders(close: list[list[bool]], can_found: list[bool]) -> list[bool]:
    out: list[bool] = []
    for t, can in enumerate(can_found):
        out.append(can and not any(close[t][f] and out[f] for f in range(t)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_founders_walk_equals_the_python_walk(device):
    gen = torch.Generator().manual_seed(0)
    for tokens in (0, 1, 2, 7, 16, 17, 64, 100):
        close = (torch.rand(tokens, tokens, generator=gen) < 0.3).tril(-1)
        can = torch.rand(tokens, generator=gen) < 0.7
        want = _python_founders(close.tolist(), can.tolist())
        assert founders(close.to(device), can.to(device)).cpu().tolist() == want
        assert founders_reference(close, can).tolist() == want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [0, 2, 3, 5, 7, 40])
def test_device_table_clusters_as_the_reference(device, threshold):
    """Same ids, hashes, counts and means chunk after chunk, with clusters closed in between."""
    dev = DeviceClusterTable(2, 4, threshold, device)
    _cluster_like_the_reference(dev, threshold, torch.Generator().manual_seed(threshold), max_tokens=12, atol=1e-6)


def _cluster_like_the_reference(dev: DeviceClusterTable, threshold: int, gen: torch.Generator, max_tokens: int,
                                wide_hashes: bool = False, atol: float = 1e-5) -> None:
    """Stream random chunks into ``dev`` and into the reference ``HashClusterTable`` (closing half of the
    clusters every third chunk): the same ids chunk after chunk, then the same hashes, counts, means and open
    flags. ``wide_hashes``: 64-bit patterns, the sign bit included (else 9-bit hashes, which cluster)."""
    device = dev.device
    ref = HashClusterTable(2, 4, threshold)
    for chunk in range(10):
        tokens = int(torch.randint(0, max_tokens, (1,), generator=gen))
        hashes = torch.randint(-2**40, 2**40, (tokens,), generator=gen) if wide_hashes else \
            torch.randint(0, 1 << 9, (tokens,), generator=gen)
        keys = torch.randn(2, tokens, 4, generator=gen)
        assert dev.assign(keys.to(device), hashes.to(device)).cpu().tolist() == ref.assign(keys, hashes).tolist()
        if chunk % 3 == 2 and ref.size:
            closed = torch.randperm(ref.size, generator=gen)[: ref.size // 2]
            ref.close(closed)
            dev.close(closed)
    n = ref.size
    assert int(dev.size) == n and dev.bound >= n and dev.sync_bound() == n
    assert torch.equal(dev.hashes.cpu(), ref.hashes) and torch.equal(dev.counts.cpu(), ref.counts)
    torch.testing.assert_close(dev.representatives.cpu(), ref.representatives, rtol=1e-5, atol=atol)
    assert dev.is_open().cpu().tolist() == ref.is_open.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_window_closes_a_cluster_once_its_newest_member_leaves_the_recent_positions(device):
    """Oracle: the reference table with ``close`` called, by plain bookkeeping, on every cluster whose newest
    member is older than the window; text chunks advance the positions without clustering."""
    window = 12
    gen = torch.Generator().manual_seed(5)
    ref = HashClusterTable(1, 2, threshold=4)
    dev = DeviceClusterTable(1, 2, threshold=4, device=device, window=window)
    newest: dict[int, int] = {}
    position = 0
    for chunk in range(14):
        tokens = int(torch.randint(1, 6, (1,), generator=gen))
        if chunk % 4 == 3:  # a text chunk: positions move on, nothing is clustered
            dev.advance(tokens)
            position += tokens
            continue
        ref.close([c for c, last in newest.items() if last < position - window])
        hashes = torch.randint(0, 1 << 10, (tokens,), generator=gen)
        keys = torch.randn(1, tokens, 2, generator=gen)
        ids = ref.assign(keys, hashes).tolist()
        assert dev.assign(keys.to(device), hashes.to(device)).cpu().tolist() == ids
        for t, c in enumerate(ids):
            newest[c] = position + t
        position += tokens
    ref.close([c for c, last in newest.items() if last < position - window])
    got = dev.is_open().cpu()
    assert got[: ref.size].tolist() == ref.is_open.tolist() and not got[ref.size :].any()
    assert not all(ref.is_open.tolist()) and any(ref.is_open.tolist())


@pytest.mark.parametrize("seed", range(8))
def test_padded_bucketed_rule_equals_the_walk_on_the_valid_clusters(seed):
    gen = torch.Generator().manual_seed(seed)
    slots = 40
    valid = torch.rand(slots, generator=gen) < 0.5
    valid[3] = True
    scores = torch.randn(5, slots, generator=gen, dtype=torch.float64) + 0.2 - 0.6 * (seed % 2)
    counts = torch.randint(1, 9, (slots,), generator=gen)
    garbage = torch.where(valid, scores, torch.randn(5, slots, generator=gen, dtype=torch.float64) * 100)
    for ratio in (0.0, 0.3, 0.8):
        mask, seen = wicsum_bucketed(garbage, counts, ratio, 20, valid)
        want, want_seen = wicsum_bucket_walk(scores[:, valid], counts[valid], ratio, 20)
        assert not mask[:, ~valid].any()
        assert torch.equal(mask[:, valid], want)
        torch.testing.assert_close(seen, want_seen)


RESV_OPTIONS = [
    {},
    {"buckets": 20},
    {"nonpositive": "shifted", "buckets": 20},
    {"score_mode": "shifted"},
    {"score_mode": "softmax", "buckets": 20},
    {"center_keys": True, "hamming_threshold": 5},
    {"hamming_threshold": 0},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", RESV_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
def test_device_resv_selects_exactly_the_reference_clusters(device, options):
    """Chunks of correlated keys (a drifting mean, as video keys drift): same ids, selections, visited
    fractions and statistics as the reference index."""
    config = ReSV(hash_bits=16, **options)
    kv_heads, dim = 2, 16
    ref = config.index(3, kv_heads, dim, torch.device("cpu"))
    dev = config.device_index(3, kv_heads, dim, torch.device(device))
    gen = torch.Generator().manual_seed(7)
    drift = torch.randn(kv_heads, 1, dim, generator=gen)
    for chunk in range(12):
        drift = drift + 0.3 * torch.randn(kv_heads, 1, dim, generator=gen)
        keys = drift + 0.5 * torch.randn(kv_heads, 6, dim, generator=gen)
        queries = torch.randn(4, 3, dim, generator=gen) + 0.2 * drift.repeat_interleave(2, 0)
        assert dev.assign(keys.to(device)).cpu().tolist() == ref.assign(keys).tolist()
        stage = "frame" if chunk % 2 else "text"
        want = ref.select(queries, stage)
        got = dev.select(queries.to(device), stage).cpu()
        n = ref.table.size
        assert torch.equal(got[:, :n], want) and not got[:, n:].any()
        if config.buckets is not None:
            torch.testing.assert_close(dev.visited_fraction().cpu(), ref.visited_fraction())
    assert dev.stats(72) == ref.stats(72)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_bound_tightened_from_copies_in_flight_always_covers_the_table():
    """On CUDA the bound follows asynchronous copies of the size; reading the size in between (``sync_bound``)
    must not leave a stale copy that would lower the bound below the size."""
    table = DeviceClusterTable(1, 4, threshold=2, device="cuda")
    gen = torch.Generator().manual_seed(0)
    for chunk in range(40):
        tokens = 110 if chunk % 3 else 11
        hashes = torch.randint(0, 1 << 20, (tokens,), generator=gen).cuda()
        table.assign(torch.randn(1, tokens, 4, generator=gen).cuda(), hashes)
        torch.cuda.synchronize()  # the copies complete: the next assign tightens
        assert table.bound >= int(table.size)
        if chunk % 5 == 4:
            table.sync_bound()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_index_steps_never_read_the_device_back():
    """CUDA's sync debug mode raises on any synchronising call: assign and select run under it."""
    config = ReSV(buckets=20)
    index = config.device_index(0, 8, 128, torch.device("cuda"), window=64)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):  # warm up (allocations, Triton compilation)
        index.assign(torch.randn(8, 11, 128, device="cuda", generator=gen))
        index.select(torch.randn(32, 11, 128, device="cuda", generator=gen), "frame")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            index.assign(torch.randn(8, 11, 128, device="cuda", generator=gen))
            index.select(torch.randn(32, 11, 128, device="cuda", generator=gen), "frame")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert index.table.sync_bound() > 0


# -- the device store, gather and attention ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_on_device", [False, True], ids=["host-split", "device-split"])
def test_gather_positions_reads_old_positions_from_the_host_and_recent_ones_from_the_ring(device, split_on_device):
    """Oracle: element by element, the definition (host slot p below the split, ring slot p % W above).
    On CUDA the host tier is pinned and read in place, and the position rows are a slice of a wider table.
    The split may be a device scalar (steps captured in CUDA graphs)."""
    from lfmsift.kernels.kv_gather import gather_positions

    gen = torch.Generator().manual_seed(0)
    heads, dim, window, total = 3, 8, 16, 50
    host = torch.randn(2, heads, 64, dim, generator=gen)
    ring = torch.randn(2, heads, window, dim, generator=gen)
    split = total - window
    counts = torch.tensor([0, 7, 30])
    positions = torch.zeros(heads, 40, dtype=torch.int64)
    for h in range(heads):
        positions[h, : counts[h]] = torch.randperm(total, generator=gen)[: counts[h]].sort().values
    out = torch.full((2, heads, 45, dim), 9.0)
    if device == "cuda":
        wide = torch.zeros(heads, 57, dtype=torch.int64, device=device)
        wide[:, :40] = positions.to(device)
        got = torch.full_like(out, 9.0, device=device)
        at = torch.tensor([split], device=device) if split_on_device else split
        gather_positions(host.pin_memory(), ring.to(device), at, wide[:, :40], counts.to(device), got, out_offset=5)
        out = got.cpu()
    else:
        at = torch.tensor([split]) if split_on_device else split
        gather_positions(host, ring, at, positions, counts, out, out_offset=5)
    for h in range(heads):
        for i in range(int(counts[h])):
            p = int(positions[h, i])
            want = host[:, h, p] if p < split else ring[:, h, p % window]
            assert torch.equal(out[:, h, 5 + i], want)
        assert (out[:, h, : 5] == 9.0).all() and (out[:, h, 5 + int(counts[h]) :] == 9.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_over_the_gathered_buffer_equals_per_head_attention_on_the_selected_tokens(device):
    """Oracle: ``attend_reference`` (float64, head by head, on the selected tokens alone)."""
    from lfmsift.kv.attention import attend_gathered, attend_reference

    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, tokens, dim, start = 6, 2, 5, 16, 40
    length = 48
    buffer = torch.randn(2, kv_heads, length, dim, generator=gen)
    counts = torch.tensor([0, 23])
    keys, values = torch.randn(kv_heads, tokens, dim, generator=gen), torch.randn(kv_heads, tokens, dim, generator=gen)
    buffer[0, :, start : start + tokens], buffer[1, :, start : start + tokens] = keys, values
    query = torch.randn(heads, tokens, dim, generator=gen)
    got = attend_gathered(query.to(device), buffer.to(device), counts.to(device), start, 0.25)
    want = attend_reference(query, [buffer[0, h, : counts[h]] for h in range(kv_heads)],
                            [buffer[1, h, : counts[h]] for h in range(kv_heads)], keys, values, 0.25)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_ring_store_refuses_what_does_not_fit_and_changes_nothing():
    from lfmsift.kv.device_store import RingKVStore
    from lfmsift.kv.store import KVBudgetError, TierBudget

    token_bytes = 2 * 2 * 4 * 4  # K and V, 2 KV heads of 4 fp32 values
    store = RingKVStore(1, 2, 4, torch.float32, "cpu", TierBudget(device_bytes=8 * token_bytes,
                                                                  host_bytes=10 * token_bytes))
    with pytest.raises(KVBudgetError, match="device budget"):
        store.reserve(9)
    for _ in range(3):
        store.reserve(6)
        store[0].append(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.zeros(6, dtype=torch.int64))
    assert store[0].tokens == 18 and store[0].split == 10
    with pytest.raises(KVBudgetError, match="host budget"):
        store.reserve(1)
    assert store[0].tokens == 18 and store.stats()["bytes"] == {"device": 8 * token_bytes,
                                                                "host": 10 * token_bytes, "disk": 0}
    with pytest.raises(ValueError, match="no disk tier"):
        RingKVStore(1, 2, 4, torch.float32, "cpu", TierBudget(disk_bytes=100))


# -- the device cache against the reference cache ---------------------------------------------------------------

def _stream(model, ids, retriever, path, chunks, budget=None, device="cpu"):
    from lfmsift.kv.cache import new_cache, uninstall

    cache = new_cache(model, retriever, budget, path)
    cache.trace = []
    logits = []
    try:
        with torch.no_grad():
            start = 0
            for n, kind in chunks:
                cache.begin(kind, n)
                logits.append(model(ids[:, start : start + n].to(device), past_key_values=cache).logits.cpu())
                cache.end(n)
                start += n
        return torch.cat(logits, 1), [(layer, stage, keep.cpu()) for layer, stage, keep in cache.trace], cache.stats()
    finally:
        uninstall(cache)
        cache.close()


STREAM = [(6, "text")] + [(8, "frame")] * 18 + [(5, "text"), (1, "text"), (1, "text"), (8, "frame"), (3, "text")]
RETRIEVERS = [
    ("full", {}),
    ("resv", {}),
    ("resv", {"buckets": 20, "nonpositive": "shifted"}),
    ("resv", {"selection": "previous_layer", "buckets": 20}),
    ("resv", {"include_current": False, "keep_first": 4, "keep_recent": 16}),
    ("resv_shifted", {"center_keys": True}),
    ("streamingllm", {"window": 32}),
    ("rekv", {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("name, options", RETRIEVERS, ids=[f"{n}-{'-'.join(o)}" for n, o in RETRIEVERS])
def test_device_cache_selects_the_reference_tokens_and_gives_its_outputs(device, arch, name, options):
    """Same selection per layer, KV head and chunk as the reference cache (nothing offloaded, so clusters
    close on neither path), and the same logits."""
    from lfmsift.kv import get_retriever
    from lfmsift.models.tiny import tiny_model

    model = tiny_model(arch, seed=0, dtype=torch.float32)
    ids = torch.randint(0, 250, (1, sum(n for n, _ in STREAM)), generator=torch.Generator().manual_seed(0))
    want, want_trace, want_stats = _stream(model, ids, get_retriever(name, **options), "reference", STREAM)
    model = model.to(device)
    got, trace, stats = _stream(model, ids, get_retriever(name, **options), "device", STREAM, device=device)
    assert len(trace) == len(want_trace) > 0
    for (layer, stage, keep), (want_layer, want_stage, want_keep) in zip(trace, want_trace):
        assert (layer, stage) == (want_layer, want_stage)
        assert torch.equal(keep, want_keep), (layer, stage)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for stage in ("frame_stage", "text_stage"):
        assert stats[stage]["retrieval_ratio"] == pytest.approx(want_stats[stage]["retrieval_ratio"])
    assert stats["path"] == "device" and stats["host_reads_in_layers"] == (name == "rekv")


@pytest.mark.parametrize("device", DEVICES)
def test_full_fetch_through_the_ring_and_host_tier_equals_the_plain_model(device):
    from lfmsift.kv import TierBudget, get_retriever
    from lfmsift.models.tiny import tiny_model

    model = tiny_model("llama", seed=0, dtype=torch.float32).to(device)
    ids = torch.randint(0, 250, (1, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids.to(device)).logits.cpu()
    chunks = [(8, "frame")] * 12
    token_bytes = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
    budget = TierBudget(device_bytes=20 * token_bytes * model.config.num_hidden_layers)
    got, _, stats = _stream(model, ids, get_retriever("full"), "device", chunks, budget, device)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    assert stats["store"]["bytes"]["host"] > 0 and stats["frame_stage"]["fetched_ratio"] == 1.0
    assert stats["store"]["moved_bytes"]["fetched_host"] > 0


def test_chunks_added_without_attention_are_stored_and_clustered_but_not_counted_as_selections():
    """``add_chunk`` (a prefix computed elsewhere) then a streamed chunk: the same tokens and clusters as
    streaming the prefix, and the retrieval ratio counts only the chunk that attended."""
    from lfmsift.kv import get_retriever
    from lfmsift.kv.cache import new_cache, uninstall
    from lfmsift.models.tiny import tiny_model

    model = tiny_model("llama", seed=0, dtype=torch.float32)
    ids = torch.randint(0, 250, (1, 64), generator=torch.Generator().manual_seed(3))
    kv_heads = model.config.num_key_value_heads
    caches = []
    try:
        with torch.no_grad():
            streamed = new_cache(model, get_retriever("resv"), None, "device")
            caches.append(streamed)
            for start in range(0, 56, 8):
                if start == 48:
                    streamed.trace = []
                streamed.begin("frame", 8)
                model(ids[:, start : start + 8], past_key_values=streamed)
                streamed.end(8)
            uninstall(streamed)
            added = new_cache(model, get_retriever("resv"), None, "device")  # one cache installed at a time
            caches.append(added)
            for start in range(0, 48, 8):  # the same K/V, entered without attention
                added.add_chunk([s.ring[0, :, start : start + 8] for s in streamed.store.layers],
                                [s.ring[1, :, start : start + 8] for s in streamed.store.layers])
            added.trace = []
            added.begin("frame", 8)
            model(ids[:, 48:56], past_key_values=added)
            added.end(8)
        for a, b in zip(streamed.store.layers, added.store.layers):
            assert torch.equal(a.groups[:, :56], b.groups[:, :56]) and torch.allclose(a.ring[:, :, :56], b.ring[:, :, :56])
        assert len(added.trace) == len(streamed.trace) == model.config.num_hidden_layers
        for (_, _, keep_a), (_, _, keep_b) in zip(streamed.trace, added.trace):
            assert torch.equal(keep_a, keep_b)
        selected = sum(float(keep.sum()) for _, _, keep in added.trace)
        assert added.stats()["frame_stage"]["retrieval_ratio"] == pytest.approx(
            selected / (len(added.trace) * kv_heads * 48))
    finally:
        for cache in caches:
            uninstall(cache)
            cache.close()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("score_mode, nonpositive, buckets", [
    ("raw", "top", None), ("raw", "top", 20), ("raw", "shifted", None), ("raw", "shifted", 20),
    ("shifted", "top", 20), ("softmax", "top", None), ("softmax", "shifted", 7)])
def test_lean_padded_wicsum_equals_select_clusters_on_the_valid_slots(seed, score_mode, nonpositive, buckets):
    """Oracle: ``select_clusters`` with the means and the ``valid`` mask spelled out."""
    from lfmsift.kv.wicsum import select_clusters, select_clusters_padded

    gen = torch.Generator().manual_seed(seed)
    kv, clusters, dim = 2, 37, 8
    counts = torch.randint(1, 9, (clusters,), generator=gen) * (torch.rand(clusters, generator=gen) < 0.7)
    sums = torch.randn(kv, clusters, dim, generator=gen) * counts[None, :, None] + 0.4 * (seed % 2)
    sums = sums * (counts > 0)[None, :, None]
    queries = torch.randn(6, 3, dim, generator=gen) - 0.5 * (seed % 2)
    means = sums / counts.clamp(min=1)[None, :, None]
    report: dict = {}
    want, want_visited = select_clusters(queries, means, counts, 0.3, buckets, score_mode, nonpositive, report,
                                         counts > 0)
    got, visited, nonpositive_rows = select_clusters_padded(queries, sums, counts, 0.3, buckets, score_mode,
                                                            nonpositive)
    assert torch.equal(got, want)
    assert int(nonpositive_rows) == int(report["nonpositive"])
    if buckets is None:
        assert visited is None and want_visited is None
    else:
        torch.testing.assert_close(visited, want_visited)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, options", [("full", {}), ("resv", {"buckets": 20}),
                                           ("resv", {"selection": "previous_layer", "keep_recent": 8}),
                                           ("rekv", {})], ids=["full", "resv", "resv-previous", "rekv"])
def test_a_batch_of_streams_equals_each_stream_alone(device, name, options):
    """Three streams in one forward (lockstep chunks, a device window so the host tier is read) give each
    stream what it gets alone: the same logits, the same selection per layer and KV head, the same ratios."""
    from lfmsift.kv import TierBudget, get_retriever
    from lfmsift.kv.cache import install, uninstall
    from lfmsift.kv.device_cache import DeviceStreamingCache
    from lfmsift.models.adapters import describe
    from lfmsift.models.tiny import tiny_model

    model = tiny_model("llama", seed=0, dtype=torch.float32).to(device)
    cfg = model.config
    token_bytes = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    streams, kv = 3, cfg.num_key_value_heads
    ids = torch.randint(0, 250, (streams, 90), generator=torch.Generator().manual_seed(4)).to(device)
    chunks = [(5, "text")] + [(8, "frame")] * 9 + [(6, "text"), (1, "text")]

    def run(cache, rows):
        install(cache)
        cache.trace = []
        logits, start = [], 0
        try:
            with torch.no_grad():
                for n, kind in chunks:
                    cache.begin(kind, n)
                    logits.append(model(ids[rows, start : start + n], past_key_values=cache).logits.cpu())
                    cache.end(n)
                    start += n
            return torch.cat(logits, 1), cache.trace, cache.stats()
        finally:
            uninstall(cache)
            cache.close()

    def budget(b):
        return TierBudget(device_bytes=24 * token_bytes * b * cfg.num_hidden_layers)

    view = describe(model)
    together, trace, stats = run(DeviceStreamingCache(view, get_retriever(name, **options), budget(streams),
                                                      streams=streams), slice(None))
    ratios = []
    for b in range(streams):
        alone, alone_trace, alone_stats = run(DeviceStreamingCache(view, get_retriever(name, **options), budget(1)),
                                              slice(b, b + 1))
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-4, atol=1e-4)
        for (layer, stage, keep), (want_layer, want_stage, want) in zip(trace, alone_trace):
            assert (layer, stage) == (want_layer, want_stage)
            assert torch.equal(keep[b * kv : (b + 1) * kv].cpu(), want.cpu())
        ratios.append(alone_stats["frame_stage"]["retrieval_ratio"])
    assert stats["frame_stage"]["retrieval_ratio"] == pytest.approx(sum(ratios) / streams)
    assert stats["store"]["bytes"]["host"] > 0


def _triton_cuda() -> bool:
    from lfmsift.kernels import wicsum_rows

    return torch.cuda.is_available() and wicsum_rows.triton is not None


def _interpreted() -> bool:
    import os

    from lfmsift.kernels import wicsum_rows

    return wicsum_rows.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def _assign_kernel_device() -> str | None:
    from lfmsift.kernels import cluster_assign

    if cluster_assign.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if _interpreted() else None


@pytest.mark.skipif(not (_triton_cuda() or _interpreted()),
                    reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1; numpy < 2)")
@pytest.mark.parametrize("buckets, nonpositive", [(20, "top"), (20, "shifted"), (7, "top"), (1, "shifted")])
def test_wicsum_kernel_equals_the_pytorch_rule(buckets, nonpositive):
    """The one-launch bucketed WiCSum against ``select_clusters_padded``'s PyTorch form, on padded tables of
    many lengths, rows with weighted sums of both signs (on the GPU, or on the CPU under the interpreter)."""
    from lfmsift.kernels.wicsum_rows import wicsum_rows
    from lfmsift.kv.wicsum import select_clusters_padded

    where = "cuda" if _triton_cuda() else "cpu"

    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        kv, rows, dim = 2, 5, 16
        clusters = int(torch.randint(1, 3000, (1,), generator=gen))
        counts = torch.randint(1, 9, (clusters,), generator=gen) * (torch.rand(clusters, generator=gen) < 0.7)
        sums = (torch.randn(kv, clusters, dim, generator=gen) * counts[None, :, None] + 0.4 * (seed % 2))
        sums = sums * (counts > 0)[None, :, None]
        queries = torch.randn(6, rows, dim, generator=gen) - 0.5 * (seed % 3)
        want, want_visited, want_nonpositive = select_clusters_padded(queries, sums, counts, 0.3, buckets, "raw",
                                                                      nonpositive)
        means = (sums / counts.clamp(min=1)[None, :, None]).to(where)
        scores = queries.to(where).reshape(kv, 3 * rows, dim) @ means.transpose(1, 2)
        got, visited, nonpositive_rows = wicsum_rows(scores, counts.to(where), 0.3, buckets, nonpositive == "shifted")
        assert torch.equal(got.cpu(), want), seed
        torch.testing.assert_close(visited.cpu(), want_visited)
        assert int(nonpositive_rows) == int(want_nonpositive)


@pytest.mark.skipif(_assign_kernel_device() is None,
                    reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1; numpy < 2)")
def test_device_cache_with_the_wicsum_kernel_selects_the_reference_tokens(monkeypatch):
    monkeypatch.setenv("LFMSIFT_WICSUM_KERNEL", "1")
    test_device_cache_selects_the_reference_tokens_and_gives_its_outputs(_assign_kernel_device(), "llama", "resv",
                                                                          {"buckets": 20, "nonpositive": "shifted"})


@pytest.mark.skipif(_assign_kernel_device() is None,
                    reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1; numpy < 2)")
@pytest.mark.parametrize("threshold", [0, 3, 7, 40])
def test_assignment_kernel_clusters_as_the_reference(monkeypatch, threshold):
    """The one-launch assignment (``LFMSIFT_ASSIGN_KERNEL=1``) against ``HashClusterTable``: ids, hashes (64-bit
    patterns, the sign bit included), counts, means and open flags, chunk after chunk with closes between."""
    monkeypatch.setenv("LFMSIFT_ASSIGN_KERNEL", "1")
    for seed in range(3):
        dev = DeviceClusterTable(2, 4, threshold, _assign_kernel_device())
        assert dev.fused
        _cluster_like_the_reference(dev, threshold, torch.Generator().manual_seed(threshold * 10 + seed),
                                    max_tokens=20, wide_hashes=seed == 2)


@pytest.mark.skipif(_assign_kernel_device() is None,
                    reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1; numpy < 2)")
@pytest.mark.parametrize("options", [{"buckets": 20}, {"buckets": 20, "selection": "previous_layer"},
                                     {"buckets": 20, "nonpositive": "shifted", "center_keys": True}])
def test_device_cache_with_both_kernels_selects_the_reference_tokens(monkeypatch, options):
    monkeypatch.setenv("LFMSIFT_WICSUM_KERNEL", "1")
    monkeypatch.setenv("LFMSIFT_ASSIGN_KERNEL", "1")
    test_device_cache_selects_the_reference_tokens_and_gives_its_outputs(_assign_kernel_device(), "llama", "resv",
                                                                          options)


def test_the_gathered_attention_keeps_off_cudnn_unless_told(monkeypatch):
    """The SDPA kernels the device path allows: memory-efficient then math by default, any list by name,
    PyTorch's own choice with ``any``, a clear error for an unknown name (before any attention runs)."""
    from torch.nn.attention import SDPBackend

    from lfmsift.kv.attention import attend_masked, attend_reference, sdpa_backends

    monkeypatch.delenv("LFMSIFT_SDPA_BACKENDS", raising=False)
    assert sdpa_backends() == [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    monkeypatch.setenv("LFMSIFT_SDPA_BACKENDS", "any")
    assert sdpa_backends() is None
    monkeypatch.setenv("LFMSIFT_SDPA_BACKENDS", "cudnn_attention, flash_attention")
    assert sdpa_backends() == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    monkeypatch.setenv("LFMSIFT_SDPA_BACKENDS", "cudnn")
    with pytest.raises(ValueError, match="LFMSIFT_SDPA_BACKENDS='cudnn'"):
        sdpa_backends()
    monkeypatch.delenv("LFMSIFT_SDPA_BACKENDS")
    if not torch.cuda.is_available():
        return
    # On the GPU, the restricted call still equals the float64 oracle.
    gen = torch.Generator().manual_seed(3)
    kv, group, tokens, dim, past = 2, 4, 11, 128, 40
    counts = torch.tensor([17, 40])
    query = torch.randn(kv * group, tokens, dim, generator=gen)
    buffer = torch.zeros(2, kv, 64, dim)
    buffer[:, :, :past] = torch.randn(2, kv, past, dim, generator=gen)
    own = torch.randn(2, kv, tokens, dim, generator=gen)
    buffer[:, :, past : past + tokens] = own
    out = attend_masked(query.cuda().bfloat16(), buffer.cuda().bfloat16(), counts.cuda(), past, dim ** -0.5)
    want = attend_reference(query, [buffer[0, h, : counts[h]] for h in range(kv)],
                            [buffer[1, h, : counts[h]] for h in range(kv)], own[0], own[1], dim ** -0.5)
    assert torch.allclose(out.double().cpu(), want, atol=3e-2)
