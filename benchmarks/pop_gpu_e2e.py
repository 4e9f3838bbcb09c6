"""POP end to end on a GPU: whole decode steps of Llama-2-7B / Llama-3.1-8B, the paper's Table 5 protocol.

Random-weight models built from the real configs (bf16; weights do not change latency), batch 1 and 10,
128 prompt tokens + 128 generated tokens. The prompt is prefilled eagerly (POP partitions there); then one
greedy decode step — the whole model, its static KV cache, the argmax and the position update — is
captured in a CUDA graph and replayed 128 times, which *is* the 128-token greedy decode (each replay feeds
the token the previous one chose). Timed with CUDA events, median of `--repeats`, side by side with the
dense model in the same run. Also timed: every layer's FFN module alone for one decode step (a graph of the
32 FFN calls on a static input), so the step splits into FFN time and the rest (attention, norms, LM head;
derived as step - FFN), and the prefill (its POP overhead is the per-prompt cost of partitioning and
building slices). Methods: dense, static (Variant 1, the speed upper bound), pop, reselect at the 20% and
40% model-level targets.

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
def measure(model, prompt: torch.Tensor, steps: int, repeats: int) -> dict:
    from transformers import StaticCache

    batch, length = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=length + steps + 4)
    out = {}
    first = None

    def prefill():
        nonlocal first
        cache.reset()
        first = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)

    prefill()  # warm-up (kernels compiled, allocations made)
    out["prefill_s"] = statistics.median(events_time(prefill) for _ in range(3))
    ids = first.clone()
    pos = torch.tensor([length], device=prompt.device, dtype=torch.long)

    def step():
        logits = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        ids.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)

    # Newer transformers keep each static layer's write position in a device tensor the graph advances;
    # rewind it with the position before every replayed decode.
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    graph = capture(step)

    def decode():
        for _ in range(steps):
            graph.replay()

    times = []
    for _ in range(repeats):
        ids.copy_(first)
        pos.fill_(length)
        for counter in counters:
            counter.fill_(length)
        times.append(events_time(decode))
    out["decode_s"] = statistics.median(times)
    out["step_s"] = out["decode_s"] / steps
    out["tokens"] = ids.flatten().tolist()[:4]

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
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    rows = []
    for name in args.models.split(","):
        t0 = time.time()
        model = build(name, device)
        print(f"{name}: built in {time.time() - t0:.0f} s", flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator(device="cpu").manual_seed(batch)
            prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=gen).to(device)
            dense = None
            for method, target in METHODS:
                row = {"model": name, "batch": batch, "method": method, "target": target}
                handle = None
                try:
                    if method != "dense":
                        handle = apply(model, method, target=target)
                    row.update(measure(model, prompt, args.steps, args.repeats))
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
                rows.append(row)
                if "error" in row:
                    print(f"{name} b{batch} {method:8s} {target}: {row['error']}", flush=True)
                else:
                    print(f"{name} b{batch} {method:8s} {target!s:4s} step {1e3 * row['step_s']:7.3f} ms "
                          f"(x{row.get('step_speedup', 1):.2f})  ffn {1e3 * row['ffn_step_s']:6.3f} ms "
                          f"(x{row.get('ffn_step_speedup', 1):.2f})  rest {1e3 * row['rest_step_s']:6.3f} ms  "
                          f"e2e {row['end_to_end_s']:.3f} s (x{row.get('end_to_end_speedup', 1):.2f})  "
                          f"prefill {1e3 * row['prefill_s']:.1f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        write_json(args.json, {"task": "pop_gpu_e2e", "device": torch.cuda.get_device_name(0),
                               "prompt_tokens": args.prompt, "new_tokens": args.steps, "rows": rows},
                   command=["python", *sys.argv])


if __name__ == "__main__":
    main()
