"""POP on the real SmolLM2-135M: exactness at ratio 0, the FLOPs overhead, and the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lfmsift.cli import app
from lfmsift.prune import pruned

pytestmark = pytest.mark.real
PROMPT = "The history of the printing press begins in"


def test_target_zero_equals_dense_on_smollm2(smollm2):
    model, tok = smollm2
    enc = tok([PROMPT, "Photosynthesis converts light into"], return_tensors="pt", padding=True, padding_side="left")
    gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        dense_logits = model(**enc).logits
        dense = model.generate(**enc, **gen)
        with pruned(model, "pop", target=0.0, gamma=0.0) as handle:
            # channels are summed in prefill-rank order, so float sums differ in the last bits
            torch.testing.assert_close(model(**enc).logits, dense_logits, rtol=1e-4, atol=2e-3)
            assert torch.equal(model.generate(**enc, **gen), dense)
            assert handle.stats()["total"]["decode_flops_vs_dense"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("target", [0.2, 0.4])
def test_decode_overhead_over_static_is_small(smollm2, target):
    model, tok = smollm2
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad(), pruned(model, "pop", target=target, gamma=0.1) as handle:
        model.generate(**enc, max_new_tokens=8, do_sample=False)
        st = handle.stats()
    t = st["total"]
    assert 0 < t["decode_extra_flops_vs_static"] < 0.05  # the paper reports 2.85% / 3.48%
    assert t["channels_computed_per_decode_step"] < t["d_ff"]
    r = st["ffn_ratio"]
    assert t["decode_flops_vs_dense"] == pytest.approx(1 - r + t["decode_extra_flops_vs_static"], abs=0.01)


def test_generate_cli_compares_with_dense(smollm2, tmp_path):
    out = tmp_path / "gen.json"
    res = CliRunner().invoke(app, ["generate", "--prompt", "Name a primary color.", "--prune", "pop", "--target",
                                   "0.2", "--compare", "--max-new-tokens", "6", "--json", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["runs"]] == ["dense", "pop"]
    assert record["runs"][1]["stats"]["total"]["decode_steps"] >= 1
    assert "decode extra FLOPs vs static mask" in res.output


def test_generate_cli_bad_ratio_is_clear(smollm2):
    res = CliRunner().invoke(app, ["generate", "--prompt", "hi", "--prune", "pop", "--ffn-ratio", "0.02"])
    assert res.exit_code == 2 and "too large" in res.output


def test_decode_ppl_cli(smollm2, data_dir, tmp_path):
    out = tmp_path / "dppl.json"
    res = CliRunner().invoke(app, ["decode-ppl", "--data-dir", str(data_dir), "--methods", "dense,pop,static",
                                   "--targets", "0.4", "--samples", "2", "--prompt-len", "32", "--new-tokens", "8",
                                   "--batch-size", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["target"]) for r in rows] == [("dense", None), ("pop", 0.4), ("static", 0.4)]
    assert all(r["tokens_scored"] == 16 for r in rows)
    assert rows[0]["perplexity"] < rows[2]["perplexity"]  # pruning 40% of the model costs quality
