"""The evaluation harness: lm-eval-style multiple choice against hand-computed log-likelihoods, generation
agreement, name checks, resumable comparisons, the report, and the lm-eval adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lfmsift.eval import harness
from lfmsift.eval.agreement import compare, token_f1
from lfmsift.eval.data import DataFormatError, load_questions
from lfmsift.eval.harness import EvalSettings, check_names, run_comparison
from lfmsift.eval.multiple_choice import multiple_choice
from lfmsift.eval.report import figures, markdown_table

# ----------------------------------------------------------------------------------------------------
# A bigram "language model" over ASCII whose log-likelihoods can be written down by hand
# ----------------------------------------------------------------------------------------------------

VOCAB = 128
TABLE = torch.zeros(VOCAB, VOCAB)
TABLE[ord(" "), ord("c")] = 3.0  # after a space, "c" is likely
TABLE[ord("c"), ord("a")] = 5.0
TABLE[ord(" "), ord("d")] = 1.0
TABLE[ord("d"), ord("o")] = 4.0
TABLE[ord("o"), ord("g")] = 4.0


def log_p(prev: str, nxt: str) -> float:
    """log softmax(TABLE[prev])[next], written out."""
    row = TABLE[ord(prev)].tolist()
    return row[ord(nxt)] - math.log(sum(math.exp(v) for v in row))


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(TABLE.clone(), requires_grad=False)

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


class CharTokenizer:
    pad_token_id = 0
    eos_token_id = 0
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def __call__(self, text, **kwargs):
        return type("Enc", (), {"input_ids": self.encode(text)})()


@pytest.fixture
def two_questions(tmp_path):
    path = tmp_path / "hand.jsonl"
    rows = [
        {"id": "q1", "query": "a", "choices": ["ca", "x"], "label": 0},
        {"id": "q2", "query": "b", "choices": ["dog", "c"], "label": 0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_multiple_choice_equals_hand_computed_loglik(two_questions):
    result = multiple_choice(Bigram(), CharTokenizer(), load_questions(str(two_questions)), progress=False)
    q1, q2 = result.details
    # context "a", continuation " ca": p(" "|a) p(c|" ") p(a|c)
    assert q1.loglik[0] == pytest.approx(log_p("a", " ") + log_p(" ", "c") + log_p("c", "a"), abs=1e-5)
    assert q1.loglik[1] == pytest.approx(log_p("a", " ") + log_p(" ", "x"), abs=1e-5)
    dog = log_p("b", " ") + log_p(" ", "d") + log_p("d", "o") + log_p("o", "g")
    c = log_p("b", " ") + log_p(" ", "c")
    assert q2.loglik == pytest.approx([dog, c], abs=1e-5)
    # acc: q1 right ("ca"), q2 wrong (" c" is likelier in total); acc_norm divides by the choice's
    # characters: dog/3 > c/1, so q2 becomes right
    assert c > dog and dog / 3 > c / 1
    assert result.acc == 0.5 and result.acc_norm == 1.0


def test_winogrande_partial_scoring_hand_case(tmp_path):
    path = tmp_path / "wino.jsonl"
    path.write_text(json.dumps({"sentence": "x _ og", "options": ["d", "c"], "label": 0}) + "\n")
    result = multiple_choice(Bigram(), CharTokenizer(), load_questions(str(path)), progress=False)
    # contexts "x d" / "x c", the same continuation " og" scored after each
    rest = log_p(" ", "o") + log_p("o", "g")
    assert result.details[0].loglik == pytest.approx([log_p("d", " ") + rest, log_p("c", " ") + rest], abs=1e-5)
    assert result.acc == 1.0


def test_bad_question_file_names_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "label": 0}\n{"query": "q", "label": 1}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: missing field 'choices'"):
        load_questions(str(path))


def test_agreement_hand_case():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    cand = torch.tensor([[1, 2, 3, 4], [5, 9, 8, 7]])
    r = compare(cand, ref)
    assert r.exact_match == 0.5
    assert r.prefix == pytest.approx((4 + 1) / 8)
    assert r.token_f1 == pytest.approx((1.0 + token_f1([5, 9, 8, 7], [5, 6, 7, 8])) / 2)
    assert token_f1([5, 9, 8, 7], [5, 6, 7, 8]) == pytest.approx(0.75)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: dense, .*flap.*wanda_sp"):
        check_names(["dense", "sparsegpt"], ["wikitext2"])
    with pytest.raises(ValueError, match="known: wikitext2, .*arc_easy.*gen_agreement"):
        check_names(["dense"], ["hellaswag"])


@pytest.mark.real
def test_comparison_resumes_and_reports(smollm2, data_dir, tmp_path, monkeypatch):
    model, tok = smollm2
    settings = EvalSettings(mc_limit=2, ppl_seqlen=32, ppl_windows=1)
    out = tmp_path / "cmp.json"
    args = (model, tok, "smollm2-135m", ["dense", "pop", "griffin"], [0.2], ["wikitext2", "arc_easy"], settings, out)
    first = run_comparison(*args, data_dir=data_dir, progress=False)
    assert len(first.rows) == 6
    doc = json.loads(out.read_text())
    doc["rows"] = [r for r in doc["rows"] if not (r["method"] == "pop" and r["task"] == "arc_easy")]
    out.write_text(json.dumps(doc))

    calls = []
    real = harness._evaluate
    monkeypatch.setattr(harness, "_evaluate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    again = run_comparison(*args, data_dir=data_dir, progress=False)
    assert calls == ["arc_easy"] and len(again.rows) == 6
    # griffin's prefill is dense: one-pass perplexity equals the dense model's
    rows = {(r["method"], r["task"]): r["metrics"] for r in again.rows.values()}
    assert rows[("griffin", "wikitext2")]["perplexity"] == pytest.approx(rows[("dense", "wikitext2")]["perplexity"])
    assert rows[("pop", "wikitext2")]["perplexity"] != rows[("dense", "wikitext2")]["perplexity"]
    compute = {(r["method"], r["task"]): r.get("compute") for r in again.rows.values()}
    assert compute[("dense", "wikitext2")] is None  # what each online method computed, per task
    assert compute[("pop", "wikitext2")]["prefill_flops_vs_dense"] < 1 and compute[("pop", "wikitext2")]["decode_steps"] == 0

    doc = json.loads(out.read_text())
    table = markdown_table(doc)
    assert "| dense | 0% | 0% |" in table and "| pop | 20% | FFN" in table and "QA avg" in table
    assert figures(doc, tmp_path / "cmp.png").stat().st_size > 0


@pytest.mark.real
def test_lm_eval_adapter_matches_harness_on_local_task(smollm2, data_dir, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is installed by `make test` (lfmsift[lmeval])")
    from lm_eval.tasks import TaskManager

    from lfmsift.eval.lm_eval_adapter import LfmsiftLM
    from lfmsift.models import describe

    model, tok = smollm2
    questions = load_questions("arc_easy", data_dir, limit=3)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"query": q.query, "choices": list(q.choices), "label": q.label}) + "\n"
                             for q in questions))
    (tmp_path / "task.yaml").write_text(
        "task: lfmsift_local_arc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {qfile}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{query}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    tasks = TaskManager(include_path=str(tmp_path))
    for method, settings in (("dense", {}), ("flap", dict(target=0.2, calib_samples=2, calib_seqlen=64, data_dir=data_dir))):
        lm = LfmsiftLM(model, tok, method=method, batch_size=4, **settings)
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=["lfmsift_local_arc"], task_manager=tasks, log_samples=True)
            ours = multiple_choice(model, tok, questions, "arc_easy", progress=False)
        finally:
            lm.close()
        got = res["results"]["lfmsift_local_arc"]
        assert got["acc,none"] == pytest.approx(ours.acc) and got["acc_norm,none"] == pytest.approx(ours.acc_norm)
        samples = sorted(res["samples"]["lfmsift_local_arc"], key=lambda s: s["doc_id"])
        for s, d in zip(samples, ours.details):
            assert [r[0][0] for r in s["resps"]] == pytest.approx(d.loglik, abs=1e-4)
    describe(model)  # raises AlreadyModifiedError if close() left FLAP's modules in place
