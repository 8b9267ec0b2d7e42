"""Trust boundaries (issue 23, the config and local-folder half): a colleague's config file, a shared
user cache folder and the user's own project folder can never run code, poison a build or escape.

Each case is an attack as someone with write access to one config file or one cache folder would try
it; the marker file an exploit would write must never appear, and what is refused is refused with one
line (exit 2 for a config error). Real Hydra, real processes, the engine tests' cheap stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TESTS
from hostile import assert_clean_failure, assert_one_line_problems

from engine.hashing import ContentIndex, content_digest


# -- input fingerprints: ctime ------------------------------------------------------------------------------
def _rewrite_keeping_times(path: Path, data: bytes) -> None:
    """Rewrite a file in place with the same size and put its old times back (`touch -r`)."""
    st = os.stat(path)
    time.sleep(0.02)  # past the kernel's timestamp granularity, so the ctime can move
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_file_rewritten_with_its_old_mtime_is_read_again(tmp_path):
    """size, mtime, inode and device agree; only ctime tells. A folder (the dataset's) and a single
    file (weights) both: the index must not serve the old digest."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "cat.png").write_bytes(b"A" * 64)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"W" * 64)
    index = ContentIndex(tmp_path / "index.sqlite")
    folder, single = content_digest(data, index), content_digest(weights, index)
    index.save()
    _rewrite_keeping_times(data / "cat.png", b"B" * 64)
    _rewrite_keeping_times(weights, b"V" * 64)
    again = ContentIndex(tmp_path / "index.sqlite")
    assert content_digest(data, again) != folder
    assert content_digest(weights, again) != single
