"""POP's Triton decode kernels equal the PyTorch path (CUDA only; skipped on machines without a GPU)."""

import pytest
import torch

from lfmsift.models.adapters import GatedFFN
from lfmsift.prune import triton_pop
from lfmsift.prune.pop import POPFFN

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_pop.triton is not None), reason="needs a CUDA GPU and Triton"
)


def _mlp(hidden, d_ff, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=d_ff)).cuda().to(dtype).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.02)
    return mlp, GatedFFN(mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)


@pytest.mark.parametrize("batch", [1, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_triton_decode_equals_torch_decode(batch, dtype):
    torch.manual_seed(batch)
    mlp, view = _mlp(256, 1000, dtype)
    fast = POPFFN(view, 0.3, 0.0, "static", kernels="auto")
    slow = POPFFN(view, 0.3, 0.0, "static", kernels="torch")
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        prompt = torch.randn(batch, 17, 256, device="cuda", dtype=dtype)
        torch.testing.assert_close(fast(prompt), slow(prompt))
        for _ in range(3):
            x = torch.randn(batch, 1, 256, device="cuda", dtype=dtype)
            torch.testing.assert_close(fast(x), slow(x), rtol=tol, atol=tol)


def test_gated_gemv_equals_torch():
    torch.manual_seed(0)
    for tokens, n, hidden in ((1, 300, 512), (10, 1000, 256), (64, 17, 4096)):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2 * n, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
        gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
        got = triton_pop.gated_gemv(x, w).float()
        assert float((got - ref).norm() / ref.norm()) < 1e-2


def test_gated_rows_into_a_column_range_of_a_buffer():
    torch.manual_seed(1)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * 100, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    out = torch.full((3, 130), 7.0, device="cuda", dtype=torch.bfloat16)
    triton_pop.gated_rows(x, w[40:100], w[140:200], out[:, 30:90])   # rows 40.. of gate and of up
    gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate[:, 40:]) * up[:, 40:]
    assert float((out[:, 30:90].float() - ref).norm() / ref.norm()) < 1e-2
    assert (out[:, :30] == 7).all() and (out[:, 90:] == 7).all()    # nothing written outside the range


@pytest.mark.parametrize("batch", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_equals_torch_decode(batch, dtype):
    torch.manual_seed(batch)
    mlp, view = _mlp(256, 1000, dtype)
    fast = POPFFN(view, 0.3, 0.05, "pop", kernels="auto")
    slow = POPFFN(view, 0.3, 0.05, "pop", kernels="torch")
    counted = 0
    with torch.no_grad():
        for step in range(3):
            prompt = torch.randn(batch, 17, 256, device="cuda", dtype=dtype)
            torch.testing.assert_close(fast(prompt), slow(prompt))
            for _ in range(4):
                x = torch.randn(batch, 1, 256, device="cuda", dtype=dtype)
                a, b = fast(x), slow(x)
                s = fast.sizes
                expected = fast._select(fast._gated(x)[..., s.n_retained:], fast.cand_col_norms_sq, s.k_select)
                chosen = fast.down_index[s.n_retained:].long() - s.n_retained
                assert torch.equal(torch.sort(chosen).values, torch.sort(expected).values)  # the same channels
                counted += int((chosen < s.n_keep - s.n_retained).sum())
                tol = 2e-3 if dtype == torch.float32 else 2e-2  # tl.dot in float32 is tf32
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        # the selection kernel's own count of chosen channels that were in the prefill top set
        assert int(fast.counters.overlap_acc) == counted > 0


def test_select_breaks_ties_by_position_and_keeps_exactly_k():
    h = torch.zeros(1, 10, device="cuda")
    h[0, 4:] = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0, 0.0], device="cuda")  # candidates start at 4
    index = torch.arange(6, dtype=torch.int32, device="cuda")
    triton_pop.select_candidates(h, torch.ones(6, device="cuda"), index, n_retained=4, k=2)
    assert index[4:].tolist() == [4, 7]  # the 2.0, then the first of the tied 1.0s
