"""Fast greedy decoding: the static-cache decoder and the compiled decode layers give generate()'s tokens,
with the FFN (dense or POP) left out of the compiled graph."""

import pytest
import torch

from lfmsift.models.fast_decode import GraphDecoder, compile_decode_layers, decoder_layers
from lfmsift.models.tiny import tiny_model
from lfmsift.prune import pruned


def _ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


def _reference(model, ids, new):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoder_gives_generate_tokens_for_dense_and_pop(arch):
    model = tiny_model(arch)
    ids = _ids()
    decoder = GraphDecoder(model, max_cache_len=32, batch=2)
    assert torch.equal(decoder.generate(ids, 8), _reference(model, ids, 8))
    other = _ids(seed=1)[:, :5]  # a later, shorter prompt reuses the decoder
    assert torch.equal(decoder.generate(other, 6), _reference(model, other, 6))
    with pruned(model, "pop", ffn_ratio=0.4, gamma=0.1) as handle:
        assert torch.equal(decoder.generate(ids, 8), _reference(model, ids, 8))
        assert handle.stats()["total"]["decode_steps"] == 2 * 7  # ours, then generate's


def test_compiled_layers_leave_the_ffn_eager_and_keep_the_tokens():
    model = tiny_model("llama")
    ids = _ids()
    dense = _reference(model, ids, 7)
    with pruned(model, "pop", ffn_ratio=0.4, gamma=0.1):
        pop_ref = _reference(model, ids, 7)
    torch._dynamo.reset()
    with compile_decode_layers(model, backend="aot_eager"):
        decoder = GraphDecoder(model, max_cache_len=32, batch=2)
        assert torch.equal(decoder.generate(ids, 7), dense)
        with pruned(model, "pop", ffn_ratio=0.4, gamma=0.1) as pop:  # applied after compiling
            assert torch.equal(decoder.generate(ids, 7), pop_ref)
            # POP's Python counters advance at every step: its forward ran eagerly, outside the graph
            assert pop.stats()["total"]["decode_steps"] == 6
        assert all("forward" in layer.__dict__ for layer in decoder_layers(model))
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
    assert all("forward" not in layer.mlp.__dict__ for layer in decoder_layers(model))


def test_decoder_rejects_bad_input():
    model = tiny_model("llama")
    decoder = GraphDecoder(model, max_cache_len=16, batch=2)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.decode(3)
    with pytest.raises(ValueError, match="empty prompt"):
        decoder.prefill(torch.zeros((2, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(_ids(length=16))
    with pytest.raises(ValueError, match=r"\(2, tokens\)"):
        decoder.prefill(_ids(batch=1))
    decoder.prefill(_ids(length=10))
    with pytest.raises(ValueError, match="exceed"):
        decoder.decode(7)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, max_cache_len=16, cuda_graph=True)
    with pytest.raises(ValueError, match="prefill_graph=True needs cuda_graph"):
        GraphDecoder(model, max_cache_len=16, prefill_graph=True)
