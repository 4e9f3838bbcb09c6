"""The pruning baselines (wanda_sp, flap, probe, griffin) on tiny random models: budgets, real removal,
exact restoration, hand-checked scores, and the GQA head slicing against a masked dense reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfmsift.models import describe
from lfmsift.models.adapters import AlreadyModifiedError
from lfmsift.models.tiny import tiny_model
from lfmsift.prune import METHODS, apply
from lfmsift.prune.calibration import ColumnStats, collect_windows
from lfmsift.prune.flap import fluctuation_scores, global_threshold, standardize
from lfmsift.prune.griffin import GriffinFFN, griffin_scores
from lfmsift.prune.probe import ProbeAttention, ProbeFFN, fused_importance, probe_indices
from lfmsift.prune.structured import SlicedFFN, kv_layout, pruned_attention
from lfmsift.prune.registry import PruneHandle, PruningMethod
from lfmsift.prune.structured import LayerMask, masks_plan
from lfmsift.prune.wanda_sp import layer_mask, sequential_masks, wanda_column_scores


def apply_plan(model, plan):
    """Install a ready-made plan (what `apply` does after a method plans)."""
    handle = PruneHandle(model, PruningMethod(), plan)
    handle._install()
    return handle

ARCHS = ["llama", "qwen3", "gemma3_text"]


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    torch.manual_seed(0)
    model = tiny_model(request.param)
    vocab = model.config.vocab_size
    stats = collect_windows(model, torch.randint(0, vocab, (6, 24)), positions=True)
    x = torch.randint(0, vocab, (3, 17))
    with torch.no_grad():
        ref = model(x).logits
    return model, stats, x, ref


def _settings(method, target, stats):
    if method == "wanda_sp":
        return dict(target=target, calib_stats=stats, sequential=False)
    if method == "flap":
        return dict(target=target, calib_stats=stats)
    if method == "probe":
        return dict(target=target, calib_stats=stats, skip_layers=())
    return dict(target=target)


@pytest.mark.parametrize("method", ["wanda_sp", "flap", "probe", "griffin"])
def test_prune_then_remove_restores_exactly(setup, method):
    model, stats, x, ref = setup
    originals = [(layer.attention.module, layer.ffn.module) for layer in describe(model).layers]

    def decode_step():  # the logits of one decode step after the prompt (every method prunes it)
        out = model(x, use_cache=True)
        return model(x[:, :1], past_key_values=out.past_key_values, use_cache=True).logits

    with torch.no_grad():
        dense_step = decode_step()
        handle = apply(model, method, **_settings(method, 0.4, stats))
        pruned_step = decode_step()
        model.generate(x, max_new_tokens=3, do_sample=False)
        handle.remove()
        after = model(x).logits
    assert not torch.allclose(pruned_step, dense_step)
    assert torch.equal(after, ref)
    assert [(layer.attention.module, layer.ffn.module) for layer in describe(model).layers] == originals


@pytest.mark.parametrize("method", ["wanda_sp", "probe", "griffin", "flap"])
def test_ratio_zero_is_dense(setup, method):
    model, stats, x, ref = setup
    settings = _settings(method, 0.0, stats) if method != "griffin" else dict(ffn_ratio=0.0)
    with torch.no_grad(), torch.inference_mode():
        handle = apply(model, method, **settings)
        out = model(x).logits
        handle.remove()
    assert torch.equal(out, ref)


def test_wanda_sp_removes_uniform_counts(setup):
    model, stats, x, ref = setup
    view = describe(model)
    handle = apply(model, "wanda_sp", target=0.4, calib_stats=stats, sequential=False)
    try:
        for layer in view.layers:  # layer.module is the live decoder layer, holding the swapped modules
            dense = layer
            heads = dense.attention.num_heads - int(0.4 * dense.attention.num_heads)
            channels = dense.ffn.intermediate_size - int(0.4 * dense.ffn.intermediate_size)
            assert isinstance(layer.module.mlp, SlicedFFN)
            assert layer.module.mlp.gate_proj.weight.shape[0] == channels
            assert layer.module.mlp.down_proj.weight.shape[1] == channels
            assert layer.module.self_attn.q_proj.out_features == heads * dense.attention.head_dim
            assert layer.module.self_attn.o_proj.in_features == heads * dense.attention.head_dim
            assert layer.module.mlp.down_proj.bias is None  # Wanda-sp has no bias compensation
        s = handle.stats()
        assert s["channels_kept"] < s["channels"] and s["heads_kept"] < s["heads"]
    finally:
        handle.remove()


def test_flap_meets_global_budget_with_bias(setup):
    model, stats, x, ref = setup
    view = describe(model)
    handle = apply(model, "flap", target=0.3, calib_stats=stats)
    try:
        s = handle.stats()
        assert abs(s["achieved_reduction"] - 0.3) < 0.03
        pruned = [layer for layer in view.layers if isinstance(layer.module.mlp, SlicedFFN)]
        assert pruned and all(layer.module.mlp.down_proj.bias is not None for layer in pruned)
    finally:
        handle.remove()


def test_flap_bias_is_mean_of_removed_columns(setup):
    model, stats, x, ref = setup
    view = describe(model)
    handle = apply(model, "flap", target=0.3, calib_stats=stats)
    try:
        layer = next(layer for layer in view.layers if isinstance(layer.module.mlp, SlicedFFN))
        dense = layer.ffn
        kept = layer.module.mlp.channels
        removed = torch.tensor(sorted(set(range(dense.intermediate_size)) - set(kept.tolist())))
        mean = stats.ffn[layer.index].mean.float()
        expected = dense.down_proj.weight.float()[:, removed] @ mean[removed]
        torch.testing.assert_close(layer.module.mlp.down_proj.bias, expected.to(layer.module.mlp.down_proj.bias.dtype))
    finally:
        handle.remove()


def test_probe_prunes_each_batch_to_its_budget(setup):
    model, stats, x, ref = setup
    handle = apply(model, "probe", target=0.4, calib_stats=stats, skip_layers=())
    try:
        with torch.no_grad():
            model(x)
        for block in handle.replacements:
            if isinstance(block, ProbeFFN):
                d_ff = block._view.intermediate_size
                assert block.active.intermediate_size == d_ff - int(0.4 * d_ff)
            else:
                assert isinstance(block, ProbeAttention)
                n = block._view.num_heads
                assert block.active.q_proj.out_features == (n - int(0.4 * n)) * block._view.head_dim
    finally:
        handle.remove()


def test_griffin_decodes_with_fixed_experts(setup):
    model, stats, x, ref = setup
    handle = apply(model, "griffin", ffn_ratio=0.5)
    try:
        with torch.no_grad():
            out = model(x, use_cache=True)
            experts = [f.experts.clone() for f in handle.replacements]
            model(x[:, :1], past_key_values=out.past_key_values, use_cache=True)
        for f, e in zip(handle.replacements, experts):
            assert isinstance(f, GriffinFFN)
            assert torch.equal(f.experts, e)
            assert f.w_gate.shape[0] == round(0.5 * f._ffn.intermediate_size)
            assert f.decode_tokens == 3
    finally:
        handle.remove()


def test_pruned_attention_equals_masked_dense():
    """Slicing query heads (GQA: 4 query heads on 2 KV heads) equals zeroing their o_proj columns."""
    torch.manual_seed(1)
    model = tiny_model("llama")
    layer = describe(model).layers[0]
    a = layer.attention
    heads = torch.tensor([0, 2, 3])  # uneven groups: 1 head of KV head 0, 2 of KV head 1
    clone = pruned_attention(a, heads)
    x = torch.randn(2, 9, a.q_proj.in_features)
    pos = torch.arange(9)[None].expand(2, -1)
    rope = describe(model).rotary(0, x, pos)
    with torch.no_grad():
        out = clone(x, position_embeddings=rope, attention_mask=None)[0]
        keep = torch.zeros(a.num_heads, dtype=torch.bool)
        keep[heads] = True
        col_mask = keep.repeat_interleave(a.head_dim).to(x.dtype)
        saved = a.o_proj.weight.detach().clone()
        a.o_proj.weight.mul_(col_mask)
        try:
            ref = a.module(x, position_embeddings=rope, attention_mask=None)[0]
        finally:
            a.o_proj.weight.copy_(saved)
    torch.testing.assert_close(out, ref)
    # removing every query head of a group removes its KV head too
    clone = pruned_attention(a, torch.tensor([0, 1]))
    assert clone.k_proj.out_features == a.head_dim and clone.v_proj.out_features == a.head_dim


def test_kv_layout_hand_case():
    kept_kv, index = kv_layout(torch.tensor([1, 2, 6]), num_heads=8, num_kv_heads=4)
    assert kept_kv.tolist() == [0, 1, 3]
    assert index.tolist() == [0, 1, 2]


def test_wanda_scores_hand_case():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    sum_sq = torch.tensor([4.0, 9.0])
    # mean_i |W_ij| * sqrt(sum_sq_j) = [2 * 2, 1 * 3]
    assert wanda_column_scores(w, sum_sq).tolist() == [4.0, 3.0]


def test_flap_scores_and_threshold_hand_case():
    w = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    assert fluctuation_scores(w, torch.tensor([3.0, 0.5])).tolist() == [6.0, 2.0]
    s = standardize(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(s, torch.tensor([-1.0, 0.0, 1.0]))
    # scores 4 > 3 > 2 > 1 with weights 2, 1, 1, 1 (total 5): keep 60% -> cumulative 2, 3, ... closest to 3
    # at score 3, so only scores above 3 are kept
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert global_threshold(scores, weights, 0.6).item() == 3.0


def test_column_stats_are_exact():
    s = ColumnStats()
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    s.add(x, None)
    s.add(torch.tensor([[[5.0, 4.0]]]), None)
    assert s.count == 3
    torch.testing.assert_close(s.mean, torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(s.variance, torch.tensor([8 / 3, 8 / 3], dtype=torch.float64))


def test_griffin_scores_hand_case():
    z = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # rows normalise to [0.6, 0.8] and [0, 1]
    torch.testing.assert_close(griffin_scores(z), torch.tensor([0.6, (0.64 + 1.0) ** 0.5]))


def test_probe_selection_hand_case():
    residual = torch.zeros(4, 6, 2)
    residual[2, :, 0] = torch.tensor([1.0, 5.0, 2.0, 0.5, 4.0, 3.0])  # sample 2 has the largest norms
    residual[1, :, 0] = 0.1
    samples, tokens = probe_indices(residual, None, batch_ratio=0.05, token_ratio=0.5)
    assert samples.tolist() == [2]
    assert tokens.tolist() == [0, 1, 4]  # top 3 are 1, 4, 5; token 0 replaces the weakest (5)


def test_fused_importance_hand_case():
    p = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1.0, 2.0]])
    # channel 0: rho = 1/2 -> 1; channel 1: rho = 0 -> g = 2
    torch.testing.assert_close(fused_importance(p, g), torch.tensor([1.0, 2.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_bad_settings_and_names():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="available: .*flap.*griffin.*pop.*probe.*wanda_sp"):
        apply(model, "magic")
    with pytest.raises(ValueError, match="tokenizer"):
        apply(model, "flap", target=0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        apply(model, "wanda_sp", target=1.5, calib_stats=object())
    with pytest.raises(ValueError, match="layer by layer"):
        apply(model, "wanda_sp", target=0.2, calib_stats=object())
    with pytest.raises(ValueError, match="exactly one"):
        apply(model, "griffin")
    assert {"wanda_sp", "flap", "probe", "griffin", "pop", "static", "reselect"} <= set(METHODS)


def test_cannot_stack_methods():
    model = tiny_model("llama")
    stats = collect_windows(model, torch.randint(0, model.config.vocab_size, (2, 16)))
    handle = apply(model, "wanda_sp", target=0.4, calib_stats=stats, sequential=False)
    try:
        with pytest.raises(AlreadyModifiedError):
            apply(model, "pop", target=0.2)
    finally:
        handle.remove()
    assert all(isinstance(layer.ffn.module, nn.Module) for layer in describe(model).layers)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_wanda_sp_sequential_calibrates_on_pruned_outputs(arch):
    """Layer 1's mask must come from statistics of the model with layer 0 already pruned (FLAP repo)."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    view = describe(model)
    windows = torch.randint(0, model.config.vocab_size, (4, 20))
    masks = sequential_masks(model, view, windows, None, 0.5)
    dense_stats = collect_windows(model, windows)
    first = layer_mask(view.layers[0], dense_stats.attention[0], dense_stats.ffn[0], 0.5)
    assert torch.equal(masks[0].heads, first.heads) and torch.equal(masks[0].channels, first.channels)
    handle = apply_plan(model, masks_plan(view, [masks[0]] + [LayerMask() for _ in view.layers[1:]]))
    try:
        pruned_stats = collect_windows(model, windows, view=view)
    finally:
        handle.remove()
    second = layer_mask(view.layers[1], pruned_stats.attention[1], pruned_stats.ffn[1], 0.5)
    assert torch.equal(masks[1].heads, second.heads) and torch.equal(masks[1].channels, second.channels)
    with torch.no_grad():
        assert torch.equal(model(windows).logits, model(windows).logits)  # the model is left dense
    assert all(layer.ffn.module is layer.module.mlp for layer in view.layers)
