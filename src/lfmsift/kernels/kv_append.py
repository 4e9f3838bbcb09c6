"""Write one chunk's K/V into a two-tier layer store, the device ring and the pinned host tier, in one launch.

The store of the GPU path (``kv.device_store``) writes every arriving position p twice: into the device
ring at slot p % W and into the host tier at slot p. Both tiers are laid out (2, kv_heads, slots, head_dim),
so a chunk of n positions is 2 * kv_heads runs of n rows in each tier: the host rows are not one contiguous
block. PyTorch copies a device tensor into such a strided host view through a temporary in pageable memory
(a copy the host waits for, then a host-side copy), so that "asynchronous" write-through would hold the host
at every layer. This kernel stores the rows straight into pinned host memory (mapped into the GPU's address
space) and into the ring from one program per (block of rows, head, K/V): nothing is staged and nothing
waits; it can be captured in a CUDA graph.

``append_positions(kv, ring, host, start)``; ``append_positions_reference`` is the same by slicing (the
oracle in the tests, and the path on CPU). ``start`` may be a one-element int64 device tensor (the path
whose steps are captured in CUDA graphs keeps its positions on the device): the kernel then reads it, and
the PyTorch path writes by ``index_copy_`` at the positions it implies.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU machines and CI run the PyTorch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None

BLOCK_TOKENS = 16


def available(kv: torch.Tensor, ring: torch.Tensor, host: torch.Tensor) -> bool:
    """Whether the Triton write can run: device K/V and ring, a pinned (or device) host tier. Turned off by
    ``LFMSIFT_APPEND_KERNEL=0`` (the strided copies, for measuring what the kernel saves)."""
    if os.environ.get("LFMSIFT_APPEND_KERNEL", "1") in ("0", "false", "no"):
        return False
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs the kernel on CPU tensors
        return True
    return kv.is_cuda and ring.is_cuda and (host.is_cuda or host.is_pinned())


def _check(kv: torch.Tensor, ring: torch.Tensor, host: torch.Tensor, start: int | torch.Tensor) -> None:
    if torch.is_tensor(start):
        if start.numel() != 1 or start.dtype != torch.int64 or start.device != kv.device:
            raise ValueError(f"a device start must be one int64 on {kv.device}, got {start.dtype} {tuple(start.shape)} "
                             f"on {start.device}")
        start = 0  # its value is on the device: the host checks only what the shapes tell
    if kv.ndim != 4 or kv.shape[0] != 2 or ring.ndim != 4 or ring.shape[:2] != kv.shape[:2] \
            or ring.shape[3] != kv.shape[3]:
        raise ValueError(f"kv (2, kv_heads, tokens, head_dim) and ring (2, kv_heads, slots, head_dim) must agree, "
                         f"got {tuple(kv.shape)} and {tuple(ring.shape)}")
    n = kv.shape[2]
    if host.shape[:2] != kv.shape[:2] or host.shape[3] != kv.shape[3] or host.shape[2] < start + n:
        raise ValueError(f"host must be (2, {kv.shape[1]}, >= {start + n}, {kv.shape[3]}), got {tuple(host.shape)}")
    if n > ring.shape[2]:
        raise ValueError(f"a chunk of {n} tokens does not fit a ring of {ring.shape[2]} slots")
    if kv.dtype != ring.dtype or host.dtype != ring.dtype:
        raise ValueError("kv, ring and host must have one dtype")


def append_positions_reference(kv: torch.Tensor, ring: torch.Tensor, host: torch.Tensor, start: int) -> None:
    """Positions ``start .. start + n`` of ``kv`` (2, kv_heads, n, head_dim) into ``ring`` at slots
    p % ring_slots (one or two runs) and into ``host`` at slots p."""
    _check(kv, ring, host, start)
    _append_by_slicing(kv, ring, host, start)


def _append_by_slicing(kv: torch.Tensor, ring: torch.Tensor, host: torch.Tensor, start: int | torch.Tensor) -> None:
    n, window = kv.shape[2], ring.shape[2]
    if torch.is_tensor(start):  # positions on the device: written where they point, nothing read back
        if host.device != kv.device:
            raise ValueError("a device start needs the Triton write for a host tier on another device")
        positions = start.reshape(1) + torch.arange(n, device=kv.device)
        ring.index_copy_(2, positions % window, kv)
        if host.data_ptr() != ring.data_ptr():
            host.index_copy_(2, positions, kv)
        return
    first = start % window
    head = min(n, window - first)
    ring[:, :, first : first + head] = kv[:, :, :head]
    if head < n:
        ring[:, :, : n - head] = kv[:, :, head:]
    host[:, :, start : start + n].copy_(kv, non_blocking=host.is_pinned())


if triton is not None:

    @triton.jit
    def _append_kernel(kv, ring, host, start, tokens, ring_slots, host_slots, HEADS: tl.constexpr,
                       DIM: tl.constexpr, BLOCK_T: tl.constexpr, START_ON_DEVICE: tl.constexpr):
        if START_ON_DEVICE:
            start = tl.load(start)
        block = tl.program_id(0)
        head = tl.program_id(1)
        plane = tl.program_id(2)  # 0: K, 1: V
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = rows < tokens
        cols = tl.arange(0, DIM)
        base = (plane * HEADS + head).to(tl.int64)
        values = tl.load(kv + (base * tokens + rows)[:, None] * DIM + cols[None, :], mask=valid[:, None])
        pos = start + rows.to(tl.int64)
        tl.store(ring + (base * ring_slots + pos % ring_slots)[:, None] * DIM + cols[None, :], values,
                 mask=valid[:, None])
        tl.store(host + (base * host_slots + pos)[:, None] * DIM + cols[None, :], values, mask=valid[:, None])


def append_positions(kv: torch.Tensor, ring: torch.Tensor, host: torch.Tensor, start: int | torch.Tensor,
                     block_tokens: int = BLOCK_TOKENS) -> None:
    """As ``append_positions_reference``, in one launch over (n / block_tokens, kv_heads, K/V) where Triton
    can run (see ``available``; head_dim a power of two); else by slicing."""
    _check(kv, ring, host, start)
    if not available(kv, ring, host) or kv.shape[3] & (kv.shape[3] - 1):
        return _append_by_slicing(kv, ring, host, start)
    kv = kv.contiguous()
    heads, n, dim = kv.shape[1], kv.shape[2], kv.shape[3]
    grid = (triton.cdiv(max(n, 1), block_tokens), heads, 2)
    _append_kernel[grid](kv, ring, host, start, n, ring.shape[2], host.shape[2], HEADS=heads, DIM=dim,
                         BLOCK_T=block_tokens, START_ON_DEVICE=torch.is_tensor(start))
