"""The one sequential step of leader clustering: which tokens of a chunk found a new cluster.

Within a chunk, token t founds a cluster unless an earlier *founder* of the chunk, or a cluster open
before the chunk, is closer than the Hamming threshold (``HashClusterTable.assign``). Whether t is a founder
depends on which earlier tokens were, so the decision is a walk over the chunk in token order; everything
else of the assignment is a vectorized function of its result (``DeviceClusterTable.assign``).

``founders(close, can_found)``: ``close`` (T, T) bool, ``close[t, f]`` for f < t when f is within the
threshold of t; ``can_found`` (T,) bool, t has no open old cluster within the threshold. On CUDA one Triton
program walks the chunk with the founder flags in registers (a chunk is tens of tokens); elsewhere a loop of
tensor operations does the same on the tensors' device. Neither reads anything back to the host.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU machines and CI run the PyTorch path
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None


def founders_reference(close: torch.Tensor, can_found: torch.Tensor) -> torch.Tensor:
    """The walk as a loop of tensor operations (no host reads); (T,) bool."""
    tokens = can_found.shape[0]
    founder = torch.zeros(tokens, dtype=torch.bool, device=can_found.device)
    for t in range(tokens):
        founder[t] = can_found[t] & ~(close[t, :t] & founder[:t]).any()
    return founder


if triton is not None:

    @triton.jit
    def _founders_kernel(close, can_found, out, tokens, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        founder = tl.zeros([BLOCK], dtype=tl.int32)
        for t in range(tokens):
            row = tl.load(close + t * tokens + cols, mask=cols < t, other=0).to(tl.int32)
            blocked = tl.sum(row * founder, axis=0)
            can = tl.load(can_found + t).to(tl.int32)
            flag = tl.where(blocked > 0, 0, can)
            founder = tl.where(cols == t, flag, founder)
        tl.store(out + cols, founder.to(tl.int8), mask=cols < tokens)


def founders(close: torch.Tensor, can_found: torch.Tensor) -> torch.Tensor:
    """Founder flags (T,) bool of a chunk (see the module docstring)."""
    tokens = can_found.shape[0]
    if close.shape != (tokens, tokens):
        raise ValueError(f"close must be ({tokens}, {tokens}), got {tuple(close.shape)}")
    if triton is None or not can_found.is_cuda or tokens == 0:
        return founders_reference(close, can_found)
    out = torch.empty(tokens, dtype=torch.int8, device=can_found.device)
    block = max(16, triton.next_power_of_2(tokens))
    _founders_kernel[(1,)](close.to(torch.int8).contiguous(), can_found.to(torch.int8), out, tokens, BLOCK=block)
    return out.bool()
