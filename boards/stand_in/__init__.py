"""An RV1103/RV1106 package's C demo on this machine: built through the package's own CMakeLists.txt
for armhf (Debian's cross compiler) against the RKNN API header here and a stand-in librknnmrt, then
its ``--selftest`` run under qemu-user.

There is no NPU here and the real librknnmrt is uClibc for the board only, so the stand-in
(librknnmrt.c) replays the package's golden outputs, as int8 with a scale and zero point, for the
exact golden input tensors: the run checks that the demo builds warning-free, writes the input through
the runtime's row stride, dequantises and compares as the board will; the NPU's numbers are the
board's to check (``./rknn_classify --selftest`` there)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from boards.emulation import Emulation, EmulationError, cmake_build, cross_compile, run_binary

HERE = Path(__file__).resolve().parent
API_HEADER = HERE / "rknn_api.h"
STAND_IN = HERE / "librknnmrt.c"
# where the package's CMakeLists.txt takes the runtime from, under RKNN_API_DIR (as in rknn-toolkit2's
# rknpu2/runtime/Linux/librknn_api)
RUNTIME_SUBDIR = "armhf-uclibc"
RUNTIME_LIB = "librknnmrt.so"
TABLE_ENV = "EDGEPIPE_RKNN_STAND_IN"
_INPUT_NAME = re.compile(r"input_[0-9]{2,4}\.rgb")
WHAT_RUNS = ("a stand-in librknnmrt that replays golden/'s outputs as int8 (no NPU here): this checks the "
             "demo's build, its zero-copy I/O, dequantisation and comparison on the board's instruction set, "
             "not the NPU's numbers")


def api_dir(emu: Emulation, work: Path, runtime: Path = STAND_IN) -> Path:
    """An RKNN_API_DIR for the package's CMakeLists.txt: include/rknn_api.h and the runtime C file
    ``runtime`` cross-built as armhf-uclibc/librknnmrt.so."""
    api = Path(work).resolve() / "librknn_api"
    (api / "include").mkdir(parents=True, exist_ok=True)
    (api / RUNTIME_SUBDIR).mkdir(exist_ok=True)
    shutil.copyfile(API_HEADER, api / "include" / "rknn_api.h")
    cross_compile(emu, [runtime], api / RUNTIME_SUBDIR / RUNTIME_LIB, ["-shared", "-fPIC", "-std=c99", "-I", str(HERE)])
    return api


def build_demo(emu: Emulation, package: Path, work: Path, runtime: Path = STAND_IN) -> Path:
    """The package's C demo built and installed by its own CMakeLists.txt for ``emu``'s instruction set
    (golden/, model.rknn and the runtime installed beside it); returns the install folder."""
    return cmake_build(emu, package, work, {"RKNN_API_DIR": str(api_dir(emu, work, runtime))})


def write_table(golden: Path, out: Path) -> Path:
    """The stand-in's table from golden/golden.txt and its input_NN.rgb: each input tensor with its
    expected outputs quantised to int8 over their range (a step of range/255: the replayed outputs are
    within range/510 of golden.txt's, far inside the self-test's tolerance)."""
    import numpy as np

    path = golden / "golden.txt"
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
        head = lines[1].split()
        n, classes, height, width = (int(head[i]) for i in (1, 3, 5, 7))
        rows = [line.split() for line in lines[2:2 + n]]
        names = [r[0] for r in rows]
        expected = np.array([[float(v) for v in r[2:]] for r in rows], np.float64)
    except (OSError, IndexError, ValueError) as e:
        raise EmulationError(f"{path}: not a readable golden file ({e}); the package was built without the package "
                             f"stage's `data` input, or copy it again", status=1) from None
    if expected.shape != (n, classes):
        raise EmulationError(f"{path}: {len(rows)} rows of {classes} outputs expected, not {expected.shape}; "
                             f"copy the package again", status=1)
    lo, hi = float(expected.min()), float(expected.max())
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zp = -128 - round(lo / scale)  # int32 in rknn_tensor_attr: lo is -128
    q = np.clip(np.rint(expected / scale) + zp, -128, 127).astype(np.int8)
    size = height * width * 3
    with open(out, "wb") as f:
        f.write(f"edgepipe-stand-in 1 samples {n} classes {classes} height {height} width {width} "
                f"scale {scale!r} zp {zp}\n".encode())
        for name, outputs in zip(names, q):
            # a name from the package's golden.txt: only the input_NN.rgb files boards/golden.py writes
            if not _INPUT_NAME.fullmatch(name) or (golden / name).is_symlink():
                raise EmulationError(f"{path}: {name!r} is not one of golden/'s input_NN.rgb files; copy the "
                                     f"package again", status=1)
            rgb = (golden / name).read_bytes()
            if len(rgb) != size:
                raise EmulationError(f"{golden / name}: {len(rgb)} bytes, not {height}x{width}x3; copy the package "
                                     f"again", status=1)
            f.write(rgb + outputs.tobytes())
    return out


def run_selftest(emu: Emulation, package: Path, work: Path, command: tuple[str, ...],
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Build the package's demo (its CMakeLists.txt) against the stand-in and run ``command`` (the demo's
    self-test) in its install folder under qemu-user, the stand-in replaying the package's golden/."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    table = write_table(package / "golden", work / "golden.table")
    install = build_demo(emu, package, work)
    return run_binary(emu, [f"./{command[0]}", *command[1:]], cwd=install, env={TABLE_ENV: str(table), **(env or {})})
