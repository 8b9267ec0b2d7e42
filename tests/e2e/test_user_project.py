"""edgepipe as a tool users install (issue 14): a user's own conf/ layered over the built-in configs
(Hydra's search path), `edgepipe init`, `plan --info`, and a wheel that carries conf/ and runs from an
empty folder in a fresh venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TESTS, Workspace
from helpers_data import make_image_folder
from hostile import assert_clean_failure, assert_one_line_problems, new_files, snapshot

BUILTIN = REPO / "conf"  # what the editable install serves as pkg://edgepipe_conf

MY_NET = """\
# a model of the user's own: ResNet-18 with the small stem (3x3 conv, no max-pool)
arch: resnet18
head: linear
stem: small
in_channels: 3
dropout: null
pretrained: null
"""

MINE = """\
# @package _global_
defaults:
  - quickstart                 # the built-in experiment
  - override /model: my_net    # the user's model
  - _self_
name: mine
train:
  epochs: 2
"""


@pytest.fixture
def user(tmp_path, capsys, monkeypatch) -> Workspace:
    """An empty project folder as the current folder; no EDGEPIPE_CONFIG_DIR: ./conf is the user's."""
    w = Workspace(tmp_path, capsys, tmp_path / "conf")
    monkeypatch.delenv("EDGEPIPE_CONFIG_DIR", raising=False)
    monkeypatch.delenv("EDGEPIPE_PLUGINS", raising=False)
    monkeypatch.setenv("EDGEPIPE_RUNS", str(w.runs))
    monkeypatch.chdir(tmp_path)
    return w


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def job_config(w: Workspace, *args: str) -> dict:
    r = w.cli("run", "--cfg", "job", "--resolve", *args)
    assert r.rc == 0, r.err
    return yaml.safe_load(r.out)


def info(w: Workspace, *args: str) -> dict:
    r = w.cli("plan", "--info", "--json", *args)
    assert r.rc == 0, r.err
    data = json.loads(r.out)
    data["origin"] = {c["config"]: (c["provider"], Path(c["file"])) for c in data["configs"]}
    return data


# -- a user's conf/ over the built-ins ----------------------------------------------------------------------
def test_user_model_and_experiment_layered_over_the_builtins(user):
    write(user.root / "conf/model/my_net.yaml", MY_NET)
    write(user.root / "conf/experiment/mine.yaml", MINE)

    cfg = job_config(user, "+experiment=mine")
    assert cfg["name"] == "mine" and cfg["train"]["epochs"] == 2
    assert cfg["model"]["stem"] == "small"                      # the user's model option
    assert cfg["board"]["name"] == "rv1103"                     # the rest from the built-in quickstart
    r = user.cli("plan", "--json", "+experiment=mine")          # validates against the real stages
    assert r.rc == 0, r.err
    assert {"train", "rknn_mmse", "package_board"} <= {s["name"] for s in json.loads(r.out)["stages"]}

    got = info(user, "+experiment=mine")
    assert [(s["provider"], Path(s["folder"])) for s in got["search_path"]] == [
        ("project", user.root / "conf"), ("edgepipe", BUILTIN)]
    assert got["origin"]["experiment/mine"] == ("project", user.root / "conf/experiment/mine.yaml")
    assert got["origin"]["model/my_net"] == ("project", user.root / "conf/model/my_net.yaml")
    assert got["origin"]["experiment/quickstart"] == ("edgepipe", BUILTIN / "experiment/quickstart.yaml")
    assert got["origin"]["config"] == ("edgepipe", BUILTIN / "config.yaml")
    assert list(got["origin"])[-1] == "experiment/mine"         # merged last: its values win

    # the built-in groups are all still there, next to the user's options
    cfg = job_config(user, "+experiment=mine", "model=mobilenet_v3_small", "board=rv1106")
    assert cfg["model"]["arch"] == "mobilenet_v3_small" and cfg["board"]["name"] == "rv1106"
    assert job_config(user, "+experiment=quickstart")["model"]["arch"] == "resnet18"
    r = user.cli("plan", "+experiment=mine", "model=nosuch")
    assert_clean_failure(r, 2, "model=nosuch", "my_net", "resnet18", "mobilenet_v3_small")


def test_user_file_named_like_a_builtin_replaces_it(user):
    text = (BUILTIN / "train/default.yaml").read_text().replace("\nepochs: 10\n", "\nepochs: 3\n")
    assert "\nepochs: 3\n" in text
    write(user.root / "conf/train/default.yaml", text)
    assert job_config(user)["train"]["epochs"] == 3
    assert info(user)["origin"]["train/default"] == ("project", user.root / "conf/train/default.yaml")
    # the quickstart sets train.epochs itself, over whichever train/default was chosen
    assert job_config(user, "+experiment=quickstart")["train"]["epochs"] == 6


def test_hydra_searchpath_adds_a_folder_behind_the_builtins(user, tmp_path_factory):
    team = tmp_path_factory.mktemp("team_conf")
    write(team / "model/team_net.yaml", MY_NET)
    searchpath = f"hydra.searchpath=[file://{team}]"
    assert job_config(user, searchpath, "model=team_net")["model"]["stem"] == "small"
    got = info(user, searchpath, "model=team_net")
    assert got["origin"]["model/team_net"] == ("hydra.searchpath in command-line", team / "model/team_net.yaml")
    assert [s["provider"] for s in got["search_path"]] == ["edgepipe", "hydra.searchpath in command-line"]


def test_user_pipeline_file_with_a_plugin_stage_type(user, monkeypatch):
    """Stage types of the user's own (entry point `edgepipe.stages`, or EDGEPIPE_PLUGINS while
    developing) are usable from a pipeline file in the user's conf/."""
    monkeypatch.setenv("EDGEPIPE_PLUGINS", "engine_stages")
    monkeypatch.syspath_prepend(str(TESTS))
    write(user.root / "conf/pipeline/mine.yaml",
          "stages:\n  src: {uses: t_source}\n  double: {uses: t_scale, needs: {x: src}}\nheadline: double.value\n")
    r = user.cli("run", "pipeline=mine", "+src.value=4")
    assert r.rc == 0, r.err
    assert user.latest()["stages"]["double"]["metrics"] == {"value": 8.0}


def test_reproduce_names_the_folder_and_version_the_run_was_made_with(user, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("EDGEPIPE_PLUGINS", "engine_stages")
    monkeypatch.syspath_prepend(str(TESTS))
    write(user.root / "conf/pipeline/files.yaml", "stages:\n  files: {uses: t_folder}\n")
    write(user.root / "data/a.txt", "abc")
    assert user.cli("run", "pipeline=files", "+files.path=data").rc == 0
    run_dir = (user.runs / "latest").resolve()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["cwd"] == str(user.root) and record["config_sources"][0]["folder"] == str(user.root / "conf")
    assert user.cli("reproduce", str(run_dir)).rc == 0

    os.chdir(tmp_path_factory.mktemp("elsewhere"))  # `data` is not here: the note says where to run it
    r = user.cli("reproduce", str(run_dir))
    assert_clean_failure(r, 2, "files.path", f"the run was made in {user.root}")

    os.chdir(user.root)
    record["edgepipe_version"] = "0.0.1"
    (run_dir / "run.json").write_text(json.dumps(record))
    write(user.root / "data/a.txt", "abcd")  # new content: a new key
    r = user.cli("reproduce", str(run_dir))
    assert r.rc == 1 and "made with edgepipe 0.0.1" in r.out, r.out


def test_config_folder_with_its_own_config_yaml_is_the_primary_config(ws):
    """EDGEPIPE_CONFIG_DIR=tests/engine_conf (a config.yaml of its own): it is the primary config,
    and the built-in groups stay on the search path behind it."""
    got = info(ws)
    assert got["origin"]["config"] == ("project", TESTS / "engine_conf/config.yaml")
    assert got["origin"]["pipeline/chain"][0] == "project"
    assert_clean_failure(ws.cli("plan", "pipeline=nosuch"), 2, "pipeline=nosuch", "chain", "quickstart")


@pytest.mark.parametrize("flag", ["-cn", "--config-name"])
def test_config_name_chooses_the_primary_config(user, monkeypatch, flag):
    """-cn NAME (Hydra's flag): conf/NAME.yaml is the primary config; it may extend the built-in
    config.yaml through its defaults list. -cp is -cd's Hydra spelling."""
    monkeypatch.setenv("EDGEPIPE_CONFIG_NAME", "")  # -cn sets it for launcher workers; restored after
    write(user.root / "conf/lab.yaml", "defaults:\n  - config\n  - _self_\nname: lab\ntrain:\n  epochs: 2\n")
    cfg = job_config(user, flag, "lab")
    assert (cfg["name"], cfg["train"]["epochs"]) == ("lab", 2)
    assert info(user, flag, "lab")["origin"]["lab"] == ("project", user.root / "conf/lab.yaml")
    monkeypatch.setenv("EDGEPIPE_CONFIG_NAME", "")
    assert job_config(user, "-cp", str(user.root / "conf"))["name"] == "run"  # without -cn: config.yaml
    monkeypatch.setenv("EDGEPIPE_CONFIG_NAME", "")
    assert_clean_failure(user.cli("plan", flag, "nosuch"), 2, "primary config 'nosuch'")
    assert_clean_failure(user.cli("plan", flag, "../lab"), 2, "-cn/--config-name")


@pytest.mark.parametrize("how", ["-cd", "env"])
def test_missing_config_folder_is_a_one_line_error(user, monkeypatch, how):
    missing = user.root / "nosuch"
    if how == "env":
        monkeypatch.setenv("EDGEPIPE_CONFIG_DIR", str(missing))
    args = ["plan", *(["-cd", str(missing)] if how == "-cd" else [])]
    before = snapshot(user.root)
    r = user.cli(*args)
    assert_clean_failure(r, 2, "-cd/--config-dir" if how == "-cd" else "EDGEPIPE_CONFIG_DIR", str(missing),
                         "no such folder")
    assert_one_line_problems(r)
    assert new_files(user.root, before) == []


# -- edgepipe init ---------------------------------------------------------------------------------------
def test_init_writes_a_project_that_composes_and_never_overwrites(user):
    r = user.cli("init", "proj")
    assert r.rc == 0, r.err
    proj = user.root / "proj"
    experiment = proj / "conf/experiment/my_experiment.yaml"
    assert experiment.is_file() and "runs/" in (proj / ".gitignore").read_text().splitlines()
    readme = (proj / "README.md").read_text()
    for command in ("edgepipe plan +experiment=my_experiment", "edgepipe run +experiment=my_experiment",
                    "edgepipe reproduce"):
        assert command in readme

    os.chdir(proj)  # (the fixture's monkeypatch.chdir restores the folder)
    cfg = job_config(user, "+experiment=my_experiment")
    assert cfg["name"] == "my_experiment"
    assert cfg["dataset"]["kind"] == "folder" and cfg["dataset"]["path"] == "data"
    assert cfg["pipeline"]["headline"] == "eval.top1.rknn_mmse"  # the quickstart's flow

    experiment.write_text("# @package _global_\nname: edited\n")
    (proj / ".gitignore").write_text("*.pyc\n")
    before = snapshot(proj)
    r = user.cli("init")
    assert r.rc == 0, r.err
    assert snapshot(proj) == before
    assert "kept conf/experiment/my_experiment.yaml" in r.out and "add a line 'runs/'" in r.out
    assert_clean_failure(user.cli("init", "README.md"), 2, "README.md", "is a file")


# -- the wheel ----------------------------------------------------------------------------------------------
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "engine", "stages", "boards", "backends", "conf")
NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc")


def _build_wheel(tmp: Path) -> Path:
    """pip wheel of a copy of the sources (an in-tree build would write build/ into the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        (shutil.copytree(REPO / name, src / name, ignore=NOT_SHIPPED) if (REPO / name).is_dir()
         else shutil.copy2(REPO / name, src / name))
    # --no-build-isolation: the venv's setuptools builds it, so no network is needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-c", str(REPO / "constraints.txt"), str(src), "-w", str(tmp / "dist")], check=True)
    (wheel,) = (tmp / "dist").glob("edgepipe-*.whl")
    return wheel


def _shipped(wheel: Path) -> set[str]:
    names = set(zipfile.ZipFile(wheel).namelist())
    return {n.replace("edgepipe_conf/", "conf/", 1) for n in names if not n.startswith("edgepipe-")}


def _venv_on_the_project_dependencies(tmp: Path, wheel: Path) -> Path:
    """A fresh venv with only the wheel installed; the dependencies come from this venv's
    site-packages through a .pth file, minus edgepipe's own editable install (its metadata and its
    import finder), so nothing of edgepipe can come from the checkout."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin/python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", "-c", str(REPO / "constraints.txt"), str(wheel)], check=True)
    deps = tmp / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("edgepipe", "__editable__")):
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "project_dependencies.pth").write_text(f"{deps}\n")
    return venv


@pytest.mark.slow
def test_wheel_carries_its_configs_and_runs_from_an_empty_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    expected = {str(p.relative_to(REPO)) for name in ("engine", "stages", "boards", "backends", "conf")
                for p in (REPO / name).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert expected <= _shipped(wheel), f"not in the wheel: {sorted(expected - _shipped(wheel))}"

    venv = _venv_on_the_project_dependencies(tmp_path, wheel)
    project = tmp_path / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPIPE_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONNOUSERSITE="1")

    def edgepipe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin/edgepipe"), *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([str(venv / "bin/python"), "-c", "import engine, stages, edgepipe_conf; "
                            "print(engine.__file__, stages.__file__, edgepipe_conf.__file__)"],
                           cwd=project, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(f).is_relative_to(venv) for f in where), where

    r = edgepipe("init")
    assert r.returncode == 0, r.stderr
    make_image_folder(project / "data", per_class=10)
    r = edgepipe("plan", "--info", "--json", "+experiment=my_experiment")
    assert r.returncode == 0, r.stderr
    origin = {c["config"]: (c["provider"], Path(c["file"])) for c in json.loads(r.stdout)["configs"]}
    assert origin["experiment/my_experiment"] == ("project", project / "conf/experiment/my_experiment.yaml")
    provider, quickstart = origin["experiment/quickstart"]
    assert provider == "edgepipe" and quickstart.is_relative_to(venv) and quickstart.is_file()

    # the quickstart's flow as the init experiment extends it, on the generated images, trained for one
    # epoch; only data and train run (the RKNN builds would take minutes)
    r = edgepipe("run", "+experiment=my_experiment", "train.epochs=1", "train.batch_size=8", "--only", "train")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = (project / "runs/latest").resolve()
    record = json.loads((run_dir / "run.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == {"data": "ran", "train": "ran"}
    assert record["stages"]["train"]["metrics"]["epochs_run"] == 1
    version = subprocess.run([str(venv / "bin/edgepipe"), "--version"], env=env, capture_output=True,
                             text=True, check=True).stdout.split()[-1]
    assert record["edgepipe_version"] == version
    assert [Path(s["folder"]) for s in record["config_sources"]] == [project / "conf", quickstart.parents[1]]
    assert record["cwd"] == str(project)

    r = edgepipe("reproduce", "runs/latest")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reproduced" in r.stdout
