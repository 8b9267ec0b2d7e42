"""A user's project on the real conf/ and the real stages, for tests and module-scoped fixtures that run
the CLI in this process (conftest.py's ``project`` fixture is the same for one test, with a Workspace)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def use_real_config(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Through ``mp`` (undone with it): runs in ``root``/runs, the repository's conf/, only the built-in
    stages, ``root`` the current folder."""
    mp.setenv("EDGEPIPE_RUNS", str(root / "runs"))
    mp.setenv("EDGEPIPE_CONFIG_DIR", str(REPO / "conf"))
    mp.delenv("EDGEPIPE_PLUGINS", raising=False)
    mp.chdir(root)
