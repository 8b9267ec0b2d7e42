"""A backend added the way a plugin distribution adds one: a module plus an installed distribution's
``edgepipe.backends`` entry point (a ``*.dist-info`` folder on sys.path), nothing else edited.

    with backend_plugin(tmp_path / "plugin", "constant_backend", SOURCE, constant="constant_backend:Constant"):
        run_stage("evaluate", ...)        # evaluate, package, golden and the report see kind "constant"

A subprocess sees it with ``PYTHONPATH`` at the folder ``write_backend_plugin`` returns.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path


def write_backend_plugin(root: Path, module: str, source: str, boards: dict[str, str] | None = None,
                         **entries: str) -> Path:
    """``root/<module>.py`` and ``root/<module>-0.dist-info`` registering ``entries`` (kind -> "module:Class")
    as backends and ``boards`` (name -> "module:attr") as boards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source, encoding="utf-8")
    info = root / f"{module}-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0\n", encoding="utf-8")
    lines = "".join(f"{kind} = {target}\n" for kind, target in entries.items())
    board_lines = "".join(f"{name} = {target}\n" for name, target in (boards or {}).items())
    (info / "entry_points.txt").write_text(f"[edgepipe.backends]\n{lines}"
                                           + (f"[edgepipe.boards]\n{board_lines}" if board_lines else ""),
                                           encoding="utf-8")
    return root


def clear_backend_caches() -> None:
    """The entry-point readers (backends' for stages and boards, the report's, the boards') read again."""
    import boards
    from engine.contract.plugins import backend_classes

    backend_classes.cache_clear()
    boards.board_entry_points.cache_clear()


@contextmanager
def backend_plugin(root: Path, module: str, source: str, boards: dict[str, str] | None = None, **entries: str):
    write_backend_plugin(root, module, source, boards, **entries)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    clear_backend_caches()
    try:
        yield
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(module, None)
        importlib.invalidate_caches()
        clear_backend_caches()
