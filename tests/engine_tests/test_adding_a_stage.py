"""DEVELOPERS.md "The stage contract", followed end to end: a stage type of the user's own, written as
a module of its own, registered through EDGEPIPE_PLUGINS, wired after the built-in `dataset` stage in a
pipeline file of a user conf/ layered over the real built-in configs, run, and cached on the second run."""

from __future__ import annotations

import json
import os

import pytest
from conftest import Workspace
from hostile import assert_clean_failure

# The recipe: a Stage subclass with a name, a version, Params (extra keys refused), inputs, and a run()
# that reads only its inputs, writes only under `out`, returns metrics and raises StageError for what
# the user must fix. Written to a file so that the test follows the recipe as a user would.
CLASS_BALANCE = '''\
"""`class_balance`: the share of each class in a dataset split."""

from __future__ import annotations

import json

import numpy as np
from pydantic import Field

from engine.contract.stage import Input, Params, Stage, StageError
from stages.common.bundle import read_labels


class ClassBalance(Stage):
    name = "class_balance"
    version = 1
    inputs = {"data": Input(required=True, doc="a dataset folder")}

    class Params(Params):
        split: str = "train"
        # refuse a dataset whose smallest class has a smaller share than this
        min_share: float = Field(0.0, ge=0.0, le=1.0)

    def run(self, p, inputs, out, ctx):
        classes = read_labels(inputs["data"])
        labels = np.load(inputs["data"] / f"labels_{p.split}.npy")
        shares = np.bincount(labels, minlength=len(classes)) / max(len(labels), 1)
        smallest = int(shares.argmin())
        if shares[smallest] < p.min_share:
            raise StageError(f"class_balance.min_share={p.min_share}: class {classes[smallest]!r} has "
                             f"{shares[smallest]:.1%} of the {p.split} split")
        (out / "balance.json").write_text(json.dumps(dict(zip(classes, shares.round(4).tolist()))) + "\\n")
        return {"classes": len(classes), "smallest_share": round(float(shares[smallest]), 4)}
'''

PIPELINE = """\
stages:
  data: {uses: dataset}
  balance: {uses: class_balance, needs: {data: data}, with: {min_share: 0.05}}
headline: balance.smallest_share
"""


@pytest.fixture
def user(tmp_path, capsys, monkeypatch) -> Workspace:
    """A project folder with conf/ (over the built-ins) and plugins/class_balance.py."""
    w = Workspace(tmp_path, capsys, tmp_path / "conf")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "class_balance.py").write_text(CLASS_BALANCE)
    (tmp_path / "conf/pipeline").mkdir(parents=True)
    (tmp_path / "conf/pipeline/balance.yaml").write_text(PIPELINE)
    monkeypatch.delenv("EDGEPIPE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("EDGEPIPE_PLUGINS", "class_balance")
    monkeypatch.setenv("EDGEPIPE_RUNS", str(w.runs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.chdir(tmp_path)
    return w


def test_a_plugin_stage_runs_after_a_builtin_one_and_is_cached(user):
    args = ("pipeline=balance", "preprocess.input_size=[16,16]")
    r = user.cli("run", *args)
    assert r.rc == 0, r.err
    run = user.latest()
    assert user.statuses(run) == {"data": "ran", "balance": "ran"}
    metrics = run["stages"]["balance"]["metrics"]
    assert metrics["classes"] == 10 and 0.05 <= metrics["smallest_share"] < 0.1  # digits: ten classes, ~10% each
    (entry,) = user.entries("class_balance")
    shares = json.loads((entry / "out" / "balance.json").read_text())
    assert list(shares) == [str(d) for d in range(10)] and abs(sum(shares.values()) - 1.0) < 1e-3

    assert user.cli("run", *args).rc == 0
    assert user.statuses() == {"data": "cached", "balance": "cached"}

    # its Params are validated while planning, like a built-in stage's, and name the key
    r = user.cli("plan", "pipeline=balance", "+pipeline.stages.balance.with.min_shar=0.2")
    assert_clean_failure(r, 2, "pipeline.stages.balance.with.min_shar", "did you mean 'min_share'", "class_balance")
    # a StageError of its own is one line naming its key; nothing of it lands in the cache
    r = user.cli("run", "pipeline=balance", "preprocess.input_size=[16,16]",
                 "pipeline.stages.balance.with.min_share=0.5")
    assert r.rc == 1 and "class_balance.min_share=0.5" in r.err, r.err
    assert user.entries("class_balance") == [entry]
