"""Independent oracles for what a streaming layer attends to, and for the store's eviction plan.

The tokens each layer and KV head attend to are recomputed by brute force from what the cache stored:
cluster means rebuilt from the stored keys of each cluster's members, WiCSum walked row by row in plain
Python, the union taken over rows and query heads, clusters mapped to their members, text and the
always-kept tokens added. ``previous_layer`` must apply layer l's brute-force choice at layer l + 1.
"""

from __future__ import annotations

import pytest
import torch

from lfmsift.kv import ReSV, TierBudget, get_retriever
from lfmsift.kv.cache import new_cache, uninstall
from lfmsift.kv.store import DISK, KVBudgetError, LayerKVStore
from lfmsift.models.tiny import tiny_model


def _rows_select(scores: list[float], counts: list[int], ratio: float, nonpositive: str = "top") -> set[int]:
    """WiCSum of one row by hand: sort descending, accumulate s * n until above ratio * sum; a row whose
    sum is <= 0 takes its top cluster (``top``) or is measured from its minimum (``shifted``)."""
    weights = [s * n for s, n in zip(scores, counts)]
    total = sum(weights)
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    if total <= 0 and nonpositive == "shifted":
        low = min(scores)
        scores = [s - low for s in scores]
        weights = [s * n for s, n in zip(scores, counts)]
        total = sum(weights)
    if total <= 0:
        return {order[0]}
    acc, chosen = 0.0, set()
    for j in order:
        chosen.add(j)
        acc += weights[j]
        if acc > ratio * total:
            break
    return chosen


def _oracle_tokens(q, past_keys, groups, retriever: ReSV, num_kv_heads: int) -> torch.Tensor:
    """(kv_heads, past) bool attended past tokens, by brute force. q: (heads, rows, dim) post-RoPE;
    past_keys: (kv_heads, past, dim) as stored; groups: (past,) cluster id (< 0: text)."""
    heads, rows, _ = q.shape
    group = heads // num_kv_heads
    past = groups.numel()
    frame = groups >= 0
    clusters = sorted(set(groups[frame].tolist()))
    keep = torch.zeros(num_kv_heads, past, dtype=torch.bool)
    for h in range(num_kv_heads):
        if clusters:
            members = [(groups == c).nonzero().flatten() for c in clusters]
            reps = [past_keys[h, m].double().mean(0) for m in members]
            counts = [m.numel() for m in members]
            chosen: set[int] = set()
            for qh in range(h * group, (h + 1) * group):
                for r in range(rows):
                    scores = [float(q[qh, r].double() @ rep) for rep in reps]
                    chosen |= _rows_select(scores, counts, retriever.ratio, retriever.nonpositive)
            for j in chosen:
                keep[h, members[j]] = True
        keep[h] |= ~frame
        order = frame.cumsum(0) - 1
        keep[h] |= frame & ((order < retriever.keep_first) | (order >= int(frame.sum()) - retriever.keep_recent))
    return keep


def _record(cache):
    """Wrap the cache so every attended set and the inputs that chose it are kept, per (chunk, layer)."""
    seen = []
    choose, attention = cache._choose, cache._attention

    def spy_choose(layer, index, q, store, past, hint=None):
        groups = store.group.view[:past].clone()
        keys = None
        if past:  # gather returns tier-then-slot order: put the keys back in token order
            order = torch.argsort(store.tier.view[:past].long() * (1 << 40) + store.slot.view[:past])
            keys = torch.empty(cache.num_kv_heads, past, cache.head_dim)
            for h in range(cache.num_kv_heads):
                keys[h, order] = store.gather(torch.arange(past), h)[0].float()
        seen.append({"layer": layer, "q": q.detach().clone(), "groups": groups, "keys": keys})
        return choose(layer, index, q, store, past, hint)

    def spy_attention(q, k, v, scaling, store, chosen):
        seen[-1]["chosen"] = [c.clone() for c in chosen]
        return attention(q, k, v, scaling, store, chosen)

    cache._choose, cache._attention = spy_choose, spy_attention
    return seen


def _stream(model, retriever, ids, chunk, budget):
    cache = new_cache(model, retriever, budget)
    seen = _record(cache)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                cache.begin("text" if start == 0 else "frame")  # a text preamble, then streamed chunks
                model(ids[:, start : start + chunk], past_key_values=cache)
                cache.end(min(chunk, ids.shape[1] - start))
        return cache, seen
    finally:
        uninstall(cache)


@pytest.mark.parametrize("options", [
    {},
    {"keep_first": 3, "keep_recent": 5},
    {"ratio": 0.6},
    {"nonpositive": "shifted"},
    {"name": "resv_shifted"},
])
def test_same_layer_attends_to_the_brute_force_union(options, tmp_path):
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    ids = torch.randint(0, 250, (1, 96), generator=torch.Generator().manual_seed(3))
    options = dict(options)
    retriever = get_retriever(options.pop("name", "resv"), include_current=False, **options)
    cache, seen = _stream(model, retriever, ids, 12, TierBudget(device_bytes=24_000, disk_dir=tmp_path))
    try:
        checked = 0
        for rec in seen:
            past = rec["groups"].numel()
            if not past or not (rec["groups"] >= 0).any():
                continue
            want = _oracle_tokens(rec["q"], rec["keys"], rec["groups"], retriever, cache.num_kv_heads)
            for h, got in enumerate(rec["chosen"]):
                assert set(got.tolist()) == set(want[h].nonzero().flatten().tolist()), (rec["layer"], h)
            checked += 1
        assert checked > 10
        assert cache.stats()["store"]["bytes"]["host"] > 0  # clusters were offloaded along the way
    finally:
        cache.close()


def test_previous_layer_applies_layer_l_choice_at_layer_l_plus_1(tmp_path):
    model = tiny_model("llama", seed=1, dtype=torch.float32)
    ids = torch.randint(0, 250, (1, 96), generator=torch.Generator().manual_seed(4))
    retriever = ReSV(include_current=False, selection="previous_layer")
    cache, seen = _stream(model, retriever, ids, 8, TierBudget(disk_dir=tmp_path))
    try:
        layers = cache.full_layers
        checked = 0
        for i, rec in enumerate(seen):
            past = rec["groups"].numel()
            if rec["layer"] == layers[0]:
                assert all(c.numel() == past for c in rec["chosen"])  # layer 0 attends densely
                continue
            prev = seen[i - 1]  # the previous layer of the same chunk
            assert prev["layer"] == layers[layers.index(rec["layer"]) - 1]
            if not past or not (prev["groups"] >= 0).any():
                continue
            want = _oracle_tokens(prev["q"], prev["keys"], prev["groups"], retriever, cache.num_kv_heads)
            for h, got in enumerate(rec["chosen"]):
                assert set(got.tolist()) == set(want[h].nonzero().flatten().tolist())
            checked += 1
        assert checked > 5
    finally:
        cache.close()


def _snapshot(store: LayerKVStore):
    return (store.num_tokens, dict(store._last_use), store._clock, store.tokens_in(0), store.tokens_in(1),
            store.tokens_in(2), store.tier.view.clone(), store.slot.view.clone())


@pytest.mark.parametrize("seed", range(4))
def test_eviction_plan_equals_what_happens(tmp_path, seed):
    """On random group patterns (chunks adding to open groups, touches in between), ``plan`` predicts the
    closed groups and the tokens spilled to disk exactly."""
    store = LayerKVStore(2, 8, torch.float32, "cpu", 7, 9, None, tmp_path / "layer.kv")
    gen = torch.Generator().manual_seed(seed)
    spilled_any = False
    for i in range(120):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        groups = torch.randint(max(0, i - 4), i + 1, (n,), generator=gen)
        if i % 3 == 0 and store.open_groups():
            store.touch(torch.tensor(store.open_groups()[:1]))
        plan = store.plan(groups)
        disk_before = store.tokens_in(DISK)
        closed = store.append(torch.randn(2, n, 8, generator=gen), torch.randn(2, n, 8, generator=gen), groups)
        assert closed == plan.evict
        assert store.tokens_in(DISK) - disk_before == plan.spill
        spilled_any |= plan.spill > 0
        assert store.tokens_in(0) <= 7
    assert spilled_any


def test_touch_keeps_a_used_group_on_the_device(tmp_path):
    store = LayerKVStore(2, 8, torch.float32, "cpu", 6, None, None, tmp_path / "layer.kv")
    for g in range(3):
        store.append(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([g, g]))
    store.touch([0])  # group 0 was read by a selection: group 1 is now the least recently used
    assert store.append(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3, 3])) == [1]


def test_budget_error_changes_no_state(tmp_path):
    store = LayerKVStore(2, 8, torch.float32, "cpu", 2, 2, 2, tmp_path / "layer.kv")
    for g in range(3):
        store.append(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([g, g]))
    before = _snapshot(store)
    with pytest.raises(KVBudgetError):
        store.append(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([2, 9]))
    after = _snapshot(store)
    assert before[:6] == after[:6] and torch.equal(before[6], after[6]) and torch.equal(before[7], after[7])
