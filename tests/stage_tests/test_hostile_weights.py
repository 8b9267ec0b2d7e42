"""Hostile weights files and diverging training (issue 8): no code runs from a file a user downloaded,
unreadable files and runs that blow up are one-line errors, and nothing half-made reaches the cache.

Each file is generated here. A malicious pickle's payload would create a marker file: the marker must
not exist afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_array_dataset
from hostile import CodeRunningPickle, assert_clean_failure, new_files, snapshot

from engine.contract.stage import StageError
from engine.run.testing import run_stage
from stages.common.models import WeightsError, build_model, read_state_dict

# the digits quickstart data at 16 px and two short epochs: seconds per run
FAST = ["pipeline=train", "dataset=digits", "preprocess.input_size=16", "train=tiny", "train.epochs=1",
        "train.limit_train_batches=2", "model.stem=small"]


def malicious_file(path: Path, marker: Path, wrap=lambda p: {"state_dict": {"fc.weight": p}}) -> Path:
    torch.save(wrap(CodeRunningPickle(marker)), path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "code from a weights file ran"


def test_malicious_pretrained_weights_are_refused(project, tmp_path, marker):
    evil = malicious_file(tmp_path / "resnet18_imagenet.pth", marker)
    before = snapshot(tmp_path)
    r = project.cli("run", *FAST, "train.mode=finetune", f"model.pretrained={evil}")
    err = assert_clean_failure(r, 1, "model.pretrained", "resnet18_imagenet.pth", "refused", "run code",
                               "system")
    assert "state_dict" in err  # says how to convert a file one trusts
    assert not project.entries("train")  # nothing half-made in the cache
    assert all(k.startswith("runs/") for k in new_files(tmp_path, before))


def test_malicious_resume_checkpoint_is_refused(project, tmp_path, marker):
    evil = malicious_file(tmp_path / "last.ckpt", marker, wrap=lambda p: {"epoch": 3, "state_dict": {}, "loops": p})
    r = project.cli("run", *FAST, "train.mode=resume", f"++train.resume_from={evil}")
    assert_clean_failure(r, 1, "train.resume_from", "last.ckpt", "refused")
    assert not project.entries("train")


def test_pickled_module_is_refused_with_how_to_convert(tmp_path):
    """A whole pickled nn.Module needs its class's code to load: refused, not run."""
    path = tmp_path / "model_full.pt"
    torch.save(build_model({"arch": "resnet18", "stem": "small"}, 3), path)
    with pytest.raises(WeightsError, match=r"model_full\.pt is refused: loading it would run code.*state_dict"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"not a zip or pickle at all", b"PK\x03\x04truncated"],
                         ids=["empty", "garbage", "truncated-zip"])
def test_unreadable_weights_file_is_one_line(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        read_state_dict(path)
    assert "weights.pth" in str(e.value) and "\n" not in str(e.value)


def test_malicious_clip_weights_are_refused(tmp_path, marker):
    evil = malicious_file(tmp_path / "clip_me.pt", marker)
    with pytest.raises(StageError, match=r"clip_me\.pt is refused"):
        run_stage("clip_outliers", {"weights": evil, "model": {"arch": "resnet18"}}, {}, tmp_path / "out")


def test_our_own_checkpoints_load_safely(tmp_path):
    """Train checkpoints (Lightning, with our callbacks' state) read with weights_only=True."""
    data = make_array_dataset(tmp_path / "data", {"train": 6, "val": 2, "test": 2})
    run_stage("train", {"epochs": 1, "batch_size": 8, "model": {"arch": "resnet18", "stem": "small"}},
              {"data": data}, tmp_path / "train")
    sd, info = read_state_dict(tmp_path / "train" / "checkpoints" / "last.ckpt")
    assert info["kind"] == "lightning" and "fc.weight" in sd


def test_diverging_training_stops_with_the_epoch_and_a_lower_lr(project):
    """SGD at an absurd learning rate: the loss turns non-finite; the stage stops at once, names the
    epoch and train.lr, and writes no model (nothing reaches the cache)."""
    r = project.cli("run", *FAST, "train.optimizer=sgd", "train.lr=1e12", "train.epochs=2")
    err = assert_clean_failure(r, 1, "training diverged", "epoch 1", "train.lr", "train.optimizer=adamw")
    assert "No model was saved" in err
    assert not project.entries("train")
    failed = list((project.runs / "latest").resolve().glob("failed/train"))
    assert failed and not (failed[0] / "model.pt").exists()


# ---- ONNX files that reach past themselves (issue 30, item 5) ----------------------------------------
def external_data_model(folder: Path, location: str) -> Path:
    """An export_onnx-like folder whose model.onnx (y = x @ w) keeps w's 64 bytes in `location`."""
    import numpy as np
    from helpers_data import export_onnx
    from onnx import TensorProto, helper

    export_onnx(folder)  # io.json, preprocess.json, labels.txt; model.onnx replaced below
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    np.arange(16, dtype=np.float32).tofile(folder / "weights.bin")  # a file of its own folder: allowed
    return folder / "model.onnx"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A local file outside every model folder that an ONNX model tries to read."""
    path = tmp_path / "secret.bin"
    path.write_bytes(bytes(range(64)))
    return path


def no_runtime(monkeypatch) -> list:
    """Records every ONNX Runtime session made: a refused file must never reach the runtime."""
    import onnxruntime

    made = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **kw: made.append(a) or real(*a, **kw))
    return made


@pytest.mark.parametrize("where", ["absolute", "climbing", "symlink"])
def test_an_onnx_model_reading_a_file_outside_its_folder_is_refused_before_the_runtime(
        where, tmp_path, secret, monkeypatch):
    import numpy as np

    from backends.base import load as load_backend
    from stages.common.bundle import check_bundle
    from stages.common.onnx_files import UnsafeOnnx

    folder = tmp_path / "onnx"
    location = {"absolute": str(secret), "climbing": "../secret.bin", "symlink": "data.bin"}[where]
    model = external_data_model(folder, location)
    if where == "symlink":
        (folder / "data.bin").symlink_to(secret)
    made = no_runtime(monkeypatch)
    with pytest.raises(UnsafeOnnx) as e:  # evaluate, the parity checks, the golden samples
        load_backend("onnx", folder)
    assert made == []
    message = str(e.value)
    assert "\n" not in message and str(model) in message and "'w'" in message
    assert ("an absolute path" if where == "absolute" else "outside the model's folder") in message
    with pytest.raises(UnsafeOnnx, match="input onnx: "):  # ncnn and rknn_quantize, before pnnx or the toolkit
        check_bundle(folder, ("model.onnx",), input="onnx", hint="expected an export_onnx output")
    # the same model with its data in a file of its own folder loads and computes x @ w
    external_data_model(folder, "weights.bin")
    backend = load_backend("onnx", folder, {"input": "x"})
    assert np.allclose(backend.session.run(None, {"x": np.ones((1, 4), np.float32)})[0], [[24, 28, 32, 36]])


def test_an_onnx_model_naming_a_custom_op_domain_is_refused(tmp_path, monkeypatch):
    from onnx import TensorProto, helper

    from backends.base import load as load_backend
    from stages.common.onnx_files import UnsafeOnnx

    folder = tmp_path / "onnx"
    external_data_model(folder, "weights.bin")
    graph = helper.make_graph([helper.make_node("ReadFile", ["x"], ["y"], domain="ai.onnx.contrib")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.contrib", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    made = no_runtime(monkeypatch)
    with pytest.raises(UnsafeOnnx, match="'ai.onnx.contrib' needs a custom-op library"):
        load_backend("onnx", folder)
    assert made == []


def test_selftest_refuses_a_package_whose_model_reads_outside_it_before_running_anything(tmp_path, secret,
                                                                                         monkeypatch, capsys):
    """Under `selftest --emulate` the board's older onnxruntime runs in qemu-user, which opens host files."""
    import subprocess

    from helpers_data import export_onnx, make_dataset, package

    import boards.selftest

    onnx_dir = export_onnx(tmp_path / "onnx")
    pkg, _ = package("onnxruntime", {"model": onnx_dir, "data": make_dataset(tmp_path / "data")}, tmp_path / "pkg")
    bad = external_data_model(tmp_path / "bad", "../../secret.bin")
    os.chmod(pkg / "model.onnx", 0o644)
    (pkg / "model.onnx").write_bytes(bad.read_bytes())
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: ran.append(a) or pytest.fail("the package ran"))
    assert boards.selftest.main([str(pkg)]) == 2
    err = capsys.readouterr().err
    assert ran == [] and len(err.strip().splitlines()) == 1, err
    assert "package: " in err and "'w'" in err and "outside the model's folder" in err and "nothing was run" in err


@pytest.mark.parametrize("token", ["absolute", "../secret.png"])
def test_a_calibration_list_naming_a_file_outside_its_folder_is_refused(token, tmp_path):
    """A calibration entry from cache.remote whose dataset.txt names a local file: the toolkit would read it."""
    import shutil

    from helpers_data import export_onnx, make_dataset, save_image, write_calibration

    onnx_dir = export_onnx(tmp_path / "onnx")
    calib = write_calibration(make_dataset(tmp_path / "data"), tmp_path / "calib", n=2)
    secret = save_image(np.zeros((32, 32, 3), np.uint8), tmp_path / "secret.png")
    listed = str(secret) if token == "absolute" else token
    os.chmod(calib / "dataset.txt", 0o644)
    shutil.copy(calib / "dataset.txt", tmp_path / "good.txt")
    (calib / "dataset.txt").write_text(f"{listed}\n" + (tmp_path / "good.txt").read_text())
    with pytest.raises(StageError) as e:
        run_stage("rknn_quantize", {"accuracy_analysis_samples": 0}, {"onnx": onnx_dir, "calib": calib},
                  tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and "line 1" in message and "outside the calibration folder" in message, message
