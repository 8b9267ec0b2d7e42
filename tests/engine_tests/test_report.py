"""report.html: written by every run beside report.md, rewritten by `edgepipe report RUN`, and looked at
as a person would: opened in headless Chromium (Debian's chromium; make test installs it) over the
DevTools protocol with every host name unresolvable, every image loaded, no request but the page and
its data: images, and the numbers shown equal to run.json's and the stage outputs'. Also `edgepipe dag
--format png|svg` (Graphviz's dot; make test installs graphviz)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_browser import SHOWN, Browser, HtmlPage, assert_picture, embedded_pngs
from helpers_project import use_real_config
from hostile import CodeRunningPickle
from PIL import Image

from engine.report.page import REPORT_HTML

# the digits data at 16 px, two short epochs, weights clipped, ONNX export, an RKNN int8 build in the
# simulator, evaluation of the three and an ONNX Runtime package: every section of the report, in seconds
CHEAP_EVAL = ["pipeline=train", "dataset=digits", "preprocess.input_size=16", "train=tiny", "train.epochs=2",
              "train.limit_train_batches=4", "model.stem=small", "clip=percentile", "clip.percentile=99.5",
              "+pipeline.stages.clip={uses:clip_outliers,config:clip,needs:{model:train,data:data}}",
              "+pipeline.stages.onnx={uses:export_onnx,needs:{model:clip}}",
              "+pipeline.stages.calib={uses:calibration,needs:{data:data}}",
              "+pipeline.stages.rknn={uses:rknn_quantize,needs:{onnx:onnx,calib:calib,data:data},config:quantize}",
              "+pipeline.stages.eval={uses:evaluate,needs:{data:data,pytorch:clip,onnx:onnx,rknn:rknn}}",
              "+pipeline.stages.package={uses:package,needs:{model:onnx,eval:eval,data:data},with:{board:onnxruntime}}"]
def words(text: str) -> str:
    return " ".join(text.split())


# -- every run, on the engine's cheap stages ----------------------------------------------------------
def test_every_run_writes_report_html_and_report_rewrites_it(ws, tmp_path):
    assert ws.cli("run", "src.value=4").rc == 0
    run_dir = (ws.runs / "latest").resolve()
    html = (run_dir / REPORT_HTML).read_text(encoding="utf-8")
    run = ws.latest()
    text = " ".join(HtmlPage(html).text)
    for name, stage in run["stages"].items():
        assert f"{name} {stage['type']} {stage['status']}" in " ".join(text.split()), name
        assert stage["key"] in html
    assert "src.value=4" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html

    # `edgepipe report` rewrites both from a copy of the run folder, naming the copy, not the original
    copy = tmp_path / "copied_run"
    shutil.copytree(run_dir, copy, symlinks=True)
    (copy / REPORT_HTML).unlink()
    (copy / "report.md").unlink()
    r = ws.cli("report", str(copy))
    assert r.rc == 0, r.err
    assert r.out.split() == [str(copy / "report.md"), str(copy / REPORT_HTML)]
    assert str(copy) in (copy / REPORT_HTML).read_text() and str(copy) in (copy / "report.md").read_text()
    assert ws.counts() == {"src": 1, "scale": 1, "quant": 1, "side": 1, "total": 1}  # nothing recomputed

    # run.json holds the stages' inputs and the config choices the page shows (no YAML parsed); a record
    # of an older edgepipe, without them, shows the same read from .hydra/
    hydra_dir = run_dir / ".hydra"
    stages = yaml.safe_load((hydra_dir / "config.yaml").read_text())["pipeline"]["stages"]
    assert run["needs"] == {name: entry.get("needs") or {} for name, entry in stages.items()}
    assert run["choices"] == yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    older = tmp_path / "older_run"
    shutil.copytree(copy, older, symlinks=True)
    record = json.loads((older / "run.json").read_text())
    del record["needs"], record["choices"]
    (older / "run.json").write_text(json.dumps(record))
    assert ws.cli("report", str(older)).rc == 0
    assert ((older / REPORT_HTML).read_text().replace(str(older), "RUN")
            == (copy / REPORT_HTML).read_text().replace(str(copy), "RUN"))


def test_failed_run_report_shows_the_error_escaped(ws):
    assert ws.cli("run", "pipeline=failing", "+fail.message='<b>broken</b> & gone'").rc == 1
    html = ((ws.runs / "latest") / REPORT_HTML).read_text(encoding="utf-8")
    assert "&lt;b&gt;broken&lt;/b&gt; &amp; gone" in html and "<b>broken" not in html
    assert '<td class="failed">failed</td>' in html


def test_report_of_an_unknown_or_damaged_run_is_one_line(ws, tmp_path):
    r = ws.cli("report", "nosuch")
    assert r.rc == 2 and r.err.strip() == f"edgepipe: no run matches 'nosuch' under {ws.runs} (try `edgepipe runs`)"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{")
    r = ws.cli("report", str(tmp_path / "bad"))
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and "run.json is not an edgepipe run record" in r.err


def test_summary_lists_the_values_that_differ_from_the_defaults(ws):
    assert ws.cli("run", "src.value=4", "scale.factor=2").rc == 0
    html = ((ws.runs / "latest") / REPORT_HTML).read_text(encoding="utf-8")
    table = html[html.index('<table class="changes">'):]
    table = table[:table.index("</table>")]
    # src.value differs (3 -> 4); scale.factor=2 is its default, so it is not listed
    assert "<td><code>src.value</code></td><td>3</td><td>4</td>" in table and "scale.factor" not in table


# -- a real training, clipping, export, int8 build and evaluation, looked at in Chromium -----------------
@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """CHEAP_EVAL run once for the module: (run folder, run.json)."""
    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    use_real_config(mp, root)
    from engine.cli.commands import main

    assert main(["run", *CHEAP_EVAL]) == 0
    run_dir = (root / "runs" / "latest").resolve()
    yield run_dir, json.loads((run_dir / "run.json").read_text())
    mp.undo()


@pytest.fixture(scope="module")
def shown(evaluated_run, tmp_path_factory):
    """The report copied alone into an empty folder (self-contained), opened in Chromium: what the page
    shows, the requests it made, the problems the browser logged, and a screenshot."""
    run_dir, _ = evaluated_run
    where = tmp_path_factory.mktemp("alone")
    page_file = where / REPORT_HTML
    shutil.copyfile(run_dir / REPORT_HTML, page_file)
    with Browser(where / "profile") as browser:
        page = browser.open(page_file)
        seen = page.evaluate(SHOWN)
        seen.update(requests=page.requests, problems=page.problems, screenshot=page.screenshot(where / "report.png"))
    return seen


def predictions(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "stages" / "eval" / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_report_in_chromium_loads_every_image_and_nothing_from_the_network(evaluated_run, shown):
    run_dir, run = evaluated_run
    alts = [i["alt"] for i in shown["images"]]
    backends = ["pytorch", "onnx", "rknn"]
    expected = ["loss and accuracy per epoch (train)", "weight range per layer before and after clipping (clip)",
                "per-layer cosine along the network (rknn)"]  # the rknn_quantize section (accuracy_analysis)
    for b in backends:
        expected += [f"confusion matrix of {b}", f"misclassified by {b}"]
    assert [a for a in alts if "disagrees" not in a] == [*expected, "t-SNE of the test features by class"]
    assert all(i["width"] > 0 and i["height"] > 0 for i in shown["images"]), shown["images"]
    # nothing but the page itself and its embedded images was requested; no CSP or network complaint
    assert shown["requests"] and {u.split(":", 1)[0] for u in shown["requests"]} <= {"file", "data"}, shown["requests"]
    assert shown["problems"] == []
    assert_picture(shown["screenshot"].read_bytes(), max_side=40000)


@pytest.mark.slow
def test_a_page_that_reaches_out_is_caught(tmp_path):
    """The check above can fail: a page without the CSP that loads an image from a host is seen doing so."""
    page_file = tmp_path / "leaky.html"
    page_file.write_text('<!DOCTYPE html><html><body><img src="https://cdn.example.com/x.png"></body></html>')
    with Browser(tmp_path / "profile") as browser:
        page = browser.open(page_file)
        assert "https://cdn.example.com/x.png" in page.requests
        assert any("ERR_NAME_NOT_RESOLVED" in p for p in page.problems)
        assert page.evaluate("document.images[0].naturalWidth") == 0


@pytest.mark.slow
def test_report_numbers_equal_run_json_and_the_stage_outputs(evaluated_run, shown):
    run_dir, run = evaluated_run
    stages = run["stages"]
    text = words(shown["text"])
    top1 = stages["eval"]["metrics"]["top1"]
    assert {b["name"]: b["top1"] for b in shown["backends"]} == top1
    for b in shown["backends"]:
        assert b["cells"][3] == f"{top1[b['name']]:.2%}"
    assert f"test_acc {stages['train']['metrics']['test_acc']:.4g}" in text
    counts = json.loads((run_dir / "stages" / "data" / "class_counts.json").read_text())
    assert f"7 {counts['train']['7']} {counts['val']['7']} {counts['test']['7']} {counts['total']['7']}" in text
    # the one int8 backend is the best int8; its size is model.rknn's
    rows = {b["name"]: b for b in shown["backends"]}
    assert [n for n, b in rows.items() if b["best"]] == ["rknn"] and "best int8" in rows["rknn"]["cells"][0]
    assert rows["rknn"]["cells"][7] == f"{(run_dir / 'stages' / 'rknn' / 'model.rknn').stat().st_size / 1e6:.2f} MB"
    assert rows["onnx"]["cells"][7] == f"{(run_dir / 'stages' / 'onnx' / 'model.onnx').stat().st_size / 1e6:.2f} MB"
    # the parameter count, read from model.pt without torch, is torch's
    from stages.common.models import load_model

    module = load_model(run_dir / "stages" / "train" / "model.pt")
    assert shown["parameters"] == f"{sum(p.numel() for p in module.parameters()):,}"
    # the image grids hold the images the predictions say
    pred = predictions(run_dir)
    labels = pred["labels"]
    n = len(labels)
    for b in ("pytorch", "onnx", "rknn"):
        wrong = int((pred[f"{b}.pred"] != labels).sum())
        assert any(t.startswith(f"{wrong} of {n} test images misclassified by {b}") for t in shown["titles"]), b
    disagree = int((pred["rknn.pred"] != pred["pytorch.pred"]).sum())
    assert f"{disagree} test images where rknn and pytorch disagree" in text
    # the clip table shows clip_report.json's ranges, and clipping changed some
    layers = json.loads((run_dir / "stages" / "clip" / "clip_report.json").read_text())["layers"]
    assert any(r["max_after"] < r["max_before"] for r in layers)
    # the summary: input spec, package paths, the values changed from the defaults
    assert "input size (H x W): 16 x 16" in text and "mean (0..1): [0.5, 0.5, 0.5]" in text
    assert "board onnxruntime" in text and str(run_dir / "stages" / "package" / "package.zip") in text
    assert "train.epochs 10 2" in text and "clip.method none percentile" in text and "clip.percentile - 99.5" in text


@pytest.mark.slow
def test_pictures_are_valid_sized_and_not_blank(evaluated_run):
    run_dir, _ = evaluated_run
    pngs = embedded_pngs(HtmlPage((run_dir / REPORT_HTML).read_text(encoding="utf-8")))
    assert len(pngs) >= 9
    for png in pngs:
        assert_picture(png)


@pytest.mark.slow
def test_tsne_is_seeded_and_coloured_by_class(evaluated_run):
    from engine.contract.figures import tsne_png

    run_dir, _ = evaluated_run
    with np.load(run_dir / "stages" / "eval" / "features.npz") as z:
        features, labels = z["features"], z["labels"]
    classes = [str(i) for i in range(10)]
    first = tsne_png(features, labels, classes, seed=0)
    assert tsne_png(features, labels, classes, seed=0) == first  # the same run draws the same picture
    assert_picture(first)
    with Image.open(io.BytesIO(first)) as im:
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20) or []}
    from matplotlib import colormaps

    tab10 = {tuple(round(255 * v) for v in colormaps["tab10"](i)[:3]) for i in range(10)}
    assert len(tab10 & colours) >= 8  # one colour per class present in the scatter


@pytest.mark.slow
def test_report_costs_no_recomputation_and_draws_nothing_again(evaluated_run):
    run_dir, run = evaluated_run
    metrics = json.loads((run_dir / "stages" / "train" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    page = HtmlPage((run_dir / REPORT_HTML).read_text(encoding="utf-8"))
    assert f"best_epoch {metrics['best_epoch']}" in words(" ".join(page.text))
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("*") if p.is_file()}
    before = (run_dir / REPORT_HTML).read_bytes()
    # a fresh process: every picture, the evaluate section and the config comparison come from the
    # scratch folder, so neither matplotlib, scikit-learn, hydra's compose, torch nor numpy is imported
    code = ("import sys; from engine.cli.commands import main; rc = main(['report', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('matplotlib', 'sklearn', 'torch', 'hydra', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "0 []", r.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no stage output touched
    assert (run_dir / REPORT_HTML).read_bytes() == before  # same inputs, same page
    assert json.loads((run_dir / "run.json").read_text()) == run


@pytest.mark.slow
def test_damaged_report_memos_are_computed_again(evaluated_run):
    """The sections and config changes kept as JSON under the scratch folder: a damaged one is
    read again from the stage outputs, never a failed report."""
    from engine.cli.commands import main

    run_dir, run = evaluated_run
    before = (run_dir / REPORT_HTML).read_bytes()
    kept = list((Path(run["runs_root"]) / "cache" / ".scratch" / "report").glob("*.json"))
    assert kept
    for path in kept:
        path.write_text('{"rows": [')
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / REPORT_HTML).read_bytes() == before
    assert all(json.loads(path.read_text()) is not None for path in kept if path.exists())


def test_multicrop_results_are_shown(tmp_path):
    """evaluate with multi-crop on a folder of wide images (as in test_evaluate), reported from a run
    folder whose record points at the stage outputs: the multi-crop table shows metrics.json's numbers."""
    from helpers_data import TOY_CLASSES as CLASSES
    from helpers_data import toy, toy_images

    from engine.report.page import write_html
    from engine.run.testing import run_stage
    from engine.store.runs import RunRecord, StageRecord

    t = toy()
    src = tmp_path / "images"
    imgs, labels = toy_images(48, seed=7, size=32)
    for i, (a, c) in enumerate(zip(imgs, labels)):
        (src / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([a, a[:, ::-1]], axis=1)).save(src / CLASSES[c] / f"{i:03d}.png")
    pre = json.loads((t.data / "preprocess.json").read_text())
    run_stage("dataset", {"kind": "folder", "path": str(src), "classes": CLASSES, "preprocess": pre,
                          "split": {"val": 0.1, "test": 0.5}}, {}, tmp_path / "data")
    params = {"multicrop": {"enabled": True, "crops": 3, "root": str(src), "vote_threshold": 0.5}}
    run_stage("evaluate", params, {"data": tmp_path / "data", "model": t.model, "onnx": t.onnx}, tmp_path / "eval")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        "pipeline:\n  stages:\n    data: {uses: dataset}\n"
        "    eval: {uses: evaluate, needs: {data: data, model: model, onnx: onnx}}\n")
    record = RunRecord(name="multicrop", run_dir=str(run_dir), runs_root=str(tmp_path / "runs"), status="ok", stages={
        "data": StageRecord("data", "dataset", "ran", path=str(tmp_path / "data")),
        "eval": StageRecord("eval", "evaluate", "ran", path=str(tmp_path / "eval"))})
    html = write_html(record).read_text(encoding="utf-8")
    table = html[html.index('<table class="multicrop">'):]
    table = words(" ".join(HtmlPage(table[:table.index("</table>")]).text))
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name, row in report["backends"].items():
        mc = row["multicrop"]
        assert (f"{name} {mc['crops']} {row['top1']:.2%} {mc['top1_mean']:.2%} {mc['top1_vote']:.2%} "
                f"{mc['undecided']}") in table
    for png in embedded_pngs(HtmlPage(html)):
        assert_picture(png)


def test_int8_gate_is_shown_for_quantized_rows(bundles, tmp_path):
    """evaluate's int8 gate (the board tests' session RKNN build against its ONNX source), reported from a
    run folder whose record points at the stage output: images lost and gained, the net drop with its
    interval, one image in points, cosine and agreement with the splits they cover, the verdict, and in
    words that this small split cannot resolve the target."""
    from engine.report.page import REPORT_HTML
    from engine.report.run_report import write_report
    from engine.run.testing import run_stage
    from engine.store.runs import RunRecord, StageRecord

    run_stage("evaluate", {}, {"data": bundles["data"], "onnx": bundles["onnx"], "rknn": bundles["rknn_rv1103"]},
              tmp_path / "eval")
    row = json.loads((tmp_path / "eval" / "metrics.json").read_text())["backends"]["rknn"]
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        "pipeline:\n  stages:\n    eval: {uses: evaluate, needs: {onnx: onnx, rknn: rknn}}\n")
    record = RunRecord(name="gate", run_dir=str(run_dir), runs_root=str(tmp_path / "runs"), status="ok", stages={
        "eval": StageRecord("eval", "evaluate", "ran", path=str(tmp_path / "eval"))})
    write_report(record)
    html = (run_dir / REPORT_HTML).read_text(encoding="utf-8")
    assert '<table class="gate">' in html, "no int8 gate table"
    table = html[html.index('<table class="gate">'):]
    table = words(" ".join(HtmlPage(table[:table.index("</table>")]).text))
    lo, hi = row["drop_ci95"]
    verdict = "holds" if row["target_met"] else "misses"
    assert (f"rknn {row['lost_images']} {row['gained_images']} {row['drop_points']:+.2f} {lo:+.2f} to {hi:+.2f} "
            f"{row['resolution_points']:.3g} {row['allowed_images']} {row['logit_cosine']:.4f} {row['agreement']:.2%} "
            f"{' + '.join(row['label_free_splits'])} ({row['label_free_images']} images) {verdict} : "
            f"{row['verdict']}") in table, table
    assert row["label_free_splits"] == ["val", "test"]  # rknn_quantize stores the simulator's val logits too
    n = row["samples"]
    assert n < 100 and row["resolved"] is False  # a small split: one image is more than the 1-point target
    assert words(f"rknn: the test split cannot resolve the 1-point target: one image = {100 / n:.3g} points > 1") \
        in words(" ".join(HtmlPage(html).text))
    # report.md: the verdict of every int8 row, held or missed (a miss is also under "Targets missed")
    md = (run_dir / "report.md").read_text()
    assert f"## int8 builds against fp32\n\n- eval: **rknn** {verdict}: {row['verdict']}\n" in md, md


# -- edgepipe dag --format png|svg ---------------------------------------------------------------------
def test_dag_png_and_svg_with_graphviz(ws, tmp_path):
    assert shutil.which("dot"), ("Graphviz's dot is missing: apt-get install graphviz "
                                 "(make test installs it: scripts/system-deps.sh)")
    r = ws.cli("dag", "--format", "png", "-o", str(tmp_path / "dag.png"))
    assert r.rc == 0, r.err
    assert r.out.strip() == str(tmp_path / "dag.png")
    assert_picture((tmp_path / "dag.png").read_bytes(), min_side=50)
    r = ws.cli("dag", "--format=svg", "--output", str(tmp_path / "dag.svg"))
    assert r.rc == 0, r.err
    svg = ET.parse(tmp_path / "dag.svg").getroot()
    texts = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {"src", "scale", "quant", "total"} <= texts  # every stage is drawn
    assert ws.cli("dag").out.startswith("flowchart LR")  # Mermaid stays the default
    r = ws.cli("dag", "--format", "dot", "-o", str(tmp_path / "dag.dot"))
    assert r.rc == 0 and (tmp_path / "dag.dot").read_text().startswith("digraph pipeline {")


def test_dag_png_without_graphviz_says_how_to_install(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = ws.cli("dag", "--format", "png", "-o", str(tmp_path / "dag.png"))
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1
    assert "apt-get install graphviz" in r.err and not (tmp_path / "dag.png").exists()
    r = ws.cli("dag", "--format", "jpeg")
    assert r.rc == 2 and "--format takes mermaid, dot, png or svg" in r.err


def test_parameter_count_reads_no_code_from_model_pt(tmp_path):
    """model.pt's pickle is read by an unpickler that builds shapes only: a file whose pickle would call
    os.system gives no parameter count, and the command never runs."""
    import pickle
    import zipfile

    from engine.report.summary import model_facts

    marker = tmp_path / "MARKER"
    bad = tmp_path / "model.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("model/data.pkl", pickle.dumps({"format": "edgepipe.model/1",
                                                   "state_dict": CodeRunningPickle(marker)}))
    assert model_facts(bad) is None and not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    assert model_facts(tmp_path / "junk.pt") is None
