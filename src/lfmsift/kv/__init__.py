"""Streaming KV-cache retrieval: hashing, clusters, WiCSum, a tiered store, retrievers and the cache."""

from lfmsift.kv import resv as _resv  # noqa: F401  (registers "resv")
from lfmsift.kv.resv import ReSV
from lfmsift.kv.retriever import RETRIEVERS, SELECTION_MODES, Full, LayerIndex, Retriever, get_retriever, register
from lfmsift.kv.store import KVBudgetError, TierBudget, TieredKVStore

__all__ = [
    "RETRIEVERS", "SELECTION_MODES", "Full", "KVBudgetError", "LayerIndex", "ReSV", "Retriever", "TierBudget",
    "TieredKVStore", "get_retriever", "register",
]
