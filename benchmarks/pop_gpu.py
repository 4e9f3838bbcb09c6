"""POP's FFN decode step on a GPU against the memory-bandwidth limit (first part of the paper's Table 5).

For the FFN shapes of Llama-2-7B (hidden 4096, d_ff 11008, MHA) and Llama-3.1-8B (4096, 14336, GQA 8 KV
heads), bf16, random weights (weights do not change latency), batch 1 and 10: a 128-token prompt sets the
partition, then one decode step of the FFN module is captured in a CUDA graph and its replays are timed
with CUDA events (median of `--repeats` timings of `--inner` replays each, after warm-up), side by side
with the dense FFN (transformers' LlamaMLP) in the same run: each method's timings alternate with a new
series of dense's, and its speedup is the ratio of the two medians (dense's own row is a series of its own). Methods: dense, static (Variant 1: the speed
upper bound), pop, reselect at the 20% and 40% model-level targets (the per-layer FFN ratio of the paper's
Table 8 rule: 29.9 / 59.8% and 24.8 / 49.5%). ``pop`` / ``static`` run the Triton kernels over per-prompt
weight slices (the default), ``:index`` over the model's own rows through a channel index, ``pop:torch``
PyTorch's ops over the slices, ``:serial`` the slices with the one-token step's down pass launched after the
gate/up launch has retired (no programmatic dependent launch: `triton_pop.dependent_launch`).

Reported per row: the decode-step time and its speedup over dense; the bytes of weights the step must read
(dense: 3 d_ff H; static: 3 n_keep H; pop: 2 |R u C| H for gate/up + n_keep H for down; reselect: dense
gate/up + n_keep H) and the speedup they allow (the "bytes limit"); the fraction of that limit reached; the
achieved bandwidth against the device's measured copy bandwidth (bytes read + written by a large
device-to-device copy); the per-prompt cost of the prefill (scores, partition, slices); and the relative
error of the decode output against the same rule computed by masking in float32.

    python benchmarks/pop_gpu.py --json results/pop_gpu_h100.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfmsift.models.adapters import GatedFFN  # noqa: E402
from lfmsift.prune.budget import ffn_ratio_for_target  # noqa: E402
from lfmsift.prune import triton_pop  # noqa: E402
from lfmsift.prune.pop import POPFFN  # noqa: E402
from lfmsift.results import write_json  # noqa: E402

CONFIGS = {
    "llama2-7b": dict(hidden=4096, d_ff=11008, heads=32, kv_heads=32),
    "llama3.1-8b": dict(hidden=4096, d_ff=14336, heads=32, kv_heads=8),
}


def ffn_ratio(cfg: dict, target: float) -> float:
    head_dim = cfg["hidden"] // cfg["heads"]
    attn = 2 * cfg["hidden"] * cfg["hidden"] + 2 * cfg["hidden"] * cfg["kv_heads"] * head_dim
    return ffn_ratio_for_target(target, attn, 3 * cfg["hidden"] * cfg["d_ff"])


def make_mlp(cfg: dict, device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["d_ff"])
    mlp = LlamaMLP(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.02)
    return mlp


def copy_bandwidth(device, gib: float = 2.0) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    n = int(gib * (1 << 30)) // 2
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def time_graph(fn, x_static: torch.Tensor, repeats: int, inner: int) -> float:
    """Median seconds of one call of `fn(x_static)`, replayed from a CUDA graph."""
    return time_graphs([fn], x_static, repeats, inner)[0]


def time_graphs(fns, x_static: torch.Tensor, repeats: int, inner: int) -> list[float]:
    """Median seconds of one call of each `fn(x_static)`, each replayed from its own CUDA graph; the timings
    of the graphs alternate (one timing of `inner` replays of each in turn, `repeats` times), so a drift of
    the clocks or the temperature during the run weighs on all of them alike."""
    graphs = []
    for fn in fns:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(x_static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(x_static)
        for _ in range(10):
            graph.replay()
        graphs.append(graph)
    times = [[] for _ in graphs]
    for _ in range(repeats):
        for graph, series in zip(graphs, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            series.append(start.elapsed_time(end) / 1e3 / inner)
    return [statistics.median(series) for series in times]


def masked_reference(pop: POPFFN, mlp, x: torch.Tensor) -> torch.Tensor:
    """The decode rule computed densely in float32 with the unused channels zeroed (checks only)."""
    g, u, d = (m.weight.float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    xf = x.float()
    h = torch.nn.functional.silu(xf @ g.T) * (xf @ u.T)
    part, s = pop.partition, pop.sizes
    if pop.mode == "static":
        keep = part.keep
    elif pop.mode == "reselect":
        score = h.reshape(-1, h.shape[-1]).square().sum(0) * pop.col_norms_sq
        keep = torch.topk(score, s.n_keep).indices
    else:
        cand = part.candidates
        score = h[..., cand].reshape(-1, cand.numel()).square().sum(0) * pop.col_norms_sq[cand]
        keep = torch.cat([part.retained, cand[torch.topk(score, s.k_select).indices]])
    mask = torch.zeros(h.shape[-1], device=h.device)
    mask[keep] = 1
    return (h * mask) @ d.T


def step_bytes(mode: str, sizes, hidden: int, elem: int) -> int:
    if mode == "dense":
        return 3 * sizes.d_ff * hidden * elem
    if mode == "static":
        return 3 * sizes.n_keep * hidden * elem
    if mode.startswith("pop"):
        return (2 * sizes.n_computed + sizes.n_keep) * hidden * elem
    return (2 * sizes.d_ff + sizes.n_keep) * hidden * elem  # reselect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batches", default="1,10")
    ap.add_argument("--targets", default="0.2,0.4")
    ap.add_argument("--modes", default="static,static:index,pop:torch,pop,pop:serial,pop:index,reselect",
                    help="Methods; ':torch' forces the PyTorch ops, ':index' has the Triton kernels read the model's "
                         "rows through the channel index, ':serial' the slices with no dependent launch (default: "
                         "Triton kernels over per-prompt slices).")
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=50)
    ap.add_argument("--json", default="results/pop_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pop_gpu.py measures CUDA graphs and events: it needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(0)}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        mlp = make_mlp(cfg, device, dtype)
        view = GatedFFN(mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
        for batch in [int(b) for b in args.batches.split(",")]:
            x_step = torch.randn(batch, 1, cfg["hidden"], device=device, dtype=dtype)
            dense_s = time_graph(mlp, x_step, args.repeats, args.inner)
            dense_bytes = 3 * cfg["d_ff"] * cfg["hidden"] * 2
            rows.append(dict(config=name, batch=batch, mode="dense", target=0.0, ffn_ratio=0.0, step_us=dense_s * 1e6,
                             speedup=1.0, bytes=dense_bytes, bytes_limit=1.0, of_limit=1.0,
                             bandwidth_tbs=dense_bytes / dense_s / 1e12, of_copy_bw=dense_bytes / dense_s / bandwidth))
            for target in [float(t) for t in args.targets.split(",")]:
                r = ffn_ratio(cfg, target)
                for variant in args.modes.split(","):
                    mode, _, form = variant.partition(":")
                    triton_pop.SLICED_DEPENDENT_LAUNCH = "never" if form == "serial" else "auto"
                    pop = POPFFN(view, r, args.gamma / 2, mode, kernels="torch" if form == "torch" else "auto",
                                 weights="index" if form == "index" else "slices")
                    prompts = [torch.randn(batch, args.prompt, cfg["hidden"], device=device, dtype=dtype) for _ in range(6)]
                    pop(prompts[0])  # first prompt allocates the slices
                    prefill = []
                    for p in prompts[1:]:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        pop(p)
                        end.record()
                        torch.cuda.synchronize()
                        prefill.append(start.elapsed_time(end) / 1e3)
                    dense_prefill = time_graph(mlp, prompts[-1], 5, 5)
                    # dense again, its timings alternating with this method's: the speedup is a paired ratio
                    paired_dense_s, step_s = time_graphs([mlp, pop], x_step, args.repeats, args.inner)
                    x_check = torch.randn_like(x_step)
                    out = pop(x_check).float()
                    ref = masked_reference(pop, mlp, x_check)
                    err = float((out - ref).norm() / ref.norm())
                    b = step_bytes(mode, pop.sizes, cfg["hidden"], 2)
                    limit = dense_bytes / b
                    rows.append(dict(
                        config=name, batch=batch, mode=variant, target=target, ffn_ratio=r, step_us=step_s * 1e6,
                        paired_dense_us=paired_dense_s * 1e6, speedup=paired_dense_s / step_s, bytes=b,
                        bytes_limit=limit, of_limit=(paired_dense_s / step_s) / limit,
                        bandwidth_tbs=b / step_s / 1e12, of_copy_bw=b / step_s / bandwidth,
                        prefill_ms=statistics.median(prefill) * 1e3, dense_prefill_ms=dense_prefill * 1e3,
                        rel_error_vs_masked_fp32=err,
                    ))
                    del pop
                    torch.cuda.empty_cache()
        triton_pop.SLICED_DEPENDENT_LAUNCH = "auto"
        del mlp
        torch.cuda.empty_cache()
    head = f"{'config':12} {'b':>3} {'mode':12} {'tgt':>4} {'r':>5} {'step us':>8} {'dense us':>8} {'speedup':>8} {'limit':>6} " \
           f"{'of lim':>7} {'TB/s':>5} {'of copy':>8} {'prefill ms':>10} {'rel err':>8}"
    print(head)
    for row in rows:
        print(f"{row['config']:12} {row['batch']:>3} {row['mode']:12} {row['target']:>4.1f} {row['ffn_ratio']:>5.3f} "
              f"{row['step_us']:>8.1f} {row.get('paired_dense_us', row['step_us']):>8.1f} {row['speedup']:>7.2f}x {row['bytes_limit']:>5.2f}x {row['of_limit']:>6.1%} "
              f"{row['bandwidth_tbs']:>5.2f} {row['of_copy_bw']:>7.1%} "
              f"{row.get('prefill_ms', float('nan')):>10.2f} {row.get('rel_error_vs_masked_fp32', float('nan')):>8.1e}")
    out = write_json(args.json, {
        "benchmark": "pop_gpu_ffn_decode_step",
        "device": torch.cuda.get_device_name(0),
        "copy_bandwidth_tbs": bandwidth / 1e12,
        "settings": vars(args),
        "rows": rows,
    })
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
