"""ReSV on the GPU: frame latency and time per output token of a streaming session over an offloaded KV cache.

A random-weight model of Llama-3-8B's shapes (32 layers, 32 query / 8 KV heads of 128, bf16; ``--layers``
cuts it) streams frames of ``--frame-tokens`` tokens (11, as in VideoLLM-online) whose input embeddings
drift slowly from frame to frame, so that keys cluster as video keys do. The cache is built once per method
by a dense prefill of the same stream (sdpa, chunks of 4K tokens) whose K/V enter the streaming cache chunk
by chunk (``DeviceStreamingCache.add_chunk``: clustered, stored; ``--load-chunk`` tokens at a time) up to
each cache length of ``--caches``;
there ``--frames`` frames are streamed and timed, then a question of ``--question`` tokens and ``--decode``
greedy steps (time per output token). The device keeps a ring of ``--window`` recent tokens per layer;
every older token lives in pinned host memory and is read over the link when selected.

Methods (``--methods``): ``full`` (every past token fetched: FlexGen-style offloading), ``resv`` with
``same_layer`` and ``previous_layer`` selection, ``streamingllm``, ``rekv`` (its reference index, read back
in every layer). ReSV runs the WTU's bucketed rule (20 buckets). ``--ratio-modes``: ``measured`` (ReSV's rule
on these random-weight keys) and ``paper`` (each layer and KV head takes its highest-scoring clusters until
they hold 32.7% of the past frame tokens while frames stream and 2.5% while answering: V-Rex's Table II
ratios, so that the system is measured apart from what random weights select).

Per row: frame latency and FPS, time per output token, bytes fetched from the host per frame and per output
token, the achieved host-to-device rate, the bytes limit (fetched bytes / measured pinned host-to-device
bandwidth + the weights' bytes / measured device copy bandwidth) and the share of it reached; beside it the
measured forward of one frame with no past (transformers' eager model: what the host needs to issue it).
A one-frame check under CUDA's sync debug mode counts host synchronisations, and one frame issued behind a
second-long GPU sleep shows whether the host waits anywhere (it returns at once unless it does).

    python benchmarks/stream_gpu.py --json results/stream_gpu_h200.json      (on a CUDA machine)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from lfmsift.kv import TierBudget, get_retriever
from lfmsift.kv.cache import FRAME, TEXT, install, uninstall
from lfmsift.kv.device_cache import DeviceStreamingCache
from lfmsift.kv.graphed import GraphedStream
from lfmsift.kv.resv import DeviceReSVIndex, ReSV
from lfmsift.models.adapters import cache_argument, describe

PAPER_RATIOS = {FRAME: 0.327, TEXT: 0.025}
DEVICE, DTYPE = "cuda", torch.bfloat16  # ``--tiny``: the CPU and fp32  # V-Rex Table II: ReSV's retrieval ratios, frame / text stage


class PinnedRatioIndex(DeviceReSVIndex):
    """ReSV's index whose selection takes, per KV head, the clusters with the highest score (max over the
    group's query rows) until they hold a fixed share of the past frame tokens: the paper's ratios."""

    def select(self, queries: torch.Tensor, stage: str = "text", hint: torch.Tensor | None = None) -> torch.Tensor:
        table = self.table
        heads, rows, dim = queries.shape
        kv = table.num_kv_heads
        if table.slots == 0:
            return torch.zeros(kv, 0, dtype=torch.bool, device=queries.device)
        grouped = queries.reshape(kv, heads // kv * rows, dim).float()
        scores = (grouped @ table.representatives.transpose(1, 2)).amax(1)  # (kv, bound)
        scores = torch.where(table.valid, scores, float("-inf"))
        order = scores.argsort(-1, descending=True)
        counts = table.counts.float()
        held = counts[order].cumsum(-1)
        need = PAPER_RATIOS[stage] * counts.sum()
        take = (held - counts[order]) < need  # the prefix that reaches the share
        mask = torch.zeros_like(take).scatter(-1, order, take)
        return mask & table.valid


class PinnedReSV(ReSV):
    def device_index(self, layer, num_kv_heads, head_dim, device, window=None):
        return PinnedRatioIndex(self, layer, num_kv_heads, head_dim, device, window)


def llama3_8b(layers: int, device: str = "cuda", tiny: bool = False):
    """A random-weight Llama-3-8B-shaped model (bf16) cut to ``layers``; ``tiny``: the same layout at toy
    sizes (fp32), for checking the benchmark itself on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=131072, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def stream_embeddings(tokens: int, frame_tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """(1, tokens, hidden) bf16: each frame's embeddings its base plus token noise; the base drifts slowly
    (one stream; ``seed`` picks which)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    frames = -(-tokens // frame_tokens)
    steps = torch.randn(frames, hidden, device=DEVICE, generator=gen) * 0.3
    base = torch.randn(1, hidden, device=DEVICE, generator=gen) + steps.cumsum(0) / frames ** 0.5
    emb = base.repeat_interleave(frame_tokens, 0)[:tokens] + 0.5 * torch.randn(tokens, hidden, device=DEVICE,
                                                                                 generator=gen)
    return (emb * 0.02).to(DTYPE)[None]


@torch.no_grad()
def dense_prefill(model, embeds: torch.Tensor, chunk: int = 4096) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-RoPE K/V of every layer for ``embeds`` (streams, tokens, hidden) (plain sdpa attention), each
    (streams, kv_heads, tokens, head_dim)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for start in range(0, embeds.shape[1], chunk):
        model.model(inputs_embeds=embeds[:, start : start + chunk], **cache_argument(model, cache), use_cache=True)
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def link_gbps() -> float:
    """Pinned host-to-device copy bandwidth (best of 5 copies of 256 MiB)."""
    if DEVICE == "cpu":
        return float("nan")
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return host.numel() / best / 1e9


def hbm_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written, best of 5 copies of 2 GiB)."""
    if DEVICE == "cpu":
        return float("nan")
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * (2 << 30) / best / 1e9


def timed(fn, host: list | None = None) -> float:
    """Milliseconds of ``fn`` on the GPU (CUDA events); ``host`` gets the milliseconds the host took to issue
    it (close to the GPU time when the step is bound by launches, not by the device)."""
    if DEVICE == "cpu":
        t = time.perf_counter()
        fn()
        if host is not None:
            host.append((time.perf_counter() - t) * 1e3)
        return (time.perf_counter() - t) * 1e3
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    start.record()
    fn()
    stop.record()
    if host is not None:
        host.append((time.perf_counter() - t) * 1e3)
    stop.synchronize()
    return start.elapsed_time(stop)


def launch_us(count: int = 2000) -> float:
    """Host microseconds per small kernel launch on this machine (a one-element in-place add)."""
    if DEVICE == "cpu":
        return float("nan")
    x = torch.zeros(1, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / count * 1e6


def retriever_for(method: str, selection: str, ratio_mode: str):
    if method == "resv":
        cls = PinnedReSV if ratio_mode == "paper" else ReSV
        return cls(selection=selection, buckets=20)
    return get_retriever(method)


@torch.no_grad()
def prefix(tensors: list[torch.Tensor], streams: int, start: int, stop: int) -> list[torch.Tensor]:
    """Positions [start, stop) of the first ``streams`` streams, as ``add_chunk`` takes them per layer."""
    return [t[:streams, :, start:stop].reshape(-1, stop - start, t.shape[-1]) for t in tensors]


KERNEL_SWITCHES = ("LFMSIFT_ASSIGN_KERNEL", "LFMSIFT_WICSUM_KERNEL", "LFMSIFT_APPEND_KERNEL",
                   "LFMSIFT_ATTENTION_KERNEL")
KERNEL_SETTINGS = {"off": "0000", "append": "0010", "attention": "0011", "on": "1111"}


@contextlib.contextmanager
def kernel_setting(kernels: str):
    """The fused kernels of the device path switched while a cache is built and measured: ``off`` (none:
    strided copies append to the host tier, a masked SDPA call attends), ``append`` (only the one-launch
    append), ``attention`` (the append and the selected-slots attention), ``on`` (the clustering and WiCSum
    kernels too), or ``default`` (what the environment says)."""
    if kernels not in (*KERNEL_SETTINGS, "default"):
        raise ValueError(f"--kernels takes {', '.join(KERNEL_SETTINGS)} or default, got {kernels!r}")
    saved = {k: os.environ.get(k) for k in KERNEL_SWITCHES}
    if kernels != "default":
        os.environ.update(dict(zip(KERNEL_SWITCHES, KERNEL_SETTINGS[kernels])))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def profile_step(step, path: Path) -> None:
    """Host time per operator of one ``step`` (torch.profiler, CPU and CUDA activities) written as a table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"kernel launches: {launches}\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
    if DEVICE == "cuda":  # where the GPU's time goes (the same kernels as a graph replays)
        text += "\nby GPU time:\n" + events.table(sort_by="self_cuda_time_total", row_limit=30)
    path.write_text(text)


@torch.no_grad()
def measure(model, retriever, keys, values, embeds, args, dense_ms, pinned, method, selection, ratio_mode,
            batch: int = 1, kernels: str = "default", graphs: bool = False):
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    token_bytes = 2 * cfg.num_key_value_heads * dim * torch.empty((), dtype=DTYPE).element_size()
    budget = TierBudget(device_bytes=args.window * token_bytes * cfg.num_hidden_layers * batch)
    cache = DeviceStreamingCache(describe(model), retriever, budget, streams=batch)
    install(cache)
    runner = GraphedStream(model, cache, bucket=args.bucket, graphs=DEVICE == "cuda") if graphs else None
    warm = 2 if graphs else 1  # a new step shape runs eagerly, the next one is captured: neither is timed
    rows = []
    gen = torch.Generator().manual_seed(0)
    per_head = dim * 2 * torch.empty((), dtype=DTYPE).element_size()  # K and V of one token and KV head
    try:
        loaded = 0
        next_embed = max(args.caches) + 64
        for target in args.caches:
            while loaded < target:
                n = min(args.load_chunk, target - loaded)
                cache.add_chunk(prefix(keys, batch, loaded, loaded + n), prefix(values, batch, loaded, loaded + n))
                loaded += n
            for index in cache.indexes.values():  # the bound of the index's table, read outside the timed steps
                if hasattr(index, "table"):
                    index.table.sync_bound()
            frame_ms, frame_bytes, frame_host_ms = [], [], []
            for f in range(args.frames + warm):  # the first frames warm up
                chunk = embeds[:batch, next_embed : next_embed + args.frame_tokens]
                next_embed += args.frame_tokens
                before = cache.fetched_host_tokens()

                def step(chunk=chunk):
                    if runner is not None:
                        return runner(FRAME, inputs_embeds=chunk)
                    cache.begin(FRAME, chunk.shape[1])
                    model(inputs_embeds=chunk, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
                    cache.end(chunk.shape[1])

                if f == warm:
                    first_past = cache.seen  # what the timed frames attend to, the extra tokens of earlier lengths included
                host = []
                ms = timed(step, host)
                if f >= warm:
                    frame_ms.append(ms)
                    frame_host_ms.append(host[0])
                    frame_bytes.append((cache.fetched_host_tokens() - before) * per_head)
            if args.profile and target == args.caches[-1]:  # one more frame, untimed
                chunk = embeds[:batch, next_embed : next_embed + args.frame_tokens]
                next_embed += args.frame_tokens
                profile_step(lambda chunk=chunk: step(chunk), args.profile /
                             f"{method}_{selection}_{ratio_mode}_b{batch}_kernels-{kernels}"
                             f"{'_graphs' if graphs else ''}.txt")
            question = torch.randint(0, cfg.vocab_size, (batch, args.question), generator=gen).to(DEVICE)
            if runner is not None:
                last = runner(TEXT, input_ids=question)
            else:
                cache.begin(TEXT, question.shape[1])
                last = model(input_ids=question, **cache_argument(model, cache), use_cache=True,
                             logits_to_keep=1).logits[:, -1]
                cache.end(question.shape[1])
            token = last.argmax(-1, keepdim=True)
            tpot, token_bytes_moved = [], []
            for s in range(args.decode + warm):
                before = cache.fetched_host_tokens()
                out = {}

                def decode(token=token, out=out):
                    if runner is not None:
                        out["logits"] = runner(TEXT, input_ids=token)
                        return
                    cache.begin(TEXT, 1)
                    out["logits"] = model(input_ids=token, **cache_argument(model, cache), use_cache=True).logits[:, -1]
                    cache.end(1)

                ms = timed(decode)
                token = out["logits"].argmax(-1, keepdim=True)
                if s >= warm:
                    tpot.append(ms)
                    token_bytes_moved.append((cache.fetched_host_tokens() - before) * per_head)
            stats = cache.stats()
            f_ms = statistics.median(frame_ms)
            t_ms = statistics.median(tpot)
            f_bytes = statistics.mean(frame_bytes)
            t_bytes = statistics.mean(token_bytes_moved)
            limit = f_bytes / (pinned * 1e9) * 1e3 + dense_ms["weights"]
            t_limit = t_bytes / (pinned * 1e9) * 1e3 + dense_ms["weights"]
            row = {
                "method": method, "selection": selection, "ratio_mode": ratio_mode, "cache_tokens": target,
                "batch": batch, "kernels": kernels, "graphs": graphs, "layers": cfg.num_hidden_layers,
                "window_tokens": args.window, "graph_steps": dict(runner.counts) if runner is not None else None,
                "past_tokens_first_frame": first_past,
                "frame_ms": f_ms, "fps": 1e3 / f_ms, "fps_all_streams": batch * 1e3 / f_ms, "tpot_ms": t_ms, "frame_host_ms": statistics.median(frame_host_ms),
                "fetched_bytes_per_frame": f_bytes, "fetched_bytes_per_token": t_bytes,
                "h2d_gbps": f_bytes / (f_ms * 1e6), "pinned_gbps": pinned,
                "limit_ms": limit, "of_limit": limit / f_ms, "tpot_limit_ms": t_limit, "tpot_of_limit": t_limit / t_ms,
                "frame_retrieval_ratio": stats["frame_stage"]["retrieval_ratio"],
                "text_retrieval_ratio": stats["text_stage"]["retrieval_ratio"],
                "host_reads_in_layers": stats["host_reads_in_layers"],
            }
            rows.append(row)
            print(f"{method:13s} {selection:14s} {ratio_mode:8s} b{batch} k-{kernels:7s} g-{'on ' if graphs else 'off'} {target:6d}  frame {f_ms:8.2f} ms ({1e3 / f_ms:6.1f} FPS)"
                  f"  tpot {t_ms:7.2f} ms  fetched {f_bytes / 1e6:8.1f} MB/frame  {row['h2d_gbps']:5.1f} GB/s"
                  f"  limit {limit:7.2f} ms ({row['of_limit']:.0%})  host {row['frame_host_ms']:.1f} ms", flush=True)
    finally:
        uninstall(cache)
        cache.close()
    return rows


@torch.no_grad()
def sync_check(model, keys, values, embeds, args) -> dict:
    """Host synchronisations during one ReSV frame step, counted by CUDA's sync debug mode."""
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    budget = TierBudget(device_bytes=args.window * 2 * cfg.num_key_value_heads * dim * cfg.num_hidden_layers
                        * torch.empty((), dtype=DTYPE).element_size())
    out = {}
    if DEVICE == "cpu":
        return {"skipped": "CUDA's sync debug mode needs a GPU"}
    for selection in ("same_layer", "previous_layer"):
        cache, n = loaded_cache(model, keys, values, args, selection, budget)
        try:
            chunk = embeds[:1, n : n + args.frame_tokens]
            for _ in range(2):  # warm up
                cache.begin(FRAME, chunk.shape[1])
                model(inputs_embeds=chunk, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
                cache.end(chunk.shape[1])
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    cache.begin(FRAME, chunk.shape[1])
                    model(inputs_embeds=chunk, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
                    cache.end(chunk.shape[1])
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
            # The debug mode misses waits hidden in copies (e.g. through pageable memory): issue one more
            # frame behind a GPU sleep of about a second; the host returns at once unless something waits.
            chunk = embeds[:1, n + args.frame_tokens : n + 2 * args.frame_tokens]
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000_000)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:  # names the operator that waits, if any
                t = time.perf_counter()
                cache.begin(FRAME, chunk.shape[1])
                model(inputs_embeds=chunk, **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
                cache.end(chunk.shape[1])
                issued = (time.perf_counter() - t) * 1e3
            slowest = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
            slowest = [{"op": e.key, "self_host_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in slowest]
            torch.cuda.synchronize()
            t = time.perf_counter()
            torch.cuda._sleep(2_000_000_000)
            torch.cuda.synchronize()
            sleep_ms = (time.perf_counter() - t) * 1e3
            out[selection] = {"host_syncs_in_frame_step": len(syncs), "messages": sorted(set(syncs))[:10],
                              "host_ms_issuing_a_frame_behind_a_gpu_sleep": issued, "gpu_sleep_ms": sleep_ms,
                              "slowest_host_ops_behind_the_sleep": slowest}
            print(f"sync check {selection}: {len(syncs)} host synchronisations in one frame step; behind a "
                  f"{sleep_ms:.0f} ms GPU sleep the host issued a frame in {issued:.1f} ms; slowest host ops: "
                  + ", ".join(f"{e['op']} {e['self_host_ms']:.1f} ms" for e in slowest[:3]), flush=True)
        finally:
            uninstall(cache)
            cache.close()
        out[f"{selection}_graphs"] = graph_sleep_check(model, keys, values, embeds, args, selection, budget)
    return out


def loaded_cache(model, keys, values, args, selection: str, budget: TierBudget):
    """An installed ReSV cache holding the shortest cache length of the prefill, frame by frame; and that length."""
    cache = DeviceStreamingCache(describe(model), ReSV(selection=selection, buckets=20), budget)
    install(cache)
    n = min(args.caches)
    for start in range(0, n, args.frame_tokens):
        m = min(args.frame_tokens, n - start)
        cache.add_chunk(prefix(keys, 1, start, start + m), prefix(values, 1, start, start + m))
    return cache, n


def graph_sleep_check(model, keys, values, embeds, args, selection: str, budget: TierBudget) -> dict:
    """A frame replayed from its CUDA graph, issued behind a second-long GPU sleep: the host milliseconds
    it took (a replay queues the whole frame at once, so it returns at once unless something waits)."""
    cache, n = loaded_cache(model, keys, values, args, selection, budget)
    try:
        runner = GraphedStream(model, cache, bucket=args.bucket)
        at = n
        for _ in range(3):  # eager, captured, replayed
            runner(FRAME, inputs_embeds=embeds[:1, at : at + args.frame_tokens])
            at += args.frame_tokens
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)
        t = time.perf_counter()
        runner(FRAME, inputs_embeds=embeds[:1, at : at + args.frame_tokens])
        issued = (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        print(f"sync check {selection} with graphs: behind a GPU sleep the host issued a replayed frame in "
              f"{issued:.1f} ms ({runner.counts})", flush=True)
        return {"host_ms_issuing_a_replayed_frame_behind_a_gpu_sleep": issued, "graph_steps": dict(runner.counts)}
    finally:
        uninstall(cache)
        cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--caches", default="1024,5120,10240,20480,40960")
    parser.add_argument("--frame-tokens", type=int, default=11)
    parser.add_argument("--window", type=int, default=2048, help="recent tokens per layer kept on the device")
    parser.add_argument("--load-chunk", type=int, default=11,
                        help="tokens per chunk when the prefill's K/V enter the cache (frames: --frame-tokens; "
                             "larger chunks build long caches faster and cluster them slightly differently)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--question", type=int, default=16)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--methods", default="full,resv:same_layer,resv:previous_layer,streamingllm,rekv")
    parser.add_argument("--ratio-modes", default="measured,paper")
    parser.add_argument("--batches", default="1", help="streams per forward (lockstep), e.g. 1,4")
    parser.add_argument("--kernels", default="default",
                        help="the device path's fused Triton kernels per row: off, append (the one-launch store "
                             "append only), attention (the append and the selected-slots attention), on "
                             "(clustering and WiCSum too) or default (the environment's), e.g. off,append,on "
                             "side by side")
    parser.add_argument("--graphs", default="off",
                        help="per row: off (every kernel issued by the host) or on (each chunk replayed from a CUDA "
                             "graph of its prepared step, lfmsift.kv.graphed; one stream), e.g. off,on side by side")
    parser.add_argument("--bucket", type=int, default=2048,
                        help="with --graphs on: the past is padded to a multiple of this many positions")
    parser.add_argument("--profile", type=Path,
                        help="a folder: per method and kernel setting, the host time per operator of one frame "
                             "step at the longest cache (torch.profiler), as a text table")
    parser.add_argument("--tiny", action="store_true",
                        help="a toy model of the same layout on the CPU: checks the benchmark, measures nothing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    args.caches = sorted(int(c) for c in args.caches.split(","))
    global DEVICE, DTYPE
    DEVICE, DTYPE = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny, which checks the benchmark on the CPU)", file=sys.stderr)
        return 2
    model = llama3_8b(args.layers, DEVICE, args.tiny)
    cfg = model.config
    total = max(args.caches) + 64 + (args.frames + 1) * args.frame_tokens * len(args.caches) * 2 + 4096
    embeds = torch.cat([stream_embeddings(total, args.frame_tokens, cfg.hidden_size, seed=b)
                        for b in range(max(batches))])
    t = time.perf_counter()
    keys, values = dense_prefill(model, embeds[:, : max(args.caches)])
    print(f"dense prefill of {max(args.caches)} tokens: {time.perf_counter() - t:.1f} s", flush=True)
    pinned = link_gbps()
    launch = launch_us()
    with torch.no_grad():
        frame = embeds[:1, :args.frame_tokens]
        for _ in range(3):
            model(inputs_embeds=frame, logits_to_keep=1)
        dense_ms = {"frame": statistics.median(timed(lambda: model(inputs_embeds=frame, logits_to_keep=1))
                                               for _ in range(10)),
                    "token": statistics.median(timed(lambda: model(inputs_embeds=frame[:, :1])) for _ in range(10))}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()  # a lookup reads a few rows
    hbm = hbm_gbps()
    dense_ms["weights"] = weight_bytes / (hbm * 1e9) * 1e3
    print(f"weights read {weight_bytes / 1e9:.2f} GB at {hbm:.0f} GB/s: {dense_ms['weights']:.2f} ms")
    print(f"pinned host-to-device {pinned:.1f} GB/s; {launch:.1f} us per kernel launch; dense forward with no past: frame {dense_ms['frame']:.2f} ms, "
          f"token {dense_ms['token']:.2f} ms", flush=True)
    syncs = sync_check(model, keys, values, embeds, args)
    rows: list[dict] = []
    for spec in args.methods.split(","):
        method, _, selection = spec.partition(":")
        selection = selection or "same_layer"
        modes = args.ratio_modes.split(",") if method == "resv" else ["measured"]
        for mode in modes:
            for batch in batches:
                for kernels in args.kernels.split(","):
                    for graphs in args.graphs.split(","):
                        if graphs not in ("off", "on"):
                            raise ValueError(f"--graphs takes off and on, got {graphs!r}")
                        if graphs == "on" and batch > 1:
                            print(f"skipped: graphs with batch {batch} (graphs run one stream)", flush=True)
                            continue
                        with kernel_setting(kernels):
                            rows += measure(model, retriever_for(method, selection, mode), keys, values, embeds,
                                            args, dense_ms, pinned, method, selection, mode, batch, kernels,
                                            graphs == "on")
            if args.json:  # after every method, so that a run cut short keeps what it measured
                write(args.json, rows, argv, pinned, launch, dense_ms, syncs)
    return 0


def write(path: Path, rows: list[dict], argv, pinned: float, launch: float, dense_ms: dict, syncs: dict) -> None:
    """The JSON record, with each row's speedups against full fetch at the same cache length."""
    full = {(r["cache_tokens"], r["batch"], r["kernels"], r["graphs"]): r for r in rows if r["method"] == "full"}
    for r in rows:
        base = full.get((r["cache_tokens"], r["batch"], r["kernels"], r["graphs"]))
        if base:
            r["frame_speedup_vs_full"] = base["frame_ms"] / r["frame_ms"]
            r["tpot_speedup_vs_full"] = base["tpot_ms"] / r["tpot_ms"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/stream_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LFMSIFT_")},
        "pinned_gbps": pinned, "launch_us": launch, "dense_forward_ms": dense_ms, "sync_check": syncs, "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
