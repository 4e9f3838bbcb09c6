"""POP end to end on a GPU: whole decode steps of Llama-2-7B / Llama-3.1-8B, the paper's Table 5 protocol.

Random-weight models built from the real configs (bf16; weights do not change latency), batch 1 and 10,
128 prompt tokens + 128 generated tokens, greedy, with `lfmsift.models.fast_decode.GraphDecoder`: the
prompt is prefilled (POP partitions there) eagerly or, with ``--prefill graph``, replayed from a CUDA graph
captured for its length (the same for every method; at batch 1 an eager prefill is bound by kernel launches,
its time is mostly CPU overhead and varies between runs), then one decode step — the whole model, its static KV
cache, the argmax and the position update — is captured in a CUDA graph and replayed 127 times. Timed with
CUDA events, median of `--repeats`, side by side with the dense model in the same run. Two decode steps:
``hf`` (transformers' layers as they are) and ``compiled`` (`compile_decode_layers`: each layer's decode
forward compiled by inductor with the FFN module left out, so the FFN method runs as in ``hf`` and only
the non-FFN overhead shrinks). Also timed: every layer's FFN module alone for one decode step (a graph of
the 32 FFN calls on a static input), so the step splits into FFN time and the rest (attention, norms, LM
head; derived as step - FFN), and the prefill (its POP overhead is the per-prompt cost of partitioning).
Methods: dense, static (Variant 1, the speed upper bound), pop, reselect at the 20% and 40% targets.

    python benchmarks/pop_gpu_e2e.py --json results/pop_gpu_e2e_h100.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfmsift.models.fast_decode import GraphDecoder, compile_decode_layers
from lfmsift.prune import apply
from lfmsift.results import write_json

MODELS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        rope_theta=500000.0),
}
METHODS = [("dense", None), ("static", 0.2), ("pop", 0.2), ("reselect", 0.2), ("static", 0.4), ("pop", 0.4),
           ("reselect", 0.4)]


def build(name: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def events_time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@torch.no_grad()
def measure(model, prompt: torch.Tensor, steps: int, repeats: int, prefill_graph: bool = False) -> dict:
    batch, length = prompt.shape
    decoder = GraphDecoder(model, max_cache_len=length + steps + 4, batch=batch, prefill_graph=prefill_graph)
    out = {}
    decoder.prefill(prompt)  # warm-up (kernels compiled, allocations made)
    out["prefill_s"] = statistics.median(events_time(lambda: decoder.prefill(prompt)) for _ in range(5))
    decoder.prefill(prompt)
    decoder.decode(steps - 1)  # captures the step's graph (and compiles it when the layers are compiled)
    times, tokens = [], None
    for _ in range(repeats):
        decoder.prefill(prompt)
        times.append(events_time(lambda: decoder.decode(steps - 1)))
        tokens = decoder.tokens[:, length : length + steps]
    out["decode_s"] = statistics.median(times)
    out["step_s"] = out["decode_s"] / (steps - 1)
    out["tokens"] = tokens.flatten().tolist()[:4]

    hidden = model.config.hidden_size
    xs = [torch.randn(batch, 1, hidden, device=prompt.device, dtype=torch.bfloat16) * 0.5
          for _ in model.model.layers]

    def ffns():
        for layer, x in zip(model.model.layers, xs):
            layer.mlp(x)

    ffn_graph = capture(ffns)
    out["ffn_step_s"] = statistics.median(
        events_time(lambda: [ffn_graph.replay() for _ in range(20)]) / 20 for _ in range(repeats))
    out["rest_step_s"] = out["step_s"] - out["ffn_step_s"]
    out["end_to_end_s"] = out["prefill_s"] + out["decode_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama2-7b,llama3.1-8b")
    parser.add_argument("--batches", default="1,10")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", default="hf,compiled", help="hf and/or compiled (see the docstring)")
    parser.add_argument("--methods", default=",".join(f"{m}:{t}" if t else m for m, t in METHODS))
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled step")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="inductor's coordinate-descent tuning of the compiled step's kernels (slower compile)")
    parser.add_argument("--prefill", choices=("eager", "graph"), default="eager",
                        help="run the prompt eagerly or replay it from a CUDA graph (see the docstring)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = args.coordinate_descent
    rows = []
    for name in args.models.split(","):
        t0 = time.time()
        model = build(name, device)
        print(f"{name}: built in {time.time() - t0:.0f} s", flush=True)
        methods = [(m, float(t) if t else None) for m, _, t in (x.partition(":") for x in args.methods.split(","))]
        for kind, batch in ((k, int(b)) for k in args.decode_steps.split(",") for b in args.batches.split(",")):
            compiled = compile_decode_layers(model, mode=args.compile_mode) if kind == "compiled" else None
            gen = torch.Generator(device="cpu").manual_seed(batch)
            prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=gen).to(device)
            dense = None
            for method, target in methods:
                row = {"model": name, "decode_step": kind, "batch": batch, "method": method, "target": target,
                       "prefill": args.prefill}
                t0 = time.time()
                handle = None
                try:
                    if method != "dense":
                        handle = apply(model, method, target=target)
                    row.update(measure(model, prompt, args.steps, args.repeats, args.prefill == "graph"))
                except Exception as exc:  # keep the other rows; report what failed
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                finally:
                    if handle is not None:
                        handle.remove()
                if method == "dense" and "error" not in row:
                    dense = row
                if dense is not None and "error" not in row:
                    for key in ("step_s", "ffn_step_s", "rest_step_s", "end_to_end_s", "decode_s"):
                        row[f"{key[:-2]}_speedup"] = dense[key] / row[key]
                    row["prefill_overhead_s"] = row["prefill_s"] - dense["prefill_s"]
                row["wall_s"] = time.time() - t0
                rows.append(row)
                if "error" in row:
                    print(f"{name} {kind} b{batch} {method:8s} {target}: {row['error']}", flush=True)
                else:
                    print(f"{name} {kind:8s} b{batch} {method:8s} {target!s:4s} step {1e3 * row['step_s']:7.3f} ms "
                          f"(x{row.get('step_speedup', 1):.2f})  ffn {1e3 * row['ffn_step_s']:6.3f} ms "
                          f"(x{row.get('ffn_step_speedup', 1):.2f})  rest {1e3 * row['rest_step_s']:6.3f} ms  "
                          f"e2e {row['end_to_end_s']:.3f} s (x{row.get('end_to_end_speedup', 1):.2f})  "
                          f"prefill {1e3 * row['prefill_s']:.1f} ms  ({row['wall_s']:.0f} s)", flush=True)
            if compiled is not None:
                compiled.remove()
                torch._dynamo.reset()
        del model
        torch.cuda.empty_cache()
    if args.json:
        write_json(args.json, {"task": "pop_gpu_e2e", "device": torch.cuda.get_device_name(0),
                               "prompt_tokens": args.prompt, "new_tokens": args.steps,
                               "compile_mode": args.compile_mode, "coordinate_descent": args.coordinate_descent,
                               "prefill": args.prefill, "rows": rows},
                   command=["python", *sys.argv])


if __name__ == "__main__":
    main()
