"""POP's per-prompt work on the GPU: the prefill FFN against dense, and the partition with and without sorts.

Random-weight FFNs with the shapes of Llama-2-7B and Llama-3.1-8B (bf16), 128-token prompts at batch 1 and 10,
the 20% and 40% targets (gamma = 0.1). Every time is the median of CUDA-graph replays (CUDA events), side by
side in one run:

- the prefill of one FFN: dense `LlamaMLP`, and POP / static (the paper's Variant 1), whose extra work is the
  scores, the partition, the channel index of the decode kernels and the down pass over the kept channels;
- the partition alone for d_ff scores: the sort-based rule of `partition.partition` as the channel vectors
  need it (a stable argsort, then R, C and the kept set sorted into channel order) against the sort-free
  `triton_pop.partition_index` (the same sets).

    python benchmarks/pop_prefill.py --json results/pop_prefill_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pop_gpu import CONFIGS, ffn_ratio, make_mlp, time_graph  # noqa: E402

from lfmsift.models.adapters import GatedFFN  # noqa: E402
from lfmsift.prune import triton_pop  # noqa: E402
from lfmsift.prune.partition import partition  # noqa: E402
from lfmsift.prune.pop import POPFFN  # noqa: E402
from lfmsift.results import write_json  # noqa: E402


def sorted_sets(scores: torch.Tensor, ffn_ratio_: float, delta: float) -> torch.Tensor:
    """The sort-based partition as the decode kernels need it (the code path before `partition_index`)."""
    part = partition(scores, ffn_ratio_, delta)
    return torch.cat((part.retained.sort().values, part.candidates.sort().values, part.keep.sort().values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama2-7b,llama3.1-8b")
    ap.add_argument("--json", default="results/pop_prefill.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for model in args.models.split(","):
        cfg = CONFIGS[model]
        mlp = make_mlp(cfg, "cuda", torch.bfloat16)
        view = GatedFFN(mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
        for batch in (1, 10):
            x = torch.randn(batch, 128, cfg["hidden"], device="cuda", dtype=torch.bfloat16)
            dense = time_graph(mlp, x, 10, 20) * 1e6
            rows.append(dict(model=model, part="prefill FFN", batch=batch, method="dense", target=None, us=dense))
            print(f"{model} b{batch} dense prefill FFN {dense:8.1f} us", flush=True)
            for target in (0.2, 0.4):
                for method in ("static", "pop"):
                    pop = POPFFN(view, ffn_ratio(cfg, target), 0.05, method)
                    pop(x)
                    us = time_graph(pop, x, 10, 20) * 1e6
                    rows.append(dict(model=model, part="prefill FFN", batch=batch, method=method, target=target,
                                     us=us, extra_us=us - dense))
                    print(f"  {method:6} {target:.0%}: {us:8.1f} us  (+{us - dense:.1f} us vs dense)", flush=True)
        d_ff = cfg["d_ff"]
        scores = torch.rand(d_ff, device="cuda")
        norms = torch.rand(d_ff, device="cuda")
        for target in (0.2, 0.4):
            r = ffn_ratio(cfg, target)
            s = partition(scores, r, 0.05).sizes
            chan = torch.empty(s.n_computed, dtype=torch.int32, device="cuda")
            down_rows, keep = (torch.empty(s.n_keep, dtype=torch.int32, device="cuda") for _ in range(2))
            in_top = torch.empty(s.n_candidates, dtype=torch.int8, device="cuda")
            cand_norms = torch.empty(s.n_candidates, device="cuda")
            fast = time_graph(lambda sc: triton_pop.partition_index(
                sc, s.n_retained, s.n_keep, s.n_computed, chan, down_rows, keep, in_top, norms, cand_norms),
                scores, 10, 20) * 1e6
            slow = time_graph(lambda sc: sorted_sets(sc, r, 0.05), scores, 10, 20) * 1e6
            for name, us in (("partition, sorts", slow), ("partition, partition_index", fast)):
                rows.append(dict(model=model, part=name, d_ff=d_ff, target=target, us=us))
            print(f"  partition of {d_ff} scores at {target:.0%}: sorts {slow:.1f} us, partition_index {fast:.1f} us "
                  f"({slow / fast:.1f}x)", flush=True)
    out = write_json(args.json, {"benchmark": "pop_prefill", "device": torch.cuda.get_device_name(0),
                                 "prompt_tokens": 128, "dtype": "bfloat16", "gamma": 0.1, "rows": rows})
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
