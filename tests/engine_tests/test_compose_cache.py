"""engine.config.compose_cache: a config composed before comes back from the cache, equal to what Hydra
composes, and never stale: an edited or added config file, another override, another value of an
environment variable a config names, a damaged entry all compose again (real Hydra, real conf/)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine.config import compose, compose_cache

EXPERIMENT = """\
# @package _global_
defaults:
  - quickstart
  - _self_
name: mine
train:
  epochs: {epochs}
note: ${{oc.env:EDGEPIPE_TEST_NOTE,none}}
choice: ${{hydra:runtime.choices.model}}
"""


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """A user's conf/ with one experiment, and an empty compose cache of its own."""
    monkeypatch.setenv(compose_cache.ENV, str(tmp_path / "compose-cache"))
    monkeypatch.delenv("EDGEPIPE_TEST_NOTE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(EXPERIMENT.format(epochs=3))
    return tmp_path / "conf"


def _hits(monkeypatch) -> list[bool]:
    """Whether each compose came from the cache."""
    seen, real = [], compose_cache.load
    monkeypatch.setattr(compose_cache, "load", lambda key: seen.append(bool(job := real(key))) or job)
    return seen


def _compose(*overrides: str):
    job = compose.compose(list(overrides))
    return OmegaConf.to_container(job.cfg, resolve=True), job


def test_a_cached_config_equals_a_composed_one(conf, monkeypatch):
    hits = _hits(monkeypatch)
    first, job1 = _compose("+experiment=mine", "train.lr=0.5")
    again, job2 = _compose("+experiment=mine", "train.lr=0.5")
    assert hits == [False, True]
    assert again == first and first["train"]["epochs"] == 3 and first["choice"] == "resnet18"
    assert OmegaConf.to_container(job2.hydra_cfg) == OmegaConf.to_container(job1.hydra_cfg)
    assert job2.sources == job1.sources and job2.overrides == job1.overrides
    assert OmegaConf.is_struct(job2.cfg) == OmegaConf.is_struct(job1.cfg)
    assert job2.run_dir.parent.parent == job1.run_dir.parent.parent  # ${now:...} resolved again, same root
    # the .hydra/ files a run writes are the same from the cache as from Hydra
    compose.write_hydra_dir(conf.parent / "composed", job1)
    compose.write_hydra_dir(conf.parent / "cached", job2)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml", "resolved.yaml"):
        assert ((conf.parent / "cached" / ".hydra" / name).read_text()
                == (conf.parent / "composed" / ".hydra" / name).read_text())
    assert not compose.is_sweep(["+experiment=mine", "train.lr=0.5"])
    assert compose.is_sweep(["+experiment=mine", "train.lr=0.5,0.1"])


def test_an_edited_config_file_is_composed_again(conf, monkeypatch):
    hits = _hits(monkeypatch)
    assert _compose("+experiment=mine")[0]["train"]["epochs"] == 3
    path = conf / "experiment" / "mine.yaml"
    st = os.stat(path)
    path.write_text(EXPERIMENT.format(epochs=7))  # same size; the mtime is put back: ctime still tells
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _compose("+experiment=mine")[0]["train"]["epochs"] == 7
    assert hits == [False, False]


def test_an_added_config_file_is_composed_again(conf, monkeypatch):
    hits = _hits(monkeypatch)
    before = _compose("seed=1")[0]
    (conf / "train").mkdir()
    # a file named like a built-in one replaces it
    (conf / "train" / "default.yaml").write_text("epochs: 11\nbatch_size: 5\nlr: 0.1\n")
    after = _compose("seed=1")[0]
    assert hits == [False, False]
    assert before["train"]["batch_size"] != 5 and after["train"]["batch_size"] == 5


def test_another_override_is_another_entry(conf, monkeypatch):
    hits = _hits(monkeypatch)
    assert _compose("+experiment=mine", "train.epochs=4")[0]["train"]["epochs"] == 4
    assert _compose("+experiment=mine", "train.epochs=5")[0]["train"]["epochs"] == 5
    assert _compose("+experiment=mine", "train.epochs=4")[0]["train"]["epochs"] == 4
    assert hits == [False, False, True]


def test_an_environment_variable_a_config_names(conf, monkeypatch):
    hits = _hits(monkeypatch)
    assert _compose("+experiment=mine")[0]["note"] == "none"
    monkeypatch.setenv("EDGEPIPE_TEST_NOTE", "hello")
    assert _compose("+experiment=mine")[0]["note"] == "hello"
    assert _compose("+experiment=mine")[0]["note"] == "hello"
    assert hits == [False, False, True]


def test_a_damaged_entry_is_a_miss(conf, monkeypatch):
    hits = _hits(monkeypatch)
    first = _compose("+experiment=mine")[0]
    for entry in (conf.parent / "compose-cache").glob("*.json"):
        entry.write_text('{"format": 1, "overrides": ["+experiment=mine"], "cfg": [')
    assert _compose("+experiment=mine")[0] == first
    assert _compose("+experiment=mine")[0] == first
    assert hits == [False, False, True]


def test_an_entry_naming_other_files_is_a_miss(conf, monkeypatch):
    """The .hydra/ texts an entry keeps are written by name: an entry that names anything but
    config, hydra and overrides.yaml (../ included) is not used."""
    import json

    hits = _hits(monkeypatch)
    _compose("+experiment=mine")
    for path in (conf.parent / "compose-cache").glob("*.json"):
        entry = json.loads(path.read_text())
        entry["hydra_files"]["../escaped.yaml"] = "x: 1\n"
        path.write_text(json.dumps(entry))
    job = _compose("+experiment=mine")[1]
    compose.write_hydra_dir(conf.parent / "run", job)
    assert hits == [False, False] and not (conf.parent / "run" / "escaped.yaml").exists()


def test_off_composes_every_time(conf, monkeypatch):
    monkeypatch.setenv(compose_cache.ENV, "off")
    hits = _hits(monkeypatch)
    _compose("+experiment=mine")
    _compose("+experiment=mine")
    assert hits == [False, False]
    assert not (conf.parent / "compose-cache").exists()


def test_a_config_error_is_not_cached(conf, monkeypatch):
    with pytest.raises(compose.ComposeError):
        compose.compose(["+experiment=nosuch"])
    (conf / "experiment" / "nosuch.yaml").write_text("# @package _global_\nname: found\n")
    time.sleep(0.01)
    assert _compose("+experiment=nosuch")[0]["name"] == "found"


def test_an_environment_variable_in_the_defaults_list(conf, monkeypatch):
    """Hydra resolves ${oc.env:...} in a defaults list while composing: another value must compose again."""
    (conf / "experiment" / "envy.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /train: ${oc.env:EDGEPIPE_TEST_TRAIN,default}\n  - _self_\n")
    hits = _hits(monkeypatch)
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "tiny")
    tiny = _compose("+experiment=envy")[0]["train"]["epochs"]
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "default")
    default = _compose("+experiment=envy")[0]["train"]["epochs"]
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "tiny")
    assert _compose("+experiment=envy")[0]["train"]["epochs"] == tiny != default
    assert hits == [False, False, False]  # the entry of the first was replaced by the second


@pytest.mark.parametrize("name", ["EDGEPIPE_TEST_TRAIN", "'EDGEPIPE_TEST_TRAIN'", '"EDGEPIPE_TEST_TRAIN"'],
                         ids=["plain", "single-quoted", "double-quoted"])
def test_an_environment_variable_a_file_names_in_quotes(conf, monkeypatch, name):
    """OmegaConf takes a quoted name too (`${oc.env:'NAME'}`): it must be in the key like any other."""
    (conf / "experiment" / "envy.yaml").write_text(
        f"# @package _global_\ndefaults:\n  - override /train: ${{oc.env:{name},default}}\n  - _self_\n")
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "tiny")
    tiny = _compose("+experiment=envy")[0]["train"]["epochs"]
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "default")
    assert _compose("+experiment=envy")[0]["train"]["epochs"] != tiny


@pytest.mark.parametrize("override", ["train=${oc.env:EDGEPIPE_TEST_TRAIN}", "train=${oc.env:'EDGEPIPE_TEST_TRAIN'}"],
                         ids=["plain", "quoted"])
def test_an_environment_variable_an_override_names(conf, monkeypatch, override):
    """`train=${oc.env:NAME}` on the command line chooses a config group while composing: another value of
    NAME must compose again, not serve the first choice (issue 30, item 7)."""
    hits = _hits(monkeypatch)
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "tiny")
    tiny = _compose("+experiment=mine", override)[0]["train"]
    monkeypatch.setenv("EDGEPIPE_TEST_TRAIN", "default")
    default = _compose("+experiment=mine", override)[0]["train"]
    assert default != tiny and hits == [False, False]
    assert _compose("+experiment=mine", override)[0]["train"] == default and hits[-1] is True


@pytest.mark.parametrize("value", ["${oc.env:${oc.env:EDGEPIPE_TEST_WHICH}}",
                                   "${oc.decode:'${oc.env:EDGEPIPE_TEST_WHICH}'}"], ids=["nested", "decode"])
def test_an_environment_read_that_cannot_be_named_is_never_kept(conf, monkeypatch, value):
    """Which variable `${oc.env:${x}}` reads, or what oc.decode builds, is only known when it resolves:
    a config folder holding one is composed every time (the names are taken from every file of it)."""
    (conf / "experiment" / "which.yaml").write_text(f'# @package _global_\nnote: "{value}"\n')
    monkeypatch.setenv("EDGEPIPE_TEST_WHICH", "HOME")
    assert _compose("+experiment=which")[1].digest is None
    (conf / "experiment" / "which.yaml").unlink()
    assert _compose("+experiment=mine")[1].digest is not None


KEPT = """\
# @package _global_
defaults:
  - quickstart
  - _self_
name: kept-${train.epochs}
runs_root: ${oc.env:EDGEPIPE_TEST_ROOT,elsewhere}/runs
cache:
  remote: file:///srv/${name}
hydra:
  run:
    dir: ${runs_root}/${now:%Y}/at-${now:%H}_${name}
"""


def _configs_made(monkeypatch) -> list[int]:
    """How many times a kept entry was made into OmegaConf's DictConfigs."""
    made, real = [], compose_cache.Kept.configs
    monkeypatch.setattr(compose_cache.Kept, "configs", lambda self: made.append(1) or real(self))
    return made


def test_what_plan_and_a_cached_run_read_is_kept_resolved(conf, monkeypatch):
    """name, runs_root, cache.remote, the run folders (${now:} filled in on use) and resolved.yaml come
    from the entry without making a DictConfig (so without importing OmegaConf), equal to what Hydra's
    composition resolves to."""
    (conf / "experiment" / "kept.yaml").write_text(KEPT)
    monkeypatch.setenv("EDGEPIPE_TEST_ROOT", "/data")
    composed = compose.compose(["+experiment=kept"])
    made = _configs_made(monkeypatch)
    before = time.strftime("/data/runs/%Y/at-%H_kept-6")
    kept = compose.compose(["+experiment=kept"])
    after = time.strftime("/data/runs/%Y/at-%H_kept-6")
    facts = (kept.name, kept.runs_root, kept.cache_remote, kept.resolved_yaml())
    assert made == [] and kept.digest == composed.digest is not None
    assert facts == (composed.name, composed.runs_root, composed.cache_remote, composed.resolved_yaml())
    assert facts[:3] == ("kept-6", Path("/data/runs"), "file:///srv/kept-6")
    assert str(kept.run_dir) in (before, after)
    assert kept.sweep_dir.parent == composed.sweep_dir.parent
    compose.write_hydra_dir(conf.parent / "composed", composed)
    compose.write_hydra_dir(conf.parent / "cached", kept)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml", "resolved.yaml"):
        assert ((conf.parent / "cached" / ".hydra" / name).read_text()
                == (conf.parent / "composed" / ".hydra" / name).read_text())
    assert made == []
    assert kept.cfg.train.epochs == 6 and made == [1]  # the config itself, when something reads it


@pytest.mark.parametrize("value, shown", [("${now:%H-%M-%S}", r"\d\d-\d\d-\d\d"),
                                          ("${hydra:runtime.choices.model}", "resnet18")], ids=["time", "hydra"])
def test_a_config_whose_values_the_key_does_not_settle_is_read_through_omegaconf(conf, monkeypatch, value, shown):
    """A job value that reads the clock, or Hydra's runtime config: the entry is used, its values
    resolved on every use as a composed config's are."""
    (conf / "experiment" / "timed.yaml").write_text(f'# @package _global_\nname: "t"\nstamp: "{value}"\n')
    composed = compose.compose(["+experiment=timed"])
    made = _configs_made(monkeypatch)
    kept = compose.compose(["+experiment=timed"])
    assert made == [1] and kept.digest == composed.digest is not None
    assert kept.name == "t" and re.fullmatch(shown, kept.cfg.stamp)
