"""Exact checks of ReSV's pure parts: hashing, leader clustering, WiCSum (exact and bucketed)."""

from __future__ import annotations

import pytest
import torch

from lfmsift.kv.clusters import HashClusterTable
from lfmsift.kv.hashing import hamming, hash_bits, hyperplanes, popcount
from lfmsift.kv.wicsum import bucket_of, select_clusters, wicsum_bucket_walk, wicsum_bucketed, wicsum_select


def test_popcount_and_hamming_match_python():
    x = torch.randint(-2**63, 2**63 - 1, (500,))  # every 64-bit pattern, the sign bit included
    y = torch.randint(-2**63, 2**63 - 1, (500,))
    mask = (1 << 64) - 1
    assert popcount(x).tolist() == [bin(v & mask).count("1") for v in x.tolist()]
    assert hamming(x, y).tolist() == [((a ^ b) & mask).bit_count() for a, b in zip(x.tolist(), y.tolist())]


def test_64_bit_hashes_cluster_by_their_true_distance():
    planes = hyperplanes(8, bits=64, seed=0)
    keys = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    h = hash_bits(keys, planes)
    proj = keys @ planes
    for t in range(40):
        assert [(int(h[t]) >> j) & 1 for j in range(64)] == [int(proj[t, j] > 0) for j in range(64)]
    table = HashClusterTable(num_kv_heads=1, head_dim=8, threshold=20)
    ids = table.assign(keys[None], h)
    bits = (proj > 0).int()
    for t in range(1, 40):  # a token joins a cluster only if its founder is closer than the threshold
        founder = int((ids[:t] == ids[t]).nonzero()[0]) if (ids[:t] == ids[t]).any() else t
        assert int((bits[t] != bits[founder]).sum()) < 20 or founder == t


def test_hash_bits_are_signs_of_projections_and_reproducible():
    planes = hyperplanes(12, bits=32, seed=3, layer=1)
    assert torch.equal(planes, hyperplanes(12, bits=32, seed=3, layer=1))
    assert not torch.equal(planes, hyperplanes(12, bits=32, seed=3, layer=2))
    keys = torch.randn(7, 12)
    h = hash_bits(keys, planes)
    proj = keys @ planes
    for t in range(7):
        expected = sum(1 << j for j in range(32) if proj[t, j] > 0)
        assert int(h[t]) == expected
    assert int(hash_bits(torch.zeros(1, 12), planes)) == 0  # x <= 0 -> 0
    with pytest.raises(ValueError):
        hyperplanes(4, bits=65)


def test_leader_clustering_hand_case():
    table = HashClusterTable(num_kv_heads=1, head_dim=1, threshold=7)
    keys = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    hashes = torch.tensor([0b0, 0b1, 0b1111111, 0b0111111])
    ids = table.assign(keys, hashes)
    # 0b1 is 1 bit from cluster 0 -> joins; 0b1111111 is 7 bits away (not < 7) -> founds cluster 1;
    # 0b0111111 is 6 bits from cluster 0 and 1 bit from cluster 1 -> nearest is cluster 1.
    assert ids.tolist() == [0, 0, 1, 1]
    assert table.counts.tolist() == [2, 2]
    assert torch.allclose(table.representatives[0, :, 0], torch.tensor([2.0, 15.0]))
    assert table.hashes.tolist() == [0, 0b1111111]  # leader: the founder's hash stays
    # A closed cluster takes no new tokens; ties go to the most recently founded cluster.
    table.close([1])
    ids = table.assign(torch.tensor([[[5.0], [7.0]]]), torch.tensor([0b1111111, 0b1111110]))
    assert ids.tolist() == [2, 2]
    table2 = HashClusterTable(1, 1)
    assert table2.assign(torch.zeros(1, 3, 1), torch.tensor([0b11, 0b00, 0b01])).tolist() == [0, 0, 0]
    table3 = HashClusterTable(1, 1, threshold=2)
    # 0b01 is 1 bit from both earlier clusters (0b00 founded first, 0b11 later) -> the later one.
    assert table3.assign(torch.zeros(1, 3, 1), torch.tensor([0b00, 0b11, 0b01])).tolist() == [0, 1, 1]


def test_hc_table_bytes():
    table = HashClusterTable(num_kv_heads=8, head_dim=128)
    table.assign(torch.randn(8, 1, 128), torch.tensor([5]))
    # The paper's accounting: a 32-member cluster of Llama-3-8B keys costs 1.67% of its KV bytes.
    per_cluster = table.nbytes(num_tokens=32)
    assert per_cluster == 8 * 128 * 2 + 8 + 4 * 32
    assert abs(per_cluster / (32 * 2 * 8 * 128 * 2) - 0.0167) < 0.0005


def _brute_force(scores: torch.Tensor, counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """Eqs. 1-3 literally, one row at a time."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        weights = [s * n for s, n in zip(row, counts.tolist())]
        total = sum(weights)
        order = sorted(range(len(row)), key=lambda j: -row[j])
        if total <= 0:
            out[i, order[0]] = True
            continue
        acc = 0.0
        for j in order:
            out[i, j] = True
            acc += weights[j]
            if acc > ratio * total:
                break
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8])
def test_wicsum_matches_brute_force(ratio):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 40, generator=gen, dtype=torch.float64) + 0.3
    scores[:4] -= 5.0  # rows with a negative weighted sum take their top cluster
    counts = torch.randint(1, 60, (40,), generator=gen)
    assert torch.equal(wicsum_select(scores, counts, ratio), _brute_force(scores, counts, ratio))


def test_wicsum_rejects_bad_ratio():
    with pytest.raises(ValueError):
        wicsum_select(torch.ones(1, 3), torch.ones(3), 1.0)


def test_bucketed_is_a_superset_and_equal_when_bounds_fall_between_scores():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(200, 50, generator=gen, dtype=torch.float64) + 0.5
    counts = torch.randint(1, 40, (50,), generator=gen)
    exact = wicsum_select(scores, counts, 0.3)
    bucketed, visited = wicsum_bucketed(scores, counts, 0.3, buckets=20)
    assert (bucketed | exact).equal(bucketed)  # superset
    # Equal exactly on the rows where the exit bucket holds no score beyond the exact prefix.
    b = bucket_of(scores, 20)
    exit_bucket = torch.where(bucketed, b, -1).max(-1).values
    lowest_exact = torch.where(exact, scores, torch.inf).min(-1).values
    lower_bound = scores.max(-1).values - (exit_bucket + 1) * (scores.max(-1).values - scores.min(-1).values) / 20
    between = torch.where(~exact & (scores >= lower_bound[:, None]), True, False).sum(-1) == 0
    assert between.any() and (~between).any()
    assert torch.equal(bucketed[between], exact[between])
    assert torch.all(lowest_exact >= lower_bound - 1e-12)
    assert torch.allclose(visited, bucketed.double().mean(-1))


@pytest.mark.parametrize("shift", [-0.5, 0.0, 0.5])
def test_bucket_walk_equals_the_whole_histogram(shift):
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(300, 60, generator=gen, dtype=torch.float64) + shift  # some rows with Sum <= 0
    counts = torch.randint(1, 30, (60,), generator=gen)
    for ratio in (0.0, 0.3, 0.9):
        for buckets in (1, 7, 20):
            walk, seen_walk = wicsum_bucket_walk(scores, counts, ratio, buckets)
            full, seen_full = wicsum_bucketed(scores, counts, ratio, buckets)
            assert torch.equal(walk, full) and torch.allclose(seen_walk, seen_full)


def test_bucketed_walk_hand_case():
    # The paper's Fig. 11 setting: scores 0..40, 20 buckets of width 2; exit once the sum passes 80%.
    scores = torch.tensor([[40.0, 39.0, 30.0, 29.0, 10.0, 1.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([10, 5, 6, 3, 2, 1, 1])
    # weights 400, 195, 180, 87, 20, 1, 0 -> total 883, threshold 0.8 * 883 = 706.4.
    # Buckets from the top: [38,40] holds 40 and 39 (595); 36, 34, 32 are empty; (28,30] holds 30 and 29
    # (267, cumulative 862 > 706.4) -> exit at bucket 5 having visited four of seven scores.
    for rule in (wicsum_bucketed, wicsum_bucket_walk):
        mask, visited = rule(scores, counts, 0.8, buckets=20)
        assert mask.tolist() == [[True, True, True, True, False, False, False]]
        assert visited.item() == pytest.approx(4 / 7)
    assert wicsum_select(scores, counts, 0.8).tolist() == [[True, True, True, False, False, False, False]]


def test_select_clusters_unions_rows_and_query_heads_of_a_group():
    reps = torch.eye(4).repeat(2, 1, 1)  # 2 KV heads, 4 clusters with one-hot keys
    counts = torch.ones(4, dtype=torch.int64)
    q = torch.zeros(4, 2, 4)  # 4 query heads (2 per KV head), 2 rows
    q[0, 0, 0] = q[1, 1, 1] = 1.0  # group 0: rows point at clusters 0 and 1
    q[2, :, 3] = 1.0  # group 1: cluster 3 only
    q[3, :, 3] = 1.0
    mask, _ = select_clusters(q, reps, counts, ratio=0.3)
    assert mask.tolist() == [[True, True, False, False], [False, False, False, True]]


def test_center_keys_hashes_each_key_minus_the_running_mean():
    from lfmsift.kv import ReSV

    index = ReSV(center_keys=True).index(layer=2, num_kv_heads=2, head_dim=4, device=torch.device("cpu"))
    plain = ReSV().index(layer=2, num_kv_heads=2, head_dim=4, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, n, 4, generator=gen) + 3.0 for n in (5, 3)]  # a shared offset, as real keys have
    seen = []
    for keys in chunks:
        flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
        seen.append(flat)
        mean = torch.cat(seen).mean(0)
        want = hash_bits(flat - mean, index.planes)
        founders_before = index.table.size
        ids = index.assign(keys)
        new = ids >= founders_before
        # founders keep the hash of their own centered key
        first = {int(c): t for t, c in reversed(list(enumerate(ids.tolist())))}
        for c, t in first.items():
            if c >= founders_before:
                assert int(index.table.hashes[c]) == int(want[t])
        plain.assign(keys)
        assert new.any()
    # the offset makes raw hashes agree far more than centered ones: fewer, larger clusters
    assert plain.table.size < index.table.size


@pytest.mark.parametrize("seed", range(6))
def test_exact_rule_over_a_padded_table_equals_the_rule_over_its_valid_clusters(seed):
    """A preallocated table (the device index's) holds invalid slots: masked out, the exact rule and the
    non-positive shift give what Eqs. 1-3 give on the valid clusters alone (oracles: the row-by-row brute force,
    and the shift's definition on the sliced-out clusters)."""
    from lfmsift.kv.wicsum import shift_nonpositive

    gen = torch.Generator().manual_seed(seed)
    slots = 30
    valid = torch.rand(slots, generator=gen) < 0.6
    valid[int(torch.randint(slots, (1,), generator=gen))] = True
    scores = torch.randn(4, slots, generator=gen) - 0.3 * (seed % 2)  # odd seeds: many rows with a sum <= 0
    counts = torch.randint(1, 6, (slots,), generator=gen)
    padded_scores = torch.where(valid, scores, torch.randn(4, slots, generator=gen) * 50)  # garbage in the padding
    padded_counts = torch.where(valid, counts, torch.randint(0, 9, (slots,), generator=gen))
    for ratio in (0.0, 0.3, 0.9):
        got = wicsum_select(padded_scores, padded_counts, ratio, valid=valid)
        assert not got[:, ~valid].any()
        assert torch.equal(got[:, valid], _brute_force(scores[:, valid], counts[valid], ratio))
    shifted = shift_nonpositive(padded_scores, padded_counts, valid=valid)
    assert torch.allclose(shifted[:, valid], shift_nonpositive(scores[:, valid], counts[valid]))
