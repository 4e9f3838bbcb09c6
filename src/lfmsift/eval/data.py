"""Evaluation sets: plain text for perplexity, JSONL for multiple choice.

Sets are read from a data directory laid out like ``../shared/data`` (``text/*.txt``, ``qa/*.jsonl``): the
directory given explicitly (``--data-dir``), else ``$LFMSIFT_DATA``. When neither has the file, the
Hugging Face hub is tried (needs ``pip install lfmsift[hub]`` and network access). If all fail, a
`DataNotFoundError` says which files were looked for where, and how to provide them. Any existing file
path is also accepted in place of a set name.

Formats:
- text: UTF-8 text, read with universal newlines (the WikiText-2 file is the test split joined as
  ``"\\n\\n".join(test["text"])``, the SparseGPT / Wanda protocol).
- multiple choice: one JSON object a line, ``{"id", "task", "query", "choices": [...], "label": int}``;
- WinoGrande style: ``{"id", "task", "sentence" (one "_" blank), "options": [a, b], "label": int}``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "LFMSIFT_DATA"


@dataclass(frozen=True)
class HubSource:
    """Where a set lives on the Hugging Face hub (used only when no local file is found)."""

    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class DataSet:
    name: str
    kind: str  # "text" | "choice" | "blank"
    relpath: str
    hub: HubSource | None = None


DATASETS: dict[str, DataSet] = {
    d.name: d
    for d in (
        DataSet("wikitext2", "text", "text/wikitext2_test.txt", HubSource("wikitext", "wikitext-2-raw-v1", "test")),
        DataSet("ptb", "text", "text/ptb_valid.txt", HubSource("ptb_text_only", "penn_treebank", "validation")),
        DataSet("arc_easy", "choice", "qa/arc_easy_test.jsonl", HubSource("allenai/ai2_arc", "ARC-Easy", "test")),
        DataSet(
            "arc_challenge", "choice", "qa/arc_challenge_test.jsonl",
            HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
        ),
        DataSet("openbookqa", "choice", "qa/openbookqa_test.jsonl", HubSource("allenai/openbookqa", "main", "test")),
        DataSet("piqa", "choice", "qa/piqa_valid.jsonl", HubSource("ybisk/piqa", None, "validation")),
        DataSet(
            "winogrande", "blank", "qa/winogrande_dev.jsonl",
            HubSource("allenai/winogrande", "winogrande_xl", "validation"),
        ),
    )
}


class DataNotFoundError(FileNotFoundError):
    """An evaluation set is neither in the data directory nor obtainable from the hub."""


class DataFormatError(ValueError):
    """An evaluation file exists but is malformed."""


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice question scored by the log-likelihood of each choice after the query."""

    id: str
    task: str
    query: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class BlankQuestion:
    """A WinoGrande-style question: a sentence with one "_" blank and options to fill it.

    Scored by partial evaluation: the context up to the blank with each option, then the log-likelihood
    of the rest of the sentence.
    """

    id: str
    task: str
    sentence: str
    options: tuple[str, ...]
    label: int

    def split(self) -> tuple[str, str]:
        """(text before the blank, text after it)."""
        before, _, after = self.sentence.partition("_")
        return before, after


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched, in order: the explicit one, then ``$LFMSIFT_DATA``."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    return dirs


def _find_local(dataset: DataSet, data_dir) -> Path | None:
    for d in data_dirs(data_dir):
        for candidate in (d / dataset.relpath, d / Path(dataset.relpath).name):
            if candidate.is_file():
                return candidate
    return None


def _not_found(what: str, dataset: DataSet | None, data_dir, hub_error: str | None) -> DataNotFoundError:
    dirs = data_dirs(data_dir)
    looked = ", ".join(str(d) for d in dirs) if dirs else f"no data directory given (--data-dir or ${ENV_VAR})"
    lines = [f"Evaluation data {what!r} not found."]
    if dataset is not None:
        lines.append(f"Looked for {dataset.relpath} in: {looked}.")
        if hub_error:
            lines.append(f"Hugging Face hub fallback failed: {hub_error}")
    else:
        lines.append(f"It is neither a file nor a known set ({', '.join(DATASETS)}).")
    lines.append(
        f"Pass --data-dir (or set ${ENV_VAR}) to a directory laid out like ../shared/data "
        "(text/*.txt, qa/*.jsonl), or install lfmsift[hub] where the hub is reachable."
    )
    return DataNotFoundError(" ".join(lines))


def _resolve(name_or_path: str, data_dir) -> tuple[DataSet | None, Path | None]:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return None, path
    dataset = DATASETS.get(name_or_path)
    if dataset is None:
        raise _not_found(name_or_path, None, data_dir, None)
    return dataset, _find_local(dataset, data_dir)


def _load_hub(dataset: DataSet):
    """The hub split as a `datasets.Dataset`, or raise with a short reason."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        raise RuntimeError("hub access is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        import datasets
    except ImportError:
        raise RuntimeError("the 'datasets' package is not installed (pip install lfmsift[hub])") from None
    h = dataset.hub
    return datasets.load_dataset(h.path, h.name, split=h.split)


def _hub_or_error(dataset: DataSet, data_dir):
    if dataset.hub is None:
        raise _not_found(dataset.name, dataset, data_dir, "no hub source is known for this set")
    try:
        rows = _load_hub(dataset)
    except Exception as exc:  # network, auth, missing package: all mean "not available"
        raise _not_found(dataset.name, dataset, data_dir, f"{type(exc).__name__}: {exc}") from exc
    logger.info("Loaded %s from the Hugging Face hub (%s)", dataset.name, dataset.hub.path)
    return rows


def load_text(name_or_path: str, data_dir: str | os.PathLike | None = None) -> str:
    """The text of a set (``wikitext2``, ``ptb``) or of any text file."""
    dataset, path = _resolve(name_or_path, data_dir)
    if path is not None:
        text = path.read_text(encoding="utf-8")
    else:
        if dataset.kind != "text":
            raise ValueError(f"{dataset.name!r} is a {dataset.kind} set, not text")
        rows = _hub_or_error(dataset, data_dir)
        column = "text" if "text" in rows.column_names else "sentence"
        text = "\n\n".join(rows[column])
    if not text.strip():
        raise DataFormatError(f"{path or name_or_path} is empty")
    return text


def _hub_questions(dataset: DataSet, rows) -> list[dict]:
    """Convert hub rows to the local JSONL schema."""
    out = []
    for i, r in enumerate(rows):
        if dataset.name.startswith("arc"):
            labels = list(r["choices"]["label"])
            out.append(dict(query=r["question"], choices=list(r["choices"]["text"]), label=labels.index(r["answerKey"])))
        elif dataset.name == "openbookqa":
            labels = list(r["choices"]["label"])
            out.append(
                dict(query=r["question_stem"], choices=list(r["choices"]["text"]), label=labels.index(r["answerKey"]))
            )
        elif dataset.name == "piqa":
            out.append(dict(query=r["goal"], choices=[r["sol1"], r["sol2"]], label=int(r["label"])))
        elif dataset.name == "winogrande":
            out.append(dict(sentence=r["sentence"], options=[r["option1"], r["option2"]], label=int(r["answer"]) - 1))
        out[-1].update(id=f"{dataset.name}-{i}", task=dataset.name)
    return out


def _parse_question(obj: dict, where: str, default_task: str) -> ChoiceQuestion | BlankQuestion:
    try:
        if "sentence" in obj:
            options = tuple(str(o) for o in obj["options"])
            q = BlankQuestion(
                str(obj.get("id", where)), str(obj.get("task", default_task)), str(obj["sentence"]), options,
                int(obj["label"]),
            )
            if q.sentence.count("_") != 1:
                raise DataFormatError(f"{where}: the sentence must contain exactly one '_' blank")
            n = len(options)
        else:
            choices = tuple(str(c) for c in obj["choices"])
            q = ChoiceQuestion(
                str(obj.get("id", where)), str(obj.get("task", default_task)), str(obj["query"]), choices,
                int(obj["label"]),
            )
            n = len(choices)
    except KeyError as exc:
        raise DataFormatError(
            f"{where}: missing field {exc}; expected query/choices/label or sentence/options/label"
        ) from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{where}: {exc}") from None
    if n < 2 or not 0 <= q.label < n:
        raise DataFormatError(f"{where}: needs at least 2 choices and a label in [0, {n}); got {n} and {q.label}")
    return q


def load_questions(
    name_or_path: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[ChoiceQuestion | BlankQuestion]:
    """Multiple-choice questions of a set (``arc_easy``, ``arc_challenge``, ``openbookqa``, ``piqa``,
    ``winogrande``) or of any JSONL file in either schema. ``limit`` keeps the first N."""
    dataset, path = _resolve(name_or_path, data_dir)
    if path is not None:
        objs, wheres = [], []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    objs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                wheres.append(f"{path}:{lineno}")
                if limit is not None and len(objs) >= limit:
                    break
        task = dataset.name if dataset else path.stem
    else:
        if dataset.kind == "text":
            raise ValueError(f"{dataset.name!r} is a text set, not multiple choice")
        objs = _hub_questions(dataset, _hub_or_error(dataset, data_dir))[:limit]
        wheres = [f"{dataset.name}[{i}]" for i in range(len(objs))]
        task = dataset.name
    questions = [_parse_question(o, w, task) for o, w in zip(objs, wheres)]
    if not questions:
        raise DataFormatError(f"{path or name_or_path} has no questions")
    return questions
