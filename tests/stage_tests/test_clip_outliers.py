"""The clip_outliers stage: clipping lowers max|w| where it should and leaves everything else identical."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers_data import make_array_dataset, write_labels, write_preprocess

from engine.contract.stage import StageError
from engine.run.testing import run_stage
from stages.clip_outliers import ClipOutliers
from stages.common.models import build_model, read_bundle, save_model
from stages.train import Train

OUTLIER = 25.0


def _model_dir(folder: Path, arch: str = "resnet18", num_classes: int = 3) -> tuple[Path, dict]:
    torch.manual_seed(0)
    m = build_model(arch, num_classes)
    with torch.no_grad():
        m.layer1[0].conv1.weight[3, 0, 1, 1] = OUTLIER  # one outlier in output channel 3
        m.layer2[0].conv2.weight[0, 5, 0, 0] = -OUTLIER
        m.fc.weight[1, 7] = OUTLIER
        m.conv1.weight[0, 0, 0, 0] = OUTLIER
        m.bn1.weight[2] = OUTLIER
        m.bn1.running_var.mul_(1.5)
    folder.mkdir(parents=True)
    save_model(folder / "model.pt", m, {"arch": arch}, num_classes)
    write_labels(folder, ["a", "b", "c"])
    write_preprocess(folder, [32, 32])
    return folder, {k: v.clone() for k, v in m.state_dict().items()}


def _sd(folder: Path) -> dict:
    return read_bundle(folder)["state_dict"]


def test_percentile_per_channel(tmp_path):
    src, before = _model_dir(tmp_path / "model")
    m = run_stage(ClipOutliers, {"method": "percentile", "percentile": 99.0}, {"model": src}, tmp_path / "out")
    after = _sd(tmp_path / "out")
    clipped = {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight", "fc.weight"}
    for k in clipped:
        assert after[k].abs().max() < before[k].abs().max(), k
    assert after["layer1.0.conv1.weight"][3].abs().max() < 1.0  # the outlier is gone
    # per channel: a channel without outliers is clipped only at its own 1%/99% points
    ch = before["layer1.0.conv1.weight"][0]
    assert (after["layer1.0.conv1.weight"][0].max()
            == pytest.approx(float(torch.quantile(ch.flatten().double(), 0.99)), rel=1e-5))
    for k, v in before.items():  # biases, BN (weight included: exclude_bn) and BN statistics untouched
        if not k.endswith(".weight") or k.startswith("bn") or ".bn" in k or "downsample.1" in k:
            assert torch.equal(after[k], v), k
    assert torch.equal(after["bn1.weight"], before["bn1.weight"])
    assert m["layers_clipped"] == 21 and 0 < m["fraction_clipped"] < 0.03
    assert m["max_absmax_before"] == OUTLIER and m["max_absmax_after"] < OUTLIER
    assert ((tmp_path / "out" / "labels.txt").read_text() == "a\nb\nc\n"
            and (tmp_path / "out" / "preprocess.json").is_file())
    report = json.loads((tmp_path / "out" / "clip_report.json").read_text())
    row = next(r for r in report["layers"] if r["layer"] == "layer1.0.conv1")
    assert row["max_before"] == OUTLIER and row["max_after"] < 1 and row["fraction_clipped"] > 0
    with open(tmp_path / "out" / "clip_report.csv", newline="") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    assert rows["bn1"]["skipped_because"] == "exclude_bn" and rows["fc"]["clipped"] == "True"
    assert {"min_before", "max_before", "min_after", "max_after", "fraction_clipped"} <= set(rows["fc"])


def test_std_per_tensor_and_exclusions(tmp_path):
    src, before = _model_dir(tmp_path / "model")
    params = {"method": "std", "k": 3.0, "granularity": "tensor", "exclude_first": True, "exclude_last": True,
              "exclude_bn": False}
    run_stage(ClipOutliers, params, {"model": src}, tmp_path / "out")
    after = _sd(tmp_path / "out")
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])  # first layer excluded
    assert torch.equal(after["fc.weight"], before["fc.weight"])  # last layer excluded
    w = before["layer2.0.conv2.weight"].double()
    lo, hi = w.mean() - 3 * w.std(unbiased=False), w.mean() + 3 * w.std(unbiased=False)
    a = after["layer2.0.conv2.weight"].double()
    assert a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6 and a.min() > -OUTLIER
    assert after["bn1.weight"].max() < OUTLIER  # BN clipped when not excluded
    for k, v in before.items():
        if not k.endswith(".weight"):
            assert torch.equal(after[k], v), k  # biases and running statistics never change


def test_none_copies_and_weights_file(tmp_path):
    src, before = _model_dir(tmp_path / "model")
    run_stage(ClipOutliers, {"method": "none"}, {"model": src}, tmp_path / "same")
    after = _sd(tmp_path / "same")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert (tmp_path / "same" / "clip_report.csv").is_file()
    # a torchvision-style state_dict plus the model section (class count read from the head)
    torch.save(before, tmp_path / "weights.pth")
    m = run_stage(ClipOutliers, {"weights": tmp_path / "weights.pth", "model": {"arch": "resnet18"}},
                  {}, tmp_path / "w")
    b = read_bundle(tmp_path / "w")
    assert b["num_classes"] == 3 and b["arch"]["arch"] == "resnet18" and m["layers_clipped"] > 0
    assert not (tmp_path / "w" / "labels.txt").exists()
    # a bundle named as weights brings its folder's class names along (a finetune's head follows them)
    run_stage(ClipOutliers, {"weights": src / "model.pt"}, {}, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "labels.txt").read_text(encoding="utf-8") == "a\nb\nc\n"
    with pytest.raises(StageError, match="has no weights to clip: set model.pretrained"):
        run_stage(ClipOutliers, {}, {}, tmp_path / "x1")
    assert list(ClipOutliers.check_inputs(ClipOutliers.Params(), {"data"}))[0][0] == "model.pretrained"
    assert not list(ClipOutliers.check_inputs(ClipOutliers.Params(), {"model"}))
    with pytest.raises(StageError, match="use one"):
        run_stage(ClipOutliers, {"weights": tmp_path / "weights.pth"}, {"model": src}, tmp_path / "x2")
    with pytest.raises(StageError, match="model.arch=mobilenet_v3_small right"):
        run_stage(ClipOutliers, {"weights": tmp_path / "weights.pth", "model": {"arch": "mobilenet_v3_small"}}, {},
                  tmp_path / "x3")


def test_finetune_starts_from_clipped_weights(tmp_path):
    src, _ = _model_dir(tmp_path / "model")
    run_stage(ClipOutliers, {"percentile": 99.0}, {"model": src}, tmp_path / "clip")
    data = make_array_dataset(tmp_path / "data", {"train": 6, "val": 2, "test": 2})
    write_labels(data, ["a", "b", "c"])  # the model's classes: its head is kept
    run_stage(Train, {"mode": "finetune", "epochs": 1, "batch_size": 6, "limit_train_batches": 1,
                      "freeze_features": True},
              {"data": data, "init": tmp_path / "clip"}, tmp_path / "ft")
    met = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert met["init"]["reinitialized"] == [] and met["init"]["source"] == "init/model.pt"
    clipped, tuned = _sd(tmp_path / "clip"), _sd(tmp_path / "ft")
    assert torch.equal(tuned["layer1.0.conv1.weight"], clipped["layer1.0.conv1.weight"])


def test_bn_statistics_recomputed_after_clipping_when_data_is_wired(tmp_path, caplog):
    """Clipped weights change activations: with a data input the BN statistics are recomputed for the
    clipped weights; without one they are copied unchanged and a warning says so."""
    from stages.common.batchnorm import recalibrate
    from stages.common.preprocess import Preprocess
    from stages.common.train_data import NpyDataModule

    src, before = _model_dir(tmp_path / "model")
    data = make_array_dataset(tmp_path / "data", {"train": 10, "val": 2, "test": 2})
    params = {"method": "percentile", "percentile": 99.0}
    m = run_stage(ClipOutliers, params, {"model": src, "data": data}, tmp_path / "with")
    with_data = _sd(tmp_path / "with")
    assert m["bn_recalibrated_images"] == 30
    assert not torch.equal(with_data["bn1.running_var"], before["bn1.running_var"])
    # exactly the statistics of the clipped weights over the training images
    module = build_model({"arch": "resnet18"}, 3)
    module.load_state_dict(with_data)
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    recalibrate(module, NpyDataModule(data, Preprocess.load(data), 64, 0, None, 0).sample_batches("train", None))
    assert all(torch.allclose(module.state_dict()[k].float(), expected[k].float(), atol=1e-6) for k in expected)

    caplog.clear()
    m = run_stage(ClipOutliers, params, {"model": src}, tmp_path / "without")
    without = _sd(tmp_path / "without")
    assert m["bn_recalibrated_images"] is None
    assert torch.equal(without["bn1.running_var"], before["bn1.running_var"])
    assert "BatchNorm statistics were not recomputed" in caplog.text
