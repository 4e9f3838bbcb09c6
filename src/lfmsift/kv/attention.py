"""Attention of a chunk over its gathered past tokens and itself, per KV head, without repeating K/V.

The gathered buffer (2, kv_heads, length, head_dim) holds, for KV head h, its ``counts[h]`` selected past
tokens at ``[0, counts[h])`` (each head its own selection), then unused slots, and the chunk's own K/V at
``[start, start + tokens)``. The query heads of a GQA group are stacked as rows of their KV head, so one
SDPA call attends every head with K/V read once per KV head; the mask (selected past, causal chunk) is
built on the device from ``counts``, so the call needs nothing from the host. ``attend_reference`` is the
same attention head by head on the selected tokens alone (the oracle).

With ``LFMSIFT_ATTENTION_KERNEL=1`` on CUDA the attention runs ``kernels.gathered_attention``, which reads
each head's selected slots only; otherwise it is one masked SDPA call over the whole buffer
(``attend_masked``). On CUDA that call is restricted to PyTorch's memory-efficient kernel (the math kernel as fallback), which
takes the boolean mask as it is: left to choose, PyTorch picks cuDNN's attention for a masked call on
Hopper, and a profile of a frame issued behind a GPU sleep found cuDNN's forward holding the host until the
GPU caught up (a memset inside it; docs/results.md, "Waits the debug mode does not see"). ``LFMSIFT_SDPA_BACKENDS``
overrides the list (comma-separated ``torch.nn.attention.SDPBackend`` names, or ``any`` for PyTorch's own
choice), for measuring the difference.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lfmsift.kernels import gathered_attention
from lfmsift.kernels.compiled import fused


def chunk_mask(start: int, length: int, tokens: int, group: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(group * tokens, length) bool: row ``g * tokens + t`` sees the chunk up to itself, ``[start, start + t]``."""
    j = torch.arange(length, device=device)
    t = (torch.arange(group * tokens, device=device) % tokens)[:, None]
    return (j >= start) & (j - start <= t)


def gathered_mask(counts: torch.Tensor, start: int, length: int, tokens: int, group: int,
                  chunk: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """(kv_heads, group * tokens, length) bool: row ``g * tokens + t`` of head h sees its selected past
    ``[0, counts[h])`` and the chunk up to itself (``chunk``: ``chunk_mask``, ``slots``: ``arange(length)``,
    when already built)."""
    if chunk is None:
        chunk = chunk_mask(start, length, tokens, group, counts.device)
    j = torch.arange(length, device=counts.device) if slots is None else slots
    return (j < counts[:, None, None]) | chunk[None]


def sdpa_backends() -> list[SDPBackend] | None:
    """The SDPA kernels the gathered attention may use on CUDA (``None``: PyTorch's choice)."""
    return _parse_backends(os.environ.get("LFMSIFT_SDPA_BACKENDS", "efficient_attention,math"))


@functools.lru_cache(maxsize=8)
def _parse_backends(setting: str) -> list[SDPBackend] | None:
    """``LFMSIFT_SDPA_BACKENDS`` parsed once per value (the attention runs in every layer)."""
    names = setting.strip().lower()
    if names == "any":
        return None
    known = {name.lower(): b for name, b in SDPBackend.__members__.items() if name != "ERROR"}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"LFMSIFT_SDPA_BACKENDS={names!r}: use comma-separated names of {', '.join(known)}, "
                         "or 'any'")
    return [known[n] for n in wanted]


def _backend_scope(device: torch.device) -> contextlib.AbstractContextManager:
    backends = sdpa_backends() if device.type == "cuda" else None
    return contextlib.nullcontext() if backends is None else sdpa_kernel(backends)


def attend_gathered(query: torch.Tensor, buffer: torch.Tensor, counts: torch.Tensor, start: int,
                    scaling: float, chunk: torch.Tensor | None = None, slots: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """query (heads, tokens, head_dim) post-RoPE; buffer and counts as in the module docstring; ``chunk``: the
    chunk's part of the mask (``chunk_mask``), shared by the layers of one chunk.
    Returns (tokens, heads, head_dim), the layout transformers' attention functions return.

    With ``LFMSIFT_ATTENTION_KERNEL=1`` on CUDA the attention runs ``kernels.gathered_attention``, which
    reads only each head's selected slots and the chunk; otherwise one masked SDPA call over the whole
    buffer (``attend_masked``)."""
    if gathered_attention.available(query, buffer):
        return gathered_attention.gathered_attention(query, buffer, counts, start, scaling)
    return attend_masked(query, buffer, counts, start, scaling, chunk, slots)


@fused
def attend_masked(query: torch.Tensor, buffer: torch.Tensor, counts: torch.Tensor, start: int,
                  scaling: float, chunk: torch.Tensor | None = None, slots: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``attend_gathered`` as one SDPA call over the whole buffer, masked (``gathered_mask``)."""
    heads, tokens, dim = query.shape
    kv_heads, length = buffer.shape[1], buffer.shape[2]
    group = heads // kv_heads
    q = query.reshape(kv_heads, 1, group * tokens, dim)
    mask = gathered_mask(counts, start, length, tokens, group, chunk, slots)[:, None]
    with _backend_scope(query.device):
        out = F.scaled_dot_product_attention(q, buffer[0, :, None].to(q.dtype), buffer[1, :, None].to(q.dtype),
                                             attn_mask=mask, scale=scaling)
    return out.reshape(heads, tokens, dim).transpose(0, 1)


def attend_reference(query: torch.Tensor, past_keys: list[torch.Tensor], past_values: list[torch.Tensor],
                     keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head by head in float64: softmax over each KV head's selected past (lists of (n_h, head_dim)) and the
    chunk's keys (kv_heads, tokens, head_dim) causally. Returns (tokens, heads, head_dim)."""
    heads, tokens, _ = query.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    out = torch.empty(tokens, heads, query.shape[-1], dtype=torch.float64)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    for h in range(heads):
        kv = h // group
        k = torch.cat([past_keys[kv].double().cpu(), keys[kv].double().cpu()])
        v = torch.cat([past_values[kv].double().cpu(), values[kv].double().cpu()])
        scores = query[h].double().cpu() @ k.T * scaling
        seen = torch.cat([torch.ones(tokens, past_keys[kv].shape[0], dtype=torch.bool), causal], 1)
        out[:, h] = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1) @ v
    return out
