"""Evaluation: data sets and metrics."""

from lfmsift.eval.data import (
    DATASETS,
    BlankQuestion,
    ChoiceQuestion,
    DataFormatError,
    DataNotFoundError,
    load_questions,
    load_text,
)
from lfmsift.eval.perplexity import PerplexityResult, perplexity

__all__ = [
    "DATASETS",
    "BlankQuestion",
    "ChoiceQuestion",
    "DataFormatError",
    "DataNotFoundError",
    "PerplexityResult",
    "load_questions",
    "load_text",
    "perplexity",
]
