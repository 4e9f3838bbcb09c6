"""Time each part of POP's Triton decode step on its own (CUDA graphs, events), to see where the step goes.

Llama-2-7B FFN shapes, bf16, batch 1, the 20% and 40% targets: gate/up (fused SiLU, weights read in place
through the channel index) over all of R + C and over the Candidate rows alone; the Candidate selection;
the down pass with the in-kernel finish (`DownAccumulator`) and with a zero-filled float32 output plus a
cast (the two extra kernels it replaces); gate/up + selection in one launch (`gated_select`) and the step
built on it; `ranked_step` (gate/up writing the Candidates' scores, then the down pass with the selection
in its first programs); gate/up + down with no selection (the floor of two launches); the whole POP
module; the dense FFN for scale.

    python benchmarks/pop_gpu_kernels.py --json results/pop_gpu_kernels_h100.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402

from pop_gpu import CONFIGS, ffn_ratio, make_mlp, time_graph  # noqa: E402

from lfmsift.models.adapters import GatedFFN  # noqa: E402
from lfmsift.prune import triton_pop  # noqa: E402
from lfmsift.prune.pop import POPFFN  # noqa: E402
from lfmsift.results import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="results/pop_gpu_kernels.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    cfg = CONFIGS["llama2-7b"]
    mlp = make_mlp(cfg, "cuda", torch.bfloat16)
    view = GatedFFN(mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
    x = torch.randn(1, 1, cfg["hidden"], device="cuda", dtype=torch.bfloat16)
    dense_us = time_graph(mlp, x, 20, 50) * 1e6
    rows.append(dict(target=0.0, part="dense FFN", us=dense_us))
    print(f"dense FFN {dense_us:8.1f} us")
    for target in (0.2, 0.4):
        pop = POPFFN(view, ffn_ratio(cfg, target), 0.05, "pop")
        pop(torch.randn(1, 128, cfg["hidden"], device="cuda", dtype=torch.bfloat16))
        s = pop.sizes
        flat = x.reshape(1, -1)
        g, u, chan, down_t = mlp.gate_proj.weight, mlp.up_proj.weight, pop.chan, pop._transposed_down()
        n, n_r, n_c = s.n_computed, s.n_retained, s.n_candidates
        h = torch.empty((1, n), device="cuda", dtype=torch.bfloat16)
        triton_pop.gated_rows(flat, g, u, h, chan=chan)
        acc = triton_pop.DownAccumulator.for_shape(None, 1, cfg["hidden"], torch.device("cuda"))
        scratch = triton_pop.CandidateScratch.for_shape(None, 1, n_c, triton_pop.GATED_SELECT_SPLIT,
                                                        torch.device("cuda"))
        ranked = triton_pop.RankScratch.for_shape(None, n_c, torch.device("cuda"))

        def step(scr):
            return lambda x: triton_pop.pop_decode_step(flat, g, u, chan, n_r, pop.cand_col_norms_sq, down_t,
                                                        pop.down_index, pop.down_rows, s.k_select, acc, scr)

        def two_launches():  # lower bound: gate/up over R + C and the down pass, no selection
            triton_pop.gated_rows(flat, g, u, h, chan=chan)
            return triton_pop.gathered_down(h, down_t, pop.down_index, rows=pop.down_rows, acc=acc)

        parts = {
            "gate/up, all of R + C": lambda x: triton_pop.gated_rows(flat, g, u, h, chan=chan),
            "gate/up, Candidate rows": lambda x: triton_pop.gated_rows(flat, g, u, h[:, n_r:], chan=chan[n_r:]),
            "select (top-k of C)": lambda x: triton_pop.select_candidates(h, pop.cand_col_norms_sq, pop.down_index,
                                                                         n_r, s.k_select),
            "down, finished in kernel": lambda x: triton_pop.gathered_down(h, down_t, pop.down_index,
                                                                           rows=pop.down_rows, acc=acc),
            "down, zero-fill + float32 + cast": lambda x: triton_pop.gathered_down(
                h, down_t, pop.down_index, rows=pop.down_rows).to(h.dtype),
            "gate/up + selection in one launch (gated_select)": lambda x: triton_pop.gated_select(
                flat, g, u, chan, n_r, pop.cand_col_norms_sq, pop.down_index, pop.down_rows, s.k_select, scratch),
            "pop_decode_step, one launch (gated_select) + down": step(scratch),
            "pop_decode_step, ranked_step (selection at the head of down)": step(ranked),
            "gate/up + down only (lower bound: no selection)": lambda x: two_launches(),
            "whole step (POPFFN, its choice of step)": pop,
        }
        print(f"target {target}: |R| {n_r}, |C| {n_c}, k {s.k_select}")
        for name, fn in parts.items():
            us = time_graph(fn, x, 20, 50) * 1e6
            rows.append(dict(target=target, part=name, us=us, retained=n_r, candidates=n_c, k_select=s.k_select))
            print(f"  {name:56} {us:8.1f} us")
    out = write_json(args.json, {"benchmark": "pop_gpu_kernels", "device": torch.cuda.get_device_name(0),
                                 "shapes": "llama2-7b FFN, bf16, batch 1", "rows": rows})
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
