"""A real-weight mixture-of-experts model built from a dense one (MoEfication with a shared expert).

No pretrained MoE is reachable here, so ``moefy`` turns a dense Llama-architecture model (SmolLM2-135M) into
an MoE with the same weights in the layout of Qwen1.5-MoE / Qwen2-MoE (the first MoE model of the POP
paper): a dense shared expert plus E routed experts, following MoEfication (Zhang et al., 2022):

1. **Shared expert.** The ``shared_fraction`` of each FFN's channels with the highest importance on the
   calibration text, ``||H[:, i]||_2 * ||W_down[:, i]||_2`` (POP's own score), form an always-on shared
   expert: these are the channels every token needs (the massive-activation ones among them).
2. **Routed experts by co-activation.** On the other channels, a channel is *active* on a token when its
   |act(gate) * up| is among the token's top `active_fraction` (default 10%). Channels whose activation
   patterns overlap (cosine of the binary patterns: within-cluster co-activation counts) are grouped by a
   balanced spherical k-means into E experts of equal size, stored in the fused layout of transformers 5.x
   (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)).
3. **Router.** A linear router (weights and a bias) fitted by ridge regression from the FFN input to each
   routed expert's share of the routed output norm, ``||down_e(h_e)|| / sum_e' ||down_e'(h_e')||``, on 90% of
   the calibration tokens; the rest measure its recall of the true top-k experts.
4. **Exactness.** The selected experts' outputs are *summed* with weight 1 (`MoEficationRouter`), and the
   shared expert's sigmoid gate has zero weights (sigmoid(0) = 1/2 exactly) with its down projection
   doubled (exact in floating point). With all E experts active the MoE computes exactly the dense FFN (its
   down projection split into column blocks). A softmax router cannot do this (its weights vary with the
   token and would need a per-token 1/p rescale), which is why the router is lfmsift's own module; the
   experts, the shared expert, attention and everything else are the stock ``Qwen2MoeForCausalLM``.

The built model saves as a plain HF directory (``save_moe``) whose ``config.json`` carries
``lfmsift_moefy`` so ``lfmsift.load`` restores the router (plain ``from_pretrained`` would silently put a
softmax router in its place). ``set_top_k`` changes the number of active routed experts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lfmsift.models.adapters import describe

logger = logging.getLogger(__name__)

ROUTER_FILE = "moefy_routers.safetensors"


# ----------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------


def activation_patterns(h: torch.Tensor, active_fraction: float) -> torch.Tensor:
    """(tokens, d_ff) bool: the top ceil(active_fraction * d_ff) channels of each token by |h|."""
    if not 0.0 < active_fraction <= 1.0:
        raise ValueError(f"active_fraction must be in (0, 1]; got {active_fraction}")
    n = max(1, math.ceil(active_fraction * h.shape[-1]))
    top = h.abs().topk(n, dim=-1).indices
    return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, top, True)


def balanced_assign(similarity: torch.Tensor) -> torch.Tensor:
    """Labels (n,) maximising similarity greedily with exactly n / k items per cluster.

    Pairs (item, cluster) are taken in descending similarity; an item joins the first cluster that still
    has room. Deterministic (ties broken by a stable sort).
    """
    n, k = similarity.shape
    if n % k:
        raise ValueError(f"{n} items cannot be split into {k} equal clusters")
    capacity = [n // k] * k
    labels = [-1] * n
    order = torch.argsort(similarity.reshape(-1), descending=True, stable=True).tolist()
    left = n
    for flat in order:
        item, cluster = divmod(flat, k)
        if labels[item] < 0 and capacity[cluster] > 0:
            labels[item] = cluster
            capacity[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels)


def balanced_kmeans(features: torch.Tensor, n_clusters: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Balanced spherical k-means: labels (n,) with n / n_clusters rows per cluster.

    Rows are L2-normalised (cosine similarity); the start is a seeded random balanced split; each iteration
    recomputes normalised centroids and reassigns with `balanced_assign`, until nothing changes.
    """
    n = features.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} channels cannot be split into {n_clusters} equal experts")
    x = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=g) % n_clusters
    for _ in range(iters):
        centroids = torch.zeros(n_clusters, x.shape[1]).index_add_(0, labels, x)
        sim = x @ F.normalize(centroids, dim=1).T
        new = balanced_assign(sim)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def expert_output_norms(h: torch.Tensor, down_weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(tokens, E): ||down[:, C_e] h[:, C_e]||_2 of each expert e with channel set channels[e]."""
    return torch.stack([(h[:, c] @ down_weight[:, c].T).norm(dim=-1) for c in channels], dim=1)


def fit_router(x: torch.Tensor, targets: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``targets ~ x W^T + b`` (float64 normal equations); returns (W (E, H), b (E,))."""
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = xd.T @ xd
    reg = ridge * gram.diagonal()[:-1].mean() * torch.eye(xd.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0  # the bias is not shrunk
    sol = torch.linalg.solve(gram + reg, xd.T @ targets.double())  # (H + 1, E)
    return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()


def topk_recall(predicted: torch.Tensor, true: torch.Tensor, k: int) -> float:
    """Mean share of each token's true top-k experts that the predicted top-k contains."""
    p = F.one_hot(predicted.topk(k, dim=-1).indices, predicted.shape[-1]).sum(1)
    t = F.one_hot(true.topk(k, dim=-1).indices, true.shape[-1]).sum(1)
    return float((p * t).sum() / (k * true.shape[0]))


# ----------------------------------------------------------------------------------------------------
# The router and the model
# ----------------------------------------------------------------------------------------------------


class MoEficationRouter(nn.Module):
    """Linear router (weight (E, H), bias (E,)) that picks the top_k experts and weights each by 1.

    Same call contract as the routers of transformers 5.x MoE blocks:
    ``router_logits, top_k_weights, top_k_index = router(hidden_states)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.num_experts = weight.shape[0]
        self.hidden_dim = weight.shape[1]
        self.top_k = int(top_k)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight, self.bias)
        index = logits.topk(self.top_k, dim=-1).indices
        weights = torch.ones(index.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return logits, weights, index

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, top_k={self.top_k}"


@dataclass
class MoefySettings:
    """How ``moefy`` builds the MoE (see the module docstring)."""

    num_experts: int = 16
    top_k: int = 10
    shared_fraction: float = 0.25
    active_fraction: float = 0.1
    kmeans_iters: int = 30
    ridge: float = 1e-3
    holdout: float = 0.1
    seed: int = 0
    calibration: str = "ptb"
    calib_samples: int = 32
    calib_seqlen: int = 512

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"Need 1 <= top_k <= num_experts; got top_k={self.top_k}, E={self.num_experts}")
        if not 0.0 < self.shared_fraction < 1.0:
            raise ValueError(f"shared_fraction must be in (0, 1); got {self.shared_fraction}")


def _check_source(model) -> None:
    cfg = model.config
    if cfg.model_type != "llama" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError(
            f"moefy builds a Qwen2-MoE-layout model from a Llama-architecture model without biases (e.g. "
            f"SmolLM2); got model_type={cfg.model_type!r}"
        )
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        raise ValueError(f"moefy needs head_dim = hidden / heads (Qwen2-MoE's layout); got {head_dim}")


def split_sizes(d_ff: int, num_experts: int, shared_fraction: float) -> tuple[int, int]:
    """(shared expert channels, channels per routed expert): the routed part divides into E equal experts."""
    per_expert = int(round((1 - shared_fraction) * d_ff)) // num_experts
    if per_expert < 1:
        raise ValueError(f"d_ff = {d_ff} leaves no channels for {num_experts} routed experts")
    return d_ff - per_expert * num_experts, per_expert


def moe_config(dense_config, settings: MoefySettings, record: dict | None = None):
    """The Qwen2MoeConfig with the dense Llama config's attention, norms and embeddings, a shared expert
    and E routed experts."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    shared, per_expert = split_sizes(c.intermediate_size, settings.num_experts, settings.shared_fraction)
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        use_sliding_window=False,
        qkv_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=per_expert,
        shared_expert_intermediate_size=shared,
        num_experts=settings.num_experts,
        num_experts_per_tok=settings.top_k,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=getattr(c, "pad_token_id", None),
    )
    config.lfmsift_moefy = record or {}
    return config


def install_routers(model, weights: list[torch.Tensor], biases: list[torch.Tensor], top_k: int) -> None:
    """Put a `MoEficationRouter` in every MoE block of `model`."""
    layers = describe(model).language_model.layers
    for layer, w, b in zip(layers, weights, biases, strict=True):
        layer.mlp.gate = MoEficationRouter(w, b, top_k)


def set_top_k(model, top_k: int) -> None:
    """Number of experts each token uses (top_k = E computes the dense FFN exactly)."""
    routers = [layer.mlp.gate for layer in describe(model).language_model.layers]
    if not all(isinstance(r, MoEficationRouter) for r in routers):
        raise TypeError("set_top_k works on models built by lfmsift.models.moefy")
    if not 1 <= top_k <= routers[0].num_experts:
        raise ValueError(f"top_k must be in [1, {routers[0].num_experts}]; got {top_k}")
    for r in routers:
        r.top_k = top_k
    model.config.num_experts_per_tok = top_k


@torch.no_grad()
def _ffn_inputs(model, windows: torch.Tensor, bos_id: int | None, batch_size: int = 4) -> list[torch.Tensor]:
    """Per decoder layer, the FFN inputs (tokens, hidden) of a dense pass over `windows` (float32)."""
    view = describe(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in view.layers]
    hooks = [
        layer.ffn.module.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for i, layer in enumerate(view.layers)
    ]
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            if bos_id is not None:
                batch = torch.cat([torch.full((batch.shape[0], 1), bos_id), batch], dim=1)
            view.language_model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks).cpu() for chunks in inputs]


@torch.no_grad()
def moefy(model, windows: torch.Tensor, settings: MoefySettings | None = None, bos_id: int | None = None):
    """Build the MoE from dense `model` and calibration `windows` ((samples, seqlen) token ids).

    Returns ``(moe_model, record)``; ``record`` has the settings, the expert sizes and, per layer, the
    router's top-k recall on held-out tokens and the within-expert co-activation share.
    """
    s = settings or MoefySettings()
    _check_source(model)
    n_shared, per_expert = split_sizes(model.config.intermediate_size, s.num_experts, s.shared_fraction)
    view = describe(model)
    xs = _ffn_inputs(model, windows, bos_id)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    weights, biases, per_layer = [], [], []
    for i, (layer, x) in enumerate(zip(view.layers, xs)):
        ffn = layer.ffn
        wg, wu, wd = ffn.gate_proj.weight.float(), ffn.up_proj.weight.float(), ffn.down_proj.weight.float()
        h = ffn.act_fn(x @ wg.T) * (x @ wu.T)
        importance = h.norm(dim=0) * wd.norm(dim=0)
        order = torch.argsort(importance, descending=True, stable=True)
        shared = torch.sort(order[:n_shared]).values
        rest = torch.sort(order[n_shared:]).values
        active = activation_patterns(h[:, rest], s.active_fraction)
        labels = balanced_kmeans(active.T.float(), s.num_experts, s.kmeans_iters, s.seed + i)
        channels = torch.stack([rest[labels == e] for e in range(s.num_experts)])
        norms = expert_output_norms(h, wd, channels)
        shares = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)
        n_fit = max(1, int(round((1 - s.holdout) * x.shape[0])))
        w, b = fit_router(x[:n_fit], shares[:n_fit], s.ridge)
        held = slice(n_fit, None) if n_fit < x.shape[0] else slice(None)
        recall = topk_recall(x[held] @ w.T + b, shares[held], s.top_k)
        co = active.float()
        within = sum(float(co[:, labels == e].sum(1).square().sum()) for e in range(s.num_experts))
        per_layer.append({"layer": i, "router_topk_recall": recall,
                          "within_expert_coactivation": within / float(co.sum(1).square().sum()),
                          "shared_importance_share": float(importance[shared].sum() / importance.sum())})
        dtype = ffn.gate_proj.weight.dtype
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([wg[c], wu[c]]) for c in channels]).to(dtype)
        state[prefix + "experts.down_proj"] = torch.stack([wd[:, c] for c in channels]).to(dtype)
        state[prefix + "shared_expert.gate_proj.weight"] = wg[shared].to(dtype)
        state[prefix + "shared_expert.up_proj.weight"] = wu[shared].to(dtype)
        state[prefix + "shared_expert.down_proj.weight"] = (2 * wd[:, shared]).to(dtype)  # x sigmoid(0) = 1/2
        state[prefix + "shared_expert_gate.weight"] = torch.zeros(1, x.shape[1], dtype=dtype)
        weights.append(w.to(dtype))
        biases.append(b.to(dtype))
        logger.info("moefy layer %d: router recall@%d %.3f", i, s.top_k, recall)
    record = {
        "source": getattr(model.config, "_name_or_path", ""),
        "settings": asdict(s),
        "calibration_tokens": int(xs[0].shape[0]),
        "shared_expert_channels": n_shared,
        "expert_intermediate_size": per_expert,
        "active_channel_fraction": (n_shared + s.top_k * per_expert) / model.config.intermediate_size,
        "router_topk_recall_mean": sum(r["router_topk_recall"] for r in per_layer) / len(per_layer),
        "layers": per_layer,
    }
    config = moe_config(model.config, s, {k: v for k, v in record.items() if k != "layers"})
    moe = _assemble(config, state, weights, biases)
    moe.generation_config = model.generation_config
    return moe.to(model.device).eval(), record


def _assemble(config, state: dict, weights: list[torch.Tensor], biases: list[torch.Tensor]):
    """A Qwen2MoeForCausalLM of `config` with `state` (strictly: every tensor) and lfmsift routers."""
    from transformers import Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(config)  # on the CPU: rotary buffers are computed at construction
    install_routers(model, weights, biases, config.num_experts_per_tok)
    state = dict(state)
    for i, (w, b) in enumerate(zip(weights, biases)):
        state[f"model.layers.{i}.mlp.gate.weight"], state[f"model.layers.{i}.mlp.gate.bias"] = w, b
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


def is_moefied(config) -> bool:
    return getattr(config, "lfmsift_moefy", None) is not None


def save_moe(model, tokenizer, out_dir: str | Path, info: dict | None = None) -> Path:
    """Save a moefied model as an HF directory plus its routers (atomically: a temp dir renamed at the end).

    transformers writes the experts in the original per-expert checkpoint layout and converts them
    back on loading, so `load_moe` goes through ``from_pretrained`` and then restores the routers.
    """
    from safetensors.torch import save_file

    from lfmsift.models.zoo import atomic_directory

    out_dir = Path(out_dir)
    layers = describe(model).language_model.layers
    routers = {}
    for i, layer in enumerate(layers):
        routers[f"{i}.weight"] = layer.mlp.gate.weight.detach().contiguous()
        routers[f"{i}.bias"] = layer.mlp.gate.bias.detach().contiguous()
    with atomic_directory(out_dir) as tmp:
        state = {k: v for k, v in model.state_dict().items() if not k.endswith(".mlp.gate.bias")}
        model.save_pretrained(tmp, state_dict=state)  # the routers' biases live in ROUTER_FILE
        tokenizer.save_pretrained(tmp)
        save_file(routers, str(tmp / ROUTER_FILE))
        (tmp / "lfmsift.json").write_text(json.dumps(info or {}, indent=2))
    return out_dir


def load_moe(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a directory written by `save_moe`, with its routers restored."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, Qwen2MoeForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if not is_moefied(config):
        raise ValueError(f"{path} is not a model built by lfmsift.models.moefy")
    model = Qwen2MoeForCausalLM.from_pretrained(path, dtype=dtype)  # converts the saved expert layout back
    routers = load_file(str(path / ROUTER_FILE))
    n = config.num_hidden_layers
    weights = [routers[f"{i}.weight"].to(dtype) for i in range(n)]
    install_routers(model, weights, [routers[f"{i}.bias"].to(dtype) for i in range(n)], config.num_experts_per_tok)
    return model.eval(), AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------
# The named model
# ----------------------------------------------------------------------------------------------------

SMOLLM2_MOE = "smollm2-135m-moe"


def build_smollm2_moe(dtype: torch.dtype = torch.float32, data_dir=None, settings: MoefySettings | None = None):
    """``smollm2-135m-moe``: SmolLM2-135M moefied with `MoefySettings` defaults, built and cached on first use.

    The build (a few minutes on 2 CPU cores) calibrates on PTB (found in `data_dir` / ``$LFMSIFT_DATA`` or the
    hub) and writes ``$LFMSIFT_HOME/models/smollm2-135m-moe``; later calls only load that directory.
    """
    import transformers

    from lfmsift.models.load import load
    from lfmsift.models.zoo import lfmsift_home
    from lfmsift.prune.calibration import text_windows

    out_dir = lfmsift_home() / "models" / SMOLLM2_MOE
    if not (out_dir / "lfmsift.json").is_file():
        s = settings or MoefySettings()
        dense, tokenizer = load("smollm2-135m", dtype=torch.float32)
        windows, bos = text_windows(tokenizer, s.calibration, s.calib_samples, s.calib_seqlen, data_dir)
        logger.info("Building %s from smollm2-135m into %s (once)", SMOLLM2_MOE, out_dir)
        moe, record = moefy(dense, windows, s, bos_id=bos)
        info = {"name": SMOLLM2_MOE, "source": "smollm2-135m", "transformers": transformers.__version__,
                "torch": torch.__version__, **record}
        save_moe(moe, tokenizer, out_dir, info)
    return load_moe(out_dir, dtype)
