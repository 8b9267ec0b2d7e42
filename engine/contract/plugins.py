"""Classes that installed distributions add through entry points and that both the engine and the
plugins read: the model backends (`edgepipe.backends`). One reader, so the report, package, golden
and evaluate see the same classes in the same order. Loading them imports no runtime (no torch)."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

BACKEND_GROUP = "edgepipe.backends"


@lru_cache(maxsize=1)
def backend_classes() -> tuple[type, ...]:
    """Every registered backend class, in recognition order (its ``order``, then its kind)."""
    classes = [ep.load() for ep in entry_points(group=BACKEND_GROUP)]
    return tuple(sorted(classes, key=lambda cls: (cls.order, cls.kind)))
