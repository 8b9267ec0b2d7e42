"""The real conf/: every group option and every experiment composes with Hydra and validates against
the stages' parameter models (no stage runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import compose
from engine.config import ConfigError
from engine.runner import Pipeline

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF.iterdir() if group.is_dir() and group.name not in ("experiment", "pipeline")
    for option in group.glob("*.yaml")
)
PIPELINES = sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))


def _validate(overrides: list[str], tmp_path: Path) -> Pipeline:
    job = compose.compose(overrides, CONF)
    return Pipeline(job.cfg, tmp_path / "runs")


def _data_path(tmp_path: Path) -> str:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    return f"dataset.path={d}"


def test_every_experiment_has_a_test_here():
    assert {"quickstart", "v831_resnet18", "rv1103_mobilenetv3", "mnist_gem_resnet", "onnx_catsdogs"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment, tmp_path):
    overrides = [f"+experiment={experiment}"]
    if experiment != "quickstart":  # the user's own data: any folder validates, nothing is read
        overrides.append(_data_path(tmp_path))
    pipeline = _validate(overrides, tmp_path)
    assert pipeline.graph.order  # a DAG with a topological order
    assert str(pipeline.cfg.name) == experiment
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_validates_in_the_quickstart(group, option, tmp_path):
    overrides = ["+experiment=quickstart", f"{group}={option}"]
    if group == "dataset" and option != "digits":
        overrides.append(_data_path(tmp_path))
    if group == "board":
        # a board that RKNN cannot target has no rknn stages: the quickstart is for RKNN boards
        job = compose.compose(overrides, CONF)
        if job.cfg.board.get("rknn_target") is None:
            with pytest.raises(ConfigError, match="quantize.target"):
                Pipeline(job.cfg, tmp_path / "runs")
            return
    _validate(overrides, tmp_path)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipeline_validates(pipeline, tmp_path):
    overrides = [f"pipeline={pipeline}", "board=rv1103", "quantize.target=rv1103"]
    _validate(overrides, tmp_path)


def test_board_switch_changes_rknn_target(tmp_path):
    p = _validate(["+experiment=quickstart", "board=rv1106"], tmp_path)
    assert p.stages["rknn_mmse"].params.target == "rv1106"
    assert p.stages["rknn_mmse"].params.algorithm == "mmse"
    assert p.stages["rknn_normal"].params.algorithm == "normal"
    assert p.stages["package_onnx"].params.board == "onnxruntime"


def test_sweep_over_the_quickstart_expands(tmp_path):
    jobs = compose.expand_sweep(["+experiment=quickstart", "train.lr=0.001,0.01", "quantize.method=channel,layer"], CONF)
    assert len(jobs) == 4
