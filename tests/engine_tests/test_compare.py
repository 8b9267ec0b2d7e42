"""`edgepipe compare`: one row per job of a real (cheap-stage) sweep, best first, only the overrides that
differ, readable at 100 columns; compare.csv/.md/.html written; `write_sweep_comparison` for a sweep's end."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest
from helpers_browser import assert_picture

from engine.report.compare import lower_is_better, write_sweep_comparison


@pytest.fixture
def sweep(ws) -> Path:
    """Three jobs: scale.factor swept, src.value the same in every job (total.sum = 21 + 5 * 4 * factor... by
    the engine's cheap stages: the headline grows with the factor)."""
    r = ws.cli("run", "-m", "scale.factor=1,3,2", "src.value=4")
    assert r.rc == 0, r.err
    (found,) = [p for p in ws.runs.glob("*/*") if p.is_dir() and p.name.endswith("_sweep")]
    return found


def headline(run_dir: Path) -> float:
    return json.loads((run_dir / "run.json").read_text())["headline"]["value"]


def test_sweep_rows_best_first_with_only_the_differing_override(ws, sweep):
    r = ws.cli("compare", str(sweep), "--width", "100")
    assert r.rc == 0, r.err
    with open(sweep / "compare.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["job", "scale.factor", "total.sum", "seconds"]  # src.value=4 is every job's: no column
    values = {job: headline(sweep / job) for job in ("0", "1", "2")}  # factor 1, 3, 2
    assert [row[0] for row in rows[1:]] == sorted(values, key=values.get, reverse=True) == ["1", "2", "0"]
    assert [row[1] for row in rows[1:]] == ["3", "2", "1"]
    assert [float(row[2]) for row in rows[1:]] == sorted(values.values(), reverse=True)
    # the terminal table: 100 columns, nothing cut, no shared override
    lines = r.out.splitlines()
    table = lines[:lines.index(next(line for line in lines if line.startswith("wrote ")))]
    assert sum(line.startswith("│") for line in table) == 3  # one table, a line per job
    assert max(len(line) for line in table) <= 100 and "…" not in r.out
    assert "scale.factor" in r.out and "src.value" not in r.out
    assert [line.split("│")[1].strip() for line in lines if line.startswith("│")] == ["1", "2", "0"]
    md = (sweep / "compare.md").read_text().splitlines()
    assert md[0] == "| job | scale.factor | total.sum | seconds |" and md[2].startswith("| 1 | 3 | ")


def test_compare_html_is_self_contained_with_a_plot_per_swept_parameter(ws, sweep):
    assert ws.cli("compare", str(sweep)).rc == 0
    page = (sweep / "compare.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Content-Security-Policy" in page
    prefix = 'src="data:image/png;base64,'
    assert page.count(prefix) == 1
    png = base64.b64decode(page.split(prefix, 1)[1].split('"', 1)[0])
    assert_picture(png)


def test_write_sweep_comparison_is_the_sweep_end_hook(sweep):
    for name in ("compare.csv", "compare.md", "compare.html"):
        (sweep / name).unlink(missing_ok=True)
    path = write_sweep_comparison(sweep)
    assert path == sweep / "compare.html" and path.is_file()
    assert (sweep / "compare.csv").read_text().splitlines()[0] == "job,scale.factor,total.sum,seconds"


def test_run_folders_and_chosen_metrics(ws, tmp_path):
    assert ws.cli("run", "quant.factor=7").rc == 0
    first = (ws.runs / "latest").resolve()
    assert ws.cli("run", "quant.factor=7", "scale.factor=3").rc == 0
    second = (ws.runs / "latest").resolve()
    r = ws.cli("compare", str(first), str(second), "--metrics", "value,seconds", "--out", str(tmp_path / "out"))
    assert r.rc == 0, r.err
    with open(tmp_path / "out" / "compare.csv", newline="") as f:
        rows = list(csv.reader(f))
    # quant.factor=7 is both runs': only scale.factor (absent in the first: its default) differs
    assert rows[0][:3] == ["job", "scale.factor", "total.sum"] and "quant.factor" not in rows[0]
    assert [row[0] for row in rows[1:]] == [second.name, first.name] and rows[1][1] == "3" and rows[2][1] == "-"
    # `value` names every stage's `value` metric: one column each, in stage order
    run = json.loads((second / "run.json").read_text())
    valued = [f"{s}.value" for s, rec in run["stages"].items() if "value" in rec["metrics"]]
    assert valued and rows[0][3:] == [*valued, "seconds"]
    # too many columns for the width: the metrics go on in further tables, each with the job and the
    # differing override again; nothing is cut or wrapped
    r = ws.cli("compare", str(first), str(second), "--metrics", "value,seconds", "--out", str(tmp_path / "out"),
               "--width", "60")
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    titles = [line for line in lines if line.startswith("2 jobs, best total.sum first")]
    assert len(titles) > 1 and all(len(line) <= 60 for line in lines if not line.startswith("wrote "))
    assert "…" not in r.out and sum(second.name in line for line in lines) == len(titles)
    shown = " ".join(lines)
    assert all(v.split(".")[1] in shown for v in valued) and "seconds" in shown


def test_unknown_metric_or_empty_folder_is_one_line(ws, sweep, tmp_path):
    r = ws.cli("compare", str(sweep), "--metrics", "top5")
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1
    assert "--metrics top5: no job has that metric; known:" in r.err and "sum" in r.err
    (tmp_path / "empty").mkdir()
    r = ws.cli("compare", str(tmp_path / "empty"))
    assert r.rc == 2 and "holds no run.json" in r.err
    assert not (tmp_path / "empty" / "compare.csv").exists()


def test_which_headlines_are_better_low():
    assert lower_is_better("train.val_loss") and lower_is_better("eval.drop_points.rknn_mmse")
    assert lower_is_better("seconds")
    assert not lower_is_better("eval.top1.rknn_mmse") and not lower_is_better("train.test_acc")


def test_headline_direction_minimize_puts_the_smallest_first(ws):
    r = ws.cli("run", "-m", "scale.factor=1,3,2", "+pipeline.headline_direction=minimize")
    assert r.rc == 0, r.err
    (sweep,) = [p for p in ws.runs.glob("*/*") if p.is_dir() and p.name.endswith("_sweep")]
    assert ws.cli("compare", str(sweep)).rc == 0
    with open(sweep / "compare.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [row[1] for row in rows[1:]] == ["1", "2", "3"]  # total.sum grows with the factor
