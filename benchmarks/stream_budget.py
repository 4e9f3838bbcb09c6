"""A long video stream stays within its KV byte budgets: 20 minutes at 2 fps (2400 frames).

A tiny random-weight SmolVLM (the test suite's tiny config with a 48 px vision tower: 9 image tokens plus
2 wrapper tokens = 11 tokens per frame, like VideoLLM-online's 10 + separator) receives real frames of
``vtest.avi`` sampled at 2 fps and replayed in a loop until the stream is ``--minutes`` long. Each frame
is one iterative-prefill pass through ``StreamingKVCache`` with the chosen retriever; the KV lives in a
tiered store with byte budgets for the device window, host memory and disk. At the end two questions
(random tokens: the model is untrained) exercise the text stage. The script prints the budgets, the peak
bytes per tier, the bytes moved and the retrieval ratios, checks that no tier ever passed its budget, and
writes JSON.

    python benchmarks/stream_budget.py --json results/stream_budget.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfmsift.kv import ReSV, TierBudget, get_retriever  # noqa: E402
from lfmsift.kv.cache import new_cache, uninstall  # noqa: E402
from lfmsift.kv.store import parse_bytes  # noqa: E402
from lfmsift.models.tiny import tiny_config  # noqa: E402
from lfmsift.models.vlm import _image_processor  # noqa: E402
from lfmsift.results import write_json  # noqa: E402
from lfmsift.stream import frames  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "vtest.avi"


def tiny_vlm(image_size: int):
    from transformers import AutoModelForImageTextToText

    config = tiny_config("smolvlm")
    config.vision_config.image_size = image_size
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, default=DATA)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--retriever", default="resv")
    p.add_argument("--selection", default="previous_layer")
    p.add_argument("--device-bytes", default="256K")
    p.add_argument("--host-bytes", default="4M")
    p.add_argument("--disk-bytes", default="64M")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    model = tiny_vlm(48)
    cfg = model.config
    per_frame_images = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor**2
    processor = _image_processor(cfg.vision_config.image_size)
    wrapper = 7  # a token id standing for <fake_token_around_image> in the tiny vocabulary
    frame_ids = torch.tensor([[wrapper] + [cfg.image_token_id] * per_frame_images + [wrapper]])
    # The clip's frames are decoded and preprocessed once, then replayed in a loop.
    clip = [processor(images=[[f.image]], return_tensors="pt") for f in frames(args.video, fps=args.fps, size=96)]
    total = int(args.minutes * 60 * args.fps)
    budget = TierBudget(parse_bytes(args.device_bytes), parse_bytes(args.host_bytes), parse_bytes(args.disk_bytes))
    options = {"selection": args.selection}
    retriever = ReSV(**options) if args.retriever == "resv" else get_retriever(args.retriever, **options)
    cache = new_cache(model, retriever, budget)
    gen = torch.Generator().manual_seed(0)
    peaks_ok = True
    start = time.perf_counter()
    try:
        with torch.no_grad():
            cache.begin("text", 6)
            model(input_ids=torch.randint(3, 200, (1, 6), generator=gen), past_key_values=cache)
            cache.end(6)
            for i, pixels in enumerate(itertools.islice(itertools.cycle(clip), total)):
                cache.begin("frame", frame_ids.shape[1])
                model(input_ids=frame_ids, pixel_values=pixels["pixel_values"],
                      pixel_attention_mask=pixels.get("pixel_attention_mask"), past_key_values=cache)
                cache.end(frame_ids.shape[1])
                if (i + 1) % 400 == 0:
                    s = cache.store.stats()
                    print(f"frame {i + 1:5d}  tokens {cache.seen:6d}  device {s['bytes']['device']:>9,}  "
                          f"host {s['bytes']['host']:>10,}  disk {s['bytes']['disk']:>11,}  "
                          f"{(time.perf_counter() - start) / (i + 1) * 1000:.1f} ms/frame", flush=True)
            stream_seconds = time.perf_counter() - start
            for _ in range(2):  # a question of 12 tokens and 16 greedy steps, twice
                cache.begin("text", 12)
                logits = model(input_ids=torch.randint(3, 200, (1, 12), generator=gen), past_key_values=cache).logits
                cache.end(12)
                for _ in range(16):
                    cache.begin("text", 1)
                    logits = model(input_ids=logits[:, -1:].argmax(-1), past_key_values=cache).logits
                    cache.end(1)
        stats = cache.stats()
    finally:
        uninstall(cache)
        cache.close()
    store = stats["store"]
    rows = []
    for tier in ("device", "host", "disk"):
        limit = store["budget_bytes"][tier]
        ok = limit is None or store["peak_bytes"][tier] <= limit
        peaks_ok &= ok
        rows.append({"tier": tier, "budget_bytes": limit, "peak_bytes": store["peak_bytes"][tier],
                     "final_bytes": store["bytes"][tier], "within_budget": ok})
    print(f"\n{total} frames ({args.minutes:g} min at {args.fps:g} fps, {frame_ids.shape[1]} tokens each), "
          f"{stats['tokens']} tokens, {stream_seconds:.1f} s ({stream_seconds / total * 1000:.1f} ms/frame)")
    print(f"{'tier':8s} {'budget':>14s} {'peak':>14s} {'final':>14s}  within")
    for r in rows:
        print(f"{r['tier']:8s} {r['budget_bytes'] or 0:>14,} {r['peak_bytes']:>14,} {r['final_bytes']:>14,}  "
              f"{r['within_budget']}")
    moved = store["moved_bytes"]
    print(f"KV bytes {store['kv_bytes']:,}; offloaded to host {moved['offloaded_host']:,}, spilled to disk "
          f"{moved['spilled_disk']:,}; fetched host {moved['fetched_host']:,} in {store['runs_fetched']['host']:,} "
          f"runs, disk {moved['fetched_disk']:,} in {store['runs_fetched']['disk']:,} runs")
    print(f"retrieval ratio: frame stage {stats['frame_stage']['retrieval_ratio']:.3f}, "
          f"text stage {stats['text_stage']['retrieval_ratio']:.3f}")
    if "clusters" in stats["index"]:
        print(f"clusters {stats['index']['clusters']:,}, {stats['index']['tokens_per_cluster']:.1f} tokens each, "
              f"HC table {stats['index']['hc_table_vs_kv']:.2%} of the KV bytes")
    if args.json:
        stats["index"].pop("layers", None)
        write_json(args.json, {"benchmark": "stream_budget", "video": str(args.video), "frames": total,
                               "fps": args.fps, "tokens_per_frame": frame_ids.shape[1],
                               "stream_seconds": stream_seconds, "tiers": rows, "all_within_budget": peaks_ok,
                               "stats": stats})
    if not peaks_ok:
        raise SystemExit("a tier passed its budget")


if __name__ == "__main__":
    main()
