"""Probe Pruning (PP): batch-wise online structured pruning guided by a small probe (Le et al., ICLR 2025).

Right before each attention block and each FFN of a layer runs on a new batch, PP

1. ranks the batch's (sample, token) positions by the L2 norm of the residual stream and keeps the top
   ``ceil(5%)`` samples and the top 50% of token positions (at least 2; token 0 joins when 10 or fewer
   are selected) -- the *probe*;
2. runs the probe through the block (attention up to the ``o_proj`` input; FFN up to the ``down_proj``
   input) and takes, per selected position and input column, the mean square over the probe samples ``p``;
3. fuses it with the calibration history ``g`` at the same positions: ``c = (1 - rho) g + rho p`` with
   ``rho = p / (p + g)``, summed over positions;
4. scores column j as ``|| c_j * W_{:, j}^2 ||_2`` (attention: per head, over its columns and output rows),
   removes the lowest ``int(r' * n)`` heads / channels with ``r' = r L / (L - |skip|)`` (layers 0-2 stay
   dense), and runs the whole batch on the sliced weights.

Readings and differences from the reference code: the history ``g`` is the per-position mean square of the
calibration pass (PP accumulates it with an EMA of momentum 0.99 over its calibration batches and keeps
it fixed at inference); positions beyond the calibration length use the mean over positions. The structure
chosen on a prompt's forward is kept for its decode steps (a head removed at prefill has no KV-cache
entries, so it cannot return). Calibration on PTB, not C4. With grouped-query attention a key/value head
goes only with all of its query heads. Channel counts are not rounded to multiples of 64 unless
``channel_multiple`` says so (PP rounds for tensor cores; these models are small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lfmsift.models.adapters import AttentionView, GatedFFN, ModelView
from lfmsift.prune.calibration import CalibratedMethod, ColumnStats
from lfmsift.prune.online import _prompt_hook as online_prompt_hook
from lfmsift.prune.pop import PromptContext
from lfmsift.prune.registry import Plan, PruneHandle, PruningMethod, Swap, register
from lfmsift.prune.structured import LayerMask, SlicedFFN, pruned_attention, reduction_summary


@dataclass
class ProbeContext(PromptContext):
    """Shared by the probe modules: the current prompt, its pad mask and the captured residual streams."""

    residual: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def probe_indices(
    residual: torch.Tensor,
    token_mask: torch.Tensor | None,
    batch_ratio: float = 0.05,
    token_ratio: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected samples, selected token positions, both sorted) of PP's probe.

    Importance of a (sample, token) is the L2 norm of the residual over the hidden dim; pads count 0.
    Samples rank by their summed importance, positions by their importance summed over the chosen samples.
    """
    imp = residual.float().norm(dim=-1)  # (batch, tokens)
    if token_mask is not None:
        imp = imp * token_mask.to(imp.dtype)
    b, t = imp.shape
    n_b = min(b, max(1, math.ceil(batch_ratio * b)))
    samples = torch.sort(torch.topk(imp.sum(1), n_b).indices).values
    n_t = min(t, max(2, math.ceil(token_ratio * t)))
    tokens = torch.topk(imp[samples].sum(0), n_t).indices
    if n_t <= 10 and not (tokens == 0).any():
        tokens = torch.cat([tokens[:-1], tokens.new_zeros(1)])
    return samples, torch.sort(tokens).values


def fused_importance(
    probe_sq_mean: torch.Tensor, history: torch.Tensor | None
) -> torch.Tensor:
    """PP's history-informed fusion, summed over positions: ``sum_t (1 - rho) g + rho p``, rho = p / (p + g).

    Args:
        probe_sq_mean: (positions, columns) mean square of the probe's activations over its samples.
        history: (positions, columns) calibration mean squares at the same positions, or None.
    """
    p = probe_sq_mean.double()
    if history is None:
        return p.sum(0)
    g = history.double().to(p.device)
    rho = p / (p + g + 1e-6)
    return ((1 - rho) * g + rho * p).sum(0)


def history_at(stats: ColumnStats | None, positions: torch.Tensor) -> torch.Tensor | None:
    """Calibration mean squares at `positions` (rows beyond the calibration length use the mean row)."""
    if stats is None or stats.position_sq is None:
        return None
    table = stats.position_mean_sq()
    rows = table.new_empty((positions.numel(), table.shape[1]))
    inside = positions < table.shape[0]
    rows[inside] = table[positions[inside].to(table.device)]
    if (~inside).any():
        rows[~inside] = table.mean(0)
    return rows


def probe_mean_square(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(positions, columns): mean over probe samples of the squared activations, pads excluded."""
    out = out.double()
    if mask is None:
        return out.square().mean(0)
    m = mask.to(out.dtype)
    return (out.square() * m.unsqueeze(-1)).sum(0) / m.sum(0).clamp_min(1e-3).unsqueeze(-1)


def _removed(n: int, ratio: float, multiple: int = 1) -> int:
    r = int(ratio * n)
    if multiple > 1:
        r = (r // multiple) * multiple
    return min(r, n - 1)


class _ProbeBlock(nn.Module):
    lfmsift_replacement = True

    def __init__(self, layer: int, context: ProbeContext, history: ColumnStats | None, ratio: float, method):
        super().__init__()
        self.layer = layer
        self.context = context
        self.history = history
        self.ratio = ratio
        self.method = method
        self._prompt_id: int | None = None
        self.kept = 0
        self.active: nn.Module | None = None

    def _probe(self, x: torch.Tensor, key: str):
        mask = self.context.token_mask
        mask = mask.to(x.device) if mask is not None and mask.shape == x.shape[:-1] else None
        residual = self.context.residual.get((self.layer, key))
        if residual is None or residual.shape[:-1] != x.shape[:-1]:
            residual = x
        samples, tokens = probe_indices(residual, mask, self.method.batch_ratio, self.method.token_ratio)
        probe_mask = mask[samples][:, tokens] if mask is not None else None
        return samples, tokens, probe_mask


class ProbeAttention(_ProbeBlock):
    """Attention whose heads are chosen per batch by PP's probe, kept for that prompt's decode steps."""

    def __init__(self, attn: AttentionView, layer: int, context: ProbeContext, history, ratio, method):
        super().__init__(layer, context, history, ratio, method)
        self.dense = attn.module
        self._view = attn
        self.remove = _removed(attn.num_heads, ratio)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if self._prompt_id != self.context.prompt_id or self.active is None:
            self._select(hidden_states, position_embeddings, attention_mask)
        return self.active(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )

    @torch.no_grad()
    def _select(self, x, position_embeddings, attention_mask) -> None:
        self._prompt_id = self.context.prompt_id
        a = self._view
        if self.remove == 0:
            self.active, self.kept = self.dense, a.num_heads
            return
        samples, tokens, probe_mask = self._probe(x, "attention")
        px = x[samples][:, tokens]
        cos, sin = position_embeddings
        pick = lambda t: (t[samples] if t.shape[0] == x.shape[0] else t)[:, tokens]  # noqa: E731
        sub_mask = None
        if isinstance(attention_mask, torch.Tensor):
            sub_mask = attention_mask[samples][:, :, tokens][..., tokens]
        captured = {}
        hook = a.o_proj.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
        try:
            self.dense(px, position_embeddings=(pick(cos), pick(sin)), attention_mask=sub_mask, past_key_values=None)
        finally:
            hook.remove()
        c = fused_importance(probe_mean_square(captured["x"], probe_mask), history_at(self.history, tokens))
        w_sq = a.o_proj.weight.detach().double().square()
        per_head = (c.to(w_sq.device) * w_sq).reshape(w_sq.shape[0], a.num_heads, a.head_dim)
        scores = per_head.square().sum(dim=(0, 2)).sqrt()
        heads = torch.topk(scores, a.num_heads - self.remove).indices
        self.active = pruned_attention(a, heads)
        self.kept = heads.numel()


class ProbeFFN(_ProbeBlock):
    """A gated FFN whose channels are chosen per batch by PP's probe, kept for that prompt's decode steps."""

    def __init__(self, ffn: GatedFFN, layer: int, context: ProbeContext, history, ratio, method):
        super().__init__(layer, context, history, ratio, method)
        self.dense = ffn.module
        self._view = ffn
        self.remove = _removed(ffn.intermediate_size, ratio, method.channel_multiple)
        self.register_buffer("w_down_sq_norm", ffn.down_proj.weight.detach().double().square().norm(dim=0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prompt_id != self.context.prompt_id or self.active is None:
            self._select(x)
        return self.active(x)

    @torch.no_grad()
    def _select(self, x: torch.Tensor) -> None:
        self._prompt_id = self.context.prompt_id
        f = self._view
        if self.remove == 0:
            self.active, self.kept = self.dense, f.intermediate_size
            return
        samples, tokens, probe_mask = self._probe(x, "ffn")
        px = x[samples][:, tokens]
        h = f.act_fn(f.gate_proj(px)) * f.up_proj(px)
        c = fused_importance(probe_mean_square(h, probe_mask), history_at(self.history, tokens))
        scores = c.to(self.w_down_sq_norm.device) * self.w_down_sq_norm
        channels = torch.sort(torch.topk(scores, f.intermediate_size - self.remove).indices).values
        self.active = SlicedFFN(f, channels)
        self.kept = channels.numel()


def _ffn_norm(layer_module: nn.Module) -> nn.Module:
    """The norm right before the FFN, whose input is the residual stream there."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm"):
        if hasattr(layer_module, name):
            return getattr(layer_module, name)
    raise TypeError(f"probe: no FFN norm found in {type(layer_module).__name__}")


def _capture(context: ProbeContext, key: tuple[int, str]):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        context.residual[key] = x
        return None

    return hook


def _prompt_hook(context: ProbeContext):
    """POP's prompt hook (new prompt on an empty cache, pad mask of the current tokens), then forget the
    residual streams captured for the previous forward."""
    mark_prompt = online_prompt_hook(context)

    def hook(module, args, kwargs):
        mark_prompt(module, args, kwargs)
        context.residual.clear()
        return None

    return hook


def _expected_reduction(view: ModelView, ratio: float, skipped: list[int], multiple: int) -> dict:
    """Heads / channels / weights kept per batch: the counts are fixed, only which ones varies. Key/value
    heads are counted as kept (true unless a batch drops every query head of a group)."""
    masks = []
    for layer in view.layers:
        if layer.index in skipped:
            masks.append(LayerMask())
            continue
        a, d_ff = layer.attention, layer.ffn.intermediate_size
        spread = torch.arange(a.num_heads).view(a.num_kv_heads, -1).t().reshape(-1)
        masks.append(
            LayerMask(
                heads=spread[: a.num_heads - _removed(a.num_heads, ratio)],
                channels=torch.arange(d_ff - _removed(d_ff, ratio, multiple)),
            )
        )
    return reduction_summary(view, masks)


@register("probe")
@dataclass
class ProbePruning(CalibratedMethod, PruningMethod):
    """Probe Pruning (see the module docstring); `target` is the uniform ratio on heads and channels."""

    batch_ratio: float = 0.05
    token_ratio: float = 0.5
    skip_layers: tuple[int, ...] = (0, 1, 2)
    channel_multiple: int = 1

    def plan(self, model, view: ModelView) -> Plan:
        moe = [layer.index for layer in view.layers if not isinstance(layer.ffn, GatedFFN)]
        if moe:
            raise TypeError(f"probe: decoder layer {moe[0]} has routed experts; Probe Pruning prunes dense gated "
                            "FFNs (for MoE use pop, static, reselect, wanda_sp or flap)")
        stats = self.calibration_stats(model, view, positions=True)
        n = len(view.layers)
        skipped = [i for i in self.skip_layers if i < n]
        ratio = round(self.target * n / (n - len(skipped)), 2) if n > len(skipped) else 0.0
        if ratio >= 1.0:
            raise ValueError(f"probe: a target of {self.target} needs ratio {ratio} >= 1 on the non-skipped layers")
        context = ProbeContext()
        swaps, hooks = [], [(view.language_model, _prompt_hook(context), True)]
        for layer in view.layers:
            if layer.index in skipped:
                continue
            i = layer.index
            attn = ProbeAttention(layer.attention, i, context, stats.attention[i], ratio, self)
            ffn = ProbeFFN(layer.ffn, i, context, stats.ffn[i], ratio, self)
            attr = next(name for name, m in layer.module.named_children() if m is layer.attention.module)
            swaps.append(Swap(layer.module, attr, layer.attention.module, attn, i))
            swaps.append(Swap(layer.module, layer.ffn_attr, layer.ffn.module, ffn, i))
            hooks.append((layer.module, _capture(context, (i, "attention")), True))
            hooks.append((_ffn_norm(layer.module), _capture(context, (i, "ffn")), True))
        summary = {
            "target": self.target,
            **_expected_reduction(view, ratio, skipped, self.channel_multiple),
            "layer_ratio": ratio,
            "skip_layers": skipped,
            "calibration": stats.source,
            "calib_tokens": stats.samples * stats.seqlen,
        }
        return Plan(swaps=swaps, pre_hooks=hooks, summary=summary)

    def stats(self, handle: PruneHandle) -> dict[str, Any]:
        blocks = handle.replacements
        return {
            "probed_heads_kept": sum(b.kept for b in blocks if isinstance(b, ProbeAttention)),
            "probed_channels_kept": sum(b.kept for b in blocks if isinstance(b, ProbeFFN)),
        }
