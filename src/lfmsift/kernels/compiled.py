"""Pure tensor functions of the streaming path, compiled on CUDA so that a step is a few fused kernels.

A frame step of the device streaming path is bound by the host: each of a layer's small tensor operations
costs a Python dispatch and a kernel launch, far more than the GPU needs to run it. ``fused(fn)`` runs
``fn`` eagerly, unless ``LFMSIFT_COMPILE=1``: then, the first time it is called with CUDA tensors, it
compiles it with ``torch.compile(dynamic=True)``: elementwise chains and reductions become a few Triton
kernels, and the sizes that grow with the stream (the cache length, the cluster table) stay symbolic, so
they compile once rather than once per length. Compiling is opt-in: the compiled path selects the same
tokens as the reference (the CUDA tests pass with it), but no benchmark has yet shown it faster than the
eager one on the machines measured (docs/results.md), and the first frame waits for the compilation. Functions given to ``fused`` must be pure
apart from in-place updates of their tensor arguments, and read nothing back to the host.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch


def compile_enabled() -> bool:
    return os.environ.get("LFMSIFT_COMPILE", "0") in ("1", "true", "yes")


def fused(fn: Callable) -> Callable:
    """``fn``, compiled for CUDA inputs (see the module docstring)."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda or not compile_enabled():
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    run.eager = fn
    return run
