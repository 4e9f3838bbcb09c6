"""The selected-slots attention kernel against the float64 oracle, head by head on the selected tokens alone.

Runs where Triton runs: on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``). Shapes
cover a head with nothing selected, counts across several programs and not on block edges, more query rows
than one row block, chunks longer than one key block, and fp32 and bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

from lfmsift.kernels import gathered_attention
from lfmsift.kv.attention import attend_gathered, attend_masked, attend_reference


def _device() -> str | None:
    if gathered_attention.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


CASES = [  # kv heads, group, tokens, dim, start (padded past), counts
    (2, 4, 11, 128, 40, [17, 40]),
    (2, 3, 5, 16, 300, [0, 257]),
    (1, 2, 1, 32, 1024, [1000]),
    (4, 4, 20, 64, 520, [519, 256, 3, 0]),
    (1, 1, 70, 16, 16, [16]),
    (3, 2, 4, 16, 64, "expanded"),  # one count for every head, as an expanded device scalar (a prepared step)
]


@pytest.mark.skipif(_device() is None, reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv, group, tokens, dim, start, counts", CASES)
def test_kernel_attends_to_each_heads_selected_slots_and_the_chunk_causally(kv, group, tokens, dim, start, counts,
                                                                               dtype, monkeypatch):
    device = _device()
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 tiles wrongly (tl.dot); bf16 runs on CUDA")
    gen = torch.Generator().manual_seed(start + tokens)
    length = start + tokens + 7
    buffer = torch.randn(2, kv, length, dim, generator=gen)
    expanded = counts == "expanded"
    counts = torch.tensor([37]).expand(kv) if expanded else torch.tensor(counts)
    query = torch.randn(kv * group, tokens, dim, generator=gen)
    own = buffer[:, :, start : start + tokens]
    scale = dim ** -0.5
    want = attend_reference(query.to(dtype), [buffer[0, h, : counts[h]].to(dtype) for h in range(kv)],
                            [buffer[1, h, : counts[h]].to(dtype) for h in range(kv)], own[0].to(dtype),
                            own[1].to(dtype), scale)
    on_device = torch.tensor([37], device=device).expand(kv) if expanded else counts.to(device)
    got = gathered_attention.gathered_attention(query.to(device, dtype), buffer.to(device, dtype), on_device, start,
                                                scale)
    assert got.shape == (tokens, kv * group, dim) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=tol)
    # with the kernel switched on, attend_gathered takes it; the masked SDPA call agrees with it
    monkeypatch.setenv("LFMSIFT_ATTENTION_KERNEL", "1")
    masked = attend_masked(query.to(device, dtype), buffer.to(device, dtype), counts.to(device), start, scale)
    torch.testing.assert_close(attend_gathered(query.to(device, dtype), buffer.to(device, dtype), counts.to(device),
                                               start, scale).double().cpu(), masked.double().cpu(), atol=tol, rtol=tol)


def test_kernel_refuses_shapes_that_do_not_fit():
    if gathered_attention.triton is None:
        pytest.skip("needs Triton")
    with pytest.raises(ValueError, match="do not fit"):
        gathered_attention.gathered_attention(torch.zeros(3, 2, 16), torch.zeros(2, 2, 8, 16), torch.zeros(2), 4, 1.0)
    with pytest.raises(ValueError, match="pass the buffer"):
        gathered_attention.gathered_attention(torch.zeros(4, 5, 16), torch.zeros(2, 2, 8, 16), torch.zeros(2), 4, 1.0)
