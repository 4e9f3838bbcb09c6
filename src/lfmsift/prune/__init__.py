"""Structural pruning: POP, its variants and the baselines behind one registry.

    handle = lfmsift.prune.apply(model, "pop", target=0.2, gamma=0.1)
    ...generate...
    print(handle.stats()["total"])
    handle.remove()

or ``with lfmsift.prune.pruned(model, "pop", target=0.2) as handle: ...``. Calibrated baselines need the
tokenizer: ``apply(model, "flap", target=0.2, tokenizer=tok)``.
"""

from lfmsift.prune import flap as _flap  # noqa: F401  (registers flap)
from lfmsift.prune import griffin as _griffin  # noqa: F401  (registers griffin)
from lfmsift.prune import online as _online  # noqa: F401  (registers pop / static / reselect)
from lfmsift.prune import probe as _probe  # noqa: F401  (registers probe)
from lfmsift.prune import wanda_sp as _wanda_sp  # noqa: F401  (registers wanda_sp)
from lfmsift.prune.registry import METHODS, PruneHandle, PruningMethod, apply, pruned, register

__all__ = ["METHODS", "PruneHandle", "PruningMethod", "apply", "pruned", "register"]
