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
from conftest import TESTS
from hostile import assert_clean_failure, assert_one_line_problems

from engine.hashing import ContentIndex, content_digest


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
@pytest.fixture
def conf(ws, monkeypatch) -> Path:
    """The user's own config folder (a copy of the engine tests' one)."""
    conf = ws.root / "conf"
    shutil.copytree(TESTS / "engine_conf", conf)
    monkeypatch.setenv("EDGEPIPE_CONFIG_DIR", str(conf))
    return conf


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
], ids=["optuna-sampler", "job-config-list", "optuna-search-space", "log-file", "log-factory"])
def test_any_call_a_config_names_off_the_allow_list_is_refused(ws, conf, node, args, key):
    evil = _experiment(conf, "evil", node)
    for verb in (["plan"], ["run", "-m", "src.value=1,2"]):
        r = ws.cli(*verb, *args, "+experiment=evil")
        assert_clean_failure(r, 2, key, str(evil))
    assert not ws.runs.exists() and not (ws.root / "zz.pth").exists()


def test_a_target_given_as_an_override_is_named(ws):
    r = ws.cli("plan", "+hydra.callbacks.x._target_=pathlib.Path.touch")
    assert_clean_failure(r, 2, "hydra.callbacks.x._target_", "override '+hydra.callbacks.x._target_=pathlib.Path.touch'")


@pytest.mark.parametrize("choice", [
    ["hydra/sweeper=optuna", f"hydra/sweeper/sampler={s}"] for s in ("tpe", "random", "cmaes", "nsgaii", "motpe", "grid")
] + [[f"hydra/launcher={name}"] for name in ("basic", "joblib", "submitit_local", "submitit_slurm")],
    ids=lambda c: c[-1])
def test_the_plugins_own_configs_pass(ws, choice):
    from omegaconf import OmegaConf

    from engine import compose

    job = compose.compose(choice)  # these name plugin classes and Optuna samplers as _target_
    assert "_target_" in json.dumps(OmegaConf.to_container(job.hydra_cfg), default=str)


def test_a_remembered_composition_is_checked_again(ws, conf, monkeypatch):
    """A config kept by the compose cache (here: one composed before the check existed) is checked on
    every use, not only when Hydra composes it."""
    from engine import compose

    _experiment(conf, "evil", {"hydra": {"callbacks": {"x": {"_target_": "pathlib.Path.touch"}}}})
    with monkeypatch.context() as m:
        m.setattr(compose, "check_targets", lambda *a: None)
        assert compose.compose(["+experiment=evil"]).digest is not None  # kept
    r = ws.cli("plan", "+experiment=evil")
    assert_clean_failure(r, 2, "hydra.callbacks.x._target_")
