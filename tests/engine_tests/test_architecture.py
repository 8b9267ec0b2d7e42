"""`make lint` keeps the layers DEVELOPERS.md draws: import-linter's contracts (pyproject.toml) and
scripts/lint_private_names.py pass on this tree and fail on a copy with a loop, an upward import or a
private name planted in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(import-linter, private names) on the packages under root, root first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    imports = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
                             cwd=root, env=env, capture_output=True, text=True)
    private = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_private_names.py"), str(root)],
                             cwd=root, capture_output=True, text=True)
    imports.stdout = " ".join(imports.stdout.split())  # import-linter wraps long contract names
    return imports, private


@pytest.fixture()
def tree(tmp_path):
    """A copy of the code and its lint configuration."""
    for name in ("engine", "stages", "boards", "backends"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def plant(path: Path, code: str) -> None:
    """Code appended to a module, inside a function: imports there count too."""
    path.write_text(path.read_text(encoding="utf-8") + "\n\ndef _planted():\n" + code + "\n", encoding="utf-8")


def test_the_tree_keeps_every_contract():
    imports, private = lint(ROOT)
    assert imports.returncode == 0, imports.stdout + imports.stderr
    assert "0 broken" in imports.stdout
    assert private.returncode == 0, private.stdout


def test_an_upward_import_breaks_the_layers(tree):
    plant(tree / "engine" / "store" / "cache.py", "    from engine.job import sweep\n    return sweep")
    imports, _ = lint(tree)
    assert imports.returncode == 1
    assert "engine layers: each imports only the layers below it BROKEN" in imports.stdout
    assert "engine.store.cache -> engine.job.sweep" in imports.stdout


def test_a_loop_inside_one_layer_is_found(tree):
    # dag imports validate (StageSpec); validate importing dag back closes a loop within engine.config
    plant(tree / "engine" / "config" / "validate.py", "    from engine.config import dag\n    return dag")
    imports, _ = lint(tree)
    assert imports.returncode == 1
    assert "no import loops between the modules or subpackages of one package BROKEN" in imports.stdout


def test_a_stage_reaching_into_the_engine_is_found(tree):
    plant(tree / "stages" / "calibration.py", "    from engine.store.cache import Cache\n    return Cache")
    imports, _ = lint(tree)
    assert imports.returncode == 1
    assert ("stages, boards and backends use the engine only through engine.contract and engine.errors BROKEN"
            in imports.stdout)


def test_a_private_name_of_another_module_is_found(tree):
    plant(tree / "engine" / "run" / "testing.py",
          "    from engine.config.compose import _where\n    from engine.store import cache\n"
          "    return _where, cache._has_marker")
    _, private = lint(tree)
    assert private.returncode == 1
    assert "imports engine.config.compose._where, a private name of another module" in private.stdout
    assert "uses engine.store.cache._has_marker, a private name of another module" in private.stdout
