"""The one-launch KV gather: equal to index_select on every head, from pinned host memory on CUDA."""

from __future__ import annotations

import pytest
import torch

from lfmsift.kernels.kv_gather import gather_tokens, gather_tokens_reference


def _case(heads=3, slots=200, dim=16, capacity=70, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(2, heads, slots, dim, generator=gen).to(dtype)
    counts = torch.randint(0, capacity + 1, (heads,), generator=gen)
    chosen = torch.full((heads, capacity), -1, dtype=torch.int64)
    for h in range(heads):
        chosen[h, : counts[h]] = torch.randperm(slots, generator=gen)[: counts[h]].sort().values
    return source, chosen.clamp(min=0), counts


def test_reference_gathers_each_heads_slots():
    source, slots, counts = _case()
    out = torch.zeros(2, 3, 70, 16, dtype=torch.bfloat16)
    gather_tokens_reference(source, slots, counts, out)
    for h in range(3):
        for i in range(int(counts[h])):  # element by element, the plain definition
            assert torch.equal(out[:, h, i], source[:, h, int(slots[h, i])])
    assert gather_tokens(source, slots, counts, torch.zeros_like(out)).equal(out)  # CPU: the same path
    with pytest.raises(ValueError, match="out must be"):
        gather_tokens(source, slots, counts, torch.zeros(2, 3, 69, 16, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed, dim, block", [(0, 16, 16), (1, 128, 16), (2, 64, 32), (3, 128, 8)])
def test_triton_gather_from_pinned_host_equals_the_reference(seed, dim, block):
    source, slots, counts = _case(heads=4, slots=1000, dim=dim, capacity=300, seed=seed)
    source = source.pin_memory()
    want = torch.zeros(2, 4, 300, dim, dtype=torch.bfloat16)
    gather_tokens_reference(source, slots, counts, want)
    out = torch.full((2, 4, 300, dim), 7.0, dtype=torch.bfloat16, device="cuda")
    gather_tokens(source, slots.cuda(), counts.cuda(), out, block_tokens=block)
    torch.cuda.synchronize()
    for h in range(4):
        n = int(counts[h])
        assert torch.equal(out[:, h, :n].cpu(), want[:, h, :n])
        assert (out[:, h, n:] == 7.0).all()  # nothing written past the count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_gather_is_captured_in_a_cuda_graph():
    source, slots, counts = _case(heads=2, slots=500, dim=64, capacity=128, seed=5)
    source = source.pin_memory()
    slots_d, counts_d = slots.cuda(), counts.cuda()
    out = torch.zeros(2, 2, 128, 64, dtype=torch.bfloat16, device="cuda")
    gather_tokens(source, slots_d, counts_d, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_tokens(source, slots_d, counts_d, out)
    new = torch.randperm(500)[:128].sort().values
    slots_d[0].copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    n = int(counts[0])
    assert torch.equal(out[:, 0, :n].cpu(), source[:, 0, new[:n]])
