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
    from engine.config import compose_cache
    from engine.contract.fetching import memo

    run_dir = Path(record.run_dir)
    with memo(compose_cache.resolved_memo()):  # the backends' entry points, remembered (contract.plugins)
        shown = context(record, run_dir)
    page = _template().render(**shown)
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
    view = RunView(record, run_dir, Path(record.runs_root) / "cache" / ".scratch" / "report",
                   pipeline_needs(record, run_dir))
    sections: dict[str, list] = {t: [] for t in READERS}
    for s in record.stages.values():
        folder = stage_dir(run_dir, s)
        if folder is not None and s.type in READERS:
            sections[s.type].append({"stage": s.name, **READERS[s.type](view, s, folder)})
    return {"r": record, "seconds": f"{record.seconds:.1f}", "choices": config_choices(record, run_dir),
            "headline": fmt(record.headline.get("value")) if record.headline else "",
            "summary": summary(view), "stages": [stage_row(s) for s in record.stages.values()],
            "clip": sections.pop("clip_outliers"), "csp": CSP, **sections}


def pipeline_needs(record: RunRecord, run_dir: Path) -> dict[str, dict[str, str]]:
    """{stage: {input: upstream stage}}: the record's, else from the run's .hydra/config.yaml ({} when
    unreadable)."""
    if record.needs is not None:
        return {str(name): {str(k): str(v) for k, v in needs.items()} for name, needs in record.needs.items()
                if isinstance(needs, dict)}
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


def config_choices(record: RunRecord, run_dir: Path) -> dict[str, str]:
    """The config group options the run composed (experiment, pipeline, dataset, model, ...): the
    record's, else from the run's .hydra/hydra.yaml."""
    try:
        choices = (record.choices if record.choices is not None else
                   read_yaml(run_dir / ".hydra" / "hydra.yaml")["hydra"]["runtime"]["choices"])
    except Exception:  # noqa: BLE001 - no or an unreadable .hydra/: the summary shows the overrides only
        return {}
    shown = {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}
    return dict(sorted(shown.items(), key=lambda kv: kv[0] != "experiment"))  # the experiment first


# Content-Security-Policy: the browser loads nothing but the page itself and its data: images
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# The page: a Jinja template beside this module (package data), read once per process.
TEMPLATE = (Path(__file__).with_name("report.html.j2")).read_text(encoding="utf-8")
