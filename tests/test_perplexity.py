import math

import pytest
import torch
import torch.nn.functional as F

from lfmsift.eval.perplexity import make_windows, perplexity, tokenizer_adds_bos, window_nll
from lfmsift.models.tiny import tiny_model


class CharTokenizer:
    """A minimal tokenizer over bytes (ids 3..), with optional BOS, for exact protocol tests."""

    bos_token_id = 1

    def __init__(self, add_bos: bool):
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + (b % 250) for b in text.encode()]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids
        out = type("Enc", (), {})()
        out.input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return out


def _manual_ppl(model, windows, bos):
    nll, n = 0.0, 0
    for w in windows:
        seq = torch.cat([torch.tensor([bos]), w]) if bos is not None else w
        logits = model(input_ids=seq[None]).logits[0, :-1]
        nll += F.cross_entropy(logits, seq[1:], reduction="sum").item()
        n += len(seq) - 1
    return math.exp(nll / n), n


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(103)
    w = make_windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.flatten(), torch.arange(100))
    assert make_windows(ids, 10, windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(ids, 200)
    with pytest.raises(ValueError, match="seqlen"):
        make_windows(ids, 1)


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_matches_manual_computation(add_bos):
    model = tiny_model("llama")
    tok = CharTokenizer(add_bos)
    text = "the quick brown fox jumps over the lazy dog; " * 8
    res = perplexity(model, tok, text, seqlen=32, batch_size=3, progress=False)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    windows = ids[: (len(ids) // 32) * 32].view(-1, 32)
    expected, n = _manual_ppl(model, windows, 1 if add_bos else None)
    assert res.add_bos is add_bos
    assert res.windows == len(windows) == res.windows_available
    assert res.tokens_scored == n == len(windows) * (32 if add_bos else 31)
    assert res.perplexity == pytest.approx(expected, rel=1e-5)


def test_batch_size_does_not_change_the_result():
    model = tiny_model("gemma3_text")
    tok = CharTokenizer(True)
    text = "abcdefghij" * 40
    a = perplexity(model, tok, text, seqlen=40, batch_size=1, progress=False)
    b = perplexity(model, tok, text, seqlen=40, batch_size=4, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)


def test_uniform_model_has_vocab_perplexity():
    """A model whose logits are constant has perplexity = vocabulary size, exactly."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    nll, n = window_nll(model, torch.randint(3, 200, (2, 16)), None)
    assert math.exp(nll / n) == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_empty_text_and_bos_detection():
    with pytest.raises(ValueError, match="empty"):
        perplexity(tiny_model("llama"), CharTokenizer(False), "", progress=False)
    assert tokenizer_adds_bos(CharTokenizer(True)) and not tokenizer_adds_bos(CharTokenizer(False))
