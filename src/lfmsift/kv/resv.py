"""ReSV (V-Rex §IV): hash-bit key clustering + WiCSum thresholding, per layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lfmsift.kernels.compiled import fused
from lfmsift.kv.clusters import DEFAULT_HAMMING_THRESHOLD, HashClusterTable
from lfmsift.kv.device_clusters import DeviceClusterTable
from lfmsift.kv.hashing import DEFAULT_HASH_BITS, hash_bits, hyperplanes
from lfmsift.kv.retriever import LayerIndex, Retriever, register
from lfmsift.kv.wicsum import (DEFAULT_WICSUM_RATIO, NONPOSITIVE_RULES, SCORE_MODES, select_clusters,
                               select_clusters_padded)


class ReSVIndex(LayerIndex):
    """The HC table of one layer plus its hyperplanes."""

    def __init__(self, config: ReSV, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.config = config
        self.planes = hyperplanes(num_kv_heads * head_dim, config.hash_bits, config.seed, layer).to(device)
        self.table = HashClusterTable(num_kv_heads, head_dim, config.hamming_threshold, device)
        self._visited: torch.Tensor | None = None
        self._key_sum = torch.zeros(num_kv_heads * head_dim, dtype=torch.float32)  # for ``center_keys``
        self._key_count = 0
        self._rows: dict[str, dict] = {}  # per stage: WiCSum rows scored, and those with a sum <= 0

    def hashed_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(tokens, num_kv_heads * head_dim): what is hashed of a chunk's keys (num_kv_heads, tokens, head_dim),
        all KV heads concatenated (with ``center_keys``: minus the running mean of the layer's keys, this
        chunk's included)."""
        flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)  # per token, KV heads concatenated
        if self.config.center_keys:  # hash the keys' deviation from the running mean of this layer's keys
            total = self._key_sum.to(flat.device, torch.float32) + flat.float().sum(0)
            self._key_count += flat.shape[0]
            self._key_sum = total
            flat = flat.float() - total / self._key_count
        return flat

    def hash_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(tokens,) packed hash bits of a chunk's keys (see ``hashed_keys``)."""
        return hash_bits(self.hashed_keys(keys), self.planes)

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        return self.table.assign(keys, self.hash_keys(keys))

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor:
        mask, self._visited = select_clusters(
            queries, self.table.representatives, self.table.counts, self.config.ratio, self.config.buckets,
            self.config.score_mode, self.config.nonpositive, self._rows.setdefault(stage, {}),
        )
        return mask

    def close(self, groups: list[int]) -> None:
        self.table.close(groups)

    def visited_fraction(self) -> torch.Tensor | None:
        return self._visited

    def cluster_count(self) -> int:
        return self.table.size

    def stats(self, num_tokens: int, value_bytes: int = 2) -> dict:
        size = self.cluster_count()
        key_bytes = self.config.key_bytes or value_bytes
        return {
            "clusters": size,
            "tokens_per_cluster": num_tokens / size if size else 0.0,
            "hc_table_bytes": int(self.table.nbytes(num_tokens, key_bytes)),
            # the share of WiCSum rows whose weighted sum was <= 0 (they take the ``nonpositive`` rule)
            "nonpositive_rows": {stage: float(r.get("nonpositive", 0)) / r["rows"] for stage, r in self._rows.items()
                                if r.get("rows")},
        }


@fused
def device_select(queries: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, ratio: float, buckets: int | None,
                  score_mode: str, nonpositive: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``select_clusters_padded`` (WiCSum over a padded table of key sums and counts), compiled with
    ``LFMSIFT_COMPILE=1``; returns the mask, the visited fraction and how many WiCSum rows had a weighted
    sum <= 0."""
    return select_clusters_padded(queries, sums, counts, ratio, buckets, score_mode, nonpositive)


class DeviceReSVIndex(ReSVIndex):
    """The same rules on the compute device with no host read (the GPU streaming path): a
    ``DeviceClusterTable`` whose open clusters are those with a member among the last ``window`` stream
    positions (``None``: until ``close``), and WiCSum over its padded slots (the bucketed rule from the whole
    histogram). ``assign`` returns device cluster ids; ``select`` a (num_kv_heads, bound) mask over the slots."""

    def __init__(self, config: ReSV, layer: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 window: int | None = None) -> None:
        super().__init__(config, layer, num_kv_heads, head_dim, device)
        self.table = DeviceClusterTable(num_kv_heads, head_dim, config.hamming_threshold, device, window,
                                        bits=config.hash_bits)
        self.deferred = False  # inside a prepared (graph-capturable) step
        self._key_sum = self._key_sum.to(device)

    graphable = True

    def assign(self, keys: torch.Tensor, position: int | torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_tensor(position):  # a graph-captured step (``prepare_step`` planned it)
            codes = self.hash_keys(keys) if self.table.fused else \
                (self.hashed_keys(keys).float() @ self.planes > 0).to(torch.float32)
            return self.table.assign_at(keys, codes, position)
        if self.table.fused:  # the one-launch assignment takes packed hashes
            return self.table.assign(keys, self.hash_keys(keys), position)
        rows = (self.hashed_keys(keys).float() @ self.planes > 0).to(torch.float32)  # the bits of ``hash_bits``
        return self.table.assign_bits(keys, rows, position)

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor:
        table, c = self.table, self.config
        mask, self._visited, nonpositive = device_select(queries, table.sums, table.counts, c.ratio, c.buckets,
                                                         c.score_mode, c.nonpositive)
        rows = self._rows.setdefault(stage, {"rows": 0})
        if "nonpositive" not in rows:
            rows["nonpositive"] = torch.zeros((), dtype=torch.int64, device=queries.device)
        rows["nonpositive"].add_(nonpositive)  # in place: a captured step adds to the same counter
        if not self.deferred:  # a graph-captured step counts its rows in ``finish_step``
            rows["rows"] += queries.shape[0] * queries.shape[1]
        return mask

    def prepare_step(self, kind: str, tokens: int, bucket: int) -> None:
        if self.config.center_keys:
            raise ValueError("center_keys keeps a host-side key count; it cannot run in CUDA graphs")
        self.table.prepare(tokens if kind == "frame" else 0, bucket)
        self.deferred = True

    def step_key(self) -> tuple:
        return (self.table.scan, self.table._counts.shape[0])

    def finish_step(self, kind: str, tokens: int, rows: int) -> None:
        self.table.finish(tokens if kind == "frame" else 0)
        self._rows.setdefault(kind, {"rows": 0})["rows"] += rows
        self.deferred = False

    def cluster_count(self) -> int:
        return self.table.sync_bound()


@register
@dataclass
class ReSV(Retriever):
    """ReSV with the paper's defaults: 32 hash bits, Hamming threshold 7, WiCSum ratio 0.3.

    ``buckets=None`` applies WiCSum exactly (a full sort); an int applies the WTU's bucketed early exit
    with that many equal-width buckets (a superset of the exact selection; it also reports the visited
    fraction of each row). ``key_bytes`` is the precision the HC table's mean keys are *counted* at
    (default: that of the KV cache, so the HC-table / KV ratio compares like with like; the paper's 1.67%
    is bf16 for both); they are kept in fp32 for accuracy. ``score_mode``: what WiCSum weighs — ``raw``
    ``q . k_cluster`` (the paper's literal rule, our default), ``shifted`` (minus each row's minimum) or
    ``softmax`` (attention mass); see ``lfmsift.kv.wicsum.transform_scores``. ``nonpositive``: what a
    WiCSum row whose weighted sum is <= 0 takes (``top``: its top cluster; ``shifted``: the rule on that
    row minus its minimum). ``include_current``: whether a chunk's own tokens are clustered before its
    selection (``True``: they join the HC table first and its clusters enter WiCSum with the past ones,
    though the chunk attends to itself anyway; ``False``: WiCSum sees the past clusters only).
    ``center_keys``: hash each key minus the running mean of the layer's streamed keys (the chunk's own
    included) instead of the key itself. Keys share a large common direction, so hyperplanes through the
    origin give most tokens the same bits and clusters of unlike keys; centered, the bits split the keys'
    differences (``benchmarks/resv_keys.py`` measures both).
    """

    name: ClassVar[str] = "resv"
    ratio: float = DEFAULT_WICSUM_RATIO
    hash_bits: int = DEFAULT_HASH_BITS
    hamming_threshold: int = DEFAULT_HAMMING_THRESHOLD
    buckets: int | None = None
    seed: int = 0
    key_bytes: int | None = None
    score_mode: str = "raw"
    nonpositive: str = "top"
    include_current: bool = True
    center_keys: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if self.nonpositive not in NONPOSITIVE_RULES:
            raise ValueError(f"nonpositive must be one of {NONPOSITIVE_RULES}, got {self.nonpositive!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"WiCSum ratio must be in [0, 1), got {self.ratio}")
        if self.buckets is not None and self.buckets < 1:
            raise ValueError(f"buckets must be >= 1 or None, got {self.buckets}")

    @property
    def selects_before_assign(self) -> bool:
        return not self.include_current

    def index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device) -> LayerIndex:
        return ReSVIndex(self, layer, num_kv_heads, head_dim, device)

    def device_index(self, layer: int, num_kv_heads: int, head_dim: int, device: torch.device,
                     window: int | None = None) -> DeviceReSVIndex:
        return DeviceReSVIndex(self, layer, num_kv_heads, head_dim, device, window)


@register
@dataclass
class ReSVShifted(ReSV):
    """ReSV whose WiCSum rows with a weighted raw-score sum <= 0 are scored from their minimum instead of
    taking only their top cluster (``nonpositive="shifted"``); everything else is the paper's rule.

    On the small models here most WiCSum rows have a non-positive weighted sum (keys share a large common
    direction whose product with the query is mostly negative; the share is in each run's statistics,
    ``index.nonpositive_rows``), so the literal rule attends to about one cluster per row and KV head and
    loses the stream's content. This is
    the one-option change of the ablation (``lfmsift kv-eval --ablation``) that kept the needle; its
    numbers (``results/kv_ablation_smollm2-135m.json``) and the readings that did not are in docs/results.md.
    """

    name: ClassVar[str] = "resv_shifted"
    nonpositive: str = "shifted"
