"""WiCSum thresholding: which clusters each query row needs (ReSV step 3, V-Rex §IV-C, Eqs. 1-3).

For query row i and clusters j with raw scores s_ij = q_i . k_cluster_j and token counts n_j:
Sum_i = sum_j s_ij n_j (Eq. 1), Th_i = ratio * Sum_i (Eq. 2), and row i selects the shortest
descending-score prefix whose weighted cumulative sum exceeds Th_i (Eq. 3). Rows with Sum_i <= 0
(which the paper never discusses) select their top cluster (the digest's A6). Selections are
unioned over rows and over the query heads of each KV group.

The exact rule, the shift and the bucket histogram take an optional ``valid`` mask over the clusters: the
slots of a preallocated table (grown by doubling, as the device-resident index keeps it) that hold
clusters; invalid slots weigh nothing and are never selected.

Two implementations of the one rule: ``wicsum_select`` (exact: a full sort) and the WTU's early exit
(equal-width score buckets from the row's max down, all clusters of a bucket taken together), itself in two
forms: ``wicsum_bucket_walk`` walks the buckets from the top and stops once every row has exited (what the
reference ``select_clusters`` runs), ``wicsum_bucketed`` builds the whole histogram, so it never reads the
device back (what the device path runs, and the walk's oracle in the tests). The bucketed one selects a
superset of the exact one, equal when the exit bucket's lower bound falls between the last selected score
and the next; it reports how much of each row it visited (the paper reports 16% on average).
"""

from __future__ import annotations

import torch

from lfmsift.kernels import wicsum_rows

DEFAULT_WICSUM_RATIO = 0.3
DEFAULT_BUCKETS = 20


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"WiCSum ratio must be in [0, 1), got {ratio}")


NONPOSITIVE_RULES = ("top", "shifted")


def _masked(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor | None):
    """float64 scores, weights ``s * n`` (0 where not ``valid``) and, for ordering, the scores with the
    invalid entries at -inf. ``valid`` (clusters,) marks the slots of a preallocated table that hold
    clusters (the device index grows its table by doubling); ``None``: every slot does."""
    s = scores.to(torch.float64)
    w = s * counts.to(s)
    if valid is None:
        return s, w, s
    valid = valid.to(s.device)
    return s, torch.where(valid, w, 0.0), torch.where(valid, s, float("-inf"))


def shift_nonpositive(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scores with every row whose weighted sum is <= 0 replaced by itself minus its minimum (the
    ``nonpositive="shifted"`` reading: such a row keeps its order and gets a positive sum); rows with a
    positive sum are unchanged. The minimum is over the ``valid`` clusters."""
    s, w, _ = _masked(scores, counts, valid)
    total = w.sum(-1, keepdim=True)
    low = s if valid is None else torch.where(valid.to(s.device), s, float("inf"))
    return torch.where(total > 0, s, s - low.amin(-1, keepdim=True))


def wicsum_select(scores: torch.Tensor, counts: torch.Tensor, ratio: float = DEFAULT_WICSUM_RATIO,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact rule. scores: (..., clusters); counts: (clusters,); ``valid``: see ``_masked`` (invalid
    slots sort last, weigh nothing and are never selected). Returns a bool mask like ``scores``."""
    _check_ratio(ratio)
    s, w, order_by = _masked(scores, counts, valid)
    total = w.sum(-1, keepdim=True)
    order = torch.sort(order_by, dim=-1, descending=True, stable=True).indices
    acc = w.gather(-1, order).cumsum(-1)
    last = (acc > ratio * total).to(torch.int8).argmax(-1, keepdim=True)  # first prefix over the threshold
    last = torch.where(total > 0, last, torch.zeros_like(last))
    take = torch.arange(s.shape[-1], device=s.device) <= last
    mask = torch.zeros_like(take).scatter(-1, order, take)
    return mask if valid is None else mask & valid.to(mask.device)


def bucket_of(scores: torch.Tensor, buckets: int = DEFAULT_BUCKETS, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket index of each score, 0 = the top bucket: ``floor((max - s) / width)`` with
    ``width = (max - min) / buckets``, the lowest score clamped into the last bucket. With ``valid``, max and
    min are over the valid clusters (the others get a bucket too, clamped into range, and are ignored)."""
    s = scores.to(torch.float64)
    if valid is None:
        hi = s.max(-1, keepdim=True).values
        lo = s.min(-1, keepdim=True).values
    else:
        valid = valid.to(s.device)
        hi = torch.where(valid, s, float("-inf")).max(-1, keepdim=True).values
        lo = torch.where(valid, s, float("inf")).min(-1, keepdim=True).values
    return _bucket_index(s, hi, lo, buckets)


def _bucket_index(s: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, buckets: int) -> torch.Tensor:
    """``floor((hi - s) / width)``, ``width = (hi - lo) / buckets`` (0 where the width is 0), clamped."""
    width = (hi - lo) / buckets
    ok = width > 0
    idx = torch.where(ok, torch.floor((hi - s) / torch.where(ok, width, 1.0)), torch.zeros_like(s))
    return torch.nan_to_num(idx).clamp_(0, buckets - 1).to(torch.int64)


def _bucketed_inputs(scores: torch.Tensor, counts: torch.Tensor, ratio: float, buckets: int,
                     valid: torch.Tensor | None = None):
    """Checked arguments of the bucketed rule: float64 scores, weights (0 where not ``valid``), row sums and
    bucket indices."""
    _check_ratio(ratio)
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    s, w, _ = _masked(scores, counts, valid)
    return s, w, w.sum(-1, keepdim=True), bucket_of(s, buckets, valid)


def wicsum_bucketed(
    scores: torch.Tensor, counts: torch.Tensor, ratio: float = DEFAULT_WICSUM_RATIO, buckets: int = DEFAULT_BUCKETS,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Early-exit rule of the WTU from the whole histogram of the buckets (no data-dependent loop, so no host
    read: what the device path runs). Returns (bool mask like ``scores``, fraction of each row's valid
    clusters visited). ``valid``: see ``_masked``."""
    s, w, total, b = _bucketed_inputs(scores, counts, ratio, buckets, valid)
    per_bucket = torch.zeros(*s.shape[:-1], buckets, dtype=s.dtype, device=s.device).scatter_add_(-1, b, w)
    exit_bucket = (per_bucket.cumsum(-1) > ratio * total).to(torch.int8).argmax(-1, keepdim=True)
    visited = b <= exit_bucket
    order_by = s if valid is None else torch.where(valid.to(s.device), s, float("-inf"))
    top = torch.zeros_like(visited).scatter(-1, order_by.argmax(-1, keepdim=True), True)
    positive = total > 0
    mask = torch.where(positive, visited, top)
    seen = torch.where(positive, visited, b == 0)
    if valid is None:
        return mask, seen.to(torch.float64).mean(-1)
    valid = valid.to(s.device)
    share = (seen & valid).to(torch.float64).sum(-1) / valid.sum().clamp(min=1)
    return mask & valid, share


def wicsum_bucket_walk(
    scores: torch.Tensor, counts: torch.Tensor, ratio: float = DEFAULT_WICSUM_RATIO, buckets: int = DEFAULT_BUCKETS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The WTU's walk: buckets from the top down, each row stopping at its exit bucket, the walk ending
    when every row has exited (no histogram of the buckets below). The same result as
    ``wicsum_bucketed``: (bool mask like ``scores``, fraction of each row visited)."""
    s, w, total, b = _bucketed_inputs(scores, counts, ratio, buckets)
    threshold = ratio * total
    exit_bucket = torch.where(total > 0, torch.full_like(b[..., :1], -1), torch.zeros_like(b[..., :1]))
    acc = torch.zeros_like(total)
    for k in range(buckets):
        active = exit_bucket < 0
        if not bool(active.any()):
            break
        acc = acc + torch.where(active, torch.where(b == k, w, 0.0).sum(-1, keepdim=True), 0.0)
        exit_bucket = torch.where(active & (acc > threshold), torch.full_like(exit_bucket, k), exit_bucket)
    exit_bucket = exit_bucket.clamp(min=0)
    visited = b <= exit_bucket
    positive = total > 0
    top = torch.zeros_like(visited).scatter(-1, s.argmax(-1, keepdim=True), True)
    return torch.where(positive, visited, top), visited.to(torch.float64).mean(-1)


SCORE_MODES = ("raw", "shifted", "softmax")


def transform_scores(scores: torch.Tensor, mode: str = "raw", scale: float = 1.0,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scores WiCSum weighs by cluster size (the digest's A6; every mode keeps each row's order):
    ``raw`` — ``q . k_cluster`` as the paper writes it (may be negative); ``shifted`` — minus the row's
    minimum, so every weight is >= 0 and the ratio is a share of non-negative mass; ``softmax`` —
    ``exp(scale * (s - max))``, so ``n_j * weight`` is cluster j's share of attention if its tokens scored
    like its mean key. With ``valid``, the row's minimum and maximum are over the valid clusters."""
    if mode == "raw":
        return scores
    if mode == "shifted":
        low = scores if valid is None else torch.where(valid, scores, float("inf"))
        return scores - low.amin(-1, keepdim=True)
    if mode == "softmax":
        high = scores if valid is None else torch.where(valid, scores, float("-inf"))
        return torch.exp(scale * (scores - high.amax(-1, keepdim=True)))
    raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {mode!r}")


def select_clusters(
    queries: torch.Tensor,
    representatives: torch.Tensor,
    counts: torch.Tensor,
    ratio: float = DEFAULT_WICSUM_RATIO,
    buckets: int | None = None,
    score_mode: str = "raw",
    nonpositive: str = "top",
    report: dict | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clusters each KV head must fetch: WiCSum per query head and row, unioned over rows and the group.

    queries: (num_heads, rows, head_dim) post-RoPE; representatives: (num_kv_heads, clusters, head_dim);
    counts: (clusters,). ``buckets=None`` uses the exact rule, an int the bucketed early exit.
    ``nonpositive``: what a row whose weighted sum is <= 0 takes — ``top``: its top cluster (the digest's
    A6); ``shifted``: the rule applied to that row minus its minimum (``shift_nonpositive``).
    ``report``: when given, gets ``rows`` (query rows x query heads scored) and ``nonpositive`` (a tensor: how
    many of them had a weighted sum <= 0), added to what it holds.
    ``valid`` (clusters,): the slots of a preallocated table that hold clusters (the device index's); then
    nothing is read back to the host: the bucketed rule runs from the whole histogram
    (``wicsum_bucketed``, the same selection as the walk) and invalid slots are never selected.
    Returns ((num_kv_heads, clusters) bool, mean visited fraction per KV head or None).
    """
    heads, rows, dim = queries.shape
    kv_heads, clusters, _ = representatives.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    if nonpositive not in NONPOSITIVE_RULES:
        raise ValueError(f"nonpositive must be one of {NONPOSITIVE_RULES}, got {nonpositive!r}")
    if clusters == 0:
        return torch.zeros(kv_heads, 0, dtype=torch.bool, device=queries.device), None
    grouped = queries.reshape(kv_heads, heads // kv_heads * rows, dim).to(representatives.dtype)
    scores = grouped @ representatives.transpose(1, 2)  # (kv_heads, group * rows, clusters)
    scores = transform_scores(scores, score_mode, dim ** -0.5, valid)
    if report is not None:
        _, w, _ = _masked(scores, counts, valid)
        total = w.sum(-1)
        report["rows"] = report.get("rows", 0) + total.numel()
        report["nonpositive"] = report.get("nonpositive", 0) + (total <= 0).sum()
    if nonpositive == "shifted":
        scores = shift_nonpositive(scores, counts, valid)
    if buckets is None:
        mask, visited = wicsum_select(scores, counts, ratio, valid), None
    elif valid is None:
        mask, seen = wicsum_bucket_walk(scores, counts, ratio, buckets)
        visited = seen.mean(-1)
    else:
        mask, seen = wicsum_bucketed(scores, counts, ratio, buckets, valid)
        visited = seen.mean(-1)
    return mask.any(1), visited


def select_clusters_padded(
    queries: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    ratio: float = DEFAULT_WICSUM_RATIO,
    buckets: int | None = None,
    score_mode: str = "raw",
    nonpositive: str = "top",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``select_clusters`` over a device index's padded table, in as few tensor operations as it takes (each
    one costs the host a dispatch and a launch in every layer): the means are ``sums / counts`` (empty slots
    have count 0: they weigh nothing and are never selected), the float64 scores, weights and row sums are
    computed once and shared by the non-positive count, the shift and the rule. Returns the
    (num_kv_heads, clusters) selection, the visited fraction per KV head (bucketed rule; else ``None``) and
    the number of WiCSum rows with a weighted sum <= 0; the same values as ``select_clusters`` with
    ``valid = counts > 0`` (tested). With ``LFMSIFT_WICSUM_KERNEL=1`` on CUDA the bucketed rule over raw
    scores runs as one Triton launch (``lfmsift.kernels.wicsum_rows``)."""
    _check_ratio(ratio)
    if nonpositive not in NONPOSITIVE_RULES:
        raise ValueError(f"nonpositive must be one of {NONPOSITIVE_RULES}, got {nonpositive!r}")
    heads, rows, dim = queries.shape
    kv_heads, clusters, _ = sums.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    if clusters == 0:
        return (torch.zeros(kv_heads, 0, dtype=torch.bool, device=queries.device), None,
                torch.zeros((), dtype=torch.int64, device=queries.device))
    valid = counts > 0
    means = sums / counts.clamp(min=1).to(sums.dtype)[None, :, None]
    scores = queries.reshape(kv_heads, heads // kv_heads * rows, dim).to(sums.dtype) @ means.transpose(1, 2)
    if score_mode != "raw":
        scores = transform_scores(scores, score_mode, dim ** -0.5, valid)
    if buckets is not None and score_mode == "raw" and wicsum_rows.enabled() and wicsum_rows.available(scores):
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        return wicsum_rows.wicsum_rows(scores, counts, ratio, buckets, nonpositive == "shifted")
    n = counts.to(torch.float64)
    s = scores.to(torch.float64)
    w = torch.where(valid, s * n, 0.0)
    total = w.sum(-1, keepdim=True)
    positive = total > 0
    nonpositive_rows = (~positive).sum()
    bias = torch.where(valid, 0.0, float("-inf")).to(torch.float64)  # -inf on empty slots
    if nonpositive == "shifted":
        low = (s - bias).amin(-1, keepdim=True)
        s = torch.where(positive, s, s - low)
        w = torch.where(valid, s * n, 0.0)
        total = w.sum(-1, keepdim=True)
        positive = total > 0
    ranked = s + bias
    if buckets is None:
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        acc = w.gather(-1, order).cumsum(-1)
        last = torch.where(positive, (acc > ratio * total).to(torch.int8).argmax(-1, keepdim=True), 0)
        take = torch.arange(clusters, device=s.device) <= last
        mask = torch.zeros_like(take).scatter(-1, order, take) & valid
        return mask.any(1), None, nonpositive_rows
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    b = _bucket_index(s, ranked.amax(-1, keepdim=True), (s - bias).amin(-1, keepdim=True), buckets)
    per_bucket = torch.zeros(kv_heads, s.shape[1], buckets, dtype=s.dtype, device=s.device).scatter_add_(-1, b, w)
    exit_bucket = (per_bucket.cumsum(-1) > ratio * total).to(torch.int8).argmax(-1, keepdim=True)
    visited = b <= exit_bucket
    top = torch.zeros_like(visited).scatter(-1, ranked.argmax(-1, keepdim=True), True)
    mask = torch.where(positive, visited, top) & valid
    seen = torch.where(positive, visited, b == 0) & valid
    share = seen.sum(-1).to(torch.float64) / valid.sum().clamp(min=1)
    return mask.any(1), share.mean(-1), nonpositive_rows
