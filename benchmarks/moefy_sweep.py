"""The built MoE (``smollm2-135m-moe``) against its dense source: perplexity at every number of experts.

Builds (once, cached) or loads SmolLM2-135M moefied by `lfmsift.models.moefy` and prints WikiText-2
perplexity of the dense model and of the MoE with top-k routed experts for each k asked for (top-k = E is
the dense FFN exactly), with the share of FFN channels each token uses, and the router's held-out top-k
recall from the build. Writes JSON.

    python benchmarks/moefy_sweep.py --data-dir ../shared/data --json results/moefy_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfmsift import load  # noqa: E402
from lfmsift.eval import load_text, perplexity  # noqa: E402
from lfmsift.models.moefy import set_top_k  # noqa: E402
from lfmsift.results import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--top-k", default="2,4,6,8,10,12,16", help="Comma-separated numbers of routed experts.")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", default="results/moefy_smollm2-135m.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    text = load_text("wikitext2", args.data_dir)
    dense, tok = load("smollm2-135m")
    start = time.perf_counter()
    moe, _ = load("smollm2-135m-moe", data_dir=args.data_dir)
    load_s = time.perf_counter() - start
    record = moe.config.lfmsift_moefy
    E, shared = moe.config.num_experts, record["shared_expert_channels"]
    per_expert, d_ff = record["expert_intermediate_size"], dense.config.intermediate_size

    def ppl(model):
        return perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows, progress=False).perplexity

    rows = [{"model": "smollm2-135m (dense)", "top_k": None, "active_channels": 1.0, "perplexity": ppl(dense)}]
    print(f"{'model':24} {'top-k':>6} {'channels/token':>15} {'WikiText-2 ppl':>15}")
    print(f"{rows[0]['model']:24} {'-':>6} {100.0:>14.1f}% {rows[0]['perplexity']:>15.3f}")
    default_k = moe.config.num_experts_per_tok
    for k in [int(v) for v in args.top_k.split(",") if v.strip()]:
        set_top_k(moe, k)
        row = {"model": "smollm2-135m-moe", "top_k": k, "active_channels": (shared + k * per_expert) / d_ff,
               "perplexity": ppl(moe)}
        rows.append(row)
        print(f"{row['model']:24} {k:>6} {100 * row['active_channels']:>14.1f}% {row['perplexity']:>15.3f}", flush=True)
    set_top_k(moe, default_k)
    out = write_json(args.json, {
        "benchmark": "moefy_sweep",
        "data": {"set": "wikitext2", "windows": args.windows, "seqlen": args.seqlen},
        "moe": {"num_experts": E, "default_top_k": default_k, "shared_expert_channels": shared,
                "expert_intermediate_size": per_expert, "build_or_load_seconds": round(load_s, 1),
                "build": record},
        "rows": rows,
    })
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
