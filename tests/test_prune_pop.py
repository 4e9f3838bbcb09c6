"""The POP FFN in models: exactness, the masking reference, fewer channels computed, safe apply/remove."""

import pytest
import torch

import lfmsift
from lfmsift.models import describe
from lfmsift.models.tiny import tiny_model
from lfmsift.prune import METHODS, apply, pruned
from lfmsift.prune.pop import POPFFN
from lfmsift.prune.scoring import channel_scores


def _ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "mistral", "qwen2"])
def test_ratio_zero_equals_dense(arch):
    model = tiny_model(arch)
    ids = _ids()
    dense_logits = model(ids).logits
    dense_gen = model.generate(ids, max_new_tokens=10, do_sample=False)
    with pruned(model, "pop", ffn_ratio=0.0, gamma=0.0):
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), dense_gen)


def _masking_reference(pop: POPFFN, x: torch.Tensor) -> torch.Tensor:
    """Dense FFN with every channel POP does not use zeroed (tests only: this is not how POP runs)."""
    ffn = pop.dense
    h = ffn.act_fn(ffn.gate_proj(x)) * ffn.up_proj(x)  # all channels
    part, s = pop.partition, pop.sizes
    cand = part.candidates
    scores = channel_scores(h[..., cand], pop.col_norms[cand])  # re-scored independently
    chosen = cand[torch.topk(scores, s.k_select).indices]
    used = torch.zeros(s.d_ff, dtype=torch.bool)
    used[part.retained] = True
    used[chosen] = True
    return ffn.down_proj(h * used)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_step_equals_masked_dense_reference(seed):
    torch.manual_seed(seed)
    model = tiny_model("llama", seed=seed)
    layer = describe(model).layers[1]
    pop = POPFFN(layer.ffn, ffn_ratio=0.3, delta=0.05)
    x_prompt = torch.randn(2, 9, layer.ffn.hidden_size)
    pop(x_prompt)  # prefill partitions
    for _ in range(4):
        x_t = torch.randn(2, 1, layer.ffn.hidden_size)
        torch.testing.assert_close(pop(x_t), _masking_reference(pop, x_t), rtol=1e-5, atol=1e-6)


def test_prefill_output_uses_the_top_channels():
    model = tiny_model("llama")
    layer = describe(model).layers[0]
    pop = POPFFN(layer.ffn, ffn_ratio=0.4, delta=0.05)
    x = torch.randn(1, 7, layer.ffn.hidden_size)
    out = pop(x)
    ffn = layer.ffn
    h = ffn.act_fn(ffn.gate_proj(x)) * ffn.up_proj(x)
    keep = torch.zeros(ffn.intermediate_size, dtype=torch.bool)
    keep[pop.partition.keep] = True
    torch.testing.assert_close(out, ffn.down_proj(h * keep), rtol=1e-5, atol=1e-6)
    assert keep.sum() == ffn.intermediate_size - round(0.4 * ffn.intermediate_size)


def _count_dense_calls(model):
    calls = {"n": 0}
    hooks = []
    for layer in describe(model).layers:
        for lin in (layer.ffn.gate_proj, layer.ffn.up_proj, layer.ffn.down_proj):
            hooks.append(lin.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)))
    return calls, hooks


@pytest.mark.parametrize("mode,computed", [("pop", "n_computed"), ("static", "n_keep")])
def test_decode_never_runs_the_full_projections(mode, computed):
    """Decode multiplies only the sliced weights: the dense gate/up/down Linear modules are not called."""
    model = tiny_model("llama")
    calls, hooks = _count_dense_calls(model)
    with pruned(model, mode, ffn_ratio=0.3, gamma=0.1) as handle:
        model.generate(_ids(), max_new_tokens=6, do_sample=False)
        for h in hooks:
            h.remove()
        n_layers = len(handle.replacements)
        assert calls["n"] == 2 * n_layers  # prefill: gate and up (full, to score); down always sliced
        for pop in handle.replacements:
            s = pop.sizes
            assert pop.w_gate_up.shape == (getattr(s, computed), 2, pop.hidden_size)
            assert pop.w_down_rows.shape[0] == getattr(s, computed)
            assert getattr(s, computed) < s.d_ff
        total = handle.stats()["total"]
        assert total["decode_steps"] == 5 and total["decode_tokens"] == 10
        assert total["channels_computed_per_decode_step"] == sum(getattr(p.sizes, computed) for p in handle.replacements)


def test_left_padding_is_excluded_from_scores():
    """Pads' content must not change the partition: same prompts padded with different tokens."""
    model = tiny_model("llama")
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    a, b = ids.clone(), ids.clone()
    a[0, :4], b[0, :4] = 0, 77
    orders = []
    for x in (a, b):
        with pruned(model, "pop", ffn_ratio=0.3) as handle:
            model(input_ids=x, attention_mask=mask)
            orders.append([p.partition.order.clone() for p in handle.replacements])
    for oa, ob in zip(*orders):
        assert torch.equal(oa, ob)


def test_batched_generate_with_left_padding_and_sampling_bf16():
    model = tiny_model("qwen3", dtype=torch.bfloat16)
    ids = _ids(3, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pruned(model, "pop", target=0.2) as handle:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20,
                             pad_token_id=0)
        assert out.shape == (3, 13)
        assert handle.stats()["total"]["decode_tokens"] == 3 * 4


def test_new_prompt_repartitions():
    model = tiny_model("llama")
    with pruned(model, "pop", ffn_ratio=0.3) as handle:
        model.generate(_ids(1, 10, seed=1), max_new_tokens=3, do_sample=False)
        first = handle.replacements[0].partition.order.clone()
        model.generate(_ids(1, 10, seed=2), max_new_tokens=3, do_sample=False)
        second = handle.replacements[0].partition.order
        assert handle.replacements[0].counters.prompts == 2
        assert not torch.equal(first, second)


def test_one_token_prompt_then_decode():
    """A prompt of one token is a prefill (the cache is empty), the next steps are decode steps."""
    model = tiny_model("llama")
    with pruned(model, "pop", ffn_ratio=0.3) as handle:
        model.generate(_ids(1, 1), max_new_tokens=4, do_sample=False)
        t = handle.stats()["total"]
        assert t["prefill_tokens"] == 1 and t["decode_steps"] == 3


def test_remove_restores_exactly():
    model = tiny_model("llama")
    originals = [layer.mlp for layer in model.model.layers]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    before = model(ids).logits
    handle = apply(model, "pop", target=0.2)
    assert all(isinstance(layer.mlp, POPFFN) for layer in model.model.layers)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    handle.remove()
    handle.remove()  # idempotent
    assert [layer.mlp for layer in model.model.layers] == originals
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert not model.model._forward_pre_hooks


def test_errors_leave_the_model_unchanged():
    model = tiny_model("llama")
    originals = [layer.mlp for layer in model.model.layers]
    with pytest.raises(ValueError, match="too large"):
        apply(model, "pop", ffn_ratio=0.02, gamma=0.1)
    with pytest.raises(ValueError, match="cannot be reached"):
        apply(model, "pop", target=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        apply(model, "pop", ffn_ratio=0.2, target=0.2)
    with pytest.raises(ValueError, match="available"):
        apply(model, "popp", target=0.2)
    with pytest.raises(TypeError, match="Bad settings"):
        apply(model, "pop", ratio=0.2)
    with pytest.raises(ValueError, match="'slices' or 'index'"):
        apply(model, "pop", target=0.2, weights="copies")
    assert [layer.mlp for layer in model.model.layers] == originals
    assert not model.model._forward_pre_hooks


def test_applying_twice_is_a_clear_error():
    from lfmsift.models.adapters import AlreadyModifiedError

    model = tiny_model("llama")
    with pruned(model, "pop", target=0.2):
        with pytest.raises(AlreadyModifiedError, match="remove"):
            apply(model, "static", target=0.2)


def test_unknown_weights_form_is_a_clear_error():
    layer = describe(tiny_model("llama")).layers[0]
    with pytest.raises(ValueError, match="'slices'.*'index'"):
        POPFFN(layer.ffn, ffn_ratio=0.3, weights="rows")


def test_empty_prompt_is_a_clear_error():
    layer = describe(tiny_model("llama")).layers[0]
    pop = POPFFN(layer.ffn, ffn_ratio=0.3)
    with pytest.raises(ValueError, match="non-empty prompt"):
        pop(torch.zeros(1, 0, layer.ffn.hidden_size))


def test_registry_names():
    assert {"pop", "static", "reselect"} <= set(METHODS)
    assert lfmsift.prune.apply is apply


def test_stats_shapes_and_overlap():
    model = tiny_model("llama")
    with pruned(model, "pop", ffn_ratio=0.3, gamma=0.1) as handle:
        model.generate(_ids(2, 12), max_new_tokens=6, do_sample=False)
        st = handle.stats()
    t = st["total"]
    assert st["method"] == "pop" and st["gamma"] == 0.1
    assert len(st["layers"]) == 2
    assert 0.5 <= t["decode_overlap_with_prefill"] <= 1.0
    assert t["decode_flops_vs_dense"] < 1 and t["prefill_flops_vs_dense"] < 1
    handle.reset_stats()
    assert handle.stats()["total"]["decode_steps"] == 0 and handle.stats()["total"]["decode_overlap_with_prefill"] is None
    layer = st["layers"][0]
    assert layer["retained"] + layer["candidates"] + layer["pruned"] == layer["d_ff"]
    assert layer["channels_used_per_decode_step"] == layer["d_ff"] - round(0.3 * layer["d_ff"])


def test_dependent_launch_is_off_off_cuda_and_a_bad_setting_is_a_clear_error(monkeypatch):
    from lfmsift.prune import triton_pop

    assert not triton_pop.dependent_launch(torch.device("cpu"))
    monkeypatch.setattr(triton_pop, "SLICED_DEPENDENT_LAUNCH", "sometimes")
    with pytest.raises(ValueError, match="'auto' or 'never'"):
        triton_pop.dependent_launch(torch.device("cpu"))
