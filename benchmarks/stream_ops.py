"""Tensor operations the host issues per layer in one streaming frame step (machine-independent).

The device streaming path never waits for the GPU, but each of its small tensor operations still costs the
host a Python dispatch and, on a GPU, a kernel launch; when they outnumber what the GPU needs time for,
the frame is bound by the host (docs/results.md, ``benchmarks/stream_gpu.py``). This counts them: every
ATen operation dispatched during one frame step (``TorchDispatchMode``), for each retriever on the device
path and for transformers' own attention (sdpa, a dense ``DynamicCache``) as the baseline, per layer.
The in-chunk leader walk and the two-tier gather are one Triton launch each on CUDA; on the CPU they are
loops of tensor operations, so each call counts as one operation here (``launch_ops_on_cpu`` gives what
their CPU forms dispatched). The same for the opt-in kernels (``LFMSIFT_WICSUM_KERNEL=1``, ``LFMSIFT_ASSIGN_KERNEL=1``): their rows
stand each kernel in by its PyTorch rule and count it as one launch. The counts do not depend on the
cache length.

    python benchmarks/stream_ops.py --json results/stream_ops.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lfmsift.kv.device_cache as device_cache
import lfmsift.kv.device_clusters as device_clusters
from lfmsift.kernels import cluster_assign, wicsum_rows
from lfmsift.kv.wicsum import shift_nonpositive, wicsum_bucketed
from lfmsift.kv import TierBudget, get_retriever
from lfmsift.kv.cache import new_cache, uninstall
from lfmsift.models.adapters import cache_argument
from lfmsift.models.tiny import tiny_model


LAUNCHES = [(device_clusters, "founders"), (device_cache, "gather_positions")]  # one Triton launch each on CUDA


def wicsum_kernel_on_cpu(scores, counts, ratio, rowmask, seen, nonpositive, shifted, buckets):
    """What ``kernels.wicsum_rows.launch`` writes, computed by the PyTorch rule (counted as one launch)."""
    valid = counts > 0
    rows = shift_nonpositive(scores, counts, valid) if shifted else scores
    mask, share = wicsum_bucketed(rows, counts, float(ratio), buckets, valid)
    rowmask.copy_(mask)
    seen.copy_(share)
    nonpositive.copy_(torch.where(valid, scores.double() * counts, 0.0).sum(-1) <= 0)


def assign_kernel_on_cpu(hashes, keys, position, lowest, threshold, bound, size, table_hashes, counts, newest, sums):
    """What ``kernels.cluster_assign.assign_chunk`` computes, by the PyTorch rule (counted as one launch)."""
    bits = device_clusters.unpack_bits(table_hashes[: max(bound, 1)], 64)
    rows = device_clusters.unpack_bits(hashes, 64)
    tokens = hashes.shape[0]
    earlier = torch.ones(tokens, tokens, dtype=torch.bool).tril(-1)
    old_min, old_arg, d_in, close, can_found = device_clusters.chunk_distances.eager(
        rows, bits, bits.sum(1), newest[: max(bound, 1)], lowest, earlier, float(threshold))
    founder = device_clusters.founders(close, can_found)
    spare_bits = torch.zeros(table_hashes.shape[0] + 1, 64)
    cluster, new_size = device_clusters.assign_and_write.eager(
        d_in, close, founder, old_min, old_arg, size, float(threshold), rows, keys.float(), position, spare_bits,
        torch.zeros(table_hashes.shape[0] + 1), sums, counts, newest)
    table_hashes[cluster[founder]] = hashes[founder]
    return cluster, new_size


class KernelsOnCpu:
    """Within it, the device path takes the opt-in kernels' paths (``LFMSIFT_WICSUM_KERNEL``,
    ``LFMSIFT_ASSIGN_KERNEL``), each kernel standing in by its PyTorch rule and counted as one launch."""

    def __init__(self, counter: "OpCounter", assign: bool) -> None:
        self.counter, self.assign = counter, assign
        self.wicsum = WicsumKernelOnCpu(counter)

    def __enter__(self):
        self.wicsum.__enter__()
        self.saved = (cluster_assign.enabled, cluster_assign.available, cluster_assign.assign_chunk)
        if self.assign:
            cluster_assign.enabled = lambda: True
            cluster_assign.available = lambda device: True
            cluster_assign.assign_chunk = assign_kernel_on_cpu
            as_one_launch(cluster_assign, "assign_chunk", self.counter)
        return self

    def __exit__(self, *exc):
        cluster_assign.enabled, cluster_assign.available, cluster_assign.assign_chunk = self.saved
        self.wicsum.__exit__(*exc)


class WicsumKernelOnCpu:
    """Within it, ``select_clusters_padded`` takes its kernel path, the kernel standing in as above."""

    def __init__(self, counter: "OpCounter") -> None:
        self.counter = counter

    def __enter__(self):
        self.saved = (wicsum_rows.enabled, wicsum_rows.available, wicsum_rows.launch)
        wicsum_rows.enabled = lambda: True
        wicsum_rows.available = lambda scores: True
        wicsum_rows.launch = wicsum_kernel_on_cpu
        as_one_launch(wicsum_rows, "launch", self.counter)
        return self

    def __exit__(self, *exc):
        wicsum_rows.enabled, wicsum_rows.available, wicsum_rows.launch = self.saved


class OpCounter(TorchDispatchMode):
    """Counts ATen operations by name; ``paused`` stops counting (the walk, counted as one launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.paused = 0
        self.walk_ops = 0

    active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            self.walk_ops += 1
        else:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def as_one_launch(module, name: str, counter: OpCounter):
    """Replace ``module.name`` by a wrapper counted as one operation (what it is on CUDA: one Triton launch);
    returns the original."""
    original = getattr(module, name)

    def launch(*args, **kwargs):
        if counter.active:
            counter.counts[f"triton.{name} (one launch on CUDA)"] += 1
        counter.paused += 1
        try:
            return original(*args, **kwargs)
        finally:
            counter.paused -= 1

    setattr(module, name, launch)
    return original


@torch.no_grad()
def count_step(model, retriever: str | None, options: dict, frames: int, frame_tokens: int, window: int,
               kernels: str = "") -> dict:
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, (frames + 1) * frame_tokens),
                        generator=torch.Generator().manual_seed(0))
    if retriever is None:  # transformers' attention over a dense cache
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(ids[:, : frames * frame_tokens], **cache_argument(model, cache))
        counter = OpCounter()
        with counter:
            model(ids[:, frames * frame_tokens :], **cache_argument(model, cache))
        return {"ops": sum(counter.counts.values()), "per_layer": sum(counter.counts.values()) / layers,
                "top": counter.counts.most_common(400)}
    cfg = model.config
    token_bytes = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    counter = OpCounter()
    stand_ins = KernelsOnCpu(counter, assign="assign" in kernels) if kernels else contextlib.nullcontext()
    stand_ins.__enter__()  # before the cache: its tables choose their path when built
    cache = new_cache(model, get_retriever(retriever, **options), TierBudget(device_bytes=window * token_bytes * layers),
                      "device")
    try:
        for f in range(frames):
            cache.begin("frame", frame_tokens)
            model(ids[:, f * frame_tokens : (f + 1) * frame_tokens], **cache_argument(model, cache))
            cache.end(frame_tokens)
        patched = [(m, n, as_one_launch(m, n, counter)) for m, n in LAUNCHES]
        try:
            with counter:
                cache.begin("frame", frame_tokens)
                model(ids[:, frames * frame_tokens :], **cache_argument(model, cache))
                cache.end(frame_tokens)
        finally:
            for module, name, original in patched:
                setattr(module, name, original)
    finally:
        uninstall(cache)
        cache.close()
        stand_ins.__exit__(None, None, None)
    total = sum(counter.counts.values())
    return {"ops": total, "per_layer": total / layers, "launch_ops_on_cpu": counter.walk_ops,
            "top": counter.counts.most_common(400)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--frames", type=int, default=40, help="frames streamed before the counted one")
    parser.add_argument("--frame-tokens", type=int, default=11)
    parser.add_argument("--window", type=int, default=128, help="device ring, tokens per layer")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model = tiny_model(args.arch, seed=0, dtype=torch.float32)
    configs = [("sdpa (dense cache)", None, {}), ("full", "full", {}), ("resv", "resv", {}),
               ("resv bucketed", "resv", {"buckets": 20}),
               ("resv bucketed previous_layer", "resv", {"buckets": 20, "selection": "previous_layer"}),
               ("resv bucketed, WiCSum kernel", "resv", {"buckets": 20}),
               ("resv bucketed, WiCSum + assignment kernels", "resv", {"buckets": 20}),
               ("streamingllm", "streamingllm", {"window": 64})]
    rows = []
    base = None
    for label, retriever, options in configs:
        kernels = "wicsum,assign" if "assignment kernel" in label else "wicsum" if "kernel" in label else ""
        r = count_step(model, retriever, options, args.frames, args.frame_tokens, args.window, kernels)
        base = r["per_layer"] if retriever is None else base
        r.update(method=label, retriever=retriever, options=options, over_sdpa_per_layer=r["per_layer"] - base)
        rows.append(r)
        print(f"{label:30s} {r['ops']:6d} ops per frame step  {r['per_layer']:7.1f} per layer  "
              f"(+{r['over_sdpa_per_layer']:.1f} over transformers' attention)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/stream_ops.py", *(argv if argv is not None else sys.argv[1:])]),
            "arch": args.arch, "layers": model.config.num_hidden_layers, "torch": torch.__version__, "rows": rows,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
