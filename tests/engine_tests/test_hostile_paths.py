"""Names that become paths (issue 30, items 1, 6, 8, 9, 12, 13): stage names, cache types and keys,
job subfolders and whatever a run.json or a cache entry says, each tried as an attacker with one
config file, one run folder or write access to the cache would: a folder outside must stay as it was,
and what is refused is refused with one line. engine/contract/names.py is the one rule.
Real Hydra and the engine tests' cheap stages."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from hostile import assert_clean_failure, assert_one_line_problems, new_files, snapshot


def _pipeline(conf: Path, stages: dict) -> str:
    (conf / "pipeline" / "evil.yaml").write_text(json.dumps({"stages": stages}), encoding="utf-8")  # JSON is YAML
    return "pipeline=evil"


def _victim(root: Path) -> Path:
    """A folder of someone's that a path built from a name must never reach."""
    victim = root / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def _intact(victim: Path) -> bool:
    return not victim.is_symlink() and (victim / "precious.txt").read_text() == "keep me" \
        and sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def cached_run(ws) -> Path:
    r = ws.cli("run")
    assert r.rc == 0, r.err
    return (ws.runs / "latest").resolve()


# -- the rule itself ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["src", "rknn_mmse", "src-1.v2", "lr=0.1,bs=8", "a+b@c", "数据", ".hydra", "0"])
def test_the_rule_takes_the_names_people_use(name):
    from engine.contract import names

    assert names.problem(name) is None and names.join(Path("/r"), name) == Path("/r") / name


@pytest.mark.parametrize("name", ["", ".", "..", "a..b", "/etc", "a/b", "a\\b", "-rf", "a b", "a\nb", "a\x00b",
                                  "x" * 201, 3, None])
def test_the_rule_refuses_what_could_leave_a_folder(name):
    from engine.contract import names

    assert names.problem(name)
    with pytest.raises(names.UnsafeName):
        names.join(Path("/r"), name)


def test_remove_tree_deletes_nothing_behind_a_link_out(tmp_path):
    from engine.contract import names

    victim = _victim(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(victim)
    assert names.remove_tree(root / "linked" / "precious.txt", within=root) is False
    assert names.remove_tree(root / "linked", within=root) is True  # the link itself, not what it points at
    assert _intact(victim) and not (root / "linked").exists()


# -- 1. stage names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_a_failing_stage_named_as_an_absolute_folder_leaves_that_folder(ws, conf, verb):
    """A failed stage's files move to failed/<name> after an rmtree of that path: with the name an
    absolute path, that was someone's folder."""
    victim = _victim(ws.root)
    pipeline = _pipeline(conf, {"src": {"uses": "t_source"},
                                str(victim): {"uses": "t_fail", "needs": {"x": "src"}, "config": "fail"}})
    r = ws.cli(verb, pipeline)
    assert_clean_failure(r, 2, "pipeline.stages", str(victim))
    assert_one_line_problems(r)
    assert _intact(victim)


def test_a_succeeding_stage_named_up_and_out_does_not_replace_a_file(ws, conf):
    """stages/<name> is unlinked and made a symlink into the cache: with ../ in the name, any file."""
    target = ws.root / "x" / "file.txt"
    target.parent.mkdir()
    target.write_text("keep me")
    r = ws.cli("run", _pipeline(conf, {"../../../../x/file.txt": {"uses": "t_source", "config": "src"}}))
    assert_clean_failure(r, 2, "pipeline.stages", "../../../../x/file.txt")
    assert not target.is_symlink() and target.read_text() == "keep me"


def test_ordinary_stage_names_still_run(ws, conf):
    """The rule's other side (passes on the code before it too): names people use are not refused."""
    r = ws.cli("run", _pipeline(conf, {"src-1.v2": {"uses": "t_source"}, "数据": {"uses": "t_fail", "config": "fail"}}))
    assert r.rc == 1, r.err  # t_fail fails, as it should: the names themselves are fine
    run_dir = (ws.runs / "latest").resolve()
    assert (run_dir / "stages" / "src-1.v2").is_symlink() and (run_dir / "failed" / "数据" / "partial.txt").is_file()


def test_reproduce_verify_of_a_hostile_run_folder_leaves_that_folder(ws):
    """A run folder someone hands you: its run.json and saved config name a stage after your folder;
    `reproduce --verify` recomputes it in a scratch cache, fails, and kept its files at failed/<name>."""
    run_dir = cached_run(ws)
    victim = _victim(ws.root)
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    import yaml

    saved = yaml.safe_load(config)
    saved["pipeline"] = {"stages": {str(victim): {"uses": "t_fail", "config": "fail"}}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    record = json.loads((run_dir / "run.json").read_text())
    record["stages"] = {str(victim): {"name": str(victim), "type": "t_fail", "status": "failed"}}
    (run_dir / "run.json").write_text(json.dumps(record))
    r = ws.cli("reproduce", "--verify", str(run_dir))
    assert_clean_failure(r, 2, "run.json", str(victim))
    assert _intact(victim)


# -- 6. a sweep's job folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("hydra.sweep.subdir=../../../escaped", "hydra.sweep.subdir"),
    ("hydra.sweep.subdir=${hydra.job.num}/../../../../escaped", "hydra.sweep.subdir"),
    ("hydra.output_subdir=../../../escaped", "hydra.output_subdir"),
    ("hydra.output_subdir=ABSOLUTE", "hydra.output_subdir"),
], ids=["subdir-up", "subdir-interpolated", "output-subdir-up", "output-subdir-absolute"])
def test_a_sweep_writes_no_job_folder_outside_the_sweep_folder(ws, override, key):
    """Hydra joins hydra.sweep.dir/hydra.sweep.subdir and writes config.yaml, hydra.yaml and overrides.yaml
    into its hydra.output_subdir: both were taken as they came, `..` and absolute paths included."""
    escaped = ws.root / "escaped"
    before = snapshot(ws.root)
    r = ws.cli("run", "-m", "src.value=1,2", override.replace("ABSOLUTE", str(escaped)))
    assert_clean_failure(r, 2, key)
    assert_one_line_problems(r)
    assert not escaped.exists() and not (ws.root.parent / "escaped").exists()
    assert new_files(ws.root, before) == []  # a grid's jobs are all checked before the sweep folder is made


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_an_optuna_trials_job_folder_is_checked_when_it_is_drawn(ws, launcher):
    """A trial's overrides are known only when the sweeper draws them, and Hydra makes the job's folder
    (sweep folder/override_dirname here) before edgepipe validates the job: the launcher's loading of
    the job's config checks it (joblib's in its worker)."""
    r = ws.cli("run", "-m", "hydra/sweeper=optuna", f"hydra/launcher={launcher}", "hydra.sweeper.n_trials=1",
               "hydra.sweep.subdir=${hydra.job.override_dirname}", "name=choice(../../../../escaped)")
    assert_clean_failure(r, 2, "hydra.sweep.subdir")
    assert not (ws.root / "escaped").exists() and not ws.counts()


# -- 8. gc deletes nothing behind a link out of the cache ----------------------------------------------------
def test_gc_deletes_nothing_through_a_linked_cache_folder(ws, tmp_path):
    """runs/cache/<type> or runs/cache/.scratch linked to someone's folder: gc took what it found there
    for unreferenced entries, dead temp folders and week-old scratch files."""
    cached_run(ws)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "precious").mkdir(parents=True)  # looks like an entry nobody refers to
    (elsewhere / "precious" / "data.txt").write_text("keep me")
    (elsewhere / ".tmp" / "abc-1-2").mkdir(parents=True)  # looks like a killed run's temp folder
    (elsewhere / ".tmp" / "abc-1-2" / "data.txt").write_text("keep me")
    (ws.runs / "cache" / "t_linked").symlink_to(elsewhere)
    old = tmp_path / "old"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "data.txt").write_text("keep me")
    month_ago = time.time() - 30 * 86400
    os.utime(old / "sub" / "data.txt", (month_ago, month_ago))
    scratch = ws.runs / "cache" / ".scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.symlink_to(old)
    before = snapshot(tmp_path / "elsewhere"), snapshot(old)
    r = ws.cli("gc")
    assert r.rc == 0, r.err
    assert (snapshot(tmp_path / "elsewhere"), snapshot(old)) == before
    assert "t_linked" in r.err and "Traceback" not in r.err
    assert not (elsewhere / ".locks").exists()  # no lock file written there either


# -- 9. push trusts neither the type, the key nor the path in run.json --------------------------------------
def test_push_of_a_run_json_whose_key_climbs_out_writes_nothing_outside(ws, tmp_path):
    run_dir = cached_run(ws)
    remote = tmp_path / "shared"
    planted = f"pwned-{uuid.uuid4().hex[:8]}"
    record = json.loads((run_dir / "run.json").read_text())
    record["stages"]["src"]["key"] = f"../../../{planted}"
    (run_dir / "run.json").write_text(json.dumps(record))
    r = ws.cli("push", f"cache.remote=file://{remote}")
    assert_clean_failure(r, 2, "run.json", planted)
    assert not (tmp_path.parent / planted).exists() and not list(tmp_path.rglob(f"{planted}*"))


def test_push_uploads_the_caches_entry_not_the_folder_run_json_names(ws, tmp_path):
    """run.json's path pointed at a folder outside the cache, laid out as an entry (what someone who
    hands you a run folder can make): push uploaded that folder's files under the key."""
    run_dir = cached_run(ws)
    remote = tmp_path / "shared"
    record = json.loads((run_dir / "run.json").read_text())
    entry = Path(record["stages"]["src"]["path"]).parent
    private = tmp_path / "private" / entry.name
    shutil.copytree(entry, private)
    record["stages"]["src"]["path"] = str(private / "out")
    (run_dir / "run.json").write_text(json.dumps(record))
    r = ws.cli("push", f"cache.remote=file://{remote}")
    assert "src: not pushed" in r.out and "Traceback" not in r.out + r.err, r.out + r.err
    assert not list(remote.glob("t_source/*"))  # the other stages went up; that one did not


# -- 12. run.json with values of the wrong type -------------------------------------------------------------
WRONG = {
    "started-text": lambda d: d.update(started="abc"),
    "started-huge": lambda d: d.update(started=1e300),
    "metrics-list": lambda d: d["stages"]["src"].update(metrics=[1]),
    "seconds-text": lambda d: d["stages"]["src"].update(seconds="1"),
    "headline-text": lambda d: d.update(headline="x"),
    "overrides-text": lambda d: d.update(overrides="a=1"),
    "name-number": lambda d: d.update(name=3),
    "status-bool": lambda d: d.update(finished=True),
}


@pytest.mark.parametrize("case", list(WRONG))
@pytest.mark.parametrize("verb", ["show", "report", "compare"])
def test_a_wrongly_typed_run_json_is_one_line(ws, verb, case):
    run_dir = cached_run(ws)
    record = json.loads((run_dir / "run.json").read_text())
    WRONG[case](record)
    (run_dir / "run.json").write_text(json.dumps(record))
    r = ws.cli(verb, str(run_dir))
    assert_clean_failure(r, 2, "run.json")
    assert_one_line_problems(r)


@pytest.mark.parametrize("case", list(WRONG))
def test_runs_skips_a_wrongly_typed_run_json(ws, case):
    run_dir = cached_run(ws)
    cached_run(ws)
    record = json.loads((run_dir / "run.json").read_text())
    WRONG[case](record)
    (run_dir / "run.json").write_text(json.dumps(record))
    for args in (["runs"], ["runs", "--json"]):
        r = ws.cli(*args)
        assert r.rc == 0 and "Traceback" not in r.out + r.err, r.out + r.err
    assert len(json.loads(r.out)) == 1


# -- 13. what an entry holds beside its listed files ------------------------------------------------------
PLANTS = {
    "fifo": lambda out: os.mkfifo(out / "pipe"),
    "dangling-symlink": lambda out: (out / "gone").symlink_to(out.parent.parent / "nowhere"),
    "empty-folder": lambda out: (out / "empty").mkdir(),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_an_entry_holding_something_unlisted_is_damaged_and_recomputed(ws, plant):
    """Not a regular file, so the listing skipped it; the next stage would be handed it all the same (a
    FIFO hangs the reader)."""
    assert ws.cli("run").rc == 0
    (entry,) = ws.entries("t_source")
    PLANTS[plant](entry / "out")
    plan = {s["name"]: s for s in json.loads(ws.cli("plan", "--json").out)["stages"]}
    assert plan["src"]["status"] == "will run" and "damaged" in plan["src"]["reason"], plan["src"]
    ws.reset_counts()
    r = ws.cli("run")
    assert r.rc == 0, r.err
    assert len([line for line in r.err.splitlines() if "damaged" in line]) == 1, r.err
    assert ws.counts() == {"src": 1} and ws.statuses()["scale"] == "cached"
    assert sorted(p.name for p in (entry / "out").iterdir()) == ["started", "value.txt"]


def test_a_stage_leaving_an_empty_folder_is_cached_and_served(ws, conf, tmp_path, monkeypatch):
    """The other side of the rule (passes on the code before it too; it keeps the rule from making such
    a stage's entry damaged on every hit): an empty folder a stage leaves is not kept (nor would a
    fetched copy hold it), so its entry stays a hit."""
    (tmp_path / "stage_with_empty.py").write_text(
        "from engine.contract.stage import Stage\n"
        "class Empty(Stage):\n"
        "    name = 't_empty'\n"
        "    def run(self, p, inputs, out, ctx):\n"
        "        (out / 'logs' / 'none').mkdir(parents=True)\n"
        "        (out / 'value.txt').write_text('1')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EDGEPIPE_PLUGINS", "engine_stages,stage_with_empty")
    args = ["run", _pipeline(conf, {"e": {"uses": "t_empty"}})]
    assert ws.cli(*args).rc == 0
    r = ws.cli(*args)
    assert r.rc == 0 and ws.statuses() == {"e": "cached"}, r.err


def _long(n: int) -> bytes:
    """The pickle opcode LONG4: an integer of any size (the text opcodes stop at 4300 digits)."""
    data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8b" + len(data).to_bytes(4, "little") + data


def _model_pt(path: Path, dims: list[int], num_classes: int) -> None:
    """An edgepipe model.pt as torch's zip layout holds it, written without torch: one tensor of shape
    `dims` and `num_classes`, whatever their size."""
    shape = b"(" + b"".join(_long(d) for d in dims) + b"t"
    pkl = (b"(dVformat\nVedgepipe.model/1\nsVarch\n(dVarch\nVresnet18\nssVnum_classes\n" + _long(num_classes)
           + b"sVstate_dict\n(dVfc.weight\nctorch._utils\n_rebuild_tensor_v2\n(NI0\n" + shape + b"NtRss.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)


@pytest.mark.parametrize("dims, classes", [([10**5000, 10**5000], 2), ([3, 4], 10**5000)], ids=["shape", "classes"])
def test_a_model_pt_with_huge_integers_does_not_break_the_report(ws, tmp_path, dims, classes):
    """The report counts model.pt's parameters from its pickled shapes; a number of more than 4300 digits
    cannot be printed (Python's int-to-text limit): `report` was an internal error."""
    from engine.report.summary import model_facts

    _model_pt(tmp_path / "ok.pt", [3, 4], 2)
    assert model_facts(tmp_path / "ok.pt") == {"arch": "resnet18", "num_classes": 2, "parameters": 12}
    run_dir = cached_run(ws)
    train = tmp_path / "train_out"
    train.mkdir()
    _model_pt(train / "model.pt", dims, classes)
    record = json.loads((run_dir / "run.json").read_text())
    record["stages"]["train"] = {"name": "train", "type": "train", "status": "ran", "path": str(train)}
    (run_dir / "run.json").write_text(json.dumps(record))
    r = ws.cli("report", str(run_dir))
    assert r.rc == 0 and "Traceback" not in r.out + r.err, r.out + r.err
    shown = (run_dir / "report.html").read_text()
    assert ("resnet18" in shown) == (dims == [3, 4])  # facts that cannot be true are left out
