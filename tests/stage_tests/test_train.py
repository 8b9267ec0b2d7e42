"""The train stage: real Lightning on tiny 32 px data (a few steps each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_array_dataset

from engine.contract.stage import StageError
from engine.run.testing import run_stage, validate_params
from stages.common.models import build_model, load_model, read_bundle, save_model
from stages.common.preprocess import Preprocess, normalize
from stages.common.train_data import NpyDataModule, augment_batch
from stages.train import Train

FAST = {"epochs": 1, "batch_size": 8, "limit_train_batches": 2, "seed": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_array_dataset(tmp_path_factory.mktemp("data") / "data", {"train": 12, "val": 4, "test": 4})


# SGD with momentum and a step schedule, augmentation and dropout on: what resume must restore
RUN = {**FAST, "scheduler": "step", "step_every": 1, "step_factor": 0.5, "optimizer": "sgd", "lr": 0.05,
       "model": {"arch": "mobilenet_v3_small"}, "augment": {"rotation": 10, "hflip": 0.5}, "checkpoint_every": 1}


@pytest.fixture(scope="module")
def first(data, tmp_path_factory) -> tuple[Path, dict]:
    """One epoch of RUN, shared by the determinism and resume tests."""
    out = tmp_path_factory.mktemp("first") / "train"
    return out, run_stage(Train, RUN, {"data": data}, out)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("model", [
    {"arch": "resnet18"},
    {"arch": "mobilenet_v3_small", "head": "conv"},
    {"arch": "mobilenet_v3_large"},
    {"arch": "gem_resnet", "stem": "small"},
])
def test_each_model_trains_a_few_steps(data, tmp_path, model, capfd):
    out = tmp_path / "train"
    m = run_stage(Train, {**FAST, "model": model}, {"data": data}, out)
    captured = capfd.readouterr()  # quiet: no Lightning banners, tips or progress bars
    assert captured.out.strip() == "" and "GPU available" not in captured.err and "Tip" not in captured.err
    assert set(m) >= {"val_acc", "test_acc", "best_epoch", "train_loss"}
    assert m["best_epoch"] == 1 and m["epochs_run"] == 1
    # the headline is the saved model scored here: its accuracies are exact fractions of 4 images
    assert m["val_acc"] * 12 == round(m["val_acc"] * 12) and m["test_acc"] * 12 == round(m["test_acc"] * 12)
    for f in ("model.pt", "preprocess.json", "labels.txt", "metrics.json", "checkpoints/last.ckpt",
              "checkpoints/best.ckpt", "logs/csv/metrics.csv"):
        assert (out / f).is_file(), f
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "labels.txt").read_bytes() == (data / "labels.txt").read_bytes()
    met = _metrics(out)
    assert (met["epochs"][0]["epoch"] == 1
            and {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(met["epochs"][0]))
    assert met["test_acc"] == m["test_acc"] and met["n_train"] == 36
    module = load_model(out / "model.pt")
    assert module(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert read_bundle(out)["arch"]["arch"] == model["arch"]


def test_same_seed_same_metrics(data, first, tmp_path):
    out, a = first
    b = run_stage(Train, {**RUN, "workers": 0}, {"data": data}, tmp_path / "b")
    assert _metrics(out) == _metrics(tmp_path / "b")
    assert ({k: a[k] for k in ("val_acc", "test_acc", "train_loss")}
            == {k: b[k] for k in ("val_acc", "test_acc", "train_loss")})
    sa, sb = read_bundle(out)["state_dict"], read_bundle(tmp_path / "b")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for f in ("model.pt", "metrics.json", "checkpoints/last.ckpt"):
        assert (out / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f  # byte-identical: early cut-off


def test_finetune_other_class_count_and_freeze(data, tmp_path):
    torch.manual_seed(3)
    src = build_model("resnet18", 5)  # 5 classes; the dataset has 3
    torch.save(src.state_dict(), tmp_path / "pretrained.pth")
    params = {**FAST, "mode": "finetune", "freeze_features": True,
              "model": {"arch": "resnet18", "pretrained": str(tmp_path / "pretrained.pth")}}
    run_stage(Train, params, {"data": data}, tmp_path / "ft")
    met = _metrics(tmp_path / "ft")
    assert met["init"]["reinitialized"] == ["fc.bias", "fc.weight"] and met["init"]["loaded"] > 50
    out = read_bundle(tmp_path / "ft")["state_dict"]
    ref = src.state_dict()
    frozen = [k for k in ref if not k.startswith("fc.")]
    assert all(torch.equal(out[k], ref[k]) for k in frozen)  # features (and BN statistics) untouched
    assert out["fc.weight"].shape == (3, 512)


def test_finetune_from_init_input_and_errors(data, tmp_path):
    torch.manual_seed(4)
    init = tmp_path / "init"
    init.mkdir()
    save_model(init / "model.pt", build_model("mobilenet_v3_small", 3), {"arch": "mobilenet_v3_small"}, 3)
    m = run_stage(Train, {**FAST, "mode": "finetune", "model": {"arch": "mobilenet_v3_small"}},
                  {"data": data, "init": init}, tmp_path / "ft")
    assert (_metrics(tmp_path / "ft")["init"]["reinitialized"] == []
            and m["test_acc"] == _metrics(tmp_path / "ft")["test_acc"])
    start, tuned = read_bundle(init)["state_dict"], read_bundle(tmp_path / "ft")["state_dict"]
    assert not torch.equal(start["features.1.block.0.0.weight"], tuned["features.1.block.0.0.weight"])  # not frozen
    with pytest.raises(StageError, match=r"do not fit.*missing keys.*unexpected keys"):
        run_stage(Train, {**FAST, "mode": "finetune", "model": {"arch": "resnet18"}},
                  {"data": data, "init": init}, tmp_path / "x1")
    with pytest.raises(StageError, match="needs model.pretrained"):
        run_stage(Train, {**FAST, "mode": "finetune"}, {"data": data}, tmp_path / "x2")
    with pytest.raises(StageError, match="file not found"):
        run_stage(Train, {**FAST, "mode": "finetune", "model": {"pretrained": str(tmp_path / "nope.pth")}},
                  {"data": data}, tmp_path / "x3")
    with pytest.raises(StageError, match="fromscratch"):
        run_stage(Train, FAST, {"data": data, "init": init}, tmp_path / "x4")
    with pytest.raises(StageError, match="resume checkpoint not found"):
        run_stage(Train, {**FAST, "mode": "resume"}, {"data": data, "init": init}, tmp_path / "x5")
    with pytest.raises(ValueError, match="freeze_features needs mode: finetune"):
        validate_params(Train, {"freeze_features": True})
    with pytest.raises(ValueError):
        validate_params(Train, {"optimizer": "rmsprop"})


def test_resume_continues_like_an_uninterrupted_run(data, first, tmp_path):
    out, _ = first
    assert (out / "checkpoints" / "epoch=1.ckpt").is_file()
    m = run_stage(Train, {**RUN, "epochs": 2, "mode": "resume"}, {"data": data, "init": out}, tmp_path / "resumed")
    res = _metrics(tmp_path / "resumed")
    assert [e["epoch"] for e in res["epochs"]] == [1, 2] and m["epochs_run"] == 2
    assert res["epochs"][:1] == _metrics(out)["epochs"]  # history carried over
    assert res["epochs"][1]["lr"] == pytest.approx(0.05 * 0.5)  # optimizer/scheduler state restored
    run_stage(Train, {**RUN, "epochs": 2}, {"data": data}, tmp_path / "straight")
    assert res["epochs"] == _metrics(tmp_path / "straight")["epochs"]  # same stream, same state: same numbers
    with pytest.raises(StageError, match="resume checkpoint not found"):
        run_stage(Train, {**RUN, "mode": "resume", "resume_from": str(tmp_path / "nope.ckpt")},
                  {"data": data}, tmp_path / "x")


def test_early_stopping_and_step_scheduler(data, tmp_path):
    params = {**FAST, "epochs": 4, "model": {"arch": "mobilenet_v3_small"}, "scheduler": "step", "step_every": 1,
              "step_factor": 0.1, "early_stopping": {"patience": 1, "min_delta": 1.0}}
    m = run_stage(Train, params, {"data": data}, tmp_path / "es")
    met = _metrics(tmp_path / "es")
    assert m["epochs_run"] == 2 and met["stopped_early"] is True
    assert met["epochs"][1]["lr"] == pytest.approx(met["epochs"][0]["lr"] * 0.1)


def test_loaders_normalise_like_eval_and_augment_train_only(data):
    spec = Preprocess.load(data)
    p = validate_params(Train, {"batch_size": 5, "augment": {"rotation": 20, "brightness": 0.3, "hue": 0.05}})
    dm = NpyDataModule(data, spec, 5, 0, p.augment, 0)
    images = np.load(data / "images_val.npy")
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x, torch.from_numpy(normalize(images[:5], spec)))  # exactly the eval path
    assert y.tolist() == np.load(data / "labels_val.npy")[:5].tolist()
    xt, _ = next(iter(dm.train_dataloader()))
    xt2, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(xt, xt2)  # a function of (seed, epoch, index)
    train = np.load(data / "images_train.npy")
    plain = NpyDataModule(data, spec, 5, 0,
                          validate_params(Train, {"augment": {"random_resized_crop": False}}).augment, 0)
    xp, yp = next(iter(plain.train_dataloader()))
    sampler = plain.train_dataloader().sampler
    order = [i for i, _ in next(iter(sampler))]
    assert torch.equal(xp, torch.from_numpy(normalize(train[order], spec)))
    assert not torch.equal(xt, xp)
    aug = validate_params(Train, {"augment": {"crop_scale": [1, 1], "crop_ratio": [1, 1]}}).augment
    assert np.array_equal(augment_batch(train[:4], aug, [1, 2, 3, 4]), train[:4])  # identity crop


@pytest.mark.slow
def test_workers_do_not_change_results(data, first, tmp_path):
    """`workers` is left out of the cache key: loader processes must not change the numbers."""
    out, _ = first
    run_stage(Train, {**RUN, "workers": 2}, {"data": data}, tmp_path / "w2")
    assert _metrics(out) == _metrics(tmp_path / "w2")


def test_learning_check_warns_only_at_chance_with_a_falling_loss():
    from stages.common.train_module import learning_check

    warning = learning_check([0.50, 0.52, 0.50], n_val=60, train_loss=0.02, num_classes=2)
    assert warning and "chance" in warning and "train.bn_recalibrate" in warning and "train.lr" in warning
    assert learning_check([0.50, 0.75], n_val=60, train_loss=0.02, num_classes=2) is None  # learned
    assert learning_check([0.50, 0.50], n_val=60, train_loss=0.60, num_classes=2) is None  # not fitted either
    assert learning_check([0.40], n_val=10, train_loss=0.1, num_classes=4)  # 10 images: 0.40 is chance + noise
    assert learning_check([0.30], n_val=400, train_loss=0.1, num_classes=4) is None  # 400 images: 0.30 is not
    assert learning_check([1.0], n_val=4, train_loss=0.1, num_classes=2) is None  # 4 images tell nothing


def test_metrics_hold_train_eval_accuracy_and_recalibration(data, first):
    out, headline = first
    met = _metrics(out)
    assert met["bn_recalibrate"] == {"images": met["n_train"]}
    assert met["train_eval_images"] == met["n_train"] and met["train_eval_acc"] == headline["train_eval_acc"]
    assert headline["bn_recalibrate_seconds"] > 0


def test_recalibration_batches_never_end_with_a_lone_image(data):
    """MobileNetV3 at 32 px has 1x1 feature maps: train-mode BatchNorm refuses a batch of one."""
    from stages.common.batchnorm import recalibrate

    dm = NpyDataModule(data, Preprocess.load(data), 7, 0, None, 0)  # 36 training images: 5 x 7 + 1
    sizes = [len(y) for _, y in dm.sample_batches("train", None)]
    assert sizes == [7, 7, 7, 7, 8] and len(dm.sample_batches("train", None)) == 5
    model = build_model({"arch": "mobilenet_v3_small", "bn_momentum": 0.1}, 3).eval()
    assert recalibrate(model, dm.sample_batches("train", None)) == 36
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(m.training for m in model.modules()) and {m.momentum for m in bns} == {0.1}  # restored
    assert all(int(m.num_batches_tracked) == 5 for m in bns)


def test_best_checkpoint_link_survives_the_next_save(tmp_path):
    """best.ckpt is a hard link to last.ckpt (no 134 MB copy): that is safe only while Lightning
    replaces last.ckpt by rename; if it ever rewrote the file in place, best.ckpt would change too."""
    from lightning_fabric.utilities.cloud_io import _atomic_save

    from stages.common.train_module import _link

    last, best = tmp_path / "last.ckpt", tmp_path / "best.ckpt"
    _atomic_save({"epoch": 1}, last)
    _link(last, best)
    assert best.stat().st_ino == last.stat().st_ino
    _atomic_save({"epoch": 2}, last)
    assert torch.load(best)["epoch"] == 1 and torch.load(last)["epoch"] == 2


def _relabelled(src: Path, dst: Path, names: list[str], order: list[int]) -> Path:
    """The same images as dataset ``src`` with classes ``names`` listed in another ``order`` (what
    class folders sorted differently, or dataset.classes, give): label k becomes order.index(k)."""
    from stages.common.bundle import write_labels

    shutil.copytree(src, dst)
    for split in ("train", "val", "test"):
        labels = np.load(src / f"labels_{split}.npy")
        np.save(dst / f"labels_{split}.npy", np.asarray([order.index(k) for k in labels], dtype=np.int64))
    write_labels(dst / "labels.txt", [names[k] for k in order])
    return dst


def test_finetune_onto_the_same_classes_in_swapped_order_starts_where_the_model_was(tmp_path):
    """Issue 22: a model trained on 无鸟 / 有鸟 finetuned on the same photos with the classes listed the
    other way round kept its head as it was, and started at the complement of its accuracy."""
    from stages.common.bundle import write_labels

    names = ["无鸟", "有鸟"]
    data = make_array_dataset(tmp_path / "birds", {"train": 12, "val": 6, "test": 6}, num_classes=2)
    write_labels(data / "labels.txt", names)
    trained = run_stage(Train, {**FAST, "epochs": 3, "limit_train_batches": None, "lr": 3e-3,
                                "model": {"arch": "mobilenet_v3_small"}}, {"data": data}, tmp_path / "trained")
    assert trained["val_acc"] >= 0.75  # far from its complement: reference loop 91.7% on 12 val - 2 SD; bench/floors.py
    swapped = _relabelled(data, tmp_path / "swapped", names, [1, 0])
    # one epoch at a learning rate that moves nothing: the first validation is the starting point
    tuned = run_stage(Train, {**FAST, "mode": "finetune", "lr": 1e-9, "limit_train_batches": None,
                              "model": {"arch": "mobilenet_v3_small"}},
                      {"data": swapped, "init": tmp_path / "trained"}, tmp_path / "tuned")
    init = _metrics(tmp_path / "tuned")["init"]
    assert init["head"] == "rows reordered: 无鸟, 有鸟 -> 有鸟, 无鸟" and init["reinitialized"] == []
    assert tuned["val_acc"] == trained["val_acc"] and tuned["test_acc"] == trained["test_acc"]
