"""The ONNX Runtime board package with the int8 search in front of it: it ships onnx_quantize's int8 QDQ
model when a candidate held (with int8's golden tolerance) and the float model when none did, and says
which and why in manifest.json and the notes. The models come from the real onnx_quantize stage on the
toy (tests/helpers_data.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers_data import TOY_CLASSES, package, toy, write_calibration, write_dataset_folder

from engine.run.testing import run_stage

SEARCH = {"calibrators": ["minmax"], "methods": ["channel"], "calib_images": [16]}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{"int8": a folder where a candidate held, "float": one where none did (a calibration of dimmed
    pictures, hybrid off), "data": the toy's dataset, "onnx": its export_onnx folder}."""
    t = toy()
    root = tmp_path_factory.mktemp("ort_int8")
    run_stage("onnx_quantize", {"search": SEARCH}, {"onnx": t.onnx, "calib": t.calib, "data": t.data}, root / "int8")
    images, labels = np.load(t.data / "images_train.npy")[:32], np.load(t.data / "labels_train.npy")[:32]
    dim = write_dataset_folder(root / "dim", {"train": ((images * 0.6).astype(np.uint8), labels)}, TOY_CLASSES)
    calib = write_calibration(dim, root / "dim_calib", n=16)
    run_stage("onnx_quantize", {"search": {**SEARCH, "hybrid": {"enabled": False}}},
              {"onnx": t.onnx, "calib": calib, "data": t.data}, root / "float")
    return {"int8": root / "int8", "float": root / "float", "data": t.data, "onnx": t.onnx}


def selftest(pkg, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(pkg / "infer.py"), "--selftest"], cwd=tmp_path, capture_output=True,
                          text=True)


def test_the_int8_model_ships_when_it_holds(quantized, tmp_path):
    q = quantized["int8"]
    assert json.loads((q / "search.json").read_text())["shipped"] == "int8"
    pkg, manifest = package("onnxruntime", {"model": q, "data": quantized["data"]}, tmp_path / "p")
    assert (pkg / "model.onnx").read_bytes() == (q / "model.onnx").read_bytes()
    quant = manifest["quantization"]
    assert quant["shipped"] == "int8" and quant["kind"] == "onnx_int8"
    assert "holds on the selection split" in quant["reason"]
    note = "int8 ships (minmax, per-channel weights, 0 node(s) kept in float)"
    assert any(n.startswith(note) for n in manifest["notes"])
    # the golden samples are the int8 model's, with int8's tolerance, not float's 1e-3
    st = manifest["selftest"]
    assert (st["atol"], st["rtol"]) == (0.0, 0.03) and "int8 QDQ kernels" in st["measured_with"]
    readme = (pkg / "README.md").read_text()
    assert "int8 QDQ: int8 weights, uint8 activations" in readme and "int8 ships" in readme
    r = selftest(pkg, tmp_path)
    assert r.returncode == 0 and "PASS" in r.stdout and "top-1 8/8" in r.stdout, r.stdout + r.stderr


def test_the_float_model_ships_when_no_int8_candidate_holds(quantized, tmp_path):
    q = quantized["float"]
    assert json.loads((q / "search.json").read_text())["shipped"] == "float"
    pkg, manifest = package("onnxruntime", {"model": q, "data": quantized["data"]}, tmp_path / "p")
    assert (pkg / "model.onnx").read_bytes() == (quantized["onnx"] / "model.onnx").read_bytes()
    quant = manifest["quantization"]
    assert quant["shipped"] == "float" and quant["kind"] == "onnx" and quant["search"]
    assert any("float ONNX model ships: no int8 candidate held" in n for n in manifest["notes"])
    assert (manifest["selftest"]["atol"], manifest["selftest"]["rtol"]) == (1e-3, 1e-3)
    assert "(float32, NCHW" in (pkg / "README.md").read_text()
    assert selftest(pkg, tmp_path).returncode == 0
    # an export_onnx folder: float, and the note says no search ran
    _, manifest = package("onnxruntime", {"model": quantized["onnx"]}, tmp_path / "e")
    assert manifest["quantization"]["shipped"] == "float" and manifest["quantization"]["search"] is None
    assert any("no int8 search ran" in n for n in manifest["notes"])
