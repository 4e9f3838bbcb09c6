"""The tiered KV store: budgets, group-contiguous offload, disk round trip, errors that lose nothing."""

from __future__ import annotations

import pytest
import torch

from lfmsift.kv.store import DEVICE, DISK, HOST, KVBudgetError, LayerKVStore, TierBudget, TieredKVStore, count_runs


def _store(tmp_path, device=4, host=6, disk=None, dtype=torch.bfloat16) -> LayerKVStore:
    return LayerKVStore(2, 8, dtype, "cpu", device, host, disk, tmp_path / "layer.kv")


def _chunk(n, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 8, generator=g).to(dtype), torch.randn(2, n, 8, generator=g).to(dtype)


def test_round_trip_across_all_tiers_is_bit_exact(tmp_path):
    store = _store(tmp_path)
    keys, values = [], []
    for i in range(8):  # 8 chunks of 2 tokens, each chunk its own group
        k, v = _chunk(2, i)
        keys.append(k)
        values.append(v)
        store.append(k, v, torch.tensor([i, i]))
    tiers = store.tier.view.tolist()
    assert {DEVICE, HOST, DISK} <= set(tiers)
    all_k, all_v = torch.cat(keys, 1), torch.cat(values, 1)
    for h in range(2):
        for t in range(16):
            k, v = store.gather(torch.tensor([t]), h)
            assert torch.equal(k[0], all_k[h, t]) and torch.equal(v[0], all_v[h, t])
    stats = store.stats()
    assert stats["peak_bytes"]["device"] <= 4 * store.token_bytes
    assert stats["peak_bytes"]["host"] <= 6 * store.token_bytes
    assert stats["moved_bytes"]["fetched_disk"] > 0


def test_lru_groups_are_offloaded_as_one_run_each(tmp_path):
    store = _store(tmp_path, device=6, host=100)
    for i, groups in enumerate([[0, 1, 0], [1, 2, 2]]):
        k, v = _chunk(3, i)
        store.append(k, v, torch.tensor(groups))
    assert store.tokens_in(DEVICE) == 6
    k, v = _chunk(2, 9)
    closed = store.append(k, v, torch.tensor([3, 3]))
    assert closed == [0]  # group 0 was used least recently
    assert store.tier.view[[0, 2]].tolist() == [HOST, HOST]
    slots = store.slot.view[[0, 2]]
    assert count_runs(torch.sort(slots).values) == 1  # tokens 0 and 2 are adjacent on the host
    store.gather(torch.tensor([0, 2]), 0)
    assert store.runs["host"] == 1


def test_disk_budget_error_loses_nothing(tmp_path):
    store = _store(tmp_path, device=2, host=2, disk=2)
    for i in range(3):
        store.append(*_chunk(2, i), torch.tensor([i, i]))
    before = (store.num_tokens, store.tokens_in(DEVICE), store.tokens_in(HOST), store.tokens_in(DISK))
    with pytest.raises(KVBudgetError, match="disk budget"):
        store.append(*_chunk(2, 5), torch.tensor([7, 7]))
    assert (store.num_tokens, store.tokens_in(DEVICE), store.tokens_in(HOST), store.tokens_in(DISK)) == before
    k, v = store.gather(torch.arange(6), 1)
    assert k.shape == (6, 8)


def test_chunk_larger_than_device_budget_is_refused(tmp_path):
    store = _store(tmp_path, device=2)
    with pytest.raises(KVBudgetError, match="device budget"):
        store.append(*_chunk(3, 0), torch.zeros(3, dtype=torch.int64))
    assert store.num_tokens == 0


def test_tiered_store_splits_budgets_per_layer(tmp_path):
    token_bytes = 2 * 2 * 8 * 2
    store = TieredKVStore(4, 2, 8, torch.bfloat16, "cpu", TierBudget(device_bytes=4 * 10 * token_bytes,
                                                                      disk_dir=tmp_path))
    assert store[0].caps[DEVICE] == 10 and store[3].caps[HOST] is None
    with pytest.raises(ValueError):
        TierBudget(device_bytes=-1)


@pytest.mark.parametrize("seed", range(6))
def test_host_ring_invariants_on_random_streams(tmp_path, seed):
    """Random group patterns: budgets hold, runs never overlap, the spill plan equals what happens,
    and every token reads back exactly."""
    store = LayerKVStore(2, 8, torch.float32, "cpu", 6, 10, None, tmp_path / "layer.kv")
    gen = torch.Generator().manual_seed(seed)
    written = []
    for i in range(80):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        groups = torch.randint(max(0, i - 3), i + 1, (n,), generator=gen)
        k = torch.randn(2, n, 8, generator=gen)
        written.append(k)
        disk_before = store.tokens_in(DISK)
        store.append(k, -k, groups)
        assert store.tokens_in(DEVICE) <= 6 and store.tokens_in(HOST) <= 10
        runs = sorted((off, length) for _, off, length, _ in store._host_runs)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(runs, runs[1:]))
        assert store.tokens_in(DISK) >= disk_before
    everything = torch.cat(written, 1)
    for t in range(store.num_tokens):
        k, v = store.gather(torch.tensor([t]), 1)
        assert torch.equal(k[0], everything[1, t]) and torch.equal(v[0], -everything[1, t])
