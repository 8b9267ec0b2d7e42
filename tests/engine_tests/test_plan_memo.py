"""engine/plan_memo.py: a config validated once is planned and run, while every stage is cached,
without pydantic, OmegaConf or any stage's code; whatever could change a key (a config file, the stage's code,
a vanished cache entry, --force) is validated for real. Real processes, real Hydra, the engine tests'
cheap stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# A command in a fresh process that says which heavy modules it loaded.
PROBE = """
import json, sys
from engine.cli.commands import main
rc = main(sys.argv[1:])
print("\\n" + json.dumps({"rc": rc, "pydantic": "pydantic" in sys.modules, "omegaconf": "omegaconf" in sys.modules,
                  "yaml": "yaml" in sys.modules,
                  "stage code": sorted(m for m in sys.modules \
if m.startswith(("engine_stages", "engine.config.validate")))}))
"""


def probe(ws, *args: str, env: dict | None = None) -> dict:
    """The command's exit status, whether it loaded pydantic and stage code, its stdout and stderr."""
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ws.root, env={**os.environ, **ws.env, **(env or {})},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # main()'s own status is the probe's "rc"
    out, _, last = r.stdout.rstrip().rpartition("\n")
    return {**json.loads(last), "out": out, "err": r.stderr}


def loaded(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("out", "err")}


def test_an_unchanged_config_plans_and_runs_cached_without_pydantic_or_stage_code(ws):
    first = probe(ws, "run")
    assert first["rc"] == 0 and first["pydantic"] and first["omegaconf"] and ws.counts()["total"] == 1
    for verb in ("plan", "run"):  # the composed config's values they read are kept resolved (compose_cache.Facts)
        again = probe(ws, verb)
        # nor PyYAML: the report reads the config's choices and wiring from run.json
        assert loaded(again) == {"rc": 0, "pydantic": False, "omegaconf": False, "yaml": False, "stage code": []}, verb
    assert set(ws.statuses().values()) == {"cached"} and sum(ws.counts().values()) == 5
    assert ws.latest()["headline"] == {"key": "total.sum", "value": 51.0}  # the remembered headline
    # another value is another config: validated, and it runs what it changes
    changed = probe(ws, "run", "scale.factor=3")
    assert changed["pydantic"] and ws.counts()["scale"] == 2 and ws.counts()["side"] == 1


def test_a_vanished_entry_and_force_are_validated_and_run(ws):
    assert probe(ws, "run")["rc"] == 0 and probe(ws, "plan")["pydantic"] is False
    shutil.rmtree(ws.entries("t_add")[0])
    plan = probe(ws, "plan", "--json")
    assert plan["pydantic"] is False  # a plan, even of a stage that would run, needs no validation
    stages = json.loads(plan["out"])["stages"]
    assert [(s["name"], s["status"], s["reason"]) for s in stages if s["status"] != "cached"] == [
        ("total", "will run", f"previous output {ws.latest()['stages']['total']['key']} is no longer in the cache")]
    assert probe(ws, "run")["pydantic"] and ws.counts()["total"] == 2
    forced = probe(ws, "run", "--force", "src")
    assert forced["pydantic"] and ws.counts()["src"] == 2 and ws.statuses()["src"] == "ran"


def test_an_edited_stage_module_is_validated_again(ws, tmp_path):
    """A plugin's stage code is checked by its files' stats: a changed default is a new key."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    source = Path(__file__).parents[1].joinpath("engine_stages.py").read_text()
    (plugins / "engine_stages.py").write_text(source)
    env = {"PYTHONPATH": os.pathsep.join([str(plugins), ws.env["PYTHONPATH"]])}
    assert probe(ws, "run", env=env)["rc"] == 0 and probe(ws, "plan", env=env)["pydantic"] is False
    (plugins / "engine_stages.py").write_text(source.replace("modulo: int | None = None", "modulo: int | None = 4"))
    edited = probe(ws, "run", env=env)
    assert edited["pydantic"] and ws.counts()["scale"] == 2  # scale's key has the new default
    assert json.loads((ws.runs / "latest" / "stages" / "scale" / "value.txt").read_text()) == 3 * 2 % 4


def test_a_changed_content_input_is_planned_from_memory_and_run_validated(ws, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("abc")
    args = ("pipeline=folder", f"+files.path={data}")
    assert probe(ws, "run", *args)["rc"] == 0 and probe(ws, "plan", *args)["pydantic"] is False
    (data / "b.txt").write_text("de")
    plan = probe(ws, "plan", "--json", *args)
    assert plan["pydantic"] is False
    assert [(s["status"], s["reason"]) for s in json.loads(plan["out"])["stages"]] == [
        ("will run", "content of files.path changed")]
    assert probe(ws, "run", *args)["pydantic"] and ws.latest()["stages"]["files"]["metrics"] == {"files": 2}


def test_another_module_of_the_same_name_on_the_path_is_validated_again(ws, tmp_path):
    """The same stage type found in another file ($PYTHONPATH, $EDGEPIPE_PLUGINS): not the memo's."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    source = Path(__file__).parents[1].joinpath("engine_stages.py").read_text()
    (plugins / "engine_stages.py").write_text(source.replace("modulo: int | None = None", "modulo: int | None = 4"))
    assert probe(ws, "run")["rc"] == 0 and probe(ws, "plan")["pydantic"] is False
    other = probe(ws, "run", env={"PYTHONPATH": os.pathsep.join([str(plugins), ws.env["PYTHONPATH"]])})
    assert other["pydantic"] and ws.counts()["scale"] == 2


def test_an_upgraded_tool_is_read_again(ws, tmp_path):
    """Remembered tool versions hold while no folder of sys.path changes: a newer PyYAML installed
    into one (its .dist-info) is read, and the stage that declares it runs again."""
    site = tmp_path / "site"
    site.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(site), ws.env["PYTHONPATH"]])}
    assert probe(ws, "run", env=env)["rc"] == 0
    (site / "PyYAML-99.0.dist-info").mkdir()
    (site / "PyYAML-99.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: PyYAML\nVersion: 99.0\n")
    plan = probe(ws, "plan", "--json", env=env)
    src = {s["name"]: s for s in json.loads(plan["out"])["stages"]}["src"]
    assert plan["pydantic"] is False and src["status"] == "will run" and src["reason"].endswith("-> 99.0")


def test_a_content_path_removed_since_is_the_config_error_it_was(ws, tmp_path):
    """Validation refuses a content path that does not exist before anything is written; a memo
    made while it existed does not change that."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("abc")
    args = ("pipeline=folder", f"+files.path={data}")
    assert probe(ws, "run", *args)["rc"] == 0 and probe(ws, "plan", *args)["pydantic"] is False
    shutil.rmtree(data)
    runs_before = sorted(ws.runs.glob("*/*"))
    for verb in ("plan", "run"):
        r = probe(ws, verb, *args)
        assert r["rc"] == 2 and f"files.path: {data} does not exist" in r["err"], (verb, r["err"])
    assert sorted(ws.runs.glob("*/*")) == runs_before  # no run folder for the refused run
