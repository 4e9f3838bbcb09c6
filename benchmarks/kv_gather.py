"""Fetching selected KV tokens from pinned host memory: the one-launch Triton gather against the limits.

Llama-3-8B's KV shape (8 KV heads x 128, bf16: 4 KiB per token and layer), one layer's host tier of
``--cache`` tokens in pinned memory laid out (2, kv_heads, slots, head_dim), selections made of runs of
consecutive slots (clusters of ``--run`` tokens on average, independently per KV head) at ReSV's paper
ratios (32.7% frame stage, 2.5% text stage) and at 100% (full fetch). For each: the Triton gather
(`lfmsift.kernels.kv_gather.gather_tokens`), the host `index_select` + pinned copy, one copy call per run
(timed on the first runs and scaled), and one contiguous pinned copy of the same bytes (the link's limit).
Every gather is checked against the reference. Times are CUDA-event medians.

    python benchmarks/kv_gather.py --json results/kv_gather_h200.json     (on a CUDA machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lfmsift.kernels.kv_gather import gather_tokens, gather_tokens_reference


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls (CUDA events, after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_selection(cache: int, heads: int, ratio: float, run: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Per head: sorted slots covering about ``ratio`` of ``cache`` in runs of ``run`` tokens on average."""
    out = []
    for _ in range(heads):
        if ratio >= 1.0:
            out.append(torch.arange(cache))
            continue
        runs = torch.randperm(max(1, cache // run), generator=gen)[: max(1, round(ratio * cache / run))]
        lengths = torch.randint(max(1, run // 2), run + run // 2 + 1, (runs.numel(),), generator=gen)
        slots = torch.cat([torch.arange(r * run, min(cache, r * run + n)) for r, n in zip(runs.tolist(), lengths.tolist())])
        out.append(torch.unique(slots))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="10240,40960", help="tokens in the host tier")
    parser.add_argument("--ratios", default="1.0,0.327,0.025")
    parser.add_argument("--run", type=int, default=32, help="mean run (cluster) length in tokens")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    big = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    big_d = torch.empty_like(big, device=dev)
    pinned_gbps = (1 << 30) / timed(lambda: big_d.copy_(big, non_blocking=True), 5) / 1e6
    for cache in [int(x) for x in args.cache.split(",")]:
        host = torch.randn(2, args.heads, cache, args.dim, generator=gen).to(torch.bfloat16).pin_memory()
        for ratio in [float(x) for x in args.ratios.split(",")]:
            picked = run_selection(cache, args.heads, ratio, args.run, gen)
            counts = torch.tensor([p.numel() for p in picked])
            capacity = int(counts.max())
            slots = torch.zeros(args.heads, capacity, dtype=torch.int64)
            for h, p in enumerate(picked):
                slots[h, : p.numel()] = p
            slots_d, counts_d = slots.to(dev), counts.to(dev)
            out = torch.empty(2, args.heads, capacity, args.dim, dtype=torch.bfloat16, device=dev)
            want = torch.empty_like(out)
            gather_tokens_reference(host, slots, counts, want)
            gather_tokens(host, slots_d, counts_d, out)
            torch.cuda.synchronize()
            exact = all(torch.equal(out[:, h, :n], want[:, h, :n]) for h, n in enumerate(counts.tolist()))
            nbytes = int(counts.sum()) * 2 * args.dim * 2
            flat = torch.empty(nbytes // 2, dtype=torch.bfloat16).pin_memory()
            flat_d = torch.empty_like(flat, device=dev)
            triton_ms = timed(lambda: gather_tokens(host, slots_d, counts_d, out), args.repeats)
            contiguous_ms = timed(lambda: flat_d.copy_(flat, non_blocking=True), args.repeats)
            select_ms = timed(lambda: gather_tokens_reference(host, slots, counts, want), max(3, args.repeats // 4))
            # one copy call per run (a run = maximal consecutive slots), on head 0's K plane, scaled
            s0 = picked[0]
            starts = torch.cat([torch.tensor([0]), (s0[1:] - s0[:-1] != 1).nonzero().flatten() + 1])
            ends = torch.cat([starts[1:], torch.tensor([s0.numel()])])
            runs = list(zip(s0[starts].tolist(), (ends - starts).tolist()))[:2000]

            def per_run():
                pos = 0
                for a, n in runs:
                    out[0, 0, pos : pos + n].copy_(host[0, 0, a : a + n], non_blocking=True)
                    pos += n
            per_run_ms = timed(per_run, 3)
            total_runs = sum(int((p[1:] - p[:-1] != 1).sum()) + 1 for p in picked) * 2
            per_run_total_ms = per_run_ms / len(runs) * total_runs
            row = {"cache_tokens": cache, "ratio": ratio, "selected_tokens_per_head": float(counts.double().mean()),
                   "runs": total_runs, "bytes": nbytes, "exact": exact,
                   "triton_ms": triton_ms, "triton_gbps": nbytes / triton_ms / 1e6,
                   "contiguous_copy_ms": contiguous_ms, "contiguous_gbps": nbytes / contiguous_ms / 1e6,
                   "index_select_copy_ms": select_ms, "index_select_copy_gbps": nbytes / select_ms / 1e6,
                   "per_run_copies_ms": per_run_total_ms, "per_run_copy_us": per_run_ms / len(runs) * 1e3,
                   "of_pinned_limit": (nbytes / triton_ms / 1e6) / pinned_gbps}
            rows.append(row)
            print(f"cache {cache:>6} ratio {ratio:5.3f} bytes {nbytes / 2**20:8.1f} MiB runs {total_runs:>6} exact {exact}  "
                  f"triton {row['triton_gbps']:5.1f} GB/s ({row['of_pinned_limit']:.0%} of pinned)  "
                  f"contiguous {row['contiguous_gbps']:5.1f}  index_select+copy {row['index_select_copy_gbps']:5.1f}  "
                  f"per-run copies {per_run_total_ms:8.2f} ms ({row['per_run_copy_us']:.1f} us each)", flush=True)
    doc = {"device": torch.cuda.get_device_name(), "pinned_h2d_gbps": pinned_gbps, "rows": rows,
           "command": " ".join(["python", "benchmarks/kv_gather.py", *(argv if argv is not None else sys.argv[1:])]),
           "torch": torch.__version__}
    print(f"pinned host-to-device copy: {pinned_gbps:.1f} GB/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
