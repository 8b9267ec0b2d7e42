"""The engine end to end on cheap stages: cache hits and misses, invalidation, early cut-off,
damaged entries, errors, --only/--force/--keep-going, concurrency, SIGKILL, sweeps, reproduce, gc."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import helpers_procs
import pytest
from helpers_procs import Output, until


def test_second_run_is_all_cache_hits(ws):
    r = ws.cli("run")
    assert r.rc == 0, r.err
    assert set(ws.statuses().values()) == {"ran"}
    assert ws.counts() == {"src": 1, "scale": 1, "quant": 1, "side": 1, "total": 1}
    first = ws.latest()

    r = ws.cli("run")
    assert r.rc == 0
    assert set(ws.statuses().values()) == {"cached"}
    assert ws.counts() == {"src": 1, "scale": 1, "quant": 1, "side": 1, "total": 1}
    second = ws.latest()
    assert second["run_dir"] != first["run_dir"]
    for name, stage in first["stages"].items():
        assert second["stages"][name]["key"] == stage["key"]
        assert second["stages"][name]["digest"] == stage["digest"]
    # metrics survive a cache hit; the headline is the configured one (3*2*5 + 3*7 = 51)
    assert second["stages"]["total"]["metrics"] == {"sum": 51.0}
    assert second["headline"] == {"key": "total.sum", "value": 51.0}


def test_run_folder_layout(ws):
    ws.cli("run", "src.value=4")
    run_dir = (ws.runs / "latest").resolve()
    assert run_dir.parent.parent == ws.runs.resolve()  # runs/<date>/<time>_<name>
    assert run_dir.name.endswith("_enginetest")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "src.value=4" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert (run_dir / "report.md").read_text().startswith("# enginetest")
    run = ws.latest()
    for name, stage in run["stages"].items():
        link = run_dir / "stages" / name
        assert link.resolve() == Path(stage["path"]).resolve()
        # the stage owns its output folder; the engine's manifest sits beside it
        assert link.resolve().name == "out" and not (link / "manifest.json").exists()
        assert (link.resolve().parent / "manifest.json").is_file()
        assert stage["seconds"] >= 0 and len(stage["key"]) == 32
    manifest = json.loads(((run_dir / "stages" / "scale").resolve().parent / "manifest.json").read_text())
    assert manifest["params"] == {"factor": 2, "modulo": None, "sleep": 0.0}
    assert set(manifest["files"]) == {"value.txt", "run.log"}
    assert manifest["libraries"]["python"]
    # cache entries are read-only: a stage or a user cannot edit them by accident
    # (checked by mode bits: the tests run as root, for whom os.access always says writable)
    for f in (run_dir / "stages" / "scale" / "value.txt",
              Path(run["stages"]["scale"]["path"]).parent / "manifest.json"):
        assert f.stat().st_mode & 0o222 == 0, oct(f.stat().st_mode)


@pytest.mark.parametrize("override, statuses", [
    # scale's output changes: scale and its descendants run, nothing else
    ("scale.factor=3", {"src": "cached", "scale": "ran", "quant": "ran", "side": "cached", "total": "ran"}),
    # early cutoff: modulo=1000 changes the key of scale (and of side, which reads the same section) but not
    # their outputs (6 % 1000 == 6): everything downstream stays cached
    ("+scale.modulo=1000", {"src": "cached", "scale": "ran", "quant": "cached", "side": "ran", "total": "cached"}),
], ids=["param-change-reruns-stage-and-descendants-only", "early-cutoff-when-outputs-are-byte-identical"])
def test_a_changed_param_reruns_only_what_its_outputs_change(ws, override, statuses):
    ws.cli("run")
    ws.reset_counts()
    assert ws.cli("run", override).rc == 0
    assert ws.statuses() == statuses
    assert ws.counts() == {name: 1 for name, status in statuses.items() if status == "ran"}


def test_param_outside_the_key_reuses_cache(ws):
    ws.cli("run")
    ws.reset_counts()
    ws.cli("run", "+src.chatter=9")
    assert set(ws.statuses().values()) == {"cached"}
    assert not ws.counts()


def test_force_recomputes_and_volatile_logs_do_not_break_cutoff(ws):
    ws.cli("run")
    ws.reset_counts()
    r = ws.cli("run", "--force", "scale")
    assert r.rc == 0
    # scale re-ran and wrote a new run.log (a timestamp), but its digest ignores logs: quant is cached.
    assert ws.statuses() == {"src": "cached", "scale": "ran", "quant": "cached", "side": "cached", "total": "cached"}
    assert ws.counts() == {"scale": 1}


def test_damaged_cache_entry_is_detected_and_recomputed(ws):
    ws.cli("run")
    entry = Path(ws.latest()["stages"]["quant"]["path"])
    target = entry / "value.txt"
    time.sleep(0.05)  # past the filesystem's timestamp granularity (a few ms) since the entry was written
    os.chmod(target, 0o644)
    target.write_text("99")  # same size as "30": only the content check can see it
    ws.reset_counts()
    r = ws.cli("run")
    assert r.rc == 0
    assert "cache entry damaged" in r.err and "value.txt" in r.err
    assert ws.statuses()["quant"] == "ran"
    assert (entry / "value.txt").read_text() == "30"
    assert ws.counts() == {"quant": 1}

    (entry / "value.txt").unlink() if os.access(entry, os.W_OK) else None
    r = ws.cli("run")
    assert "deleted" in r.err
    assert ws.statuses()["quant"] == "ran" and (entry / "value.txt").read_text() == "30"


def test_an_entry_records_the_stats_its_files_keep_so_a_hit_reads_no_file(tmp_path, monkeypatch):
    """Two hard links to one file (Lightning's last.ckpt and best.ckpt when the last epoch is the
    best): making the second read-only moves the ctime of both, so the manifest must hold the stats
    taken after every chmod, or each hit re-hashes the checkpoint."""
    from engine.store import cache as cache_module

    cache = cache_module.Cache(tmp_path / "cache")
    tmp = cache.new_tmp("train", "k")
    (tmp / "checkpoints").mkdir()
    with open(tmp / "checkpoints" / "best.ckpt", "wb") as f:
        f.truncate(64 << 20)  # hashing it takes longer than the clock's tick, so the ctimes differ
    os.link(tmp / "checkpoints" / "best.ckpt", tmp / "checkpoints" / "last.ckpt")
    hit = cache.publish(tmp, "train", "k", {})
    for rel, meta in hit.manifest["files"].items():
        st = (hit.path / rel).stat()
        assert (st.st_mtime_ns, st.st_ctime_ns) == (meta["mtime_ns"], meta["ctime_ns"]), rel
    rehashed = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda f: rehashed.append(f) or real(f))
    assert cache.lookup("train", "k") is not None and rehashed == []


def test_a_file_whose_times_moved_is_hashed_once_and_its_new_times_kept(tmp_path, monkeypatch):
    """An intact file whose ctime moved (a chmod, a new hard link, a restore) is re-hashed on the next
    hit, and its new times go into the manifest: entries made before the fix above stop re-hashing."""
    from engine.store import cache as cache_module

    cache = cache_module.Cache(tmp_path / "cache")
    tmp = cache.new_tmp("train", "k")
    (tmp / "model.pt").write_bytes(b"weights")
    hit = cache.publish(tmp, "train", "k", {})
    time.sleep(0.05)  # past the clock's tick: the chmod gives a new ctime
    os.chmod(hit.path / "model.pt", 0o400)
    hashed = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda f: hashed.append(f) or real(f))
    before = (hit.path.parent / "manifest.json").read_bytes()
    assert cache.lookup("train", "k", fetch=False) is not None  # `plan`: checks, writes nothing
    assert (hit.path.parent / "manifest.json").read_bytes() == before
    assert (cache.lookup("train", "k").manifest["files"]["model.pt"]["ctime_ns"]
            == (hit.path / "model.pt").stat().st_ctime_ns)
    assert cache.lookup("train", "k") is not None
    assert hashed == [hit.path / "model.pt"] * 2
    assert sorted(p.name for p in hit.path.parent.iterdir()) == ["manifest.json", "out"]


def test_only_runs_the_stage_and_what_it_needs(ws):
    r = ws.cli("run", "--only", "scale")
    assert r.rc == 0
    assert ws.statuses() == {"src": "ran", "scale": "ran"}
    r = ws.cli("run", "--only", "nosuch")
    assert r.rc == 2 and "--only nosuch: no such stage" in r.err


def test_failure_keeps_completed_stages_and_next_run_resumes(ws):
    r = ws.cli("run", "pipeline=failing", "--jobs", "1")  # at --jobs 2 `other` may run beside `broken`
    assert r.rc == 1
    st = ws.statuses()
    assert st["src"] == "ran" and st["broken"] == "failed"
    assert st["after_broken"] == "skipped" and st["other"] == "skipped"
    run = ws.latest()
    assert run["status"] == "failed"
    assert run["stages"]["broken"]["error"] == "this stage always fails"
    assert "broken failed: this stage always fails" in r.err
    assert ws.entries("t_fail") == []  # no half-written entry
    assert not list((ws.runs / "cache" / "t_fail" / ".tmp").iterdir())
    # what the failed stage wrote is kept for reading, in the run folder
    assert (Path(run["run_dir"]) / "failed" / "broken" / "partial.txt").read_text() == "half"

    r = ws.cli("run", "pipeline=failing", "--keep-going")
    assert r.rc == 1
    st = ws.statuses()
    assert st["src"] == "cached"  # resumed from the cache
    assert st["other"] == "ran"  # an independent branch finished
    assert st["after_broken"] == "skipped"


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_refusal_fails_the_run_but_independent_stages_still_run(ws, jobs):
    """engine.contract.stage.Refusal (package.enforce_targets): exit 1 and the stage's line, its downstream
    skipped, but unlike any other failure the independent `other` runs without --keep-going."""
    r = ws.cli("run", "pipeline=failing", "+fail.refuse=true", "--jobs", jobs)
    assert r.rc == 1
    assert ws.statuses() == {"src": "ran", "broken": "failed", "after_broken": "skipped", "other": "ran"}
    assert "broken failed: this stage always fails" in r.err
    assert ws.latest()["status"] == "failed" and ws.entries("t_fail") == []


CONFIG_ERRORS = [
    (["+scale.factr=3"], "scale.factr: unknown key (did you mean 'factor'?)"),
    (["scale.factor=abc"], "scale.factor: 'abc' is not allowed"),
    (["pipeline.stages.scale.uses=t_scal"],
     "pipeline.stages.scale.uses: unknown stage type 't_scal' (did you mean 't_scale'?)"),
    (["pipeline.stages.scale.uses=os.system"], "unknown stage type 'os.system'"),
    (["pipeline.stages.quant.needs.x=scael"],
     "pipeline.stages.quant.needs.x: no stage named 'scael' (did you mean 'scale'?)"),
    (["+pipeline.stages.src.needs={x: quant}"], "stage type 't_source' has no input 'x'"),
    (["~pipeline.stages.scale.needs"],
     "pipeline.stages.scale.needs: required input 'x' of stage type 't_scale' is not wired"),
    (["pipeline.stages.src.uses=t_scale", "+pipeline.stages.src.config=scale",
      "+pipeline.stages.src.needs={x: total}"], "cycle src -> scale -> quant -> total -> src"),
    (["+pipeline.stages.scale.colour=red"], "pipeline.stages.scale.colour: unknown key"),
    (["scale.factor=1", "nosuch.key=1"], "nosuch"),  # Hydra's own error for an unknown key without '+'
]


@pytest.mark.parametrize("overrides,message", CONFIG_ERRORS, ids=[m[:40] for _, m in CONFIG_ERRORS])
def test_config_errors_name_the_key_and_write_nothing(ws, overrides, message):
    r = ws.cli("run", *overrides)
    assert r.rc == 2
    assert message in r.err, r.err
    assert not ws.runs.exists()  # an invalid config never touches runs/
    assert not ws.counts()


def test_missing_content_path_is_a_config_error(ws):
    r = ws.cli("run", "pipeline=folder", "+files.path=/no/such/folder")
    assert r.rc == 2
    assert "files.path: /no/such/folder does not exist" in r.err
    assert not ws.runs.exists()


def test_override_hidden_by_with_is_reported(ws):
    # `side` reads the scale section but pins factor=7 with `with:`; scale itself still reads it.
    r = ws.cli("plan", "scale.factor=3")
    assert "has no effect" not in r.err
    r = ws.cli("plan", "scale.factor=3", "+pipeline.stages.scale.with={factor: 2}",
               "+pipeline.stages.quant.config=quant")
    assert ("scale.factor=3 has no effect: pipeline.stages.scale.with.factor, pipeline.stages.side.with.factor set it"
            in r.err)


def test_hydra_override_forms(ws):
    assert ws.cli("run", "+experiment=small", "--only", "train").rc == 0
    run = ws.latest()
    assert run["name"] == "small" and set(run["stages"]) == {"data", "train"}
    assert run["stages"]["data"]["metrics"] == {"value": 5}
    assert ws.cli("run", "pipeline=folder", "+files.path=" + str(ws.root / "runs" / "latest")).rc == 0
    assert ws.cli("run", "~src", "--only", "src").rc == 0  # section deleted: the stage's defaults apply
    assert ws.latest()["stages"]["src"]["metrics"] == {"value": 1}
    r = ws.cli("run", "scale.factor=2,3")
    assert r.rc == 2 and "needs -m" in r.err


def test_stage_without_config_reads_its_own_or_its_types_section(ws):
    # `triple` names no section and none is called `triple`: it reads its type's section (`scale`).
    r = ws.cli("run", "+pipeline.stages.triple={uses: t_scale, needs: {x: src}}", "--only", "triple")
    assert r.rc == 0, r.err
    assert ws.latest()["stages"]["triple"]["metrics"] == {"value": 6.0}
    # a section named like the stage wins
    r = ws.cli("run", "+pipeline.stages.triple={uses: t_scale, needs: {x: src}}", "+triple={factor: 3}",
               "--only", "triple")
    assert ws.latest()["stages"]["triple"]["metrics"] == {"value": 9.0}
    r = ws.cli("plan", "+pipeline.stages.triple={uses: t_scale, needs: {x: src}}", "+triple={factor: 4}")
    assert "triple.factor: 3 -> 4" in r.out


def test_content_of_a_folder_input_is_in_the_key(ws, monkeypatch):
    data = ws.root / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    args = ("run", "pipeline=folder", f"+files.path={data}")
    assert ws.cli(*args).rc == 0
    import engine.contract.hashing as hashing

    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    assert ws.cli(*args).rc == 0
    assert ws.statuses() == {"files": "cached"}
    assert not [p for p in reads if Path(p).parent == data]  # unchanged files are not re-read
    time.sleep(0.01)
    (data / "a.txt").write_text("hello, world")
    assert ws.cli(*args).rc == 0
    assert ws.statuses() == {"files": "ran"}
    r = ws.cli("plan", *args[1:], "--json")
    assert json.loads(r.out)["stages"][0]["status"] == "cached"


def test_plan_says_what_would_run_and_why(ws):
    r = ws.cli("plan", "--json")
    plan = {s["name"]: s for s in json.loads(r.out)["stages"]}
    assert {s["status"] for s in plan.values()} == {"will run"}
    assert plan["src"]["reason"] == "never ran"
    assert not (ws.runs / "latest").exists()  # plan writes no run folder
    ws.cli("run")
    plan = {s["name"]: s for s in json.loads(ws.cli("plan", "scale.factor=4", "--json").out)["stages"]}
    assert plan["src"]["status"] == "cached"
    assert plan["scale"]["status"] == "will run" and "scale.factor: 2 -> 4" in plan["scale"]["reason"]
    assert plan["quant"]["status"] == "will run" and "scale" in plan["quant"]["reason"]
    assert plan["side"]["status"] == "cached"
    r = ws.cli("plan", "scale.factor=4")
    assert "will run" in r.out and "scale.factor: 2 -> 4" in r.out


def test_dag_mermaid_and_dot(ws):
    r = ws.cli("dag")
    assert r.out.startswith("flowchart LR") and "src -->|x| scale" in r.out and "quant -->|a| total" in r.out
    r = ws.cli("dag", "--format", "dot")
    assert r.out.startswith("digraph") and '"scale" -> "quant"' in r.out


WAITING = f"src: {helpers_procs.WAITING}"


@pytest.fixture
def spawn(ws, monkeypatch):
    spawner = helpers_procs.Spawner(ws, monkeypatch)
    yield spawner
    spawner.kill_all()


def test_two_processes_compute_each_stage_once(ws, spawn):
    """The second process provably overlaps the first: it reaches src while the first holds src's lock
    (src waits for a file the test creates only once the second says it is waiting), then reuses it."""
    go = ws.root / "go"
    first = Output(spawn("run", f"+src.wait_for={go}"))
    until(lambda: ws.counts().get("src") == 1)  # the first is inside src, holding its lock
    second = Output(spawn("run", f"+src.wait_for={go}"))
    second.wait_for(WAITING)
    assert second.proc.poll() is None and first.proc.poll() is None
    go.touch()
    outs = [first.finish(), second.finish()]
    assert [first.proc.returncode, second.proc.returncode] == [0, 0], outs
    assert WAITING not in outs[0]
    assert ws.counts() == {"src": 1, "scale": 1, "quant": 1, "side": 1, "total": 1}
    runs = [json.loads(p.read_text()) for p in ws.runs.glob("*/*/run.json")]
    assert sorted(r["stages"]["src"]["status"] for r in runs) == ["cached", "ran"]


def test_waiting_process_takes_over_when_the_lock_holder_is_killed(ws, spawn):
    go = ws.root / "never"  # the first process never gets past src
    first = spawn("run", f"+src.wait_for={go}")
    until(lambda: ws.counts().get("src") == 1)
    second = Output(spawn("run"))
    second.wait_for(WAITING)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    out = second.finish()
    assert second.proc.returncode == 0, out
    assert ws.counts()["src"] == 2  # the killed attempt and the second process's own
    assert ws.statuses()["src"] == "ran"
    assert not list((ws.runs / "cache" / "t_source" / ".tmp").iterdir())  # the killed run's temp folder is gone
    assert (ws.entries("t_source")[0] / "out" / "value.txt").read_text() == "3"


def test_sigkill_mid_stage_leaves_no_entry_and_next_run_completes(ws):
    proc = ws.spawn("run", "+src.sleep=60")
    deadline = time.time() + 30
    while not ws.counts().get("src") and time.time() < deadline:
        time.sleep(0.1)
    assert ws.counts().get("src") == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert ws.entries("t_source") == []
    leftovers = list((ws.runs / "cache" / "t_source" / ".tmp").iterdir())
    assert leftovers  # the killed run's temp folder, never renamed into place

    r = ws.cli("run")  # same key (sleep is not in it): must not trust the leftover
    assert r.rc == 0
    assert ws.statuses()["src"] == "ran"
    assert not list((ws.runs / "cache" / "t_source" / ".tmp").iterdir())
    entry = ws.entries("t_source")[0]
    assert (entry / "out" / "value.txt").read_text() == "3" and (entry / "manifest.json").is_file()


def test_sweep_shares_common_stages(ws):
    r = ws.cli("run", "-m", "scale.factor=2,3", "quant.factor=5,6")
    assert r.rc == 0, r.err
    counts = ws.counts()
    assert counts["src"] == 1
    assert counts["scale"] == 2  # the 'training' parameter: once per value
    assert counts["quant"] == 4  # the 'quantization' parameter: once per combination
    sweep_dirs = list(ws.runs.glob("*/*_enginetest_sweep"))
    assert len(sweep_dirs) == 1 and (sweep_dirs[0] / "multirun.yaml").is_file()
    jobs = sorted(p.parent for p in sweep_dirs[0].glob("*/run.json"))
    assert len(jobs) == 4
    sums = sorted(json.loads((j / "run.json").read_text())["stages"]["total"]["metrics"]["sum"] for j in jobs)
    assert sums == sorted(3 * s * q + 21 for s in (2, 3) for q in (5, 6))
    # Re-running the sweep (e.g. after an interruption) recomputes nothing that finished.
    ws.reset_counts()
    assert ws.cli("run", "-m", "scale.factor=2,3", "quant.factor=5,6").rc == 0
    assert not ws.counts()


def test_reproduce_round_trip(ws):
    ws.cli("run", "scale.factor=3")
    run_dir = (ws.runs / "latest").resolve()
    r = ws.cli("reproduce", str(run_dir))
    assert r.rc == 0 and "all 5 stages hit the cache" in r.out
    r = ws.cli("reproduce", str(run_dir), "--verify")
    assert r.rc == 0 and "verified" in r.out
    # with an entry gone, reproduce says which stage misses
    import shutil

    entry = Path(json.loads((run_dir / "run.json").read_text())["stages"]["quant"]["path"])
    shutil.rmtree(entry)
    r = ws.cli("reproduce", str(run_dir))
    assert r.rc == 1 and "quant: not in the cache" in r.out


def test_reproduce_verify_compares_a_non_deterministic_stage_by_its_metrics(ws, monkeypatch):
    ws.cli("run", "+pipeline.stages.noisy={uses: t_noisy, needs: {x: src}}")
    run_dir = str((ws.runs / "latest").resolve())
    monkeypatch.setenv("EDGEPIPE_TEST_DRIFT", "0.0078125")  # the score moves by less than the default 0.01
    r = ws.cli("reproduce", run_dir, "--verify")
    assert r.rc == 0, r.out
    assert "noisy: outputs differ byte-wise, metrics within 0.01" in r.out and "verified" in r.out
    assert "src: identical outputs" in r.out
    monkeypatch.setenv("EDGEPIPE_TEST_DRIFT", "0.25")
    r = ws.cli("reproduce", run_dir, "--verify")
    assert r.rc == 1
    assert "noisy: metrics differ beyond 0.01: score: 0.5 -> 0.75" in r.out  # names the metric, not build_s
    assert "build_s" not in r.out and "1 stages differ" in r.out
    r = ws.cli("reproduce", run_dir, "--verify", "--tolerance", "0.3")
    assert r.rc == 0 and "noisy: outputs differ byte-wise, metrics within 0.3" in r.out
    r = ws.cli("reproduce", run_dir, "--verify", "--tolerance", "0.2")
    assert r.rc == 1 and "score: 0.5 -> 0.75" in r.out


def test_runs_show_compare(ws):
    ws.cli("run")
    ws.cli("run", "scale.factor=3")
    r = ws.cli("runs", "--json")
    rows = json.loads(r.out)
    assert len(rows) == 2 and rows[0]["headline"]["value"] == 3 * 3 * 5 + 21
    assert "enginetest" in ws.cli("runs").out
    r = ws.cli("show", "latest")
    assert r.rc == 0 and "quant" in r.out and "value.txt" in r.out
    r = ws.cli("compare", rows[0]["run_dir"], rows[1]["run_dir"])
    assert r.rc == 0 and "total.sum" in r.out and "66" in r.out and "51" in r.out
    assert ws.cli("show", "nosuchrun").rc == 2


def test_gc_removes_only_unreferenced_entries(ws):
    import shutil

    ws.cli("run")
    keep_dir = (ws.runs / "latest").resolve()
    ws.cli("run", "scale.factor=3")
    drop_dir = (ws.runs / "latest").resolve()
    shutil.rmtree(drop_dir)
    before = {p for t in ("t_source", "t_scale", "t_add") for p in ws.entries(t)}
    r = ws.cli("gc", "--dry-run")
    assert "would remove" in r.out
    assert {p for t in ("t_source", "t_scale", "t_add") for p in ws.entries(t)} == before
    r = ws.cli("gc")
    after = {p for t in ("t_source", "t_scale", "t_add") for p in ws.entries(t)}
    assert len(before - after) == 3  # scale, quant, total of the deleted run
    kept = json.loads((keep_dir / "run.json").read_text())
    assert {Path(s["path"]).parent for s in kept["stages"].values()} == after
    ws.reset_counts()
    ws.cli("run")
    assert set(ws.statuses().values()) == {"cached"}


def test_gc_leaves_an_entry_whose_lock_is_held_alone(ws):
    """A process holding a key's lock (computing or reading it) keeps gc off that entry; once the
    lock is free the entry goes."""
    import shutil

    from engine.store.cache import Cache

    ws.cli("run")
    kept = json.loads(((ws.runs / "latest").resolve() / "run.json").read_text())
    ws.cli("run", "scale.factor=3")
    shutil.rmtree((ws.runs / "latest").resolve())
    unreferenced = set(ws.entries("t_scale")) - {Path(s["path"]).parent for s in kept["stages"].values()}
    assert len(unreferenced) == 2  # scale and quant of the deleted run
    busy, other = sorted(unreferenced)
    cache = Cache(ws.runs / "cache")
    with cache.lock("t_scale", busy.name):
        r = ws.cli("gc")
        assert busy.is_dir() and f"t_scale/{busy.name}" not in r.out
        assert not other.exists() and f"removed t_scale/{other.name}" in r.out
    r = ws.cli("gc")
    assert not busy.exists() and f"removed t_scale/{busy.name}" in r.out
