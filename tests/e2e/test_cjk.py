"""Chinese class names (有鸟 / 无鸟) in every picture of the report and on the page: a real run on two
class folders draws its confusion matrices, image grids and t-SNE legend without one missing-glyph
warning, Chromium shows the characters in report.html, Pillow's captions use the same CJK font, the
log says so when no CJK font is installed, and a memoised picture is drawn again when the installed
fonts change. The run, the page and the captions need a CJK font (Debian: fonts-noto-cjk, installed with
the other system packages): without one they skip, or fail where $CI is set; the others run anyway."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers_browser import Browser
from helpers_data import make_folder_dataset
from helpers_project import use_real_config
from helpers_require import require_cjk_font
from PIL import Image

from engine.contract import figures as figs

CLASSES = ("有鸟", "无鸟")
RUN = ["pipeline=train", "dataset=folder", "preprocess.input_size=16", "train=tiny", "train.epochs=1",
       "train.limit_train_batches=2", "model.stem=small", "dataset.split.test=0.5",
       "+pipeline.stages.onnx={uses:export_onnx,needs:{model:train}}",
       "+pipeline.stages.eval={uses:evaluate,needs:{data:data,pytorch:train,onnx:onnx}}"]
# where each class name's text lies in the per-class table (CSS pixels), read in the browser
CELLS = """Array.from(document.querySelectorAll("table.per-class td:first-child"), td => {
  const r = document.createRange(); r.selectNodeContents(td); const b = r.getBoundingClientRect();
  return {text: td.textContent, x: b.x + scrollX, y: b.y + scrollY, w: b.width, h: b.height};
})"""
# the same text size in a code point no font has: what tofu looks like on this page
TOFU = """(() => { const td = document.querySelector("table.per-class td:first-child");
  const s = document.createElement("span"); s.textContent = "\\u{10FFFD}\\u{10FFFD}";
  s.style.fontSize = getComputedStyle(td).fontSize; document.body.appendChild(s);
  const b = s.getBoundingClientRect(); return {x: b.x + scrollX, y: b.y + scrollY, w: b.width, h: b.height}; })()"""


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory):
    """A run on 有鸟 / 无鸟 folders, with Python's warnings always shown (matplotlib's missing-glyph
    warning would otherwise show once per process) and, through the CLI's logging, in edgepipe.log."""
    require_cjk_font()
    from engine.cli.commands import main

    root = tmp_path_factory.mktemp("cjk")
    data = make_folder_dataset(root / "birds", classes=CLASSES, per_class=12, size=24)
    mp = pytest.MonkeyPatch()
    use_real_config(mp, root)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        rc = main(["run", *RUN, f"dataset.path={data}"])
    run_dir = (root / "runs" / "latest").resolve()
    yield rc, run_dir, root
    mp.undo()


def test_a_run_draws_chinese_class_names_without_a_missing_glyph(chinese_run):
    rc, run_dir, _ = chinese_run
    assert rc == 0
    classes = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text(encoding="utf-8"))["classes"]
    assert sorted(classes) == sorted(CLASSES)
    log = (run_dir / "edgepipe.log").read_text(encoding="utf-8")
    assert "missing from font" not in log and "no font with Chinese" not in log
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png") >= 4  # curves, two confusion matrices, t-SNE (grids: misclassified only)


def test_report_html_shows_the_characters_in_chromium(chinese_run, tmp_path):
    """The per-class table's class names, screenshotted: the two names look different from each other
    (two pairs of tofu boxes would be the same picture), and different from tofu drawn in the same
    place; the page asks for a CJK font by name."""
    _, run_dir, _ = chinese_run
    page_text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert '"Noto Sans CJK SC"' in page_text and '"Microsoft YaHei"' in page_text
    with Browser(tmp_path / "profile") as browser:
        page = browser.open(run_dir / "report.html")
        cells = page.evaluate(CELLS)
        tofu = page.evaluate(TOFU)  # at the end of the page: the cells stay where they were
        shot = np.asarray(Image.open(page.screenshot(tmp_path / "page.png")).convert("L"), np.float32)
    names = {c["text"]: c for c in cells if c["text"] in CLASSES}
    assert set(names) == set(CLASSES), cells

    def crop(r: dict) -> np.ndarray:
        x, y = int(round(r["x"])), int(round(r["y"]))
        part = shot[y:y + int(r["h"]), x:x + int(r["w"])]
        assert part.size and (part < 128).mean() > 0.03, r  # ink there
        return np.asarray(Image.fromarray(part).resize((48, 24)), np.float32) / 255

    you, wu, box = crop(names["有鸟"]), crop(names["无鸟"]), crop(tofu)
    assert np.abs(you - wu).mean() > 0.03  # 有 is not 无
    assert min(np.abs(you - box).mean(), np.abs(wu - box).mean()) > 0.03


def test_grid_captions_use_the_cjk_font():
    """Pillow's captions: 有鸟 and 无鸟 give different pixels (the default bitmap font drew the same boxes)."""
    require_cjk_font()
    pixels = np.full((2, 32, 32, 3), 200, np.uint8)
    a = np.asarray(Image.open(io.BytesIO(figs.grid_png(pixels, ["true 有鸟", "true 无鸟"]))).convert("L")).astype(int)
    left, right = a[104:, 8:8 + 96], a[104:, 8 + 104:8 + 104 + 96]  # the two captions, under their 96-px cells
    assert (left < 128).sum() > 20 and (right < 128).sum() > 20
    assert (np.abs(left - right) > 64).sum() > 20


def test_no_cjk_font_is_one_note_in_the_log(monkeypatch, caplog):
    monkeypatch.setattr(figs, "cjk_font", lambda: None)
    monkeypatch.setattr(figs, "_noted", [])
    with caplog.at_level(logging.WARNING, logger="edgepipe.report"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib's own per-glyph warnings: the note is ours
        figs.confusion_png(np.eye(2, dtype=int), ["cat", "dog"], "ascii only")
        assert not caplog.records
        figs.confusion_png(np.eye(2, dtype=int), list(CLASSES), "t")
        figs.tsne_png(np.random.default_rng(0).random((12, 4)), np.arange(12) % 2, list(CLASSES))
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "apt-get install fonts-noto-cjk" in notes[0], notes


def test_memoised_pictures_are_drawn_again_when_the_fonts_change(tmp_path, monkeypatch):
    drawn = []

    def render() -> bytes:
        drawn.append(1)
        return b"png"

    monkeypatch.setattr(figs, "fonts_shown", lambda: "no CJK font")
    figs.memo_png(tmp_path, ("grid", 1, list(CLASSES)), render)
    figs.memo_png(tmp_path, ("grid", 1, list(CLASSES)), render)
    assert len(drawn) == 1
    monkeypatch.setattr(figs, "fonts_shown", lambda: "Noto Sans CJK installed")
    figs.memo_png(tmp_path, ("grid", 1, list(CLASSES)), render)
    assert len(drawn) == 2


def test_fonts_shown_changes_with_an_installed_font(tmp_path, monkeypatch):
    """The memo key reads the font folders (no matplotlib): a font file added there changes it."""
    monkeypatch.setattr(figs, "FONT_DIRS", (str(tmp_path),))
    figs.fonts_shown.cache_clear()
    try:
        before = figs.fonts_shown()
        Path(tmp_path, "NotoSansCJK-Regular.ttc").write_bytes(b"\0" * 10)
        figs.fonts_shown.cache_clear()
        assert figs.fonts_shown() != before
    finally:
        figs.fonts_shown.cache_clear()
