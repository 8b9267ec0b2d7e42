"""Trust boundaries (issue 23, the config and local-folder half): a colleague's config file, a shared
user cache folder and the user's own project folder can never run code, poison a build or escape.

Each case is an attack as someone with write access to one config file or one cache folder would try
it; the marker file an exploit would write must never appear, and what is refused is refused with one
line (exit 2 for a config error). Real Hydra, real processes, the engine tests' cheap stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile import CodeRunningPickle, assert_clean_failure, assert_one_line_problems

from engine.contract.hashing import ContentIndex, content_digest


# -- input fingerprints: ctime ------------------------------------------------------------------------------
def _rewrite_keeping_times(path: Path, data: bytes) -> None:
    """Rewrite a file in place with the same size and put its old times back (`touch -r`)."""
    st = os.stat(path)
    time.sleep(0.02)  # past the kernel's timestamp granularity, so the ctime can move
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_file_rewritten_with_its_old_mtime_is_read_again(tmp_path):
    """size, mtime, inode and device agree; only ctime tells. A folder (the dataset's) and a single
    file (weights) both: the index must not serve the old digest."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "cat.png").write_bytes(b"A" * 64)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"W" * 64)
    index = ContentIndex(tmp_path / "index.sqlite")
    folder, single = content_digest(data, index), content_digest(weights, index)
    index.save()
    _rewrite_keeping_times(data / "cat.png", b"B" * 64)
    _rewrite_keeping_times(weights, b"V" * 64)
    again = ContentIndex(tmp_path / "index.sqlite")
    assert content_digest(data, again) != folder
    assert content_digest(weights, again) != single


# -- config files that would make Hydra call something ------------------------------------------------------
def _writes_a_pth(pth: Path) -> dict:
    """A Hydra config node that, instantiated, writes a .pth file (code the next Python start runs)."""
    return {"_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(pth)]}, "import os; os.system('id')\n"]}


def _experiment(conf: Path, name: str, body: dict) -> Path:
    path = conf / "experiment" / f"{name}.yaml"
    path.write_text("# @package _global_\n" + json.dumps(body), encoding="utf-8")  # JSON is YAML
    return path


@pytest.mark.parametrize("verb", [["plan"], ["run"], ["run", "-m", "src.value=1,2"]], ids=["plan", "run", "multirun"])
def test_a_hydra_callback_in_an_experiment_is_refused(ws, conf, verb):
    pth = ws.root / "zz.pth"
    evil = _experiment(conf, "evil", {"hydra": {"callbacks": {"x": _writes_a_pth(pth)}}})
    r = ws.cli(*verb, "+experiment=evil")
    assert_clean_failure(r, 2, "hydra.callbacks.x._target_", "pathlib.Path.write_text", str(evil))
    assert_one_line_problems(r)
    assert not pth.exists() and not ws.runs.exists()


@pytest.mark.parametrize("node, args, key", [
    ({"hydra": {"sweeper": {"sampler": {"_target_": "pathlib.Path.touch", "seed": 1}}}}, ["hydra/sweeper=optuna"],
     "hydra.sweeper.sampler._target_"),
    ({"src": {"value": 3, "x": [{"_target_": "shutil.rmtree"}]}}, [], "src.x[0]._target_"),
    ({"hydra": {"sweeper": {"custom_search_space": "pathlib.Path.touch"}}}, ["hydra/sweeper=optuna"],
     "hydra.sweeper.custom_search_space"),
    ({"hydra": {"job_logging": {"version": 1, "root": {"handlers": ["f"]}, "handlers": {"f": {
        "class": "logging.FileHandler", "filename": "zz.pth"}}}}}, [], "hydra.job_logging.handlers.f.filename"),
    ({"hydra": {"job_logging": {"version": 1, "filters": {"f": {"()": "pathlib.Path.touch"}}}}}, [],
     "hydra.job_logging.filters.f.()"),
    ({"hydra": {"job": {"env_set": {"PYTHONPATH": "/tmp/planted", "OMP_NUM_THREADS": 1}}}}, [],
     "hydra.job.env_set.PYTHONPATH"),
], ids=["optuna-sampler", "job-config-list", "optuna-search-space", "log-file", "log-factory", "env-set"])
def test_any_call_a_config_names_off_the_allow_list_is_refused(ws, conf, node, args, key):
    evil = _experiment(conf, "evil", node)
    for verb in (["plan"], ["run", "-m", "src.value=1,2"]):
        r = ws.cli(*verb, *args, "+experiment=evil")
        assert_clean_failure(r, 2, key, str(evil))
    assert not ws.runs.exists() and not (ws.root / "zz.pth").exists()


def test_a_target_given_as_an_override_is_named(ws):
    r = ws.cli("plan", "+hydra.callbacks.x._target_=pathlib.Path.touch")
    assert_clean_failure(r, 2, "hydra.callbacks.x._target_",
                         "override '+hydra.callbacks.x._target_=pathlib.Path.touch'")


@pytest.mark.parametrize("choice", [
    ["hydra/sweeper=optuna", f"hydra/sweeper/sampler={s}"]
    for s in ("tpe", "random", "cmaes", "nsgaii", "motpe", "grid")
] + [[f"hydra/launcher={name}"] for name in ("basic", "joblib", "submitit_local", "submitit_slurm")]
  + [["hydra/job_logging=default", f"hydra/hydra_logging={name}"] for name in ("default", "hydra_debug")],
    ids=lambda c: c[-1])
def test_the_plugins_own_configs_pass(ws, choice):
    from omegaconf import OmegaConf

    from engine.config import compose

    job = compose.compose(choice)  # these name plugin classes, Optuna samplers, logging classes
    assert "_target_" in json.dumps(OmegaConf.to_container(job.hydra_cfg), default=str)
    assert "logging." in json.dumps(OmegaConf.to_container(job.hydra_cfg), default=str)


def test_a_remembered_composition_is_checked_again(ws, conf, monkeypatch):
    """A config kept by the compose cache (here: one composed before the check existed) is checked on
    every use, not only when Hydra composes it."""
    from engine.config import compose

    _experiment(conf, "evil", {"hydra": {"callbacks": {"x": {"_target_": "pathlib.Path.touch"}}}})
    with monkeypatch.context() as m:
        m.setattr(compose, "check_targets", lambda *a: None)
        assert compose.compose(["+experiment=evil"]).digest is not None  # kept
    r = ws.cli("plan", "+experiment=evil")
    assert_clean_failure(r, 2, "hydra.callbacks.x._target_")


# -- the user cache folder: compose cache and plan memo -------------------------------------------------------
def _compose_folder() -> Path:
    from engine.config import compose_cache

    return compose_cache.folder()


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _value_run(ws) -> str:
    return (ws.runs / "latest" / "stages" / "src" / "value.txt").read_text()


def test_an_edited_plan_memo_is_a_miss_never_a_wrong_hit(ws):
    """The memo of `src.value=5` edited to say value 1 (the key of a run that exists): the run must
    compute value 5, as its .hydra/config.yaml says, not reuse value 1's output."""
    from engine.config import compose

    assert ws.cli("run", "src.value=1").rc == 0 and ws.cli("run", "src.value=5").rc == 0
    digest = compose.compose(["src.value=5"]).digest
    (memo,) = (_compose_folder() / "validated").glob(f"{digest}-*.json")
    _edit_json(memo, lambda d: d["stages"]["src"]["recipe"]["params"].update(value=1))
    shutil.rmtree(next(e for e in ws.entries("t_source") if _value_of(e) == "5"))  # value 5 must run again
    r = ws.cli("run", "src.value=5")
    assert r.rc == 0, r.err
    assert "value: 5" in (ws.runs / "latest" / ".hydra" / "config.yaml").read_text()
    assert _value_run(ws) == "5" and ws.statuses()["src"] == "ran"


def _value_of(entry: Path) -> str:
    return (entry / "out" / "value.txt").read_text()


def test_a_memo_copied_under_another_configs_name_is_a_miss(ws):
    from engine.config import compose

    assert ws.cli("run", "src.value=1").rc == 0 and ws.cli("run", "src.value=5").rc == 0
    one, five = (next((_compose_folder() / "validated").glob(f"{compose.compose([o]).digest}-*.json"))
                 for o in ("src.value=1", "src.value=5"))
    shutil.copyfile(one, five)
    assert ws.cli("run", "src.value=5").rc == 0
    assert _value_run(ws) == "5"


def test_an_edited_compose_entry_cannot_name_a_run_outside_runs_root(ws):
    """A compose-cache entry edited to `name: ../../../../x` (its memo then hits): the run folder
    stays under runs_root, whichever way the name is refused or the entry ignored."""
    from engine.config import compose

    assert ws.cli("run").rc == 0 and ws.cli("plan").rc == 0
    entry = _compose_folder() / f"{compose.compose([]).digest}.json"
    _edit_json(entry, lambda d: d["cfg"].update(name="../../../../escaped"))
    before = {p for p in ws.root.parent.iterdir()}
    r = ws.cli("run")
    assert "Traceback" not in r.err
    assert {p for p in ws.root.parent.iterdir()} == before
    assert not any("escaped" in str(p) for p in ws.root.parent.rglob("*escaped*"))


def test_a_remembered_plan_checks_the_run_name(ws, monkeypatch):
    """Should a memo ever hold a config with a bad name (here: remembered while the check was off), a
    run from it is refused before a run folder exists."""
    from engine.config import compose, validate

    with monkeypatch.context() as m:
        for module in (compose, validate):
            m.setattr(module, "check_run_name", lambda cfg: [])
        assert ws.cli("plan", "name=x..y").rc == 0  # validated, remembered
    runs_before = sorted(ws.runs.rglob("*")) if ws.runs.exists() else []
    r = ws.cli("run", "name=x..y")
    assert_clean_failure(r, 2, "name:", "run name")
    assert (sorted(ws.runs.rglob("*")) if ws.runs.exists() else []) == runs_before


def test_a_sealing_key_someone_else_can_read_is_not_used(ws, capsys, monkeypatch):
    from engine.config import compose, compose_cache

    key = _compose_folder() / f".seal-key-{os.getuid()}"
    compose.compose([])  # made on first use, this user's only
    assert key.is_file() and key.stat().st_mode & 0o777 == 0o600
    assert compose_cache._read_key(key) is not None
    key.chmod(0o644)
    assert compose_cache._read_key(key) is None
    monkeypatch.setattr(compose_cache, "_keys", {})  # a new process: the key is read again
    capsys.readouterr()
    assert compose_cache._seal_key() is None  # the cache is off, and the user is told why, once
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compose cache" in err and str(key) in err and "remove it" in err
    key.chmod(0o600)


def test_a_planted_template_cache_file_never_runs(ws):
    """Jinja's FileSystemBytecodeCache unpickles the files of compose/jinja/: whoever can write that
    folder ran code at `edgepipe report`. A planted or replaced file is now a miss."""
    import pickle

    from jinja2.bccache import bc_magic

    assert ws.cli("run").rc == 0
    marker = ws.root / "PWNED"
    evil = bc_magic + pickle.dumps(CodeRunningPickle(marker))
    folders = list((_compose_folder() / "jinja").iterdir())
    assert folders
    key = __import__("hashlib").sha1(b"report.html").hexdigest()  # jinja's bucket key for the template
    for folder in folders:
        for path in [*folder.glob("*.cache"), folder / f"__jinja2_{key}.cache", folder / f"{key}.cache"]:
            path.write_bytes(evil)
    r = ws.cli("report")
    assert r.rc == 0, r.err
    assert not marker.exists()
    assert "<!DOCTYPE html>" in (ws.runs / "latest" / "report.html").read_text()


# -- Markdown outputs -----------------------------------------------------------------------------------------
XSS = "<img src=x onerror=alert(1)>"


def _outside_code(line: str) -> str:
    """The line without its inline code spans (inside one, HTML is shown as text)."""
    import re

    return re.sub(r"(`+).*?\1", "", line)


def test_report_md_shows_a_stage_error_as_text(ws):
    r = ws.cli("run", "pipeline=failing", f"+fail.message='{XSS} [x](javascript:alert(1))'")
    assert r.rc == 1
    md = (ws.runs / "latest" / "report.md").read_text()
    assert "&lt;img src=x onerror=alert(1)>" in md and "\\[x\\](javascript:alert(1))" in md
    import re

    assert not any("<img" in _outside_code(line) or re.search(r"(?<!\\)\]\(javascript", _outside_code(line))
                   for line in md.splitlines())


def test_eval_md_shows_class_names_as_text():
    from types import SimpleNamespace

    from stages.evaluate import _markdown

    report = {"split": "test", "samples": 2, "classes": [XSS, "a|b"], "reference": "model",
              "backends": {"model": {"kind": "torch", "samples": 2, "top1": 1.0, "target_met": None,
                                     "per_class": {XSS: 1.0, "a|b": 1.0}}}}
    md = _markdown(report, SimpleNamespace(multicrop=SimpleNamespace(enabled=False)))
    assert "| &lt;img src=x onerror=alert(1)> | 100.0% |" in md
    assert "| a\\|b | 100.0% |" in md  # still one cell
    assert "<img" not in md


# -- training ranks and the user's folder ---------------------------------------------------------------------
def test_a_rank_does_not_import_the_users_stages_folder(tmp_path):
    """A rank is `python -m stages.common.train_ranks JOB` started in the user's folder, with the
    environment the train stage gives it. A `stages/` package there must not be imported. (The full
    DDP path with such a folder: tests/e2e/test_train_ddp.py.)"""
    from stages.common.train_ranks import _rank_env

    (tmp_path / "stages").mkdir()
    marker = tmp_path / "IMPORTED"
    (tmp_path / "stages" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    r = subprocess.run([sys.executable, "-m", "stages.common.train_ranks", str(tmp_path / "no-job.json")],
                       cwd=tmp_path, env=_rank_env(2), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no-job.json" in r.stderr  # ours ran, and found no job file
    assert not marker.exists()
