"""`edgepipe selftest`: a board package's golden self-test, on this machine's Python or, with
--emulate, on its board's instruction set (boards/emulation.py). The CLI finds it through the
`edgepipe.commands` entry point: the engine imports nothing from boards/."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from boards import UnknownBoard, get_board, stand_in
from boards.emulation import (
    ARCHES,
    PYTHON_VERSION,
    SUITE,
    Emulation,
    EmulationError,
    install_hint,
    missing_tools,
    package_folder,
    run_python,
)


def board_of(package: Path):
    manifest = package / "manifest.json"
    try:
        name = json.loads(manifest.read_text(encoding="utf-8"))["board"]["name"]
    except (ValueError, KeyError, TypeError) as e:
        raise EmulationError(f"{manifest}: no board name in it ({e}); copy the package again") from e
    try:
        return get_board(name)
    except UnknownBoard as e:
        raise EmulationError(f"{manifest}: {e}") from e


def selftest(path: Path, emulate: bool, scratch: Path) -> int:
    """Run a package's self-test here (this machine's Python), or with ``emulate`` on its board's
    instruction set; prints its output and what it did not check. Exit status: the self-test's."""
    package = package_folder(path, scratch)
    board = board_of(package)
    _check_model(package)
    emu: Emulation | None = type(board).emulation
    if emu is None or not emu.command:
        why = emu.cannot if emu else "no emulation is known for its family"
        raise EmulationError(f"board {board.name} ({board.title}): its self-test cannot run off the board: {why}")
    args = [str(package / a) if (package / a).is_file() else a for a in emu.command[1:]]
    if emulate:
        missing = missing_tools(emu.arch, compiler=bool(emu.c_selftest))
        if missing:
            raise EmulationError(f"emulating {board.name} ({emu.arch}) needs {', '.join(missing)}: "
                                 f"{install_hint(missing)}")
        print(f"selftest: {board.name} ({board.title}) on {emu.arch} under {ARCHES[emu.arch].qemu} "
              f"(Debian {SUITE}, Python {PYTHON_VERSION}{', ' + ', '.join(emu.wheels) if emu.wheels else ''})",
              flush=True)
        try:
            r = run_python(emu, args, cwd=package)
        except subprocess.TimeoutExpired as e:
            raise EmulationError(f"{emu.command[1]} under {ARCHES[emu.arch].qemu} ran past {e.timeout:g} s; "
                                 f"stopped", status=1) from None
    else:
        r = subprocess.run([sys.executable, *args], cwd=package, capture_output=True, text=True)
        lacks = _missing_module(r.stderr)
        if r.returncode != 0 and lacks:
            raise EmulationError(f"this machine's Python lacks {lacks!r}, which {emu.command[1]} needs on "
                                 f"{board.title}; add --emulate to run it with the board's packages")
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if emulate and emu.stops_at and emu.stops_at in r.stdout + r.stderr:
        print(f"selftest: emulation ends here, as expected: {emu.stops_note}")
        return 0
    status = r.returncode
    if emulate and emu.c_selftest:
        status = _c_selftest(emu, package, scratch / "c_selftest") or status
    if emulate and emu.checks and status == 0:
        print(f"selftest: checked under emulation: {emu.checks}")
    return status


def _c_selftest(emu: Emulation, package: Path, work: Path) -> int:
    """The package's C program, built by its CMakeLists.txt for the board's instruction set, and its
    self-test under qemu-user against the stand-in runtime (boards/stand_in); its exit status."""
    print(f"selftest: {emu.c_selftest[0]} built by the package's CMakeLists.txt with {ARCHES[emu.arch].cross_gcc}, "
          f"run under {ARCHES[emu.arch].qemu} against {stand_in.WHAT_RUNS}", flush=True)
    try:
        r = stand_in.run_selftest(emu, package, work, emu.c_selftest)
    except subprocess.TimeoutExpired as e:
        raise EmulationError(f"{emu.c_selftest[0]} under {ARCHES[emu.arch].qemu} ran past {e.timeout:g} s; stopped",
                             status=1) from None
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


def _check_model(package: Path) -> None:
    """A package's model.onnx is checked before its self-test runs it: under qemu-user the guest
    opens host files, and the board's onnxruntime is older than the one here (stages.common.onnx_files).
    The package's scripts themselves are the package stage's: an entry of it from cache.remote is taken
    only when signed (Stage.outputs_execute)."""
    from stages.common.onnx_files import UnsafeOnnx, check_onnx

    model = package / "model.onnx"
    if model.is_file():
        try:
            check_onnx(model, "package")
        except UnsafeOnnx as e:
            raise EmulationError(f"{e}; nothing was run", status=2) from None


def _missing_module(stderr: str) -> str | None:
    import re

    m = re.search(r"ModuleNotFoundError: No module named '([^']+)'", stderr)
    return m.group(1) if m else None


def main(argv: list[str]) -> int:
    """`edgepipe selftest PACKAGE [--emulate]` (the `edgepipe.commands` entry point): the exit status."""
    ap = argparse.ArgumentParser(prog="edgepipe selftest",
                                 description="run a board package's golden self-test before copying it to the board")
    ap.add_argument("package", type=Path, help="the package folder, its package.zip, or the package stage's output")
    ap.add_argument("--emulate", action="store_true",
                    help="on the board's instruction set (qemu-user and an ARM Debian userland, built once)")
    a = ap.parse_args(argv)
    if not a.package.exists():
        print(f"edgepipe: {a.package}: no such package folder or zip", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgepipe-selftest-") as scratch:
        try:
            return selftest(a.package, a.emulate, Path(scratch))
        except EmulationError as e:
            print(f"edgepipe: {e}", file=sys.stderr)
            return e.status
