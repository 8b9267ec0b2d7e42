"""What a params validator may reach besides the config, through this module only (standard library
only: the CLI imports it on every run).

- Whether it may fetch what a name in the config stands for (torchvision's weights for
  `model.pretrained: imagenet`): on while `run` validates its pipeline (engine/job/execute.py's
  validated_pipeline), so the file is there before any stage runs; off for plan, dag and every other
  command, which never download: a validator then names the file, and its published digest stands for
  it in the key (stage.PublishedDigest).
- The environment variables and installed distributions' versions it reads (`environ`,
  `distribution`): recorded while the engine validates (`recording`), kept by engine/run/plan_memo.py
  with the validated pipeline and compared on use, so a remembered plan follows $TORCH_HOME or a
  torchvision upgrade.
- What a name resolved to earlier (`remembered`/`remember`): JSON kept by the engine, sealed, in the
  user's cache folder (`memo`, installed by engine/config/validate.py), so that resolving a name costs
  nothing after the first time. A validator keys it by everything the answer depends on.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

_FETCHING: contextvars.ContextVar[bool] = contextvars.ContextVar("edgepipe_fetching", default=False)


def allowed() -> bool:
    return _FETCHING.get()


@contextlib.contextmanager
def fetching() -> Iterator[None]:
    token = _FETCHING.set(True)
    try:
        yield
    finally:
        _FETCHING.reset(token)


# -- what validation read outside the config -------------------------------------------------------
@dataclass
class Outside:
    """Environment variables and distribution versions validators read (None: unset, not installed)."""

    env: dict[str, str | None] = field(default_factory=dict)
    distributions: dict[str, str | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"env": dict(self.env), "distributions": dict(self.distributions)}

    @staticmethod
    def unchanged(recorded: dict, installs_changed: bool = True) -> bool:
        """Whether every value in `recorded` (an as_dict()) reads the same now; the distributions'
        versions only when `installs_changed` (the caller knows no install happened since)."""
        return (all(os.environ.get(k) == v for k, v in recorded["env"].items())
                and (not installs_changed or all(_version(d) == v for d, v in recorded["distributions"].items())))


_READ: contextvars.ContextVar[Outside | None] = contextvars.ContextVar("edgepipe_outside", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Outside]:
    """Record what validators read outside the config while the block runs."""
    seen = Outside()
    token = _READ.set(seen)
    try:
        yield seen
    finally:
        _READ.reset(token)


def environ(name: str) -> str | None:
    """os.environ.get(name), recorded."""
    value = os.environ.get(name)
    seen = _READ.get()
    if seen is not None:
        seen.env[name] = value
    return value


def distribution(name: str) -> str | None:
    """The installed version of a distribution (package metadata, nothing imported), recorded."""
    value = _version(name)
    seen = _READ.get()
    if seen is not None:
        seen.distributions[name] = value
    return value


def _version(name: str) -> str | None:
    import importlib.metadata  # ~20 ms: only when a validator asks, or a remembered plan read one

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- what names resolved to --------------------------------------------------------------------------
@dataclass(frozen=True)
class Memo:
    read: Callable[[str], str | None]  # a JSON text kept under this name, or None
    write: Callable[[str, str], object]


_MEMO: contextvars.ContextVar[Memo | None] = contextvars.ContextVar("edgepipe_memo", default=None)


@contextlib.contextmanager
def memo(store: Memo | None) -> Iterator[None]:
    token = _MEMO.set(store)
    try:
        yield
    finally:
        _MEMO.reset(token)


def remembered(name: str) -> str | None:
    """The text remember(name, ...) kept, or None (nothing kept, no memo installed, a damaged or
    unsealed file). `name`: a digest of everything the answer depends on ([0-9a-f-] only)."""
    store = _MEMO.get()
    return store.read(name) if store is not None else None


def remember(name: str, text: str) -> None:
    store = _MEMO.get()
    if store is not None:
        store.write(name, text)
