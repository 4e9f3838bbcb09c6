"""ReSV's premises on our streams (V-Rex Fig. 7) and why its literal rule fetches so little.

Streams real WikiText-2 text (SmolLM2) or real video frames (the SmolVLM-architecture model) through a
streaming session and reads the post-RoPE keys the store holds, all KV heads of a token concatenated:

- cosine similarity of a token's key with the key one frame earlier at the same position (video) or with
  the previous token's (text), against random pairs (the paper's Fig. 7a: adjacent frames' keys are close);
- the correlation of the 32-bit hash Hamming distance (ReSV's hyperplanes of that layer) with the cosine
  similarity over random token pairs (Fig. 7b: the paper reports about 0.8 in magnitude);
- clusters per layer and tokens per cluster under ReSV's defaults, and the share of WiCSum rows whose
  weighted raw-score sum is <= 0 (each such row takes only its top cluster), per stage and layer.

    python benchmarks/resv_keys.py --model smollm2-135m --json results/resv_keys_smollm2-135m.json
    python benchmarks/resv_keys.py --model smolvlm-smollm2-135m --video ../shared/data/video/vtest.avi \
        --json results/resv_keys_smolvlm-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lfmsift
from lfmsift.eval.kv_eval import device_budget
from lfmsift.kv import ReSV
from lfmsift.kv.hashing import hamming, hash_bits, hyperplanes
from lfmsift.results import environment
from lfmsift.stream.session import StreamingSession


def stored_keys(session: StreamingSession, layer: int) -> torch.Tensor:
    """(tokens, kv_heads * head_dim) post-RoPE keys of ``layer`` in token order, from every tier."""
    cache = session.cache
    store = cache.store[cache._slot[layer]]
    n = store.num_tokens
    order = torch.argsort(store.tier.view[:n].long() * (1 << 40) + store.slot.view[:n])
    keys = torch.empty(n, cache.num_kv_heads, cache.head_dim)
    for h in range(cache.num_kv_heads):
        keys[order, h] = store.gather(torch.arange(n), h)[0].float().cpu()
    return keys.reshape(n, -1)


def key_statistics(keys: torch.Tensor, frame: torch.Tensor, period: int, bits: int, layer: int,
                   pairs: int, seed: int = 0) -> dict:
    """Adjacent vs random cosine, and Hamming-vs-cosine correlation, over the streamed tokens."""
    k = keys[frame]
    unit = torch.nn.functional.normalize(k, dim=-1)
    adjacent = (unit[period:] * unit[:-period]).sum(-1)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, k.shape[0], (pairs,), generator=gen)
    b = torch.randint(0, k.shape[0], (pairs,), generator=gen)
    keep = a != b
    a, b = a[keep], b[keep]
    cosine = (unit[a] * unit[b]).sum(-1)
    planes = hyperplanes(k.shape[1], bits, seed=0, layer=layer)
    h = hash_bits(k, planes)
    dist = hamming(h[a], h[b]).double()
    corr = torch.corrcoef(torch.stack([dist, cosine.double()]))[0, 1]
    centered = torch.nn.functional.normalize(k - k.mean(0), dim=-1)
    hc = hash_bits(k - k.mean(0), planes)  # hashing the keys minus their mean (ReSV's ``center_keys``)
    dist_c = hamming(hc[a], hc[b]).double()
    cos_c = (centered[a] * centered[b]).sum(-1).double()
    return {
        "tokens": int(k.shape[0]),
        "adjacent_cosine_mean": float(adjacent.mean()),
        "random_cosine_mean": float(cosine.mean()),
        "hamming_cosine_correlation": float(corr),
        "mean_hamming_distance": float(dist.mean()),
        "random_cosine_mean_centered": float(cos_c.mean()),
        "hamming_cosine_correlation_centered": float(torch.corrcoef(torch.stack([dist_c, cos_c]))[0, 1]),
        "mean_hamming_distance_centered": float(dist_c.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--video", default=None, help="a video file (VLM): frames instead of text")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--stream-tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--device-tokens", type=int, default=512)
    parser.add_argument("--layers", default="3,10,20", help="layers whose keys are analysed (paper: 3)")
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    model, processor = lfmsift.load(args.model, data_dir=args.data_dir)
    tokenizer = getattr(processor, "tokenizer", processor)
    retriever = ReSV()
    budget = device_budget(model, args.device_tokens)
    with StreamingSession(model, processor, retriever=retriever, budget=budget) as session:
        if args.video:
            from lfmsift.stream.video import frames

            sizes = [session.feed(f) for f in frames(args.video, fps=1.0, max_frames=args.frames)]
            period = sizes[0]
        else:
            from lfmsift.eval.data import load_text
            from lfmsift.eval.streaming_qa import paragraphs

            text = " ".join(paragraphs(load_text("wikitext2", data_dir=args.data_dir)))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.stream_tokens]
            for i in range(0, len(ids), args.chunk_tokens):
                session.feed_tokens(ids[i : i + args.chunk_tokens])
            period = 1
        session.ask("What was this about?", max_new_tokens=8)
        stats = session.stats()
        cache = session.cache
        rows = []
        for layer in [int(x) for x in args.layers.split(",")]:
            store = cache.store[cache._slot[layer]]
            frame = store.group.view[: store.num_tokens] >= 0
            entry = {"layer": layer, **key_statistics(stored_keys(session, layer), frame, period,
                                                      retriever.hash_bits, layer, args.pairs)}
            index = stats["index"]["layers"][layer]
            entry.update(clusters=index["clusters"], tokens_per_cluster=index["tokens_per_cluster"],
                         nonpositive_rows=index.get("nonpositive_rows"))
            rows.append(entry)
    doc = {"model": args.model, "source": args.video or "wikitext2", "period": period,
           "command": " ".join(["python", "benchmarks/resv_keys.py", *(argv if argv is not None else sys.argv[1:])]),
           "nonpositive_rows_all_layers": stats["index"].get("nonpositive_rows"),
           "retrieval_ratio": {s: stats[f"{s}_stage"]["retrieval_ratio"] for s in ("frame", "text")},
           "rows": rows, "environment": environment()}
    print(f"{'layer':>5} {'adj cos':>8} {'rand cos':>8} {'centered':>8} {'corr(H,cos)':>11} {'centered':>8} "
          f"{'mean H':>6} {'centered':>8} {'clusters':>8} {'tok/cl':>6} {'Sum<=0 frame':>12} {'Sum<=0 text':>11}")
    for r in rows:
        npos = r["nonpositive_rows"] or {}
        print(f"{r['layer']:>5} {r['adjacent_cosine_mean']:>8.3f} {r['random_cosine_mean']:>8.3f} "
              f"{r['random_cosine_mean_centered']:>8.3f} {r['hamming_cosine_correlation']:>11.3f} "
              f"{r['hamming_cosine_correlation_centered']:>8.3f} {r['mean_hamming_distance']:>6.1f} "
              f"{r['mean_hamming_distance_centered']:>8.1f} "
              f"{r['clusters']:>8} {r['tokens_per_cluster']:>6.1f} {npos.get('frame', float('nan')):>12.3f} "
              f"{npos.get('text', float('nan')):>11.3f}")
    print("WiCSum rows with Sum <= 0, all layers:", doc["nonpositive_rows_all_layers"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
