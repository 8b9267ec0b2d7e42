"""No test passes by skipping on CI (issue 32): where $CI is set, a test that lacks a tool (require(),
tests/helpers_require.py) or skips for any other reason fails with the line naming what to install;
without $CI it skips with that line. A pytest of its own runs a module of such tests with the plugin
(tests/helpers_require.py) that the suite's conftest.py loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TESTS

NEEDS = '''
import pytest
from helpers_require import require


def test_needs_a_tool():
    require("frobnicator", "sudo apt-get install -y frobnicator")


@pytest.mark.skipif(True, reason="emulation needs qemu-user-static")
def test_marked_skip():
    pass


@pytest.fixture(scope="module")
def userland():
    pytest.skip("debootstrap cannot run as root here")


def test_fixture_skip(userland):
    pass


def test_has_everything():
    require(None, "nothing to install")


@pytest.mark.xfail(reason="a known failure, not a missing tool")
def test_known_failure():
    assert False
'''


def run_pytest(tmp_path, ci: str | None) -> tuple[int, str]:
    """The module above with the suite's plugin, and $CI as given."""
    (tmp_path / "test_needs.py").write_text(NEEDS)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "helpers_require", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), "-o", "addopts=", str(tmp_path / "test_needs.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_the_suite_loads_the_plugin(request):
    assert request.config.pluginmanager.get_plugin("helpers_require") is not None


def test_without_ci_a_missing_tool_skips_with_the_install_line(tmp_path):
    rc, out = run_pytest(tmp_path, None)
    assert rc == 0, out
    assert "needs frobnicator: sudo apt-get install -y frobnicator" in out
    assert "1 passed, 3 skipped, 1 xfailed" in out, out


def test_with_ci_every_skip_fails_with_its_reason(tmp_path):
    rc, out = run_pytest(tmp_path, "true")
    assert rc == 1, out
    summary = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    reasons = {ln.split("::")[1].split(" ")[0]: ln for ln in summary}
    assert set(reasons) == {"test_needs_a_tool", "test_marked_skip", "test_fixture_skip"}, out
    assert "needs frobnicator: sudo apt-get install -y frobnicator ($CI is set" in reasons["test_needs_a_tool"]
    assert "emulation needs qemu-user-static" in reasons["test_marked_skip"]
    assert "debootstrap cannot run as root here" in reasons["test_fixture_skip"]
    assert "1 passed" in out and "1 xfailed" in out and "skipped" not in out.splitlines()[-1], out


@pytest.mark.parametrize("value, ci", [("true", True), ("1", True), ("yes", True), ("", False), ("0", False),
                                       ("false", False), ("No", False)])
def test_what_counts_as_ci(monkeypatch, value, ci):
    from helpers_require import in_ci

    monkeypatch.setenv("CI", value)
    assert in_ci() is ci
