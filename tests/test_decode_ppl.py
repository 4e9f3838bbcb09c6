import math

import pytest
import torch
import torch.nn.functional as F

from lfmsift.eval.decode_ppl import decode_nll, decode_perplexity, decode_samples
from lfmsift.models.tiny import tiny_model
from lfmsift.prune import pruned


@pytest.mark.parametrize("arch,bos", [("llama", None), ("gemma3_text", 1)])
def test_dense_decode_nll_equals_one_parallel_pass(arch, bos):
    """Without pruning, stepping through the cache gives the same NLL as one teacher-forced pass."""
    model = tiny_model(arch)
    batch = torch.randint(3, 250, (3, 30))
    prompt_len = 10
    nll, n = decode_nll(model, batch, prompt_len, bos)
    inp = batch if bos is None else torch.cat([torch.full((3, 1), bos), batch], 1)
    off = 0 if bos is None else 1
    logits = model(inp).logits
    # predictions made after feeding t_P .. t_{P+N-1}, i.e. at positions P..P+N-1 (+1 with BOS)
    pred = logits[:, prompt_len + off : -1]
    ref = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), inp[:, prompt_len + off + 1 :].reshape(-1), reduction="sum")
    assert n == 3 * (30 - prompt_len - 1)
    assert nll == pytest.approx(ref.item(), rel=1e-5)


def test_samples_and_errors():
    ids = torch.arange(100)
    s = decode_samples(ids, 5, 4, 3)
    assert s.shape == (3, 10) and torch.equal(s.flatten(), torch.arange(30))
    with pytest.raises(ValueError, match="holds 10 samples"):
        decode_samples(ids, 5, 4, 11)
    with pytest.raises(ValueError, match=">= 1"):
        decode_samples(ids, 0, 4, 1)


class _Tok:
    bos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + (b % 250) for b in text.encode()]
        out = type("Enc", (), {})()
        out.input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return out


def test_decode_path_is_what_is_measured():
    """POP's decode perplexity differs from its static variant: the decode selection matters here."""
    model = tiny_model("llama")
    text = "".join(chr(97 + (i * 7) % 26) for i in range(2000))
    kw = dict(prompt_len=16, new_tokens=12, samples=4, batch_size=2, progress=False)
    dense = decode_perplexity(model, _Tok(), text, **kw)
    with pruned(model, "pop", ffn_ratio=0.4, gamma=0.2) as h:
        pop = decode_perplexity(model, _Tok(), text, **kw)
        assert h.stats()["total"]["decode_steps"] == 2 * 12
    with pruned(model, "static", ffn_ratio=0.4) as h:
        static = decode_perplexity(model, _Tok(), text, **kw)
    assert pop.tokens_scored == dense.tokens_scored == 4 * 12
    assert math.isfinite(pop.perplexity) and pop.perplexity != static.perplexity != dense.perplexity
