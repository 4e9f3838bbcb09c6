import json

import pytest

from lfmsift.eval.data import (
    DATASETS,
    BlankQuestion,
    ChoiceQuestion,
    DataFormatError,
    DataNotFoundError,
    load_questions,
    load_text,
)


def test_wikitext2_is_the_joined_test_split(data_dir):
    text = load_text("wikitext2", data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert "\r" not in text  # universal newlines: the file's CRLF reads as the split's "\n"
    assert len(text) > 1_200_000


def test_env_var_directory(data_dir, monkeypatch):
    monkeypatch.setenv("LFMSIFT_DATA", str(data_dir))
    assert load_text("ptb").startswith(" consumers may want to move")


@pytest.mark.parametrize(
    "name,count,n_choices",
    [("arc_easy", 2376, None), ("arc_challenge", 1172, None), ("openbookqa", 500, 4), ("piqa", 1838, 2)],
)
def test_multiple_choice_sets(data_dir, name, count, n_choices):
    qs = load_questions(name, data_dir)
    assert len(qs) == count
    assert all(isinstance(q, ChoiceQuestion) and q.task == name for q in qs)
    assert all(0 <= q.label < len(q.choices) for q in qs)
    if n_choices:
        assert {len(q.choices) for q in qs} == {n_choices}
    assert len(load_questions(name, data_dir, limit=5)) == 5


def test_winogrande_style_file(tmp_path):
    path = tmp_path / "wino.jsonl"
    rows = [
        {"id": "w0", "task": "wino", "sentence": "The trophy didn't fit in the case because the _ was too big.",
         "options": ["trophy", "case"], "label": 0},
        {"id": "w1", "task": "wino", "sentence": "Sam thanked Ann because _ had helped.", "options": ["Sam", "Ann"],
         "label": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qs = load_questions(str(path))
    assert all(isinstance(q, BlankQuestion) for q in qs)
    assert qs[0].split() == ("The trophy didn't fit in the case because the ", " was too big.")
    assert qs[1].label == 1


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LFMSIFT_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as info:
        load_text("wikitext2", tmp_path)
    msg = str(info.value)
    assert "text/wikitext2_test.txt" in msg and str(tmp_path) in msg and "--data-dir" in msg
    assert "hub" in msg
    with pytest.raises(DataNotFoundError, match="no data directory given"):
        load_questions("arc_easy")


def test_unknown_set_name(tmp_path):
    with pytest.raises(DataNotFoundError, match="neither a file nor a known set"):
        load_text("wikitext103", tmp_path)


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", "not valid JSON"),
        ('{"query": "q", "label": 0}', "missing field"),
        ('{"query": "q", "choices": ["a"], "label": 0}', "at least 2 choices"),
        ('{"query": "q", "choices": ["a", "b"], "label": 5}', "label in"),
        ('{"sentence": "no blank", "options": ["a", "b"], "label": 0}', "blank"),
    ],
)
def test_malformed_jsonl(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataFormatError, match=match):
        load_questions(str(path))


def test_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(DataFormatError, match="empty"):
        load_text(str(path))


def test_registry_paths_match_shared_layout(data_dir):
    for ds in DATASETS.values():
        if ds.name != "winogrande":  # not shipped in ../shared/data
            assert (data_dir / ds.relpath).is_file(), ds.relpath
