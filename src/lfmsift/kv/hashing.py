"""Random-hyperplane hash bits of keys and Hamming distances (ReSV step 1, V-Rex §IV-B).

A token's key hash is ``sign(k_flat @ P) > 0`` packed into one integer, where ``k_flat`` is the token's
post-RoPE key with all KV heads concatenated (``num_kv_heads * head_dim`` values) and ``P`` holds ``bits``
Gaussian hyperplanes drawn once per layer from a fixed seed. The paper uses 32 bits; the choice of
Gaussian hyperplanes, one set per layer and concatenated KV heads is ours (the digest's A2/A3).
Hashes are int64 tensors holding up to 64 bits (bit 63 is the sign bit: the value is a bit pattern, and
XOR and the SWAR popcount work on it unchanged), so XOR and popcount stay in plain integer ops.
"""

from __future__ import annotations

import torch

DEFAULT_HASH_BITS = 32
_MAX_BITS = 64


def hyperplanes(dim: int, bits: int = DEFAULT_HASH_BITS, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """(dim, bits) standard-normal hyperplanes, reproducible from ``seed`` and ``layer`` (fp32, CPU)."""
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"hash bits must be in 1..{_MAX_BITS}, got {bits}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(dim, bits, generator=gen)


def hash_bits(keys: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Pack ``keys @ planes > 0`` into one int64 per token.

    keys: (tokens, dim) — per token the concatenated post-RoPE keys of all KV heads.
    Returns (tokens,) int64 with bit j set when the key lies on the positive side of hyperplane j
    (the paper's binarization: x <= 0 -> 0, x > 0 -> 1).
    """
    if keys.ndim != 2 or keys.shape[1] != planes.shape[0]:
        raise ValueError(f"keys must be (tokens, {planes.shape[0]}), got {tuple(keys.shape)}")
    projected = keys.float() @ planes.to(keys.device)
    weights = torch.pow(2, torch.arange(planes.shape[1], device=keys.device, dtype=torch.int64))
    return ((projected > 0).to(torch.int64) * weights).sum(dim=-1)


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 bit pattern (all 64 bits), by SWAR arithmetic (no lookup tables);
    the masks drop the bits an arithmetic shift copies in from the sign."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    # Sum the eight byte counts without a 64-bit multiply overflow: fold halves.
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance by XOR + popcount; broadcasts like ``a ^ b``."""
    return popcount(torch.bitwise_xor(a, b))
