"""Channel importance of gated FFNs (POP's Eq. 3 in the reading DESIGN.md fixes).

Intermediate channel i of a gated FFN carries ``H[..., i] = act(x W_gate[i]^T) * (x W_up[i]^T)`` into
column i of ``W_down``. Its importance is the joint contribution of activation and weight:

    I_i = ||H[:, :, i]||_2 * ||W_down[:, i]||_2

with the activation norm taken over batch and tokens (pad positions excluded). The same formula scores
all channels at prefill and the Candidate channels of each decode step. Pure tensor functions only.
"""

from __future__ import annotations

from typing import Callable

import torch


def gated_activation(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    gate_up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x W_g^T) * (x W_u^T)`` from one stacked weight ``[W_g; W_u]`` of shape (2n, hidden).

    Stacking gate and up rows makes the two projections one matmul over only the rows given.
    """
    gu = torch.nn.functional.linear(x, gate_up_weight, gate_up_bias)
    gate, up = gu.chunk(2, dim=-1)
    return act_fn(gate) * up


def down_column_norms(down_weight: torch.Tensor) -> torch.Tensor:
    """||W_down[:, i]||_2 for every intermediate channel i (float32)."""
    return down_weight.float().norm(dim=0)


def activation_norms(h: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """||H[..., i]||_2 over all leading dims (batch, tokens), skipping positions where token_mask is 0.

    Args:
        h: (..., n) intermediate activations.
        token_mask: optional (...) mask of the leading dims; 0 marks padding.
    """
    h = h.float()
    if token_mask is not None:
        h = h * token_mask.to(h.dtype).unsqueeze(-1)
    return h.reshape(-1, h.shape[-1]).pow(2).sum(0).sqrt()


def channel_scores(
    h: torch.Tensor, col_norms: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """POP importance ``||H[:, :, i]||_2 * ||W_down[:, i]||_2`` of each channel present in `h`.

    `col_norms` must be aligned with the last dim of `h` (already sliced to the same channels).
    """
    return activation_norms(h, token_mask) * col_norms.to(device=h.device, dtype=torch.float32)
