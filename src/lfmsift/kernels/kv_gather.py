"""Gather selected KV tokens of one layer from a host tier into a device buffer, in one launch.

An offloaded KV tier is laid out (2, kv_heads, slots, head_dim): K and V planes, each KV head's slots
contiguous, so a selected cluster is one run of consecutive slots. On CUDA, ``gather_tokens`` reads the
selected slots of every KV head straight from pinned host memory (mapped into the GPU's address space:
Triton loads from it over PCIe) and writes them packed into a preallocated device buffer: no per-run copy
call, no host-side ``index_select``, no pageable staging copy, and no host synchronisation (the selection
stays on the device as a slot list per head with a count). Consecutive slots are consecutive addresses, so
a block of tokens of one run is one contiguous read. ``gather_tokens_reference`` is the same gather by
``index_select`` (the oracle in the tests, and the path on CPU).

Layout of a selection: ``slots`` (kv_heads, capacity) int64, the first ``counts[h]`` entries of row h the
slots head h needs (any order; sorted slots read in address order); entries past the count are ignored.
The output is (2, kv_heads, capacity, head_dim); row h's first ``counts[h]`` tokens are the gathered ones.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU machines and CI run the PyTorch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

BLOCK_TOKENS = 16


def available(source: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the Triton gather can run: a CUDA output and a CUDA or pinned host source."""
    return triton is not None and out.is_cuda and (source.is_cuda or source.is_pinned())


def _check(source: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, out: torch.Tensor) -> None:
    if source.ndim != 4 or source.shape[0] != 2:
        raise ValueError(f"source must be (2, kv_heads, slots, head_dim), got {tuple(source.shape)}")
    _, heads, _, dim = source.shape
    if slots.ndim != 2 or slots.shape[0] != heads or counts.shape != (heads,):
        raise ValueError(f"slots must be ({heads}, capacity) and counts ({heads},), got "
                         f"{tuple(slots.shape)} and {tuple(counts.shape)}")
    if out.shape != (2, heads, slots.shape[1], dim) or out.dtype != source.dtype:
        raise ValueError(f"out must be (2, {heads}, {slots.shape[1]}, {dim}) of {source.dtype}, got "
                         f"{tuple(out.shape)} of {out.dtype}")
    if not source.is_contiguous() or not out.is_contiguous():
        raise ValueError("source and out must be contiguous")


def gather_tokens_reference(source: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
                            out: torch.Tensor) -> torch.Tensor:
    """``out[:, h, :counts[h]] = source[:, h, slots[h, :counts[h]]]`` by ``index_select`` (reads counts)."""
    _check(source, slots, counts, out)
    for h, n in enumerate(counts.tolist()):
        picked = source[:, h].index_select(1, slots[h, :n].to(source.device))
        out[:, h, :n].copy_(picked, non_blocking=True)
    return out


def gather_tokens(source: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, out: torch.Tensor,
                  block_tokens: int = BLOCK_TOKENS) -> torch.Tensor:
    """Gather the selected slots of every KV head into ``out`` (see the module docstring).

    ``source``: a pinned host (or device) tier; ``slots``, ``counts``, ``out``: on the GPU. One launch over
    (capacity / block_tokens, kv_heads, K/V); programs past a head's count return at once. Falls back to
    ``gather_tokens_reference`` where Triton cannot run."""
    _check(source, slots, counts, out)
    if not available(source, out):
        return gather_tokens_reference(source, slots, counts, out)
    # One tier: every slot below the split, so the two-tier kernel reads them all from ``source``.
    return gather_positions(source, source, source.shape[2], slots, counts, out, block_tokens=block_tokens)


def _check_two_tier(host: torch.Tensor, ring: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor,
                    out: torch.Tensor, out_offset: int) -> None:
    if host.ndim != 4 or ring.ndim != 4 or host.shape[:2] != ring.shape[:2] or host.shape[3] != ring.shape[3]:
        raise ValueError(f"host and ring must be (2, kv_heads, slots, head_dim) alike, got {tuple(host.shape)} "
                         f"and {tuple(ring.shape)}")
    _, heads, _, dim = ring.shape
    if positions.ndim != 2 or positions.shape[0] != heads or counts.shape != (heads,):
        raise ValueError(f"positions must be ({heads}, capacity) and counts ({heads},), got "
                         f"{tuple(positions.shape)} and {tuple(counts.shape)}")
    if out.ndim != 4 or out.shape[:2] != (2, heads) or out.shape[3] != dim or out.dtype != ring.dtype \
            or out.shape[2] < out_offset + positions.shape[1]:
        raise ValueError(f"out must be (2, {heads}, >= {out_offset + positions.shape[1]}, {dim}) of {ring.dtype}, "
                         f"got {tuple(out.shape)} of {out.dtype}")
    if not (host.is_contiguous() and ring.is_contiguous() and out.is_contiguous()):
        raise ValueError("host, ring and out must be contiguous")


def gather_positions_reference(host: torch.Tensor, ring: torch.Tensor, split: int | torch.Tensor,
                               positions: torch.Tensor, counts: torch.Tensor, out: torch.Tensor,
                               out_offset: int = 0) -> torch.Tensor:
    """``gather_positions`` by ``index_select``, head by head (reads ``counts`` and a device ``split``: the
    oracle and the CPU path)."""
    _check_two_tier(host, ring, positions, counts, out, out_offset)
    split = int(split)
    for h, n in enumerate(counts.tolist()):
        p = positions[h, :n].cpu()
        old = p < split
        dst = out[:, h, out_offset : out_offset + n]
        if old.any():
            dst[:, old.to(dst.device)] = host[:, h].index_select(1, p[old].to(host.device)).to(dst.device)
        if (~old).any():
            slots = (p[~old] % ring.shape[2]).to(ring.device)
            dst[:, (~old).to(dst.device)] = ring[:, h].index_select(1, slots).to(dst.device)
    return out


if triton is not None:

    @triton.jit
    def _gather_two_tier_kernel(host, ring, positions, counts, out, split, host_slots, ring_slots, row_stride,
                                out_slots, out_offset, HEADS: tl.constexpr, DIM: tl.constexpr,
                                BLOCK_T: tl.constexpr, SPLIT_ON_DEVICE: tl.constexpr):
        if SPLIT_ON_DEVICE:
            split = tl.load(split)
        block = tl.program_id(0)
        head = tl.program_id(1)
        plane = tl.program_id(2)  # 0: K, 1: V
        n = tl.load(counts + head)
        start = block * BLOCK_T
        if start < n:
            rows = start + tl.arange(0, BLOCK_T)
            valid = rows < n
            pos = tl.load(positions + head.to(tl.int64) * row_stride + rows, mask=valid, other=0)
            old = valid & (pos < split)
            new = valid & (pos >= split)
            cols = tl.arange(0, DIM)
            base = (plane * HEADS + head).to(tl.int64)
            from_host = tl.load(host + (base * host_slots + pos)[:, None] * DIM + cols[None, :],
                                mask=old[:, None], other=0.0)
            from_ring = tl.load(ring + (base * ring_slots + pos % ring_slots)[:, None] * DIM + cols[None, :],
                                mask=new[:, None], other=0.0)
            values = tl.where(old[:, None], from_host, from_ring)
            dst = (base * out_slots + out_offset + rows.to(tl.int64))[:, None] * DIM + cols[None, :]
            tl.store(out + dst, values, mask=valid[:, None])


def gather_positions(host: torch.Tensor, ring: torch.Tensor, split: int | torch.Tensor, positions: torch.Tensor,
                     counts: torch.Tensor, out: torch.Tensor, out_offset: int = 0,
                     block_tokens: int = BLOCK_TOKENS) -> torch.Tensor:
    """Gather stream positions from a two-tier layer store into ``out``, one launch for every KV head.

    ``host`` (2, kv_heads, S, head_dim) holds position p at slot p (pinned host memory on CUDA: read in place
    over the link); ``ring`` (2, kv_heads, W, head_dim) on the device holds the recent positions, p at slot
    p % W. Positions below ``split`` come from the host, the others from the ring. ``positions`` (kv_heads,
    capacity) with ``counts`` (kv_heads,) on the GPU as in ``gather_tokens`` (rows may be strided, e.g. a
    slice of a wider table); row h's tokens land at
    ``out[:, h, out_offset : out_offset + counts[h]]``. ``split`` may be a one-element int64 device tensor
    (read by the kernel: steps captured in CUDA graphs). No host read; falls back to
    ``gather_positions_reference`` where Triton cannot run."""
    _check_two_tier(host, ring, positions, counts, out, out_offset)
    if not (triton is not None and out.is_cuda and all(t.is_cuda or t.is_pinned() for t in (host, ring))):
        return gather_positions_reference(host, ring, split, positions, counts, out, out_offset)
    _, heads, _, dim = ring.shape
    if dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Triton gather, got {dim}")
    if positions.stride(1) != 1:
        raise ValueError("positions must be contiguous along its rows")
    capacity = positions.shape[1]
    grid = (triton.cdiv(max(capacity, 1), block_tokens), heads, 2)
    _gather_two_tier_kernel[grid](host, ring, positions, counts.to(torch.int32), out, split, host.shape[2],
                                  ring.shape[2], positions.stride(0), out.shape[2], out_offset,
                                  HEADS=heads, DIM=dim, BLOCK_T=block_tokens,
                                  SPLIT_ON_DEVICE=torch.is_tensor(split))
    return out
