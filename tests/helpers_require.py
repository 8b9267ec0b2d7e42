"""What a test needs from the machine (qemu, debootstrap, the cross-compiler, Chromium, a CJK font, root),
said in one place: ``require(missing, install)`` skips the test with one line naming what is missing and
the command that installs it (``pytest -ra`` lists it). Where $CI is set, this module's hooks (a pytest
plugin: conftest.py's pytest_plugins) turn every skip into a failure with that line, whatever raised it
(require, a skipif mark, pytest.skip in a fixture): a CI machine that lacks a tool fails the test instead
of passing it silently. scripts/system-deps.sh holds the one list of Debian packages; `make
test` installs them (its target `system-deps-test`)."""

from __future__ import annotations

import os

import pytest

# how the Debian packages the tests need get installed: the one list, through make
SYSTEM_DEPS = "make system-deps-test (scripts/system-deps.sh)"
CJK_FONT = f"sudo apt-get install -y fonts-noto-cjk, or {SYSTEM_DEPS}"


def in_ci() -> bool:
    """$CI set to anything but empty, 0, false or no (what CI services export: CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(missing: str | None, install: str) -> None:
    """Skip the calling test (fail it where $CI is set) when ``missing`` names what this machine lacks;
    ``install`` is the command that installs it."""
    __tracebackhide__ = True  # the skip's location: the test's line, not this one
    if missing:
        pytest.skip(f"needs {missing}: {install}")


def require_cjk_font() -> None:
    __tracebackhide__ = True
    from engine.contract import figures

    require(None if figures.cjk_font() is not None else "a CJK font (Noto Sans CJK)", CJK_FONT)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return fail_skips_in_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return fail_skips_in_ci((yield))


def fail_skips_in_ci(report):
    """``report``, made a failure with the skip's reason where $CI is set and it is a skip (not an xfail)."""
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{reason.removeprefix('Skipped: ')} ($CI is set: a test that would skip fails)"
    return report
