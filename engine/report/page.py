"""report.html: one self-contained page per run, beside report.md.

It reads only what the run and its stages already wrote (run.json's record, .hydra/, each stage's
output files: metrics, class counts, predictions, features, clip ranges, package manifests); it
recomputes nothing and never imports torch. Pictures are PNGs embedded as base64, memoised under the
cache's scratch folder (report_figures), and the page has no external link, font or script (a
Content-Security-Policy says so to the browser), so a copied run folder still shows it.
Sections per stage type: report_sections; the summary's facts: report_summary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine.contract import figures as figs
from engine.report.run_view import RunView, stage_dir
from engine.report.sections import READERS, fmt
from engine.report.summary import CHANGES_SHOWN, config_changes, mb, model_facts, model_format
from engine.store.runs import RunRecord, StageRecord

REPORT_HTML = "report.html"
CHANGES_VERSION = 1  # bump when config_changes reports differently: memoised by it


def write_html(record: RunRecord) -> Path:
    """Render runs/<run>/report.html from the record and the stage folders it points to."""
    run_dir = Path(record.run_dir)
    page = _template().render(**context(record, run_dir))
    path = run_dir / REPORT_HTML
    path.write_text(page, encoding="utf-8")
    return path


def _template():
    """The page's template, compiled once per jinja2 version and settings: compiling it is most of
    writing a cached run's report. Its code is kept in the user's own cache folder (compose_cache's;
    never under runs/, which may come from someone else), sealed like that folder's entries: Jinja's
    FileSystemBytecodeCache would unpickle whatever file it found there."""
    import jinja2

    from engine.config import compose_cache

    settings = {"autoescape": True, "trim_blocks": True, "lstrip_blocks": True}
    where = compose_cache.folder()
    cache = None
    if where is not None:
        tag = hashlib.sha256(f"{jinja2.__version__}{sorted(settings.items())}".encode()).hexdigest()[:16]
        cache = _sealed_bytecode_cache(where / "jinja" / tag)
    env = jinja2.Environment(loader=jinja2.DictLoader({REPORT_HTML: TEMPLATE}), bytecode_cache=cache,
                             undefined=jinja2.StrictUndefined, **settings)
    return env.get_template(REPORT_HTML)


def _sealed_bytecode_cache(folder: Path):
    """A jinja2.BytecodeCache on compose_cache's sealed files: a file this user's key did not seal
    (planted, edited) is a miss and the template is compiled again; nothing else is loaded."""
    import jinja2

    from engine.config import compose_cache

    class SealedBytecodeCache(jinja2.BytecodeCache):
        def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            data = compose_cache.read_sealed_bytes(folder / f"{bucket.key}.cache")
            if data is not None:
                bucket.bytecode_from_string(data)

        def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            try:
                compose_cache.write_sealed_bytes(folder / f"{bucket.key}.cache", bucket.bytecode_to_string())
            except OSError:  # a read-only home: compiled each time
                pass

    return SealedBytecodeCache()


def read_yaml(path: Path) -> Any:
    """A YAML file the run wrote (.hydra/), with libyaml's parser where PyYAML has it: OmegaConf's
    pure-Python load of config.yaml is a tenth of a cached run."""
    import yaml

    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def context(record: RunRecord, run_dir: Path) -> dict[str, Any]:
    """Everything the template shows, as plain values."""
    view = RunView(record, run_dir, Path(record.runs_root) / "cache" / ".scratch" / "report", pipeline_needs(run_dir))
    sections: dict[str, list] = {t: [] for t in READERS}
    for s in record.stages.values():
        folder = stage_dir(run_dir, s)
        if folder is not None and s.type in READERS:
            sections[s.type].append({"stage": s.name, **READERS[s.type](view, s, folder)})
    return {"r": record, "seconds": f"{record.seconds:.1f}", "choices": config_choices(run_dir),
            "headline": fmt(record.headline.get("value")) if record.headline else "",
            "summary": summary(view), "stages": [stage_row(s) for s in record.stages.values()],
            "clip": sections.pop("clip_outliers"), "csp": CSP, **sections}


def pipeline_needs(run_dir: Path) -> dict[str, dict[str, str]]:
    """{stage: {input: upstream stage}} from the run's .hydra/config.yaml ({} when unreadable)."""
    try:
        stages = read_yaml(run_dir / ".hydra" / "config.yaml")["pipeline"]["stages"]
        return {name: {str(k): str(v) for k, v in (entry.get("needs") or {}).items()} for name, entry in stages.items()}
    except Exception:  # noqa: BLE001 - no or an unreadable .hydra/: sizes and image grids are left out
        return {}


def summary(view: RunView) -> dict[str, Any]:
    """The model and its parameter count, model size per format, and the config values changed."""
    rec = view.record
    model = None
    for s in rec.stages.values():
        folder = view.folder(s.name)
        if s.type == "train" and folder is not None and (folder / "model.pt").is_file():
            model = model_facts(folder / "model.pt")
            break
    sizes = []
    for s in rec.stages.values():
        folder = view.folder(s.name)
        found = model_format(folder) if folder is not None else None
        if found:
            sizes.append({"stage": s.name, "format": found[0], "size": mb(found[1])})
    changes = memo_changes(view)
    return {"model": model, "parameters": f"{model['parameters']:,}" if model else "", "sizes": sizes,
            "changes": (changes or [])[:CHANGES_SHOWN], "changes_count": len(changes or []),
            "changes_problem": None if changes is not None else "the default config could not be composed"}


def memo_changes(view: RunView) -> list[list[str]] | None:
    """config_changes, kept under the scratch folder by the run's config and its config folders: composing
    the default config costs a Hydra compose (~0.3 s) that a cached run need not pay again."""
    try:
        text = (view.run_dir / ".hydra" / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return None
    shown = ("changes", CHANGES_VERSION, text, view.record.config_sources, view.record.edgepipe_version)
    return figs.memo_json(view.scratch, shown, lambda: config_changes(view.run_dir, view.record.config_sources))


def stage_row(s: StageRecord) -> dict[str, Any]:
    return {"name": s.name, "type": s.type, "status": s.status, "seconds": f"{s.seconds:.1f}",
            "key": s.key or "", "note": s.error or s.reason or ""}


def config_choices(run_dir: Path) -> dict[str, str]:
    """The config group options the run composed (experiment, pipeline, dataset, model, ...)."""
    try:
        choices = read_yaml(run_dir / ".hydra" / "hydra.yaml")["hydra"]["runtime"]["choices"]
    except Exception:  # noqa: BLE001 - no or an unreadable .hydra/: the summary shows the overrides only
        return {}
    shown = {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}
    return dict(sorted(shown.items(), key=lambda kv: kv[0] != "experiment"))  # the experiment first


# Content-Security-Policy: the browser loads nothing but the page itself and its data: images
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<title>edgepipe report: {{ r.name }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei",
       "WenQuanYi Zen Hei", "Microsoft YaHei", "PingFang SC", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 0.2em; }
.pass { color: #176317; font-weight: bold; } .fail { color: #a31515; font-weight: bold; }
.ok { color: #176317; } .failed { color: #a31515; } .note { color: #666; font-style: italic; }
.best { background: #fff3c4; } .badge { font-size: 0.8em; background: #f0c000; border-radius: 3px; padding: 0 0.3em; }
img { max-width: 100%; border: 1px solid #eee; }
.confusion { display: inline-block; vertical-align: top; margin: 0 1em 1em 0; max-width: 520px; }
details { margin: 0.5em 0 1em; } summary { cursor: pointer; }
</style>
</head>
<body>
<h1>{{ r.name }}</h1>
<h2 id="summary">Summary</h2>
<table class="summary">
<tr><th>status</th><td class="{{ r.status }}">{{ r.status }}</td></tr>
<tr><th>seconds</th><td>{{ seconds }}</td></tr>
<tr><th>folder</th><td><code>{{ r.run_dir }}</code></td></tr>
{% if choices.get("experiment") %}<tr><th>experiment</th><td>{{ choices["experiment"] }}</td></tr>{% endif %}
{% if r.overrides %}<tr><th>overrides</th><td><code>{{ r.overrides | join(" ") }}</code></td></tr>{% endif %}
{% if r.headline %}<tr><th>headline</th><td>{{ r.headline.key }} = {{ headline }}</td></tr>{% endif %}
{% if choices %}<tr><th>config</th><td><code>{% for group, option in choices.items() %}{{ group }}={{ option }} {% endfor %}</code></td></tr>{% endif %}
{% if summary.model %}<tr><th>model</th><td>{{ summary.model.arch }}, {{ summary.model.num_classes }} classes,
<span class="parameters">{{ summary.parameters }}</span> parameters</td></tr>{% endif %}
{% for d in dataset %}{% if d.spec %}<tr><th>input</th><td>{% for k, v in d.spec.items() %}{{ k }}: <code>{{ v }}</code>{% if not loop.last %}; {% endif %}{% endfor %}</td></tr>{% endif %}{% endfor %}
{% for p in package %}<tr><th>package{% if p.stage != "package" %} {{ p.stage }}{% endif %}</th>{% if p.error %}<td class="failed">not written: {{ p.error }}</td>{% else %}<td>board <b>{{ p.board }}</b>{% if p.title %} ({{ p.title }}){% endif %}:
<code>{{ p.folder }}</code>{% if p.zip %}, <code>{{ p.zip }}</code>{% endif %}</td>{% endif %}</tr>
{% endfor %}
{% if r.edgepipe_version %}<tr><th>edgepipe</th><td>{{ r.edgepipe_version }}</td></tr>{% endif %}
</table>
{% if summary.sizes %}
<h3>Model size on disk</h3>
<table class="sizes"><tr><th>stage</th><th>format</th><th>size</th></tr>
{% for z in summary.sizes %}<tr><td>{{ z.stage }}</td><td>{{ z.format }}</td><td class="num">{{ z.size }}</td></tr>
{% endfor %}</table>
{% endif %}
<h3>Parameters that differ from the defaults</h3>
{% if summary.changes_problem %}<p class="note">{{ summary.changes_problem }}</p>
{% elif not summary.changes %}<p class="note">none: the run used the default config</p>
{% else %}
<table class="changes"><tr><th>key</th><th>default</th><th>this run</th></tr>
{% for c in summary.changes %}<tr><td><code>{{ c[0] }}</code></td><td>{{ c[1] }}</td><td>{{ c[2] }}</td></tr>
{% endfor %}</table>
{% if summary.changes_count > summary.changes | length %}<p class="note">{{ summary.changes_count }} in all; the first {{ summary.changes | length }} listed (see .hydra/config.yaml)</p>{% endif %}
{% endif %}

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

{% for c in clip %}
<h2 id="clip-{{ c.stage }}">Outlier clipping ({{ c.stage }})</h2>
{% if c.facts %}<table>{% for k, v in c.facts.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% if c.picture %}<img class="ranges" alt="weight range per layer before and after clipping ({{ c.stage }})" src="{{ c.picture }}">
<details><summary>per layer ({{ c.rows | length }})</summary>
<table class="clip-layers"><tr><th>layer</th><th>kind</th><th>clipped</th><th>range before</th><th>range after</th><th>weights clipped</th></tr>
{% for row in c.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table></details>
{% else %}<p class="note">{{ c.problem }}</p>{% endif %}
{% endfor %}

{% for e in evaluate %}
<h2 id="evaluate-{{ e.stage }}">Backends ({{ e.stage }}: {{ e.split }} split, {{ e.samples }} images)</h2>
{% if e.problem %}<p class="note">{{ e.problem }}</p>{% else %}
<table class="backends">
<tr><th>backend</th><th>kind</th><th>samples</th><th>top-1</th><th>&Delta; vs fp32 (points)</th><th>agreement with fp32</th>
<th>max abs logit diff</th><th>model size</th><th>target</th></tr>
{% for b in e.rows %}<tr data-backend="{{ b.name }}"{% if b.best_int8 %} class="best"{% endif %}><td>{{ b.name }}{% if b.best_int8 %} <span class="badge">best int8</span>{% endif %}</td>
<td>{{ b.kind }}</td><td class="num">{{ b.samples }}</td>
<td class="num top1" data-value="{{ b.top1 }}">{{ b.top1_text }}</td><td class="num">{{ b.change }}</td>
<td class="num">{{ b.agreement }}</td><td class="num">{{ b.max_abs_diff }}</td><td class="num">{{ b.size }}</td>
<td><span class="{{ b.verdict }}">{{ b.verdict }}</span>{% if b.missed %}: <b class="fail missed">{{ b.missed }}</b>{% endif %}{% if b.target %} ({{ b.target }}){% endif %}
{% if b.missed %}<br><span class="shipped">{% for p in b.shipped_by %}{{ p.stage }}: {% if p.status == "failed" %}<b class="fail">not packaged</b>{% elif p.status in ("ran", "cached") %}packaged anyway (package.enforce_targets=false){% else %}{{ p.status }}{% endif %}{% if not loop.last %}; {% endif %}{% else %}compared only: no package ships it{% endfor %}</span>{% endif %}</td></tr>
{% endfor %}
</table>
<h3>Per-class accuracy</h3>
<table class="per-class"><tr><th>class</th>{% for b in e.rows %}<th>{{ b.name }}</th>{% endfor %}</tr>
{% for c in e.classes %}<tr><td>{{ c }}</td>{% for b in e.rows %}<td class="num">{{ b.per_class.get(c, "") }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if e.images_problem %}<p class="note">{{ e.images_problem }}</p>{% endif %}
{% for b in e.per_backend %}
<h3 id="backend-{{ b.name }}">{{ b.name }}</h3>
<div class="confusion">{% if b.confusion %}<img alt="confusion matrix of {{ b.name }}" src="{{ b.confusion }}">
{% else %}<p class="note">{{ b.name }}: no confusion PNG</p>{% endif %}</div>
{% if b.wrong %}<p>{{ b.wrong.title }}</p>{% if b.wrong.uri %}<img class="grid" alt="misclassified by {{ b.name }}" src="{{ b.wrong.uri }}">{% endif %}{% endif %}
{% endfor %}
{% for d in e.disagree %}{% if d %}
<h3>Where {{ d.name }} (int8) and {{ d.reference }} (fp32) disagree</h3>
<p>{{ d.title }}</p>
{% if d.uri %}<img class="grid" alt="{{ d.name }} disagrees with {{ d.reference }}" src="{{ d.uri }}">{% endif %}
{% endif %}{% endfor %}
{% if e.multicrop %}
<h3>Multi-crop</h3>
<table class="multicrop"><tr><th>backend</th><th>crops</th><th>single-crop top-1</th><th>mean-probability top-1</th><th>vote top-1</th><th>undecided</th></tr>
{% for m in e.multicrop %}<tr><td>{{ m[0] }}</td>{% for v in m[1:] %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endif %}
<h3>t-SNE of the penultimate-layer features{% if e.tsne.backend %} ({{ e.tsne.backend }}){% endif %}</h3>
{% if e.tsne.uri %}<img class="tsne" alt="t-SNE of the test features by class" src="{{ e.tsne.uri }}">
{% else %}<p class="note">{{ e.tsne.problem }}</p>{% endif %}
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
