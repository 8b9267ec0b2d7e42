"""`edgepipe compare`: one row per job of a sweep (or per run folder named), best first.

Columns are only what tells the jobs apart: the overrides whose values differ between them, the
headline and the metrics asked for (`--metrics top1,drop_points,seconds`). The same table is printed
(rich, fits 100 columns) and written as compare.csv, compare.md and compare.html, the last with the
headline plotted against each swept parameter. `write_sweep_comparison(sweep_dir)` is what a sweep
calls when it ends. Reads run.json only; never imports torch.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import CompareError as CompareError  # re-exported: raised here
from engine.store.runs import RUN_JSON, RunRecord, flat_metrics, resolve_run

DEFAULT_METRICS = ("seconds",)
OUTPUTS = ("compare.csv", "compare.md", "compare.html")
MISSING = "-"


@dataclass
class Job:
    label: str  # the sweep's job number or the run folder's name
    record: RunRecord
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # flattened: "<stage>.<metric>[.<backend>]", "seconds"
    direction: str | None = None  # the pipeline's headline_direction when its config sets one

    @property
    def headline(self) -> Any:
        return (self.record.headline or {}).get("value")


@dataclass
class Comparison:
    jobs: list[Job]  # best first
    swept: list[str]  # override keys whose values differ between the jobs
    headline: str | None  # the headline key (from the first job that has one)
    metric_keys: list[str]  # flattened metric keys shown, in --metrics order
    lower_is_better: bool

    def header(self) -> list[str]:
        return ["job", *self.swept, *([self.headline] if self.headline else []), *self.metric_keys]

    def rows(self) -> list[list[str]]:
        return [[j.label, *(j.overrides.get(k, MISSING) for k in self.swept),
                 *([show(j.headline)] if self.headline else []),
                 *(show(j.metrics.get(k)) for k in self.metric_keys)] for j in self.jobs]


# -- reading ------------------------------------------------------------------------------------------
def run_folders(refs: Sequence[str], runs_root: Path) -> list[tuple[str, Path]]:
    """(label, run folder) for each argument: a sweep folder gives its jobs (the folders under it holding
    run.json, labelled by their path in it: the job number), anything else is resolved like `edgepipe
    show` does."""
    found: list[tuple[str, Path]] = []
    for ref in refs:
        p = Path(ref)
        if p.is_dir() and not (p / RUN_JSON).is_file():
            jobs = sweep_jobs(p)
            if not jobs:
                raise CompareError(f"{p} holds no run.json and no job folders with one; "
                                   f"pass a sweep folder (runs/<date>/<time>_<name>_sweep) or run folders")
            found += [(label if len(refs) == 1 else f"{p.name}/{label}", d) for label, d in jobs]
        else:
            run_dir = Path(resolve_run(runs_root, ref))
            found.append((run_dir.name, run_dir))
    return found


def sweep_jobs(sweep_dir: Path) -> list[tuple[str, Path]]:
    """Job folders under a sweep folder, at any depth (launchers differ), in job-number order; a job's
    own stages/, failed/ and .hydra/ are not searched (and links are not followed)."""
    jobs = []
    for folder, dirs, files in os.walk(sweep_dir):
        if RUN_JSON in files:
            jobs.append((Path(folder).relative_to(sweep_dir).as_posix(), Path(folder)))
            dirs.clear()
    return sorted(jobs, key=lambda j: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in j[0].split("/")])


def load_jobs(folders: Iterable[tuple[str, Path]]) -> list[Job]:
    jobs = []
    for label, run_dir in folders:
        record = RunRecord.load(run_dir)
        metrics = {f"{s}.{k}": v for s, rec in record.stages.items() for k, v in flat_metrics(rec.metrics).items()}
        metrics["seconds"] = record.seconds
        jobs.append(Job(label, record, parse_overrides(record.overrides), metrics, headline_direction(run_dir)))
    return jobs


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """`+experiment=quickstart`, `train.lr=1e-3`, `~key` -> {key: value}; '+'/'++' do not change what differs."""
    out = {}
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.lstrip("+")
        out[key] = value if eq else "(deleted)" if key.startswith("~") else ""
    return out


# -- comparing ----------------------------------------------------------------------------------------
def compare(jobs: list[Job], metrics: Sequence[str] = DEFAULT_METRICS) -> Comparison:
    if not jobs:
        raise CompareError("nothing to compare: pass a sweep folder or run folders")
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k, MISSING) for j in jobs}) > 1]
    headline = next((j.record.headline["key"] for j in jobs if j.record.headline), None)
    direction = next((j.direction for j in jobs if j.direction), None)
    lower = direction == "minimize" if direction else headline is not None and lower_is_better(headline)
    metric_keys = [k for m in metrics for k in matching(m, jobs) if k != headline]
    ordered = sorted(jobs, key=lambda j: _rank(j, lower))
    return Comparison(ordered, swept, headline, list(dict.fromkeys(metric_keys)), lower)


def headline_direction(run_dir: Path) -> str | None:
    """`pipeline.headline_direction` (maximize/minimize, what an Optuna sweep optimises) when the run's
    .hydra/config.yaml sets it; None otherwise."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml"),
                                 "pipeline.headline_direction")
    except Exception:  # noqa: BLE001 - no or an unreadable .hydra/: the headline's name decides
        return None
    return str(value) if value in ("maximize", "minimize") else None


def lower_is_better(key: str) -> bool:
    """Without a headline_direction: `train.val_loss`, `eval.drop_points.rknn`, `seconds`: smaller is
    better; top-1 and accuracies are not."""
    parts = key.split(".")
    metric = parts[1] if len(parts) > 1 else parts[0]
    return any(w in metric for w in ("loss", "drop", "error")) or metric.endswith(("seconds", "_s", "_ms"))


def matching(metric: str, jobs: list[Job]) -> list[str]:
    """The flattened keys a --metrics name stands for: itself (`seconds`, `eval.top1.onnx`), or every
    `<stage>.<metric>` and `<stage>.<metric>.<backend>` (`top1` -> eval.top1.pytorch, eval.top1.onnx)."""
    every = list(dict.fromkeys(k for j in jobs for k in j.metrics))
    if metric in every:
        return [metric]
    found = [k for k in every if metric in k.split(".")[1:2] or k.startswith(metric + ".")]
    if not found:
        known = sorted({k.split(".")[1] for k in every if "." in k})
        raise CompareError(f"--metrics {metric}: no job has that metric; known: {', '.join(known + ['seconds'])}")
    return found


def _rank(job: Job, lower: bool) -> tuple:
    """Failed jobs and jobs without a headline last; then by headline, best first; ties by job order."""
    v = job.headline
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return (1, 0.0)
    return (0, v if lower else -v)


def show(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# -- output -------------------------------------------------------------------------------------------
def rich_tables(c: Comparison, width: int) -> list:
    """The terminal tables: values never wrap or get cut (a number cut in two is misread); headers are
    shortened (`eval.top1.rknn_mmse` -> `top1` over `rknn_mmse`) and wrap at their line breaks. When the
    metrics do not fit `width` they go on in further tables, each repeating the job, the differing
    overrides and the headline."""
    from rich.table import Table

    from engine.report.display import safe  # run names, overrides, metrics: from run.json, shown as text

    header, rows = c.header(), c.rows()
    labels = short_headers(header, len(c.swept))
    need = [max([len(r[i]) for r in rows] + [max(len(w) for w in label.split("\n"))]) for i, label in enumerate(labels)]
    fixed = list(range(len(c.swept) + 1 + (1 if c.headline else 0)))
    chunks: list[list[int]] = [[]]
    used = sum(need[i] + 3 for i in fixed) + 1
    for i in range(len(fixed), len(header)):
        if chunks[-1] and used + need[i] + 3 > width:
            chunks.append([])
            used = sum(need[j] + 3 for j in fixed) + 1
        chunks[-1].append(i)
        used += need[i] + 3
    tables = []
    for n, chunk in enumerate(chunks):
        title = (f"{len(c.jobs)} jobs, best {c.headline or 'headline'} first "
                 f"({'lowest' if c.lower_is_better else 'highest'})"
                 + (f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else ""))
        table = Table(title=safe(title), title_justify="left")
        for i in fixed + chunk:
            table.add_column(safe(labels[i]), justify="right" if i > len(c.swept) else "left", no_wrap=True,
                             min_width=need[i])
        for row in rows:
            table.add_row(*(safe(row[i]) for i in fixed + chunk))
        tables.append(table)
    return tables


def short_headers(header: list[str], swept: int) -> list[str]:
    """Column labels for the terminal: overrides as `group.` over `key`, metrics without their stage
    (kept where two stages have the same metric) and the backend on a second line."""
    out = []
    metrics = header[swept + 1:]
    for i, key in enumerate(header):
        parts = key.split(".")
        if i == 0 or len(parts) == 1:
            out.append(key)
        elif i <= swept:  # long keys (`+pipeline.stages.eval.with.algorithm`) wrap before their last part
            out.append(key if len(key) <= 14 else ".".join(parts[:-1]) + ".\n" + parts[-1])
        else:
            rest = ".".join(parts[1:])
            clash = sum(1 for m in metrics if m.split(".", 1)[-1] == rest) > 1
            head = ".".join(parts[:2]) if clash else parts[1]
            out.append(head + ("\n" + ".".join(parts[2:]) if len(parts) > 2 else ""))
    return out


def write_outputs(c: Comparison, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in OUTPUTS]
    with open(paths[0], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(c.header())
        w.writerows(c.rows())
    paths[1].write_text(markdown(c), encoding="utf-8")
    paths[2].write_text(html_page(c), encoding="utf-8")
    return paths


def markdown(c: Comparison) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in c.header()) + " |",
             "|" + "|".join("---" if i <= len(c.swept) else "---:" for i in range(len(c.header()))) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in c.rows()]
    return "\n".join(lines) + "\n"


def html_page(c: Comparison) -> str:
    """A self-contained page: the table and the headline against each swept parameter (embedded PNG)."""
    from engine.contract.figures import png_uri
    from engine.report.page import CSP

    head = "".join(f"<th>{html.escape(h)}</th>" for h in c.header())
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>\n" for row in c.rows())
    plot = (f'<img alt="{html.escape(c.headline)} against each swept parameter" src="{png_uri(sweep_plot(c))}">'
            if c.headline and c.swept and any(_number(j.headline) is not None for j in c.jobs) else
            '<p class="note">no plot: the jobs share every override or have no numeric headline</p>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f"<title>edgepipe compare</title>\n<style>body {{ font-family: system-ui, sans-serif; margin: 2em; }}\n"
            f"table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}\n"
            f"img {{ max-width: 100%; }} .note {{ color: #666; }}</style></head>\n<body>\n"
            f"<h1>{len(c.jobs)} jobs, best first</h1>\n<table>\n<tr>{head}</tr>\n{body}</table>\n"
            f"{plot}\n</body></html>\n")


def sweep_plot(c: Comparison) -> bytes:
    """The headline against each swept parameter, one panel each: every job a dot, a line through the
    best job at each value (the other parameters vary between the dots of one value). Numbers on a
    numeric axis (log when they span more than two decades), anything else as categories in job order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(c.swept)
    fig = Figure(figsize=(min(4.5 * n, 14), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    pick = min if c.lower_is_better else max
    for i, key in enumerate(c.swept):
        ax = fig.add_subplot(1, n, i + 1)
        pts = [(j.overrides.get(key, MISSING), _number(j.headline)) for j in c.jobs if _number(j.headline) is not None]
        numeric = all(_number(x) is not None for x, _ in pts)
        cats = list(dict.fromkeys(x for x, _ in pts))
        pos = {x: (_number(x) if numeric else k) for k, x in enumerate(cats)}
        ax.plot([pos[x] for x, _ in pts], [y for _, y in pts], "o", alpha=0.5, label="job")
        best = sorted((pos[x], pick(y for x2, y in pts if x2 == x)) for x in cats)
        ax.plot([b[0] for b in best], [b[1] for b in best], "-", color="tab:red", label="best at each value")
        if numeric and min(pos.values()) > 0 and max(pos.values()) / min(pos.values()) > 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(c.headline)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or isinstance(v, bool) else f


# -- entry points -------------------------------------------------------------------------------------
def write_sweep_comparison(sweep_dir: Path, metrics: Sequence[str] = DEFAULT_METRICS) -> Path:
    """compare.csv/.md/.html in a sweep folder, over its jobs; returns compare.html's path."""
    jobs = load_jobs(run_folders([str(sweep_dir)], Path(sweep_dir)))
    return write_outputs(compare(jobs, metrics), Path(sweep_dir))[2]


def run(refs: Sequence[str], runs_root: Path, metrics: Sequence[str], out_dir: Path | None,
        width: int | None) -> list[Path]:
    """What `edgepipe compare` does: print the table, write the three files (in the sweep folder when one
    sweep folder is compared, else in out_dir or the current folder)."""
    from rich.console import Console

    folders = run_folders(refs, runs_root)
    c = compare(load_jobs(folders), metrics)
    if out_dir is None:
        single = Path(refs[0]) if len(refs) == 1 else None
        out_dir = single if single is not None and single.is_dir() and not (single / RUN_JSON).is_file() else Path(".")
    console = Console(highlight=False, width=width)
    for table in rich_tables(c, console.width):
        console.print(table)
    return write_outputs(c, out_dir)

