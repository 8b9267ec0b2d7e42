"""The hostile-input corpus's one assertion: a clean failure.

Every case in tests/*/test_hostile_*.py feeds edgepipe one bad input (generated at test time) and checks
what a user sees: the promised exit code (2 for config/usage errors, 1 for runtime failures), no Python
traceback, an error line that names the input, nothing written outside the places the user named, and
no code executed from a file (the marker a malicious pickle would write does not exist)."""

from __future__ import annotations

import os
from pathlib import Path


def error_lines(text: str) -> list[str]:
    """The lines edgepipe printed as errors (``edgepipe: ...`` and the ``  - ...`` items under them)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("edgepipe:") or "error" in ln.lower()), None)
    return [] if start is None else lines[start:]


def assert_clean_failure(result, rc: int, *names: str) -> str:
    """``result`` (rc, out, err) failed with exit code ``rc``, printed no traceback, and its error names
    every one of ``names``. Returns the error text for further checks."""
    both = result.out + result.err
    assert "Traceback" not in both, f"traceback shown:\n{both}"
    assert result.rc == rc, f"exit code {result.rc}, expected {rc}:\n{both}"
    err = "\n".join(error_lines(result.err)) or result.err
    for name in names:
        assert name in err, f"the error does not name {name!r}:\n{result.err}"
    return err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``root`` (symlinks not followed)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def new_files(root: Path, before: dict[str, tuple[int, int]], allowed: tuple[str, ...] = ()) -> list[str]:
    """Files under ``root`` that were not in ``before``, outside the ``allowed`` prefixes."""
    return sorted(k for k in snapshot(root) if k not in before and not k.startswith(allowed))


def assert_one_line_problems(result) -> None:
    """Each problem is one line: stderr holds only ``edgepipe: ...`` lines and the ``  - ...`` items
    of an ``invalid config:`` list (no dumped sections, no wrapped Hydra messages)."""
    for line in filter(str.strip, result.err.splitlines()):
        assert line.startswith(("edgepipe:", "  - ")), f"a problem spans several lines:\n{result.err}"


class CodeRunningPickle:
    """What a malicious pickle (a weights file, a planted cache file) holds: unpickling it runs a shell
    command that creates ``marker``; the test then asserts the marker does not exist."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))
