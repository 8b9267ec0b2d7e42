"""`edgepipe run -m` on Hydra's own sweeper and launcher plugins (issue 10): grid sweeps on the joblib
and submitit_local launchers, an Optuna study, an interrupted sweep run again, and the one-line errors.

Real launchers, no mocks. Sweeps that start worker processes run the CLI as a separate process (as a
user does): joblib keeps its worker processes for reuse, and a worker started for one test would keep
that test's environment. The cheap engine stages (tests/engine_stages.py) count every real execution
in $EDGEPIPE_TEST_COUNTER; one slow test runs the quickstart's DAG (RKNN builds included)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import TESTS
from hostile import assert_clean_failure

# the chain pipeline (tests/engine_conf/pipeline/chain.yaml): src -> scale -> quant, src -> side, total
GRID = ["scale.factor=2,3", "quant.factor=5,6"]
# 1 source, 2 scales, 1 side, 4 quants (one per combination), 4 totals: nothing computed twice
MINIMAL = Counter({"src": 1, "scale": 2, "side": 1, "quant": 4, "total": 4})
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def spawn_cli(ws, *args: str, timeout: float = 240):
    """The CLI in its own process; (rc, stdout, stderr)."""
    proc = ws.spawn(*args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def sweep_dirs(ws) -> list[Path]:
    return sorted(p.parent for p in ws.runs.glob("**/multirun.yaml"))


def job_results(sweep_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in sweep_dir.rglob("sweep_job.json")), key=lambda r: r["num"])


def assert_cache_intact(ws) -> int:
    """Every cache entry passes a full re-hash against its manifest; returns how many there are."""
    from engine.store.cache import Cache

    cache = Cache(ws.runs / "cache")
    n = 0
    for stage_type, key, entry in cache.entries():
        hit = cache.lookup(stage_type, key)  # raises CorruptEntry on a damaged entry
        assert hit is not None, entry
        cache.verify(hit.path, hit.manifest, rehash=True)
        n += 1
    return n


def assert_grid_jobs(ws, sweep_dir: Path) -> list[dict]:
    """Four jobs, each a complete run folder (.hydra/, run.json ok) with the sum its overrides give."""
    results = job_results(sweep_dir)
    assert [r["status"] for r in results] == ["ok"] * 4, results
    sums = set()
    for r in results:
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == sweep_dir.resolve()
        assert {"config.yaml", "hydra.yaml", "overrides.yaml", "resolved.yaml"} <= {
            p.name for p in (run_dir / ".hydra").iterdir()}
        run = json.loads((run_dir / "run.json").read_text())
        assert run["status"] == "ok" and run["overrides"] == r["overrides"]
        assert r["headline"] == run["headline"]
        sums.add(run["headline"]["value"])
    assert sums == {3 * s * q + 21 for s in (2, 3) for q in (5, 6)}
    return results


# -- grid sweeps on parallel launchers ----------------------------------------------------------------------
def test_grid_on_joblib_computes_each_stage_once_in_two_processes(ws, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # so that the sweep sets it per worker
    monkeypatch.delenv("EDGEPIPE_CONFIG_DIR")  # -cd instead: the workers compose from the same search path
    rc, out, err = spawn_cli(ws, "run", "-m", "-cd", str(TESTS / "engine_conf"), *JOBLIB, *GRID,
                             "hydra.sweep.subdir=job_${hydra.job.num}")
    assert rc == 0, err
    assert ws.counts() == MINIMAL
    (sweep_dir,) = sweep_dirs(ws)
    results = assert_grid_jobs(ws, sweep_dir)
    assert sorted(Path(r["run_dir"]).name for r in results) == ["job_0", "job_1", "job_2", "job_3"]
    assert "sweep: 4/4 jobs ok" in out
    # two jobs at a time on this machine's cores: each gets cores / 2 OpenMP/torch threads
    cores = len(os.sched_getaffinity(0))
    assert {r["threads"] for r in results} == {str(max(1, cores // 2))}
    from engine.run.scheduler import default_jobs

    assert {r["stage_jobs"] for r in results} == {max(1, default_jobs() // 2)}  # and half the parallel stages
    assert len({json.loads((Path(r["run_dir"]) / "run.json").read_text())["stages"]["src"]["key"]
                for r in results}) == 1
    assert (ws.runs / "latest").resolve().parent == sweep_dir.resolve()
    assert assert_cache_intact(ws) == sum(MINIMAL.values())  # every computed stage left one entry


def test_grid_on_submitit_local(ws):
    rc, out, err = spawn_cli(ws, "run", "-m", "hydra/launcher=submitit_local", *GRID)
    assert rc == 0, err
    assert ws.counts() == MINIMAL
    (sweep_dir,) = sweep_dirs(ws)
    assert_grid_jobs(ws, sweep_dir)
    assert (sweep_dir / ".submitit").is_dir()  # the jobs really went through submitit
    assert "sweep: 4/4 jobs ok" in out
    # the sweep's comparison is written when it ends: a row per job, only the swept overrides
    assert f"comparison: {sweep_dir / 'compare.html'}" in out
    rows = (sweep_dir / "compare.csv").read_text().splitlines()
    assert len(rows) == 5 and "scale.factor" in rows[0] and "quant.factor" in rows[0], rows
    assert assert_cache_intact(ws) == sum(MINIMAL.values())


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="hydra-ray-launcher is an optional extra (pip install -e '.[ray]')")
def test_grid_on_ray_when_installed(ws):
    rc, out, err = spawn_cli(ws, "run", "-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2", *GRID,
                             timeout=600)
    assert rc == 0, err
    assert ws.counts() == MINIMAL
    (sweep_dir,) = sweep_dirs(ws)
    assert_grid_jobs(ws, sweep_dir)
    assert assert_cache_intact(ws) == sum(MINIMAL.values())


def test_interrupted_joblib_sweep_rerun_computes_only_what_did_not_finish(ws):
    args = ["run", "-m", *JOBLIB, "quant.factor=5,6,7,8", "+quant.sleep=2"]
    proc = ws.spawn(*args, start_new_session=True)
    deadline = time.time() + 120
    while not ws.counts().get("total") and time.time() < deadline:  # the first job has finished
        time.sleep(0.05)
    assert ws.counts().get("total"), proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its joblib workers, mid-sweep
    proc.communicate(timeout=30)
    while time.time() < deadline:  # the workers are gone when no process of the group is left
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    finished = {p for t in ("t_source", "t_scale", "t_add") for p in ws.entries(t)}
    ws.reset_counts()
    rc, out, err = spawn_cli(ws, *args)
    assert rc == 0, err
    everything = {p for t in ("t_source", "t_scale", "t_add") for p in ws.entries(t)}
    redone = sum(ws.counts().values())
    # 1 src, 1 scale, 1 side, 4 quants, 4 totals in all; the re-run computed each missing one once
    assert len(everything) == 11 and finished < everything
    assert redone == len(everything - finished) and 0 < redone < 11
    assert assert_cache_intact(ws) == 11


def test_an_error_inside_a_joblib_worker_is_the_jobs_line_not_a_traceback(ws):
    """A stage that raises (not a StageError) in a worker: the sweep shows one line per job naming the
    stage and the error; the traceback is in that run's edgepipe.log."""
    rc, out, err = spawn_cli(ws, "run", "-m", *JOBLIB, "+pipeline.stages.noisy={uses: t_noisy}",
                             "+pipeline.stages.bad={uses: t_add, needs: {a: noisy}}", "src.value=1,2")
    assert rc == 1
    assert "Traceback" not in out + err
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("failed job")]
    assert len(lines) == 2 and all("bad: FileNotFoundError" in ln and "value.txt" in ln for ln in lines)
    assert "sweep: 0/2 jobs ok" in out
    (sweep_dir,) = sweep_dirs(ws)
    for r in job_results(sweep_dir):
        assert "Traceback" in (Path(r["run_dir"]) / "edgepipe.log").read_text()


# -- Optuna ------------------------------------------------------------------------------------------------
def test_optuna_study_of_three_trials_names_the_best(ws):
    r = ws.cli("run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=3",
               "scale.factor=int(interval(1,50))")
    assert r.rc == 0, r.err
    (sweep_dir,) = sweep_dirs(ws)
    results = job_results(sweep_dir)
    assert len(results) == 3 and {x["status"] for x in results} == {"ok"}
    best = max(results, key=lambda x: x["headline"]["value"])  # chain's headline total.sum: maximized
    study = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {float(best['headline']['value'])}" in study
    factor = next(o for o in best["overrides"] if o.startswith("scale.factor="))
    assert f"best: {factor} -> " in r.out and "sweep: 3/3 jobs ok" in r.out
    # the trials share the cache: the source was computed once
    assert ws.counts()["src"] == 1


def test_optuna_minimizes_when_the_pipeline_says_so(ws):
    r = ws.cli("run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=3",
               "+pipeline.headline_direction=minimize", "scale.factor=int(interval(1,50))")
    assert r.rc == 0, r.err
    (sweep_dir,) = sweep_dirs(ws)
    results = job_results(sweep_dir)
    best = min(results, key=lambda x: x["headline"]["value"])
    assert f"best_value: {float(best['headline']['value'])}" in (sweep_dir / "optimization_results.yaml").read_text()
    assert "direction: minimize" in (sweep_dir / "multirun.yaml").read_text()


def test_invalid_optuna_trial_fails_only_that_trial(ws):
    r = ws.cli("run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=1",
               "src.value=choice(1,2,abc)")
    assert r.rc == 0, r.err
    assert "Traceback" not in r.out + r.err
    (sweep_dir,) = sweep_dirs(ws)
    results = job_results(sweep_dir)
    bad = [x for x in results if x["status"] != "ok"]
    good = [x for x in results if x["status"] == "ok"]
    assert bad and good and len(results) == 4  # the seed draws 'abc' and valid values
    for x in bad:
        assert x["overrides"] == ["src.value=abc"]
        assert "src.value" in x["error"] and "'abc'" in x["error"] and "\n" not in x["error"]
        line = next(ln for ln in r.err.splitlines() if "src.value=abc" in ln)
        assert "invalid config: src.value" in line
    assert "best: src.value=2 -> 34" in r.out


# -- errors -----------------------------------------------------------------------------------------------
PATHS = {"basic": [], "joblib": JOBLIB, "submitit_local": ["hydra/launcher=submitit_local"],
         "optuna": ["hydra/sweeper=optuna"]}


@pytest.mark.parametrize("path", list(PATHS))
def test_malformed_override_is_one_line_on_every_path(ws, path):
    assert_clean_failure(ws.cli("run", "-m", *PATHS[path], "src.value=[1"), 2, "src.value=[1")
    assert not ws.runs.exists()


@pytest.mark.parametrize("path", ["basic", "joblib", "submitit_local"])
def test_interval_on_the_grid_sweeper_is_one_line(ws, path):
    assert_clean_failure(ws.cli("run", "-m", *PATHS[path], "src.value=interval(0.1,1)"), 2,
                         "src.value=interval(0.1,1)", "hydra/sweeper=optuna")
    assert not ws.runs.exists()


@pytest.mark.parametrize("args, names", [
    (["src.value=glob(*)"], ["src.value=glob(*)", "Optuna"]),
    (["hydra.sweeper.direction=sideways", "src.value=interval(1,2)"], ["hydra.sweeper.direction"]),
    (["src.nosuch=3", "src.value=interval(1,2)"], ["src.nosuch"]),
], ids=["glob", "bad-direction", "unknown-key"])
def test_optuna_search_space_errors_are_one_line(ws, args, names):
    assert_clean_failure(ws.cli("run", "-m", "hydra/sweeper=optuna", *args), 2, *names)
    assert not ws.runs.exists()


def test_plan_of_an_optuna_search_says_why_not(ws):
    assert_clean_failure(ws.cli("plan", "-m", "hydra/sweeper=optuna", "src.value=interval(1,9)"), 2,
                         "hydra/sweeper=optuna", "without -m")


def test_grid_job_invalid_on_a_launcher_writes_nothing(ws):
    """Every grid job is validated before runs/ is touched, whatever the launcher."""
    assert_clean_failure(ws.cli("run", "-m", *JOBLIB, "src.value=1,abc"), 2, "src.value", "'abc'")
    assert not ws.runs.exists() and ws.counts() == {}


def test_ray_launcher_missing_names_the_extra(ws):
    """The extra hidden from a CLI process of its own (make test installs it): None in sys.modules makes
    `import ray` and the launcher plugin raise ImportError and find_spec find neither, as where they are
    not installed (and Hydra's plugin scan passes them over). One line naming the extra, nothing run."""
    import subprocess
    import sys

    from conftest import Result

    without_ray = ("import sys\n"
                   "sys.modules.update(dict.fromkeys(('ray', 'hydra_plugins.hydra_ray_launcher'), None))\n"
                   "from engine.cli.commands import main\n"
                   "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", without_ray, "run", "-m", "hydra/launcher=ray", "src.value=1,2"],
                       cwd=ws.root, env={**os.environ, **ws.env}, capture_output=True, text=True, timeout=240)
    err = assert_clean_failure(Result(r.returncode, r.stdout, r.stderr), 2, "hydra/launcher=ray")
    assert "pip install -e '.[ray]'" in err and len(err.splitlines()) == 1
    assert ws.counts() == {} and not ws.runs.exists()


def test_submitit_slurm_composes_and_the_job_function_pickles(ws):
    """SLURM cannot run here: its launcher config composes, and the job function Hydra hands it
    crosses a process boundary by reference (plain pickle, as for joblib and submitit)."""
    from engine.job.sweep import Task
    from engine.run.pipeline import Options

    r = ws.cli("run", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=4", *GRID, "--cfg", "hydra")
    assert r.rc == 0, r.err
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in r.out
    assert "cpus_per_task: 4" in r.out and not ws.runs.exists()
    task = Task(options=Options(only=["total"]), total=4, threads=4, in_process=False)
    assert pickle.loads(pickle.dumps(task)) == task
    from engine.config import compose
    from engine.job.sweep import _jobs_at_once, _threads_per_job

    job = compose.compose(["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=4"])
    assert _jobs_at_once(job.hydra_cfg, "submitit_slurm", "basic", 4) is None  # each job on its node share
    assert _threads_per_job(job.hydra_cfg, "submitit_slurm", None) == 4


def test_sweep_dir_and_subdir_given_on_the_command_line(ws):
    r = ws.cli("run", "-m", f"hydra.sweep.dir={ws.root / 'mine'}", "hydra.sweep.subdir=value_${src.value}",
               "src.value=1,2")
    assert r.rc == 0, r.err
    assert sorted(p.name for p in (ws.root / "mine").iterdir()) == ["compare.csv", "compare.html", "compare.md",
                                                                   "multirun.yaml", "value_1", "value_2"]
    assert (ws.runs / "latest").resolve() == (ws.root / "mine" / "value_2").resolve()
    assert json.loads((ws.root / "mine" / "value_1" / "run.json").read_text())["headline"]["value"] == 17


def test_cfg_and_info_with_a_sweeper(ws):
    r = ws.cli("run", "-m", "hydra/sweeper=optuna", "src.value=interval(1,9)", "scale.factor=4", "--cfg", "job")
    assert r.rc == 0, r.err
    assert "factor: 4" in r.out and "hydra:" not in r.out and not ws.runs.exists()
    r = ws.cli("run", "-m", "hydra/launcher=joblib", *GRID, "--cfg", "hydra")
    assert r.rc == 0 and "JoblibLauncher" in r.out
    r = ws.cli("run", "-m", "hydra/launcher=joblib", *GRID, "--cfg", "job", "--resolve")
    assert r.rc == 0 and f"runs_root: {ws.runs}" in r.out and r.out.count("pipeline:") == 4
    r = ws.cli("run", "-m", "hydra/sweeper=optuna", "src.value=interval(1,9)", "--info")
    assert r.rc == 0 and "config search path" in r.out


# -- the quickstart's DAG, reduced ---------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_2x2_on_joblib_trains_twice_and_builds_4_rknn_models(project):
    """train.lr x quantize.method on the quickstart (tiny training, small simulator runs, only the
    rknn_normal branch): 2 trainings, 4 RKNN builds (2 lr x 2 methods), the data and calibration set
    once, across two joblib worker processes. (The 8 builds with rknn_mmse, as keys:
    test_quickstart.py::test_readme_2x2_sweep_makes_2_trainings_and_8_rknn_builds.)"""
    rc, out, err = spawn_cli(project, "run", "-m", *JOBLIB, "+experiment=quickstart", "train=tiny", "train.epochs=1",
                             "train.limit_train_batches=4", "+train.bn_recalibrate_images=64", "quantize.data_limit=40",
                             "quantize.accuracy_analysis_samples=0",
                             "train.lr=0.001,0.003", "quantize.method=channel,layer",
                             "--only", "rknn_normal", timeout=900)
    assert rc == 0, err[-3000:]
    entries = {t: len(project.entries(t)) for t in ("dataset", "train", "export_onnx", "calibration", "rknn_quantize")}
    assert entries == {"dataset": 1, "train": 2, "export_onnx": 2, "calibration": 1, "rknn_quantize": 4}
    (sweep_dir,) = sweep_dirs(project)
    runs = [json.loads((Path(r["run_dir"]) / "run.json").read_text()) for r in job_results(sweep_dir)]
    ran = Counter(s["type"] for run in runs for s in run["stages"].values() if s["status"] == "ran")
    assert ran["train"] == 2 and ran["rknn_quantize"] == 4 and ran["dataset"] == 1
    assert assert_cache_intact(project) >= 10  # and none of them damaged


@pytest.mark.slow
def test_optuna_over_train_lr_on_the_real_training(project):
    """3 Optuna trials over train.lr (log scale) on the train pipeline (tiny, 1 epoch of 3 batches):
    the study maximizes train.test_acc, names the best trial, and the dataset is computed once."""
    r = project.cli("run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                    "pipeline=train", "train=tiny", "train.epochs=1", "train.limit_train_batches=3",
                    "train.lr=tag(log, interval(0.0001, 0.01))")
    assert r.rc == 0, r.err
    (sweep_dir,) = sweep_dirs(project)
    results = job_results(sweep_dir)
    assert [x["status"] for x in results] == ["ok"] * 3
    assert {x["headline"]["key"] for x in results} == {"train.test_acc"}
    best = max(results, key=lambda x: x["headline"]["value"])
    lr = next(o for o in best["overrides"] if o.startswith("train.lr="))
    assert f"best: {lr} -> " in r.out
    assert len(project.entries("dataset")) == 1 and len(project.entries("train")) == 3
