"""The quickstart experiment end to end through the CLI, exactly as `make demo` runs it: real Hydra,
Lightning, onnxruntime, pnnx/ncnn and the rknn-toolkit2 simulator. Then: a second run is all cache
hits, a changed evaluation setting re-runs only evaluation and packaging, and the ONNX Runtime
package's infer.py, run as a user would, predicts what `evaluate` measured."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One cold quickstart run shared by the tests below (it takes minutes)."""
    root = tmp_path_factory.mktemp("quickstart")
    env_runs = root / "runs"
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPIPE_RUNS", str(env_runs))
    mp.delenv("EDGEPIPE_PLUGINS", raising=False)
    mp.chdir(root)
    from engine.cli import main

    rc = main(["run", "+experiment=quickstart"])
    run = json.loads((env_runs / "latest" / "run.json").read_text())
    yield root, rc, run, main
    mp.undo()


def test_quickstart_runs_every_stage(quickstart):
    root, rc, run, _ = quickstart
    assert rc == 0, {k: v.get("error") for k, v in run["stages"].items()}
    assert run["status"] == "ok"
    assert set(run["stages"]) == {"data", "train", "onnx", "preflight", "ncnn", "calib", "rknn_normal",
                                  "rknn_mmse", "eval", "package_board", "package_onnx"}
    assert {s["status"] for s in run["stages"].values()} == {"ran"}
    # nothing written outside runs/ (rknn-toolkit2 likes to drop check*.onnx in the working folder)
    assert sorted(p.name for p in root.iterdir()) == ["runs"]


def test_quickstart_accuracy_holds_on_every_backend(quickstart):
    _, _, run, _ = quickstart
    m = run["stages"]["eval"]["metrics"]
    fp32 = m["top1"]["pytorch"]
    assert fp32 >= 0.9  # 32 px digits, a few epochs
    for backend in ("onnx", "ncnn"):
        assert m["agreement"][backend] == 1.0
        assert m["max_abs_diff"][backend] <= 1e-3
    for backend in ("rknn_normal", "rknn_mmse"):
        assert fp32 - m["top1"][backend] <= 0.01 + 1e-9, (backend, m["top1"])
    assert run["headline"]["key"] == "eval.top1.rknn_mmse"


def test_quickstart_packages(quickstart):
    _, _, run, _ = quickstart
    board = Path(run["stages"]["package_board"]["path"])
    with zipfile.ZipFile(board / "package.zip") as z:
        names = set(z.namelist())
    assert {"model.rknn", "labels.txt", "main.c", "CMakeLists.txt"} <= {Path(n).name for n in names}
    manifest = json.loads((board / "package" / "manifest.json").read_text())
    assert manifest["board"]["name"] == "rv1103"
    assert set(manifest["accuracy"]) >= {"pytorch", "onnx", "ncnn", "rknn_normal", "rknn_mmse"}
    assert (board / "package" / "labels.txt").read_text().split() == [str(i) for i in range(10)]


def test_onnxruntime_package_predicts_what_evaluate_measured(quickstart, tmp_path):
    _, _, run, _ = quickstart
    data = Path(run["stages"]["data"]["path"])
    images = np.load(data / "images_test.npy")
    folder = tmp_path / "test_images"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    package = Path(run["stages"]["package_onnx"]["path"]) / "package"
    out = subprocess.run([sys.executable, str(package / "infer.py"), str(folder), "--json"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == len(images)
    preds = np.load(Path(run["stages"]["eval"]["path"]) / "predictions.npz")
    labels = (package / "labels.txt").read_text().splitlines()
    assert [r["label"] for r in rows] == [labels[i] for i in preds["onnx.pred"]]
    np.testing.assert_allclose(np.array([r["logits"] for r in rows]), preds["onnx.logits"], atol=1e-4)


def test_quickstart_second_run_is_cached_and_edits_rerun_only_downstream(quickstart):
    root, _, _, main = quickstart
    assert main(["run", "+experiment=quickstart"]) == 0
    run = json.loads((root / "runs" / "latest" / "run.json").read_text())
    assert {s["status"] for s in run["stages"].values()} == {"cached"}
    assert main(["run", "+experiment=quickstart", "package.top_k=3"]) == 0
    run = json.loads((root / "runs" / "latest" / "run.json").read_text())
    ran = {k for k, s in run["stages"].items() if s["status"] == "ran"}
    assert ran == {"package_board", "package_onnx"}
    # evaluation recomputed gives byte-identical results (timings are kept apart): packages stay cached
    assert main(["run", "+experiment=quickstart", "package.top_k=3", "--force", "eval"]) == 0
    run = json.loads((root / "runs" / "latest" / "run.json").read_text())
    assert {k for k, s in run["stages"].items() if s["status"] == "ran"} == {"eval"}
