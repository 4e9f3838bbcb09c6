"""Streaming KV-cache retrieval: hashing, clusters, WiCSum, a tiered store, retrievers and the cache."""

from lfmsift.kv.infinigen import InfiniGen, InfiniGenP
from lfmsift.kv.quest import Quest
from lfmsift.kv.rekv import ReKV
from lfmsift.kv.resv import ReSV, ReSVShifted
from lfmsift.kv.retriever import RETRIEVERS, SELECTION_MODES, Full, LayerIndex, Retriever, get_retriever, register
from lfmsift.kv.store import KVBudgetError, TierBudget, TieredKVStore
from lfmsift.kv.streamingllm import StreamingLLM

__all__ = [
    "RETRIEVERS", "SELECTION_MODES", "Full", "InfiniGen", "InfiniGenP", "KVBudgetError", "LayerIndex", "Quest",
    "ReKV", "ReSV", "ReSVShifted", "Retriever", "StreamingLLM", "TierBudget", "TieredKVStore", "get_retriever", "register",
]
