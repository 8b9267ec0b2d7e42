"""Whether a params validator may fetch what a name in the config stands for (torchvision's weights for
`model.pretrained: imagenet`). On while `run` validates its pipeline (engine/cli.py's
validated_pipeline), so the file is there, and its digest in the cache key, before any stage runs; off
for plan, dag and every other command, which never download: a validator then says where the file
would come from. Standard library only: the CLI imports it on every run."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

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
