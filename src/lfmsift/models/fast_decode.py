"""Fast greedy decoding for measuring FFN methods end to end: a lean decode step around the FFN.

transformers' decode step at batch 1 spends most of its non-FFN time in small kernels (norms in float32,
rotary, cache writes, masks), and any FFN speedup is diluted by it: on an H100 with Llama-2-7B the part
outside the FFNs takes 4.8 of 8.4 ms even inside a CUDA graph, where its weights alone need about 1.6 ms;
compiled as below, 3.0 ms (`results/pop_gpu_e2e_llama2-7b_h100.json`). Two tools here remove that overhead
without touching the FFN:

- `compile_decode_layers(model)`: each decoder layer's single-token forward runs through `torch.compile`
  with its FFN module left out of the graph (`torch.compiler.disable`), so whatever FFN sits there —
  dense, POP with its Triton kernels, a baseline — runs exactly as it does eagerly, while norms,
  attention, rotary, cache write and residual adds are fused. Prompts (more than one token) run eagerly.
- `GraphDecoder`: greedy decoding with a static KV cache whose decode step (model, cache write, argmax,
  position update) is captured once in a CUDA graph and replayed per token; on a CPU the same loop runs
  eagerly. Tokens equal `model.generate(do_sample=False)`'s. With ``prefill_graph=True`` the prompt's
  forward (cache reset included; a pruning method's per-prompt bookkeeping too) is captured as well, once
  per prompt length: at batch 1 an eager prefill of 128 tokens is bound by kernel launches (about 40 ms on
  an H100 for Llama-2-7B, several times its GPU work).

Both apply identically to the dense model and to a pruned one, so ratios between them measure the FFN
method on a step without avoidable overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lfmsift.models.adapters import _find_language_model, arch_spec


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a supported model (found whether or not an lfmsift method is applied)."""
    spec = arch_spec(model.config)
    return list(_find_language_model(model, spec.text_model_type).layers)


@dataclass
class CompiledDecodeLayers:
    """Handle of `compile_decode_layers`: `remove()` restores the eager forwards."""

    layers: list[nn.Module]
    ffn_attr: str = "mlp"
    _left_out: list[nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        for ffn in self._left_out:
            ffn.__dict__.pop("forward", None)
            ffn.__dict__.pop("_lfmsift_not_compiled", None)
        self._left_out.clear()

    def __enter__(self) -> "CompiledDecodeLayers":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def compile_decode_layers(model: nn.Module, ffn_attr: str = "mlp", **compile_options) -> CompiledDecodeLayers:
    """Compile every decoder layer's decode (single-token) forward, leaving the FFN module eager.

    The FFN present at call time is left out, so an FFN method may be applied or removed after this call
    (the layer recompiles once for a new FFN module). dynamo specialises on each layer's index (the
    cache is indexed by it), so each layer compiles once: the recompile limits are raised to allow for
    that. `compile_options` go to `torch.compile` (default: inductor, static shapes). On an H100,
    ``mode="max-autotune-no-cudagraphs"`` with ``torch._inductor.config.coordinate_descent_tuning = True``
    took Llama-2-7B's non-FFN step from 3.0 to 2.3-2.5 ms (one GEMV over q, k and v fused with the norm;
    `results/pop_gpu_e2e_llama2-7b_b1_autotune_h100.json`), at a few minutes of compiling.
    """
    layers = decoder_layers(model)
    need = 8 * len(layers)
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), need))
    handle = CompiledDecodeLayers(layers, ffn_attr)
    options = {"dynamic": False, **compile_options}
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, **options)

        def forward(hidden_states, *args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs):
            if hidden_states.shape[-2] != 1:
                return _eager(hidden_states, *args, **kwargs)
            ffn = getattr(_layer, ffn_attr)
            if not ffn.__dict__.get("_lfmsift_not_compiled", False):
                ffn.forward = torch.compiler.disable(ffn.forward)
                ffn._lfmsift_not_compiled = True
                handle._left_out.append(ffn)
            return _compiled(hidden_states, *args, **kwargs)

        layer.forward = forward
    return handle


def _cache_counters(cache) -> list[torch.Tensor]:
    """Device tensors in which newer transformers' static cache layers keep their write position."""
    return [layer.cumulative_length for layer in getattr(cache, "layers", [])
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]


class GraphDecoder:
    """Greedy decoding with a static KV cache, each decode step replayed from one CUDA graph.

    Args:
        model: a causal LM (any method applied before or after construction).
        max_cache_len: prompt + generated tokens the cache holds.
        batch: batch size (fixed: the graph is captured for it).
        cuda_graph: capture the decode step (default: when the model is on a CUDA device); otherwise the
            same step runs eagerly.
        prefill_graph: also capture the prefill, one graph per prompt length (needs `cuda_graph` and a
            cache whose layers keep their write position in device tensors, as Llama's do; default off).

    The decode graph is captured at the first `decode` and reused for later prompts of any length (the
    position and token live in device tensors the step updates). A prefill graph is captured at the first
    prompt of its length (after one eager warm-up run) and replayed for later prompts of that length: a
    method's per-prompt state (e.g. POP's partition) is rewritten in place, as the decode graph reads it.
    Python-side counters of hooked modules (e.g. POP's `stats()`) do not advance during replays.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, batch: int = 1, cuda_graph: bool | None = None,
                 prefill_graph: bool = False):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.batch = batch
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        # tokens[:, p] is the token fed at position p (written inside the step, so replays record them)
        self.tokens = torch.zeros((batch, max_cache_len + 1), dtype=torch.long, device=self.device)
        self.length = 0
        self._graph = None
        self.prefill_graph = prefill_graph
        if prefill_graph and not self.cuda_graph:
            raise ValueError("prefill_graph=True needs cuda_graph (a CUDA device)")
        if prefill_graph:
            from transformers.cache_utils import StaticLayer

            other = sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer})
            if other:  # e.g. sliding-window layers count their length in a Python int a replay cannot advance
                raise ValueError(f"prefill_graph needs plain StaticLayer cache layers; this model's cache has {other}")
        self._prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._positions = torch.arange(max_cache_len, device=self.device)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run a new prompt (batch, tokens) into an emptied cache; returns its greedy next token (batch, 1)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be ({self.batch}, tokens); got {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("empty prompt: give at least one token")
        if input_ids.shape[1] >= self.max_cache_len:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens does not fit a cache of {self.max_cache_len}")
        length = input_ids.shape[1]
        if not self.prefill_graph:
            self._prefill_body(input_ids.to(self.device))
        elif length in self._prefill_graphs:
            graph, prompt = self._prefill_graphs[length]
            prompt.copy_(input_ids)
            graph.replay()
        else:
            self._capture_prefill(input_ids.to(self.device))
        self.length = length
        return self.ids.clone()

    def _prefill_body(self, prompt: torch.Tensor) -> None:
        length = prompt.shape[1]
        self.cache.reset()
        logits = self.model(input_ids=prompt, past_key_values=self.cache, cache_position=self._positions[:length],
                            use_cache=True, logits_to_keep=1).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.pos.fill_(length)
        self.tokens[:, length] = self.ids[:, 0]

    def _capture_prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt eagerly (warm-up: lazy allocations, kernel compiles), then capture and replay it."""
        static = prompt.clone()
        graph = self._warm_and_capture(lambda: self._prefill_body(static), warmups=1)
        graph.replay()
        self._prefill_graphs[prompt.shape[1]] = (graph, static)

    def _step(self) -> None:
        logits = self.model(input_ids=self.ids, past_key_values=self.cache, cache_position=self.pos,
                            use_cache=True).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)
        self.tokens.index_copy_(1, self.pos, self.ids)

    def _capture(self) -> None:
        """Warm up, capture one step, then rewind what the warm-up and capture advanced."""
        ids, counters = self.ids.clone(), _cache_counters(self.cache)
        saved = [c.clone() for c in counters]
        graph = self._warm_and_capture(self._step, warmups=2)
        self.ids.copy_(ids)
        self.pos.fill_(self.length)
        for c, s in zip(counters, saved):
            c.copy_(s)
        self._graph = graph

    def _warm_and_capture(self, fn, warmups: int) -> torch.cuda.CUDAGraph:
        """Run `fn` `warmups` times on a side stream (as CUDA graph capture requires), then capture it once."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """Feed the last token and generate `steps` more greedily; returns them (batch, steps)."""
        if self.length == 0:
            raise RuntimeError("prefill a prompt first")
        if self.length + steps > self.max_cache_len:
            raise ValueError(f"{self.length} + {steps} tokens exceed the cache of {self.max_cache_len}")
        if self.cuda_graph and self._graph is None:
            self._capture()
        for _ in range(steps):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
        start = self.length + 1
        self.length += steps
        return self.tokens[:, start : start + steps].clone()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of `input_ids`: (batch, max_new_tokens) new tokens, the first from the prefill."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        first = self.prefill(input_ids)
        if max_new_tokens == 1:
            return first
        return torch.cat([first, self.decode(max_new_tokens - 1)], dim=1)
