"""Structural pruning: POP and its variants behind one registry.

    handle = lfmsift.prune.apply(model, "pop", target=0.2, gamma=0.1)
    ...generate...
    print(handle.stats()["total"])
    handle.remove()

or ``with lfmsift.prune.pruned(model, "pop", target=0.2) as handle: ...``.
"""

from lfmsift.prune import online as _online  # noqa: F401  (registers pop / static / reselect)
from lfmsift.prune.registry import METHODS, PruneHandle, PruningMethod, apply, pruned, register

__all__ = ["METHODS", "PruneHandle", "PruningMethod", "apply", "pruned", "register"]
