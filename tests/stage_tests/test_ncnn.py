"""The ncnn stage on real pnnx + ncnn + onnxruntime, and the .param patch (golden test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_data import make_model_dir

from engine.contract.stage import StageError
from engine.run.testing import run_stage
from stages.ncnn import param_io, param_layers, patch_input_shape

TINY = {"arch": "mobilenet_v3_small", "width_mult": 0.25}

# What pnnx writes (abridged: a real header, column padding and the shape-less Input line).
PNNX_PARAM = """7767517
5 5
Input                    in0                      0 1 in0
Convolution              conv_0                   1 1 in0 1 0=8 1=3 11=3 12=1 13=2 14=1 2=1 3=2 4=1 5=1 6=216
Pooling                  gap_0                    1 1 1 2 0=1 4=1
Flatten                  flatten_1                1 1 2 3
InnerProduct             linear_2                 1 1 3 out0 0=5 1=1 2=40
"""

GOLDEN = """7767517
5 5
Input                    in0                      0 1 in0 0=48 1=32 2=3
Convolution              conv_0                   1 1 in0 1 0=8 1=3 11=3 12=1 13=2 14=1 2=1 3=2 4=1 5=1 6=216
Pooling                  gap_0                    1 1 1 2 0=1 4=1
Flatten                  flatten_1                1 1 2 3
InnerProduct             linear_2                 1 1 3 out0 0=5 1=1 2=40
"""


# -- the .param patch (pure) -------------------------------------------------------------------------------
def test_patch_input_shape_golden():
    assert patch_input_shape(PNNX_PARAM, w=48, h=32, c=3) == GOLDEN


def test_patch_input_shape_idempotent_and_replaces():
    once = patch_input_shape(PNNX_PARAM, 48, 32, 3)
    assert patch_input_shape(once, 48, 32, 3) == once
    # a different shape replaces the keys instead of appending a second set; other keys are kept
    other = once.replace("0=48 1=32 2=3", "0=48 1=32 2=3 7=1")
    again = patch_input_shape(other, 64, 64, 1)
    assert "Input                    in0                      0 1 in0 0=64 1=64 2=1 7=1\n" in again
    assert again.count("0=64") == 1
    # only the Input line changes; CRLF files keep their line endings
    assert [a for a, b in zip(once.splitlines(), PNNX_PARAM.splitlines()) if a != b] == [GOLDEN.splitlines()[2]]
    crlf = PNNX_PARAM.replace("\n", "\r\n")
    assert patch_input_shape(crlf, 48, 32, 3) == GOLDEN.replace("\n", "\r\n")


def test_param_io_and_layers():
    assert param_io(PNNX_PARAM) == (["in0"], ["out0"])
    assert [t for t, *_ in param_layers(PNNX_PARAM)] == ["Input", "Convolution", "Pooling", "Flatten", "InnerProduct"]
    with pytest.raises(ValueError):
        param_layers("not a param\n")


# -- the stage ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ncnn")
    model = make_model_dir(root / "model", arch=TINY, num_classes=5, size=(32, 48))
    run_stage("export_onnx", {}, {"model": model}, root / "onnx")
    return root / "onnx"


@pytest.fixture(scope="module")
def ncnn_fp32(onnx_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ncnn32") / "out"
    return out, run_stage("ncnn", {}, {"onnx": onnx_dir}, out)


def test_ncnn_outputs_io_and_parity(ncnn_fp32, onnx_dir):
    out, metrics = ncnn_fp32
    assert sorted(p.name for p in out.iterdir()) == [
        "io.json", "labels.txt", "model.ncnn.bin", "model.ncnn.param", "parity.json", "pnnx.log", "preprocess.json"]
    param = (out / "model.ncnn.param").read_text()
    io = json.loads((out / "io.json").read_text())
    # io.json carries the names the param really has (pnnx renames input0/output0 to in0/out0)
    assert param_io(param) == ([io["input"]], [io["output"]])
    assert io == {"input": "in0", "output": "out0", "input_shape": [1, 3, 32, 48]}
    # the Input line has the shape (W=48, H=32, C=3), and patching again changes nothing
    input_line = next(ln for ln in param.splitlines() if ln.startswith("Input"))
    assert input_line.split()[-3:] == ["0=48", "1=32", "2=3"]
    assert patch_input_shape(param, 48, 32, 3) == param
    parity = json.loads((out / "parity.json").read_text())
    assert parity["reference"] == "onnxruntime" and parity["candidate"] == "ncnn"
    assert parity["passed"] and parity["fp16_weights"] is False and parity["samples"] == 8
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert metrics["parity_max_abs_diff"] == parity["max_abs_diff"]
    assert "pass_ncnn" in (out / "pnnx.log").read_text()  # pnnx's chatter went to the log
    assert (out / "preprocess.json").read_bytes() == (onnx_dir / "preprocess.json").read_bytes()


def test_ncnn_runtime_matches_onnxruntime_directly(ncnn_fp32, onnx_dir):
    """ncnn_logits keeps each input array alive while the extractor runs: repeated runs on fresh
    arrays agree with onnxruntime (a freed array would give garbage)."""
    import gc

    from backends.base import load as load_backend

    out, _ = ncnn_fp32
    io = json.loads((out / "io.json").read_text())
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 48)).astype(np.float32)
    ref = load_backend("onnx", onnx_dir, batch=None).logits(x)
    ncnn = load_backend("ncnn", out, io)
    for _ in range(2):
        got = ncnn.logits(x.copy())
        gc.collect()
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_ncnn_fp16_weights_smaller_and_less_exact(ncnn_fp32, onnx_dir, tmp_path):
    out32, m32 = ncnn_fp32
    out16 = tmp_path / "out16"
    m16 = run_stage("ncnn", {"fp16": True, "tolerance": 0.05}, {"onnx": onnx_dir}, out16)
    size32, size16 = (out32 / "model.ncnn.bin").stat().st_size, (out16 / "model.ncnn.bin").stat().st_size
    assert size16 < 0.6 * size32
    assert m16["parity_max_abs_diff"] > m32["parity_max_abs_diff"]
    assert json.loads((out16 / "parity.json").read_text())["fp16_weights"] is True


def test_ncnn_parity_failure_message(onnx_dir, tmp_path, monkeypatch):
    from backends.ncnn_models import NcnnBackend

    real = NcnnBackend.logits
    monkeypatch.setattr(NcnnBackend, "logits", lambda self, x: real(self, x) - 0.02)
    with pytest.raises(StageError) as e:
        run_stage("ncnn", {"tolerance": 0.005}, {"onnx": onnx_dir}, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("ncnn vs ONNX Runtime: max abs logit difference 0.02 is 0.015 above the tolerance 0.005")
    assert "ncnn.tolerance" in msg


def _onnx_folder(folder: Path, module, shape=(1, 3, 32, 32)) -> Path:
    """An export_onnx-like folder around an arbitrary torch module."""
    import torch
    from helpers_data import write_labels, write_preprocess

    from stages.common.export import write_io

    folder.mkdir(parents=True)
    torch.onnx.export(module.eval(), (torch.randn(*shape),), str(folder / "model.onnx"), dynamo=False,
                      opset_version=13, input_names=["input0"], output_names=["output0"])
    write_io(folder, "input0", "output0", list(shape))
    write_preprocess(folder, shape[2])
    write_labels(folder, ["a", "b", "c"])
    return folder


def test_unsupported_operator_gives_short_message(tmp_path):
    import torch

    class WithDet(torch.nn.Module):  # ONNX Det: pnnx passes it through, ncnn has no such layer
        def forward(self, x):
            return torch.linalg.det(x[:, :, :3, :3])

    src = _onnx_folder(tmp_path / "onnx", WithDet())
    with pytest.raises(StageError) as e:
        run_stage("ncnn", {}, {"onnx": src}, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("ncnn has no operator for Det (layer ")
    assert "pnnx.log" in msg and "\n" not in msg and len(msg) < 300
    assert "Traceback" not in msg


def test_pnnx_failure_gives_short_message(onnx_dir, tmp_path):
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_dir, broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    with pytest.raises(StageError) as e:
        run_stage("ncnn", {}, {"onnx": broken}, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("pnnx failed to convert model.onnx to ncnn (exit code")
    assert "read_proto_from_binary failed" in msg and "pnnx.log" in msg and len(msg) < 400


def test_missing_input_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StageError, match="model.onnx is missing"):
        run_stage("ncnn", {}, {"onnx": empty}, tmp_path / "out")
