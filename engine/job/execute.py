"""One job: its run folder, its log, its validated pipeline and its run. `edgepipe run` and every job of
a sweep (any Hydra launcher) come here, so a sweep job is a run like any other."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from engine.errors import UsageError

# --cfg as in Hydra apps (`--cfg resolved` is the job config resolved, kept for older scripts)
CFG_PARTS = ("job", "hydra", "all", "resolved")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may run again with stderr redirected, as
    in tests; a handler bound to the first stream would write to a closed one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class ConsoleFormatter(logging.Formatter):
    """The console's lines with every control character written out: a stage's error or a file name
    with terminal escapes in it is shown, never obeyed."""

    def format(self, record: logging.LogRecord) -> str:
        from engine.report.display import plain

        return plain(super().format(record))


def setup_logging(run_dir: Path | None) -> None:
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
        sh.setFormatter(ConsoleFormatter("edgepipe: %(levelname)s: %(message)s"))
        sh._edgepipe_console = True  # type: ignore[attr-defined]
        ep.addHandler(sh)


def runs_root_of(cfg) -> Path:
    return Path(str(cfg.runs_root))


def check_runs_root(root: Path) -> None:
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


def print_cfg(jobs, part: str, resolve: bool) -> None:
    """What Hydra's --cfg prints: the job config, Hydra's own config (the `hydra` node without its
    help texts), or both. --resolve resolves against the whole config (hydra.run.dir names
    ${runs_root}); a value that only a sweep job has (hydra.job.num) stays as written."""
    from omegaconf import OmegaConf

    if part not in CFG_PARTS:
        raise UsageError(f"--cfg {part}: use one of {', '.join(CFG_PARTS[:3])} "
                         "(add --resolve to resolve interpolations)")
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


def validated_pipeline(job, options, sweep: bool = False):
    """The job's pipeline, validated (config, --only/--force names, runs_root, overrides) or a
    ConfigError. A single run's is taken from plan_memo when the same config and code were validated
    before (and remembered otherwise), and its overrides without effect are warned about; a sweep
    warns once for all its jobs (sweep.multirun)."""
    from engine.contract.fetching import fetching

    with fetching():  # what the config names by name (pretrained weights) is fetched now, before any stage
        pipeline = checked_pipeline(job, remember=not sweep, warn=not sweep)
    pipeline.graph.select(options.only)
    pipeline.forced(options)
    check_runs_root(pipeline.runs_root)
    pipeline.cache.check_remote()  # an unreachable cache.remote: one line, before anything is written
    return pipeline


def checked_pipeline(job, remember: bool, warn: bool = True):
    """Pipeline of the job with its overrides checked (and what they shadow warned about)."""
    from engine.run import plan_memo
    from engine.run.pipeline import Pipeline

    remembered = plan_memo.load(job) if remember else None
    if remembered is not None:
        _check_run_name(job)  # validation, which checks it too, is skipped
        # the config itself is read (made from compose_cache's plain data) only if a stage must run
        pipeline = Pipeline(lambda: job.cfg, job.runs_root, remembered, cache_remote=job.cache_remote)
        warnings = remembered.warnings
    else:
        pipeline = Pipeline(job.cfg, job.runs_root)
        _check_overrides(job, pipeline)
        warnings = shadowed(job.overrides, pipeline)
        if remember:
            plan_memo.store(job, pipeline, warnings)
    print_warnings(warnings if warn else [])
    return pipeline


def _check_run_name(job) -> None:
    """The run folder is named after `name`: checked on every path, a remembered plan's too."""
    from engine.config.compose import run_name_problems
    from engine.errors import ConfigError

    problems = run_name_problems(job.name)
    if problems:
        raise ConfigError(problems)


def shadowed(overrides: list[str], pipeline) -> list[str]:
    from engine.config.validate import shadowed_overrides

    return shadowed_overrides(overrides, pipeline.stages)


def print_warnings(notes: list[str]) -> None:
    for note in notes:
        print(f"edgepipe: warning: {note}", file=sys.stderr)


def execute_job(job, pipeline, options, run_dir: Path, title: str, summary_table: bool = True):
    """Run one validated job in its folder (its .hydra/ already written): run.json, runs/latest, the
    progress display and the summary (a job in a parallel launcher's worker leaves its table to the
    sweep's end). A single run and every sweep job (any launcher) come here."""
    from engine import __version__
    from engine.report.display import Display, summary
    from engine.store import runs

    setup_logging(run_dir)
    record = runs.RunRecord(name=job.name, run_dir=str(run_dir.resolve()),
                            runs_root=str(pipeline.runs_root.resolve()), overrides=job.overrides,
                            edgepipe_version=__version__, config_sources=job.sources, cwd=os.getcwd(),
                            needs={name: dict(s.entry.needs) for name, s in pipeline.stages.items()},
                            choices=job.choices())
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


def make_run_dir(run_dir: Path, key: str = "hydra.run.dir") -> Path:
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
