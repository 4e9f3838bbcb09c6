"""POP inside routed experts: exactness per MoE layout, per-expert partitions, late partitions, accounting."""

import pytest
import torch

from lfmsift.models import describe
from lfmsift.models.adapters import AlreadyModifiedError
from lfmsift.models.tiny import tiny_model
from lfmsift.prune import apply, pruned
from lfmsift.prune.experts import POPExperts
from lfmsift.prune.pop import POPFFN, PromptContext

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_ratio_zero_equals_dense(arch):
    model = tiny_model(arch)
    ids = _ids()
    dense_logits = model(ids).logits
    dense_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    for mode in ("pop", "static", "reselect"):
        with pruned(model, mode, ffn_ratio=0.0, gamma=0.0) as handle:
            assert all(isinstance(r, POPExperts) for r in handle.replacements)
            torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), dense_gen)


def _experts(arch="mixtral", ratio=0.3, delta=0.1, mode="pop"):
    moe = describe(tiny_model(arch)).layers[0].ffn
    context = PromptContext(prompt_id=1)
    return moe, POPExperts(moe.experts, moe.top_k, ratio, delta, mode, context), context


def _masked_expert(moe, e, x, keep):
    """Expert e computed densely with every channel outside `keep` zeroed (tests only)."""
    inter = moe.experts.intermediate_size
    w = moe.experts.gate_up_proj[e]
    h = moe.experts.act_fn(x @ w[:inter].T) * (x @ w[inter:].T)
    mask = torch.zeros(inter)
    mask[keep] = 1
    return (h * mask) @ moe.experts.down_proj[e].T


def test_per_expert_partitions_from_routed_tokens_and_decode_reference():
    """Each expert partitions on the tokens routed to it; a decode step equals the masked dense reference."""
    moe, pop, _ = _experts()
    hidden = moe.experts.hidden_size
    x = torch.randn(10, hidden)
    index = torch.tensor([[0, 1]] * 5 + [[1, 2]] * 5)  # expert 3 sees no prompt token
    weights = torch.rand(10, 2)
    out = pop(x, index, weights)
    ref = torch.zeros_like(x)
    for e, toks in ((0, range(5)), (1, range(10)), (2, range(5, 10))):
        expert = pop.experts[e]
        fresh = POPFFN(expert._views, pop.ffn_ratio, expert.delta)  # partition from these tokens alone
        fresh(x[list(toks)].unsqueeze(0))
        assert torch.equal(expert.partition.order, fresh.partition.order)
        for t in toks:
            pos = (index[t] == e).nonzero().item()
            ref[t] += weights[t, pos] * _masked_expert(moe, e, x[t], expert.partition.keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert pop.experts[3].partition is None
    assert pop.counters.experts_partitioned_at_prefill == 3

    # decode: 2 tokens, one routed to 0 and 1, one to 1 and 3 (3's first use: partitioned from its token)
    x_t = torch.randn(2, hidden)
    index_t, weights_t = torch.tensor([[0, 1], [3, 1]]), torch.rand(2, 2)
    out_t = pop(x_t, index_t, weights_t)
    assert pop.counters.late_partitions == 1 and pop.experts[3].partition is not None
    ref_t = torch.zeros_like(x_t)
    for t in range(2):
        for pos in range(2):
            e = int(index_t[t, pos])
            expert = pop.experts[e]
            toks = (index_t == e).any(1).nonzero().flatten()
            if e == 3:
                keep = expert.partition.keep
            else:  # re-score the candidates on this step's tokens of expert e, keep the top k_select
                part, s = expert.partition, expert.sizes
                w = moe.experts.gate_up_proj[e]
                inter = moe.experts.intermediate_size
                xe = x_t[toks]
                h = moe.experts.act_fn(xe @ w[:inter].T) * (xe @ w[inter:].T)
                cand = part.candidates
                score = h[:, cand].norm(dim=0) * expert.col_norms[cand]
                keep = torch.cat([part.retained, cand[torch.topk(score, s.k_select).indices]])
            ref_t[t] += weights_t[t, pos] * _masked_expert(moe, e, x_t[t], keep)
    torch.testing.assert_close(out_t, ref_t, rtol=1e-5, atol=1e-6)


def test_experts_not_routed_are_not_computed_and_slices_are_smaller():
    moe, pop, context = _experts(ratio=0.4, delta=0.1)
    hidden, inter = moe.experts.hidden_size, moe.experts.intermediate_size
    pop(torch.randn(6, hidden), torch.tensor([[0, 1]] * 6), torch.ones(6, 2))
    calls = {e: 0 for e in range(4)}
    for e, expert in enumerate(pop.experts):
        expert.register_forward_pre_hook(lambda m, a, e=e: calls.__setitem__(e, calls[e] + 1))
    pop(torch.randn(1, hidden), torch.tensor([[1, 0]]), torch.ones(1, 2))
    assert calls == {0: 1, 1: 1, 2: 0, 3: 0}
    for e in (0, 1):
        s = pop.experts[e].sizes
        assert pop.experts[e].w_gate_up.shape == (s.n_computed, 2, hidden)
        assert s.n_computed == inter - round(0.3 * inter) < inter  # (r - delta) d_ff pruned
    stats = pop.stats()
    assert stats["decode_assignments"] == 2 and stats["decode_tokens"] == 1
    s = pop.sizes
    per_assignment = 2 * hidden * (2 * s.n_computed + s.n_keep) + 3 * s.n_computed + 2 * s.n_candidates
    assert stats["decode_flops"] == 2 * per_assignment
    assert stats["decode_flops_dense"] == 2 * (2 * hidden * 3 * inter + 3 * inter)
    assert stats["channels_computed_per_decode_step"] == moe.top_k * s.n_computed


def test_padding_only_expert_is_computed_densely_and_left_unpartitioned():
    moe, pop, context = _experts()
    hidden = moe.experts.hidden_size
    context.token_mask = torch.tensor([[0, 0, 1, 1, 1]])
    index = torch.tensor([[3, 2], [3, 2], [0, 1], [0, 2], [1, 2]])  # expert 3 only reached by pads
    x, w = torch.randn(5, hidden), torch.rand(5, 2)
    out = pop(x, index, w)
    assert pop.experts[3].partition is None and pop.counters.pad_only_experts == 1
    inter = moe.experts.intermediate_size
    torch.testing.assert_close(out[0], w[0, 0] * _masked_expert(moe, 3, x[0], torch.arange(inter))
                               + w[0, 1] * _masked_expert(moe, 2, x[0], pop.experts[2].partition.keep))


def test_router_and_shared_expert_untouched_unless_asked():
    model = tiny_model("qwen2_moe")
    block = model.model.layers[0].mlp
    router, shared, experts = block.gate, block.shared_expert, block.experts
    with pruned(model, "pop", target=0.2) as handle:
        assert block.gate is router and block.shared_expert is shared
        assert isinstance(block.experts, POPExperts)
        model.generate(_ids(1, 8), max_new_tokens=3, do_sample=False)
        assert handle.stats()["total"]["decode_steps"] == 2
    assert block.experts is experts
    with pruned(model, "pop", target=0.2, prune_shared_expert=True) as handle:
        assert isinstance(block.shared_expert, POPFFN) and block.gate is router
        model.generate(_ids(1, 8), max_new_tokens=3, do_sample=False)
        assert block.shared_expert.counters.decode_steps == 2
    assert block.shared_expert is shared


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_remove_restores_and_twice_is_an_error(arch):
    model = tiny_model(arch)
    ids = _ids()
    before = model(ids).logits
    with pruned(model, "pop", target=0.2) as handle:
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        stats = handle.stats()
        assert stats["layers_pruned"] == len(model.model.layers)
        assert 0 < stats["total"]["decode_flops_vs_dense"] < 1
        with pytest.raises(AlreadyModifiedError):
            apply(model, "static", target=0.2)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_batched_left_padded_generation_bf16():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    ids = _ids(3, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pruned(model, "pop", target=0.2) as handle:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 13)
        assert handle.stats()["total"]["decode_tokens"] == 3 * 4


# -- static baselines on routed experts ---------------------------------------------------------------


def _calib(model, samples=4, seqlen=16):
    from lfmsift.prune.calibration import collect_windows

    windows = torch.randint(3, 250, (samples, seqlen), generator=torch.Generator().manual_seed(5))
    return collect_windows(model, windows)


def test_calibration_collects_per_expert_statistics():
    model = tiny_model("qwen2_moe")
    stats = _calib(model)
    moe = describe(model).layers[0].ffn
    per_expert = stats.ffn[0]
    assert len(per_expert) == moe.experts.num_experts
    assert sum(s.count for s in per_expert) == 4 * 16 * moe.top_k  # every (token, expert) pair once
    # recompute expert 0's statistics by hand from the captured layer inputs
    captured = {}
    block = model.model.layers[0].mlp
    h = block.experts.register_forward_hook(lambda m, a, o: captured.update(a=a))
    windows = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(5))
    model.model(input_ids=windows, use_cache=False)
    h.remove()
    x, index, _ = captured["a"]
    tok = (index == 0).any(-1)
    inter = moe.experts.intermediate_size
    w = moe.experts.gate_up_proj[0]
    act = moe.experts.act_fn(x[tok] @ w[:inter].T) * (x[tok] @ w[inter:].T)
    torch.testing.assert_close(per_expert[0].total_sq.float(), act.square().sum(0), rtol=1e-5, atol=1e-6)
    assert per_expert[0].count == int(tok.sum())


def test_sliced_experts_equal_masked_fused_experts():
    from lfmsift.prune.structured import SlicedExperts

    moe = describe(tiny_model("olmoe")).layers[0].ffn
    e = moe.experts
    keep = [torch.arange(0, e.intermediate_size, 2), torch.arange(5), torch.arange(e.intermediate_size), torch.tensor([3])]
    bias = [None, torch.randn(e.hidden_size), None, None]
    sliced = SlicedExperts(e, keep, bias)
    x, index, weights = torch.randn(9, e.hidden_size), torch.randint(0, 4, (9, 2)), torch.rand(9, 2)
    ref = torch.zeros_like(x)
    inter = e.intermediate_size
    for t in range(9):
        for j in range(2):
            k = int(index[t, j])
            mask = torch.zeros(inter)
            mask[keep[k]] = 1
            h = e.act_fn(e.gate_up_proj[k, :inter] @ x[t]) * (e.gate_up_proj[k, inter:] @ x[t]) * mask
            y = e.down_proj[k] @ h + (bias[k] if bias[k] is not None else 0)
            ref[t] += weights[t, j] * y
    torch.testing.assert_close(sliced(x, index, weights), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_static_baselines_prune_each_expert(arch, method):
    from lfmsift.prune.structured import SlicedExperts

    model = tiny_model(arch)
    ids = _ids()
    before = model(ids).logits
    inter = describe(model).layers[0].ffn.experts.intermediate_size
    stats = _calib(model)
    settings = dict(target=0.25, calib_stats=stats)
    if method == "wanda_sp":
        settings["sequential"] = False
    with pruned(model, method, **settings) as handle:
        blocks = [layer.mlp for layer in model.model.layers]
        assert all(isinstance(b.experts, SlicedExperts) for b in blocks)
        kept = [c.numel() for b in blocks for c in b.experts.channels]
        if method == "wanda_sp":  # uniform: int(0.25 * I) channels of each expert go
            assert kept == [inter - int(0.25 * inter)] * len(kept)
        else:  # adaptive: counts differ, every expert keeps >= 1, and biases compensate
            assert min(kept) >= 1 and any(b is not None for blk in blocks for b in blk.experts.bias)
        info = handle.stats()
        assert 0.1 < info["achieved_reduction"] < 0.45
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 15)
        if arch == "qwen2_moe":  # router and shared expert are untouched
            assert type(blocks[0].shared_expert).__name__ == "Qwen2MoeMLP"
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_sequential_wanda_sp_on_moe_and_unsupported_baselines():
    model = tiny_model("mixtral")

    from lfmsift.prune.wanda_sp import sequential_masks

    view = describe(model)
    windows = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    masks = sequential_masks(model, view, windows, None, 0.25)
    assert all(len(m.experts) == 4 and m.channels is None for m in masks)
    for method in ("probe", "griffin"):
        with pytest.raises(TypeError, match="routed experts"):
            apply(model, method, target=0.2, calib_stats=_calib(model)) if method == "probe" else apply(model, method, target=0.2)
