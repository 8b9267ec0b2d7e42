"""report.html: written by every run beside report.md, rewritten by `edgepipe report RUN`, and looked at
as a person would: opened in headless Chromium (Debian's chromium; .ci/run installs it) with every
host name unresolvable, every image loaded, and the numbers shown equal to run.json's."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.report_html import REPORT_HTML

# the digits data at 16 px, two short epochs, ONNX export and evaluation of both backends: seconds
CHEAP_EVAL = ["pipeline=train", "dataset=digits", "preprocess.input_size=16", "train=tiny", "train.epochs=2",
              "train.limit_train_batches=4", "model.stem=small",
              "+pipeline.stages.onnx={uses:export_onnx,needs:{model:train}}",
              "+pipeline.stages.eval={uses:evaluate,needs:{data:data,pytorch:train,onnx:onnx}}"]
# after load, each image's natural width goes into an attribute that --dump-dom shows
PROBE = ('<script>window.addEventListener("load", () => { for (const i of document.images) '
         '{ i.dataset.naturalWidth = i.naturalWidth; } document.body.dataset.loaded = "yes"; });</script>')


class Page(HTMLParser):
    """The images, the top-1 cells of the backends table and the visible text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.top1: dict[str, tuple[str, str]] = {}  # backend -> (data-value, text shown)
        self.body: dict = {}
        self.text: list[str] = []
        self._backend: str | None = None
        self._cell: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "tr":
            self._backend = a.get("data-backend")
        elif tag == "td" and "top1" in (a.get("class") or "").split():
            self._cell = {"value": a.get("data-value"), "text": ""}

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.top1[self._backend] = (self._cell["value"], self._cell["text"].strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def assert_picture(data: bytes, min_side: int = 100) -> None:
    """A valid PNG of a sensible size that is not blank."""
    px = png_pixels(data)
    assert min(px.shape) >= min_side and max(px.shape) <= 4000, px.shape
    assert px.var() > 100.0, px.var()  # a white page with a few grey lines stays far below this


def embedded_pngs(page: Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert page.images and all(img["src"].startswith(prefix) for img in page.images)
    return [base64.b64decode(img["src"][len(prefix):]) for img in page.images]


def chromium(*args: str, cwd: Path) -> str:
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: apt-get install chromium (.ci/run installs it)"
    # no host name resolves: a page that needed the network would show broken images
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={cwd / 'chromium-profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def open_in_browser(report: Path, where: Path) -> Page:
    """The report alone in an empty folder (self-contained), as Chromium shows it after load."""
    where.mkdir()
    probe = where / "report.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    page = Page(chromium("--dump-dom", probe.as_uri(), cwd=where))
    assert page.body.get("data-loaded") == "yes", "the page never finished loading"
    return page


# -- every run, on the engine's cheap stages ----------------------------------------------------------
def test_every_run_writes_report_html_and_report_rewrites_it(ws, tmp_path):
    assert ws.cli("run", "src.value=4").rc == 0
    run_dir = (ws.runs / "latest").resolve()
    html = (run_dir / REPORT_HTML).read_text(encoding="utf-8")
    run = ws.latest()
    text = " ".join(Page(html).text)
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


# -- a real training and evaluation, looked at in Chromium --------------------------------------------
@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """pipeline=train plus ONNX export and evaluation of PyTorch and ONNX Runtime, once for the module."""
    from conftest import REPO

    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPIPE_RUNS", str(root / "runs"))
    mp.setenv("EDGEPIPE_CONFIG_DIR", str(REPO / "conf"))
    mp.delenv("EDGEPIPE_PLUGINS", raising=False)
    mp.chdir(root)
    from engine.cli import main

    assert main(["run", *CHEAP_EVAL]) == 0
    run_dir = (root / "runs" / "latest").resolve()
    yield run_dir, json.loads((run_dir / "run.json").read_text())
    mp.undo()


@pytest.mark.slow
def test_report_in_chromium_shows_curves_backends_and_confusion(evaluated_run, tmp_path):
    run_dir, run = evaluated_run
    page = open_in_browser(run_dir / REPORT_HTML, tmp_path / "alone")
    # every image loaded from the page itself: curves + one confusion matrix per backend
    widths = [int(img.get("data-natural-width", 0)) for img in page.images]
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    assert [img["alt"] for img in page.images] == ["loss and accuracy per epoch (train)",
                                                   "confusion matrix of pytorch", "confusion matrix of onnx"]
    for png in embedded_pngs(page):
        assert_picture(png)
    # the numbers shown are run.json's
    top1 = run["stages"]["eval"]["metrics"]["top1"]
    assert set(page.top1) == {"pytorch", "onnx"}
    for backend, (value, shown) in page.top1.items():
        assert float(value) == top1[backend] and shown == f"{top1[backend]:.2%}"
    text = " ".join(" ".join(page.text).split())
    assert f"test_acc {run['stages']['train']['metrics']['test_acc']:.4g}" in text
    assert "pass (agreement 100%" in text  # ONNX Runtime meets its target
    counts = json.loads((run_dir / "stages" / "data" / "class_counts.json").read_text())
    assert f"7 {counts['train']['7']} {counts['val']['7']} {counts['test']['7']} {counts['total']['7']}" in text
    # a screenshot as a person sees it, kept in the test's folder
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", (tmp_path / "alone" / "report.html").as_uri(),
             cwd=tmp_path)
    assert_picture(shot.read_bytes())


@pytest.mark.slow
def test_curves_mark_the_best_epoch_and_report_costs_no_recomputation(evaluated_run, capsys):
    run_dir, run = evaluated_run
    metrics = json.loads((run_dir / "stages" / "train" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    page = Page((run_dir / REPORT_HTML).read_text(encoding="utf-8"))
    assert f"best_epoch {metrics['best_epoch']}" in " ".join(" ".join(page.text).split())
    from engine.cli import main

    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("*") if p.is_file()}
    before = (run_dir / REPORT_HTML).read_bytes()
    assert main(["report", str(run_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no stage output touched
    assert (run_dir / REPORT_HTML).read_bytes() == before  # same inputs, same page
    assert json.loads((run_dir / "run.json").read_text()) == run
