"""Classes that installed distributions add through entry points and that both the engine and the
plugins read: the model backends (`edgepipe.backends`). One reader, so the report, package, golden
and evaluate see the same classes in the same order. Loading them imports no runtime (no torch).

Which entry points a group has is remembered (engine.contract.fetching's sealed memo, where the
engine installs one: a run's report) by `site_stats`, which installing, upgrading or removing a
distribution changes: importing importlib.metadata and reading every distribution's metadata are a
third of a cached run's report."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from functools import lru_cache

from engine.contract import fetching

BACKEND_GROUP = "edgepipe.backends"


@lru_cache(maxsize=1)
def backend_classes() -> tuple[type, ...]:
    """Every registered backend class, in recognition order (its ``order``, then its kind)."""
    classes = [_load(value) for value in entry_point_values(BACKEND_GROUP)]
    return tuple(sorted(classes, key=lambda cls: (cls.order, cls.kind)))


def entry_point_values(group: str) -> list[str]:
    """The `module:attribute` of each entry point of group, remembered while sys.path's folders are
    unchanged (site_stats)."""
    name = hashlib.sha256(json.dumps(["entry points", group, site_stats()]).encode()).hexdigest()[:40]
    kept = fetching.remembered(name)
    try:
        values = json.loads(kept).get("values") if kept is not None else None
    except (ValueError, AttributeError):
        values = None
    if isinstance(values, list) and all(isinstance(v, str) for v in values):
        return values
    from importlib.metadata import entry_points

    values = [ep.value for ep in entry_points(group=group)]
    fetching.remember(name, json.dumps({"values": values}))
    return values


def site_stats() -> list[str]:
    """mtime and inode of every folder on sys.path: installing, upgrading or removing a distribution
    there adds or removes its .dist-info folder, which changes them."""
    found = []
    for entry in sys.path:
        try:
            st = os.stat(entry or ".")
        except OSError:
            continue
        found.append(f"{entry}\0{st.st_mtime_ns}:{st.st_ino}")
    return found


def _load(value: str) -> object:
    """What an entry point's `module:attribute.attribute` names (importlib.metadata.EntryPoint.load's rule)."""
    module, _, attrs = value.partition(":")
    obj = importlib.import_module(module.strip())
    for attr in filter(None, attrs.split("[")[0].strip().split(".")):
        obj = getattr(obj, attr)
    return obj
