"""SIGKILL in the middle of a real subprocess-heavy stage: `ncnn`, while pnnx (a child process) converts
the quickstart's model, on the real conf/ (1 epoch of 2 batches, 32 px: the model is what matters).

The pnnx child is frozen (SIGSTOP) as soon as it appears, so "in the middle of the conversion" and
"while the second process waits for the lock" are certain, not a matter of timing:
- the killed run leaves no cache entry, only its temp folder (pnnx's scratch files inside), which
  `edgepipe gc` removes; the next run completes;
- a process waiting on the lock of the killed holder's key takes over and publishes a whole entry."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from helpers_procs import WAITING, Output, Spawner, until

pytestmark = pytest.mark.slow

RUN = ["run", "+experiment=quickstart", "--only", "ncnn", "train.epochs=1", "train.limit_train_batches=2",
       "train.bn_recalibrate_images=64"]


@pytest.fixture
def spawn(project, monkeypatch):
    spawner = Spawner(project, monkeypatch)
    yield spawner
    spawner.kill_all()


def frozen_pnnx(proc, out: Output) -> psutil.Process:
    """The pnnx child of a running `edgepipe run`, stopped (SIGSTOP) as soon as it appears."""
    found: list[psutil.Process] = []

    def pnnx_started() -> bool:
        assert proc.poll() is None, f"edgepipe ended before pnnx started:\n{out.text()}"
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.name() == "pnnx":
                    child.suspend()
                    found.append(child)
                    return True
            except psutil.NoSuchProcess:
                pass
        return False

    until(pnnx_started, timeout=600, what="pnnx to start")
    return found[0]


def kill_holder(proc, pnnx: psutil.Process) -> None:
    """SIGKILL edgepipe (only it: its pnnx child is orphaned, as after `kill -9`), then end the
    orphan, which would otherwise convert on into the dead run's temp folder."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    pnnx.kill()
    pnnx.wait(timeout=30)


def test_sigkill_during_pnnx_then_gc_then_a_waiter_takes_over(project, spawn):
    cache = project.runs / "cache"
    first = spawn(*RUN)
    first_out = Output(first)
    pnnx = frozen_pnnx(first, first_out)
    (tmp,) = (cache / "ncnn" / ".tmp").iterdir()  # the stage's temp folder, pnnx's scratch inside it
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".pnnx-")]
    kill_holder(first, pnnx)

    assert project.entries("ncnn") == []  # no partial entry
    assert list((cache / "ncnn" / ".tmp").iterdir()) == [tmp]
    finished = {t: project.entries(t) for t in ("dataset", "train", "export_onnx")}
    assert all(len(e) == 1 for e in finished.values()), finished  # what completed before the kill stays

    r = project.cli("gc")
    assert r.rc == 0 and f"removed unfinished ncnn/.tmp/{tmp.name}" in r.out, r.out
    assert not tmp.exists()
    assert {t: project.entries(t) for t in finished} == finished  # the killed run still refers to them

    # a second holder, killed while a third process waits for the same key's lock
    holder = spawn(*RUN)
    pnnx = frozen_pnnx(holder, Output(holder))
    waiter = Output(spawn(*RUN))
    waiter.wait_for(f"ncnn: {WAITING}", timeout=300)
    assert project.entries("ncnn") == []
    kill_holder(holder, pnnx)
    text = waiter.finish(timeout=300)
    assert waiter.proc.returncode == 0, text
    st = project.statuses()
    assert st == {"data": "cached", "train": "cached", "onnx": "cached", "ncnn": "ran"}, text
    (entry,) = project.entries("ncnn")
    assert {"model.ncnn.param", "model.ncnn.bin", "parity.json"} <= {p.name for p in (entry / "out").iterdir()}
    assert (entry / "manifest.json").is_file()
    assert not [p for p in (entry / "out").iterdir() if p.name.startswith(".pnnx-")]
    assert list((cache / "ncnn" / ".tmp").iterdir()) == []  # the killed holder's temp folder is gone
