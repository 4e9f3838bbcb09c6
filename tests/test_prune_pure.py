"""Pure functions of POP: scores, partition sizes and order, ratio checks, the Table 8 conversion."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

from lfmsift.models import describe
from lfmsift.prune.budget import ffn_ratio_for_target, layer_ffn_ratio
from lfmsift.prune.partition import check_ratio, partition, select_top
from lfmsift.prune.scoring import activation_norms, channel_scores, down_column_norms, gated_activation


@pytest.mark.parametrize("d_ff,r,delta", [(1536, 0.2485, 0.05), (200, 0.3, 0.05), (11008, 0.299, 0.05), (64, 0.0, 0.0)])
def test_partition_sizes_follow_the_quantile_rule(d_ff, r, delta):
    torch.manual_seed(0)
    scores = torch.rand(d_ff)
    p = partition(scores, r, delta)
    s = p.sizes
    assert s.n_retained == d_ff - round((r + delta) * d_ff)
    assert s.n_computed == d_ff - round((r - delta) * d_ff)
    assert s.n_keep == d_ff - round(r * d_ff)
    assert s.k_select == s.n_keep - s.n_retained
    assert len(p.retained) + len(p.candidates) + len(p.pruned) == d_ff
    assert sorted(torch.cat([p.retained, p.candidates, p.pruned]).tolist()) == list(range(d_ff))
    # quantile semantics (nearest rank, no ties): R = {I >= q_{r+delta}}, P = {I <= q_{r-delta}}
    asc = scores.sort().values
    n_p = round((r - delta) * d_ff)
    n_r_up = round((r + delta) * d_ff)
    if n_r_up < d_ff:
        assert set(p.retained.tolist()) == set(torch.nonzero(scores >= asc[n_r_up]).flatten().tolist())
    if n_p > 0:
        assert set(p.pruned.tolist()) == set(torch.nonzero(scores <= asc[n_p - 1]).flatten().tolist())
    if len(p.candidates) and len(p.retained):
        assert scores[p.retained].min() >= scores[p.candidates].max()
    assert torch.equal(p.keep, p.order[: s.n_keep])


@pytest.mark.parametrize(
    "r,gamma,match",
    [(1.0, 0.1, r"\[0, 1\)"), (-0.1, 0.0, r"\[0, 1\)"), (0.02, 0.1, "too large"), (0.97, 0.1, "too large"),
     (0.3, -0.1, ">= 0")],
)
def test_bad_ratios_are_clear_errors(r, gamma, match):
    with pytest.raises(ValueError, match=match):
        check_ratio(r, gamma / 2)


def test_scores_exclude_padding():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 7)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = torch.cat([h[0, 2:], h[1]]).norm(dim=0)
    torch.testing.assert_close(activation_norms(h, mask), expected)
    w_down = torch.randn(4, 7)
    torch.testing.assert_close(channel_scores(h, down_column_norms(w_down), mask), expected * w_down.norm(dim=0))


def test_gated_activation_and_select_top():
    torch.manual_seed(0)
    x, wg, wu = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 8)
    ref = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    torch.testing.assert_close(gated_activation(x, torch.cat([wg, wu]), torch.nn.functional.silu), ref)
    assert select_top(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    assert select_top(torch.tensor([0.1]), 0).numel() == 0


def _one_layer(config):
    config.num_hidden_layers = 1
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "name,config,at20,at40",
    [
        ("Llama-2-7B", LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                   num_key_value_heads=32), 29.9, 59.8),
        ("Llama-3.1-8B", LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8), 24.8, 49.5),
        ("Qwen3-8B", Qwen3Config(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128), 25.6, 51.1),
        # MoE: only the activated routed experts count (top_k x one expert; shared expert excluded).
        ("Qwen1.5-MoE-A2.7B", Qwen2MoeConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                                             num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                             shared_expert_intermediate_size=5632), 29.7, 59.4),
        ("Qwen2-57B-A14B", Qwen2MoeConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                          num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                                          shared_expert_intermediate_size=20480), 22.7, 45.3),
        ("Qwen3-30B-A3B", Qwen3MoeConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                                         head_dim=128, num_experts=128, num_experts_per_tok=8,
                                         moe_intermediate_size=768), 30.0, 60.0),
    ],
)
def test_target_conversion_reproduces_table8(name, config, at20, at40):
    layer = describe(_one_layer(config)).layers[0]
    assert round(100 * layer_ffn_ratio(layer, 0.2), 1) == at20, name
    assert round(100 * layer_ffn_ratio(layer, 0.4), 1) == at40, name


def test_unreachable_target():
    with pytest.raises(ValueError, match="cannot be reached"):
        ffn_ratio_for_target(0.8, attention_weights=1, ffn_weights=1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ffn_ratio_for_target(1.0, 1, 1)
