"""Stage types by name, from the ``edgepipe.stages`` entry points.

Entry points are loaded lazily: planning a pipeline imports only the stage modules it uses. A config
names stage *types* (``uses: train``), never import paths, so a config file cannot make the engine
import or instantiate arbitrary code.
"""

from __future__ import annotations

import importlib
import inspect
import os
from functools import lru_cache
from typing import TYPE_CHECKING

from engine.errors import PluginError
from engine.errors import UnknownStageType as UnknownStageType  # re-exported: raised here

if TYPE_CHECKING:  # the stage contract (pydantic) loads with the first stage type asked for
    from engine.contract.stage import Stage

STAGE_GROUP = "edgepipe.stages"
# For developing stages (and for tests): comma-separated module names whose Stage subclasses are
# registered. An environment variable, not a config key, on purpose.
PLUGINS_ENV = "EDGEPIPE_PLUGINS"

_registered: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Register a stage class (usable as a decorator)."""
    _registered[cls.name] = cls
    return cls


@lru_cache(maxsize=1)
def _entry_points() -> dict:
    from importlib.metadata import entry_points  # ~15 ms: not for a remembered plan, which asks no type

    return {ep.name: ep for ep in entry_points(group=STAGE_GROUP)}


def _load_plugins() -> None:
    from engine.contract.stage import Stage

    for module_name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise PluginError(f"{PLUGINS_ENV}: cannot import '{module_name}' ({e}); "
                              "fix or unset the variable") from None
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Stage) and obj is not Stage and hasattr(obj, "name"):
                _registered.setdefault(obj.name, obj)


def known_types() -> list[str]:
    _load_plugins()
    return sorted(set(_registered) | set(_entry_points()))


def get(name: str) -> type[Stage]:
    _load_plugins()
    if name in _registered:
        return _registered[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise UnknownStageType(name, known_types())
    cls = ep.load()
    _registered[name] = cls
    return cls
