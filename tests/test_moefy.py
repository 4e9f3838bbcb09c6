"""Building an MoE from a dense model: balanced co-activation experts, the router, exactness at top-k = E."""

import pytest
import torch

import lfmsift
from lfmsift.models import describe
from lfmsift.models.moefy import (
    MoEficationRouter,
    MoefySettings,
    activation_patterns,
    balanced_assign,
    balanced_kmeans,
    expert_output_norms,
    fit_router,
    load_moe,
    moefy,
    save_moe,
    set_top_k,
    topk_recall,
)
from lfmsift.models.tiny import tiny_model
from lfmsift.prune import pruned
from lfmsift.prune.experts import POPExperts


def test_activation_patterns_mark_top_channels():
    h = torch.tensor([[0.1, -3.0, 2.0, 0.0], [5.0, 0.1, 0.2, -0.3]])
    assert activation_patterns(h, 0.5).tolist() == [[False, True, True, False], [True, False, False, True]]
    with pytest.raises(ValueError):
        activation_patterns(h, 0.0)


def test_balanced_assign_hand_case():
    # item 0 and 1 both prefer cluster 0 (capacity 2 of 4 items / 2 clusters); 2 prefers 0 most of all
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.95, 0.0], [0.2, 0.3]])
    assert balanced_assign(sim).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="equal"):
        balanced_assign(torch.zeros(5, 2))


def test_balanced_kmeans_recovers_planted_groups():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(12) % 3
    centers = torch.randn(3, 40, generator=g)
    features = centers[groups] + 0.05 * torch.randn(12, 40, generator=g)
    labels = balanced_kmeans(features, 3, seed=1)
    assert torch.bincount(labels).tolist() == [4, 4, 4]
    for c in range(3):  # each planted group lands in one cluster
        assert labels[groups == c].unique().numel() == 1


def test_router_fit_and_recall():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    w_true, b_true = torch.randn(3, 6, generator=g), torch.tensor([0.5, -1.0, 0.0])
    w, b = fit_router(x, x @ w_true.T + b_true, ridge=0.0)
    torch.testing.assert_close(w, w_true, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, b_true, rtol=1e-4, atol=1e-4)
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_recall(scores, scores, 2) == 1.0
    assert topk_recall(scores, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), 1) == 0.5


def test_expert_output_norms_sum_to_dense_output():
    h, down = torch.randn(5, 8), torch.randn(3, 8)
    channels = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]])
    parts = [h[:, c] @ down[:, c].T for c in channels]
    torch.testing.assert_close(parts[0] + parts[1], h @ down.T)
    torch.testing.assert_close(expert_output_norms(h, down, channels), torch.stack([p.norm(dim=-1) for p in parts], 1))


def test_router_contract():
    r = MoEficationRouter(torch.eye(3, 4), torch.zeros(3), top_k=2)
    logits, weights, index = r(torch.tensor([[[0.0, 2.0, 1.0, 9.0]]]))
    assert index.tolist() == [[1, 2]] and weights.tolist() == [[1.0, 1.0]] and logits.shape == (1, 3)


@pytest.fixture(scope="module")
def built():
    dense = tiny_model("llama")
    windows = torch.randint(3, 250, (8, 24), generator=torch.Generator().manual_seed(0))
    moe, record = moefy(dense, windows, MoefySettings(num_experts=4, top_k=2), bos_id=1)
    return dense, moe, record


def test_all_experts_equal_the_dense_model(built):
    dense, moe, record = built
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    set_top_k(moe, 4)
    try:
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(moe.generate(ids, max_new_tokens=6, do_sample=False),
                           dense.generate(ids, max_new_tokens=6, do_sample=False))
    finally:
        set_top_k(moe, 2)
    assert not torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-3)  # top-2 of 4 is a real MoE
    view = describe(moe)
    ffn = view.layers[0].ffn
    assert view.arch.name == "qwen2_moe" and ffn.top_k == 2 and ffn.shared_expert is not None
    assert ffn.experts.intermediate_size == 24 and ffn.shared_expert.intermediate_size == 32  # 128 = 32 + 4 x 24
    # every dense channel is in exactly one expert (shared or routed)
    d = describe(dense).layers[0].ffn.gate_proj.weight
    rows = torch.cat([ffn.experts.gate_up_proj[:, :24].reshape(-1, d.shape[1]), ffn.shared_expert.gate_proj.weight])
    assert sorted(torch.cdist(rows, d).argmin(1).tolist()) == list(range(128))
    assert 0 <= record["router_topk_recall_mean"] <= 1 and len(record["layers"]) == 2
    assert record["active_channel_fraction"] == (32 + 2 * 24) / 128


def test_save_and_load_roundtrip(built, smollm2, tmp_path):
    """`lfmsift.load` of a saved MoE restores lfmsift's routers (plain from_pretrained would not)."""
    _, moe, record = built
    out = save_moe(moe, smollm2[1], tmp_path / "moe", info=record)
    loaded, tokenizer = lfmsift.load(str(out))
    assert all(isinstance(layer.mlp.gate, MoEficationRouter) for layer in loaded.model.layers)
    assert loaded.config.lfmsift_moefy["settings"]["num_experts"] == 4 and loaded.model.layers[0].mlp.gate.top_k == 2
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, rtol=0, atol=0)
    assert tokenizer.vocab_size == smollm2[1].vocab_size
    tiny_model("llama").config.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a model built"):
        load_moe(tmp_path / "dense")


def test_pop_on_built_moe_ratio_zero_is_exact(built):
    _, moe, _ = built
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = moe.generate(ids, max_new_tokens=6, do_sample=False)
    with pruned(moe, "pop", ffn_ratio=0.0, gamma=0.0) as handle:
        assert all(isinstance(r, POPExperts) for r in handle.replacements)
        assert torch.equal(moe.generate(ids, max_new_tokens=6, do_sample=False), ref)
    with pruned(moe, "pop", target=0.2) as handle:
        moe.generate(ids, max_new_tokens=6, do_sample=False)
        total = handle.stats()["total"]
        assert total["channels_computed_per_decode_step"] < total["d_ff"]


def test_moefy_rejects_other_architectures():
    with pytest.raises(ValueError, match="Llama-architecture"):
        moefy(tiny_model("qwen3"), torch.randint(3, 250, (2, 8)))
    with pytest.raises(ValueError, match="top_k"):
        MoefySettings(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="shared_fraction"):
        MoefySettings(shared_fraction=0.0)


@pytest.mark.real
def test_named_moe_is_built_once_and_loaded_from_cache(smollm2, data_dir, tmp_path, monkeypatch):
    """`smollm2-135m-moe` is built from the real SmolLM2 on first use (small settings here), then loaded."""
    from lfmsift.models.moefy import build_smollm2_moe

    monkeypatch.setenv("LFMSIFT_HOME", str(tmp_path))
    small = MoefySettings(calib_samples=2, calib_seqlen=64, kmeans_iters=2)
    moe, tok = build_smollm2_moe(data_dir=data_dir, settings=small)
    assert (tmp_path / "models" / "smollm2-135m-moe" / "lfmsift.json").is_file()
    again, _ = lfmsift.load("smollm2-135m-moe")  # from the cache: no data needed
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, moe(ids).logits, rtol=0, atol=0)
        set_top_k(again, again.config.num_experts)
        torch.testing.assert_close(again(ids).logits, smollm2[0](ids).logits, rtol=1e-4, atol=1e-4)
    assert again.config.lfmsift_moefy["calibration_tokens"] == 2 * 64  # SmolLM2's tokenizer adds no BOS
