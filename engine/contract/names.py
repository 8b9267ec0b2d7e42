"""The one rule for names that become path components (stage names, run names, cache types and keys,
job subfolders, names read back from run.json or a manifest), and the two helpers every path built
from them goes through: `join` (a checked name under a root, confirmed to stay inside it) and
`remove_tree` (deletes nothing outside the folder it was asked to clean, following no symlink there).

Standard library only: the planning path calls it for every stage."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from engine.errors import UnsafeName as UnsafeName  # re-exported: raised here

# Letters, digits (any script: \w is Unicode) and . _ - + = , @ only: no separator, no control
# character, no space; not '-' first (an option to a tool), not '.' alone, no '..' anywhere.
_NAME = re.compile(r"[\w.][\w.+=,@-]*")
MAX_BYTES = 200  # a run folder adds its time and a -N suffix; a file name holds 255 bytes
ALLOWED = "letters, digits and . _ - + = , @ only, not '-' first, no '/', no '..', not '.'"


def problem(name: object) -> str | None:
    """Why `name` cannot be a path component, or None when it can."""
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"longer than {MAX_BYTES} bytes"
    if ".." in name or name == "." or not _NAME.fullmatch(name):
        return f"use {ALLOWED}"
    return None


def check(name: object, what: str) -> str:
    """`name` itself, or UnsafeName naming `what` it is (`stage name`, `cache key`...) and the rule."""
    why = problem(name)
    if why is not None:
        raise UnsafeName(f"{what} {name!r} cannot name a folder: {why}")
    return name  # type: ignore[return-value]


def join(root: Path, *names: str, what: str = "name") -> Path:
    """root/name/... with every name checked, confirmed (by its text) to stay under root. A symlink
    at the result is not followed: a run's stages/<name> link points into the cache by design."""
    path = Path(root).joinpath(*(check(n, what) for n in names))
    base, full = os.path.abspath(root), os.path.abspath(path)
    if os.path.commonpath([base, full]) != base or full == base:
        raise UnsafeName(f"{what} {'/'.join(names)!r} leaves {root}")
    return path


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, every symlink above it resolved, lies in `root` (resolved too). `path` itself
    is not followed: a link there is a file of root's to remove, not a way out."""
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return os.path.commonpath([real_root, real_parent]) == real_root


def remove_tree(path: Path, within: Path) -> bool:
    """Delete `path` (a folder, a file or a link: the link itself) when it lies inside `within` with
    no symlink above it leading out; shutil.rmtree does not follow the links inside. Returns False,
    having removed nothing, when it does not; True otherwise (also when there was nothing)."""
    if not inside(path, within):
        return False
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return True
