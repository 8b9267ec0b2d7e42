"""The `edgepipe` command.

    edgepipe run [-m] [--only S] [--force S] [--keep-going] [--no-cache] [--jobs N] [--max-memory SIZE]
                 [--cfg job|hydra|all] [--resolve] [OVERRIDE ...]
    edgepipe plan [--json] [--only S] [--force S] [--info] [OVERRIDE ...]
    edgepipe dag [--format mermaid|dot|png|svg] [-o FILE] [OVERRIDE ...]
    edgepipe runs [--limit N] [--json]
    edgepipe show RUN
    edgepipe report RUN
    edgepipe reproduce RUN_DIR [--verify] [--tolerance T]
    edgepipe compare SWEEP_DIR|RUN ... [--metrics top1,drop_points,seconds] [--out DIR]
    edgepipe gc [--dry-run]
    edgepipe push [RUN] [cache.remote=URL]
    edgepipe pull RUN | OVERRIDE ...
    edgepipe init [DIR]
    edgepipe selftest PACKAGE [--emulate]    (a package's golden self-test here, or on its board's CPU under qemu)
    edgepipe --version
    edgepipe -sc install=bash|zsh|fish       (shell completion: eval "$(edgepipe -sc install=bash)")

Every verb that composes a config takes -cd/--config-dir DIR (default: ./conf when it exists; -cp/
--config-path is the same), a folder searched before edgepipe's built-in configs, and -cn/--config-name
NAME (the primary config, default config); --info lists the search path and where each file came from.
Overrides use Hydra's syntax: `train.epochs=3`, `model=mobilenet_v3_small`, `+experiment=quickstart`,
`+train.foo=1`, `~key`, and with -m sweeps such as `train.lr=1e-3,1e-2`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

USAGE = __doc__

# Flags of our own on run/plan/dag; everything else on those verbs is a Hydra override.
_VALUE_FLAGS = {"--only", "--force", "--format", "--cfg", "--config-dir", "-cd", "--config-path", "-cp",
                "--config-name", "-cn", "--jobs", "-j", "--max-memory"}
_BOOL_FLAGS = {"--keep-going", "--no-cache", "--json", "-m", "--multirun", "--resolve", "--info"}
# --cfg as in Hydra apps (`--cfg resolved` is the job config resolved, kept for older scripts)
_CFG_PARTS = ("job", "hydra", "all", "resolved")


# Set to show the traceback of an unexpected error (a bug) instead of one line.
DEBUG_ENV = "EDGEPIPE_DEBUG"


class UsageError(Exception):
    pass


def _split_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    opts: dict = {"only": [], "force": []}
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        if name in _VALUE_FLAGS:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise UsageError(f"{name} needs a value")
            key = name.lstrip("-").replace("-", "_")
            key = {"cd": "config_dir", "cp": "config_dir", "config_path": "config_dir", "cn": "config_name",
                   "j": "jobs"}.get(key, key)
            if key in ("only", "force"):
                opts[key] += [v for v in value.split(",") if v]
            else:
                opts[key] = value
        elif name in _BOOL_FLAGS:
            opts[{"-m": "multirun", "--multirun": "multirun"}.get(name, name.lstrip("-").replace("-", "_"))] = True
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg}")
        else:
            overrides.append(arg)
    if opts.get("config_name"):
        _choose_config_name(opts["config_name"])
    return opts, overrides


def _choose_config_name(name: str) -> None:
    """-cn NAME: the primary config (NAME.yaml in the config folders instead of config.yaml). It goes
    through the environment, as EDGEPIPE_CONFIG_DIR does, so launcher workers compose the same."""
    from engine.config.compose import CONFIG_NAME_ENV

    name = name[:-5] if name.endswith(".yaml") else name
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise UsageError(f"-cn/--config-name {name!r}: name a config file in the config folders, e.g. -cn myconfig")
    os.environ[CONFIG_NAME_ENV] = name


def _parallel_options(opts: dict) -> dict:
    """run's --jobs N (default: min(4, cores / 2)) and --max-memory SIZE (default: 3/4 of the available memory)."""
    from engine.run import scheduler

    jobs = opts.get("jobs")
    if jobs is not None and (not jobs.isdigit() or int(jobs) < 1):
        raise UsageError(f"--jobs {jobs}: give a whole number of stages to run at the same time (1 or more)")
    size = opts.get("max_memory")
    try:
        budget = scheduler.parse_size(size) if size is not None else None
    except ValueError:
        raise UsageError(f"--max-memory {size}: give a size such as 8G or 512M") from None
    return {"jobs": int(jobs) if jobs else scheduler.default_jobs(), "max_memory_mb": budget}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may run again with stderr redirected, as
    in tests; a handler bound to the first stream would write to a closed one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(run_dir: Path | None) -> None:
    """edgepipe's warnings on stderr; everything (third-party INFO included) in the run's log file."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edgepipe", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "edgepipe.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._edgepipe = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    ep = logging.getLogger("edgepipe")
    if not any(getattr(h, "_edgepipe_console", False) for h in ep.handlers):
        sh = _StderrHandler()
        sh.setLevel(logging.WARNING)
        sh.setFormatter(logging.Formatter("edgepipe: %(levelname)s: %(message)s"))
        sh._edgepipe_console = True  # type: ignore[attr-defined]
        ep.addHandler(sh)


def _runs_root(cfg) -> Path:
    return Path(str(cfg.runs_root))


def _check_runs_root(root: Path) -> None:
    """A config error naming runs_root when it cannot hold run folders (checked without creating
    anything: the nearest existing folder above it must be a writable directory)."""
    from engine.errors import ConfigError

    existing = root.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    why = "is not a folder" if not existing.is_dir() else "is not writable"
    raise ConfigError([f"runs_root: {root} cannot be created or written ({existing} {why}); "
                       f"set runs_root=DIR or EDGEPIPE_RUNS to a writable folder"])


def _print_cfg(jobs, part: str, resolve: bool) -> None:
    """What Hydra's --cfg prints: the job config, Hydra's own config (the `hydra` node without its
    help texts), or both. --resolve resolves against the whole config (hydra.run.dir names
    ${runs_root}); a value that only a sweep job has (hydra.job.num) stays as written."""
    from omegaconf import OmegaConf

    if part not in _CFG_PARTS:
        raise UsageError(f"--cfg {part}: use one of {', '.join(_CFG_PARTS[:3])} (add --resolve to resolve interpolations)")
    for job in jobs:
        hydra = OmegaConf.masked_copy(job.hydra_cfg, [k for k in job.hydra_cfg if k not in ("help", "hydra_help")])
        whole = OmegaConf.merge(OmegaConf.create({"hydra": hydra}), job.cfg)
        if resolve or part == "resolved":
            whole = OmegaConf.create(_resolved(whole))
        shown = {"job": [k for k in whole if k != "hydra"], "resolved": [k for k in whole if k != "hydra"],
                 "hydra": ["hydra"], "all": list(whole)}[part]
        print(OmegaConf.to_yaml(OmegaConf.masked_copy(whole, shown)))


def _resolved(node):
    """A config as plain data with every interpolation that can be resolved resolved; one that cannot
    (a value a sweep job alone has) is kept as written."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import OmegaConfBaseException

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    out = {} if isinstance(node, DictConfig) else []
    for key in keys:
        try:
            value = node[key]
            value = _resolved(value) if isinstance(value, (DictConfig, ListConfig)) else value
        except OmegaConfBaseException:
            value = node._get_node(key)._value()
        if isinstance(out, dict):
            out[key] = value
        else:
            out.append(value)
    return out


def _compose_jobs(opts: dict, overrides: list[str]):
    from engine.config import compose

    cdir = Path(opts["config_dir"]) if opts.get("config_dir") else None
    if opts.get("multirun"):
        job_overrides = compose.expand_sweep(overrides, cdir)
    else:
        if compose.is_sweep(overrides):
            raise UsageError("a sweep override (a,b) needs -m/--multirun: edgepipe run -m " + " ".join(overrides))
        job_overrides = [overrides]
    return [compose.compose(ov, cdir) for ov in job_overrides]


def _print_info(opts: dict, overrides: list[str]) -> int:
    """--info: the config search path and, for each config file merged, the entry it came from (with
    -m: of the sweep's fixed overrides; Hydra's own launcher/sweeper files are not listed)."""
    from engine.config import compose

    if opts.get("multirun"):
        overrides = [o.input_line for o in compose.parse_overrides(overrides)
                     if not o.is_sweep_override() and not o.is_hydra_override()]
    info = compose.explain(overrides, Path(opts["config_dir"]) if opts.get("config_dir") else None)
    if opts.get("json"):
        print(json.dumps(info, indent=2))
        return 0
    print("config search path (for each file, the first folder that holds it wins):")
    for s in info["search_path"]:
        print(f"  {s['provider']:<9} {s['folder']}")
    print("config files merged, in this order (later ones win):")
    width = max((len(c["config"]) for c in info["configs"]), default=0)
    for c in info["configs"]:
        print(f"  {c['config']:<{width}}  {c['provider']:<9} {c['file']}")
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    from engine.run.pipeline import Options

    opts, overrides = _split_args(argv)
    if opts.get("info"):
        return _print_info(opts, overrides)
    options = Options(only=opts["only"], force=opts["force"], no_cache=bool(opts.get("no_cache")),
                      keep_going=bool(opts.get("keep_going")), **_parallel_options(opts))
    if opts.get("multirun"):
        from engine.job import sweep  # Hydra's sweeper and launcher plugins

        return sweep.multirun(opts, overrides, options)
    (job,) = _compose_jobs(opts, overrides)
    if opts.get("cfg"):
        _print_cfg([job], opts["cfg"], bool(opts.get("resolve")))
        return 0
    pipeline = validated_pipeline(job, options)  # before anything is written to runs/
    run_dir = _make_unique_dir(job.run_dir)
    from engine.config import compose

    compose.write_hydra_dir(run_dir, job)
    record = execute_job(job, pipeline, options, run_dir, title=str(job.cfg.name))
    return 1 if record.status != "ok" else 0


def validated_pipeline(job, options, sweep: bool = False):
    """The job's pipeline, validated (config, --only/--force names, runs_root, overrides) or a
    ConfigError. A single run's is taken from plan_memo when the same config and code were validated
    before (and remembered otherwise), and its overrides without effect are warned about; a sweep
    warns once for all its jobs (sweep.multirun)."""
    from engine.contract.fetching import fetching

    with fetching():  # what the config names by name (pretrained weights) is fetched now, before any stage
        pipeline = _checked_pipeline(job, remember=not sweep, warn=not sweep)
    pipeline.graph.select(options.only)
    pipeline._forced(options)
    _check_runs_root(pipeline.runs_root)
    pipeline.cache.check_remote()  # an unreachable cache.remote: one line, before anything is written
    return pipeline


def _checked_pipeline(job, remember: bool, warn: bool = True):
    """Pipeline of the job with its overrides checked (and what they shadow warned about)."""
    from engine.run import plan_memo
    from engine.run.pipeline import Pipeline

    remembered = plan_memo.load(job) if remember else None
    if remembered is not None:
        _check_run_name(job)  # validation, which checks it too, is skipped
        pipeline, warnings = Pipeline(job.cfg, _runs_root(job.cfg), remembered), remembered.warnings
    else:
        pipeline = Pipeline(job.cfg, _runs_root(job.cfg))
        _check_overrides(job, pipeline)
        warnings = _shadowed(job.overrides, pipeline)
        if remember:
            plan_memo.store(job, pipeline, warnings)
    _warn(warnings if warn else [])
    return pipeline


def _check_run_name(job) -> None:
    """The run folder is named after `name`: checked on every path, a remembered plan's too."""
    from engine.config.compose import check_run_name
    from engine.errors import ConfigError

    problems = check_run_name(job.cfg)
    if problems:
        raise ConfigError(problems)


def _shadowed(overrides: list[str], pipeline) -> list[str]:
    from engine.config.validate import shadowed_overrides

    return shadowed_overrides(overrides, pipeline.stages)


def _warn(notes: list[str]) -> None:
    for note in notes:
        print(f"edgepipe: warning: {note}", file=sys.stderr)


def execute_job(job, pipeline, options, run_dir: Path, title: str, summary_table: bool = True):
    """Run one validated job in its folder (its .hydra/ already written): run.json, runs/latest, the
    progress display and the summary (a job in a parallel launcher's worker leaves its table to the
    sweep's end). A single run and every sweep job (any launcher) come here."""
    from engine import __version__
    from engine.store import runs
    from engine.report.display import Display, summary

    _setup_logging(run_dir)
    record = runs.RunRecord(name=str(job.cfg.name), run_dir=str(run_dir.resolve()),
                            runs_root=str(pipeline.runs_root.resolve()), overrides=job.overrides,
                            edgepipe_version=__version__, config_sources=job.sources, cwd=os.getcwd())
    pipeline.runs_root.mkdir(parents=True, exist_ok=True)  # hydra.run.dir/sweep.dir may lie outside it
    runs.point_latest(pipeline.runs_root, run_dir)
    display = Display(title, pipeline.graph.select(options.only))
    try:
        pipeline.execute(record, options, display)
    finally:
        display.close()
    if summary_table:
        summary(record)
    return record


def _check_overrides(job, pipeline) -> None:
    """An override that no stage of the pipeline validates is still checked (a bad value is an error)."""
    from engine.config.validate import ConfigError, unvalidated_override_problems

    problems = unvalidated_override_problems(job.cfg, job.overrides, pipeline.stages)
    if problems:
        raise ConfigError(problems)


def _make_unique_dir(run_dir: Path, key: str = "hydra.run.dir") -> Path:
    """Create the run folder, or `<name>-2`, `-3`, ... when another run started in the same second
    took it: mkdir either creates a folder or fails, so two processes never share one."""
    from engine.errors import ConfigError

    n = 1
    while True:
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if not candidate.is_dir():  # a file of that name: it is no run folder, never will be
                raise ConfigError([f"{key}: {candidate} is a file; choose another folder"]) from None
            n += 1
        except OSError as e:
            raise ConfigError([f"{key}: cannot create {candidate} ({e.strerror}); choose a writable folder"]) from None


def cmd_plan(argv: Sequence[str]) -> int:
    from engine.report.display import STATUS_STYLE, console
    from engine.run.pipeline import Options

    opts, overrides = _split_args(argv)
    if opts.get("info"):
        return _print_info(opts, overrides)
    options = Options(only=opts["only"], force=opts["force"], no_cache=bool(opts.get("no_cache")))
    out = []
    for job in _compose_jobs(opts, overrides):
        pipeline = _checked_pipeline(job, remember=True)
        _check_runs_root(pipeline.runs_root)  # plan records content digests in the cache's index
        items = pipeline.plan(options, run_name=str(job.cfg.name))
        out.append({"overrides": job.overrides, "stages": [vars(i) for i in items]})
        if not opts.get("json"):
            from rich.table import Table

            table = Table(title=f"plan: {job.cfg.name} {' '.join(job.overrides)}", title_justify="left")
            for col in ("stage", "type", "status", "key", "why"):
                table.add_column(col, overflow="fold")
            for i in items:
                table.add_row(i.name, i.type, f"[{STATUS_STYLE[i.status]}]{i.status}[/]", (i.key or "")[:10], i.reason)
            console.print(table)
    if opts.get("json"):
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
    return 0


def cmd_dag(argv: Sequence[str]) -> int:
    from engine.run.pipeline import Pipeline

    argv, output = _take_output(argv)
    opts, overrides = _split_args(argv)
    if opts.get("info"):
        return _print_info(opts, overrides)
    fmt = opts.get("format", "mermaid")
    if fmt not in ("mermaid", "dot", "png", "svg"):
        raise UsageError("--format takes mermaid, dot, png or svg")
    job = _compose_jobs(opts, overrides)[0]
    graph = Pipeline(job.cfg, _runs_root(job.cfg)).graph
    text = graph.mermaid() if fmt == "mermaid" else graph.dot()
    if fmt in ("png", "svg"):
        from engine.report.dag_image import render_dot

        path = render_dot(text, fmt, output or Path(f"dag.{fmt}"))
        print(path)
    elif output:
        output.write_text(text, encoding="utf-8")
        print(output)
    else:
        sys.stdout.write(text)
    return 0


def _take_output(argv: Sequence[str]) -> tuple[list[str], Path | None]:
    """dag's `-o FILE` / `--output FILE`, taken out before the overrides are split."""
    rest, output, it = [], None, iter(argv)
    for arg in it:
        if arg in ("-o", "--output"):
            value = next(it, None)
            if value is None:
                raise UsageError(f"{arg} needs a file name")
            output = Path(value)
        elif arg.startswith("--output="):
            output = Path(arg.partition("=")[2])
        else:
            rest.append(arg)
    return rest, output


def _default_runs_root() -> Path:
    return Path(os.environ.get("EDGEPIPE_RUNS", "runs"))


def cmd_runs(argv: Sequence[str]) -> int:
    import argparse

    from engine.store import runs
    from engine.report.display import STATUS_STYLE, console

    ap = argparse.ArgumentParser(prog="edgepipe runs")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    rows = []
    for run_dir in list(runs.iter_runs(a.root))[: a.limit]:
        try:
            r = runs.RunRecord.load(run_dir)
        except (OSError, ValueError, TypeError):
            continue
        rows.append({"time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)), "name": r.name,
                     "status": r.status, "seconds": round(r.seconds, 1), "headline": r.headline, "run_dir": r.run_dir})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"runs in {a.root}", title_justify="left")
    for col in ("time", "name", "status", "seconds", "headline", "folder"):
        table.add_column(col, overflow="fold")
    for r in rows:
        h = r["headline"]
        hv = f"{h['key']} = {h['value']:.4g}" if h and isinstance(h.get("value"), float) else (f"{h['key']} = {h['value']}" if h else "")
        table.add_row(r["time"], r["name"], f"[{STATUS_STYLE.get(r['status'], '')}]{r['status']}[/]",
                      f"{r['seconds']:.1f}", hv, os.path.relpath(r["run_dir"]))
    console.print(table)
    return 0


def cmd_show(argv: Sequence[str]) -> int:
    import argparse

    from engine.store import runs
    from engine.report.display import STATUS_STYLE, console

    ap = argparse.ArgumentParser(prog="edgepipe show")
    ap.add_argument("run", nargs="?", default="latest")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    run_dir = runs.resolve_run(a.root, a.run)
    r = runs.RunRecord.load(run_dir)
    console.print(f"[bold]{r.name}[/] — {r.status} in {r.seconds:.1f} s")
    console.print(f"folder: {run_dir}")
    if r.overrides:
        console.print(f"overrides: {' '.join(r.overrides)}")
    for s in r.stages.values():
        console.print(f"\n[bold]{s.name}[/] ({s.type}) [{STATUS_STYLE.get(s.status, '')}]{s.status}[/] "
                      f"{s.seconds:.1f} s  key {s.key or '-'}")
        if s.error:
            console.print(f"  error: {s.error}")
        if s.path and Path(s.path).is_dir():
            link = Path(run_dir) / "stages" / s.name
            console.print(f"  outputs: {link if link.exists() else s.path}")
            for child in sorted(Path(s.path).iterdir()):
                if child.name != "manifest.json":
                    console.print(f"    {child.name}{'/' if child.is_dir() else ''}")
        for k, v in runs.flat_metrics(s.metrics).items():
            console.print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    import argparse

    from engine.report import page
    from engine.store import runs

    ap = argparse.ArgumentParser(prog="edgepipe report", description="rewrite report.md and report.html of a run "
                                 "from its folder (run.json and the stage outputs); nothing is recomputed")
    ap.add_argument("run", nargs="?", default="latest")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    run_dir = Path(runs.resolve_run(a.root, a.run)).resolve()
    record = runs.RunRecord.load(run_dir)
    record.run_dir = str(run_dir)  # where it is now (a moved or copied folder), not where it ran
    runs.write_report(record)
    print(run_dir / "report.md")
    print(run_dir / page.REPORT_HTML)
    return 0


def cmd_compare(argv: Sequence[str]) -> int:
    import argparse

    from engine.report import compare

    ap = argparse.ArgumentParser(prog="edgepipe compare", description="one row per job, best first: the overrides "
                                 "that differ, the headline and --metrics; writes compare.csv, .md and .html")
    ap.add_argument("runs", nargs="+", help="a sweep folder, or run folders (paths, 'latest' or part of a name)")
    ap.add_argument("--metrics", default=",".join(compare.DEFAULT_METRICS),
                    help="comma-separated metric names (top1, drop_points, seconds, or full keys such as eval.top1.onnx)")
    ap.add_argument("--out", type=Path, default=None, help="folder for compare.csv/.md/.html "
                    "(default: the sweep folder, else the current folder)")
    ap.add_argument("--width", type=int, default=None, help="terminal columns for the table (default: the terminal's)")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    try:
        paths = compare.run(a.runs, a.root, [m for m in a.metrics.split(",") if m], a.out, a.width)
    except compare.CompareError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {', '.join(p.name for p in paths)} in {paths[0].parent}")
    return 0


def cmd_reproduce(argv: Sequence[str]) -> int:
    import argparse

    from engine.job import reproduce

    ap = argparse.ArgumentParser(prog="edgepipe reproduce")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--verify", action="store_true", help="recompute every stage and compare digests or metrics")
    ap.add_argument("--tolerance", type=float, default=0.01, help="metric tolerance for --verify (absolute)")
    a = ap.parse_args(argv)
    return reproduce.reproduce(a.run_dir, verify=a.verify, tolerance=a.tolerance)


def cmd_gc(argv: Sequence[str]) -> int:
    import argparse

    from engine.store import gc

    ap = argparse.ArgumentParser(prog="edgepipe gc")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    return gc.collect(a.root, dry_run=a.dry_run)


def _cache_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """push's and pull's arguments: `cache.*=...` overrides (for a run's saved config) and the rest."""
    cache = [a for a in args if a.lstrip("+").startswith("cache.") and "=" in a]
    return cache, [a for a in args if a not in cache]


def _saved_run_config(ref: str, root: Path, cache_overrides: list[str]):
    """A run's saved config with `cache.*` overrides applied, its record, and the cache it used."""
    import yaml
    from omegaconf import OmegaConf, open_dict

    from engine.job import reproduce
    from engine.store import runs

    cfg, record = reproduce.load_run(runs.resolve_run(root, ref))
    with open_dict(cfg):
        for override in cache_overrides:
            key, _, value = override.lstrip("+").partition("=")
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, force_add=True)
    return cfg, record


def cmd_push(argv: Sequence[str]) -> int:
    """Upload the cache entries a run used to cache.remote (the run's, or one given here)."""
    from engine.store import remote
    from engine.store.cache import Cache

    cache_overrides, rest = _cache_overrides(argv)
    root = _default_runs_root()
    if len(rest) > 1:
        raise UsageError(f"push takes one run (default: latest), got {' '.join(rest)}")
    cfg, record = _saved_run_config(rest[0] if rest else "latest", root, cache_overrides)
    shared = remote.from_config(cfg)
    if shared is None:
        raise UsageError(f"{record.run_dir}: its config sets no cache.remote; name one: edgepipe push "
                         f"{rest[0] if rest else 'latest'} cache.remote=s3://bucket/prefix")
    return remote.push(record, Cache(Path(record.runs_root) / "cache"), shared)


def cmd_pull(argv: Sequence[str]) -> int:
    """Fetch from cache.remote what a run's config, or the config these overrides compose, needs."""
    from engine.store import remote
    from engine.run.pipeline import Pipeline

    opts, overrides = _split_args(argv)
    cache_overrides, rest = _cache_overrides(overrides)
    if len(rest) == 1 and "=" not in rest[0] and not rest[0].startswith(("+", "~")):
        root = _default_runs_root()
        cfg, _ = _saved_run_config(rest[0], root, cache_overrides)
        pipelines = [Pipeline(cfg, root)]  # this machine's cache, wherever the run was made
    else:
        pipelines = [Pipeline(job.cfg, _runs_root(job.cfg)) for job in _compose_jobs(opts, overrides)]
    for p in pipelines:
        _check_runs_root(p.runs_root)
    return max(remote.pull(p) for p in pipelines)


def cmd_init(argv: Sequence[str]) -> int:
    import argparse

    from engine.cli import init_project

    ap = argparse.ArgumentParser(prog="edgepipe init", description="write a project skeleton; never overwrites a file")
    ap.add_argument("dir", nargs="?", type=Path, default=Path("."))
    a = ap.parse_args(argv)
    for line in init_project.init(a.dir):
        print(line)
    where = "" if a.dir == Path(".") else f"cd {a.dir} && "
    print(f"next: put images in {a.dir / 'data'}/<class name>/, then {where}edgepipe plan +experiment=my_experiment")
    return 0


def cmd_selftest(argv: Sequence[str]) -> int:
    import argparse
    import tempfile

    from boards import emulation

    ap = argparse.ArgumentParser(prog="edgepipe selftest",
                                 description="run a board package's golden self-test before copying it to the board")
    ap.add_argument("package", type=Path, help="the package folder, its package.zip, or the package stage's output")
    ap.add_argument("--emulate", action="store_true",
                    help="on the board's instruction set (qemu-user and an ARM Debian userland, built once)")
    a = ap.parse_args(argv)
    if not a.package.exists():
        raise UsageError(f"{a.package}: no such package folder or zip")
    with tempfile.TemporaryDirectory(prefix="edgepipe-selftest-") as scratch:
        try:
            return emulation.selftest(a.package, a.emulate, Path(scratch))
        except emulation.EmulationError as e:
            print(f"edgepipe: {e}", file=sys.stderr)
            return e.status


VERBS = {"run": cmd_run, "plan": cmd_plan, "dag": cmd_dag, "runs": cmd_runs, "show": cmd_show,
         "report": cmd_report, "reproduce": cmd_reproduce, "compare": cmd_compare, "gc": cmd_gc, "init": cmd_init,
         "push": cmd_push, "pull": cmd_pull, "selftest": cmd_selftest}


def _shell_completion(argv: list[str]) -> int:
    from engine.cli import completion
    from engine.config.compose import ComposeError

    spec = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "")
    try:
        return completion.main(spec, list(VERBS), _VALUE_FLAGS)
    except (ValueError, ComposeError) as e:
        print(f"edgepipe: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0
    if argv[0] in ("--version", "-V"):
        from engine import __version__

        print(f"edgepipe {__version__}")
        return 0
    if argv[0] in ("-sc", "--shell-completion") or argv[0].startswith("--shell-completion="):
        return _shell_completion(argv)
    verb, rest = argv[0], argv[1:]
    if verb in ("run", "plan", "dag", "push", "pull") and ("-h" in rest or "--help" in rest):
        print(USAGE.strip())  # the other verbs have argparse's own --help
        return 0
    if verb not in VERBS:
        from engine.errors import did_you_mean

        print(f"edgepipe: unknown command '{verb}'{did_you_mean(verb, list(VERBS))}\n\n{USAGE.strip()}", file=sys.stderr)
        return 2
    from engine.config.compose import ComposeError
    from engine.errors import ConfigError, PluginError, RemoteError
    from engine.cli.init_project import InitError
    from engine.store.runs import RunFolderError

    try:
        return VERBS[verb](rest)
    except ConfigError as e:
        print("edgepipe: invalid config:\n" + "\n".join(f"  - {p}" for p in e.problems), file=sys.stderr)
        return 2
    except (ComposeError, UsageError, FileNotFoundError, RunFolderError, PluginError, InitError) as e:
        print(f"edgepipe: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:  # the shared cache cannot be reached: a runtime failure
        print(f"edgepipe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgepipe: interrupted; completed stages stay cached, the next run resumes from them", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a folder removed under a running command
        print(f"edgepipe: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line for the user, the traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        logging.getLogger("edgepipe").info("internal error", exc_info=True)  # the run's edgepipe.log
        first = (str(e).splitlines() or [""])[0]
        print(f"edgepipe: internal error ({type(e).__name__}: {first}); set {DEBUG_ENV}=1 for the traceback "
              f"and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
