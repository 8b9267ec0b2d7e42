"""Exclusive per-key locks between processes, on `filelock` (flock on POSIX).

The kernel drops the lock of a process that dies, even by SIGKILL, so a process waiting on a killed
holder's key takes over without any stale-lock cleanup. Lock files stay in place (removing one while
another process opens it would let two processes hold "the same" lock).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout


def _file_lock(path: Path) -> FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    # fallback_to_soft=False: only a kernel lock is released when its holder dies.
    return FileLock(path, thread_local=False, preserve_lock_file=True, fallback_to_soft=False)


@contextlib.contextmanager
def held(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock at `path`, waiting as long as it takes; `on_wait` is called once, before waiting,
    when another process holds it."""
    lock = _file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def held_if_free(path: Path) -> Iterator[bool]:
    """Hold the lock at `path` if no process holds it now; yields whether it is held."""
    lock = _file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
