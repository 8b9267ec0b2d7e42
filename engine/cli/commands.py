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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import UsageError
from engine.job.execute import (
    check_runs_root,
    checked_pipeline,
    execute_job,
    make_run_dir,
    print_cfg,
    runs_root_of,
    validated_pipeline,
)

USAGE = __doc__

# Flags of our own on run/plan/dag; everything else on those verbs is a Hydra override.
_VALUE_FLAGS = {"--only", "--force", "--format", "--cfg", "--config-dir", "-cd", "--config-path", "-cp",
                "--config-name", "-cn", "--jobs", "-j", "--max-memory"}
_BOOL_FLAGS = {"--keep-going", "--no-cache", "--json", "-m", "--multirun", "--resolve", "--info"}


# Set to show the traceback of an unexpected error (a bug) instead of one line.
DEBUG_ENV = "EDGEPIPE_DEBUG"


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
        print_cfg([job], opts["cfg"], bool(opts.get("resolve")))
        return 0
    pipeline = validated_pipeline(job, options)  # before anything is written to runs/
    run_dir = make_run_dir(job.run_dir)
    from engine.config import compose

    compose.write_hydra_dir(run_dir, job)
    record = execute_job(job, pipeline, options, run_dir, title=job.name)
    return 1 if record.status != "ok" else 0


def cmd_plan(argv: Sequence[str]) -> int:
    from engine.report.display import console, plain, safe, styled_status
    from engine.run.pipeline import Options

    opts, overrides = _split_args(argv)
    if opts.get("info"):
        return _print_info(opts, overrides)
    options = Options(only=opts["only"], force=opts["force"], no_cache=bool(opts.get("no_cache")))
    out = []
    for job in _compose_jobs(opts, overrides):
        pipeline = checked_pipeline(job, remember=True)
        check_runs_root(pipeline.runs_root)  # plan records content digests in the cache's index
        items = pipeline.plan(options, run_name=job.name)
        downloads = pipeline.downloads(options)
        out.append({"overrides": job.overrides, "stages": [vars(i) for i in items],
                    "downloads": [{"url": url, "path": path} for url, path in downloads]})
        if not opts.get("json"):
            from rich.table import Table

            table = Table(title=safe(f"plan: {job.name} {' '.join(job.overrides)}"), title_justify="left")
            for col in ("stage", "type", "status", "key", "why"):
                table.add_column(col, overflow="fold")
            for i in items:
                table.add_row(safe(i.name), safe(i.type), styled_status(i.status), (i.key or "")[:10], safe(i.reason))
            console.print(table)
            for url, path in downloads:
                print(plain(f"`edgepipe run` will download {url} to {path} first (offline: put the file there)"))
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
    graph = Pipeline(job.cfg, runs_root_of(job.cfg)).graph
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

    from engine.report.display import console, safe, styled_status
    from engine.store import runs

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

    table = Table(title=f"runs in {safe(a.root)}", title_justify="left")
    for col in ("time", "name", "status", "seconds", "headline", "folder"):
        table.add_column(col, overflow="fold")
    for r in rows:
        h = r["headline"]
        hv = (f"{h['key']} = {h['value']:.4g}" if h and isinstance(h.get("value"), float)
              else (f"{h['key']} = {h['value']}" if h else ""))
        table.add_row(r["time"], safe(r["name"]), styled_status(r["status"]), f"{r['seconds']:.1f}", safe(hv),
                      safe(os.path.relpath(r["run_dir"])))
    console.print(table)
    return 0


def cmd_show(argv: Sequence[str]) -> int:
    import argparse

    from engine.report.display import console, safe, styled_status
    from engine.store import runs

    ap = argparse.ArgumentParser(prog="edgepipe show")
    ap.add_argument("run", nargs="?", default="latest")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    run_dir = runs.resolve_run(a.root, a.run)
    r = runs.RunRecord.load(run_dir)
    console.print(f"[bold]{safe(r.name)}[/] — {safe(r.status)} in {r.seconds:.1f} s")
    console.print(f"folder: {safe(run_dir)}")
    if r.overrides:
        console.print(f"overrides: {safe(' '.join(map(str, r.overrides)))}")
    for s in r.stages.values():
        console.print(f"\n[bold]{safe(s.name)}[/] ({safe(s.type)}) {styled_status(s.status)} "
                      f"{s.seconds:.1f} s  key {safe(s.key or '-')}")
        if s.error:
            console.print(f"  error: {safe(s.error)}")
        if s.path and Path(s.path).is_dir():
            link = Path(run_dir) / "stages" / s.name
            console.print(f"  outputs: {safe(link if link.exists() else s.path)}")
            for child in sorted(Path(s.path).iterdir()):
                if child.name != "manifest.json":
                    console.print(f"    {safe(child.name)}{'/' if child.is_dir() else ''}")
        for k, v in runs.flat_metrics(s.metrics).items():
            console.print(f"  {safe(k)}: {v:.4g}" if isinstance(v, float) else f"  {safe(k)}: {safe(v)}")
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    import argparse

    from engine.report import page
    from engine.report.run_report import write_report
    from engine.store import runs

    ap = argparse.ArgumentParser(prog="edgepipe report", description="rewrite report.md and report.html of a run "
                                 "from its folder (run.json and the stage outputs); nothing is recomputed")
    ap.add_argument("run", nargs="?", default="latest")
    ap.add_argument("--root", type=Path, default=_default_runs_root())
    a = ap.parse_args(argv)
    run_dir = Path(runs.resolve_run(a.root, a.run)).resolve()
    record = runs.RunRecord.load(run_dir)
    record.run_dir = str(run_dir)  # where it is now (a moved or copied folder), not where it ran
    write_report(record)
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
                    help="comma-separated metric names (top1, drop_points, seconds, or full keys such as "
                         "eval.top1.onnx)")
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
    from engine.cli import sync
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
    return sync.push(record, Cache(Path(record.runs_root) / "cache"), shared)


def cmd_pull(argv: Sequence[str]) -> int:
    """Fetch from cache.remote what a run's config, or the config these overrides compose, needs."""
    from engine.cli import sync
    from engine.run.pipeline import Pipeline

    opts, overrides = _split_args(argv)
    cache_overrides, rest = _cache_overrides(overrides)
    if len(rest) == 1 and "=" not in rest[0] and not rest[0].startswith(("+", "~")):
        root = _default_runs_root()
        cfg, _ = _saved_run_config(rest[0], root, cache_overrides)
        pipelines = [Pipeline(cfg, root)]  # this machine's cache, wherever the run was made
    else:
        pipelines = [Pipeline(job.cfg, runs_root_of(job.cfg)) for job in _compose_jobs(opts, overrides)]
    for p in pipelines:
        check_runs_root(p.runs_root)
    return max(sync.pull(p) for p in pipelines)


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


VERBS = {"run": cmd_run, "plan": cmd_plan, "dag": cmd_dag, "runs": cmd_runs, "show": cmd_show,
         "report": cmd_report, "reproduce": cmd_reproduce, "compare": cmd_compare, "gc": cmd_gc, "init": cmd_init,
         "push": cmd_push, "pull": cmd_pull}


def plugin_commands() -> dict[str, Any]:
    """Verbs that installed packages add through the `edgepipe.commands` entry points (boards/ adds
    `selftest`): name -> entry point, loaded only when its verb is called."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="edgepipe.commands") if ep.name not in VERBS}


def _load_plugin(ep: Any) -> Any:
    """A plugin verb's main(argv); a package whose entry point cannot be imported is a PluginError
    (one line, exit 2) naming it, not an internal error of edgepipe's."""
    from engine.errors import PluginError

    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - whatever another distribution's import raises
        raise PluginError(f"command '{ep.name}' ({ep.value}, an edgepipe.commands entry point) cannot be "
                          f"loaded ({type(e).__name__}: {e}); reinstall or remove the package that adds it") from None


def _shell_completion(argv: list[str]) -> int:
    from engine.cli import completion
    from engine.config.compose import ComposeError

    spec = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "")
    try:
        return completion.main(spec, [*VERBS, *plugin_commands()], _VALUE_FLAGS)
    except (ValueError, ComposeError) as e:
        print(f"edgepipe: {e}", file=sys.stderr)
        return 2


def plain(value: Any) -> str:
    """What an error quotes from a file or a config, with its control characters written out: shown,
    never obeyed by the terminal (display.plain, imported only when an error is shown)."""
    from engine.report.display import plain as shown

    return shown(value)


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
    plugin = None  # a verb another distribution adds (edgepipe.commands)
    if verb not in VERBS:
        plugins = plugin_commands()
        if verb not in plugins:
            from engine.errors import did_you_mean

            verbs = [*VERBS, *plugins]
            print(f"edgepipe: unknown command '{verb}'{did_you_mean(verb, verbs)}\n\n{USAGE.strip()}",
                  file=sys.stderr)
            return 2
        plugin = plugins[verb]
    from engine.cli.init_project import InitError
    from engine.config.compose import ComposeError, interpolation_problem
    from engine.errors import ConfigError, PluginError, RemoteError
    from engine.store.runs import RunFolderError

    try:
        command = VERBS[verb] if plugin is None else _load_plugin(plugin)
        return command(rest)
    except ConfigError as e:
        print("edgepipe: invalid config:\n" + "\n".join(f"  - {plain(p)}" for p in e.problems), file=sys.stderr)
        return 2
    except (ComposeError, UsageError, FileNotFoundError, RunFolderError, PluginError, InitError) as e:
        print(f"edgepipe: {plain(e)}", file=sys.stderr)
        return 2
    except RemoteError as e:  # the shared cache cannot be reached: a runtime failure
        print(f"edgepipe: {plain(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgepipe: interrupted; completed stages stay cached, the next run resumes from them", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a folder removed under a running command
        print(f"edgepipe: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if (problem := interpolation_problem(e)) is not None:  # a value read wherever the config is used
            print(f"edgepipe: invalid config:\n  - {plain(problem)}", file=sys.stderr)
            return 2
        if os.environ.get(DEBUG_ENV):
            raise
        logging.getLogger("edgepipe").info("internal error", exc_info=True)  # the run's edgepipe.log
        first = (str(e).splitlines() or [""])[0]
        print(f"edgepipe: internal error ({type(e).__name__}: {plain(first)}); set {DEBUG_ENV}=1 for the "
              f"traceback and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
