"""Machine-readable results: every measuring command writes JSON with the environment that produced it."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Versions and device, so a result can be traced to what produced it."""
    import transformers

    from lfmsift import __version__

    env = {
        "lfmsift": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def write_json(path: str | Path, payload: dict[str, Any], command: list[str] | None = None) -> Path:
    """Write `payload` plus the command line, UTC time and environment to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = command if command is not None else sys.argv
    record = {
        "command": " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]]) if argv else None,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        **payload,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `path` (parents created) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
