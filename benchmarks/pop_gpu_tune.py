"""Launch parameters of POP's Triton kernels: every configuration of a grid timed on the shapes POP's decode
step runs (Llama-2-7B FFN: hidden 4096, d_ff 11008; the 20% and 40% targets; batch 1 and 10).

gate/up (`gated_rows`): over the Retained + Candidate rows (8,266 / 4,977 rows), the Retained rows alone
(7,166 / 3,877) and the Candidate rows alone (1,100), named by a sorted random channel index as POP's are.
down (`gathered_down`): over the kept rows (7,717 / 4,426). Each configuration is timed as a CUDA graph of
20 calls, median of 10 replays, CUDA events; the best configuration minimises the summed batch-1 time
(batch 10 is reported beside it). Prints a table and writes JSON; the chosen values are what
`prune/triton_pop.py` uses (GATED_CONFIG, DOWN_CONFIG).

With `--cold` (what a decode step sees: each layer's weights are read once per step, L2 holds none of
them) the 20 calls cycle through 6 copies of the weights (at least 90 MB read between two reads of one
copy; L2 holds 50 MB); without it every call reads the same weights, and the smaller shapes then run partly
from L2. Also fits ``time = fixed + bytes / bandwidth`` over the shapes for the chosen configurations.

    python benchmarks/pop_gpu_tune.py --cold --json results/pop_gpu_tune_cold_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfmsift.prune import triton_pop  # noqa: E402
from lfmsift.results import write_json  # noqa: E402

HIDDEN, D_FF = 4096, 11008
GATE_ROWS = {"R+C 20%": 8266, "R 20%": 7166, "R+C 40%": 4977, "R 40%": 3877, "C": 1100}
DOWN_ROWS = {"keep 20%": 7717, "keep 40%": 4426}


def graph_time(fn, calls: int = 20, repeats: int = 10) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="each call reads weights L2 does not hold")
    parser.add_argument("--kernels", default="gated,down", help="which kernels to tune")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    copies = 6 if args.cold else 1  # 5 x the smallest call (18 MB of Candidate rows) between two reads of one
    ws = [torch.randn(2 * D_FF, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    downs = [torch.randn(D_FF, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    xs = {b: torch.randn(b, HIDDEN, device=dev, dtype=torch.bfloat16) for b in (1, 10)}
    hs = {b: torch.randn(b, D_FF, device=dev, dtype=torch.bfloat16) for b in (1, 10)}
    outs = {b: torch.empty(b, D_FF, device=dev, dtype=torch.bfloat16) for b in (1, 10)}
    chans = {m: torch.randperm(D_FF, device=dev)[:m].sort().values.to(torch.int32) for m in GATE_ROWS.values()}
    indices = {m: torch.randperm(D_FF, device=dev)[:m].to(torch.int32) for m in DOWN_ROWS.values()}

    def cycling(call):  # call(i) on copy i: a graph of 20 calls reads each copy's weights in turn
        counter = itertools.count()
        return lambda: call(next(counter) % copies)

    kernels = args.kernels.split(",")
    gated = []
    gated_grid = itertools.product((8, 16, 32, 64), (128, 256, 512), (2, 4, 8), (2, 3, 4, 5))
    for block_n, block_k, warps, stages in gated_grid if "gated" in kernels else ():
        cfg = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}
        row = {"config": cfg, "seconds": {}}
        try:
            for b in (1, 10):
                for name, m in GATE_ROWS.items():
                    row["seconds"][f"{name} b{b}"] = graph_time(cycling(
                        lambda i, b=b, m=m, cfg=cfg: triton_pop.gated_rows(
                            xs[b], ws[i][:D_FF], ws[i][D_FF:], outs[b][:, :m], cfg, chan=chans[m])))
        except Exception as exc:  # a configuration Triton cannot build (shared memory) is skipped
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        gated.append(row)
    down_rows = []
    # K_PER_PROG = BLOCK_K: one block of rows per program, no loop (its index and weight loads at once)
    down_grid = [*itertools.product((64, 128, 256), (32, 64, 128, 256), (None,), (4, 8)),
                 *itertools.product((64, 128, 256), (32, 64, 128), (256, 512, 1024), (4, 8))]
    for block_n, block_k, k_per, warps in down_grid if "down" in kernels else ():
        k_per = k_per or block_k
        if k_per < block_k or (block_k == 256 and block_n == 256):
            continue
        cfg = {"BLOCK_N": block_n, "BLOCK_K": block_k, "K_PER_PROG": k_per, "num_warps": warps}
        row = {"config": cfg, "seconds": {}}
        try:
            for b in (1, 10):
                for name, m in DOWN_ROWS.items():
                    row["seconds"][f"{name} b{b}"] = graph_time(cycling(
                        lambda i, b=b, m=m, cfg=cfg: triton_pop.gathered_down(hs[b], downs[i], indices[m], config=cfg)))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        down_rows.append(row)

    def ranked(rows, shapes):  # configurations that built, by summed batch-1 time, best first
        ok = [r for r in rows if "error" not in r]
        return sorted(ok, key=lambda r: sum(r["seconds"][f"{s} b1"] for s in shapes))

    tuned = [("gated", GATE_ROWS, gated, 2 * HIDDEN * 2), ("down", DOWN_ROWS, down_rows, HIDDEN * 2)]
    tuned = [t for t in tuned if t[0] in kernels]
    chosen = {kind: ranked(rows, shapes)[0] for kind, shapes, rows, _ in tuned}
    current = {"gated": triton_pop.GATED_CONFIG, "down": triton_pop.DOWN_CONFIG}
    for kind, shapes, rows, elem in tuned:
        cur = next((r for r in rows if r["config"] == current[kind] and "error" not in r), None)
        print(f"\n{kind}: best {chosen[kind]['config']}  (current {current[kind]})")
        for r in ranked(rows, shapes)[:6]:
            print("  ", r["config"], " ".join(f"{k} {1e6 * v:.1f}" for k, v in r["seconds"].items()))
        for s, m in shapes.items():
            for b in (1, 10):
                t = chosen[kind]["seconds"][f"{s} b{b}"]
                c = cur["seconds"][f"{s} b{b}"] if cur else float("nan")
                print(f"  {s:10s} b{b:<3d} best {1e6 * t:7.1f} us ({m * elem / t / 1e12:.2f} TB/s)   "
                      f"current {1e6 * c:7.1f} us")
    # time = fixed + bytes / bandwidth over the shapes, for the chosen configuration at batch 1: the fixed part
    # is what a launch costs whatever it reads (ramp-up and tail), the slope the bandwidth it streams at
    fits = {}
    for kind, shapes, rows, elem in tuned:
        nbytes = [m * elem for m in shapes.values()]
        secs = [chosen[kind]["seconds"][f"{s} b1"] for s in shapes]
        mb, ms = sum(nbytes) / len(nbytes), sum(secs) / len(secs)
        slope = sum((b - mb) * (t - ms) for b, t in zip(nbytes, secs)) / sum((b - mb) ** 2 for b in nbytes)
        fits[kind] = {"fixed_us": 1e6 * (ms - slope * mb), "bandwidth_tbs": 1 / slope / 1e12}
        print(f"{kind}: time = {fits[kind]['fixed_us']:.1f} us + bytes / {fits[kind]['bandwidth_tbs']:.2f} TB/s "
              f"(batch 1, {len(nbytes)} shapes)")
    if args.json:
        write_json(args.json, {"task": "pop_gpu_tune", "device": torch.cuda.get_device_name(0), "cold": args.cold,
                               "chosen": {k: v["config"] for k, v in chosen.items()}, "fits": fits,
                               "gated": gated, "down": down_rows}, command=["python", *sys.argv])


if __name__ == "__main__":
    main()
