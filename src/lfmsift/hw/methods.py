"""The KV-retrieval methods the simulator runs: what each fetches, in which runs, and how it predicts.

Retrieval ratios are the fraction of the cache each method attends to (and fetches, for the offloaded
part), per stage, from the paper's Table II (COIN averages); ``lfmsift.hw.trace`` replaces them with
ratios measured by ``lfmsift stream`` / ``lfmsift.kv`` runs. ``None`` means the method does not select in
that stage and fetches everything.

How the fetched tokens lie in the offload target decides how many requests a fetch costs (``run``):
- ``layer``: FlexGen streams each layer's whole offloaded cache as one run per stream;
- ``frame``: ReKV offloads per-frame blocks (all heads), selects whole blocks — one run per block;
- ``cluster``: V-Rex's KVMU stores each hash cluster contiguously (§V-C) — one run per cluster and KV head;
- ``token``: per-head token selection over a time-ordered cache (InfiniGen, ReSV without the KVMU, ReSV on
  a GPU, where the paper calls the cluster-wise remapping impractical) — one run per token and KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Run = Literal["layer", "frame", "cluster", "token"]
Predictor = Literal["none", "rekv", "infinigen", "resv"]


@dataclass(frozen=True)
class Method:
    """One retrieval method as the simulator sees it."""

    name: str
    frame_ratio: float | None   # Table II, frame stage (None: everything)
    text_ratio: float | None    # Table II, text-generation stage
    run: Run
    predictor: Predictor
    adaptive: bool = False      # the ratio follows the cache (ReSV's WiCSum) rather than a fixed top-k
    windowed: bool = True       # keeps the recent window on the device (all but FlexGen's full offload)
    description: str = ""

    def ratio(self, stage: str) -> float | None:
        return self.frame_ratio if stage == "frame" else self.text_ratio

    def predicts(self, stage: str) -> bool:
        return self.predictor != "none" and self.ratio(stage) is not None


METHODS: dict[str, Method] = {
    "flexgen": Method("flexgen", None, None, "layer", "none", windowed=False,
                      description="full offload, full fetch (FlexGen, §V-A baseline)"),
    "infinigen": Method("infinigen", None, 0.068, "token", "infinigen",
                        description="InfiniGen: speculative token selection during generation only (Table II)"),
    "infinigen_p": Method("infinigen_p", 0.508, 0.068, "token", "infinigen",
                          description="InfiniGen applied to frame prefill too (the paper's InfiniGenP)"),
    "rekv": Method("rekv", 0.584, 0.312, "frame", "rekv",
                   description="ReKV: top-k frame blocks by mean key, shared by heads"),
    "resv": Method("resv", 0.327, 0.025, "cluster", "resv", adaptive=True,
                   description="ReSV: hash-bit clusters + WiCSum per layer and head (V-Rex)"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
