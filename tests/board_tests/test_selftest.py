"""Golden self-tests in packages (issue 12): the package stage records golden samples and the outputs
the packaged model gave on them here; the deploy scripts' --selftest says PASS, or FAIL naming the
likely cause. Also: the onnxruntime package runs in a venv holding only numpy, Pillow and onnxruntime.

Runtimes: the onnxruntime package on the real onnxruntime (in a fresh venv); the rknn-toolkit-lite2
script on the stub rknnlite of helpers_data (float ONNX Runtime with the .rknn's normalisation,
against the real simulator's int8 outputs); the C demo on tests/board_tests/rknn_api/fake_rknn.c, whose
outputs are checked against ONNX Runtime running the stand-in's model (stand_in_model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from helpers_data import LABELS, REPO, build_c_demo, export_onnx, install_rknnlite_stub, make_dataset, package, stage

RKNN_API = REPO / "tests" / "board_tests" / "rknn_api"
SITE = Path(sysconfig.get_paths()["purelib"])
# what the onnxruntime package needs on a board, from .venv: the packages and their bundled libraries
CLEAN_VENV_PACKAGES = ("numpy", "numpy.libs", "PIL", "pillow.libs", "onnxruntime")


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory):
    """A fresh venv (no pip, nothing installed) whose site-packages hold only numpy, Pillow and
    onnxruntime, linked from .venv: no pydantic, no edgepipe. Offline, unlike a pip install."""
    root = tmp_path_factory.mktemp("venv") / "board"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in CLEAN_VENV_PACKAGES:
        if (SITE / name).exists():
            (site / name).symlink_to(SITE / name)
    return python


def on_the_board(pkg: Path, where: Path) -> Path:
    """The package unzipped into an empty folder: nothing from the repository."""
    shutil.copytree(pkg, where)
    return where


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_manifest_records_golden_samples(bundles, tmp_path):
    from engine.contract.stage import StageError

    pkg, manifest = package("onnxruntime", {"model": bundles["onnx"], "data": bundles["data"]}, tmp_path / "o")
    st = manifest["selftest"]
    assert st["samples"] == 8 and len(st["images"]) == 8
    rows = st["rows"]  # a sample over the classes: the split is stored in class order (its first 8: two classes)
    data_labels = np.load(bundles["data"] / "labels_test.npy")
    assert len(set(rows)) == 8 and st["labels"] == data_labels[rows].tolist()
    assert set(st["labels"]) == set(data_labels.tolist()), st["labels"]
    assert set(st["sha256"]) == {*st["images"], "golden/input.npy", "golden/expected.npy"}
    assert all(manifest["files"][f] == d for f, d in st["sha256"].items())
    # the golden input is the exact preprocessing of the dataset's test images; expected is ORT on them
    import onnxruntime as ort

    from stages.common.preprocess import Preprocess, normalize

    images = np.load(bundles["data"] / "images_test.npy")[rows]
    x = np.load(pkg / "golden" / "input.npy")
    assert np.array_equal(x, normalize(images, Preprocess.load(bundles["onnx"])))
    sess = ort.InferenceSession(str(bundles["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = np.concatenate([sess.run(None, {"input0": x[i:i + 1]})[0] for i in range(8)])
    assert np.array_equal(np.load(pkg / "golden" / "expected.npy"), direct)
    assert st["expected_top1"] == direct.argmax(1).tolist() and st["measured_with"].startswith("onnxruntime ")
    readme = (pkg / "README.md").read_text()
    assert "python3 infer.py --selftest" in readme and "run by ONNX Runtime there" in readme
    assert "pip install numpy pillow onnxruntime\n" in readme
    # rknn: the simulator's outputs from rknn_quantize, for the same test split
    pkg, manifest = package("rv1103", {"model": bundles["rknn_rv1103"], "data": bundles["data"]}, tmp_path / "r")
    rows = manifest["selftest"]["rows"]  # the simulator ran the whole split: its logits' row r is test image r
    assert set(manifest["selftest"]["labels"]) == set(data_labels.tolist()), manifest["selftest"]["labels"]
    sim = np.load(bundles["rknn_rv1103"] / "test_logits.npy")[rows]
    assert np.array_equal(np.load(pkg / "golden" / "expected.npy"), sim)
    assert np.load(pkg / "golden" / "input.npy").dtype == np.uint8
    assert "simulator" in manifest["selftest"]["measured_with"]
    readme = (pkg / "README.md").read_text()  # where the numbers were measured, how to check them on the board
    assert "./rknn_classify --selftest" in readme and "simulator on the host (x86)" in readme
    header, *rows = (pkg / "golden" / "golden.txt").read_text().splitlines()[1:]
    assert header.startswith("samples 8 classes 3 height 32 width 32 tolerance ") and len(rows) == 8
    # no data input: no golden samples, and the README says why
    pkg, manifest = package("onnxruntime", {"model": bundles["onnx"]}, tmp_path / "n")
    assert manifest["selftest"] is None and not (pkg / "golden").exists()
    assert "wire package's `data` input" in (pkg / "README.md").read_text()
    # another dataset than the one rknn_quantize simulated: a one-line error
    other = make_dataset(tmp_path / "other", seed=5)
    with pytest.raises(StageError, match=r"input data: .*test_logits.npy were computed on another test split"):
        package("rv1103", {"model": bundles["rknn_rv1103"], "data": other}, tmp_path / "x")


def test_onnxruntime_package_runs_and_selftests_in_a_clean_venv(bundles, clean_venv, tmp_path):
    pkg, _ = package("onnxruntime", {"model": bundles["onnx"], "data": bundles["data"]}, tmp_path / "o")
    board = on_the_board(pkg, tmp_path / "board")
    nothing_else = run([clean_venv, "-I", "-c", "import pydantic"], tmp_path)
    assert nothing_else.returncode == 1 and "No module named 'pydantic'" in nothing_else.stderr
    r = run([clean_venv, "-I", board / "infer.py", board / "golden" / "image_00.png", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    expected = np.load(board / "golden" / "expected.npy")
    assert json.loads(r.stdout)["label"] == LABELS[int(expected[0].argmax())]
    r = run([clean_venv, "-I", board / "infer.py", "--selftest"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "top-1 8/8" in r.stdout and r.stdout.rstrip().endswith("PASS -- this board computes what was measured here")

    # other preprocessing settings on the board: the tensor path passes, the image path fails
    # by hand on purpose: a package edited on the board, where no edgepipe (no Preprocess) is installed
    spec = json.loads((board / "preprocess.json").read_text())
    (board / "preprocess.json").write_text(json.dumps({**spec, "mean": [0.485, 0.456, 0.406]}))
    r = run([clean_venv, "-I", board / "infer.py", "--selftest"], tmp_path)
    assert r.returncode == 1 and "FAIL -- preprocessing" in r.stdout, r.stdout
    (board / "preprocess.json").write_text(json.dumps(spec))
    # a runtime that computes other numbers (here: other weights under the recorded digest)
    other = export_onnx(tmp_path / "other", kind="linear", module=None)
    import onnx

    model = onnx.load(other / "model.onnx")
    for init in model.graph.initializer:
        if init.name.endswith("bias"):
            arr = onnx.numpy_helper.to_array(init) + 0.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, board / "model.onnx")
    manifest = json.loads((board / "manifest.json").read_text())
    manifest["model"]["sha256"] = __import__("hashlib").sha256((board / "model.onnx").read_bytes()).hexdigest()
    (board / "manifest.json").write_text(json.dumps(manifest))
    r = run([clean_venv, "-I", board / "infer.py", "--selftest"], tmp_path)
    assert r.returncode == 1 and "FAIL -- runtime numerics or model" in r.stdout, r.stdout
    # a golden file damaged in the copy
    (board / "golden" / "expected.npy").write_bytes(b"x")
    r = run([clean_venv, "-I", board / "infer.py", "--selftest"], tmp_path)
    assert r.returncode == 1 and "files differ from manifest.json" in r.stdout and "golden/expected.npy" in r.stdout


def regolden(board: Path, expected: np.ndarray) -> None:
    """Replace the golden outputs (and their digests in manifest.json): the outputs of a stand-in runtime."""
    import hashlib

    np.save(board / "golden" / "expected.npy", expected.astype(np.float32))
    manifest = json.loads((board / "manifest.json").read_text())
    digest = hashlib.sha256((board / "golden" / "expected.npy").read_bytes()).hexdigest()
    manifest["selftest"]["sha256"]["golden/expected.npy"] = manifest["files"]["golden/expected.npy"] = digest
    (board / "manifest.json").write_text(json.dumps(manifest))


def test_rknnlite_selftest_on_the_stub(bundles, tmp_path):
    pkg, manifest = package("rk3566", {"model": bundles["rknn_rk3566"], "data": bundles["data"]}, tmp_path / "k")
    board = on_the_board(pkg, tmp_path / "board")
    stub = install_rknnlite_stub(tmp_path / "stub")
    env = {"PYTHONPATH": str(stub), "STUB_LOG": str(tmp_path / "stub.log"),
           "STUB_ONNX": str(bundles["onnx"] / "model.onnx"), "STUB_PREPROCESS": str(board / "preprocess.json")}
    # the stub runs the float model, 0.01 (7 % of this tiny model's logit range) from the simulator's
    # int8 outputs the package holds: more than an NPU may differ from the simulator (5 %)
    r = run([sys.executable, board / "infer.py", "--selftest"], tmp_path, env)
    assert r.returncode == 1 and "FAIL -- runtime numerics or model" in r.stdout, r.stdout
    assert "rknn-toolkit2 simulator" in r.stdout
    # golden outputs of the stub's own model (float ONNX on the golden uint8 inputs), digests updated
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundles["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(board / "golden" / "input.npy").astype(np.float32)
    x = ((x - 127.5) / 127.5).transpose(0, 3, 1, 2)  # preprocess=uniform, RGB
    regolden(board, np.concatenate([sess.run(None, {"input0": x[i:i + 1]})[0] for i in range(8)]))
    (tmp_path / "stub.log").unlink()
    r = run([sys.executable, board / "infer.py", "--selftest"], tmp_path, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "top-1 8/8" in r.stdout
    calls = [json.loads(line) for line in (tmp_path / "stub.log").read_text().splitlines()]
    assert calls.count({"inference": [1, 32, 32, 3]}) == 16 and calls[-1] == {"release": True}
    # a stub that normalises with other numbers (a runtime computing wrong): the tensor path fails
    env["STUB_PREPROCESS"] = str(tmp_path / "wrong.json")
    Path(env["STUB_PREPROCESS"]).write_text(json.dumps({**manifest["preprocess"], "std": [0.1, 0.1, 0.1]}))
    r = run([sys.executable, board / "infer.py", "--selftest"], tmp_path, env)
    assert r.returncode == 1 and "FAIL -- runtime numerics or model" in r.stdout, r.stdout


def stand_in_model(size: int = 32):
    """tests/board_tests/rknn_api/fake_rknn.c's model written in ONNX operators and run by ONNX Runtime,
    independently of the stand-in's C: the mean of input channel c (uint8 NHWC) / 25, then an int8 model's
    native output (QuantizeLinear, scale 0.5, zero point -10) as the demo dequantises it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    consts = [helper.make_tensor("divisor", TensorProto.FLOAT, [], [25.0]),
              helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5]),
              helper.make_tensor("zero_point", TensorProto.INT8, [], [-10])]
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["xf"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("Div", ["mean", "divisor"], ["logits"]),
             helper.make_node("QuantizeLinear", ["logits", "scale", "zero_point"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"])]
    graph = helper.make_graph(nodes, "stand_in", [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                                [1, size, size, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda rgb: sess.run(None, {"x": np.frombuffer(rgb, np.uint8).reshape(1, size, size, 3)})[0][0]


def stand_in_golden(board: Path) -> None:
    """golden.txt's expected outputs (the simulator's, of the real model) replaced by ONNX Runtime's
    outputs of the stand-in's model (stand_in_model) on the same golden input tensors."""
    golden = board / "golden" / "golden.txt"
    lines = golden.read_text().splitlines()
    model = stand_in_model()
    rows = []
    for line in lines[2:]:
        name = line.split()[0]
        out = model((board / "golden" / name).read_bytes())
        rows.append(" ".join([name, str(int(np.argmax(out))), *(repr(float(v)) for v in out)]))
    golden.write_text("\n".join(lines[:2] + rows) + "\n")


def test_c_demo_selftest_on_a_fake_runtime(bundles, tmp_path):
    """The demo as the README builds it (CMake, zero-copy) installs golden/ and runs it. Its golden
    outputs are ONNX Runtime's of the stand-in's model on the golden inputs (the simulator's belong to
    the real model): the demo with the stand-in (strided input, int8 output, dequantisation) must give
    them exactly. Exactly, because both sides round the same float32 logits to int8 (round half to
    even): a channel's sum of 1024 bytes and its mean are exact in float32 and double, /25 is rounded once
    by each, and a one-ulp difference could move a value across a rounding edge only if it lay within
    one ulp of a half step (0.25 + k * 0.5), which no golden input does. A stand-in that truncated
    instead of rounding (as fake_rknn.c did) is one step, 0.5, away."""
    pkg, _ = package("rv1103", {"model": bundles["rknn_rv1103"], "data": bundles["data"]}, tmp_path / "r")
    src = on_the_board(pkg, tmp_path / "src")
    stand_in_golden(src)
    inst = build_c_demo(src, tmp_path)
    assert sorted(p.name for p in (inst / "golden").iterdir()) == sorted(p.name for p in (src / "golden").iterdir())
    env = {"FAKE_RKNN_SIZE": "32", "FAKE_RKNN_STRIDE": "40"}
    r = run([inst / "rknn_classify", "--selftest"], inst, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max abs diff 0, top-1 8/8" in r.stdout and "selftest: PASS" in r.stdout
    r = run([inst / "rknn_classify", "--selftest"], inst, {**env, "FAKE_RKNN_PERTURB": "3"})
    assert r.returncode == 1 and "FAIL -- runtime numerics or model" in r.stdout, r.stdout
    assert "preprocessing is not involved" in r.stdout
    # a package built without golden samples says so
    r = run([inst / "rknn_classify", "--selftest", "model.rknn", "none/golden.txt"], inst, env)
    assert r.returncode == 2 and "no none/golden.txt" in r.stdout
    # the image path of the C package: prepare_input.py --selftest (preprocessing on the host or board)
    r = run([sys.executable, "-I", src / "prepare_input.py", "--selftest"], tmp_path)
    assert r.returncode == 0 and "8/8 inputs identical" in r.stdout, r.stdout + r.stderr
    spec = json.loads((src / "preprocess.json").read_text())  # by hand on purpose: a package edited on the host
    (src / "preprocess.json").write_text(json.dumps({**spec, "channel_order": "BGR"}))
    r = run([sys.executable, "-I", src / "prepare_input.py", "--selftest"], tmp_path)
    assert r.returncode == 1 and "FAIL -- preprocessing" in r.stdout, r.stdout


# What both MaixPy3 stand-ins (here and tests/board_tests/test_emulated_boards.py) expose around their _Model:
# maix.nn.F.softmax and maix.nn.load.
MAIX_STUB_API = '''

class _F:
    @staticmethod
    def softmax(x):
        e = np.exp(x - np.max(x))
        return e / e.sum()


class nn:
    F = _F

    @staticmethod
    def load(model, opt):
        return _Model(opt)
'''

MAIX_STUB = '''"""Stand-in for MaixPy3 in tests: nn.load runs the float ncnn model ($STUB_PARAM) with awnn's
(x - mean) * norm from the load options; $STUB_REVERSE=1 returns the outputs reversed (a conversion
gone wrong)."""
import os

import numpy as np

camera = display = None


class _Model:
    def __init__(self, opt):
        import ncnn

        self.opt = opt
        self.net = ncnn.Net()
        self.net.load_param(os.environ["STUB_PARAM"])
        self.net.load_model(os.environ["STUB_PARAM"][: -len(".param")] + ".bin")

    def forward(self, img, quantize=True):
        import ncnn

        x = np.asarray(img, np.float32)
        x = ((x - np.array(self.opt["mean"], np.float32)) * np.array(self.opt["norm"], np.float32)).transpose(2, 0, 1)
        x = np.ascontiguousarray(x)
        with self.net.create_extractor() as ex:
            ex.input(next(iter(self.opt["inputs"])), ncnn.Mat(x))
            _, out = ex.extract(next(iter(self.opt["outputs"])))
        out = np.array(out).reshape(-1)
        return out[::-1].copy() if os.environ.get("STUB_REVERSE") else out

''' + MAIX_STUB_API


def test_maixpy3_selftest_on_a_stub(bundles, tmp_path):
    """main.py --selftest: the golden images through maix.nn (a stub running the float ncnn model with
    main.py's mean/norm), top-1 against the float ncnn outputs recorded here."""
    ncnn_dir = tmp_path / "ncnn"
    stage("ncnn", {}, {"onnx": bundles["onnx"]}, ncnn_dir)
    stage("calibration", {"count": 4}, {"data": bundles["data"]}, tmp_path / "calib")
    pkg, manifest = package("maixii_dock", {"model": ncnn_dir, "calib": tmp_path / "calib", "data": bundles["data"]},
                            tmp_path / "m")
    assert manifest["selftest"]["top1_min"] == 7 and "ncnn" in manifest["selftest"]["measured_with"]
    board = on_the_board(pkg, tmp_path / "root")
    stub = tmp_path / "stub" / "maix"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(MAIX_STUB)
    env = {"PYTHONPATH": str(stub.parent), "STUB_PARAM": str(board / "model.param")}
    r = run([sys.executable, board / "main.py", "--selftest"], tmp_path, env)
    assert r.returncode == 0 and "on 8/8" in r.stdout and "selftest: PASS" in r.stdout, r.stdout + r.stderr
    r = run([sys.executable, board / "main.py", "--selftest"], tmp_path, {**env, "STUB_REVERSE": "1"})
    assert r.returncode == 1 and "FAIL -- awnn conversion or preprocessing" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["../../victim.rgb", "/etc/hostname", "input_00.rgb -> link"])
def test_the_stand_in_reads_only_golden_input_files_a_package_names(tmp_path, name):
    """golden.txt's file names become paths for `selftest --emulate`'s stand-in table: only golden/'s own
    input_NN.rgb files, never a path out of the package or a link, and a one-line error otherwise."""
    from boards.emulation import EmulationError
    from boards.stand_in import write_table

    golden = tmp_path / "pkg" / "golden"
    golden.mkdir(parents=True)
    (tmp_path / "victim.rgb").write_bytes(bytes(12))
    if name.endswith("link"):
        name = "input_00.rgb"
        (golden / name).symlink_to(tmp_path / "victim.rgb")
    (golden / "golden.txt").write_text(f"edgepipe-golden 1\nsamples 1 classes 2 height 2 width 2 tolerance 0.1\n"
                                       f"{name} 1 0.1 0.5\n", encoding="utf-8")
    with pytest.raises(EmulationError) as e:
        write_table(golden, tmp_path / "table")
    assert "input_NN.rgb" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "table").exists() or b"\0" * 12 not in (tmp_path / "table").read_bytes()
