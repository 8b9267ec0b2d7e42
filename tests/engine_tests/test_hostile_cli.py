"""Hostile input to the engine and the command line (issue 8): malformed overrides and sweeps, YAML
tags in config files, an unusable runs_root, damaged run folders, racing runs, run names that climb
out of runs_root, --cfg hydra, --force, and config problems that can be known before anything runs.

Every case is generated here and checked with tests/hostile.py: the exit code (2 for config and
usage errors, 1 for runtime failures), no traceback, a message that names the input, each problem on
one line, and nothing written where the user did not ask (most cases: nothing at all)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hostile import assert_clean_failure, assert_one_line_problems, new_files, snapshot


def failed_cleanly(ws, args, rc, *names):
    """Run edgepipe with args in ws; it must fail cleanly, naming names, and write nothing."""
    before = snapshot(ws.root)
    r = ws.cli(*args)
    err = assert_clean_failure(r, rc, *names)
    assert_one_line_problems(r)
    assert new_files(ws.root, before) == [], "a failed command wrote files"
    return err


def cached_run(ws) -> Path:
    """One successful run of the cheap chain; its run folder."""
    r = ws.cli("run")
    assert r.rc == 0, r.err
    return (ws.runs / "latest").resolve()


# -- 1. malformed overrides ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, names", [
    (["src.value=[1"], ["src.value=[1"]),
    (["src.value=${x"], ["src.value=${x"]),
    (["src.value=1", "2"], ["'2'", "quoted"]),      # train.lr=1 2 typed without quotes
    (["=5"], ["'=5'", "no key"]),
    (["src.nosuch=3"], ["src.nosuch", "+src.nosuch=3"]),
], ids=["unclosed-list", "unclosed-interpolation", "unquoted-space", "empty-key", "unknown-key"])
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_malformed_override_is_a_usage_error(ws, verb, args, names):
    failed_cleanly(ws, [verb, *args], 2, *names)


def test_value_with_a_space_in_one_argument_names_the_key(ws):
    # `src.value='1 2'` is a well-formed override: the stage's params reject the string.
    failed_cleanly(ws, ["run", "src.value=1 2"], 2, "src.value", "'1 2'")


# -- 2. sweeps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, names", [
    ("src.value=interval(0.1,1)", ["src.value=interval(0.1,1)", "grid"]),
    ("src.value=range(1,1)", ["src.value=range(1,1)", "no values"]),
    ("src.value=choice()", ["src.value=choice()", "empty choice"]),
], ids=["interval", "empty-range", "empty-choice"])
def test_sweep_the_grid_sweeper_cannot_run_is_a_usage_error(ws, override, names):
    failed_cleanly(ws, ["run", "-m", override], 2, *names)
    assert ws.counts() == {}


def test_glob_sweep_over_a_config_group_expands(ws):
    r = ws.cli("plan", "-m", "pipeline=glob(ch*)", "--json")  # the grid sweeper's glob() works
    assert r.rc == 0, r.err
    assert json.loads(r.out)["overrides"] == ["pipeline=chain"]


# -- 3. YAML tags in a config file ------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system"])
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_python_tag_in_an_experiment_runs_nothing(ws, conf, verb, tag):
    marker = ws.root / "MARKER"
    (conf / "experiment" / "evil.yaml").write_text(
        f'# @package _global_\nsrc:\n  value: {tag} ["touch {marker}"]\n')
    err = failed_cleanly(ws, [verb, "+experiment=evil"], 2, "experiment/evil.yaml", "line 3", tag.split(":")[0])
    assert "not allowed" in err
    assert not marker.exists() and ws.counts() == {}


def test_python_tag_in_the_root_config_runs_nothing(ws, conf):
    marker = ws.root / "MARKER"
    text = (conf / "config.yaml").read_text()
    (conf / "config.yaml").write_text(text + f'evil: !!python/object/apply:os.system ["touch {marker}"]\n')
    failed_cleanly(ws, ["run"], 2, "config.yaml", "!!python/object/apply")
    assert not marker.exists()


def test_broken_yaml_in_a_config_file_names_file_and_line(ws, conf):
    (conf / "experiment" / "broken.yaml").write_text("src: {value: [1\n")
    failed_cleanly(ws, ["plan", "+experiment=broken"], 2, "experiment/broken.yaml", "line", "not valid YAML")


@pytest.mark.parametrize("args, names", [
    (["+experiment=nosuch"], ["+experiment=nosuch", "small"]),   # lists what there is
    (["pipeline=nosuch"], ["pipeline=nosuch", "chain"]),
], ids=["missing-experiment", "unknown-group-option"])
def test_missing_config_lists_the_options_on_one_line(ws, args, names):
    failed_cleanly(ws, ["plan", *args], 2, *names)


# -- 4. runs_root, damaged run folders ----------------------------------------------------------------------
@pytest.mark.parametrize("args, names", [
    (["plan", "runs_root={blocker}/runs"], ["runs_root", "{blocker}"]),
    (["run", "runs_root={blocker}/runs"], ["runs_root", "{blocker}"]),
    (["run", "hydra.run.dir={blocker}/run"], ["hydra.run.dir", "Not a directory"]),
    (["run", "hydra.run.dir={blocker}"], ["hydra.run.dir", "is a file"]),
    (["run", "runs_root=${{oc.env:EDGEPIPE_NO_SUCH_VARIABLE}}"], ["hydra.run.dir", "EDGEPIPE_NO_SUCH_VARIABLE"]),
], ids=["plan-runs-root-under-a-file", "run-runs-root-under-a-file", "run-dir-under-a-file", "run-dir-a-file",
        "run-dir-unset-variable"])
def test_runs_folder_that_cannot_be_made_is_a_config_error(ws, args, names):
    blocker = ws.root / "afile"
    blocker.write_text("not a folder\n")  # fails for root too, unlike a read-only folder
    failed_cleanly(ws, [a.format(blocker=blocker) for a in args], 2, *(n.format(blocker=blocker) for n in names))
    assert blocker.read_text() == "not a folder\n" and ws.counts() == {}


@pytest.mark.parametrize("text, names", [
    ("- a list\n", ["experiment/odd", "Cannot merge"]),
    ("5\n", ["+experiment=odd", "YAML mapping"]),
], ids=["list", "scalar"])
def test_experiment_that_is_not_a_mapping(ws, conf, text, names):
    (conf / "experiment" / "odd.yaml").write_text("# @package _global_\n" + text)
    err = failed_cleanly(ws, ["plan", "+experiment=odd"], 2, *names)
    assert "full_key" not in err


@pytest.mark.parametrize("text, names", [
    ("src: {value: [1\n", ["not valid YAML", "line"]),
    ("- a list\n", ["not a mapping"]),
    ('src: !!python/object/apply:os.system ["touch MARKER"]\n', ["!!python/object/apply"]),
], ids=["not-yaml", "not-a-mapping", "python-tag"])
def test_reproduce_on_a_damaged_saved_config(ws, text, names):
    run_dir = cached_run(ws)
    (run_dir / ".hydra" / "config.yaml").write_text(text)
    cache = snapshot(ws.runs / "cache")
    failed_cleanly(ws, ["reproduce", str(run_dir)], 2, ".hydra/config.yaml", *names)
    assert snapshot(ws.runs / "cache") == cache
    assert not (ws.root / "MARKER").exists()


@pytest.mark.parametrize("text", ["{not json", "[]", '{"name": 3}'], ids=["not-json", "a-list", "wrong-fields"])
@pytest.mark.parametrize("verb", ["show", "compare", "reproduce"])
def test_damaged_run_json_is_named(ws, verb, text):
    run_dir = cached_run(ws)
    (run_dir / "run.json").write_text(text)
    failed_cleanly(ws, [verb, str(run_dir)], 2, "run.json")


def test_damaged_run_json_does_not_break_plan_runs_or_gc(ws):
    run_dir = cached_run(ws)
    (run_dir / "run.json").write_text("{not json")
    entries = {t: ws.entries(t) for t in ("t_source", "t_scale", "t_add")}
    assert ws.cli("plan").rc == 0  # plan's 'why' skips the damaged record
    r = ws.cli("runs", "--json")
    assert r.rc == 0 and json.loads(r.out) == []
    r = ws.cli("gc")
    assert r.rc == 0 and "run.json" in r.err and "0 unreferenced" in r.out
    # the run's outputs are still linked from its stages/ folder: gc keeps them
    assert {t: ws.entries(t) for t in entries} == entries and all(entries.values())


@pytest.mark.parametrize("args, names", [
    (["show", "nosuchrun"], ["nosuchrun"]),
    (["compare", "latest", "nosuchrun"], ["nosuchrun"]),
    (["reproduce", "nosuchdir"], ["nosuchdir"]),
    (["dag", "--format", "jpeg"], ["--format"]),
    (["plan", "--only"], ["--only"]),
    (["plan", "--bogus"], ["--bogus"]),
], ids=["show", "compare", "reproduce", "dag-format", "flag-without-value", "unknown-flag"])
def test_missing_runs_and_bad_flags(ws, args, names):
    cached_run(ws)
    before = snapshot(ws.root)
    r = ws.cli(*args)
    assert_clean_failure(r, 2, *names)
    assert new_files(ws.root, before) == []


def test_compare_with_one_run_prints_its_metrics(ws):
    cached_run(ws)
    r = ws.cli("compare", "latest")
    assert r.rc == 0, r.err
    assert "total.sum" in r.out and "51" in r.out


def test_gc_on_a_missing_runs_root_creates_nothing(ws):
    r = ws.cli("gc", "--root", str(ws.root / "nowhere"))
    assert r.rc == 0 and "0 unreferenced" in r.out
    assert not (ws.root / "nowhere").exists()


def test_plugin_that_cannot_be_imported(ws, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_PLUGINS", "engine_stages,no_such_plugin_module")
    failed_cleanly(ws, ["plan"], 2, "EDGEPIPE_PLUGINS", "no_such_plugin_module")


def test_a_bug_is_one_line_and_the_traceback_is_on_request(ws, monkeypatch):
    (ws.root / "buggy_stage.py").write_text(
        "from engine.contract.stage import Params, Stage\n"
        "class Buggy(Stage):\n"
        "    name = 't_buggy'\n"
        "    @classmethod\n"
        "    def check(cls, params):\n"
        "        raise RuntimeError('a bug in a check')\n")
    monkeypatch.syspath_prepend(str(ws.root))
    monkeypatch.setenv("EDGEPIPE_PLUGINS", "engine_stages,buggy_stage")
    args = ["plan", "+pipeline.stages.b={uses: t_buggy}"]
    failed_cleanly(ws, args, 1, "internal error", "RuntimeError: a bug in a check", "EDGEPIPE_DEBUG")
    monkeypatch.setenv("EDGEPIPE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug in a check"):
        ws.cli(*args)


# -- 5. two runs in the same second ------------------------------------------------------------------------
def test_runs_racing_for_one_folder_get_their_own(ws):
    fixed = ws.runs / "same-second"  # what two runs started in the same second both compute
    procs = [ws.spawn("run", f"hydra.run.dir={fixed}") for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert all("Traceback" not in out + err for out, err in outs)
    folders = sorted(p.name for p in ws.runs.iterdir() if p.name.startswith("same-second"))
    assert folders == ["same-second", "same-second-2", "same-second-3", "same-second-4"]
    for name in folders:  # each run recorded itself in its own folder
        record = json.loads((ws.runs / name / "run.json").read_text())
        assert Path(record["run_dir"]).name == name and record["status"] == "ok"


def test_run_folder_creation_is_atomic_across_threads(ws):
    from engine.job.execute import make_run_dir

    target, made = ws.root / "runs" / "day" / "t_name", []
    threads = [threading.Thread(target=lambda: made.append(make_run_dir(target))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 16 and len(set(made)) == 16


# -- 6. run names -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x/../../../escaped", "x/../../../../escaped", "a/b", "..", "x\\..\\y", ""],
                         ids=["to-project", "above-project", "slash", "dotdot", "backslash", "empty"])
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_run_name_that_leaves_runs_root_is_refused(ws, verb, name):
    outside = snapshot(ws.root.parent)
    failed_cleanly(ws, [verb, f"name={name}"], 2, "name:", "run name")
    assert not (ws.root / "escaped").exists() and not (ws.root.parent / "escaped").exists()
    assert [f for f in new_files(ws.root.parent, outside) if "escaped" in f] == []


@pytest.mark.parametrize("name", ["my-run_v1.2", "lr=0.1", "数字"])
def test_ordinary_run_names_are_accepted(ws, name):
    r = ws.cli("run", f"name='{name}'")
    assert r.rc == 0, r.err
    assert (ws.runs / "latest").resolve().name.endswith(f"_{name}")
    assert (ws.runs / "latest").resolve().parent.parent == ws.runs.resolve()


# -- 7. --cfg -----------------------------------------------------------------------------------------------------
def test_cfg_hydra_prints_hydra_config_not_the_job(ws):
    r = ws.cli("run", "--cfg", "hydra")
    assert r.rc == 0, r.err
    assert r.out.startswith("hydra:") and "  run:\n    dir:" in r.out and "sweeper:" in r.out
    assert "\npipeline:" not in r.out and "t_source" not in r.out
    assert "\n  hydra_help:" not in r.out and "\n  help:" not in r.out  # left out, as Hydra does
    assert not ws.runs.exists()


def test_cfg_job_and_all(ws):
    job = ws.cli("run", "--cfg", "job", "src.value=9").out
    assert "pipeline:" in job and "value: 9" in job and "hydra:" not in job
    everything = ws.cli("run", "--cfg", "all").out
    assert "hydra:" in everything and "pipeline:" in everything
    resolved = ws.cli("run", "--cfg", "job", "--resolve").out
    assert f"runs_root: {ws.runs}" in resolved
    assert not ws.runs.exists()


def test_cfg_unknown_part(ws):
    failed_cleanly(ws, ["run", "--cfg", "bogus"], 2, "--cfg bogus", "job, hydra, all")


@pytest.mark.parametrize("part", ["hydra", "all"])
def test_cfg_resolve_resolves_against_the_whole_config(ws, part):
    """hydra.run.dir names ${runs_root}: resolved as Hydra does; hydra.job.num, which only a sweep job
    has, stays as written instead of failing the command."""
    import yaml

    r = ws.cli("run", "--cfg", part, "--resolve")
    assert r.rc == 0, r.err
    shown = yaml.safe_load(r.out)
    assert shown["hydra"]["run"]["dir"].startswith(str(ws.runs)) and "${" not in shown["hydra"]["run"]["dir"]
    assert shown["hydra"]["job"]["num"] == "???"
    assert ("name" in shown) == (part == "all")


# -- 8. --force names itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_force_unknown_stage_names_force(ws, verb):
    err = failed_cleanly(ws, [verb, "--force", "nosuchstage"], 2, "--force nosuchstage", "no such stage")
    assert "--only" not in err


# -- 9, 10. what the real config can tell before anything runs --------------------------------------------------------
@pytest.fixture
def data_dir(project) -> Path:
    d = project.root / "images"
    d.mkdir()
    return d


def test_rv1103_float_build_names_the_key(project, data_dir):
    err = failed_cleanly(project, ["plan", "+experiment=rv1103_mobilenetv3", f"dataset.path={data_dir}",
                                   "quantize.do_quantization=false"], 2, "quantize.do_quantization=false", "rv1103")
    assert "'algorithm'" not in err and "{" not in err  # not the whole section


@pytest.mark.parametrize("override, names", [
    ("preprocess=imagenet", ["preprocess.mean", "maixii_dock", "preprocess=uniform"]),
    ("preprocess.std=[0.2,0.3,0.4]", ["preprocess.mean", "[0.2, 0.3, 0.4]", "maixii_dock"]),
], ids=["imagenet", "per-channel-std"])
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_maixii_dock_normalisation_is_a_config_error_before_training(project, data_dir, verb, override, names):
    failed_cleanly(project, [verb, "+experiment=v831_resnet18", f"dataset.path={data_dir}", override], 2, *names)
    assert not project.runs.exists()  # nothing trained


def test_maixii_dock_with_uniform_normalisation_plans(project, data_dir):
    r = project.cli("plan", "+experiment=v831_resnet18", f"dataset.path={data_dir}", "--json")
    assert r.rc == 0, r.err
    assert {s["name"] for s in json.loads(r.out)["stages"]} >= {"train", "preflight"}


def test_board_rknn_target_that_is_not_the_boards(project, data_dir):
    failed_cleanly(project, ["plan", "+experiment=rv1103_mobilenetv3", f"dataset.path={data_dir}",
                             "board.rknn_target=rk3588"], 2, "board.rknn_target", "rv1103")


# -- 11. bad values on the real conf/: exit 2, the exact key, nothing written (issue 15) --------------------
@pytest.mark.parametrize("args, names", [
    # the quickstart's two RKNN stages both set `algorithm` with `with:`: a bad value is still an error
    (["+experiment=quickstart", "quantize.algorithm=mse"], ["quantize.algorithm", "'mse'", "mmse", "kl_divergence"]),
    # the default pipeline has no RKNN stage: the value is checked against the type that reads `quantize`
    (["quantize.algorithm=mse"], ["quantize.algorithm", "'mse'"]),
    (["+experiment=quickstart", "pipeline.stages.rknn_mmse.with.algorithm=msee"],
     ["pipeline.stages.rknn_mmse.with.algorithm", "'msee'", "normal"]),
    (["+experiment=quickstart", "+pipeline.stages.rknn_mmse.with.optimisation_level=1"],
     ["pipeline.stages.rknn_mmse.with.optimisation_level", "unknown key", "did you mean 'optimization_level'"]),
    (["+experiment=quickstart", "train.mode=finetune", "model.pretrained=/no/such/resnet18.pth"],
     ["model.pretrained", "/no/such/resnet18.pth", "does not exist"]),
], ids=["shadowed-algorithm", "unread-algorithm", "with-value", "with-unknown-key", "missing-pretrained"])
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_bad_values_on_the_real_conf_name_the_key(project, verb, args, names):
    failed_cleanly(project, [verb, *args], 2, *names)
    assert not project.runs.exists()


def test_a_valid_value_hidden_by_with_is_only_a_warning(project):
    r = project.cli("plan", "+experiment=quickstart", "quantize.algorithm=kl_divergence", "--json")
    assert r.rc == 0, r.err
    assert "quantize.algorithm=kl_divergence has no effect: pipeline.stages.rknn_normal.with.algorithm" in r.err


def test_a_broken_plugin_command_is_one_line_naming_it(monkeypatch, capsys):
    """A verb another distribution adds (edgepipe.commands) whose module cannot be imported: one line
    naming the entry point, exit 2, not an internal error of edgepipe's."""
    from importlib.metadata import EntryPoint

    from engine.cli import commands

    broken = EntryPoint("flash", "no_such_plugin_module:main", "edgepipe.commands")
    monkeypatch.setattr(commands, "plugin_commands", lambda: {"flash": broken})
    rc = commands.main(["flash", "board.bin"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "command 'flash' (no_such_plugin_module:main, an edgepipe.commands entry point)" in err
    assert "ModuleNotFoundError" in err and "internal error" not in err
