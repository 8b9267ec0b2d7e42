"""report.html: one self-contained page per run, beside report.md.

It reads only what the run and its stages already wrote (run.json's record, .hydra/hydra.yaml, each
stage's metrics.json, class_counts.json, skipped.csv, confusion_<backend>.png, the train stage's
logs/csv/metrics.csv); it recomputes nothing and never imports torch. Pictures are PNGs embedded as
base64 and the page has no external link, font or script, so a copied run folder still shows it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from .runs import RunRecord, StageRecord

REPORT_HTML = "report.html"
SKIPPED_SHOWN = 100  # skipped.csv rows listed; the count says how many there are


def write_html(record: RunRecord) -> Path:
    """Render runs/<run>/report.html from the record and the stage folders it points to."""
    import jinja2

    run_dir = Path(record.run_dir)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    page = env.from_string(TEMPLATE).render(**context(record, run_dir))
    path = run_dir / REPORT_HTML
    path.write_text(page, encoding="utf-8")
    return path


def context(record: RunRecord, run_dir: Path) -> dict[str, Any]:
    """Everything the template shows, as plain values."""
    sections = {"dataset": [], "train": [], "evaluate": []}
    for s in record.stages.values():
        folder = stage_dir(run_dir, s)
        if folder is not None and s.type in sections:
            scratch = Path(s.path).parent.parent / ".scratch" / "report" if s.path else None
            sections[s.type].append({"stage": s.name, **READERS[s.type](folder, scratch)})
    return {"r": record, "seconds": f"{record.seconds:.1f}", "choices": config_choices(run_dir),
            "headline": fmt(record.headline.get("value")) if record.headline else "",
            "stages": [stage_row(s) for s in record.stages.values()], **sections}


def stage_dir(run_dir: Path, s: StageRecord) -> Path | None:
    """The stage's outputs: its stages/ link (relative: survives a copied run folder, when the cache came
    along), else the cache entry, else the failed/ folder a stage that raised leaves behind."""
    for folder in (run_dir / "stages" / s.name, Path(s.path) if s.path else None, run_dir / "failed" / s.name):
        if folder is not None and folder.is_dir():
            return folder
    return None


def stage_row(s: StageRecord) -> dict[str, Any]:
    return {"name": s.name, "type": s.type, "status": s.status, "seconds": f"{s.seconds:.1f}",
            "key": s.key or "", "note": s.error or s.reason or ""}


def config_choices(run_dir: Path) -> dict[str, str]:
    """The config group options the run composed (experiment, pipeline, dataset, model, ...)."""
    from omegaconf import OmegaConf

    try:
        choices = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices)
    except Exception:  # noqa: BLE001 - no or an unreadable .hydra/: the summary shows the overrides only
        return {}
    shown = {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}
    return dict(sorted(shown.items(), key=lambda kv: kv[0] != "experiment"))  # the experiment first


# -- dataset ------------------------------------------------------------------------------------------
def dataset_section(folder: Path, scratch: Path | None = None) -> dict[str, Any]:
    counts = read_json(folder / "class_counts.json") or {}
    splits = [s for s in counts if isinstance(counts[s], dict)]
    classes = list(counts[splits[0]]) if splits else []
    rows = [[c] + [counts[s].get(c, 0) for s in splits] for c in classes]
    skipped = read_csv(folder / "skipped.csv")
    return {"splits": splits, "rows": rows, "skipped": skipped[:SKIPPED_SHOWN], "skipped_count": len(skipped),
            "problem": None if counts else f"no readable {folder / 'class_counts.json'}"}


# -- training -----------------------------------------------------------------------------------------
def train_section(folder: Path, scratch: Path | None = None) -> dict[str, Any]:
    metrics = read_json(folder / "metrics.json") or {}
    epochs = metrics.get("epochs") or epochs_from_csv(folder / "logs" / "csv" / "metrics.csv")
    best = metrics.get("best_epoch")
    facts = {k: metrics[k] for k in ("arch", "mode", "epochs_run", "best_epoch", "val_acc", "test_acc", "train_eval_acc")
             if metrics.get(k) is not None}
    return {"facts": {k: fmt(v) for k, v in facts.items()},
            "curves": png_uri(memo_png(scratch, ("curves", CURVES_VERSION, epochs, best),
                                       lambda: curves_png(epochs, best))) if epochs else None,
            "problem": None if epochs else f"no per-epoch history in {folder} (metrics.json or logs/csv/metrics.csv)"}


def epochs_from_csv(path: Path) -> list[dict[str, Any]]:
    """Lightning's CSV log has one row per logging call (0-based epochs): merge them per epoch."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in read_csv(path, header=True):
        try:
            epoch = int(row["epoch"]) + 1
        except (KeyError, ValueError):
            continue
        merged = by_epoch.setdefault(epoch, {"epoch": epoch})
        merged.update({k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)})
    return [by_epoch[e] for e in sorted(by_epoch)]


CURVES_VERSION = 1  # bump when curves_png draws differently: memoised PNGs are keyed by it


def memo_png(scratch: Path | None, shown: Any, render) -> bytes:
    """``render()``'s PNG, kept under the cache's scratch folder by a digest of what it shows: a fully
    cached run writes its report without importing matplotlib again (~0.9 s of a 1.3 s run)."""
    if scratch is None:
        return render()
    path = scratch / (hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()[:32] + ".png")
    if path.is_file():
        return path.read_bytes()
    data = render()
    try:  # temp + rename: a reader never sees half a file
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:  # a read-only cache still gets its report
        pass
    return data


def curves_png(epochs: list[dict[str, Any]], best: int | None) -> bytes:
    """Loss and accuracy per epoch, train and validation, the best epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, metric in enumerate(("loss", "acc")):
        ax = fig.add_subplot(1, 2, i + 1)
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(e["epoch"], e[f"{split}_{metric}"]) for e in epochs if e.get(f"{split}_{metric}") is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{split} {metric}", markersize=4)
        if best is not None:
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch {best}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- evaluation ---------------------------------------------------------------------------------------
def evaluate_section(folder: Path, scratch: Path | None = None) -> dict[str, Any]:
    report = read_json(folder / "metrics.json") or {}
    backends = report.get("backends") or {}
    return {"split": report.get("split", "?"), "samples": report.get("samples", "?"),
            "reference": report.get("reference"), "classes": report.get("classes") or [],
            "rows": [backend_row(n, row, report.get("reference")) for n, row in backends.items()],
            "confusion": [{"name": n, "uri": png_file_uri(folder / f"confusion_{safe_name(n)}.png")} for n in backends],
            "problem": None if backends else f"no readable {folder / 'metrics.json'}"}


def backend_row(name: str, row: dict[str, Any], reference: str | None) -> dict[str, Any]:
    verdict = {True: "pass", False: "fail", None: ""}[row.get("target_met")]
    per_class = row.get("per_class") or {}
    return {"name": name, "kind": row.get("kind", "") + (f" ({row['detail']})" if row.get("detail") else ""),
            "samples": row.get("samples", ""), "top1": row.get("top1"), "top1_text": pct(row.get("top1")),
            "change": f"{-row['drop_points'] + 0.0:+.2f}" if "drop_points" in row else "",
            "agreement": pct(row.get("agreement")),
            "max_abs_diff": f"{row['max_abs_diff']:.3g}" if "max_abs_diff" in row else "",
            "verdict": "reference" if name == reference else verdict, "target": row.get("target", ""),
            "per_class": {c: pct(v, 1) for c, v in per_class.items()}}


def safe_name(name: str) -> str:
    """evaluate's file-name rule for confusion_<backend>.png (stages.evaluate._safe)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# -- small helpers ------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_csv(path: Path, header: bool = False) -> list:
    """Rows after the header (as lists), or as dicts with header=True; [] when unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if header:
                return list(csv.DictReader(f))
            return list(csv.reader(f))[1:]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_file_uri(path: Path) -> str | None:
    try:
        return png_uri(path.read_bytes())
    except OSError:
        return None


def pct(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}%}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


READERS = {"dataset": dataset_section, "train": train_section, "evaluate": evaluate_section}

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>edgepipe report: {{ r.name }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 0.2em; }
.pass { color: #176317; font-weight: bold; } .fail { color: #a31515; font-weight: bold; }
.ok { color: #176317; } .failed { color: #a31515; } .note { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
.confusion { display: inline-block; vertical-align: top; margin: 0 1em 1em 0; max-width: 520px; }
</style>
</head>
<body>
<h1>{{ r.name }}</h1>
<h2 id="summary">Summary</h2>
<table>
<tr><th>status</th><td class="{{ r.status }}">{{ r.status }}</td></tr>
<tr><th>seconds</th><td>{{ seconds }}</td></tr>
<tr><th>folder</th><td><code>{{ r.run_dir }}</code></td></tr>
{% if r.overrides %}<tr><th>overrides</th><td><code>{{ r.overrides | join(" ") }}</code></td></tr>{% endif %}
{% if r.headline %}<tr><th>headline</th><td>{{ r.headline.key }} = {{ headline }}</td></tr>{% endif %}
{% if choices %}<tr><th>config</th><td><code>{% for group, option in choices.items() %}{{ group }}={{ option }} {% endfor %}</code></td></tr>{% endif %}
{% if r.edgepipe_version %}<tr><th>edgepipe</th><td>{{ r.edgepipe_version }}</td></tr>{% endif %}
</table>

{% for d in dataset %}
<h2 id="dataset-{{ d.stage }}">Dataset ({{ d.stage }})</h2>
{% if d.problem %}<p class="note">{{ d.problem }}</p>{% else %}
<table class="counts">
<tr><th>class</th>{% for s in d.splits %}<th>{{ s }}</th>{% endfor %}</tr>
{% for row in d.rows %}<tr><td>{{ row[0] }}</td>{% for n in row[1:] %}<td class="num">{{ n }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% endif %}
<p>Skipped files: {{ d.skipped_count }}{% if d.skipped_count > d.skipped | length %} (the first {{ d.skipped | length }} listed){% endif %}</p>
{% if d.skipped %}<table><tr><th>file</th><th>reason</th></tr>
{% for row in d.skipped %}<tr><td><code>{{ row[0] }}</code></td><td>{{ row[1:] | join(", ") }}</td></tr>
{% endfor %}</table>{% endif %}
{% endfor %}

{% for t in train %}
<h2 id="train-{{ t.stage }}">Training ({{ t.stage }})</h2>
{% if t.facts %}<table>{% for k, v in t.facts.items() %}<tr><th>{{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% if t.curves %}<img class="curves" alt="loss and accuracy per epoch ({{ t.stage }})" src="{{ t.curves }}">
{% else %}<p class="note">{{ t.problem }}</p>{% endif %}
{% endfor %}

{% for e in evaluate %}
<h2 id="evaluate-{{ e.stage }}">Backends ({{ e.stage }}: {{ e.split }} split, {{ e.samples }} images)</h2>
{% if e.problem %}<p class="note">{{ e.problem }}</p>{% else %}
<table class="backends">
<tr><th>backend</th><th>kind</th><th>samples</th><th>top-1</th><th>&Delta; vs fp32 (points)</th><th>agreement with fp32</th>
<th>max abs logit diff</th><th>target</th></tr>
{% for b in e.rows %}<tr data-backend="{{ b.name }}"><td>{{ b.name }}</td><td>{{ b.kind }}</td><td class="num">{{ b.samples }}</td>
<td class="num top1" data-value="{{ b.top1 }}">{{ b.top1_text }}</td><td class="num">{{ b.change }}</td>
<td class="num">{{ b.agreement }}</td><td class="num">{{ b.max_abs_diff }}</td>
<td><span class="{{ b.verdict }}">{{ b.verdict }}</span>{% if b.target %} ({{ b.target }}){% endif %}</td></tr>
{% endfor %}
</table>
<h3>Per-class accuracy</h3>
<table><tr><th>class</th>{% for b in e.rows %}<th>{{ b.name }}</th>{% endfor %}</tr>
{% for c in e.classes %}<tr><td>{{ c }}</td>{% for b in e.rows %}<td class="num">{{ b.per_class.get(c, "") }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h3>Confusion matrices (rows: true class, columns: predicted)</h3>
{% for c in e.confusion %}<div class="confusion">{% if c.uri %}<img alt="confusion matrix of {{ c.name }}" src="{{ c.uri }}">
{% else %}<p class="note">{{ c.name }}: no confusion PNG</p>{% endif %}</div>
{% endfor %}
{% endif %}
{% endfor %}

<h2 id="stages">Stages</h2>
<table class="stages">
<tr><th>stage</th><th>type</th><th>status</th><th>seconds</th><th>key</th><th>why / error</th></tr>
{% for s in stages %}<tr><td>{{ s.name }}</td><td>{{ s.type }}</td><td class="{{ s.status }}">{{ s.status }}</td>
<td class="num">{{ s.seconds }}</td><td><code>{{ s.key }}</code></td><td>{{ s.note }}</td></tr>
{% endfor %}
</table>
<p class="note">Stage outputs are linked under <code>stages/</code>; the exact config is in <code>.hydra/</code>.
Regenerate with <code>edgepipe report {{ r.run_dir }}</code>.</p>
</body>
</html>
"""
