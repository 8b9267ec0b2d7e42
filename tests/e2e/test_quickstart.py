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
    from engine.cli.commands import main

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
    assert fp32 >= 0.98  # reference loop 99.4% on the 179 test digits (32 px, 6 epochs) - 2 SD = 0.98; bench/floors.py
    # README (Export, ncnn and calibration): 100% top-1 agreement with PyTorch, logits within 1e-6 x the
    # logit range, on the test split
    preds = np.load(Path(run["stages"]["eval"]["path"]) / "predictions.npz")
    ref = preds["pytorch.logits"]
    for backend in ("onnx", "ncnn"):
        assert m["agreement"][backend] == 1.0
        assert m["max_abs_diff"][backend] <= 1e-6 * (ref.max() - ref.min()), (m["max_abs_diff"], np.ptp(ref))
        assert run["stages"][backend]["metrics"]["parity_top1_agreement"] == 1.0
    for backend in ("rknn_normal", "rknn_mmse"):
        assert fp32 - m["top1"][backend] <= 0.01 + 1e-9, (backend, m["top1"])
    assert run["headline"]["key"] == "eval.top1.rknn_mmse"


def test_quickstart_report_html_shows_every_backend(quickstart, tmp_path):
    """report.html in headless Chromium: curves, t-SNE and the five confusion matrices load, nothing is
    fetched, top-1 as in run.json."""
    import shutil

    from helpers_browser import SHOWN, Browser, HtmlPage, assert_picture, embedded_pngs

    _, _, run, _ = quickstart
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(Path(run["run_dir"]) / "report.html", alone / "report.html")
    with Browser(tmp_path / "profile") as browser:
        page = browser.open(alone / "report.html")
        shown = page.evaluate(SHOWN)
        assert {u.split(":", 1)[0] for u in page.requests} <= {"file", "data"} and page.problems == []
    backends = ["pytorch", "onnx", "ncnn", "rknn_normal", "rknn_mmse"]
    alts = {img["alt"] for img in shown["images"]}
    assert {"loss and accuracy per epoch (train)", "t-SNE of the test features by class",
            *(f"confusion matrix of {b}" for b in backends)} <= alts
    assert all(img["width"] > 0 for img in shown["images"])
    for png in embedded_pngs(HtmlPage((alone / "report.html").read_text(encoding="utf-8"))):
        assert_picture(png)
    top1 = run["stages"]["eval"]["metrics"]["top1"]
    assert {b["name"]: b["top1"] for b in shown["backends"]} == top1
    assert all(b["cells"][3] == f"{top1[b['name']]:.2%}" for b in shown["backends"])


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


# -- the README's quickstart block, through `plan --json` after the quickstart run ---------------------------
ALL = {"data", "train", "onnx", "preflight", "ncnn", "calib", "rknn_normal", "rknn_mmse", "eval", "package_board",
       "package_onnx"}


def _plan(main, capsys, *overrides: str):
    capsys.readouterr()
    assert main(["plan", *overrides, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _by_status(plan: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"cached": set(), "will run": set()}
    for s in plan["stages"]:
        out[s["status"]].add(s["name"])
    return out


def test_readme_more_epochs_reruns_train_and_what_depends_on_it(quickstart, capsys):
    _, _, _, main = quickstart
    plan = _plan(main, capsys, "+experiment=quickstart", "train.epochs=4")
    st = _by_status(plan)
    assert st["cached"] == {"data", "calib"}  # nothing upstream of train, nor beside it
    assert st["will run"] == ALL - {"data", "calib"}
    train = next(s for s in plan["stages"] if s["name"] == "train")
    assert train["reason"] == "train.epochs: 6 -> 4"


def test_readme_another_board_reruns_only_preflight_rknn_eval_and_packages(quickstart, capsys):
    _, _, _, main = quickstart
    plan = _plan(main, capsys, "+experiment=quickstart", "board=rv1106")
    st = _by_status(plan)
    assert st["will run"] == {"preflight", "rknn_normal", "rknn_mmse", "eval", "package_board", "package_onnx"}
    assert st["cached"] == {"data", "train", "onnx", "ncnn", "calib"}
    reasons = {s["name"]: s["reason"] for s in plan["stages"]}
    for rknn in ("rknn_normal", "rknn_mmse"):
        assert "quantize.target: rv1103 -> rv1106" in reasons[rknn]


def test_readme_2x2_sweep_makes_2_trainings_and_8_rknn_builds(quickstart, capsys):
    """`run -m ... train.lr=0.001,0.003 quantize.method=channel,layer`: plan -m gives one plan per job.
    Training keys are known (data is cached): 2 distinct. For lr=0.003 (the quickstart's own lr) the
    RKNN keys are known too: channel is the quickstart's (cached), layer gives 2 new ones, so the method
    is in the key. For lr=0.001 each job's 2 RKNN stages wait on that job's training: 2 jobs x 2."""
    _, run_rc, run, main = quickstart
    jobs = _plan(main, capsys, "-m", "+experiment=quickstart", "train.lr=0.001,0.003", "quantize.method=channel,layer")
    assert len(jobs) == 4
    stage = {(tuple(j["overrides"][1:]), s["name"]): s for j in jobs for s in j["stages"]}
    trainings = {s["key"] for (_, name), s in stage.items() if name == "train"}
    assert len(trainings) == 2 and None not in trainings
    assert stage[(("train.lr=0.003", "quantize.method=channel"), "train")]["key"] == run["stages"]["train"]["key"]
    builds = set()
    for lr in ("0.001", "0.003"):
        for method in ("channel", "layer"):
            job = (f"train.lr={lr}", f"quantize.method={method}")
            for rknn in ("rknn_normal", "rknn_mmse"):
                s = stage[(job, rknn)]
                if lr == "0.003":
                    assert s["key"] is not None
                    assert (s["status"] == "cached") == (method == "channel")
                    assert (s["key"] == run["stages"][rknn]["key"]) == (method == "channel")
                    builds.add(s["key"])
                else:
                    assert s["status"] == "will run" and s["reason"] == "input from onnx is computed first"
                    builds.add((stage[(job, "train")]["key"], rknn, method))
    assert len(builds) == 8
    # the lr=0.001 jobs share one training
    assert stage[(("train.lr=0.001", "quantize.method=channel"), "train")]["key"] == \
        stage[(("train.lr=0.001", "quantize.method=layer"), "train")]["key"]


def test_a_teammate_runs_the_quickstart_from_the_s3_cache_computing_only_the_packages(quickstart, s3, tmp_path,
                                                                                      monkeypatch):
    """cache.remote on a real S3-compatible server (moto's, 127.0.0.1) through s3fs: the first machine
    pushes its quickstart run; a second one (its own folder and runs root) runs the quickstart and every
    stage is a remote hit, each file checked against its sha256, except the board packages: their scripts
    run here (`edgepipe selftest`, the board), so an unsigned remote's are never taken (README, Trust model)."""
    _, _, run, main = quickstart
    remote = ["cache.remote=s3://team/edgepipe", f"+cache.remote_options.client_kwargs.endpoint_url={s3}"]
    assert main(["push", run["run_dir"], *remote]) == 0
    second = tmp_path / "teammate"
    second.mkdir()
    monkeypatch.setenv("EDGEPIPE_RUNS", str(second / "runs"))
    monkeypatch.chdir(second)
    assert main(["run", "+experiment=quickstart", *remote]) == 0
    mine = json.loads((second / "runs" / "latest" / "run.json").read_text())
    executes = {"package_board", "package_onnx"}  # outputs_execute: taken only from a signed remote
    assert {s["status"] for k, s in mine["stages"].items() if k not in executes} == {"cached"}
    assert {s["reason"] for k, s in mine["stages"].items() if k not in executes} == {"fetched from cache.remote"}
    assert {mine["stages"][k]["status"] for k in executes} == {"ran"}
    assert {k: s["key"] for k, s in mine["stages"].items()} == {k: s["key"] for k, s in run["stages"].items()}
    assert mine["stages"]["eval"]["metrics"] == run["stages"]["eval"]["metrics"]
