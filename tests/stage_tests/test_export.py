"""export_onnx / export_torchscript and the shared parity code, on real torch + onnx + onnxruntime."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_data import make_model_dir

from engine.contract.stage import StageError
from engine.run.testing import run_stage, validate_params

REPO = Path(__file__).resolve().parents[2]
TINY = {"arch": "mobilenet_v3_small", "width_mult": 0.25}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # non-square on purpose: H and W must not be swapped anywhere
    return make_model_dir(tmp_path_factory.mktemp("model"), arch=TINY, num_classes=4, size=(32, 40),
                          mean="imagenet", std="imagenet")


@pytest.fixture(scope="module")
def onnx_out(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "out"
    metrics = run_stage("export_onnx", {}, {"model": model_dir}, out)
    return out, metrics


# -- parity (unit) ------------------------------------------------------------------------------------
def test_compare_numbers_and_top1():
    from stages.common.parity import compare

    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    got = ref.copy()
    got[1, 1] += 4.0  # sample 1 now predicts class 1: one disagreement of three, diff 4
    r = compare(ref, got, ["random", "synthetic", "synthetic"], reference_name="a", candidate_name="b", tolerance=0.5)
    assert r["max_abs_diff"] == pytest.approx(4.0)
    assert r["mean_abs_diff"] == pytest.approx(4.0 / 9)
    assert r["top1_agreement"] == pytest.approx(2 / 3)
    assert r["passed"] is False
    assert r["by_kind"]["random"]["max_abs_diff"] == 0.0
    assert r["by_kind"]["synthetic"]["top1_agreement"] == pytest.approx(0.5)


def test_check_says_by_how_much_and_handles_nan(tmp_path):
    from stages.common.parity import check, compare, write_parity

    ref = np.zeros((2, 3), np.float32)
    r = compare(ref, ref + 0.003, reference_name="a", candidate_name="b", tolerance=1e-3)
    with pytest.raises(StageError) as e:
        check(r, "B vs A", tmp_path / "parity.json")
    msg = str(e.value)
    assert "0.003" in msg and "0.002 above the tolerance 0.001" in msg and "parity.json" in msg
    bad = ref.copy()
    bad[0, 0] = np.nan
    r = compare(ref, bad, reference_name="a", candidate_name="b", tolerance=1e-3)
    assert r["passed"] is False
    write_parity(tmp_path / "p.json", r)  # inf is written as a string, the file stays valid JSON
    assert json.loads((tmp_path / "p.json").read_text())["max_abs_diff"] == "inf"
    with pytest.raises(StageError, match="NaN"):
        check(r, "B vs A")


def test_sample_inputs_deterministic_and_image_like():
    from stages.common.parity import sample_inputs, synthetic_images
    from stages.common.preprocess import Preprocess

    spec = Preprocess(input_size=(24, 40), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, kinds = sample_inputs(spec, 5, seed=3)
    assert x.shape == (5, 3, 24, 40) and x.dtype == np.float32
    assert kinds == ["random", "random", "synthetic", "synthetic", "synthetic"]
    np.testing.assert_array_equal(x, sample_inputs(spec, 5, seed=3)[0])
    assert not np.array_equal(x, sample_inputs(spec, 5, seed=4)[0])
    synth = x[2:]
    assert synth.min() >= -1.0 and synth.max() <= 1.0  # (p/255 - .5)/.5 of real pixels
    imgs = synthetic_images(4, 24, 40, seed=0)
    assert imgs.dtype == np.uint8 and imgs.shape == (4, 24, 40, 3) and imgs.std() > 20


# -- export_onnx ----------------------------------------------------------------------------------------
def test_onnx_outputs_names_and_parity(onnx_out):
    import onnx

    out, metrics = onnx_out
    # exactly the contract's files: weights inside the .onnx, no external .data file
    assert sorted(p.name for p in out.iterdir()) == ["io.json", "labels.txt", "model.onnx", "parity.json",
                                                     "preprocess.json"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert {o.domain: o.version for o in model.opset_import}[""] == 13
    assert [i.name for i in model.graph.input] == ["input0"]
    assert [o.name for o in model.graph.output] == ["output0"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 40]  # static batch 1, H=32, W=40
    io = json.loads((out / "io.json").read_text())
    assert io == {"input": "input0", "output": "output0", "input_shape": [1, 3, 32, 40]}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["reference"] == "pytorch" and parity["candidate"] == "onnxruntime"
    assert parity["passed"] is True and parity["samples"] == 8
    assert 0 <= parity["max_abs_diff"] <= parity["tolerance"] == 1e-3
    assert parity["top1_agreement"] == 1.0
    assert set(parity["by_kind"]) == {"random", "synthetic"}
    assert metrics["parity_max_abs_diff"] == parity["max_abs_diff"]
    assert (out / "labels.txt").read_text() == "class0\nclass1\nclass2\nclass3\n"


def test_onnx_dynamic_batch_simplified_custom_names(model_dir, tmp_path):
    import onnx

    from backends.onnx_models import onnx_session

    out = tmp_path / "out"
    metrics = run_stage("export_onnx", {"dynamic_batch": True, "simplify": True, "opset": 17,
                                        "input_name": "images", "output_name": "logits"}, {"model": model_dir}, out)
    model = onnx.load(str(out / "model.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = onnx_session(out / "model.onnx")
    y = sess.run(["logits"], {"images": np.zeros((3, 3, 32, 40), np.float32)})[0]
    assert y.shape == (3, 4)
    assert json.loads((out / "io.json").read_text())["input"] == "images"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["batch"] == 8 and parity["passed"]  # the whole sample batch ran in one call
    assert metrics["parity_top1_agreement"] == 1.0


def test_onnx_parity_failure_says_by_how_much(model_dir, tmp_path, monkeypatch):
    from backends.onnx_models import OnnxBackend

    real = OnnxBackend.logits
    monkeypatch.setattr(OnnxBackend, "logits", lambda self, x: real(self, x) + 0.05)
    with pytest.raises(StageError) as e:
        run_stage("export_onnx", {"tolerance": 0.01}, {"model": model_dir}, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("ONNX Runtime vs PyTorch: max abs logit difference 0.05 is 0.04 above the tolerance 0.01")
    assert "export.tolerance" in msg and "\n" not in msg


def test_onnx_input_errors(tmp_path, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StageError, match="model.pt is missing"):
        run_stage("export_onnx", {}, {"model": empty}, tmp_path / "o1")
    gray = make_model_dir(tmp_path / "gray", arch={**TINY, "in_channels": 1}, num_classes=3, size=32)
    with pytest.raises(StageError, match="1 input channels"):
        run_stage("export_onnx", {}, {"model": gray}, tmp_path / "o2")
    with pytest.raises(StageError, match="must differ"):
        run_stage("export_onnx", {"input_name": "x", "output_name": "x"}, {"model": model_dir}, tmp_path / "o3")


def test_params_reject_unknown_and_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        validate_params("export_onnx", {"opsett": 13})
    with pytest.raises(ValidationError):
        validate_params("export_onnx", {"input_name": "has space"})
    with pytest.raises(ValidationError):
        validate_params("export_torchscript", {"opset": 13})  # torchscript has its own section


@pytest.mark.parametrize(
    "stage,path",
    [("export_onnx", "conf/export/onnx.yaml"), ("export_onnx", "conf/export/onnx_dynamic.yaml"),
     ("export_torchscript", "conf/torchscript/default.yaml"), ("ncnn", "conf/ncnn/default.yaml"),
     ("calibration", "conf/calibration/default.yaml")],
)
def test_config_groups_validate(stage, path):
    values = yaml.safe_load((REPO / path).read_text())
    p = validate_params(stage, values)
    if "dynamic" not in path:  # the default group is the Params defaults, written out
        assert p == validate_params(stage, {})


# -- export_torchscript ------------------------------------------------------------------------------------
def test_torchscript_outputs_and_parity(model_dir, tmp_path):
    import torch

    out = tmp_path / "out"
    metrics = run_stage("export_torchscript", {}, {"model": model_dir}, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "io.json", "labels.txt", "model.torchscript.pt", "parity.json", "preprocess.json"]
    io = json.loads((out / "io.json").read_text())
    assert io == {"input": "input0", "output": "output0", "input_shape": [1, 3, 32, 40]}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["candidate"] == "torchscript" and parity["passed"] and parity["top1_agreement"] == 1.0
    assert parity["max_abs_diff"] <= 1e-3 and metrics["parity_samples"] == 8
    with warnings.catch_warnings():  # torch 2.14: "torch.jit.load is deprecated" (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        assert ts(torch.zeros(2, 3, 32, 40)).shape == (2, 4)


def test_torchscript_parity_failure(model_dir, tmp_path, monkeypatch):
    from backends.torch_models import TorchScriptBackend

    real = TorchScriptBackend.logits
    monkeypatch.setattr(TorchScriptBackend, "logits", lambda self, x: real(self, x) + 1.0)  # the saved file only
    with pytest.raises(StageError,
                       match=r"TorchScript vs PyTorch: max abs logit difference 1 is 0.999 above the tolerance 0.001"):
        run_stage("export_torchscript", {}, {"model": model_dir}, tmp_path / "out")


def test_exporter_failure_gives_short_message_and_no_noise(model_dir, tmp_path, monkeypatch, capfd):
    import torch

    import stages.common.models as models

    class WithDet(torch.nn.Module):  # aten::linalg_det exists in ONNX only from opset 11
        def forward(self, x):
            return torch.linalg.det(x[:, :, :3, :3])

    monkeypatch.setattr(models, "load_model", lambda path: WithDet().eval())
    capfd.readouterr()
    with pytest.raises(StageError) as e:
        run_stage("export_onnx", {"opset": 9}, {"model": model_dir}, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("torch.onnx.export failed (opset 9): Exporting the operator 'aten::linalg_det'")
    assert "\n" not in msg
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.err + captured.out  # the exporter's native dump went to a log
