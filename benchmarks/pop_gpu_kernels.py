"""Time each part of POP's Triton decode step on its own (CUDA graphs, events), to see where the step goes.

Llama-2-7B FFN shapes, bf16, batch 1, the 20% and 40% targets: gate/up slice GEMV (fused SiLU) over all
of R + C, over the Candidate rows and over the Retained rows; Candidate selection; gathered down GEMV; the
earlier schedule (selection beside the Retained rows' down pass, then a second down launch); the current
one (`pop_decode_step`: Candidates' gate/up, selection beside the Retained rows' gate/up, one down
launch); and the whole POP module; plus the dense FFN for scale.

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
        side = torch.cuda.Stream()
        flat = x.reshape(1, -1)
        h = pop._gated(x).reshape(1, -1)
        n, n_r, w = s.n_computed, s.n_retained, pop.w_gate_up
        parts = {
            "gate/up GEMV + SiLU": lambda x: triton_pop.gated_gemv(flat, pop.w_gate_up),
            "gate/up, Candidate rows": lambda x: triton_pop.gated_rows(flat, w[n_r:n], w[n + n_r:], h[:, n_r:]),
            "gate/up, Retained rows": lambda x: triton_pop.gated_rows(flat, w[:n_r], w[n:n + n_r], h[:, :n_r]),
            "select (top-k of C)": lambda x: triton_pop.select_candidates(h, pop.cand_col_norms_sq, pop.down_index,
                                                                         s.n_retained, s.k_select),
            "gathered down": lambda x: triton_pop.gathered_down(h, pop.w_down_rows, pop.down_index),
            "earlier: select beside R down, 2nd down": lambda x: triton_pop.select_and_down(
                h, pop.cand_col_norms_sq, pop.w_down_rows, pop.down_index, s.n_retained, s.k_select, side),
            "pop_decode_step": lambda x: triton_pop.pop_decode_step(
                flat, w, n_r, pop.cand_col_norms_sq, pop.w_down_rows, pop.down_index, s.k_select, side),
            "whole step": pop,
        }
        print(f"target {target}: |R| {s.n_retained}, |C| {s.n_candidates}, k {s.k_select}")
        for name, fn in parts.items():
            us = time_graph(fn, x, 20, 50) * 1e6
            rows.append(dict(target=target, part=name, us=us, retained=s.n_retained, candidates=s.n_candidates,
                             k_select=s.k_select))
            print(f"  {name:26} {us:8.1f} us")
    out = write_json(args.json, {"benchmark": "pop_gpu_kernels", "device": torch.cuda.get_device_name(0),
                                 "shapes": "llama2-7b FFN, bf16, batch 1", "rows": rows})
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
