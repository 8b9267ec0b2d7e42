"""Trust boundaries, second round (issue 30): what a config may set in the environment of the processes a
sweep starts, what it may make a sweeper or a launcher load or run, what a terminal is shown of a run
folder, and interpolations that cannot resolve.

Each case is an attack as a colleague's experiment file (or a run folder, or a manifest's metrics) would
try it: refused with one line naming the key and the file, exit 2, before any job starts, and the marker
a planted sitecustomize.py would write never appears. Real Hydra, real launchers' configs, the engine
tests' cheap stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile import assert_clean_failure, assert_one_line_problems


def _experiment(conf: Path, body: dict, defaults: list | None = None, name: str = "evil") -> Path:
    path = conf / "experiment" / f"{name}.yaml"
    body = {"defaults": [*(defaults or []), "_self_"], **body}
    path.write_text("# @package _global_\n" + json.dumps(body), encoding="utf-8")  # JSON is YAML
    return path


def _planted(folder: Path) -> tuple[Path, Path]:
    """A folder holding a sitecustomize.py (any Python started with the folder on its path runs it at
    start-up) that writes a marker; (folder, marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder.parent / "sitecustomize-ran"
    (folder / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def _env_set(env: dict) -> dict:
    return {"hydra": {"job": {"env_set": env}}}


# -- hydra.job.env_set: an allow-list ---------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("OPENSSL_CONF", "{root}/openssl.cnf"),  # a .cnf naming a provider .so: loaded by every hashlib user
    ("AWS_CONFIG_FILE", "{root}/aws.cfg"),  # its credential_process runs with an s3 remote
    ("EDGEPIPE_REMOTE_KEY", "0" * 64),  # swaps the team's signing key
    ("HOME", "{root}"),  # ~/.aws, ~/.cache/edgepipe, ~/.netrc, user site-packages
    ("TORCH_HOME", "{root}"),  # the hub cache pretrained weights are taken from
    ("GCONV_PATH", "{root}"),  # glibc loads the iconv modules found there
    ("OMP_TOOL_LIBRARIES", "{root}/tool.so"),  # the OpenMP runtime loads it
    ("NCCL_NET_PLUGIN", "{root}/net.so"),  # NCCL loads it in every DDP rank
    ("LD_PRELOAD", "{root}/x.so"),
    ("OMP_NUM_THREADS", "1\nLD_PRELOAD={root}/x.so"),  # an allowed name, a value that is not a count
    ("CUDA_VISIBLE_DEVICES", "$(touch {root}/x)"),
], ids=lambda v: v if "{" not in v and len(v) < 30 else "")
def test_env_set_takes_only_thread_counts_and_gpus(ws, conf, name, value):
    evil = _experiment(conf, _env_set({name: value.format(root=ws.root)}))
    for verb in (["plan"], ["run", "-m", "src.value=1,2"]):
        r = ws.cli(*verb, "+experiment=evil")
        assert_clean_failure(r, 2, f"hydra.job.env_set.{name}", str(evil))
        assert_one_line_problems(r)
    assert not ws.runs.exists()


def test_env_set_of_thread_counts_and_gpus_is_allowed(ws, conf):
    _experiment(conf, _env_set({"OMP_NUM_THREADS": 2, "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0,1",
                                "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}), name="threads")
    r = ws.cli("plan", "+experiment=threads")
    assert r.rc == 0, r.err


# -- every sweeper's params: Optuna's fixed params are applied to every trial -------------------------------
def test_an_optuna_fixed_param_cannot_set_pythonpath(ws, conf):
    """`++hydra.job.env_set.PYTHONPATH: DIR` among an Optuna study's params put DIR's sitecustomize.py into
    every process a trial started (`--jobs 2`: the stage workers); the grid sweeper refused it."""
    site, marker = _planted(ws.root / "planted")
    evil = _experiment(conf, {"hydra": {"sweeper": {
        "n_trials": 1, "n_jobs": 1,
        "params": {"++hydra.job.env_set.PYTHONPATH": str(site), "src.value": "range(1,3)"}}}},
        defaults=[{"override /pipeline": "parallel"}, {"override /hydra/sweeper": "optuna"}])
    for verb in (["plan"], ["run", "-m", "--jobs", "2"]):
        r = ws.cli(*verb, "+experiment=evil")
        assert_clean_failure(r, 2, "hydra.job.env_set.PYTHONPATH", "hydra.sweeper.params", str(evil))
        assert_one_line_problems(r)
    assert not marker.exists() and not ws.runs.exists()


@pytest.mark.parametrize("params, key", [
    ({"hydra.callbacks.x._target_": "pathlib.Path.touch"}, "hydra.callbacks.x._target_"),
    ({"+hydra.job_logging": "{version: 1, handlers: {f: {class: logging.FileHandler, filename: zz.pth}}}"},
     "hydra.job_logging.handlers.f.filename"),
    ({"hydra/job_logging": "default"}, "hydra/job_logging"),
    ({"hydra.job.env_set.OPENSSL_CONF": "a.cnf,b.cnf"}, "hydra.job.env_set.OPENSSL_CONF"),
], ids=["callback", "logging", "config-group", "grid-of-values"])
def test_a_hydra_setting_among_optuna_params_is_checked_like_an_override(ws, conf, params, key):
    evil = _experiment(conf, {"hydra": {"sweeper": {"n_trials": 1, "params": {**params, "src.value": "range(1,3)"}}}},
                       defaults=[{"override /hydra/sweeper": "optuna"}])
    r = ws.cli("run", "-m", "+experiment=evil")
    assert_clean_failure(r, 2, key, str(evil))
    assert not ws.runs.exists() and not (ws.root / "zz.pth").exists()


def test_hydra_settings_cannot_be_searched_by_optunas_search_space(ws, conf):
    """The deprecated `search_space` form: a categorical over PYTHONPATH values is a search of a Hydra setting."""
    evil = _experiment(conf, {"hydra": {"sweeper": {"n_trials": 1, "search_space": {
        "++hydra.job.env_set.PYTHONPATH": {"type": "categorical", "choices": [str(ws.root)]}}}}},
        defaults=[{"override /hydra/sweeper": "optuna"}])
    assert_clean_failure(ws.cli("plan", "+experiment=evil"), 2, "hydra.sweeper.search_space", str(evil))


# -- every launcher's options -------------------------------------------------------------------------------
RAY = {"override /hydra/launcher": "ray"}


@pytest.mark.parametrize("launcher, options, key", [
    (RAY, {"ray": {"init": {"runtime_env": {"env_vars": {"PYTHONPATH": "{root}/planted"}}}}},
     "hydra.launcher.ray.init.runtime_env"),
    (RAY, {"ray": {"init": {"runtime_env": {"worker_process_setup_hook": "sitecustomize"}}}},
     "hydra.launcher.ray.init.runtime_env"),
    (RAY, {"ray": {"init": {"runtime_env": {"py_modules": ["{root}/planted"]}}}},
     "hydra.launcher.ray.init.runtime_env"),
    (RAY, {"ray": {"init": {"runtime_env": {"pip": ["evil-package"]}}}}, "hydra.launcher.ray.init.runtime_env"),
    (RAY, {"ray": {"init": {"runtime_env": {"working_dir": "{root}/planted"}}}}, "hydra.launcher.ray.init.runtime_env"),
    (RAY, {"ray": {"remote": {"runtime_env": {"pip": ["evil-package"]}}}}, "hydra.launcher.ray.remote.runtime_env"),
    (RAY, {"ray": {"init": {"address": "ray://attacker.example:10001"}}}, "hydra.launcher.ray.init.address"),
    (RAY, {"ray": {"init": {"_temp_dir": "{root}/planted"}}}, "hydra.launcher.ray.init._temp_dir"),
    ({"override /hydra/launcher": "submitit_slurm"}, {"setup": ["python {root}/planted/sitecustomize.py"]},
     "hydra.launcher.setup"),
    ({"override /hydra/launcher": "submitit_slurm"}, {"additional_parameters": {"export": "LD_PRELOAD={root}/x.so"}},
     "hydra.launcher.additional_parameters.export"),
    ({"override /hydra/launcher": "submitit_slurm"}, {"comment": "x\npython {root}/planted/sitecustomize.py"},
     "hydra.launcher.comment"),
    ({"override /hydra/launcher": "submitit_local"}, {"submitit_folder": "{root}/shared/%j"},
     "hydra.launcher.submitit_folder"),
    ({"override /hydra/launcher": "joblib"}, {"temp_folder": "{root}/shared"}, "hydra.launcher.temp_folder"),
], ids=["ray-env-vars", "ray-setup-hook", "ray-py-modules", "ray-pip", "ray-working-dir", "ray-remote-pip",
        "ray-address", "ray-temp-dir", "slurm-setup", "slurm-export", "slurm-newline", "submitit-folder",
        "joblib-temp-folder"])
def test_a_launcher_option_that_loads_or_runs_code_is_refused(ws, conf, launcher, options, key):
    options = json.loads(json.dumps(options).replace("{root}", str(ws.root)))
    evil = _experiment(conf, {"hydra": {"launcher": options}}, defaults=[launcher])
    r = ws.cli("plan", "+experiment=evil")
    assert_clean_failure(r, 2, key, str(evil))
    assert_one_line_problems(r)


def test_ray_runtime_env_pythonpath_is_refused_before_ray_starts(ws, conf):
    """The Ray worker ran the planted sitecustomize.py: refused before the launcher starts Ray."""
    site, marker = _planted(ws.root / "planted")
    evil = _experiment(conf, {"hydra": {"launcher": {"ray": {"init": {
        "num_cpus": 1, "runtime_env": {"env_vars": {"PYTHONPATH": str(site)}}}}}}}, defaults=[RAY])
    r = ws.cli("run", "-m", "+experiment=evil", "src.value=1,2")
    assert_clean_failure(r, 2, "hydra.launcher.ray.init.runtime_env", "PYTHONPATH", str(evil))
    assert not marker.exists() and not ws.runs.exists()


@pytest.mark.parametrize("args", [
    ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
     "+hydra.launcher.ray.init.runtime_env={env_vars: {OMP_NUM_THREADS: '1'}}"],
    ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=8",
     "+hydra.launcher.additional_parameters.time=60"],
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/sweeper=optuna", "hydra.sweeper.storage=sqlite:///study.db"],
], ids=["ray", "slurm", "joblib", "optuna-storage"])
def test_the_launcher_options_readme_shows_are_allowed(ws, args):
    r = ws.cli("plan", *args)
    assert r.rc == 0, r.err


# -- what a terminal is shown: markup and control characters are text ---------------------------------------
HOSTILE_TEXT = "bad [/] [link=http://evil.example]click[/link] \x1b]8;;http://evil.example\x1b\\x\x1b[2J\x9b31m"


def _no_escapes(text: str) -> None:
    assert "\x1b" not in text and "\x9b" not in text, repr(text)


def test_a_stage_error_with_markup_and_escapes_is_shown_as_text(ws, conf):
    """A stage error holding `[/]` crashed the display (internal error, MarkupError): run.json stayed
    'running' and no report was written. ESC sequences reached the terminal."""
    _experiment(conf, {"fail": {"message": HOSTILE_TEXT}}, defaults=[{"override /pipeline": "failing"}])
    r = ws.cli("run", "+experiment=evil")
    assert r.rc == 1 and "internal error" not in r.err, r.err
    _no_escapes(r.out + r.err)
    assert "bad [/] [link=http://evil.example]click[/link] \\x1b]8;;" in r.out + r.err
    run = ws.latest()
    assert run["status"] == "failed" and run["stages"]["broken"]["status"] == "failed"
    assert (ws.runs / "latest" / "report.md").is_file()
    r = ws.cli("show")
    assert r.rc == 0 and "[link=http://evil.example]click[/link]" in r.out
    _no_escapes(r.out)


def test_show_and_runs_print_run_json_and_metrics_as_text(ws):
    """run.json's values and a stage's metrics (which a remote manifest brings) are shown, not obeyed."""
    assert ws.cli("run").rc == 0
    path = ws.runs / "latest" / "run.json"
    run = json.loads(path.read_text())
    run["name"] = "[link=http://evil.example]x[/link]\x1b]0;owned\x07"
    run["headline"] = {"key": "[bold]\x1b[31mtop1", "value": 0.5}
    run["stages"]["src"]["metrics"] = {"\x1b[2Jkey": 1.0,
                                       "[link=http://evil.example]k[/link]": "\x1b]52;c;b3duZWQ=\x07"}
    path.write_text(json.dumps(run))
    for verb, markup in ((["show"], "[link="), (["runs"], "[link="),  # `runs` folds its cells
                         (["compare", "latest", "--metrics", "value,\x1b[2Jkey"], "[bold]\\x1b[31mtop1")):
        r = ws.cli(*verb)
        assert r.rc == 0, r.err
        _no_escapes(r.out)
        assert markup in r.out, r.out  # Rich would have taken it as markup
    shown = ws.cli("show").out
    assert "[link=http://evil.example]x[/link]\\x1b]0;owned\\x07" in shown and "\\x1b]52;c;" in shown


# -- interpolations that cannot resolve: a config error naming the key ----------------------------------------
@pytest.mark.parametrize("verb", ["plan", "run", "dag"])
@pytest.mark.parametrize("value", ["${nope}", "${oc.env:EDGEPIPE_TEST_UNSET}"], ids=["missing-key", "unset-env"])
def test_an_interpolation_that_cannot_resolve_names_the_key(ws, verb, value, monkeypatch):
    monkeypatch.delenv("EDGEPIPE_TEST_UNSET", raising=False)
    r = ws.cli(verb, f"src.value={value}")
    err = assert_clean_failure(r, 2, "src.value", "cannot be resolved")
    assert "internal error" not in err
    assert_one_line_problems(r)
    assert not ws.runs.exists()


def test_now_in_a_reproduced_config_names_the_key(ws):
    """A saved config read without Hydra has no ${now:} resolver: one line naming the key, exit 2."""
    assert ws.cli("run").rc == 0
    saved = ws.runs / "latest" / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace("value: 3", "value: ${now:%S}"))
    proc = ws.spawn("reproduce", str((ws.runs / "latest").resolve()))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "src.value" in err and "now" in err and "internal error" not in err, err
