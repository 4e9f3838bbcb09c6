"""CPU decode latency of POP against dense and its variants, measured side by side in one run.

Protocol (the paper's Table 5 on a CPU): batch 1, a prompt of 128 tokens, then 128 decode steps with a KV
cache. For every configuration the script times the prefill, each decode step (end to end, LM head
included) and the FFN modules alone (forward pre/post hooks; exact on a CPU, which runs synchronously).
Configurations run interleaved, `--repeats` times, and the median is kept; ratios are taken against the
dense model of the same run. The prefill includes POP's per-prompt work (scoring, partition, refilling the
weight slices); the first prompt after `apply()` also allocates them and is reported apart
(`first_prefill_ms`).

Models: the real SmolLM2-135M (`smollm2-135m`), and a random-weight model with Llama-2-7B layer shapes
(hidden 4096, FFN 11008, 32 heads, vocabulary 32000) and fewer layers (`--llama2-layers`, default 2):
weights do not change latency, and the POP partition sizes depend only on the shapes.

    python benchmarks/pop_cpu.py --json results/pop_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lfmsift  # noqa: E402
from lfmsift.models import describe  # noqa: E402
from lfmsift.results import write_json  # noqa: E402


def llama2_7b_shapes(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


class FFNTimer:
    """Wall time spent inside the FFN modules (whatever module sits at layer.mlp)."""

    def __init__(self, decoder_layers):
        self.total = 0.0
        self._start = {}
        self._hooks = []
        self.decoder_layers = decoder_layers

    def attach(self):
        for layer in self.decoder_layers:
            mlp = layer.mlp  # looked up now: the dense FFN or the pruning method's replacement
            self._hooks.append(mlp.register_forward_pre_hook(self._pre))
            self._hooks.append(mlp.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._start.pop(id(module))

    def detach(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@torch.no_grad()
def run_once(model, decoder_layers, prompt: torch.Tensor, steps: int) -> dict:
    timer = FFNTimer(decoder_layers)
    timer.attach()
    try:
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill = time.perf_counter() - t0
        ffn_prefill = timer.total
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        timer.total = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t0
    finally:
        timer.detach()
    return {"prefill_s": prefill, "ffn_prefill_s": ffn_prefill, "decode_step_s": decode / steps,
            "ffn_decode_step_s": timer.total / steps}


def bench_model(name: str, model, configs, prompt_len: int, steps: int, repeats: int, gamma: float) -> list[dict]:
    decoder_layers = [layer.module for layer in describe(model).layers]
    torch.manual_seed(0)
    prompt = torch.randint(100, 1000, (1, prompt_len))
    other_prompt = torch.randint(100, 1000, (1, prompt_len))
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    run_once(model, decoder_layers, prompt, 4)  # warm-up
    for rep in range(repeats):
        for method, target in configs:
            handle = None if method == "dense" else lfmsift.prune.apply(model, method, target=target, gamma=gamma)
            # A first prompt after apply() also pays one-time setup (buffers, the transposed down_proj);
            # it is timed on its own, then the measured prompt runs in the steady state.
            first = run_once(model, decoder_layers, other_prompt, 1)
            res = run_once(model, decoder_layers, prompt, steps)
            res["first_prefill_s"] = first["prefill_s"]
            if handle is not None:
                res["stats"] = handle.stats()["total"]
                res["ffn_ratio"] = handle.stats()["ffn_ratio"]
                handle.remove()
            runs[(method, target)].append(res)
            print(f"  {name} rep {rep + 1}/{repeats} {method} {target}: decode step "
                  f"{res['decode_step_s'] * 1e3:.2f} ms, FFN {res['ffn_decode_step_s'] * 1e3:.2f} ms", flush=True)
    rows = []
    med = lambda key, c: statistics.median(r[key] for r in runs[c])  # noqa: E731
    dense = ("dense", None)
    for c in configs:
        method, target = c
        row = {
            "model": name, "method": method, "target": target,
            "ffn_ratio": runs[c][0].get("ffn_ratio", 0.0),
            "prefill_ms": med("prefill_s", c) * 1e3,
            "ffn_prefill_ms": med("ffn_prefill_s", c) * 1e3,
            "decode_step_ms": med("decode_step_s", c) * 1e3,
            "ffn_decode_step_ms": med("ffn_decode_step_s", c) * 1e3,
            "repeats": [{k: v for k, v in r.items() if k != "stats"} for r in runs[c]],
        }
        row["decode_speedup"] = med("decode_step_s", dense) / med("decode_step_s", c)
        row["ffn_decode_speedup"] = med("ffn_decode_step_s", dense) / med("ffn_decode_step_s", c)
        row["prefill_overhead"] = med("prefill_s", c) / med("prefill_s", dense)
        row["first_prefill_ms"] = med("first_prefill_s", c) * 1e3
        if "stats" in runs[c][0]:
            st = runs[c][0]["stats"]
            row["decode_flops_vs_dense"] = st["decode_flops_vs_dense"]
            row["decode_extra_flops_vs_static"] = st["decode_extra_flops_vs_static"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,llama2-7b-shapes")
    ap.add_argument("--llama2-layers", type=int, default=2)
    ap.add_argument("--targets", default="0.2,0.4")
    ap.add_argument("--methods", default="static,pop,reselect")
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default="results/pop_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    configs = [("dense", None)] + [(m, t) for t in targets for m in args.methods.split(",")]
    rows = []
    for name in args.models.split(","):
        if name == "llama2-7b-shapes":
            model = llama2_7b_shapes(args.llama2_layers)
            label = f"llama2-7b-shapes ({args.llama2_layers} layers, random weights)"
        else:
            model, _ = lfmsift.load(name)
            label = name
        print(f"{label}: {len(configs)} configurations x {args.repeats} repeats", flush=True)
        rows += bench_model(label, model, configs, args.prompt_len, args.steps, args.repeats, args.gamma)
        del model

    header = f"{'model':44s} {'method':9s} {'target':>6s} {'r_ffn':>6s} {'step ms':>8s} {'speedup':>8s} " \
             f"{'FFN ms':>8s} {'FFN x':>6s} {'prefill x':>9s} {'FLOPs':>6s}"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        flops = r.get("decode_flops_vs_dense")
        print(f"{r['model'][:44]:44s} {r['method']:9s} {r['target'] or 0:6.2f} {r['ffn_ratio']:6.3f} "
              f"{r['decode_step_ms']:8.2f} {r['decode_speedup']:7.2f}x {r['ffn_decode_step_ms']:8.2f} "
              f"{r['ffn_decode_speedup']:5.2f}x {r['prefill_overhead']:8.2f}x "
              f"{'' if flops is None else f'{flops:.1%}':>6s}")
    payload = {"benchmark": "pop_cpu", "protocol": {"batch": 1, "prompt_len": args.prompt_len,
                                                    "decode_steps": args.steps, "repeats": args.repeats,
                                                    "gamma": args.gamma, "statistic": "median"},
               "rows": rows}
    path = write_json(args.json, payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
