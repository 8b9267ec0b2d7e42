"""Artefacts a test session builds once, shared by every pytest-xdist worker (`make test` runs the tests
on each core: README, "Set-up and the two commands"): each is built under a file lock in the session's
common temp folder, and only read after.

    folder = built_once(tmp_path_factory, "bundles", lambda out: build_bundles(out))
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

DONE = ".built"  # written last: a folder without it is a build a killed worker left half done


def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every worker of this session sees: under xdist each worker's base temp folder is a
    child of the session's (popen-gw0, popen-gw1...); without xdist, the base temp folder itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """<session folder>/shared/<name>, made by build(folder) in the first worker that asks; the others
    wait on the lock and get the finished folder. Tests must not write into it."""
    return built_once_in(session_folder(tmp_path_factory) / "shared", name, build)


def built_once_in(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """root/<name>, made by build(folder) by the first process that asks (under root/<name>.lock; one
    that a killed process left half done, without DONE, is built again); read only after."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (out / DONE).is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / DONE).touch()
    return out
