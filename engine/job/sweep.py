"""`edgepipe run -m`: sweeps on Hydra's own sweeper and launcher plugins.

The sweeper (`hydra/sweeper=basic`, the grid, or `optuna`) draws the jobs, the launcher (`basic`: one
after another in this process; `joblib`, `submitit_local`, `submitit_slurm`, `ray`: in other
processes or on a cluster) runs each through Hydra's `run_job`, which composes the job's config, makes
its folder (hydra.sweep.dir/hydra.sweep.subdir) and writes `.hydra/`. The job function (`Task`) then
runs the same pipeline code as a single run. Every job reads and writes the one cache under
runs_root through the per-key locks, so a stage common to several jobs is computed once, whichever
job gets there first, and a sweep run again after an interruption recomputes only what did not finish.

A grid sweep is expanded and every job validated here, before anything is written to runs/; an
Optuna trial is only known when drawn, so an invalid one fails that trial (a one-line error) and the
study goes on. Each job leaves `sweep_job.json` in its folder; `after_sweep` reads them at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from engine.config.compose import ComposeError
from engine.job.execute import ConsoleFormatter

JOB_RESULT = "sweep_job.json"  # what each job leaves in its folder for after_sweep
OPTUNA_RESULTS = "optimization_results.yaml"  # what the Optuna sweeper writes in the sweep folder
RAY_HINT = "pip install -e '.[ray]' in edgepipe's checkout (or pip install hydra-ray-launcher)"


@dataclass
class Task:
    """The job function Hydra's launchers call with each job's config (picklable by reference, so a
    joblib/submitit/ray worker imports this module and runs the same code)."""

    options: Any  # runner.Options
    total: int | None  # jobs in the sweep, when known (for the title)
    threads: int | None  # OpenMP/torch threads per job in a parallel launcher (None: leave alone)
    in_process: bool  # the basic launcher: this process, the live display when on a terminal

    def __call__(self, cfg: DictConfig) -> float | None:
        """The job's headline value, or None when it failed or has none: the Optuna sweeper marks
        that trial failed and goes on (an exception would also make Hydra print a worker dump)."""
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        run_dir, num = Path(hc.runtime.output_dir), int(hc.job.num)
        overrides = [str(o) for o in hc.overrides.task]
        if not self.in_process:
            os.environ["TTY_COMPATIBLE"] = "0"  # plain lines: several workers share one terminal
            _limit_threads(self.threads)
            _own_start_method()
            _first_lines_on_the_console()
        result = {"num": num, "overrides": overrides, "run_dir": str(run_dir.resolve()),
                  "status": "failed", "headline": None, "error": None,
                  "threads": os.environ.get("OMP_NUM_THREADS"),  # what this job's torch/OpenMP used
                  "stage_jobs": getattr(self.options, "jobs", None)}  # its stages run at the same time
        try:
            result.update(self._run(cfg, hc, run_dir, num, overrides))
        except Exception as e:  # noqa: BLE001 - every failure is this job's one line, not a worker dump
            result["error"] = _one_line(e)
            from engine.report.display import plain

            print(plain(f"edgepipe: {_job_name(result, self.total)} failed: {result['error']}"), file=sys.stderr)
        _write_json(run_dir / JOB_RESULT, result)
        value = (result["headline"] or {}).get("value") if result["status"] == "ok" else None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def _run(self, cfg: DictConfig, hc: DictConfig, run_dir: Path, num: int, overrides: list[str]) -> dict:
        from engine.config import compose
        from engine.job import execute

        hydra_cfg = OmegaConf.create(OmegaConf.to_container(hc, resolve=False))
        job = compose.Job(overrides, cfg, hydra_cfg, run_dir, Path(str(hc.sweep.dir)),
                          compose.describe_sources(hydra_cfg))
        pipeline = execute.validated_pipeline(job, self.options, sweep=True)
        compose.write_resolved(run_dir, job)  # Hydra wrote config/hydra/overrides.yaml already
        of = f"/{self.total}" if self.total else ""
        record = execute.execute_job(job, pipeline, self.options, run_dir, summary_table=self.in_process,
                                 title=f"{cfg.name} [job {num + 1}{of}: {' '.join(overrides)}]")
        failed = [f"{s.name}: {s.error}" for s in record.stages.values() if s.error]
        return {"status": record.status, "headline": record.headline,
                "error": failed[0] if failed else None}


def _job_name(result: dict, total: int | None = None) -> str:
    of = f"/{total}" if total else ""
    return f"job {result.get('num', 0) + 1}{of} ({' '.join(result.get('overrides', []))})"


def _one_line(e: Exception) -> str:
    from engine.config.compose import interpolation_problem
    from engine.errors import ConfigError

    if isinstance(e, ConfigError):
        return "invalid config: " + "; ".join(e.problems)
    if (problem := interpolation_problem(e)) is not None:
        return f"invalid config: {problem}"
    first = (str(e).splitlines() or [""])[0]
    if isinstance(e, OSError) or type(e).__module__.startswith("engine."):  # edgepipe's own: already user-facing
        return first or type(e).__name__
    return f"internal error ({type(e).__name__}: {first})"


def _limit_threads(threads: int | None) -> None:
    """cores / parallel jobs OpenMP and torch threads: two torch processes each spinning every core
    slow each other down tenfold. A thread count the user set in the environment wins."""
    if not threads or "OMP_NUM_THREADS" in os.environ:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # a reused worker process that imported torch for an earlier job
        sys.modules["torch"].set_num_threads(threads)


class _FirstLine(ConsoleFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return (super().format(record).splitlines() or [""])[0]


def _first_lines_on_the_console() -> None:
    """In a worker, edgepipe's warnings and errors reach the shared terminal as one line each (a
    failed stage's traceback stays in its run's edgepipe.log); the job's error closes the sweep."""
    from engine.job.execute import setup_logging

    setup_logging(None)  # edgepipe's console handler, which each job's setup_logging keeps
    for handler in logging.getLogger("edgepipe").handlers:
        if getattr(handler, "_edgepipe_console", False):
            handler.setFormatter(_FirstLine("edgepipe: %(levelname)s: %(message)s"))


def _own_start_method() -> None:
    """A joblib (loky) worker makes 'loky' its default start method, which a process it spawns
    (the dataset stage's decoders, parallel stages) cannot import: back to the platform's own."""
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method(None, force=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- parent
def multirun(opts: dict, overrides: list[str], options) -> int:
    """`edgepipe run -m OVERRIDES`: validate, then sweep on the chosen Hydra sweeper and launcher."""
    from engine.config import compose

    cdir = Path(opts["config_dir"]) if opts.get("config_dir") else None
    parsed = compose.parse_overrides(list(overrides))
    _check_ray(parsed)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose.compose(plain, cdir)
    sweeper = str(base.hydra_cfg.runtime.choices.get("hydra/sweeper", "basic"))
    launcher = str(base.hydra_cfg.runtime.choices.get("hydra/launcher", "basic"))
    grid = sweeper == "basic"
    if grid:
        jobs = [compose.compose(ov, cdir) for ov in compose.expand_sweep(overrides, cdir)]
    else:
        _check_search_space(parsed, base, sweeper)
        jobs = [base]
    if opts.get("cfg"):
        from engine.job.execute import print_cfg

        print_cfg(jobs, opts["cfg"], bool(opts.get("resolve")))
        return 0
    from engine.job.execute import make_run_dir, print_warnings, shadowed, validated_pipeline

    # Validate every job before anything is written to runs/ (an Optuna trial: the base config).
    pipelines = [validated_pipeline(job, options, sweep=True) for job in jobs]
    check_known_job_folders(jobs)
    print_warnings(shadowed(list(overrides), pipelines[0]))  # a swept key too (an Optuna search of one)
    sweep_dir = make_run_dir(base.sweep_dir, "hydra.sweep.dir")
    hydra_overrides = _hydra_overrides(parsed, base, sweep_dir, pipelines[0], sweeper)
    total = len(jobs) if grid else _n_trials(base)
    at_once = _jobs_at_once(base.hydra_cfg, launcher, sweeper, len(jobs))
    if at_once and not opts.get("jobs"):  # parallel jobs share the cores: fewer parallel stages each
        options = dataclasses.replace(options, jobs=max(1, options.jobs // at_once))
    task = Task(options=options, total=total, in_process=launcher == "basic",
                threads=_threads_per_job(base.hydra_cfg, launcher, at_once))
    error = _launch(list(overrides) + hydra_overrides, cdir, task, sweeper)
    return after_sweep(sweep_dir, collect_results(sweep_dir), error=error, grid=grid)


def _check_ray(parsed: list) -> None:
    import importlib.util

    for o in parsed:
        if o.key_or_group == "hydra/launcher" and o.value() == "ray" \
                and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
            raise ComposeError(f"{o.input_line}: hydra-ray-launcher is not installed; {RAY_HINT}")


def _check_search_space(parsed: list, base, sweeper: str) -> None:
    """Each sweep override (and hydra.sweeper.params entry) as the Optuna sweeper will read it: one
    that it cannot turn into a distribution is a one-line error naming it, before anything runs."""
    if sweeper != "optuna":
        return
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    from engine.config import compose

    directions = OmegaConf.select(base.hydra_cfg, "sweeper.direction")
    for d in (directions if OmegaConf.is_list(directions) else [directions]):
        if str(getattr(d, "name", d)) not in ("minimize", "maximize"):
            raise ComposeError(f"hydra.sweeper.direction={d}: use maximize or minimize (default: the "
                               f"pipeline's headline_direction)")

    node = OmegaConf.select(base.hydra_cfg, "sweeper.params")
    params = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else (node or {})
    for o in compose.parse_overrides([f"{k}={v}" for k, v in params.items()], "hydra.sweeper.params") + parsed:
        if not o.is_sweep_override():
            continue
        if o.is_hydra_override():
            raise ComposeError(f"override '{o.input_line}': Hydra's own settings cannot be swept")
        try:
            create_optuna_distribution_from_override(o)
        except Exception as e:  # noqa: BLE001 - the plugin raises ValueError, NotImplementedError, ...
            raise ComposeError(f"override '{o.input_line}': the Optuna sweeper cannot search it "
                               f"({compose.one_line(str(e)) or type(e).__name__}); use interval(low,high), "
                               f"tag(log, interval(low,high)), int(interval(a,b)), choice(a,b) or range(a,b)") from None


def _given(parsed: list, key: str) -> bool:
    return any(o.key_or_group == key for o in parsed)


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_overrides(parsed: list, base, sweep_dir: Path, pipeline, sweeper: str) -> list[str]:
    """What edgepipe adds to the user's overrides for Hydra: the sweep folder made unique above, no
    logging set up by Hydra (edgepipe's own goes to each run's edgepipe.log), and for Optuna the
    experiment's headline direction and failed trials that do not stop the study (unless given)."""
    extra = [f"hydra.sweep.dir={_quoted(sweep_dir)}"]
    choices = base.hydra_cfg.runtime.choices
    for group in ("hydra/job_logging", "hydra/hydra_logging"):
        if not _given(parsed, group) and choices.get(group) == "default":
            extra.append(f"{group}=none")
    if sweeper == "optuna":
        if not _given(parsed, "hydra.sweeper.direction"):
            extra.append(f"hydra.sweeper.direction={headline_direction(pipeline.spec)}")
        if not _given(parsed, "hydra.sweeper.max_failure_rate"):
            extra.append("hydra.sweeper.max_failure_rate=1.0")
    return extra


def headline_direction(spec) -> str:
    """The pipeline's `headline_direction`, else minimize for a loss, error, drop or time, else maximize."""
    from engine.report.compare import lower_is_better

    if spec.headline_direction:
        return spec.headline_direction
    return "minimize" if spec.headline and lower_is_better(spec.headline) else "maximize"


def _n_trials(base) -> int | None:
    value = OmegaConf.select(base.hydra_cfg, "sweeper.n_trials")
    return int(value) if isinstance(value, int) else None


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _jobs_at_once(hydra_cfg: DictConfig, launcher: str, sweeper: str, grid_jobs: int) -> int | None:
    """How many jobs the launcher runs at the same time on this machine (None: the basic launcher, one
    at a time in this process, or a cluster, where each job has its own node share)."""
    node = hydra_cfg.launcher
    if launcher == "basic" or launcher.startswith("submitit_slurm"):
        return None
    batch = int(OmegaConf.select(hydra_cfg, "sweeper.n_jobs", default=0) or 0) if sweeper != "basic" else grid_jobs
    at_once = batch or _cpus()
    n_jobs = OmegaConf.select(node, "n_jobs", default=None)
    if isinstance(n_jobs, int):  # joblib: -1 is every core, -2 all but one, ...
        at_once = min(at_once, n_jobs if n_jobs > 0 else max(1, _cpus() + 1 + n_jobs))
    return max(1, at_once)


def _threads_per_job(hydra_cfg: DictConfig, launcher: str, at_once: int | None) -> int | None:
    """cores / jobs running at once on this machine; a job given cpus_per_task (submitit) gets those."""
    per_task = OmegaConf.select(hydra_cfg.launcher, "cpus_per_task", default=None)
    if per_task:
        return int(per_task)
    return max(1, _cpus() // at_once) if at_once else None


def _launch(overrides: list[str], cdir: Path | None, task: Task, sweeper: str) -> str | None:
    """Compose the sweep's config as Hydra's multirun does and hand it to the sweeper plugin, which
    instantiates the launcher. Returns a one-line error when the sweep as a whole stopped."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    from engine.config import compose

    user_dir = compose.user_config_dir(cdir)
    parsed = compose.parse_overrides(overrides)
    with compose.hydra_session(user_dir):
        with compose.composition_errors(parsed, user_dir):
            hydra = GlobalHydra.instance().hydra
            cfg = hydra.compose_config(compose.config_name(), overrides, run_mode=RunMode.MULTIRUN)
        # the sweep's own composition, before Callbacks and the plugins instantiate anything in it
        compose.check_targets(OmegaConf.to_container(cfg, resolve=False), overrides, user_dir)
        from hydra._internal.callbacks import Callbacks

        context = HydraContext(config_loader=CheckedLoader(GlobalHydra.instance().config_loader()),
                               callbacks=Callbacks(cfg))
        OmegaConf.save(cfg, Path(str(cfg.hydra.sweep.dir)) / "multirun.yaml")  # any sweeper, as Hydra's basic does
        _quiet_plugins()
        try:
            sweep = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=task)
            sweep.sweep(arguments=[str(o) for o in cfg.hydra.overrides.task])
        except (KeyboardInterrupt, ComposeError):
            raise
        except Exception as e:  # noqa: BLE001 - a launcher or sweeper failure: one line, not a dump
            first = (str(e).splitlines() or [""])[0]
            return f"the {sweeper} sweeper stopped: {type(e).__name__}: {first}"
    return None


class CheckedLoader:
    """Hydra's config loader, with each job's folder checked (check_job_folders) when a launcher loads
    that job's config: every launcher does so before run_job makes the folder and writes `.hydra/` (in
    this process, or in a joblib/submitit worker, which unpickles this class by reference)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        config = self.loader.load_sweep_config(master_config, sweep_overrides)
        check_job_folders(config)
        return config

    def __getattr__(self, name: str) -> Any:  # the rest is Hydra's loader's
        if name == "loader":  # not set yet (unpickling): no recursion through self.loader
            raise AttributeError(name)
        return getattr(self.loader, name)


def check_known_job_folders(jobs: list) -> None:
    """check_job_folders of every job known before the sweep starts (a grid's; an Optuna study's base
    config), so that a folder that would leave is a config error before anything is written."""
    for num, job in enumerate(jobs):
        full = OmegaConf.create({**OmegaConf.to_container(job.cfg, resolve=False),
                                 "hydra": OmegaConf.to_container(job.hydra_cfg, resolve=False)})
        check_job_folders(full, num)


def check_job_folders(config: DictConfig, num: int = 0) -> None:
    """A ComposeError unless the job's folder (hydra.sweep.dir/hydra.sweep.subdir) stays inside the sweep
    folder and its config folder (hydra.output_subdir) inside the job's: each part a name allowed by
    engine.contract.names. The subdir is resolved as the launcher will (hydra.job.num and id, when only
    the launcher knows them, stand in as `num` and <job name>_<num>: launchers make them of digits and
    hydra.job.name)."""
    from engine.contract import names

    probe = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    with open_dict(probe):
        job_name = OmegaConf.select(probe, "hydra.job.name", default="")
        for field, value in (("num", num), ("id", f"{job_name}_{num}")):
            if OmegaConf.select(probe, f"hydra.job.{field}", default=None, throw_on_missing=False) is None:
                probe.hydra.job[field] = value
    for key, may_be_null in (("hydra.sweep.subdir", False), ("hydra.output_subdir", True)):
        try:
            value = OmegaConf.select(probe, key, default=None, throw_on_resolution_failure=True)
        except Exception as e:  # noqa: BLE001 - OmegaConf's and the resolvers' own: an unresolvable folder
            first = (str(e).splitlines() or [""])[0]
            raise ComposeError(f"{key}: cannot be resolved ({type(e).__name__}: {first})") from None
        if value is None and may_be_null:
            continue
        parts = str(value).split("/")
        why = next((names.problem(p) for p in parts if names.problem(p)), None)
        if value is None or why:
            raise ComposeError(f"{key}={value!r}: each part of a job's folder must be a plain name, inside the "
                               f"sweep folder ({why or 'not set'}); set it to a relative path such as "
                               f"${{hydra.job.num}}")


def _quiet_plugins() -> None:
    """The plugins' INFO/WARNING lines repeat what the jobs print and after_sweep sums up."""
    logging.getLogger("hydra_plugins").setLevel(logging.ERROR)
    logging.getLogger("hydra").setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def collect_results(sweep_dir: Path) -> list[dict]:
    """Every job's sweep_job.json under the sweep folder, by job number."""
    found = []
    for path in Path(sweep_dir).rglob(JOB_RESULT):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda r: r.get("num", 0))


def after_sweep(sweep_dir: Path, job_results: list[dict], error: str | None = None, grid: bool = True) -> int:
    """What runs when a sweep ends: a line per job (its headline, or its one-line error), "sweep: N/M
    jobs ok", and an Optuna study's best trial (its overrides and value, from the sweeper's
    optimization_results.yaml in the sweep folder). The exit status: a grid sweep fails when any job
    failed; an Optuna study when no trial completed."""
    from engine.report.display import plain  # what a job wrote is shown, never obeyed by the terminal

    ok = [r for r in job_results if r.get("status") == "ok"]
    for r in job_results:
        h = r.get("headline") or {}
        what = (f"{h.get('key')} = {_short(h.get('value'))}" if h else "") if r in ok else r.get("error")
        print(plain(f"  {'ok' if r in ok else 'failed':<6} {_job_name(r, len(job_results))}  {what or ''}"))
    print(f"sweep: {len(ok)}/{len(job_results)} jobs ok in {sweep_dir}")
    _write_comparison(sweep_dir, ok)
    best = best_trial(sweep_dir)
    if best:
        params = " ".join(f"{k}={v}" for k, v in best["best_params"].items())
        print(plain(f"best: {params} -> {_short(best['best_value'])} (in {Path(sweep_dir) / OPTUNA_RESULTS})"))
    if error:
        print(f"edgepipe: {plain(error)}", file=sys.stderr)
    elif not grid and not ok:
        print("edgepipe: no trial completed; each trial's error is above", file=sys.stderr)
    if grid:
        return 1 if error or len(ok) < len(job_results) or not job_results else 0
    return 0 if best else 1


def _write_comparison(sweep_dir: Path, ok: list[dict]) -> None:
    """compare.csv/.md/.html in the sweep folder (what `edgepipe compare SWEEP_DIR` writes). A sweep's
    results stand without it: a comparison that cannot be written is a warning, not a failed sweep."""
    if not ok:
        return
    from engine.report.compare import write_sweep_comparison

    try:
        print(f"comparison: {write_sweep_comparison(Path(sweep_dir))}")
    except Exception as e:  # noqa: BLE001 - the jobs' own outputs are complete and kept
        print(f"edgepipe: warning: no comparison written in {sweep_dir}: {e}", file=sys.stderr)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def best_trial(sweep_dir: Path) -> dict | None:
    """The Optuna sweeper's optimization_results.yaml ({best_params, best_value}), if it wrote one."""
    path = Path(sweep_dir) / OPTUNA_RESULTS
    if not path.is_file():
        return None
    data = OmegaConf.to_container(OmegaConf.load(path))
    return data if isinstance(data, dict) and "best_params" in data else None
