import pytest
import torch

from lfmsift.models import SUPPORTED, UnsupportedModelError, describe, supported_model_types
from lfmsift.models.adapters import GatedFFN, MoEFFN
from lfmsift.models.tiny import TINY_CONFIGS, tiny_config, tiny_model


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_tiny_architecture_resolves(arch):
    model = tiny_model(arch)
    view = describe(model)
    spec = next(s for s in SUPPORTED if s.name == arch)
    assert view.arch is spec
    cfg = view.text_config
    assert len(view.layers) == cfg.num_hidden_layers
    for layer in view.layers:
        a = layer.attention
        assert a.q_proj.out_features == a.num_heads * a.head_dim
        assert a.k_proj.out_features == a.num_kv_heads * a.head_dim
        assert a.num_heads == cfg.num_attention_heads and a.num_kv_heads == cfg.num_key_value_heads
        assert getattr(layer.module, layer.ffn_attr) is layer.ffn.module
        if spec.moe:
            assert isinstance(layer.ffn, MoEFFN)
            e = layer.ffn.experts
            assert e.gate_up_proj.shape == (e.num_experts, 2 * e.intermediate_size, cfg.hidden_size)
            assert e.down_proj.shape == (e.num_experts, cfg.hidden_size, e.intermediate_size)
            assert layer.ffn.top_k == cfg.num_experts_per_tok
            assert (layer.ffn.shared_expert is not None) == (spec.shared_expert is not None)
        else:
            assert isinstance(layer.ffn, GatedFFN)
            assert layer.ffn.intermediate_size == cfg.intermediate_size
            assert layer.ffn.down_proj.in_features == cfg.intermediate_size
    # the view's rotary embedding is the one the model uses: same shape as the attention's head_dim
    cos, sin = view.rotary(0, torch.zeros(1, 3, cfg.hidden_size), torch.arange(3)[None])
    assert cos.shape[-1] == view.layers[0].attention.head_dim


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])
def test_gated_ffn_view_reproduces_module(arch):
    """The view's parts recompute the FFN exactly: the contract pruning code relies on."""
    view = describe(tiny_model(arch))
    ffn = view.layers[0].ffn
    x = torch.randn(2, 5, ffn.hidden_size)
    ref = ffn.module(x)
    mine = ffn.down_proj(ffn.act_fn(ffn.gate_proj(x)) * ffn.up_proj(x))
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_fused_expert_layout_reproduces_module(arch):
    """gate rows first, then up rows, in gate_up_proj; the experts module matches a hand computation."""
    view = describe(tiny_model(arch))
    moe = view.layers[0].ffn
    e = moe.experts
    x = torch.randn(7, e.hidden_size)
    top_k_index = torch.randint(0, e.num_experts, (7, moe.top_k))
    weights = torch.rand(7, moe.top_k)
    ref = e.module(x, top_k_index, weights)
    inter = e.intermediate_size
    mine = torch.zeros_like(x)
    for t in range(7):
        for j in range(moe.top_k):
            k = top_k_index[t, j]
            h = e.act_fn(e.gate_up_proj[k, :inter] @ x[t]) * (e.gate_up_proj[k, inter:] @ x[t])
            mine[t] += weights[t, j] * (e.down_proj[k] @ h)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_smolvlm_view_is_language_decoder():
    model = tiny_model("smolvlm")
    view = describe(model)
    assert view.language_model is model.model.text_model
    assert view.text_config.model_type == "llama"


def test_unsupported_model_error_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as info:
        describe(model)
    msg = str(info.value)
    assert "gpt2" in msg
    for t in supported_model_types():
        assert t in msg


def test_load_rejects_unsupported_directory_before_weights(tmp_path):
    from transformers import GPT2Config

    import lfmsift

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        lfmsift.load(str(tmp_path))


def test_load_missing_model_is_clear():
    import lfmsift
    from lfmsift.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a named model"):
        lfmsift.load("/nonexistent/dir/of/a/model")


def test_tiny_config_unknown():
    with pytest.raises(ValueError, match="available"):
        tiny_config("gpt2")


def test_load_local_directory_roundtrip(tmp_path):
    """A local HF directory (here a tiny Qwen3 and a word-level tokenizer) loads by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import lfmsift

    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    ids = torch.tensor([[3, 3, 0]])
    loaded, tokenizer = lfmsift.load(str(tmp_path))
    assert tokenizer("a").input_ids == [3]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    half, _ = lfmsift.load(str(tmp_path), dtype="bf16")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half(ids).logits.float(), model(ids).logits, rtol=0.05, atol=0.02)
