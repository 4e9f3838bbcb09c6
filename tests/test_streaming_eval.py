"""The streaming evaluation of KV retrievers: task construction on real text, the full cache equal to the
plain model, tasks that separate a retriever that keeps the right tokens from one that does not, the
harness (resume, reports) and stream fidelity on a VLM with real frames."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lfmsift.eval import kv_eval
from lfmsift.eval.streaming_qa import (
    multikey_trials, needle_trials, paragraphs, recall_task, run_multikey, run_needle, run_recall,
)
from lfmsift.kv import StreamingLLM, get_retriever


@pytest.fixture(scope="module")
def wikitext(data_dir) -> str:
    return (data_dir / "text" / "wikitext2_test.txt").read_text()


def test_paragraphs_drop_headings():
    text = " = Title = \n Some text here . \n\n = = Section = = \n More text . \n"
    assert paragraphs(text) == ["Some text here .", "More text ."]


def test_recall_task_probes_lie_in_the_first_half(smollm2, wikitext):
    _, tok = smollm2
    task = recall_task(tok, wikitext, stream_tokens=1024, chunk_tokens=100, probes=2, prompt_tokens=16,
                       target_tokens=32)
    stream = [t for chunk in task.chunks for t in chunk]
    assert len(stream) == task.stream_tokens == 1024 and all(len(c) <= 100 for c in task.chunks)
    for probe in task.probes:
        assert len(probe.prompt) == 16 and len(probe.target) == 32
        assert probe.start + 48 <= 512
        assert stream[probe.start : probe.start + 48] == probe.prompt + probe.target  # seen in the stream
    with pytest.raises(ValueError, match="lower probes"):
        recall_task(tok, wikitext, stream_tokens=1024, probes=50)
    with pytest.raises(ValueError, match="too short"):
        recall_task(tok, wikitext, stream_tokens=64, probes=1)


def test_needle_is_planted_at_its_depth(smollm2, wikitext):
    _, tok = smollm2
    trials = needle_trials(tok, wikitext, lengths=[300], depths=[0.0, 0.5], seeds=[3], chunk_tokens=64)
    assert [t.depth for t in trials] == [0.0, 0.5] and trials[0].answer == trials[1].answer
    needle = tok(f"\nThe secret passcode is {trials[0].answer}. Remember it.\n", add_special_tokens=False)["input_ids"]
    for t in trials:
        ids = [x for c in t.chunks for x in c]
        assert len(ids) == 300
        at = int(t.depth * (300 - len(needle)))
        assert ids[at : at + len(needle)] == needle
    with pytest.raises(ValueError, match="depth"):
        needle_trials(tok, wikitext, [300], [1.5], [0])


@pytest.mark.real
def test_full_cache_recall_equals_the_plain_model(smollm2, wikitext):
    model, tok = smollm2
    task = recall_task(tok, wikitext, stream_tokens=512, chunk_tokens=128, probes=1, prompt_tokens=16,
                       target_tokens=24)
    full = run_recall(model, tok, get_retriever("full"), task)
    ids = [t for c in task.chunks for t in c] + task.probes[0].prompt + task.probes[0].target
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -25:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(task.probes[0].target))
    assert full["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert full["stats"]["frame_stage"]["retrieval_ratio"] == 1.0
    # a window that has long dropped the paragraph cannot copy it
    forgetful = run_recall(model, tok, StreamingLLM(sinks=4, window=64), task)
    assert forgetful["ppl"] > 1.5 * full["ppl"]
    assert forgetful["stats"]["text_stage"]["retrieval_ratio"] < 0.2


@pytest.mark.real
def test_needle_found_with_the_full_cache_and_lost_outside_the_window(smollm2, wikitext):
    model, tok = smollm2
    trials = needle_trials(tok, wikitext, lengths=[512], depths=[0.1], seeds=[0], chunk_tokens=128)
    assert run_needle(model, tok, get_retriever("full"), trials)["accuracy"] == 1.0
    lost = run_needle(model, tok, StreamingLLM(sinks=4, window=128), trials)
    assert lost["accuracy"] == 0.0 and lost["trials"][0]["answer"] not in lost["trials"][0]["generated"]


def test_multikey_facts_are_planted_in_order_at_their_depths(smollm2, wikitext):
    _, tok = smollm2
    trials = multikey_trials(tok, wikitext, length=600, keys=3, seeds=[0, 1], chunk_tokens=100)
    assert [t.facts for t in trials][0] != [t.facts for t in trials][1]
    for t in trials:
        ids = [x for c in t.chunks for x in c]
        assert len(ids) == 600 and [d for _, _, d in t.facts] == pytest.approx([0.05, 0.5, 0.95])
        found = []
        for key, value, _ in t.facts:
            fact = tok(f"\nThe special code for {key} is {value}.\n", add_special_tokens=False)["input_ids"]
            found.append(next(i for i in range(len(ids)) if ids[i : i + len(fact)] == fact))
        assert found == sorted(found) and found[0] < 60 and found[-1] > 480
    with pytest.raises(ValueError, match="keys"):
        multikey_trials(tok, wikitext, 600, keys=0, seeds=[0])


@pytest.mark.real
def test_multikey_found_with_the_full_cache_and_lost_outside_the_window(smollm2, wikitext):
    model, tok = smollm2
    trials = multikey_trials(tok, wikitext, length=512, keys=2, seeds=[0], chunk_tokens=128)
    full = run_multikey(model, tok, get_retriever("full"), trials)
    assert full["accuracy"] == 1.0 and len(full["items"]) == 2
    lost = run_multikey(model, tok, StreamingLLM(sinks=4, window=64), trials)
    early = next(r for r in lost["items"] if r["depth"] < 0.5)
    assert not early["success"]  # the fact near the start left the window


def test_paired_comparison_by_hand():
    def run(successes):
        return {"quality": {"items": [{"success": x} for x in successes]}}

    a = run([True] * 7 + [False] * 3)
    b = run([True, True, False, False, False, False, False, False, False, True])
    out = kv_eval.paired_comparison(a, b)
    # a alone: items 2-6 (5); b alone: item 9 (1); exact McNemar: 2 * P(X <= 1 | 6, 1/2) = 2 * 7 / 64
    assert (out["a"], out["b"], out["only_a"], out["only_b"]) == (7, 3, 5, 1)
    assert out["difference"] == pytest.approx(0.4) and out["mcnemar_p"] == pytest.approx(14 / 64)
    lo, hi = out["interval"]
    assert lo < 0.4 < hi and hi - lo == pytest.approx(2 * (1.96 * math.sqrt((0.6 - 0.16) / 10) + 0.1))
    with pytest.raises(ValueError, match="same items"):
        kv_eval.paired_comparison(a, run([True]))


def test_plan_orders_full_first_and_rejects_unknowns():
    runs = kv_eval.plan(["resv", "full"], ["recall"], sweep=True)
    assert runs[0] == ("full", {}, "recall") and runs[1] == ("resv", {"ratio": 0.3}, "recall")
    assert ("resv", {"ratio": 0.7}, "recall") in runs and len(runs) == 2 + len(kv_eval.SWEEPS["resv"])
    with pytest.raises(ValueError, match="unknown task"):
        kv_eval.plan(["full"], ["audio"], False)
    with pytest.raises(ValueError, match="known"):
        kv_eval.plan(["h2o"], ["recall"], False)


@pytest.mark.real
def test_harness_resumes_and_reports(smollm2, data_dir, tmp_path, monkeypatch):
    model, tok = smollm2
    out = tmp_path / "kv.json"
    config = kv_eval.KVEvalConfig(stream_tokens=512, chunk_tokens=128, probes=1, prompt_tokens=16, target_tokens=24)
    doc = kv_eval.run_kv_eval(model, tok, "smollm2-135m", ["full", "streamingllm"], ["recall"], out, config,
                              sweep=False, data_dir=data_dir, command="test")
    assert len(doc["runs"]) == 2 and json.loads(out.read_text())["runs"].keys() == doc["runs"].keys()
    run = doc["runs"]["recall|streamingllm|window=1024"]
    assert run["default"] and run["frame_ratio"] is not None and len(run["frame_layers"]) == 30

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("lfmsift.eval.streaming_qa.run_recall", boom)
    again = kv_eval.run_kv_eval(model, tok, "smollm2-135m", ["full", "streamingllm"], ["recall"], out, config,
                                sweep=False, data_dir=data_dir)
    assert again["runs"].keys() == doc["runs"].keys()
    with pytest.raises(ValueError, match="holds results"):
        kv_eval.run_kv_eval(model, tok, "other", ["full"], ["recall"], out, config, sweep=False)
    paths = kv_eval.write_reports(again, out)
    table = paths["table"].read_text()
    assert "| full | - |" in table and "streamingllm" in table and paths["figure"].exists()
    assert paths["heatmap"].exists()


@pytest.mark.real
def test_stream_fidelity_of_full_is_exact_on_real_frames(smollm2, data_dir):
    from lfmsift.eval.fidelity import stream_fidelity, stream_reference
    from lfmsift.models.vlm import smolvlm_from_text_model
    from lfmsift.stream.video import frames

    vlm, processor = smolvlm_from_text_model(*smollm2, vision={"image_size": 256})
    images = [f.image for f in frames(data_dir / "video" / "vtest.avi", fps=1, max_frames=4)]
    questions = ["What is happening?", "Where is it?"]
    ref = stream_reference(vlm, processor, images, questions, new_tokens=5)
    same = stream_fidelity(vlm, processor, get_retriever("full"), images, questions, ref)
    assert same["kl"] < 1e-8 and same["top1"] == 1.0 and same["tokens"] == sum(len(t) for t in ref.tokens)
    lossy = stream_fidelity(vlm, processor, StreamingLLM(sinks=0, window=8), images, questions, ref)
    assert lossy["kl"] > 1e-4 and lossy["stats"]["frame_stage"]["retrieval_ratio"] < 0.5
    with pytest.raises(ValueError, match="questions"):
        stream_fidelity(vlm, processor, get_retriever("full"), images, questions[:1], ref)


def test_paired_ppl_ratio_by_hand():
    def run(ppl):
        return {"quality": {"ppl": sum(ppl) / len(ppl), "per_probe_ppl": ppl}}

    out = kv_eval.paired_ppl_ratio(run([2.0, 8.0]), run([1.0, 2.0]))  # log ratios ln 2, ln 4
    assert out["probes"] == 2
    assert out["ratio"] == pytest.approx(2 ** 1.5)
    half = 12.706 / 2  # t(0.975, 1) * sd / sqrt(2), in units of ln 2: sd = ln 2 / sqrt(2)
    assert out["interval"][0] == pytest.approx(2 ** (1.5 - half))
    assert out["interval"][1] == pytest.approx(2 ** (1.5 + half))
    with pytest.raises(ValueError, match="per-probe"):
        kv_eval.paired_ppl_ratio(run([2.0]), run([1.0]))
