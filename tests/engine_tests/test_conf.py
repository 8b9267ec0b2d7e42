"""The real conf/: every group option and every experiment composes with Hydra and validates against
the stages' parameter models (no stage runs here)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.config import compose
from engine.config.validate import ConfigError
from engine.run.pipeline import Pipeline

CONF = Path(__file__).resolve().parents[2] / "conf"
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


def _floors(func: ast.FunctionDef) -> list[float]:
    """The numbers a test compares an accuracy against with >= (its floors)."""
    return [c.value for node in ast.walk(func) if isinstance(node, ast.Compare)
            for op, c in zip(node.ops, node.comparators) if isinstance(op, ast.GtE)
            and isinstance(c, ast.Constant) and isinstance(c.value, float)]


def _e2e_tests() -> dict[str, list[ast.FunctionDef]]:
    """experiment -> its test_experiment_<name> functions in every test module (the quickstart's own
    lives in test_quickstart.py); an experiment may have several (generated pictures, real photos)."""
    found: dict[str, list[ast.FunctionDef]] = {}
    for path in sorted(Path(__file__).resolve().parents[1].rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_experiment_"):
                found.setdefault(node.name.removeprefix("test_experiment_"), []).append(node)
            elif isinstance(node, ast.FunctionDef) and path.name == "test_quickstart.py" and _floors(node):
                found.setdefault("quickstart", []).append(node)
    return found


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_has_an_end_to_end_test_with_an_accuracy_floor(experiment):
    """A new conf/experiment/NAME.yaml needs tests/**/test_*.py::test_experiment_NAME that runs it and
    asserts a top-1 floor (a test that only checks files exist let a diverging default ship). At least
    one of its tests asserts 0.5 or more: the generated-picture tests, whose references sit near 100%.
    The real-photo tests' floors are lower (six classes, chance 16.7%, references 51-64%) and count too
    but cannot stand alone: a floor under 0.5 would not notice a two-class run at chance."""
    tests = _e2e_tests().get(experiment, [])
    assert tests, f"conf/experiment/{experiment}.yaml has no test_experiment_{experiment} in tests/"
    floors = [f for test in tests for f in _floors(test)]
    assert any(f >= 0.5 for f in floors), f"no test_experiment_{experiment} asserts an accuracy floor of 0.5 or more"


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
    if pipeline == "rv1103_mobilenetv3":  # its clip stage clips the starting weights: they must be named
        overrides.append("model.pretrained=imagenet")
    _validate(overrides, tmp_path)


def test_board_switch_changes_rknn_target(tmp_path):
    p = _validate(["+experiment=quickstart", "board=rv1106"], tmp_path)
    assert p.stages["rknn_mmse"].params.target == "rv1106"
    assert p.stages["rknn_mmse"].params.algorithm == "mmse"
    assert p.stages["rknn_normal"].params.algorithm == "normal"
    assert p.stages["package_onnx"].params.board == "onnxruntime"


def test_sweep_over_the_quickstart_expands(tmp_path):
    jobs = compose.expand_sweep(["+experiment=quickstart", "train.lr=0.001,0.01", "quantize.method=channel,layer"],
                                CONF)
    assert len(jobs) == 4
