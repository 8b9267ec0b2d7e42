"""Packages on their boards' own instruction sets (issue 24): qemu-user runs the ARM code, a Debian 12
userland (Python 3.11) and PyPI's ARM wheels come from boards/emulation.py's cache (built once, on
first use, into ~/.cache/edgepipe/emulation or $EDGEPIPE_EMULATION_CACHE).

- aarch64: the ONNX Runtime package's `infer.py --selftest` and `infer.py IMAGE` (onnxruntime 1.18.1), with
  the float model and with onnx_quantize's int8 QDQ model;
  the RK3566 `infer.py` with the real rknn-toolkit-lite2 wheel, up to init_runtime (no NPU here);
- armhf: the RV1103 C demo built by its package's own CMakeLists.txt (-Wall -Wextra -Werror, a CMake
  toolchain file for arm-linux-gnueabihf-gcc) against an armhf build of the stand-in runtime
  (tests/board_tests/rknn_api), its `--selftest` against ONNX Runtime's outputs of the stand-in's model
  and its long-label reading; `edgepipe selftest --emulate` running `prepare_input.py --selftest` and the
  C demo (boards/stand_in); the MaixII-Dock `main.py`'s preprocessing (maix.nn is a stub that looks the
  tensor up among the host's).

Each asserts the figures the x86 runs of tests/board_tests/test_selftest.py assert. The packages are built from
the same session fixture (`bundles`, conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_data import LABELS, REPO, build_c_demo, package, stage, write_labels
from test_selftest import MAIX_STUB_API, on_the_board, run, stand_in_golden

from boards import get_board, stand_in
from boards.emulation import (
    EmulationError,
    install_hint,
    missing_tools,
    rootfs,
    run_binary,
    run_python,
    site,
)

RKNN_API = REPO / "tests" / "board_tests" / "rknn_api"
_MISSING = sorted(set(missing_tools("arm64") + missing_tools("armhf", compiler=True)))
needs_emulation = pytest.mark.skipif(bool(_MISSING), reason=f"emulation needs {', '.join(_MISSING)}: "
                                                              f"{install_hint(_MISSING)} (make test installs them)")


@pytest.fixture(scope="module")
def userlands():
    """Every board's userland and wheels, from the cache or built now (~2 min the first time, with
    network). Only a machine where debootstrap cannot run as root skips; a failed build fails."""
    for board in ("onnxruntime", "rk3566", "rv1103", "maixii_dock"):
        try:
            rootfs(emulation(board))
            site(emulation(board))
        except EmulationError as e:
            if e.status == 2:
                pytest.skip(str(e))
            raise


def emulation(board: str):
    return type(get_board(board)).emulation


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from engine.cli.commands import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- aarch64 ------------------------------------------------------------------------------------------
@needs_emulation
def test_onnxruntime_package_on_aarch64(userlands, bundles, tmp_path, capsys):
    pkg, _ = package("onnxruntime", {"model": bundles["onnx"], "data": bundles["data"]}, tmp_path / "o")
    board = on_the_board(pkg, tmp_path / "board")
    emu = emulation("onnxruntime")
    # without qemu: one line naming the apt-get command
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(tmp_path / "nothing"))
        rc, out, err = cli(capsys, "selftest", str(board), "--emulate")
    assert rc == 2 and err == ("edgepipe: emulating onnxruntime (arm64) needs debootstrap, dpkg, qemu-user-static: "
                               "sudo apt-get install -y debootstrap dpkg qemu-user-static\n"), err
    # the user's command on the package zip: infer.py --selftest on aarch64 with PyPI's wheels
    rc, out, err = cli(capsys, "selftest", str(tmp_path / "o" / "package.zip"), "--emulate")
    assert rc == 0 and "on arm64 under qemu-aarch64-static" in out, out + err
    assert "top-1 8/8" in out and "PASS -- this board computes what was measured here" in out
    assert "checked under emulation: the whole self-test" in out
    r = run_python(emu, [board / "infer.py", board / "golden" / "image_00.png", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = np.load(board / "golden" / "expected.npy")
    assert json.loads(r.stdout)["label"] == LABELS[int(expected[0].argmax())]
    # the same command without --emulate: this machine's Python
    rc, out, err = cli(capsys, "selftest", str(tmp_path / "o"))
    assert rc == 0 and "PASS" in out and "qemu" not in out, out + err


@needs_emulation
def test_onnxruntime_int8_package_on_aarch64(userlands, tmp_path, capsys):
    """onnx_quantize's int8 QDQ model (the toy, tests/helpers_data.py) in the ONNX Runtime package on
    onnxruntime 1.18.1 aarch64: the runtime reads its IR version and QDQ operators, and ARM's integer
    kernels give the golden outputs measured here on x86 within int8's tolerance (3% of the range)."""
    from helpers_data import toy

    from engine.run.testing import run_stage

    t = toy()
    search = {"calibrators": ["minmax"], "methods": ["channel"], "calib_images": [16]}
    run_stage("onnx_quantize", {"search": search}, {"onnx": t.onnx, "calib": t.calib, "data": t.data}, tmp_path / "q")
    _, manifest = package("onnxruntime", {"model": tmp_path / "q", "data": t.data}, tmp_path / "o")
    assert manifest["quantization"]["shipped"] == "int8"
    rc, out, err = cli(capsys, "selftest", str(tmp_path / "o" / "package.zip"), "--emulate")
    assert rc == 0 and "on arm64 under qemu-aarch64-static" in out, out + err
    assert "top-1 8/8" in out and "PASS -- this board computes what was measured here" in out, out


@needs_emulation
def test_rknnlite_infer_on_aarch64_up_to_the_npu(userlands, bundles, tmp_path, capsys):
    """The real rknn-toolkit-lite2 2.5.0 wheel: infer.py imports it and loads model.rknn, the
    preprocessing gives the golden input tensors, and init_runtime fails with infer.py's one line."""
    pkg, _ = package("rk3566", {"model": bundles["rknn_rk3566"], "data": bundles["data"]}, tmp_path / "k")
    board = on_the_board(pkg, tmp_path / "board")
    emu = emulation("rk3566")
    rc, out, err = cli(capsys, "selftest", str(board), "--emulate")
    assert rc == 0 and "emulation ends here, as expected: infer.py imported rknn-toolkit-lite2" in out, out + err
    # load_rknn passed; the toolkit reports its own exception from init_runtime (no NPU device), then
    # infer.py's one line
    assert "load_rknn failed" not in err and "Catch exception when init runtime" in err, err
    assert err.strip().splitlines()[-1] == "init_runtime failed (is librknnrt.so installed and the NPU driver loaded?)"
    # infer.py's preprocessing on aarch64, with rknnlite imported as infer.py imports it
    check = ("import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]); import infer, rknnlite.api; "
             "from preprocess import PreprocessSpec, load_image, resize, to_channel_order; "
             "from pathlib import Path; here = Path(sys.argv[1]); "
             "st = json.load(open(here / 'manifest.json'))['selftest']; "
             "spec = PreprocessSpec.load(here / 'preprocess.json'); want = np.load(here / st['input']); "
             "got = [to_channel_order(resize(load_image(here / p), spec), spec) for p in st['images']]; "
             "print(sum(int(np.array_equal(g, w)) for g, w in zip(got, want)), len(want))")
    r = run_python(emu, ["-c", check, board], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["8", "8"], r.stdout + r.stderr
    # here (x86) there is no rknnlite: one line pointing at --emulate
    rc, out, err = cli(capsys, "selftest", str(board))
    assert rc == 2 and err.count("\n") == 1 and "lacks 'rknnlite'" in err and "--emulate" in err, err


# -- armhf --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rv1103_package(userlands, bundles, tmp_path_factory):
    """The RV1103 package as the package stage wrote it (golden/: the simulator's outputs)."""
    base = tmp_path_factory.mktemp("armhf")
    pkg, _ = package("rv1103", {"model": bundles["rknn_rv1103"], "data": bundles["data"]}, base / "r")
    return pkg


@pytest.fixture(scope="module")
def c_demo(rv1103_package, tmp_path_factory):
    """The RV1103 package's C demo cross-built for armhf by the package's own CMakeLists.txt against an
    armhf build of the tests' stand-in runtime, golden/ holding ONNX Runtime's outputs of the stand-in's
    model (test_selftest.stand_in_golden); returns the install folder (the package beside it, src/)."""
    base = tmp_path_factory.mktemp("armhf_demo")
    src = on_the_board(rv1103_package, base / "src")
    stand_in_golden(src)
    return stand_in.build_demo(emulation("rv1103"), src, base, runtime=RKNN_API / "fake_rknn.c")


FAKE_ENV = {"FAKE_RKNN_SIZE": "32", "FAKE_RKNN_STRIDE": "40"}


@needs_emulation
def test_c_demo_selftest_on_armhf(userlands, c_demo):
    """The demo built by the shipped CMakeLists.txt for armhf, with the stand-in, gives ONNX Runtime's
    outputs of the stand-in's model exactly (why exactly: test_selftest's
    test_c_demo_selftest_on_a_fake_runtime); a runtime that computes other numbers fails."""
    emu = emulation("rv1103")
    assert Path(c_demo / "rknn_classify").read_bytes()[:20][18] == 40  # ELF e_machine: EM_ARM
    r = run_binary(emu, ["./rknn_classify", "--selftest"], cwd=c_demo, env=FAKE_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max abs diff 0, top-1 8/8" in r.stdout and "selftest: PASS" in r.stdout
    r = run_binary(emu, ["./rknn_classify", "--selftest"], cwd=c_demo, env={**FAKE_ENV, "FAKE_RKNN_PERTURB": "3"})
    assert r.returncode == 1 and "FAIL -- runtime numerics or model" in r.stdout, r.stdout


@needs_emulation
def test_selftest_emulate_runs_the_c_demo_on_armhf(userlands, rv1103_package, tmp_path, capsys):
    """`edgepipe selftest --emulate` on an RV1103 package: prepare_input.py --selftest on armhf Python,
    then the C demo built by the package's CMakeLists.txt for armhf and its --selftest under qemu-arm
    against boards/stand_in (which replays golden/: the NPU's numbers are the board's to check)."""
    board = on_the_board(rv1103_package, tmp_path / "board")
    rc, out, err = cli(capsys, "selftest", str(board), "--emulate")
    assert rc == 0 and "on armhf under qemu-arm-static" in out and "8/8 inputs identical" in out, out + err
    assert "rknn_classify built by the package's CMakeLists.txt with arm-linux-gnueabihf-gcc" in out, out
    assert "replays golden/'s outputs" in out and "not the NPU's numbers" in out
    # the demo's own lines: it read the stand-in's strided int8 output and compared it with golden.txt
    assert "tensor path (golden/input_NN.rgb -> NPU): max abs diff" in out and "top-1 8/8" in out, out
    assert "selftest: PASS" in out and "checked under emulation" in out
    # a demo that warns under -Wextra (an unused parameter) does not build: the CMakeLists' -Werror
    main_c = board / "main.c"
    main_c.write_text(main_c.read_text() + "\nint edgepipe_unused(int x);\nint edgepipe_unused(int x) { return 1; }\n")
    rc, out, err = cli(capsys, "selftest", str(board), "--emulate")
    assert rc == 1 and err.count("\n") == 1, out + err
    assert "CMakeLists.txt: the armhf build failed" in err and "-Werror=unused-parameter" in err, err


@needs_emulation
def test_c_demo_reads_a_long_label_as_one(userlands, c_demo, tmp_path):
    """A labels.txt line longer than the demo's old 128-byte line buffer (a 60-character Chinese name,
    180 bytes) is one label: every later label keeps its index. On x86 (host gcc, CMake as the README
    builds it) and on armhf."""
    labels = ["红" * 30 + "色的" * 15, "dog", "bird"]
    write_labels(tmp_path, labels)
    image = c_demo / "golden" / "input_00.rgb"
    host = build_c_demo(c_demo.parent / "src", tmp_path / "x86") / "rknn_classify"
    emu = emulation("rv1103")
    for r in (run([host, c_demo / "model.rknn", image, tmp_path / "labels.txt", "3"], tmp_path, FAKE_ENV),
              run_binary(emu, ["./rknn_classify", "model.rknn", image, tmp_path / "labels.txt", "3"], cwd=c_demo,
                         env=FAKE_ENV)):
        assert r.returncode == 0, r.stdout + r.stderr
        rows = [line.split("\t") for line in r.stdout.splitlines() if line.count("\t") == 2]  # index, label, p
        assert len(rows) == 3 and {int(i): name for i, name, _ in rows} == dict(enumerate(labels)), r.stdout


MAIX_TABLE_STUB = '''"""Stand-in for MaixPy3 on the emulated board: nn.load keeps main.py's options; forward computes
awnn's (x - mean) * norm of the frame main.py hands it, finds that tensor among the host's
($STUB_TABLE: the tensors and the float ncnn outputs of the golden images, preprocessed on the host),
logs the difference to $STUB_LOG and returns that row's outputs."""
import os

import numpy as np

camera = display = None


class _Model:
    def __init__(self, opt):
        self.opt = opt
        table = np.load(os.environ["STUB_TABLE"])
        self.inputs, self.outputs = table["inputs"], table["outputs"]

    def forward(self, img, quantize=True):
        x = (np.asarray(img, np.float32) - np.array(self.opt["mean"], np.float32)) \
* np.array(self.opt["norm"], np.float32)
        diffs = np.abs(self.inputs - x[None]).reshape(len(self.inputs), -1).max(1)
        with open(os.environ["STUB_LOG"], "a") as log:
            log.write("%r\\n" % float(diffs.min()))
        return self.outputs[int(diffs.argmin())]

''' + MAIX_STUB_API


@needs_emulation
def test_maixii_main_preprocessing_on_armhf(userlands, bundles, tmp_path, capsys):
    """main.py --selftest on armhf Python: its frames, normalised with its mean/norm, are the tensors the
    host computes (difference 0), so the float model's top-1 agrees on 8/8 as on x86."""
    import ncnn
    from PIL import Image

    ncnn_dir = tmp_path / "ncnn"
    stage("ncnn", {}, {"onnx": bundles["onnx"]}, ncnn_dir)
    stage("calibration", {"count": 4}, {"data": bundles["data"]}, tmp_path / "calib")
    pkg, manifest = package("maixii_dock", {"model": ncnn_dir, "calib": tmp_path / "calib", "data": bundles["data"]},
                            tmp_path / "m")
    board = on_the_board(pkg, tmp_path / "root")
    mean, norm = manifest["normalisation"]["awnn_mean"], manifest["normalisation"]["awnn_norm"]
    inputs, outputs = [], []
    net = ncnn.Net()
    net.load_param(str(board / "model.param"))
    net.load_model(str(board / "model.bin"))
    for path in manifest["selftest"]["images"]:
        x = (np.asarray(Image.open(board / path).convert("RGB"), np.float32) - np.float32(mean)) * np.float32(norm)
        chw = np.ascontiguousarray(x.transpose(2, 0, 1))  # kept alive: ncnn.Mat does not own it
        with net.create_extractor() as ex:
            ex.input("in0", ncnn.Mat(chw))
            _, out = ex.extract("out0")
        inputs.append(x)
        outputs.append(np.array(out).reshape(-1))
    assert [int(o.argmax()) for o in outputs] == manifest["selftest"]["expected_top1"]
    np.savez(tmp_path / "table.npz", inputs=np.stack(inputs), outputs=np.stack(outputs))
    stub = tmp_path / "stub" / "maix"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(MAIX_TABLE_STUB)
    emu = emulation("maixii_dock")
    env = {"STUB_TABLE": str(tmp_path / "table.npz"), "STUB_LOG": str(tmp_path / "stub.log"),
           "PYTHONPATH": str(stub.parent)}
    r = run_python(emu, [board / "main.py", "--selftest"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and "on 8/8" in r.stdout and "selftest: PASS" in r.stdout, r.stdout + r.stderr
    assert [float(v) for v in (tmp_path / "stub.log").read_text().split()] == [0.0] * 8
    # the user's command: maix.nn exists only on the board, one line says so
    rc, out, err = cli(capsys, "selftest", str(board), "--emulate")
    assert rc == 2 and err.count("\n") == 1 and "board maixii_dock (MaixII-Dock (V831)): its self-test cannot run " \
        "off the board: main.py runs on MaixPy3's maix.nn" in err, err


# -- set-up on a fresh machine ------------------------------------------------------------------------
def test_system_deps_without_rights_is_one_line_with_the_apt_get_command(tmp_path):
    """`make test`'s first step (scripts/system-deps.sh, the one list; .ci/run keeps none): packages
    missing and no way to install them (not root, no passwordless sudo) stops at once with the exact
    apt-get command."""
    import os
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in {"dpkg-query": 'case "$*" in *chromium|*cmake) echo not-installed;; *) echo installed;; esac',
                       "id": "echo 1000", "sudo": "exit 1"}.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    script = REPO / "scripts" / "system-deps.sh"
    r = subprocess.run(["bash", script, "test"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "system-deps: missing Debian packages; run: sudo apt-get install -y cmake chromium\n"
    r = subprocess.run(["bash", script, "demo"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == ""
