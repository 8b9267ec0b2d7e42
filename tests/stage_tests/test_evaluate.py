"""evaluate: every backend (PyTorch, TorchScript, ONNX Runtime, ncnn, the RKNN simulator's logits) on the
toy model's test split; numbers checked against a direct computation on the same predictions."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_data import TOY_CLASSES as CLASSES
from helpers_data import toy, wide_dataset, write_labels
from pydantic import ValidationError

from engine.contract.stage import StageError
from engine.run.testing import run_stage, validate_params


@pytest.fixture(scope="module")
def backends(tmp_path_factory) -> dict[str, Path]:
    """Model folders of every kind, made by the real stages from the toy model."""
    t = toy()
    root = tmp_path_factory.mktemp("backends")
    run_stage("export_torchscript", {}, {"model": t.model}, root / "ts")
    run_stage("ncnn", {}, {"onnx": t.onnx}, root / "ncnn")
    run_stage("rknn_quantize", {"accuracy_analysis_samples": 0}, {"onnx": t.onnx, "calib": t.calib, "data": t.data},
              root / "rknn")
    return {"model": t.model, "onnx": t.onnx, "ts": root / "ts", "ncnn": root / "ncnn", "rknn": root / "rknn"}


@pytest.fixture(scope="module")
def evaluated(backends, tmp_path_factory) -> tuple[Path, dict]:
    t = toy()
    out = tmp_path_factory.mktemp("eval") / "out"
    metrics = run_stage("evaluate", {}, {"data": t.data, **backends}, out)
    return out, metrics


def test_outputs_and_backend_kinds(evaluated):
    out, metrics = evaluated
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "eval.md", "predictions.npz"} <= names
    for b in ("model", "onnx", "ts", "ncnn", "rknn"):
        assert f"confusion_{b}.png" in names
        assert (out / f"confusion_{b}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "metrics.json").read_text())
    kinds = {n: r["kind"] for n, r in report["backends"].items()}
    assert kinds == {"model": "torch", "onnx": "onnx", "ts": "torchscript", "ncnn": "ncnn", "rknn": "rknn"}
    assert report["reference"] == "model"
    assert set(metrics["top1"]) == set(kinds)
    assert set(metrics["agreement"]) == {"onnx", "ts", "ncnn", "rknn"}
    md = (out / "eval.md").read_text()
    assert "| rknn | rknn (rv1103 normal w8a8) |" in md and "Per-class accuracy" in md and "confusion_ncnn.png" in md


def test_float_backends_match_fp32(evaluated):
    out, metrics = evaluated
    for b in ("onnx", "ts", "ncnn"):
        assert metrics["agreement"][b] == 1.0
        assert metrics["max_abs_diff"][b] <= 1e-3
        assert metrics["target_met"][b] is True
    # README (Export, ncnn and calibration): ONNX, TorchScript and ncnn-fp32 within 1e-6 x the logit range
    ref = np.load(out / "predictions.npz")["model.logits"]
    for b in ("onnx", "ts", "ncnn"):
        assert metrics["max_abs_diff"][b] <= 1e-6 * (ref.max() - ref.min()), (b, metrics["max_abs_diff"][b])
    # the toy model learned its task: reference loop 95.3% on the 64 toy test images - 2 SD = 0.90; bench/floors.py
    assert metrics["top1"]["model"] >= 0.90


def test_metrics_agree_with_a_direct_computation(evaluated):
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    out, metrics = evaluated
    t = toy()
    report = json.loads((out / "metrics.json").read_text())
    pred = np.load(out / "predictions.npz")
    labels = np.load(t.data / "labels_test.npy")
    assert np.array_equal(pred["labels"], labels)
    ref = pred["model.pred"]
    for name, row in report["backends"].items():
        p = pred[f"{name}.pred"]
        assert np.array_equal(p, pred[f"{name}.logits"].argmax(1))
        assert row["top1"] == pytest.approx(accuracy_score(labels, p))
        assert row["confusion"] == confusion_matrix(labels, p, labels=range(len(CLASSES))).tolist()
        per_class = recall_score(labels, p, labels=range(len(CLASSES)), average=None, zero_division=0)
        assert [row["per_class"][c] for c in CLASSES] == pytest.approx(per_class.tolist())
        # an int8 row's agreement covers every split it has logits of: val + test when rknn_quantize stored val
        # logits (test_rknn_label_free_figures_read_its_stored_val_logits checks those)
        if name != "model" and row.get("label_free_splits", ["test"]) == ["test"]:
            assert row["agreement"] == pytest.approx(np.mean(p == ref))
            diff = np.abs(pred[f"{name}.logits"] - pred["model.logits"]).max()
            assert row["max_abs_diff"] == pytest.approx(float(diff), rel=1e-6, abs=1e-7)
            assert row["drop_points"] == pytest.approx(100 * (np.mean(ref == labels) - np.mean(p == labels)), abs=1e-3)


def test_fp32_logits_are_the_training_preprocessing(evaluated):
    """The torch backend's logits are load_model + the shared normalize, nothing else."""
    from backends.torch_models import torch_logits
    from stages.common.models import load_model
    from stages.common.preprocess import Preprocess, normalize

    out, _ = evaluated
    t = toy()
    x = normalize(np.load(t.data / "images_test.npy"), Preprocess.load(t.model))
    direct = torch_logits(load_model(t.model / "model.pt"), x, batch=16)
    assert np.allclose(np.load(out / "predictions.npz")["model.logits"], direct, atol=1e-5)


def test_rknn_logits_are_the_simulators(evaluated, backends):
    out, metrics = evaluated
    t = toy()
    sim = np.load(backends["rknn"] / "test_logits.npy")
    assert np.array_equal(np.load(out / "predictions.npz")["rknn.logits"], sim)
    labels = np.load(t.data / "labels_test.npy")
    assert metrics["top1"]["rknn"] == pytest.approx(float(np.mean(sim.argmax(1) == labels)))
    assert metrics["agreement"]["rknn"] >= 0.9


def test_rknn_without_simulator_results_is_explained(backends, tmp_path):
    t = toy()
    rk = tmp_path / "rknn"
    shutil.copytree(backends["rknn"], rk)
    (rk / "test_logits.npy").unlink()
    with pytest.raises(StageError, match="wire the dataset into the rknn_quantize stage"):
        run_stage("evaluate", {}, {"data": t.data, "rknn": rk}, tmp_path / "a")


def test_rknn_logits_from_another_split_are_refused(backends, tmp_path):
    t = toy()
    data = tmp_path / "data"
    shutil.copytree(t.data, data)
    imgs = np.load(data / "images_test.npy")
    np.save(data / "images_test.npy", imgs[::-1].copy())
    with pytest.raises(StageError, match="computed on another test split"):
        run_stage("evaluate", {}, {"data": data, "rknn": backends["rknn"]}, tmp_path / "a")


_CONSTANT = """
import numpy as np

from backends.base import Backend


class ConstantBackend(Backend):
    \"\"\"Logits stored as one vector: every image gets the same class.\"\"\"

    kind, model_file, target = "constant", "model.constant.npy", "float"

    def _load(self):
        self.vector = np.load(self.folder / self.model_file)

    def logits(self, x):
        return np.tile(self.vector, (len(x), 1)).astype(np.float32)
"""


def test_a_registered_backend_class_is_picked_up(backends, tmp_path):
    """Adding a backend is one class plus its entry point: evaluate recognises its folders and scores it."""
    from helpers_backends import backend_plugin

    t = toy()
    folder = tmp_path / "constant"
    folder.mkdir()
    for f in ("preprocess.json", "labels.txt"):
        shutil.copy(t.onnx / f, folder / f)
    vector = np.zeros(len(CLASSES), np.float32)
    vector[1] = 1.0
    np.save(folder / "model.constant.npy", vector)
    with backend_plugin(tmp_path / "plugin", "constant_backend", _CONSTANT,
                        constant="constant_backend:ConstantBackend"):
        run_stage("evaluate", {}, {"data": t.data, "model": backends["model"], "c": folder}, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {n: r["kind"] for n, r in report["backends"].items()} == {"model": "torch", "c": "constant"}
    labels = np.load(t.data / "labels_test.npy")
    assert report["backends"]["c"]["top1"] == pytest.approx(float((labels == 1).mean()))
    assert report["backends"]["c"]["target_met"] is False  # a "float" backend must reproduce the fp32 logits


def test_bad_inputs_are_named(backends, tmp_path):
    t = toy()
    other = tmp_path / "other"
    shutil.copytree(t.onnx, other)
    write_labels(other, ["a", "b", "c", "d"])
    with pytest.raises(StageError, match="does not match the dataset's"):
        run_stage("evaluate", {}, {"data": t.data, "onnx": other}, tmp_path / "a")
    with pytest.raises(StageError, match="holds no model"):
        run_stage("evaluate", {}, {"data": t.data, "x": t.calib}, tmp_path / "b")
    with pytest.raises(StageError, match="is not one of the backend inputs"):
        run_stage("evaluate", {"reference": "nope"}, {"data": t.data, "onnx": t.onnx}, tmp_path / "c")
    with pytest.raises(ValidationError, match="needs multicrop.root"):
        validate_params("evaluate", {"multicrop": {"enabled": True}})


def test_no_torch_backend_uses_onnx_as_reference(backends, tmp_path):
    t = toy()
    metrics = run_stage("evaluate", {"limit": 20}, {"data": t.data, "onnx": t.onnx, "rknn": backends["rknn"]},
                        tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["reference"] == "onnx" and report["samples"] == 20
    assert metrics["top1"]["rknn"] == pytest.approx(report["backends"]["rknn"]["top1"])
    assert report["backends"]["rknn"]["samples"] == 20


def _class_ordered(src: Path, dst: Path) -> Path:
    """The toy dataset with every split stored in class order, as the dataset stage stores its splits."""
    shutil.copytree(src, dst)
    for split in ("train", "val", "test"):
        labels = np.load(src / f"labels_{split}.npy")
        order = np.argsort(labels, kind="stable")
        np.save(dst / f"labels_{split}.npy", labels[order])
        np.save(dst / f"images_{split}.npy", np.load(src / f"images_{split}.npy")[order])
    return dst


def test_a_limit_is_a_seeded_class_stratified_sample():
    from stages.common.sampling import limited

    labels = np.repeat(np.arange(4), [30, 20, 10, 4])  # class-ordered, unbalanced
    rows = limited(labels, 16)
    assert len(rows) == 16 and np.all(np.diff(rows) > 0) and set(labels[rows]) == {0, 1, 2, 3}
    assert np.array_equal(rows, limited(labels, 16))  # the same rows every time: evaluate and rknn agree
    assert np.array_equal(limited(labels, None), np.arange(64)) and np.array_equal(limited(labels, 99), np.arange(64))


def test_limits_score_every_class_and_rknn_logits_line_up_by_row(tmp_path):
    """A class-ordered test split: evaluate.limit=8 scores every class (its first 8 rows are one class), and
    rknn_quantize's quantize.data_limit=8 stores the simulator's logits of the same 8 images, which evaluate
    matches to their labels by row, with the same limit and without one."""
    t = toy()
    data = _class_ordered(t.data, tmp_path / "ordered")
    labels = np.load(data / "labels_test.npy")
    assert np.all(labels[:8] == 0), "the premise: a prefix of the split is one class"
    run_stage("rknn_quantize", {"accuracy_analysis_samples": 0, "data_limit": 8},
              {"onnx": t.onnx, "calib": t.calib, "data": data}, tmp_path / "rknn")
    sim = np.load(tmp_path / "rknn" / "test_logits.npy")
    for limit in (8, None):
        out = tmp_path / f"eval_{limit}"
        metrics = run_stage("evaluate", {"limit": limit}, {"data": data, "onnx": t.onnx, "rknn": tmp_path / "rknn"},
                            out)
        pred = np.load(out / "predictions.npz")
        assert sorted(pred["labels"][:8].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # every class, two of each
        rows = pred["rows"]
        assert np.array_equal(pred["labels"], labels[rows]) and len(rows) == (8 if limit else len(labels))
        # the simulator's logits, scored against the labels of the images they were computed on: each row's
        # logits point the way the float model's do on the same image
        assert np.array_equal(pred["rknn.logits"], sim) and metrics["samples"] == len(rows)
        assert metrics["top1"]["rknn"] == pytest.approx(float(np.mean(sim.argmax(1) == labels[rows[:8]])))
        assert _cosine(pred["onnx.logits"][:8], sim) > 0.9
    from helpers_data import onnx_reference_logits

    direct = onnx_reference_logits(type(t)(t.root, data, t.model, t.onnx, t.calib))[rows[:8]]
    assert np.allclose(direct, pred["onnx.logits"][:8], atol=1e-4)  # rows[:8]: the images rknn simulated


# -- multi-crop -----------------------------------------------------------------------------------------
def test_crop_boxes():
    from stages.evaluate import crop_boxes

    assert crop_boxes(96, 32, 1.0, 3) == [(0, 0, 32, 32), (32, 0, 64, 32), (64, 0, 96, 32)]
    assert crop_boxes(64, 32, 1.0, 3) == [(0, 0, 32, 32), (16, 0, 48, 32), (32, 0, 64, 32)]  # overlapping
    assert crop_boxes(32, 80, 1.0, 2) == [(0, 0, 32, 32), (0, 48, 32, 80)]  # tall: along the height
    assert crop_boxes(40, 40, 1.0, 3) == [(0, 0, 40, 40)] * 3  # square: K identical crops


def test_combine_crops_mean_and_vote():
    from stages.evaluate import combine_crops

    big = 5.0
    # image 0: crops say 1, 1, 2 -> vote 1 (2/3 >= 0.6); image 1: 0, 1, 2 -> no class reaches 0.6
    logits = np.zeros((2, 3, 3))
    for i, votes in enumerate([(1, 1, 2), (0, 1, 2)]):
        for j, c in enumerate(votes):
            logits[i, j, c] = big
    logits[1, 2, 2] = 2 * big  # mean probability favours class 2 for image 1
    pm, pv, und = combine_crops(logits, 0.6, None)
    assert pm.tolist() == [1, 2] and pv.tolist() == [1, 2] and und.tolist() == [False, True]
    pm, pv, und = combine_crops(logits, 0.6, negative=0)  # undecided -> the negative class
    assert pv.tolist() == [1, 0] and not und.any()
    pm, pv, und = combine_crops(logits, 1.0, negative=0)
    assert pv.tolist() == [0, 0]


def test_multicrop_on_original_files(backends, tmp_path):
    """A folder dataset of wide 64x32 images: the arrays are stretched to 32x32, multi-crop scores
    three 32x32 windows of each original file, beside single-crop."""
    t = toy()
    data, src = wide_dataset(tmp_path)
    out = tmp_path / "eval"
    params = {"multicrop": {"enabled": True, "crops": 3, "root": str(src), "vote_threshold": 0.5}}
    metrics = run_stage("evaluate", params, {"data": data, "model": t.model, "onnx": t.onnx}, out)
    report = json.loads((out / "metrics.json").read_text())
    n = report["samples"]
    pred = np.load(out / "predictions.npz")
    assert pred["model.crop_logits"].shape == (n, 3, 4)
    mc = report["backends"]["model"]["multicrop"]
    assert mc["top1_mean"] == pytest.approx(np.mean(pred["model.pred_mean"] == pred["labels"]))
    assert mc["top1_vote"] == pytest.approx(np.mean(pred["model.pred_vote"] == pred["labels"]))
    # reference loop 95.8% on the 24 originals' first window (the toy picture) - 2 SD = 0.87; bench/floors.py
    assert metrics["multicrop_top1_mean"]["model"] >= 0.87
    assert "Multi-crop (3 crops" in (out / "eval.md").read_text()
    # crops of the originals are what the backend saw: recompute crop 0 of image 0 directly
    import csv

    from backends.torch_models import torch_logits
    from stages.common.models import load_model
    from stages.common.preprocess import Preprocess, load_image, normalize, resize

    rows = [r for r in csv.DictReader(open(tmp_path / "data" / "index.csv")) if r["split"] == "test"]
    img = load_image(src / rows[0]["path"])
    spec = Preprocess.load(t.model)
    x = normalize(resize(img.crop((0, 0, 32, 32)), spec)[None], spec)
    direct = torch_logits(load_model(t.model / "model.pt"), x)
    assert np.allclose(pred["model.crop_logits"][0, 0], direct[0], atol=1e-4)


def test_multicrop_without_files_is_explained(tmp_path):
    t = toy()  # its index.csv names files that do not exist (like kind=digits)
    with pytest.raises(StageError, match="does not exist; multicrop.root must be"):
        run_stage("evaluate", {"multicrop": {"enabled": True, "root": str(tmp_path)}},
                  {"data": t.data, "onnx": t.onnx}, tmp_path / "out")


# -- a quantization that misses its target, and the package reading evaluate's real output ------------------
@pytest.fixture(scope="module")
def badly_calibrated(tmp_path_factory) -> Path:
    """A real int8 build calibrated on two flat grey pictures: activation ranges far too narrow, so the
    simulator's top-1 collapses (measured: 98% fp32 -> 28%)."""
    from PIL import Image

    t = toy()
    root = tmp_path_factory.mktemp("badcal")
    (root / "calib" / "images").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "calib" / "images" / f"{i}.png")
    (root / "calib" / "dataset.txt").write_text("images/0.png\nimages/1.png\n")
    run_stage("rknn_quantize", {"accuracy_analysis_samples": 0},
              {"onnx": t.onnx, "calib": root / "calib", "data": t.data}, root / "rknn")
    return root / "rknn"


def test_int8_drop_beyond_quant_max_drop_misses_the_target(badly_calibrated, tmp_path, caplog):
    t = toy()
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO, logger="edgepipe.stage.evaluate"):
        metrics = run_stage("evaluate", {"quant_max_drop": 1.0},
                            {"data": t.data, "model": t.model, "rknn": badly_calibrated}, out)
    drop = metrics["drop_points"]["rknn"]
    assert drop > 10  # the build really lost accuracy
    assert metrics["target_met"] == {"rknn": False}
    row = json.loads((out / "metrics.json").read_text())["backends"]["rknn"]
    n, net = row["samples"], row["lost_images"] - row["gained_images"]
    assert row["target"] == f"top-1 drop <= 1 points: at most 1 net image lost of {n}"
    assert drop == pytest.approx(100 * net / n, abs=1e-4)
    notes = [r.getMessage() for r in caplog.records if "misses its target" in r.getMessage()]  # shown to the user
    assert len(notes) == 1 and notes[0] == f"rknn: misses its target ({row['target']}): {row['missed']}"
    # the verdict, in images; a small split says what one image weighs
    assert row["missed"].startswith(f"net +{net} images of {n} ({drop:+.2f} points; {row['lost_images']} lost, ")
    assert row["missed"].endswith(f"> 1 image allowed by the 1-point target; one image is {100 / n:.3g} points "
                                  "here, so this split cannot resolve the target")
    assert metrics["missed"] == {"rknn": row["missed"]}
    assert re.search(rf"^\| rknn \|.*\| ✗ \*\*{re.escape(row['missed'])}\*\* \({re.escape(row['target'])}\) \|$",
                     (out / "eval.md").read_text(), re.M)
    # the same build within a looser target
    loose = run_stage("evaluate", {"quant_max_drop": drop + 1},
                      {"data": t.data, "model": t.model, "rknn": badly_calibrated}, tmp_path / "loose")
    assert loose["target_met"] == {"rknn": True}


def test_package_reads_a_real_evaluate_output(evaluated, badly_calibrated, tmp_path):
    """package's manifest carries what evaluate measured, per backend, from evaluate's own metrics.json."""
    t = toy()
    out, metrics = evaluated
    pkg_metrics = run_stage("package", {"board": "onnxruntime"}, {"model": t.onnx, "eval": out}, tmp_path / "pkg")
    manifest = json.loads((tmp_path / "pkg" / "package" / "manifest.json").read_text())
    report = json.loads((out / "metrics.json").read_text())["backends"]
    assert set(manifest["accuracy"]) == set(report) == {"model", "onnx", "ts", "ncnn", "rknn"}
    for backend, row in report.items():
        for key in ("top1", "agreement", "max_abs_diff", "drop_points", "target_met"):
            assert manifest["accuracy"][backend].get(key) == row.get(key), (backend, key)
        assert pkg_metrics[f"acc_{backend}"] == metrics["top1"][backend]
    assert set(manifest["source"]) == {"eval", "model"}
    # a failed target reaches the package too
    run_stage("evaluate", {}, {"data": t.data, "model": t.model, "rknn": badly_calibrated}, tmp_path / "bad_eval")
    run_stage("package", {"board": "onnxruntime"}, {"model": t.onnx, "eval": tmp_path / "bad_eval"}, tmp_path / "pkg2")
    bad = json.loads((tmp_path / "pkg2" / "package" / "manifest.json").read_text())["accuracy"]["rknn"]
    assert bad["target_met"] is False and bad["target"].startswith("top-1 drop <= 1 points: at most 1 net image")
    assert bad["lost_images"] > 10 and bad["missed"].startswith("net +")


def test_package_refuses_a_shipped_model_that_missed_its_target(badly_calibrated, tmp_path):
    """package.enforce_targets: the rows evaluate scored from the `model` input's folder (same engine
    digest) decide; a miss is one line naming the backend, the figure and the target, and nothing is
    written. A model only compared (the onnx row beside it) is not the package's business."""
    from engine.contract.stage import Refusal

    t = toy()
    sources = {"model": {"digest": "onnx-digest"}, "rknn": {"digest": "rknn-digest"}, "onnx": {"digest": "onnx-digest"}}
    run_stage("evaluate", {}, {"data": t.data, "model": t.model, "onnx": t.onnx, "rknn": badly_calibrated},
              tmp_path / "eval", sources=sources)
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["backends"]
    assert rows["rknn"]["model_digest"] == "rknn-digest" and rows["rknn"]["input"] == "rknn"
    drop = rows["rknn"]["drop_points"]
    ship_rknn = {"model": badly_calibrated, "eval": tmp_path / "eval"}
    with pytest.raises(Refusal) as e:
        run_stage("package", {"board": "rv1103", "enforce_targets": True}, ship_rknn, tmp_path / "refused",
                  sources={"model": {"digest": "rknn-digest"}})
    assert rows["rknn"]["missed"].startswith(f"net +{rows['rknn']['lost_images'] - rows['rknn']['gained_images']} "
                                             f"images of 64 ({drop:+.2f} points; ")
    assert str(e.value) == (f"rknn {rows['rknn']['missed']}: the rv1103 package is not written "
                            "(package.enforce_targets=true). Next: ship another build "
                            "(pipeline.stages.package.needs.model=<its stage>), score more test images, or let "
                            "quantize.search try builds until one holds")
    assert not any((tmp_path / "refused").iterdir())
    # the onnx model met its target: packaged though the int8 row of the same evaluation missed
    run_stage("package", {"board": "onnxruntime", "enforce_targets": True},
              {"model": t.onnx, "eval": tmp_path / "eval"},
              tmp_path / "onnx_pkg", sources={"model": {"digest": "onnx-digest"}})
    assert (tmp_path / "onnx_pkg" / "package.zip").is_file()
    # enforce_targets=false: packaged, the miss in the manifest
    run_stage("package", {"board": "rv1103"}, ship_rknn, tmp_path / "anyway",
              sources={"model": {"digest": "rknn-digest"}})
    accuracy = json.loads((tmp_path / "anyway" / "package" / "manifest.json").read_text())["accuracy"]
    assert accuracy["rknn"]["missed"] == rows["rknn"]["missed"] and "model_digest" not in accuracy["rknn"]
    # a shipped model evaluate never scored, or no eval input: the setting cannot hold, and says so
    with pytest.raises(StageError, match=r"did not score the shipped model \(input model\)"):
        run_stage("package", {"board": "rv1103", "enforce_targets": True}, ship_rknn, tmp_path / "unscored",
                  sources={"model": {"digest": "another-digest"}})
    with pytest.raises(StageError, match="package.enforce_targets=true needs the `eval` input"):
        run_stage("package", {"board": "rv1103", "enforce_targets": True}, {"model": badly_calibrated},
                  tmp_path / "no_eval")


# -- features.npz (the report's t-SNE) and memory -------------------------------------------------------------
def test_features_are_the_penultimate_layer(evaluated):
    """features.npz holds the inputs of the classifier's last layer: that layer applied to them gives the
    model's logits (up to float16 rounding)."""
    import torch

    from stages.common.models import load_model

    out, _ = evaluated
    t = toy()
    f = np.load(out / "features.npz")
    labels = np.load(t.data / "labels_test.npy")
    n = len(labels)
    assert f["features"].dtype == np.float16 and len(f["features"]) == n  # fewer than 2,000: every image
    assert np.array_equal(f["index"], np.arange(n)) and np.array_equal(f["labels"], labels)
    assert str(f["backend"]) == "model" and f["classes"].tolist() == CLASSES
    pred = np.load(out / "predictions.npz")
    assert np.array_equal(f["pred"], pred["model.pred"])
    last = [m for m in load_model(t.model / "model.pt").modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    w = last.weight.detach().numpy().reshape(len(CLASSES), -1)
    logits = f["features"].astype(np.float32) @ w.T + last.bias.detach().numpy()
    ref = pred["model.logits"]
    assert np.abs(logits - ref).max() <= 2e-3 * (ref.max() - ref.min())


def test_features_are_capped_and_seeded(backends, tmp_path):
    t = toy()
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_stage("evaluate", {"features_samples": 10, "features_seed": seed},
                  {"data": t.data, "model": backends["model"]}, tmp_path / name)
        runs[name] = np.load(tmp_path / name / "features.npz")["index"]
    assert len(runs["a"]) == 10 and np.all(np.diff(runs["a"]) > 0)
    assert np.array_equal(runs["a"], runs["b"]) and not np.array_equal(runs["a"], runs["c"])
    run_stage("evaluate", {"features_samples": 0}, {"data": t.data, "model": backends["model"]}, tmp_path / "none")
    assert not (tmp_path / "none" / "features.npz").exists()
    run_stage("evaluate", {}, {"data": t.data, "onnx": backends["onnx"]}, tmp_path / "onnx")  # no PyTorch backend
    assert not (tmp_path / "onnx" / "features.npz").exists()


_BIG_SPLIT = r"""
import json, shutil, sys
from pathlib import Path
import numpy as np
import matplotlib.figure  # imported before the baseline: the confusion PNGs need it whatever the split size
from engine.run.testing import run_stage
data, model, out = map(Path, sys.argv[1:4])
def rss_mb(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
base = rss_mb("VmRSS")
run_stage("evaluate", {}, {"data": data, "c": model}, out)
print(json.dumps({"base": base, "peak": rss_mb("VmHWM")}))
"""


_CONSTANT_PLUS_PIXEL = """
import numpy as np

from backends.base import Backend


class Constant(Backend):
    kind, model_file, target = "constant", "model.constant.npy", "float"

    def _load(self):
        self.vector = np.load(self.folder / self.model_file)

    def logits(self, x):
        return np.tile(self.vector, (len(x), 1)).astype(np.float32) + x[:, :1, 0, 0]
"""


def test_a_100000_image_split_is_read_a_batch_at_a_time(tmp_path):
    """Issue 11: evaluate reads the split memory-mapped, one batch at a time; 100,000 images (307 MB)
    grow the process by far less than the file (measured: see the assertion's message)."""
    import subprocess
    import sys

    from helpers_backends import write_backend_plugin

    t = toy()
    data, model = tmp_path / "data", tmp_path / "constant"
    data.mkdir()
    model.mkdir()
    for f in ("preprocess.json", "labels.txt"):
        shutil.copy(t.data / f, data / f)
        shutil.copy(t.onnx / f, model / f)
    n = 100_000
    images = np.lib.format.open_memmap(data / "images_test.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    images.flush()
    del images
    np.save(data / "labels_test.npy", np.arange(n, dtype=np.int64) % len(CLASSES))
    np.save(model / "model.constant.npy", np.arange(len(CLASSES), dtype=np.float32))
    file_mb = (data / "images_test.npy").stat().st_size / 2**20
    plugin = write_backend_plugin(tmp_path / "plugin", "constant_backend", _CONSTANT_PLUS_PIXEL,
                                  constant="constant_backend:Constant")
    env = __import__("os").environ
    res = subprocess.run([sys.executable, "-c", _BIG_SPLIT, str(data), str(model), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2],
                         env={**env, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": ":".join(filter(None, (str(plugin), env.get("PYTHONPATH"))))})
    assert res.returncode == 0, res.stderr[-2000:]
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["base"]
    print(f"evaluate: {grown:.0f} MB for a {file_mb:.0f} MB split")
    assert grown < 0.25 * file_mb, f"evaluate grew by {grown:.0f} MB reading a {file_mb:.0f} MB split"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["samples"] == n


def test_board_logits_are_a_row_beside_the_simulators(backends, tmp_path, caplog):
    """An rknn_quantize folder run with quantize.board_eval holds board_test_logits.npy (no board here:
    the simulator's logits with one prediction changed stand in for them): evaluate scores it as
    `rknn_board` beside `rknn`."""
    t = toy()
    rk = tmp_path / "rknn"
    shutil.copytree(backends["rknn"], rk)
    sim = np.load(rk / "test_logits.npy")
    board = sim.copy()
    board[0] = np.roll(board[0], 1)
    np.save(rk / "board_test_logits.npy", board)
    build = json.loads((rk / "build.json").read_text())
    build["board"] = {**build["simulator"], "device_id": "SERIAL1"}
    (rk / "build.json").write_text(json.dumps(build))
    out = tmp_path / "out"
    metrics = run_stage("evaluate", {}, {"data": t.data, "model": t.model, "rknn": rk}, out)
    report = json.loads((out / "metrics.json").read_text())["backends"]
    assert report["rknn_board"]["kind"] == "rknn_board" and report["rknn"]["kind"] == "rknn"
    labels = np.load(t.data / "labels_test.npy")
    assert metrics["top1"]["rknn_board"] == pytest.approx(float(np.mean(board.argmax(1) == labels)))
    assert np.array_equal(np.load(out / "predictions.npz")["rknn_board.logits"], board)
    assert "| rknn_board | rknn_board (rv1103 SERIAL1) |" in (out / "eval.md").read_text()
    # multi-crop: this build stored no crops (the simulator's are noted missing), the board never has them
    with caplog.at_level(logging.INFO, logger="edgepipe.stage.evaluate"):
        run_stage("evaluate", {"multicrop": {"enabled": True, "root": str(tmp_path)}}, {"data": t.data, "rknn": rk},
                  tmp_path / "mc")
    md = (tmp_path / "mc" / "eval.md").read_text()
    assert re.search(r"^\| rknn \| [\d.]+% \| no crop logits \| \| \|$", md, re.M), md
    assert re.search(r"^\| rknn_board \| [\d.]+% \| no crop logits \| \| \|$", md, re.M), md
    notes = [r.getMessage() for r in caplog.records if "no multi-crop logits" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("rknn: ")
    build["board"]["images_test_sha256"] = "0" * 64
    (rk / "build.json").write_text(json.dumps(build))
    with pytest.raises(StageError, match=r"input rknn: its board_test_logits.npy were computed on another test split"):
        run_stage("evaluate", {}, {"data": t.data, "rknn": rk}, tmp_path / "again")


# -- the int8 gate (stages.common.quant_gate) through the real stage -----------------------------------------
_STORED_INT8 = """
import numpy as np

from backends.base import Backend


class StoredInt8(Backend):
    \"\"\"A quantized build whose logits its stage stored per split (int8_<split>_logits.npy), as RKNN's are.\"\"\"

    kind, model_file, target, precomputed, int8 = "stored_int8", "int8_test_logits.npy", "quantized", True, True

    def _load(self):
        pass

    def check_data(self, data, split, classes):
        self._logits = np.load(self.folder / f"int8_{split}_logits.npy")

    def stored_logits(self):
        return self._logits

    def stored_split_logits(self, data, split, classes):
        path = self.folder / f"int8_{split}_logits.npy"
        return np.load(path) if path.is_file() else None
"""


def _float_logits(model: Path, images: np.ndarray) -> np.ndarray:
    """The toy model's logits computed here, not by evaluate: load_model + the shared normalize."""
    from backends.torch_models import torch_logits
    from stages.common.models import load_model
    from stages.common.preprocess import Preprocess, normalize

    return torch_logits(load_model(model / "model.pt"), normalize(images, Preprocess.load(model)), batch=16)


def _flip(logits: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """The logits with the first `count` correctly classified images made wrong (argmax moved one class on)."""
    out = logits.copy()
    right = np.flatnonzero(logits.argmax(1) == labels)[:count]
    assert len(right) == count
    out[right] = np.roll(out[right], 1, axis=1)
    assert np.all(out[right].argmax(1) != labels[right])
    return out


def _interval(lost: int, gained: int, n: int) -> list[float]:
    """The drop's 95% interval from scipy's own exact (Clopper-Pearson) binomial intervals, each at 97.5%."""
    from scipy.stats import binomtest

    def exact(k, m):
        ci = binomtest(k, m).proportion_ci(confidence_level=0.975, method="exact")
        return ci.low, ci.high

    rate = exact(lost + gained, n)
    share = exact(lost, lost + gained) if lost + gained else (0.0, 1.0)
    corners = [100 * r * (2 * s - 1) for r in rate for s in share]
    return [min(corners), max(corners)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def seventy_two(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A toy dataset whose test split holds 72 images, with the toy model's float logits on test and val."""
    from helpers_data import write_dataset

    from stages.common.preprocess import Preprocess

    t = toy()
    data = write_dataset(tmp_path_factory.mktemp("seventy_two") / "data", Preprocess.load(t.data), n_test=72)
    return data, _float_logits(t.model, np.load(data / "images_test.npy")), \
        _float_logits(t.model, np.load(data / "images_val.npy"))


def _stored_int8(folder: Path, test: np.ndarray, val: np.ndarray | None = None) -> Path:
    folder.mkdir()
    for f in ("preprocess.json", "labels.txt"):
        shutil.copy(toy().onnx / f, folder / f)
    np.save(folder / "int8_test_logits.npy", test)
    if val is not None:
        np.save(folder / "int8_val_logits.npy", val)
    return folder


def test_one_image_lost_on_72_holds_a_one_point_target_and_says_the_split_cannot_resolve_it(seventy_two, tmp_path,
                                                                                            caplog):
    """Issue 31: one image of 72 is 1.39 points; a 1-point target allows one whole image, so the build
    holds, and eval.md and the terminal say the split cannot resolve the target."""
    from helpers_backends import backend_plugin

    data, float_test, float_val = seventy_two
    labels = np.load(data / "labels_test.npy")
    quant_val = float_val * 0.9 + np.random.default_rng(0).normal(0, 0.05, float_val.shape).astype(np.float32)
    int8 = _stored_int8(tmp_path / "int8", _flip(float_test, labels, 1), quant_val)
    with backend_plugin(tmp_path / "plugin", "stored_int8", _STORED_INT8, stored_int8="stored_int8:StoredInt8"), \
            caplog.at_level(logging.INFO, logger="edgepipe.stage.evaluate"):
        metrics = run_stage("evaluate", {"quant_max_drop": 1.0}, {"data": data, "model": toy().model, "int8": int8},
                            tmp_path / "out")
    row = json.loads((tmp_path / "out" / "metrics.json").read_text())["backends"]["int8"]
    assert (row["samples"], row["lost_images"], row["gained_images"], row["allowed_images"]) == (72, 1, 0, 1)
    assert row["target_met"] is True and "missed" not in row and metrics["target_met"] == {"int8": True}
    assert row["drop_points"] == pytest.approx(100 / 72, abs=1e-4)
    assert round(row["resolution_points"], 2) == 1.39 and row["resolved"] is False
    assert row["drop_ci95"] == pytest.approx(_interval(1, 0, 72), abs=0.01)
    assert row["drop_ci95"][0] < 1.0 < row["drop_ci95"][1]  # the interval straddles the target: the rule decides
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "**The test split cannot resolve the 1-point target:** one image = 1.39 points > 1 (int8)." in md
    assert re.search(r"^- int8: holds: net \+1 image of 72 \(\+1\.39 points; 1 lost, 0 gained; .*this split cannot "
                     r"resolve the target$", md, re.M), md
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("int8: ")]
    assert len(notes) == 1 and notes[0].startswith("int8: holds its target") and "cannot resolve" in notes[0]
    # the label-free figures cover val and test: no labels needed
    assert row["label_free_splits"] == ["val", "test"] and row["label_free_images"] == 72 + len(float_val)
    both_f = np.concatenate([float_val, float_test])
    both_q = np.concatenate([quant_val, _flip(float_test, labels, 1)])
    assert row["logit_cosine"] == pytest.approx(_cosine(both_f, both_q), abs=1e-6)
    assert row["agreement"] == pytest.approx(float(np.mean(both_f.argmax(1) == both_q.argmax(1))))
    assert row["logit_cosine"] < 0.9999  # the val logits really were read (test alone differs in one image)
    # a 2-point target: one image (1.39 points) is within it, the split resolves it, and nothing says otherwise
    with backend_plugin(tmp_path / "plugin", "stored_int8", _STORED_INT8, stored_int8="stored_int8:StoredInt8"):
        run_stage("evaluate", {"quant_max_drop": 2.0}, {"data": data, "model": toy().model, "int8": int8},
                  tmp_path / "two")
    row = json.loads((tmp_path / "two" / "metrics.json").read_text())["backends"]["int8"]
    assert row["resolved"] is True and row["target_met"] is True and row["allowed_images"] == 2
    assert "cannot resolve" not in (tmp_path / "two" / "eval.md").read_text()


def test_two_images_lost_on_72_miss_and_package_refuses_with_the_verdict(seventy_two, backends, tmp_path):
    """Two lost images are more than the one a 1-point target allows on 72: target_met false, `missed`
    is the verdict, and package.enforce_targets refuses in one line that names the row, says the
    verdict and the next step (a build that holds, by name)."""
    from helpers_backends import backend_plugin

    from engine.contract.stage import Refusal

    data, float_test, _ = seventy_two
    labels = np.load(data / "labels_test.npy")
    miss = _stored_int8(tmp_path / "miss", _flip(float_test, labels, 2))
    holds = _stored_int8(tmp_path / "holds", float_test)
    sources = {"rknn_mmse": {"digest": "mmse-digest"}, "rknn_normal": {"digest": "normal-digest"}}
    with backend_plugin(tmp_path / "plugin", "stored_int8", _STORED_INT8, stored_int8="stored_int8:StoredInt8"):
        run_stage("evaluate", {}, {"data": data, "model": toy().model, "rknn_mmse": miss, "rknn_normal": holds},
                  tmp_path / "eval", sources=sources)
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["backends"]
    row = rows["rknn_mmse"]
    assert (row["lost_images"], row["gained_images"], row["allowed_images"], row["target_met"]) == (2, 0, 1, False)
    assert row["drop_ci95"] == pytest.approx(_interval(2, 0, 72), abs=0.01)
    lo, hi = row["drop_ci95"]
    assert row["missed"] == (f"net +2 images of 72 (+2.78 points; 2 lost, 0 gained; 95% interval {lo:+.2f} to "
                             f"{hi:+.2f}) > 1 image allowed by the 1-point target; one image is 1.39 points here, "
                             "so this split cannot resolve the target")
    assert row["label_free_splits"] == ["test"]  # this build stored no val logits: the row says so
    assert rows["rknn_normal"]["target_met"] is True and rows["rknn_normal"]["lost_images"] == 0
    # the shipped model: package reads the row by its digest (an rknn folder, since the board takes one)
    with pytest.raises(Refusal) as e:
        run_stage("package", {"board": "rv1103", "enforce_targets": True},
                  {"model": backends["rknn"], "eval": tmp_path / "eval"},
                  tmp_path / "refused", sources={"model": {"digest": "mmse-digest"}})
    assert str(e.value) == (f"rknn_mmse {row['missed']}: the rv1103 package is not written "
                            "(package.enforce_targets=true). Next: ship rknn_normal, which holds it "
                            "(pipeline.stages.package.needs.model=rknn_normal), score more test images, or let "
                            "quantize.search try builds until one holds")
    assert "\n" not in str(e.value) and not any((tmp_path / "refused").iterdir())


def test_rknn_label_free_figures_read_its_stored_val_logits(backends, tmp_path):
    """An RKNN row's agreement and cosine cover val + test when rknn_quantize stored val_logits.npy with the
    digest of the val split it ran on; without them the row says it covers test only; logits no digest ties
    to this dataset's val split are refused."""
    from engine.contract.hashing import sha256_file

    t = toy()
    rk = tmp_path / "rknn"
    shutil.copytree(backends["rknn"], rk)
    build = json.loads((rk / "build.json").read_text())
    (rk / "val_logits.npy").unlink(missing_ok=True)  # a build that stored the test split's logits only
    build.pop("simulator_val", None)
    build["simulator"].pop("images_val_sha256", None)
    (rk / "build.json").write_text(json.dumps(build))
    out = run_stage("evaluate", {}, {"data": t.data, "model": t.model, "rknn": rk}, tmp_path / "test_only")
    row = json.loads((tmp_path / "test_only" / "metrics.json").read_text())["backends"]["rknn"]
    pred = np.load(tmp_path / "test_only" / "predictions.npz")
    assert row["label_free_splits"] == ["test"] and row["label_free_images"] == 64
    assert row["logit_cosine"] == pytest.approx(_cosine(pred["model.logits"], pred["rknn.logits"]), abs=1e-6)
    assert out["logit_cosine"]["rknn"] == row["logit_cosine"]
    # val logits stored beside the test ones (a stand-in for the simulator's: the float ones, scaled)
    float_val = _float_logits(t.model, np.load(t.data / "images_val.npy"))
    quant_val = float_val * 0.5 + 1.0
    np.save(rk / "val_logits.npy", quant_val)
    with pytest.raises(StageError, match=r"input rknn: its val_logits.npy has no images_val_sha256 in build.json"):
        run_stage("evaluate", {}, {"data": t.data, "model": t.model, "rknn": rk}, tmp_path / "undated")
    build["simulator_val"] = {"images_val_sha256": sha256_file(t.data / "images_val.npy")}  # rknn_quantize's record
    (rk / "build.json").write_text(json.dumps(build))
    run_stage("evaluate", {}, {"data": t.data, "model": t.model, "rknn": rk}, tmp_path / "both")
    row = json.loads((tmp_path / "both" / "metrics.json").read_text())["backends"]["rknn"]
    assert row["label_free_splits"] == ["val", "test"] and row["label_free_images"] == 64 + len(float_val)
    both_f = np.concatenate([float_val, pred["model.logits"]])
    both_q = np.concatenate([quant_val, pred["rknn.logits"]])
    assert row["logit_cosine"] == pytest.approx(_cosine(both_f, both_q), abs=1e-6)
    assert row["agreement"] == pytest.approx(float(np.mean(both_f.argmax(1) == both_q.argmax(1))))
    assert "| val + test (96 images) |" in (tmp_path / "both" / "eval.md").read_text()
    build["simulator_val"]["images_val_sha256"] = "0" * 64
    (rk / "build.json").write_text(json.dumps(build))
    with pytest.raises(StageError, match=r"input rknn: its val_logits.npy were computed on another val split"):
        run_stage("evaluate", {}, {"data": t.data, "model": t.model, "rknn": rk}, tmp_path / "other")
