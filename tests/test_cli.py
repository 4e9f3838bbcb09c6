"""The command line on the real SmolLM2-135M and real WikiText-2."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lfmsift.cli import app
from lfmsift.eval import load_text, perplexity

pytestmark = pytest.mark.real
runner = CliRunner()


def test_ppl_command_writes_json_matching_the_api(smollm2, data_dir, tmp_path):
    out = tmp_path / "ppl.json"
    res = runner.invoke(app, ["ppl", "--model", "smollm2-135m", "--data", "wikitext2", "--data-dir", str(data_dir),
                              "--seqlen", "256", "--windows", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text())
    assert record["windows"] == 3 and record["seqlen"] == 256 and record["tokens_scored"] == 3 * 255
    assert record["command"].startswith("lfmsift") or record["command"]
    assert record["environment"]["torch"] == torch.__version__
    model, tok = smollm2
    direct = perplexity(model, tok, load_text("wikitext2", data_dir), seqlen=256, windows=3, progress=False)
    assert record["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert 5 < direct.perplexity < 60  # a real 135M model on WikiText-2; random weights give ~49k


def test_generate_command_is_greedy_and_deterministic(smollm2, tmp_path):
    out = tmp_path / "gen.json"
    args = ["generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?",
            "--max-new-tokens", "8", "--json", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text())
    assert record["chat"] is True and [r["method"] for r in record["runs"]] == ["dense"]
    assert record["runs"][0]["new_tokens"] >= 1
    assert "Paris" in record["completion"] == record["runs"][0]["completion"]


def test_generate_rejects_empty_prompt():
    res = runner.invoke(app, ["generate", "--model", "smollm2-135m", "--prompt", "   "])
    assert res.exit_code == 2
    assert "prompt is empty" in res.output


def test_ppl_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LFMSIFT_DATA", raising=False)
    res = runner.invoke(app, ["ppl", "--data", "wikitext2", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "not found" in res.output and "wikitext2_test.txt" in res.output


def test_unsupported_model_cli(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    res = runner.invoke(app, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert res.exit_code == 2
    assert "not supported" in res.output and "llama" in res.output


def test_models_command(tmp_path):
    out = tmp_path / "models.json"
    res = runner.invoke(app, ["models", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "smollm2-135m" in res.output
    assert "olmoe" in json.loads(out.read_text())["supported_model_types"]


def test_eval_command_writes_json_table_and_figure(smollm2, data_dir, tmp_path):
    out = tmp_path / "cmp.json"
    args = ["eval", "--model", "smollm2-135m", "--methods", "dense,wanda_sp", "--targets", "0.2",
            "--tasks", "arc_easy", "--mc-limit", "2", "--calib-samples", "2", "--calib-seqlen", "64",
            "--data-dir", str(data_dir), "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [(r["method"], r["target"]) for r in doc["rows"]] == [("dense", 0.0), ("wanda_sp", 0.2)]
    assert doc["header"]["command"].startswith("lfmsift")
    assert "| wanda_sp | 20% |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_eval_unknown_method_names_the_known_ones(tmp_path):
    res = runner.invoke(app, ["eval", "--methods", "dense,sparsegpt", "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2
    assert "sparsegpt" in res.output and "wanda_sp" in res.output


def test_ppl_with_a_calibrated_baseline(smollm2, data_dir, tmp_path):
    out = tmp_path / "ppl.json"
    res = runner.invoke(app, ["ppl", "--model", "smollm2-135m", "--data-dir", str(data_dir), "--seqlen", "64",
                              "--windows", "1", "--prune", "flap", "--target", "0.2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "achieved_reduction" in res.output
    stats = json.loads(out.read_text())["prune_stats"]
    assert stats["method"] == "flap" and 0.1 < stats["achieved_reduction"] < 0.3


def test_vlm_fidelity_needs_a_vlm_and_a_video(smollm2, data_dir, tmp_path):
    result = runner.invoke(app, ["vlm-fidelity", "--model", "smollm2-135m", "--data-dir", str(data_dir),
                                 "--out", str(tmp_path / "f.json")])
    assert result.exit_code == 2 and "not a vision-language model" in result.output
    result = runner.invoke(app, ["vlm-fidelity", "--video", str(tmp_path / "missing.avi"), "--out", str(tmp_path / "f.json")])
    assert result.exit_code == 2 and "video file not found" in result.output
