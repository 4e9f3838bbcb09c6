"""Wanda-sp: structured Wanda, as implemented in FLAP's repository (``prune_wanda_sp``).

Score of input column j of ``o_proj`` / ``down_proj``: ``S_j = mean_i |W_ij| * ||X_j||_2`` with ``||X_j||``
the norm of column j of the calibration inputs. FFN: the ``int(r * d_ff)`` channels with the lowest
``S_j`` go (rows of gate/up, columns of down). Attention: a head scores the sum of ``S_j`` over its
``head_dim`` columns and the ``int(r * num_heads)`` lowest heads go. The same ratio r = the model-level
target in every layer and module; no bias compensation.

Calibration inputs: with ``sequential=True`` (the repo's protocol) each layer is calibrated on the outputs
of the layers before it *after* they were pruned; with ``sequential=False`` all statistics come from one
dense pass (shared with the other calibrated methods, cheaper). The default is the repo's.

Differences from the reference: calibration on PTB (`calibration`), not C4; with grouped-query attention a
key/value head goes only with all of its query heads (see `structured`). Mixture-of-experts layers (the
POP paper runs Wanda-sp on MoE models without saying how): every routed expert loses the same ratio of its
channels, scored on the calibration tokens the router sent to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfmsift.models.adapters import DecoderLayerView, ModelView, MoEFFN
from lfmsift.prune.calibration import CalibratedMethod, ColumnStats, ffn_column_stats, ffn_input_hooks, text_windows
from lfmsift.prune.registry import Plan, PruningMethod, register
from lfmsift.prune.structured import LayerMask, layer_swaps, masks_plan


def wanda_column_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """``mean_i |W_ij| * sqrt(sum_sq_j)`` for each input column j (float64)."""
    return weight.detach().double().abs().mean(0) * sum_sq.double().to(weight.device).sqrt()


def keep_top(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of all but the `remove` lowest scores."""
    keep = scores.numel() - remove
    return torch.sort(torch.topk(scores, keep).indices).values


def layer_mask(layer: DecoderLayerView, attn_stats: ColumnStats, ffn_stats, ratio: float) -> LayerMask:
    """Wanda-sp's mask of one layer: the int(ratio * n) lowest heads and channels go.

    MoE layers: each routed expert loses its int(ratio * I) lowest channels, scored on the calibration
    tokens routed to it (`ffn_stats` has one `ColumnStats` per expert); router and shared expert untouched.
    """
    a = layer.attention
    head_scores = wanda_column_scores(a.o_proj.weight, attn_stats.total_sq).reshape(-1, a.head_dim).sum(1)
    mask = LayerMask(heads=keep_top(head_scores, int(ratio * a.num_heads)))
    if isinstance(layer.ffn, MoEFFN):
        down = layer.ffn.experts.down_proj
        remove = int(ratio * layer.ffn.experts.intermediate_size)
        mask.experts = [keep_top(wanda_column_scores(down[e], s.total_sq), remove) for e, s in enumerate(ffn_stats)]
    else:
        ffn_scores = wanda_column_scores(layer.ffn.down_proj.weight, ffn_stats.total_sq)
        mask.channels = keep_top(ffn_scores, int(ratio * ffn_scores.numel()))
    return mask


@torch.no_grad()
def sequential_masks(model, view: ModelView, windows: torch.Tensor, bos_id: int | None, ratio: float) -> list[LayerMask]:
    """FLAP repo's ``prune_wanda_sp`` loop: calibrate layer i on the outputs of the already pruned layers
    0..i-1, decide its mask, prune it, and pass its pruned outputs on.

    The inputs and keyword arguments (masks, rotary embeddings) of every decoder layer are captured in one
    dense forward of the decoder stack (no LM head: its logits would dwarf everything else); then each
    layer runs on its own.
    """
    device = next(model.parameters()).device
    ids = windows.to(device)
    if bos_id is not None:
        ids = torch.cat([torch.full((ids.shape[0], 1), bos_id, device=device), ids], dim=1)
    captured: dict[int, tuple] = {}

    def capture(i):
        def hook(module, args, kwargs):
            captured[i] = (args[0] if args else kwargs["hidden_states"], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    handles = [layer.module.register_forward_pre_hook(capture(layer.index), with_kwargs=True) for layer in view.layers]
    try:
        view.language_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden = captured[0][0]
    masks = []
    for layer in view.layers:
        kwargs = captured[layer.index][1]
        a_stats, f_stats = ColumnStats(), ffn_column_stats(layer)
        hooks = [layer.attention.o_proj.register_forward_hook(lambda m, i, o: a_stats.add(i[0], None))]
        hooks += ffn_input_hooks(layer, f_stats)
        try:
            layer.module(hidden, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        mask = layer_mask(layer, a_stats, f_stats, ratio)
        masks.append(mask)
        swaps = layer_swaps(layer, mask)
        for sw in swaps:
            setattr(sw.parent, sw.attr, sw.replacement)
        try:
            out = layer.module(hidden, **kwargs)
        finally:
            for sw in swaps:
                setattr(sw.parent, sw.attr, sw.original)
        hidden = out[0] if isinstance(out, tuple) else out
    return masks


@register("wanda_sp")
@dataclass
class WandaSP(CalibratedMethod, PruningMethod):
    """Static structured Wanda: uniform ratio `target` on the heads and the FFN channels of every layer."""

    sequential: bool = True

    def plan(self, model, view: ModelView) -> Plan:
        if self.sequential:
            if self.tokenizer is None:
                raise ValueError("wanda_sp with sequential=True calibrates layer by layer: pass tokenizer=")
            windows, bos_id = text_windows(
                self.tokenizer, self.calibration, self.calib_samples, self.calib_seqlen, self.data_dir
            )
            masks = sequential_masks(model, view, windows, bos_id, self.target)
            source, tokens = str(self.calibration), windows.numel()
        else:
            stats = self.calibration_stats(model, view)
            masks = [layer_mask(layer, a, f, self.target) for layer, a, f in zip(view.layers, stats.attention, stats.ffn)]
            source, tokens = stats.source, stats.samples * stats.seqlen
        summary = {"target": self.target, "calibration": source, "calib_tokens": tokens, "sequential": self.sequential}
        return masks_plan(view, masks, summary)
