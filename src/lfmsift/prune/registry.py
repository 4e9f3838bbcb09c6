"""One call prunes a whole model: ``handle = apply(model, "pop", target=0.2)``; ``handle.remove()`` undoes it.

Each method is a small dataclass registered under a name. `apply` resolves the model's layers
(`lfmsift.models.describe`), asks the method for the module swaps and hooks it wants, checks them all, and
only then installs them, so a failing method leaves the model untouched. The handle restores the original
modules exactly (the same objects; weights are never modified).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch import nn

from lfmsift.models.adapters import ModelView, describe


@dataclass
class Swap:
    """Replace ``getattr(parent, attr)`` (currently `original`) by `replacement`."""

    parent: nn.Module
    attr: str
    original: nn.Module
    replacement: nn.Module
    layer: int


@dataclass
class Plan:
    """What a method installs: module swaps and forward pre-hooks (module, hook, with_kwargs)."""

    swaps: list[Swap] = field(default_factory=list)
    pre_hooks: list[tuple[nn.Module, Callable, bool]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class PruningMethod:
    """Base of registered methods: a dataclass of settings whose `plan` builds the swaps."""

    name: str = ""

    def plan(self, model: nn.Module, view: ModelView) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError

    def stats(self, handle: "PruneHandle") -> dict[str, Any]:
        return {}

    def reset_stats(self, handle: "PruneHandle") -> None:
        pass


METHODS: dict[str, type[PruningMethod]] = {}


def register(name: str):
    """Class decorator: make a `PruningMethod` available to `apply` under `name`."""

    def deco(cls: type[PruningMethod]) -> type[PruningMethod]:
        if name in METHODS:
            raise ValueError(f"A pruning method named {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


class PruneHandle:
    """An applied method: `remove()` restores the model, `stats()` reports what was computed."""

    def __init__(self, model: nn.Module, method: PruningMethod, plan: Plan):
        self.model = model
        self.method = method
        self.plan = plan
        self._hooks = []
        self.active = False

    def _install(self) -> None:
        for s in self.plan.swaps:
            if getattr(s.parent, s.attr) is not s.original:
                raise RuntimeError(f"layer {s.layer}: {s.attr} changed between planning and installing")
        for s in self.plan.swaps:
            setattr(s.parent, s.attr, s.replacement)
        for module, hook, with_kwargs in self.plan.pre_hooks:
            self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        self.active = True

    def remove(self) -> None:
        """Restore the original modules and drop the hooks (idempotent)."""
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for s in self.plan.swaps:
            setattr(s.parent, s.attr, s.original)
        self.active = False

    @property
    def replacements(self) -> list[nn.Module]:
        return [s.replacement for s in self.plan.swaps]

    def stats(self) -> dict[str, Any]:
        """The method's settings and what it computed since it was applied (or since `reset_stats`)."""
        return {"method": self.method.name, **self.plan.summary, **self.method.stats(self)}

    def reset_stats(self) -> None:
        """Zero the counters behind `stats()` (e.g. between a warm-up and a measured run)."""
        self.method.reset_stats(self)

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(model: nn.Module, method: str, **settings) -> PruneHandle:
    """Apply a registered pruning method to `model` and return its handle.

    Args:
        method: a registered name (see `METHODS`), e.g. ``"pop"``, ``"static"``, ``"reselect"``.
        **settings: the method's settings (e.g. ``target=0.2, gamma=0.1`` or ``ffn_ratio=0.3``).
    """
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"Unknown pruning method {method!r}; available: {', '.join(sorted(METHODS))}")
    try:
        instance = cls(**settings)
    except TypeError as exc:
        raise TypeError(f"Bad settings for {method!r}: {exc}") from None
    view = describe(model)
    plan = instance.plan(model, view)  # may raise; nothing is installed yet
    handle = PruneHandle(model, instance, plan)
    handle._install()
    return handle


@contextmanager
def pruned(model: nn.Module, method: str, **settings) -> Iterator[PruneHandle]:
    """``with pruned(model, "pop", target=0.2) as h:`` applies on entry and restores on exit."""
    handle = apply(model, method, **settings)
    try:
        yield handle
    finally:
        handle.remove()
