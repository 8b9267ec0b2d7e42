"""The model backends as a registry (issue 25): every kind is one class, registered through the
``edgepipe.backends`` entry points, that owns its facts; a backend added by a plugin distribution is
seen by evaluate, package, the golden samples and the report with no other edit; loading the registry
imports no runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from helpers_backends import backend_plugin
from helpers_data import write_dataset_folder

from backends.base import BACKEND_GROUP, Backend, by_kind, packaged_kinds, recognise, recognise_all, registered
from boards import get_board, known_boards

ROOT = Path(__file__).resolve().parents[2]


def test_every_backend_in_pyproject_is_registered_and_owns_its_facts():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][BACKEND_GROUP]
    assert sorted(c.kind for c in registered()) == sorted(declared)  # the entry point's name is the kind
    for cls in registered():
        assert issubclass(cls, Backend) and by_kind(cls.kind) is cls
        assert cls.model_file and cls.model_files() and cls.target in (None, "float", "quantized")
        assert cls.companion_of is None or cls.companion_of in declared
        if cls.packaged_as:  # a board can take it: the package names it and the self-test measures it
            assert cls.producer and cls.report_name and cls.golden_tolerance and cls.golden_measured_with
    assert by_kind("rknn").int8 and by_kind("rknn_board").int8 and not by_kind("onnx").int8
    reference = sorted((c for c in registered() if c.reference_rank is not None), key=lambda c: c.reference_rank)
    assert [c.kind for c in reference] == ["torch", "torchscript", "onnx"]


def test_every_board_takes_a_packaged_backend_kind():
    """A board's model_format is a backend kind (validated against the registry, not a Literal)."""
    formats = {get_board(name).model_format for name in known_boards()}
    assert formats <= set(packaged_kinds()) and formats == {"onnx", "ncnn", "rknn"}
    with pytest.raises(ValueError, match="not a backend kind a package takes"):
        type(get_board("onnxruntime"))(model_format="tflite")


def test_recognition_order_and_companions(tmp_path):
    (tmp_path / "model.rknn").write_bytes(b"")
    (tmp_path / "model.onnx").write_bytes(b"")  # an rknn_quantize folder wins over the other files in it
    assert recognise(tmp_path).kind == "rknn" and [c.kind for c in recognise_all(tmp_path)] == ["rknn"]
    (tmp_path / "board_test_logits.npy").write_bytes(b"")
    assert [c.kind for c in recognise_all(tmp_path)] == ["rknn", "rknn_board"]
    only_board = tmp_path / "b"
    only_board.mkdir()
    (only_board / "board_test_logits.npy").write_bytes(b"")
    assert recognise(only_board) is None  # a companion is never a folder of its own


def test_loading_the_registry_imports_no_runtime():
    """The report reads the backends' facts: loading every class imports no torch, onnxruntime, ncnn,
    rknn (nor numpy or pydantic)."""
    code = ("import sys\n"
            "from engine.contract.plugins import backend_classes\n"
            "assert len(backend_classes()) >= 6\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'ncnn', 'rknn', 'numpy', 'pydantic') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_the_entry_points_a_report_remembers_follow_what_is_installed(tmp_path, monkeypatch):
    """The report reads the group's entry points from the sealed memo (no importlib.metadata on a cached
    run): what importlib.metadata lists, and a distribution added to sys.path since is read again."""
    import importlib.metadata

    from engine.config import compose_cache
    from engine.contract import fetching, plugins

    monkeypatch.setenv(compose_cache.ENV, str(tmp_path / "compose"))
    listed = [ep.value for ep in importlib.metadata.entry_points(group=BACKEND_GROUP)]
    with fetching.memo(compose_cache.resolved_memo()):
        assert plugins.entry_point_values(BACKEND_GROUP) == listed
        with monkeypatch.context() as m:  # remembered: importlib.metadata is not asked again
            m.setattr(importlib.metadata, "entry_points", lambda **kw: pytest.fail("read again"))
            assert plugins.entry_point_values(BACKEND_GROUP) == listed
        with backend_plugin(tmp_path / "plugin", "table_backend", PLUGIN, table="table_backend:TableBackend"):
            assert plugins.entry_point_values(BACKEND_GROUP) == ["table_backend:TableBackend", *listed]
        assert plugins.entry_point_values(BACKEND_GROUP) == listed


# -- a backend added by a plugin: one class and its entry point, nothing else edited -------------------
PLUGIN = '''
import numpy as np

from backends.base import Backend


class TableBackend(Backend):
    """A "model" that is a logits table per class mean: enough to be packaged, measured and reported."""

    kind, model_file, producer, runtime, target = "table", "model.table.npy", "table_export", "table", "quantized"
    report_name, int8, packaged_as = "Table", True, "model.table.npy"
    golden_tolerance, golden_measured_with = (0.0, 0.5), "numpy on {machine}"
    golden_input_layout = "float32 N x 3 x H x W, normalised"

    def _load(self):
        self.weights = np.load(self.folder / self.model_file)

    def logits(self, x):
        return x.reshape(len(x), 3, -1).mean(-1) @ self.weights

# a board taking the new kind, registered by the same plugin (the ONNX Runtime family's behaviour)
from boards.onnxruntime import OnnxRuntimeBoard

board = OnnxRuntimeBoard(name="table_board", title="Table board", model_format="table")
'''


def _table_folder(root: Path) -> Path:
    from stages.common.bundle import write_labels
    from stages.common.preprocess import Preprocess

    root.mkdir()
    np.save(root / "model.table.npy", np.eye(3, dtype=np.float32))
    write_labels(root / "labels.txt", ["red", "green", "blue"])
    Preprocess(input_size=(8, 8)).save(root)
    return root


def test_a_plugin_backend_is_seen_by_evaluate_package_golden_and_report(tmp_path):
    """One class and its entry point (with a board that takes it): evaluate scores it with its logits, the
    package stage packages it with golden samples measured by it, the report names it and marks it int8."""
    from engine.report.sections import is_int8
    from engine.report.summary import model_format
    from engine.run.testing import run_stage

    model = _table_folder(tmp_path / "model")
    # image i all in channel i % 3 (red, green, blue): the table's logits pick that channel's class
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[np.arange(4), :, :, np.arange(4) % 3] = 255
    labels = np.array([0, 1, 2, 1])  # the 4th is red, labelled green
    data = write_dataset_folder(tmp_path / "data", {"test": (images, labels)}, ["red", "green", "blue"])
    with pytest.raises(KeyError):
        by_kind("table")
    with backend_plugin(tmp_path / "plugin", "table_backend", PLUGIN, boards={"table_board": "table_backend:board"},
                        table="table_backend:TableBackend"):
        assert by_kind("table").kind == "table" and "table" in packaged_kinds()
        assert recognise(model).kind == "table"
        run_stage("evaluate", {}, {"data": data, "mine": model}, tmp_path / "eval")
        # evaluate: the input's kind from the registry, scored with the plugin's logits (the 4th image missed)
        scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())["backends"]["mine"]
        assert scored["kind"] == "table" and scored["samples"] == 4 and scored["top1"] == 0.75, scored
        assert scored["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]], scored
        run_stage("package", {"board": "table_board"}, {"model": model, "data": data}, tmp_path / "pkg")
        manifest = json.loads((tmp_path / "pkg" / "package" / "manifest.json").read_text())
        assert manifest["model"]["format"] == "table"
        selftest = manifest["selftest"]  # measured with the plugin's logits, its tolerance and layout
        assert selftest["atol"] == 0.0 and selftest["rtol"] == 0.5 and selftest["samples"] == 4
        assert selftest["measured_with"].startswith("numpy on ")
        assert selftest["input_layout"] == "float32 N x 3 x H x W, normalised"
        expected = np.load(tmp_path / "pkg" / "package" / "golden" / "expected.npy")
        assert expected.shape == (4, 3)
        # the report: its name and size on disk, and int8 from the class, through the entry points
        assert model_format(model) == ("Table", (model / "model.table.npy").stat().st_size)
        assert is_int8({"kind": "table"})
    assert not is_int8({"kind": "table"}) and model_format(model) is None
    with pytest.raises(ValueError, match="not a backend kind"):
        type(get_board("onnxruntime"))(model_format="table")
