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


@pytest.mark.parametrize("weights", ["slices", "index"])
@pytest.mark.parametrize("batch", [1, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_triton_decode_equals_torch_decode(batch, dtype, weights):
    torch.manual_seed(batch)
    _, view = _mlp(256, 1000, dtype)
    fast = POPFFN(view, 0.3, 0.0, "static", kernels="auto", weights=weights)
    slow = POPFFN(view, 0.3, 0.0, "static", kernels="torch")
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        prompt = torch.randn(batch, 17, 256, device="cuda", dtype=dtype)
        torch.testing.assert_close(fast(prompt), slow(prompt))
        for _ in range(3):
            x = torch.randn(batch, 1, 256, device="cuda", dtype=dtype)
            torch.testing.assert_close(fast(x), slow(x), rtol=tol, atol=tol)


def test_gated_rows_equals_torch():
    torch.manual_seed(0)
    for tokens, n, hidden in ((1, 300, 512), (10, 1000, 256), (64, 17, 4096)):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2 * n, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
        gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
        got = triton_pop.gated_rows(x, w[:n], w[n:], torch.empty((tokens, n), device="cuda", dtype=x.dtype)).float()
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



@pytest.mark.parametrize("ties", [False, True])
def test_partition_index_equals_the_sorted_partition(ties):
    """The sort-free partition kernel writes the sets of `partition.partition` (ties to the lower id)."""
    from lfmsift.prune.partition import partition

    torch.manual_seed(4)
    for n, r, delta in ((11008, 0.3, 0.05), (1000, 0.5, 0.0), (300, 0.1, 0.1), (14336, 0.0, 0.0)):
        scores = torch.rand(n, device="cuda")
        if ties:  # few distinct values, zeros and a negative zero
            scores = (scores * 8).floor() / 8
            scores[5] = -0.0
        norms = torch.rand(n, device="cuda")
        part = partition(scores, r, delta)
        s = part.sizes
        retained, cand, keep = part.retained.sort().values, part.candidates.sort(), part.keep.sort().values
        for pop in (True, False):
            chan = torch.empty(s.n_computed if pop else s.n_keep, dtype=torch.int32, device="cuda")
            rows, kept = (torch.empty(s.n_keep, dtype=torch.int32, device="cuda") for _ in range(2))
            in_top = torch.empty(s.n_candidates, dtype=torch.int8, device="cuda")
            cand_norms = torch.empty(s.n_candidates, device="cuda")
            triton_pop.partition_index(scores, s.n_retained, s.n_keep, s.n_computed, chan, rows, kept,
                                       in_top if pop else None, norms if pop else None, cand_norms if pop else None)
            assert torch.equal(kept.long(), keep)
            if pop:
                assert torch.equal(chan.long(), torch.cat((retained, cand.values)))
                assert torch.equal(rows[: s.n_retained].long(), retained)
                assert torch.equal(in_top.bool(), cand.indices < s.n_keep - s.n_retained)
                assert torch.equal(cand_norms, norms[cand.values])
            else:
                assert torch.equal(chan.long(), keep) and torch.equal(rows, chan)

@pytest.mark.parametrize("weights", ["slices", "index"])
@pytest.mark.parametrize("gated_select", ["always", "never"])  # gate/up + selection in one launch, or ranked_step
@pytest.mark.parametrize("batch", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_equals_torch_decode(batch, dtype, gated_select, weights, monkeypatch):
    monkeypatch.setattr(triton_pop, "GATED_SELECT", gated_select)
    torch.manual_seed(batch)
    mlp, view = _mlp(256, 1000, dtype)
    fast = POPFFN(view, 0.3, 0.05, "pop", kernels="auto", weights=weights)
    slow = POPFFN(view, 0.3, 0.05, "pop", kernels="torch")
    counted = 0
    with torch.no_grad():
        for step in range(3):
            prompt = torch.randn(batch, 17, 256, device="cuda", dtype=dtype)
            torch.testing.assert_close(fast(prompt), slow(prompt))
            chan = fast.chan.long()
            s = fast.sizes
            if weights == "index":
                assert fast.w_gate_up is None  # no weight copy
            else:  # the slices follow the channel vector: R then C, each by channel id
                assert torch.equal(fast.w_gate_up[:, 0], mlp.gate_proj.weight[chan])
                assert torch.equal(fast.w_gate_up[:, 1], mlp.up_proj.weight[chan])
                assert torch.equal(fast.w_down_rows, mlp.down_proj.weight.t()[chan])
            assert set(chan[: s.n_retained].tolist()) == set(slow.partition.retained.tolist())
            assert set(chan[s.n_retained:].tolist()) == set(slow.partition.candidates.tolist())
            for _ in range(4):
                x = torch.randn(batch, 1, 256, device="cuda", dtype=dtype)
                a, b = fast(x), slow(x)
                # the same rule on the kernel's own activations: the k best Candidates, as channels
                h = _step_activations(fast, view, x.reshape(batch, -1))
                expected = chan[s.n_retained + fast._select(h[:, s.n_retained:], fast.cand_col_norms_sq, s.k_select)]
                chosen_pos = fast.down_index[s.n_retained:].long()
                if weights == "index":
                    chosen = fast.down_rows[s.n_retained:].long()
                    assert torch.equal(chan[chosen_pos], chosen)  # rows written beside positions
                else:  # the slice rows are the positions
                    chosen = chan[chosen_pos]
                assert torch.equal(torch.sort(chosen).values, torch.sort(expected).values)  # the same channels
                rank = torch.empty_like(fast.partition.order)
                rank[fast.partition.order] = torch.arange(s.d_ff, device="cuda")
                counted += int((rank[chosen] < s.n_keep).sum())
                tol = 2e-3 if dtype == torch.float32 else 2e-2  # tl.dot in float32 is tf32
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            assert not fast.down_acc.acc.any() and not fast.down_acc.tickets.any()  # left clean for the next step
            one_launch = gated_select == "always" and not (weights == "slices" and batch == 1)  # else sliced_step
            assert isinstance(fast.cand_scratch, triton_pop.CandidateScratch) == one_launch
        # the selection kernel's own count of chosen channels that were in the prefill top set
        assert int(fast.counters.overlap_acc) == counted > 0


def _step_activations(pop, view, x):
    """The activations POP's Triton step computed for x: its kernels are deterministic, so a second call
    on fresh scratch gives the same bits (the one-launch step sums split partials; ranked_step's gate/up
    computes what gated_rows does; sliced_step's own gate/up at one token over the slices)."""
    s = pop.sizes
    if pop.weights == "slices" and x.shape[0] == 1:
        return triton_pop.sliced_step(
            x, pop.w_gate_up, pop.w_down_rows, s.n_retained, pop.cand_col_norms_sq, pop.down_index.clone(),
            s.k_select, triton_pop.DownAccumulator.for_shape(None, 1, pop.hidden_size, x.device),
            triton_pop.RankScratch.for_shape(None, s.n_candidates, x.device))[0]
    if pop.weights == "slices":
        g, u, chan = pop.w_gate_up[:, 0], pop.w_gate_up[:, 1], pop.slice_chan
    else:
        g, u, chan = view.gate_proj.weight, view.up_proj.weight, pop.chan
    if not isinstance(pop.cand_scratch, triton_pop.CandidateScratch):
        h = torch.empty((x.shape[0], chan.numel()), device="cuda", dtype=x.dtype)
        return triton_pop.gated_rows(x, g, u, h, chan=chan)
    split = pop.cand_scratch.partial.shape[0] // 2
    scratch = triton_pop.CandidateScratch.for_shape(None, x.shape[0], s.n_candidates, split, x.device)
    return triton_pop.gated_select(x, g, u, chan, s.n_retained, pop.cand_col_norms_sq, pop.down_index.clone(),
                                   pop.down_index.clone(), s.k_select, scratch)


@pytest.mark.parametrize("tokens", [1, 3, 10])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_gated_select_computes_gated_rows_and_selects_what_select_candidates_does(tokens, split):
    torch.manual_seed(tokens * 10 + split)
    hidden, d_ff, n_r, n_c, k = 512, 1500, 500, 333, 150
    g = torch.randn(d_ff, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    u = torch.randn(d_ff, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    chan = torch.randperm(d_ff, device="cuda")[: n_r + n_c].to(torch.int32)
    tied = chan[n_r::8].long()  # every 8th Candidate has the same gate/up rows: tied scores
    g[tied], u[tied] = g[tied[0]].clone(), u[tied[0]].clone()
    cn = torch.ones(n_c, device="cuda")
    in_top = (torch.rand(n_c, device="cuda") < 0.5).to(torch.int8)
    scratch = triton_pop.CandidateScratch.for_shape(None, tokens, n_c, split, torch.device("cuda"))
    overlap, expected_overlap = torch.zeros((), dtype=torch.long, device="cuda"), 0
    blocks = -(-n_c // triton_pop.GATED_CONFIG["BLOCK_N"])
    for call in range(3):  # scratch is reused: tickets back at zero, the done count grows
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        index = torch.arange(n_r + k, device="cuda", dtype=torch.int32)
        rows = chan[:n_r + k].clone()
        index[n_r:], rows[n_r:] = -1, -1
        h = triton_pop.gated_select(x, g, u, chan, n_r, cn, index, rows, k, scratch, overlap, in_top)
        ref = torch.empty_like(h)
        triton_pop.gated_rows(x, g, u, ref, chan=chan)
        torch.testing.assert_close(h, ref, rtol=2e-2, atol=2e-3)
        want = torch.arange(n_r + k, device="cuda", dtype=torch.int32)
        triton_pop.select_candidates(h, cn, want, n_r, k)
        assert torch.equal(torch.sort(index[n_r:]).values, torch.sort(want[n_r:]).values)  # the same positions
        assert torch.equal(rows[n_r:], chan[index[n_r:].long()])
        expected_overlap += int(in_top[index[n_r:].long() - n_r].sum())
        assert int(overlap) == expected_overlap
        assert not scratch.tickets.any() and int(scratch.done) == (call + 1) * blocks


@pytest.mark.parametrize("tokens", [1, 3, 10])
# 3,000 Candidates: more blocks than SMs (no limit here); k = 0: nothing to choose
@pytest.mark.parametrize(("n_c", "k"), [(333, 166), (3000, 1500), (333, 0)])
def test_ranked_step_computes_gated_rows_selects_what_select_candidates_does_and_its_down(tokens, n_c, k):
    torch.manual_seed(tokens * 10 + n_c + k)
    hidden, d_ff, n_r = 512, 5000, 700
    g = torch.randn(d_ff, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    u = torch.randn(d_ff, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    down_t = torch.randn(d_ff, 384, device="cuda", dtype=torch.bfloat16) * 0.05
    chan = torch.randperm(d_ff, device="cuda")[: n_r + n_c].to(torch.int32)
    tied = chan[n_r::8].long()  # every 8th Candidate has the same gate/up rows: tied scores
    g[tied], u[tied] = g[tied[0]].clone(), u[tied[0]].clone()
    cn = torch.rand(n_c, device="cuda") + 0.5
    cn[::8] = 1.0
    in_top = (torch.rand(n_c, device="cuda") < 0.5).to(torch.int8)
    scratch = triton_pop.RankScratch.for_shape(None, n_c, torch.device("cuda"))
    acc = triton_pop.DownAccumulator.for_shape(None, tokens, 384, torch.device("cuda"))
    overlap, expected_overlap = torch.zeros((), dtype=torch.long, device="cuda"), 0
    for _ in range(3):  # scratch and accumulator are reused: counters, tickets and sums back at zero
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        index = torch.arange(n_r + k, device="cuda", dtype=torch.int32)
        rows = chan[:n_r + k].clone()
        index[n_r:], rows[n_r:] = -1, -1
        h, out = triton_pop.pop_decode_step(x, g, u, chan, n_r, cn, down_t, index, rows, k, acc, scratch, overlap,
                                            in_top)
        ref = torch.empty_like(h)
        triton_pop.gated_rows(x, g, u, ref, chan=chan)
        assert torch.equal(h, ref)  # the same kernel code for the activations
        want = torch.arange(n_r + k, device="cuda", dtype=torch.int32)
        triton_pop.select_candidates(h, cn, want, n_r, k)
        assert torch.equal(torch.sort(index[n_r:]).values, torch.sort(want[n_r:]).values)  # the same positions
        assert torch.equal(rows[n_r:], chan[index[n_r:].long()])
        expected = h.float()[:, index.long()] @ down_t.float()[rows.long()]
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-3)
        expected_overlap += int(in_top[index[n_r:].long() - n_r].sum())
        assert int(overlap) == expected_overlap
        assert not scratch.counters.any() and not acc.tickets.any() and not acc.acc.any()


@pytest.mark.parametrize("dependent", ["auto", "never"])  # the down pass as a dependent launch (Hopper+) or not
@pytest.mark.parametrize(("n_c", "k"), [(333, 166), (3000, 1500), (333, 0), (0, 0)])  # (0, 0): static
def test_sliced_step_selects_what_select_candidates_does_and_computes_its_down(n_c, k, dependent, monkeypatch):
    monkeypatch.setattr(triton_pop, "SLICED_DEPENDENT_LAUNCH", dependent)
    torch.manual_seed(n_c + k)
    hidden, out_dim, n_r = 640, 384, 700
    n = n_r + n_c
    gate_up = torch.randn(n, 2, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    if n_c:
        gate_up[n_r::8] = gate_up[n_r].clone()  # every 8th Candidate the same rows: tied scores
    down_rows = torch.randn(n, out_dim, device="cuda", dtype=torch.bfloat16) * 0.05
    cn = torch.rand(n_c, device="cuda") + 0.5
    cn[::8] = 1.0
    in_top = (torch.rand(n_c, device="cuda") < 0.5).to(torch.int8)
    scratch = triton_pop.RankScratch.for_shape(None, n_c, torch.device("cuda")) if n_c else None
    acc = triton_pop.DownAccumulator.for_shape(None, 1, out_dim, torch.device("cuda"))
    overlap, expected_overlap = torch.zeros((), dtype=torch.long, device="cuda"), 0
    n_keep = n_r + k if n_c else n
    for _ in range(3):  # scratch and accumulator are reused: counters, tickets and sums back at zero
        x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
        index = torch.arange(n_keep, device="cuda", dtype=torch.int32)
        index[n_r:] = -1  # the chosen go here (nothing to choose with no Candidates)
        h, out = triton_pop.sliced_step(x, gate_up, down_rows, n_r, cn if n_c else None, index, k, acc, scratch,
                                        overlap, in_top)
        xf = x.float()
        ref_h = torch.nn.functional.silu(xf @ gate_up[:, 0].float().T) * (xf @ gate_up[:, 1].float().T)
        torch.testing.assert_close(h.float(), ref_h, rtol=2e-2, atol=2e-3)
        want = torch.arange(n_keep, device="cuda", dtype=torch.int32)
        if n_c:
            triton_pop.select_candidates(h, cn, want, n_r, k)
        assert torch.equal(torch.sort(index[n_r:]).values, torch.sort(want[n_r:]).values)  # the same positions
        expected = h.float()[:, index.long()] @ down_rows.float()[index.long()]
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-3)
        expected_overlap += int(in_top[index[n_r:].long() - n_r].sum()) if n_c else 0
        assert int(overlap) == expected_overlap
        assert not acc.tickets.any() and not acc.acc.any()
        assert scratch is None or not scratch.counters.any()


def test_dependent_launch_is_on_from_hopper_and_off_when_told(monkeypatch):
    device = torch.device("cuda")
    assert triton_pop.dependent_launch(device) == (torch.cuda.get_device_capability(device)[0] >= 9)
    monkeypatch.setattr(triton_pop, "SLICED_DEPENDENT_LAUNCH", "never")
    assert not triton_pop.dependent_launch(device)


def test_gated_select_refuses_more_candidate_blocks_than_sms():
    """Its block finishers wait for each other: more blocks than SMs could fill the GPU with waiting ones."""
    device = torch.device("cuda")
    n_c = triton_pop.GATED_CONFIG["BLOCK_N"] * torch.cuda.get_device_properties(device).multi_processor_count + 1
    assert not triton_pop.use_gated_select(100 * n_c, n_c, device)  # ranked_step runs instead
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_c, 64, device="cuda", dtype=torch.bfloat16)
    chan = torch.arange(n_c, device="cuda", dtype=torch.int32)
    index = torch.zeros(n_c // 2, device="cuda", dtype=torch.int32)
    scratch = triton_pop.CandidateScratch.for_shape(None, 1, n_c, 1, device)
    with pytest.raises(ValueError, match="streaming multiprocessor"):
        triton_pop.gated_select(x, w, w, chan, 0, torch.ones(n_c, device="cuda"), index, index.clone(), n_c // 2,
                                scratch)


@pytest.mark.parametrize("weights", ["slices", "index"])
def test_long_decode_step_falls_back_to_slices(weights):
    """A decode forward of more than 64 tokens takes PyTorch's matmuls over the slices (built on demand)."""
    torch.manual_seed(3)
    _, view = _mlp(256, 1000, torch.float32)
    fast = POPFFN(view, 0.3, 0.05, "pop", kernels="auto", weights=weights)
    slow = POPFFN(view, 0.3, 0.05, "pop", kernels="torch")
    with torch.no_grad():
        prompt = torch.randn(1, 17, 256, device="cuda")
        fast(prompt), slow(prompt)
        x = torch.randn(70, 1, 256, device="cuda")
        torch.testing.assert_close(fast(x), slow(x))
        assert fast.w_gate_up is not None


def test_gate_up_and_down_read_weight_rows_in_place_through_an_index():
    torch.manual_seed(2)
    tokens, hidden, d_ff = 3, 512, 900
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    g, u, d_t = (torch.randn(d_ff, hidden, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(3))
    chan = torch.randperm(d_ff, device="cuda")[:400].to(torch.int32)
    h = torch.full((tokens, 400), float("nan"), device="cuda", dtype=torch.bfloat16)  # poisoned: all written
    triton_pop.gated_rows(x, g, u, h, chan=chan)
    c = chan.long()
    ref = torch.nn.functional.silu(x.float() @ g[c].float().T) * (x.float() @ u[c].float().T)
    assert float((h.float() - ref).norm() / ref.norm()) < 1e-2
    index = torch.randperm(400, device="cuda")[:300].to(torch.int32)
    acc = triton_pop.DownAccumulator.for_shape(None, tokens, hidden, torch.device("cuda"))
    ref_down = h.float()[:, index.long()] @ d_t[c[index.long()]].float()
    for _ in range(3):  # the accumulator is reused: each call must start from zero
        out = triton_pop.gathered_down(h, d_t, index, rows=chan[index.long()], acc=acc)
        assert out.dtype == torch.bfloat16
        assert float((out.float() - ref_down).norm() / ref_down.norm()) < 1e-2
    assert not acc.acc.any() and not acc.tickets.any()


def test_select_breaks_ties_by_position_and_keeps_exactly_k():
    h = torch.zeros(1, 10, device="cuda")
    h[0, 4:] = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0, 0.0], device="cuda")  # candidates start at 4
    index = torch.arange(6, dtype=torch.int32, device="cuda")
    triton_pop.select_candidates(h, torch.ones(6, device="cuda"), index, n_retained=4, k=2)
    assert index[4:].tolist() == [4, 7]  # the 2.0, then the first of the tied 1.0s


def test_graph_decoder_with_compiled_layers_matches_eager_generate_under_pop():
    """On the GPU: CUDA-graph replays of an inductor-compiled step (POP's Triton FFN left eager) give the
    tokens of the eager step (float32, so argmax ties of rounding cannot flip them)."""
    from lfmsift.models.fast_decode import GraphDecoder, compile_decode_layers
    from lfmsift.models.tiny import tiny_model
    from lfmsift.prune import pruned

    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    with pruned(model, "pop", ffn_ratio=0.4, gamma=0.1):
        eager = [GraphDecoder(model, max_cache_len=40, batch=2, cuda_graph=False).generate(p, 12)
                 for p in (ids, ids[:, :6])]
        with compile_decode_layers(model):
            fast = GraphDecoder(model, max_cache_len=40, batch=2)
            assert torch.equal(fast.generate(ids, 12), eager[0])
            assert torch.equal(fast.generate(ids[:, :6], 12), eager[1])  # a new prompt replays the same graph


@pytest.mark.parametrize("method", ["dense", "pop"])
def test_graph_decoder_with_prefill_graphs_matches_eager_generate(method):
    """Prefill replayed from a CUDA graph per prompt length (POP's partition captured with it) gives the
    tokens of the eager decoder, for a second prompt of the same length and for a new length."""
    from lfmsift.models.fast_decode import GraphDecoder
    from lfmsift.models.tiny import tiny_model
    from lfmsift.prune import pruned

    model = tiny_model("llama").cuda()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (2, n), generator=gen).cuda() for n in (11, 11, 6, 11)]
    with pruned(model, "pop", ffn_ratio=0.4, gamma=0.1) if method == "pop" else torch.no_grad():
        eager = GraphDecoder(model, max_cache_len=40, batch=2, cuda_graph=False)
        want = [eager.generate(p, 12) for p in prompts]
        fast = GraphDecoder(model, max_cache_len=40, batch=2, prefill_graph=True)
        for p, w in zip(prompts, want):
            assert torch.equal(fast.generate(p, 12), w)
        assert sorted(fast._prefill_graphs) == [6, 11]
