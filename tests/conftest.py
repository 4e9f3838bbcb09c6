"""Shared fixtures. Data comes from ../shared/data (or $LFMSIFT_DATA); the hub is never used in tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("LFMSIFT_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _shared_data()
    if not (d / "text" / "wikitext2_test.txt").is_file():
        pytest.fail(f"Evaluation data not found at {d}; set LFMSIFT_DATA or place ../shared/data beside the repo")
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted from its PyPI GGUF into the cache on first use)."""
    import lfmsift

    return lfmsift.load("smollm2-135m")
