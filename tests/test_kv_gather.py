"""The one-launch KV gather: equal to index_select on every head, from pinned host memory on CUDA."""

from __future__ import annotations

import os

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


def _append_case_device() -> str | None:
    """Where the Triton append kernel runs here: CUDA, the CPU under Triton's interpreter, or nowhere."""
    from lfmsift.kernels import kv_append

    if kv_append.triton is None:
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


@pytest.mark.parametrize("start, tokens, window", [(0, 11, 64), (60, 11, 64), (5, 64, 64), (1000, 37, 40)])
@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("start_on_device", [False, True], ids=["host-start", "device-start"])
def test_append_writes_each_position_to_its_ring_and_host_slot(start, tokens, window, kernel, start_on_device):
    """Position p lands at ring slot p % window and host slot p; nothing else changes (hand oracle). The
    start may be a device scalar (steps captured in CUDA graphs)."""
    from lfmsift.kernels.kv_append import append_positions, append_positions_reference

    device = _append_case_device() if kernel else "cpu"
    if device is None:
        pytest.skip("needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(start + tokens)
    heads, dim = 3, 16
    kv = torch.randn(2, heads, tokens, dim, generator=gen).to(torch.bfloat16)
    ring = torch.randn(2, heads, window, dim, generator=gen).to(torch.bfloat16)
    host = torch.randn(2, heads, start + tokens + 5, dim, generator=gen).to(torch.bfloat16)
    want_ring, want_host = ring.clone(), host.clone()
    for t in range(tokens):  # element by element, the plain definition
        want_ring[:, :, (start + t) % window] = kv[:, :, t]
        want_host[:, :, start + t] = kv[:, :, t]
    if device == "cuda":
        kv_d, ring_d, host_d = kv.cuda(), ring.cuda(), host.pin_memory()
    else:
        kv_d, ring_d, host_d = kv, ring, host
    at = torch.tensor([start], device=kv_d.device) if start_on_device else start
    (append_positions if kernel else append_positions_reference)(kv_d, ring_d, host_d, at)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(ring_d.cpu(), want_ring)
    assert torch.equal(host_d.cpu(), want_host)


def test_append_refuses_what_does_not_fit():
    from lfmsift.kernels.kv_append import append_positions

    kv = torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError, match="does not fit a ring"):
        append_positions(kv, torch.zeros(2, 2, 4, 16), torch.zeros(2, 2, 64, 16), 0)
    with pytest.raises(ValueError, match="host must be"):
        append_positions(kv, torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 10, 16), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_ring_store_chunk_step_never_waits_for_the_gpu():
    """Appending a chunk to an offloading ring store and gathering from both tiers only queue work: issued
    behind a one-second GPU sleep, they return long before it ends (any wait would take the second)."""
    import time

    from lfmsift.kv.device_store import RingLayerStore
    from lfmsift.kernels.kv_gather import gather_positions

    store = RingLayerStore(4, 64, torch.bfloat16, "cuda", window=32, host_tokens=None)
    for start in range(0, 200, 11):
        n = min(11, 200 - start)
        store.reserve(n)  # as the cache does, once per chunk before the forward pass
        store.append(torch.randn(4, n, 64, device="cuda", dtype=torch.bfloat16),
                     torch.randn(4, n, 64, device="cuda", dtype=torch.bfloat16),
                     torch.zeros(n, dtype=torch.int64, device="cuda"))
    store.reserve(11)
    positions = torch.arange(100, device="cuda").expand(4, -1).contiguous()
    counts = torch.full((4,), 100, device="cuda")
    out = torch.zeros(2, 4, 128, 64, dtype=torch.bfloat16, device="cuda")
    gather_positions(store.host, store.ring, store.split, positions, counts, out)  # compiled before the timing
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
    t = time.perf_counter()
    store.append(torch.randn(4, 11, 64, device="cuda", dtype=torch.bfloat16),
                 torch.randn(4, 11, 64, device="cuda", dtype=torch.bfloat16),
                 torch.zeros(11, dtype=torch.int64, device="cuda"))
    gather_positions(store.host, store.ring, store.split, positions, counts, out)
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    assert issued < 0.2, f"the host waited {issued:.2f} s for the GPU"
