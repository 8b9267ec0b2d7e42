"""The calibration stage: stratified seeded picks, the folder layout rknn-toolkit2 and MaixHub read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers_data import make_dataset_dir, pixel_index
from PIL import Image

from engine.contract.stage import StageError
from engine.run.testing import run_stage
from stages.common.sampling import select, stratified_counts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # train: class 0 x 12, class 1 x 6, class 2 x 3 (21 images); val/test: 2 per class
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "data", size=16)


def test_stratified_counts_proportional_and_every_class():
    assert stratified_counts({0: 12, 1: 6, 2: 3}, 7) == {0: 4, 1: 2, 2: 1}
    assert stratified_counts({0: 12, 1: 6, 2: 3}, 21) == {0: 12, 1: 6, 2: 3}
    assert stratified_counts({0: 12, 1: 6, 2: 3}, 100) == {0: 12, 1: 6, 2: 3}  # capped at what exists
    # 3 images from a 98/1/1 split: each class gets one rather than the big class all three
    assert stratified_counts({0: 98, 1: 1, 2: 1}, 3) == {0: 1, 1: 1, 2: 1}
    # fewer images than classes: the largest remainders win, ties to the lower class id
    assert stratified_counts({0: 5, 1: 5, 2: 5}, 2) == {0: 1, 1: 1, 2: 0}
    for n in range(1, 30):
        assert sum(stratified_counts({0: 12, 1: 6, 2: 3}, n).values()) == min(n, 21)


def test_select_is_seeded_and_without_repeats():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a, b, c = select(labels, 10, 0), select(labels, 10, 0), select(labels, 10, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) == 10
    assert np.bincount(labels[a], minlength=3).tolist() == [5, 3, 2]


def test_select_lists_the_classes_mixed_not_in_stored_order():
    """A split is stored in class order; any prefix of the list (what a quantizer analyses first, a smaller
    calibration subset) must still hold several classes."""
    labels = np.repeat(np.arange(4), 50)
    picked = select(labels, 40, 0)
    assert len(set(labels[picked[:8]].tolist())) >= 3, labels[picked]


def test_calibration_folder_layout_and_stratification(data_dir, tmp_path):
    out = tmp_path / "out"
    metrics = run_stage("calibration", {"count": 7, "seed": 0}, {"data": data_dir}, out)
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "dataset.txt", "images"]
    images = sorted(out.joinpath("images").iterdir())
    # MaixHub's layout: images/ holds only the image files (no list, no json, no sub-folders)
    assert len(images) == 7 and all(p.is_file() and p.suffix == ".png" for p in images)
    listed = (out / "dataset.txt").read_text().splitlines()
    assert listed == [f"images/{p.name}" for p in images]  # relative to the output folder
    assert all((out / rel).is_file() and not Path(rel).is_absolute() for rel in listed)

    report = json.loads((out / "calibration.json").read_text())
    assert report["count"] == 7 and report["requested"] == 7 and report["warning"] is None
    assert report["split"] == "train" and report["image_size"] == [16, 16]
    assert report["per_class"] == {"class0": 4, "class1": 2, "class2": 1}
    assert metrics == {"count": 7, "classes": 3, "warning": False}

    # the PNGs hold the dataset's preprocessed pixels exactly (same size, lossless, not re-resized)
    train_x = np.load(data_dir / "images_train.npy")
    train_y = np.load(data_dir / "labels_train.npy")
    for entry in report["files"]:
        img = np.asarray(Image.open(out / entry["file"]))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
        i = entry["index"]
        assert pixel_index(img) == i
        np.testing.assert_array_equal(img, train_x[i])
        assert entry["label"] == int(train_y[i]) and entry["class"] == f"class{train_y[i]}"


def test_calibration_is_deterministic_and_seed_dependent(data_dir, tmp_path):
    a = run_stage("calibration", {"count": 5}, {"data": data_dir}, tmp_path / "a")
    run_stage("calibration", {"count": 5}, {"data": data_dir}, tmp_path / "b")
    run_stage("calibration", {"count": 5, "seed": 7}, {"data": data_dir}, tmp_path / "c")
    def files(d):
        return [f["index"] for f in json.loads((tmp_path / d / "calibration.json").read_text())["files"]]
    assert files("a") == files("b") != files("c")
    for name in ("dataset.txt", "calibration.json", "images/0000.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["count"] == 5


def test_fewer_images_than_asked_uses_all_and_warns(data_dir, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        metrics = run_stage("calibration", {"count": 50, "split": "val"}, {"data": data_dir}, out)
    report = json.loads((out / "calibration.json").read_text())
    assert report["count"] == 6 and report["available"] == 6 and report["requested"] == 50
    assert "only 6 images" in report["warning"]
    assert any("only 6 images" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert len(list((out / "images").iterdir())) == 6 and metrics["warning"] is True
    assert sorted(f["index"] for f in report["files"]) == list(range(6))


def test_missing_split_is_a_stage_error(tmp_path):
    data = make_dataset_dir(tmp_path / "data", counts={"train": [3, 3]}, size=8)
    with pytest.raises(StageError, match=r"no images_val.npy: calibration.split='val'"):
        run_stage("calibration", {"split": "val"}, {"data": data}, tmp_path / "out")
