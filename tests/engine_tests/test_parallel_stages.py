"""`edgepipe run --jobs N`: independent stages at the same time, each in a worker process, on the
engine's cheap test stages (tests/engine_stages.py, pipeline tests/engine_conf/pipeline/parallel.yaml).

The stages record their own start and end (t_meet writes them to $EDGEPIPE_TEST_SPANS), and a stage
told to `meet` another waits until that one has started: two stages that both meet each other can
only finish if they run at the same time, so overlap is shown without timing anything."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from helpers_procs import Output, Spawner, until

from engine.run import scheduler
from engine.store.cache import read_manifest

PARALLEL = ["pipeline=parallel"]
MEET = ["+pipeline.stages.left.with.meet=right", "+pipeline.stages.right.with.meet=left"]


@pytest.fixture
def spans(ws, monkeypatch) -> Path:
    path = ws.root / "spans.txt"
    monkeypatch.setenv("EDGEPIPE_TEST_SPANS", str(path))
    ws.env["EDGEPIPE_TEST_SPANS"] = str(path)
    return path


def read_spans(path: Path) -> dict[str, dict]:
    """{stage: {"start": t, "end": t, "pid": pid}} as the stages wrote them."""
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        stage, what, t, pid = line.split()
        out.setdefault(stage, {})[what] = float(t)
        out[stage]["pid"] = int(pid)
    return out


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b.get("end", float("inf")) and b["start"] < a.get("end", float("inf"))


def outcome(ws, runs: Path) -> dict:
    """What must not depend on --jobs: each stage's status, key and output digest, and the run's."""
    run = json.loads((runs / "latest" / "run.json").read_text())
    return {"status": run["status"], "headline": run["headline"],
            "stages": {k: (v["status"], v["key"], v["digest"], v["error"], v["reason"])
                       for k, v in run["stages"].items()}}


def run_both_ways(ws, *args: str, then: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The same run at --jobs 1 and --jobs 2, each in its own runs root (both cold), and `then` a
    second run with these extra arguments in the same root."""
    results = []
    for jobs in ("1", "2"):
        runs = ws.root / f"runs-j{jobs}"
        r = ws.cli("run", "--jobs", jobs, f"runs_root={runs}", *args)
        if then:
            r = ws.cli("run", "--jobs", jobs, f"runs_root={runs}", *args, *then)
        results.append((r.rc, outcome(ws, runs)))
    return results[0], results[1]


@pytest.mark.parametrize("args", [[], PARALLEL, ["pipeline=failing", "--keep-going"]],
                         ids=["chain", "parallel", "failing-keep-going"])
def test_jobs_2_gives_the_statuses_keys_and_digests_of_jobs_1(ws, spans, args):
    one, two = run_both_ways(ws, *args)
    assert one == two
    assert one[0] == (1 if "--keep-going" in args else 0)
    statuses = {k: v[0] for k, v in one[1]["stages"].items()}
    if "--keep-going" in args:
        assert statuses == {"src": "ran", "broken": "failed", "after_broken": "skipped", "other": "ran"}
    else:
        assert set(statuses.values()) == {"ran"}


@pytest.mark.parametrize("args,then,expected", [
    (["--only", "quant"], (), {"src": "ran", "scale": "ran", "quant": "ran"}),
    (PARALLEL, ("--force", "left,big_b"), {"src": "cached", "left": "ran", "right": "cached", "big_a": "cached",
                                           "big_b": "ran", "total": "cached"}),
], ids=["only", "force"])
def test_only_and_force_work_as_at_jobs_1(ws, spans, args, then, expected):
    one, two = run_both_ways(ws, *args, then=then)
    assert one == two
    assert {k: v[0] for k, v in two[1]["stages"].items()} == expected  # forced, same digest: total cached


def test_independent_stages_run_at_the_same_time_in_worker_processes(ws, spans):
    r = ws.cli("run", "--jobs", "2", *PARALLEL, *MEET)
    assert r.rc == 0, r.err
    s = read_spans(spans)
    assert overlap(s["left"], s["right"])  # each waited for the other to start: they overlapped
    assert s["left"]["pid"] != s["right"]["pid"] != os.getpid()
    assert ws.statuses() == {n: "ran" for n in ("src", "left", "right", "big_a", "big_b", "total")}
    # the worker's library versions reach the manifest as at --jobs 1
    manifest = read_manifest(Path(ws.latest()["stages"]["left"]["path"]))
    assert manifest["libraries"]["python"] and manifest["metrics"] == {"value": 4.0}
    # the workers' log records reach the run's edgepipe.log
    log = (Path(ws.latest()["run_dir"]) / "edgepipe.log").read_text()
    assert "stage left: worker peak RSS" in log and "(declared 500 MB)" in log
    # plain output (not a terminal) names the stages running together
    assert "running  left, right" in r.out or "running  right, left" in r.out, r.out


def test_memory_budget_keeps_two_big_stages_apart(ws, spans):
    r = ws.cli("run", "--jobs", "4", "--max-memory", "1000M", *PARALLEL, *MEET,
               "+pipeline.stages.left.with.memory_mb=100", "+pipeline.stages.right.with.memory_mb=100",
               "+pipeline.stages.big_a.with.memory_mb=600", "+pipeline.stages.big_b.with.memory_mb=600")
    assert r.rc == 0, r.err
    s = read_spans(spans)
    assert not overlap(s["big_a"], s["big_b"]), s  # 600 + 600 > 1000
    assert overlap(s["left"], s["right"])  # small ones still run together


def test_a_stage_larger_than_the_budget_runs_alone_with_a_warning(ws, spans):
    r = ws.cli("run", "--jobs", "4", "--max-memory", "1G", *PARALLEL,
               "+pipeline.stages.big_a.with.memory_mb=3000")
    assert r.rc == 0, r.err
    assert "stage big_a declares 3000 MB peak memory, more than --max-memory 1024 MB; running it alone" in r.err
    s = read_spans(spans)
    assert not any(overlap(s["big_a"], s[o]) for o in ("left", "right", "big_b")), s


def test_a_failing_branch_without_keep_going_starts_nothing_new(ws, spans):
    r = ws.cli("run", "--jobs", "2", "pipeline=failing")
    assert r.rc == 1
    st = ws.statuses()
    assert st["broken"] == "failed" and st["after_broken"] == "skipped"
    # `other` was ready with `broken`: it either ran beside it or was not started after the failure
    assert st["other"] in ("ran", "skipped")
    one = ws.cli("run", "--jobs", "1", f"runs_root={ws.root / 'runs-j1'}", "pipeline=failing")
    assert r.err == one.err  # the same one-line errors as at --jobs 1
    assert r.err.count("broken failed: this stage always fails") == 2  # the log line and the summary's
    assert ws.entries("t_fail") == []
    assert (Path(ws.latest()["run_dir"]) / "failed" / "broken" / "partial.txt").read_text() == "half"


def test_a_worker_that_dies_fails_its_stage_with_one_line(ws, spans, monkeypatch):
    """A worker killed from outside (as the kernel's OOM killer would) fails only its own stage."""
    hold = ws.root / "never"
    proc = Spawner(ws, monkeypatch)
    p = proc("run", "--jobs", "2", "--keep-going", *PARALLEL, f"+pipeline.stages.left.with.hold_for={hold}")
    out = Output(p)
    try:
        until(lambda: spans.exists() and "left start" in spans.read_text(), timeout=120, what="left to start")
        os.kill(read_spans(spans)["left"]["pid"], signal.SIGKILL)
        out.finish(timeout=120)
    finally:
        proc.kill_all()
    assert p.returncode == 1
    run = ws.latest()
    assert run["stages"]["left"]["status"] == "failed"
    assert "worker process died" in run["stages"]["left"]["error"]
    assert run["stages"]["right"]["status"] == "ran" and run["stages"]["total"]["status"] == "skipped"
    assert len(ws.entries("t_meet")) == 3  # right, big_a, big_b: whole entries, none for left
    assert all((Path(run["stages"][n]["path"]) / "value.txt").exists() for n in ("right", "big_a", "big_b"))


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupt_stops_the_workers_and_leaves_no_half_entry(ws, spans, monkeypatch, how):
    hold = ws.root / "never"
    spawn = Spawner(ws, monkeypatch)
    p = spawn("run", "--jobs", "2", *PARALLEL, f"+pipeline.stages.left.with.hold_for={hold}",
              f"+pipeline.stages.right.with.hold_for={hold}")
    out = Output(p)
    try:
        until(lambda: spans.exists() and {"left", "right"} <= set(read_spans(spans)), timeout=120,
              what="both held stages to start")
        workers = [psutil.Process(s["pid"]) for s in read_spans(spans).values()]
        os.kill(p.pid, getattr(signal, how))
        text = out.finish(timeout=60)
        until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
              timeout=30, what="the workers to end")
    finally:
        spawn.kill_all()
    assert ws.entries("t_meet") == []  # nothing half-written, nothing published after the interrupt
    run = ws.latest()
    if how == "SIGINT":
        assert p.returncode == 130, text
        assert run["status"] == "failed"
        for name in ("left", "right"):
            assert run["stages"][name]["status"] == "failed"
            assert run["stages"][name]["error"] == "interrupted (KeyboardInterrupt)"
            assert (Path(run["run_dir"]) / "failed" / name / "started").exists()
        assert not list((ws.runs / "cache" / "t_meet" / ".tmp").iterdir())
    else:
        assert p.returncode == -signal.SIGKILL
    r = ws.cli("run", "--jobs", "2", *PARALLEL)  # the next run resumes: src is cached
    assert r.rc == 0 and ws.statuses()["src"] == "cached"


@pytest.mark.parametrize("bad,message", [
    (["--jobs", "0"], "--jobs 0: give a whole number"),
    (["--jobs", "two"], "--jobs two: give a whole number"),
    (["--max-memory", "8X"], "--max-memory 8X: give a size such as 8G or 512M"),
    (["--jobs"], "--jobs needs a value"),
])
def test_bad_parallel_options_are_one_line_usage_errors(ws, bad, message):
    r = ws.cli("run", *bad)
    assert r.rc == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not ws.runs.exists()


def test_sizes_and_defaults():
    assert scheduler.parse_size("8G") == 8192 and scheduler.parse_size("512M") == 512
    assert scheduler.parse_size("1.5GB") == 1536 and scheduler.parse_size("2048") == 2048
    assert 1 <= scheduler.default_jobs() <= min(4, scheduler.cpu_count())
    assert scheduler.threads_per_stage(scheduler.cpu_count() * 2) == 1
    assert 0 < scheduler.default_memory_mb() < psutil.virtual_memory().total / 2**20


def test_stages_declare_their_peak_memory():
    from engine.config import registry

    rknn = registry.get("rknn_quantize")
    params = {"target": "rv1103"}
    assert rknn.peak_memory(rknn.Params(**params, algorithm="mmse")) >= 1700  # the issue's ~1.7 GB
    assert rknn.peak_memory(rknn.Params(**params, algorithm="normal")) < 1700
    assert registry.get("train").peak_memory_mb > registry.get("preflight").peak_memory_mb


QUICK = ["+experiment=quickstart", "train.epochs=1", "train.limit_train_batches=2", "train.bn_recalibrate_images=64",
         "--only", "ncnn,preflight,calib"]


@pytest.mark.slow
def test_quickstart_branches_at_jobs_2_match_jobs_1(project):
    """The real stages in worker processes: train beside calib, ncnn beside preflight (1 epoch of 2
    batches: the model is what matters). Forced again at --jobs 1, in this process, every
    deterministic stage gives the same output digest."""
    r = project.cli("run", "--jobs", "2", *QUICK)
    assert r.rc == 0, r.err
    assert "running  train, calib" in r.out and "running  preflight, ncnn" in r.out, r.out
    assert "onnx: exporting ONNX" in r.out  # a stage's note, relayed from its worker
    two = project.latest()
    assert project.statuses(two) == {n: "ran" for n in ("data", "train", "calib", "onnx", "preflight", "ncnn")}
    # Float results depend on the thread count (the order of a reduction): a worker has cores/jobs
    # threads, so the in-process run at --jobs 1 is compared with as many.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(scheduler.threads_per_stage(2))
    try:
        r = project.cli("run", "--jobs", "1", "--no-cache", *QUICK)
    finally:
        torch.set_num_threads(threads)
    assert r.rc == 0, r.err
    one = project.latest()
    assert project.statuses(one) == project.statuses(two)
    from engine.config import registry

    for name, rec in two["stages"].items():
        if registry.get(rec["type"]).deterministic:
            assert one["stages"][name]["digest"] == rec["digest"], name


def test_the_live_display_shows_every_running_stage(monkeypatch):
    import io

    from rich.console import Console

    from engine.report import display
    from engine.store.runs import StageRecord

    monkeypatch.setattr(display, "console", Console(file=io.StringIO(), force_terminal=True, width=100))
    d = display.Display("test", ["a", "b"])
    try:
        a, b = StageRecord("a", "t_meet"), StageRecord("b", "t_meet", status="ran")
        d.started(a)
        d.started(b)
        d.update("b", 1, 2, "half way")
        assert [(t.fields["stage"], t.description) for t in d.progress.tasks] == [("a", "t_meet"), ("b", "half way")]
        d.finished(b)
        assert [t.fields["stage"] for t in d.progress.tasks] == ["a"]
    finally:
        d.close()
