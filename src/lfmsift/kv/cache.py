"""A transformers Cache whose layers attend only to the KV tokens a retriever selects.

``StreamingKVCache`` keeps every full-attention layer's K/V in a ``TieredKVStore`` (recent window on the
device, the rest in host memory and on disk) and is driven by an attention function registered with
transformers' attention interface under the name ``"lfmsift_stream"``. ``install(model, cache)``
switches the language model to that function and points each attention module at the cache;
``uninstall`` restores the previous implementation.

Per layer and chunk (a frame, a text segment or one decode step; batch 1):
1. the chunk's frame tokens are grouped by the retriever (``assign``); text tokens join the current
   text segment, which is always attended to;
2. the past tokens each KV head attends to are chosen — ``same_layer``: from this layer's queries and
   index; ``previous_layer``: from the selection the previous layer made with its own queries and index
   (layer 0 dense), the paper's prefetch;
3. their *original* K/V are gathered from the tiers (host/disk runs counted and timed by bytes), and the
   chunk attends to them plus itself (causal within the chunk);
4. the chunk's K/V are appended to the store, which may offload least recently used groups.
Sliding-window layers (Gemma-3) keep their last ``window - 1`` tokens on the device and attend densely,
exactly as the model does; they are not retrieved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from lfmsift.kv.retriever import LayerIndex, Retriever
from lfmsift.kv.store import DEVICE, TierBudget, TieredKVStore
from lfmsift.models.adapters import ModelView, describe

log = logging.getLogger(__name__)

ATTENTION_NAME = "lfmsift_stream"
FRAME, TEXT = "frame", "text"
STAGES = (FRAME, TEXT)


class _StreamLayer(CacheLayerMixin):
    """Per-layer placeholder for transformers' bookkeeping; the data lives in the store."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: StreamingKVCache, sliding: bool) -> None:
        super().__init__()
        self.owner, self.is_sliding = owner, sliding

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else 1
        return self.owner.seen + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return -1


def always_kept(frame: torch.Tensor, first: int, recent: int, count: int | None = None) -> torch.Tensor:
    """(past,) bool: the first ``first`` and the last ``recent`` of the past streamed tokens (``frame``
    marks them among all past tokens), the tokens a retriever's ``keep_first`` / ``keep_recent`` keep.
    ``count``: how many streamed tokens ``frame`` marks, when the caller knows it (else it is read)."""
    order = frame.cumsum(0) - 1  # index of each streamed token in the stream
    count = int(frame.sum()) if count is None else count
    return frame & ((order < first) | (order >= count - recent))


@dataclass
class _Usage:
    """Per layer and KV head, summed over chunks: selected / available past streamed (frame) tokens, and
    the same over the ones offloaded from the device (``fetched`` / ``offloaded``: what had to move)."""

    selected: torch.Tensor
    available: torch.Tensor
    fetched: torch.Tensor = None
    offloaded: torch.Tensor = None
    chunks: int = 0
    visited_sum: torch.Tensor | None = None
    visited_chunks: int = 0

    def __post_init__(self) -> None:
        if self.fetched is None:
            self.fetched = torch.zeros_like(self.selected)
        if self.offloaded is None:
            self.offloaded = torch.zeros_like(self.available)

    def ratio(self) -> torch.Tensor:
        return self.selected / self.available.clamp(min=1)


@dataclass
class _Window:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class StreamingKVCache(Cache):
    """KV cache of one streaming session (batch 1). See the module docstring."""

    view: ModelView
    retriever: Retriever
    budget: TierBudget = field(default_factory=TierBudget)
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    trace: list | None = None  # when a list: (layer, stage, (kv_heads, past) bool selection) per layer and chunk

    def __post_init__(self) -> None:
        self._setup_layers()
        self._setup_storage()

    def _setup_layers(self) -> None:
        """Layer layout, chunk bookkeeping and sliding windows (shared with the device path)."""
        attn = [layer.attention for layer in self.view.layers]
        self.sliding = [a.sliding_window is not None for a in attn]
        super().__init__(layers=[_StreamLayer(self, s) for s in self.sliding])
        param = next(self.view.language_model.parameters())
        self.dtype = self.dtype or param.dtype
        self.device = torch.device(self.device or param.device)
        heads = {(a.num_kv_heads, a.head_dim) for a, s in zip(attn, self.sliding) if not s}
        if len(heads) > 1:
            raise ValueError(f"layers with different KV head layouts are not supported: {sorted(heads)}")
        self.num_kv_heads, self.head_dim = heads.pop() if heads else (attn[0].num_kv_heads, attn[0].head_dim)
        self.num_heads = attn[0].num_heads
        self.full_layers = [i for i, s in enumerate(self.sliding) if not s]
        self._slot = {layer: i for i, layer in enumerate(self.full_layers)}
        self.windows: dict[int, _Window] = {}
        self.seen = 0
        self.kind = TEXT
        self._text_group = -1
        self._last_kind = None
        self._pending: dict[int, torch.Tensor] = {}
        self._attn_inputs: dict[int, tuple] = {}
        self._hooks: list = []

    def _setup_storage(self) -> None:
        """The tiered store, one retriever index per full-attention layer, and the usage counters."""
        self.store = TieredKVStore(len(self.full_layers), self.num_kv_heads, self.head_dim, self.dtype, self.device,
                                   self.budget)
        self.indexes: dict[int, LayerIndex] = {
            layer: self.retriever.index(layer, self.num_kv_heads, self.head_dim, self.device)
            for layer in self.full_layers
        }
        self.usage = {
            stage: {
                layer: _Usage(torch.zeros(self.num_kv_heads, dtype=torch.float64),
                              torch.zeros(self.num_kv_heads, dtype=torch.float64))
                for layer in self.full_layers
            }
            for stage in STAGES
        }

    # -- chunk protocol ------------------------------------------------------------------------------------
    def begin(self, kind: str, tokens: int | None = None) -> None:
        """Declare the kind of the next forward's tokens: ``"frame"`` (selectable) or ``"text"`` (kept).
        With ``tokens``, first check that the chunk fits the byte budgets (``KVBudgetError`` otherwise)."""
        if kind not in STAGES:
            raise ValueError(f"chunk kind must be one of {STAGES}, got {kind!r}")
        if tokens is not None:
            for store in self.store.layers:
                store.check_room(tokens)
        if kind == TEXT and self._last_kind == FRAME:
            self._text_group -= 1  # a new text segment after frames: its own group
        self.kind = kind

    def end(self, tokens: int) -> None:
        self.seen += tokens
        self._last_kind = self.kind

    # -- the attention path --------------------------------------------------------------------------------
    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        layer = module.layer_idx
        if query.shape[0] != 1:
            raise ValueError(f"streaming sessions run batch 1, got a batch of {query.shape[0]}")
        q, k, v = query[0], key[0], value[0]
        if self.sliding[layer]:
            return self._window_attention(layer, q, k, v, scaling, self.view.layers[layer].attention.sliding_window)
        store, index = self.store[self._slot[layer]], self.indexes[layer]
        past = store.num_tokens
        tokens = k.shape[1]
        early = self.retriever.selects_before_assign
        if early:
            chosen = self._choose(layer, index, q, store, past, self._hint(layer))
        if self.kind == FRAME:
            groups = index.assign(k)
        else:
            groups = torch.full((tokens,), self._text_group, dtype=torch.int64)
        if not early:
            chosen = self._choose(layer, index, q, store, past, self._hint(layer))
        out = self._attention(q, k, v, scaling, store, chosen)
        closed = store.append(k, v, groups)
        frame_closed = [g for g in closed if g >= 0]
        if frame_closed:
            index.close(frame_closed)
        return out

    def _choose(self, layer: int, index: LayerIndex, q: torch.Tensor, store, past: int,
                hint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Past token ids each KV head attends to; also records the usage statistics."""
        past_groups = store.group.view[:past]
        text = past_groups < 0
        if self.retriever.selection == "same_layer":
            keep = self._tokens_from(index.select(q, self.kind, hint), past_groups, text)
        else:
            keep = self._pending.pop(layer, None) if layer != self.full_layers[0] else None
            nxt = self._next_full_layer(layer)
            if nxt is not None:
                self._pending[nxt] = self._tokens_from(index.select(q, self.kind, hint), past_groups, text)
        if keep is None:
            keep = torch.ones(self.num_kv_heads, past, dtype=torch.bool)
        frame = ~text
        frames = frame.sum().item()
        if frames and (self.retriever.keep_first or self.retriever.keep_recent):
            keep = keep | always_kept(frame, self.retriever.keep_first, self.retriever.keep_recent)
        if self.trace is not None:
            self.trace.append((layer, self.kind, keep.clone()))
        if past:
            store.touch(past_groups[keep.any(0)])  # least recently *used* groups leave the device first
        usage = self.usage[self.kind][layer]
        if frames:
            usage.selected += (keep & frame).sum(1).to(torch.float64)
            usage.available += frames
            offloaded = frame & (store.tier.view[:past] != DEVICE)
            usage.fetched += (keep & offloaded).sum(1).to(torch.float64)
            usage.offloaded += offloaded.sum().item()
            usage.chunks += 1
            visited = index.visited_fraction()
            if visited is not None and self.retriever.selection == "same_layer":
                usage.visited_sum = visited.cpu() if usage.visited_sum is None else usage.visited_sum + visited.cpu()
                usage.visited_chunks += 1
        return [keep[h].nonzero().flatten() for h in range(self.num_kv_heads)]

    @staticmethod
    def _tokens_from(group_mask: torch.Tensor | None, past_groups: torch.Tensor, text: torch.Tensor) -> torch.Tensor | None:
        if group_mask is None:
            return None
        mask = group_mask.cpu()
        if mask.shape[1] == 0:
            return text.expand(mask.shape[0], -1).clone()
        return mask[:, past_groups.clamp(min=0)] | text

    def _hint(self, layer: int) -> torch.Tensor | None:
        """For retrievers that speculate (InfiniGen): layer ``layer``'s queries computed from the previous
        layer's attention input; ``None`` for layer 0 or when not needed."""
        if not self.retriever.needs_hint or layer == 0 or (layer - 1) not in self._attn_inputs:
            return None
        return self.project_query(self._attn_inputs[layer - 1][0], layer)

    def project_query(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Post-RoPE queries (heads, rows, dim) of ``layer`` for attention inputs ``hidden`` (1, rows, hidden):
        its query projection, query norm (Qwen3, Gemma-3) and its rotary embedding at this chunk's positions
        (the standard rotate-half RoPE of the supported architectures)."""
        _, position = self._attn_inputs.get(layer, (None, None))
        attn = self.view.layers[layer].attention
        q = attn.q_proj(hidden.to(attn.q_proj.weight.dtype))[0]
        q = q.view(q.shape[0], attn.num_heads, attn.head_dim).transpose(0, 1)
        if attn.q_norm is not None:
            q = attn.q_norm(q)
        if position is not None:
            cos, sin = (t[0].to(q.dtype) for t in position)
            half = q.shape[-1] // 2
            q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
        return q

    def _capture_input(self, module: nn.Module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._attn_inputs[module.layer_idx] = (hidden.detach(), kwargs.get("position_embeddings"))

    def _next_full_layer(self, layer: int) -> int | None:
        i = self._slot[layer] + 1
        return self.full_layers[i] if i < len(self.full_layers) else None

    def _attention(self, q, k, v, scaling, store, chosen: list[torch.Tensor]) -> torch.Tensor:
        heads, tokens, dim = q.shape
        group = heads // self.num_kv_heads
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
        out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
        for h in range(self.num_kv_heads):
            pk, pv = store.gather(chosen[h], h)
            keys = torch.cat([pk.to(q.dtype), k[h]], 0)
            values = torch.cat([pv.to(q.dtype), v[h]], 0)
            mask = torch.cat([torch.ones(tokens, pk.shape[0], dtype=torch.bool, device=q.device), causal], 1)
            qh = q[h * group : (h + 1) * group]
            o = F.scaled_dot_product_attention(qh, keys[None], values[None], attn_mask=mask, scale=scaling)
            out[:, h * group : (h + 1) * group] = o.transpose(0, 1)
        return out[None]

    def _window_attention(self, layer, q, k, v, scaling, window: int) -> torch.Tensor:
        """Sliding-window layer: attend to the last ``window`` positions (itself included), as the model does."""
        heads, tokens, _dim = q.shape
        win = self.windows.get(layer)
        pk = win.keys if win else k[:, :0]
        pv = win.values if win else v[:, :0]
        keys, values = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        n_past = pk.shape[1]
        qpos = torch.arange(tokens, device=q.device)[:, None] + n_past
        kpos = torch.arange(keys.shape[1], device=q.device)[None, :]
        mask = (kpos <= qpos) & (kpos > qpos - window)
        group = heads // keys.shape[0]
        out = F.scaled_dot_product_attention(
            q, keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0), attn_mask=mask, scale=scaling
        )
        start = max(keys.shape[1] - (window - 1), 0)  # the next token sees the last window - 1 of these
        self.windows[layer] = _Window(keys[:, start:], values[:, start:])
        return out.transpose(0, 1)[None]

    # -- statistics ----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Retrieval ratios per stage, layer and KV head; index (HC table) size; bytes per tier and moved."""
        out: dict = {"retriever": self.retriever.describe(), "tokens": self.seen}
        for stage in STAGES:
            per_layer = {}
            sel = avail = fetched = offloaded = 0.0
            for layer, u in self.usage[stage].items():
                if u.chunks == 0:
                    continue
                entry = {"per_kv_head": [round(x, 6) for x in u.ratio().tolist()],
                         "mean": float(u.ratio().mean())}
                if u.visited_chunks:
                    entry["visited_fraction"] = float((u.visited_sum / u.visited_chunks).mean())
                per_layer[layer] = entry
                sel += float(u.selected.sum())
                avail += float(u.available.sum())
                fetched += float(u.fetched.sum())
                offloaded += float(u.offloaded.sum())
            out[f"{stage}_stage"] = {
                "retrieval_ratio": sel / avail if avail else None,
                "fetched_ratio": fetched / offloaded if offloaded else None,
                "layers": per_layer,
            }
        kv_bytes = sum(s.num_tokens for s in self.store.layers) * self.store.layers[0].token_bytes \
            if self.store.layers else 0
        value_bytes = torch.empty((), dtype=self.dtype).element_size()
        index = {layer: idx.stats(self.store[self._slot[layer]].num_tokens, value_bytes)
                 for layer, idx in self.indexes.items()}
        out["index"] = {"layers": index}
        if index and "clusters" in next(iter(index.values())):
            clusters = sum(s["clusters"] for s in index.values())
            hc = sum(s["hc_table_bytes"] for s in index.values())
            frame_tokens = self._stored_frame_tokens()
            out["index"].update({
                "clusters": clusters,
                "tokens_per_cluster": frame_tokens / clusters if clusters else 0.0,
                "hc_table_bytes": hc,
                "hc_table_vs_kv": hc / kv_bytes if kv_bytes else 0.0,
            })
            shares = [s["nonpositive_rows"] for s in index.values() if s.get("nonpositive_rows")]
            out["index"]["nonpositive_rows"] = {
                stage: sum(x[stage] for x in shares if stage in x) / max(1, sum(stage in x for x in shares))
                for stage in STAGES if any(stage in x for x in shares)
            }
        out["store"] = self.store.stats()
        out["store"]["kv_bytes"] = kv_bytes
        out["store"]["window_bytes"] = sum(
            (w.keys.numel() + w.values.numel()) * w.keys.element_size() for w in self.windows.values()
        )
        return out

    def _stored_frame_tokens(self) -> int:
        """Streamed (frame) tokens held, summed over the full-attention layers."""
        return sum(int((s.group.view >= 0).sum()) for s in self.store.layers)

    def close(self) -> None:
        self.store.close()


def streaming_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"lfmsift_stream"`` (transformers' attention interface)."""
    cache = getattr(module, "lfmsift_cache", None)
    if cache is None:
        raise RuntimeError(
            "this model's attention is switched to lfmsift streaming but no StreamingKVCache is installed; "
            "use lfmsift.stream.StreamingSession or lfmsift.kv.cache.install()"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, streaming_attention)


def install(cache: StreamingKVCache) -> None:
    """Route the language model's attention through ``cache``."""
    lm_config = cache.view.text_config
    cache._previous_impl = lm_config._attn_implementation
    lm_config._attn_implementation = ATTENTION_NAME
    for layer in cache.view.layers:
        layer.attention.module.lfmsift_cache = cache
        if cache.retriever.needs_hint:
            cache._hooks.append(layer.attention.module.register_forward_pre_hook(cache._capture_input,
                                                                                with_kwargs=True))


def uninstall(cache: StreamingKVCache) -> None:
    """Restore the attention implementation that was active before ``install``."""
    cache.view.text_config._attn_implementation = getattr(cache, "_previous_impl", "sdpa")
    for hook in cache._hooks:
        hook.remove()
    cache._hooks.clear()
    for layer in cache.view.layers:
        if getattr(layer.attention.module, "lfmsift_cache", None) is cache:
            del layer.attention.module.lfmsift_cache


CACHE_PATHS = ("auto", "reference", "device")


def build_cache(view: ModelView, retriever: Retriever, budget: TierBudget | None = None,
                path: str = "auto") -> StreamingKVCache:
    """A (not installed) streaming cache. ``path``: ``reference`` (this module: the oracle, runs anywhere,
    disk tier included), ``device`` (``lfmsift.kv.device_cache``: no host read inside a layer, batch 1, no
    disk tier) or ``auto`` (device on CUDA unless the budget asks for a disk tier, reference elsewhere)."""
    if path not in CACHE_PATHS:
        raise ValueError(f"cache path must be one of {CACHE_PATHS}, got {path!r}")
    budget = budget or TierBudget()
    param = next(view.language_model.parameters())
    if path == "auto":
        disk = budget.disk_bytes is not None or budget.disk_dir is not None
        path = "device" if param.device.type == "cuda" and not disk else "reference"
    if path == "reference":
        return StreamingKVCache(view, retriever, budget)
    from lfmsift.kv.device_cache import DeviceStreamingCache

    return DeviceStreamingCache(view, retriever, budget)


def new_cache(model: nn.Module, retriever: Retriever, budget: TierBudget | None = None,
              path: str = "reference") -> StreamingKVCache:
    """A cache for ``model`` (any supported architecture), installed; ``path`` as in ``build_cache``."""
    cache = build_cache(describe(model), retriever, budget, path)
    install(cache)
    return cache
