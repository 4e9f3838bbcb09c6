"""Retrieval traces from real runs, as simulator inputs.

``lfmsift stream --json PATH`` (and any ``StreamingSession.stats()``) records, per stage, the fraction of
the cache each layer and KV head retrieved, the clusters' mean size and, with the bucketed WiCSum, the
fraction of each score row the early exit visited. A ``Trace`` turns those into what the simulator takes
in place of the paper's numbers: the frame- and text-stage ratios (taken as they are, not scaled per cache
length), the tokens per cluster (how long the KVMU's runs are) and the WTU's buckets visited per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from lfmsift.hw.sim import Calibration, Scenario


@dataclass(frozen=True)
class Trace:
    """Measured retrieval statistics of one run."""

    source: str
    retriever: str
    tokens: int
    frame_ratio: float | None
    text_ratio: float | None
    tokens_per_cluster: float | None = None
    visited_fraction: float | None = None
    layer_frame_ratios: tuple[float, ...] = ()

    def scenario(self, scenario: Scenario) -> Scenario:
        """``scenario`` with this trace's ratios."""
        return replace(scenario, frame_ratio=self.frame_ratio, text_ratio=self.text_ratio)

    def calibration(self, calib: Calibration) -> Calibration:
        """``calib`` with this trace's cluster size and early-exit depth where it measured them."""
        changes = {}
        if self.tokens_per_cluster:
            changes["tokens_per_cluster"] = self.tokens_per_cluster
        if self.visited_fraction is not None:
            changes["wtu_buckets_visited"] = max(1.0, self.visited_fraction * calib.wtu_buckets)
        return replace(calib, **changes)


def _positive(value) -> float | None:
    return float(value) if value else None


def trace_from_stats(stats: dict, source: str = "stats") -> Trace:
    """A trace from ``StreamingSession.stats()`` (or the ``stats`` of a ``lfmsift stream`` JSON)."""
    if "frame_stage" not in stats:
        raise ValueError(f"{source}: no retrieval statistics (expected 'frame_stage' / 'text_stage' from a "
                         "streaming run, e.g. `lfmsift stream ... --json PATH`)")
    frame, text = stats.get("frame_stage") or {}, stats.get("text_stage") or {}
    layers = frame.get("layers") or {}
    visited = [v["visited_fraction"] for v in layers.values() if "visited_fraction" in v]
    return Trace(
        source=source,
        retriever=(stats.get("retriever") or {}).get("name", "?"),
        tokens=int(stats.get("tokens", 0)),
        frame_ratio=_positive(frame.get("retrieval_ratio")),
        text_ratio=_positive(text.get("retrieval_ratio")),
        tokens_per_cluster=_positive((stats.get("index") or {}).get("tokens_per_cluster")),
        visited_fraction=sum(visited) / len(visited) if visited else None,
        layer_frame_ratios=tuple(float(layers[k]["mean"]) for k in sorted(layers, key=int)),
    )


def load_trace(path: str | Path) -> Trace:
    """A trace from a ``lfmsift stream --json`` result file (or a bare stats JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"trace {path} is not JSON: {exc}") from exc
    return trace_from_stats(data.get("stats", data), source=str(path))
