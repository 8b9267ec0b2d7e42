"""A cache a team can share (cache.remote): two separate runs roots ("machines") on the engine's test
stages, through a file:// remote and through a real S3-compatible server (moto's, on 127.0.0.1, via
s3fs); push and pull; keys without machine paths; tool versions in keys."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

from conftest import TESTS, Workspace
from hostile import assert_clean_failure


def machine(tmp_path: Path, name: str, capsys, monkeypatch) -> Workspace:
    """A second (third...) machine: its own folder, runs root and counter, in this process."""
    w = Workspace(tmp_path / name, capsys, TESTS / "engine_conf")
    w.root.mkdir()
    for k, v in w.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(w.root)
    return w


def remote_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_file_remote_between_two_runs_roots(ws, tmp_path, capsys, monkeypatch):
    shared = tmp_path / "shared"
    remote = f"cache.remote=file://{shared}"
    assert ws.cli("run", remote).rc == 0
    assert not shared.exists()  # a run only reads the remote; push writes it
    r = ws.cli("push")
    assert r.rc == 0, r.err
    assert "5 uploaded" in r.out
    entries = sorted(shared.glob("*/*/manifest.json"))
    assert len(entries) == 5 and all((m.parent / "out").is_dir() for m in entries)
    assert not [p for p in shared.rglob("*") if ".tmp-" in p.name]  # temp names were moved into place
    assert "5 already in cache.remote" in ws.cli("push").out  # the first upload wins; nothing rewritten

    b = machine(tmp_path, "b", capsys, monkeypatch)
    plan = json.loads(b.cli("plan", remote, "--json").out)["stages"]
    assert {s["name"]: s["reason"] for s in plan}["src"] == "in cache.remote (fetched when run)"
    assert {s["status"] for s in plan} == {"cached"}
    r = b.cli("run", remote)
    assert r.rc == 0, r.err
    assert set(b.statuses().values()) == {"cached"} and not b.counts()  # nothing computed here
    assert {s["reason"] for s in b.latest()["stages"].values()} == {"fetched from cache.remote"}
    assert b.latest()["headline"]["value"] == ws.latest()["headline"]["value"]
    (entry,) = b.entries("t_add")
    assert json.loads((entry / "manifest.json").read_text())["fetched"] is True
    assert (entry / "out" / "value.txt").stat().st_mode & 0o222 == 0  # read-only, like any entry
    assert b.cli("run", remote).rc == 0 and not b.counts()  # now local hits

    # a damaged remote entry is refused with one warning and recomputed; its downstream still fetched
    (src_entry,) = [m.parent for m in entries if m.parent.parent.name == "t_source"]
    os.chmod(src_entry / "out" / "value.txt", 0o644)
    (src_entry / "out" / "value.txt").write_text("4")
    c = machine(tmp_path, "c", capsys, monkeypatch)
    r = c.cli("run", remote)
    assert r.rc == 0, r.err
    refused = [line for line in r.err.splitlines() if "refused" in line]
    assert len(refused) == 1 and "value.txt does not match its sha256" in refused[0], r.err
    assert c.statuses()["src"] == "ran" and c.counts() == {"src": 1}
    assert c.statuses()["scale"] == "cached"  # same bytes recomputed: the same keys downstream
    assert (c.entries("t_source")[0] / "out" / "value.txt").read_text() == "3"


def test_pull_fetches_what_a_plan_needs_and_half_uploads_are_not_seen(ws, tmp_path, capsys, monkeypatch):
    shared = tmp_path / "shared"
    remote = f"cache.remote=file://{shared}"
    assert ws.cli("run").rc == 0  # made without a remote: push names one
    r = ws.cli("push", "latest", remote)
    assert r.rc == 0 and "5 uploaded" in r.out, r.out + r.err
    # an upload cut short before its manifest (the last file) is invisible to readers
    (add_manifest,) = shared.glob("t_add/*/manifest.json")
    add_manifest.unlink()

    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("pull", remote)
    assert r.rc == 0, r.err
    assert "4 fetched" in r.out and "1 not in cache.remote" in r.out, r.out
    assert b.cli("run", remote).rc == 0
    assert b.statuses() == {"src": "cached", "scale": "cached", "quant": "cached", "side": "cached", "total": "ran"}
    assert b.counts() == {"total": 1}
    r = b.cli("pull", "latest")  # a run's saved config names the remote; everything is here now
    assert r.rc == 0 and "5 already here" in r.out, r.out
    assert b.cli("push").rc == 0 and add_manifest.is_file()  # b completes the entry


def test_keys_carry_no_machine_path(ws, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("hello")
    (data / "sub" / "b.txt").write_text("world")
    assert ws.cli("run", "pipeline=folder", f"+files.path={data}").rc == 0
    key = ws.latest()["stages"]["files"]["key"]
    elsewhere = tmp_path / "another" / "checkout" / "data"
    shutil.copytree(data, elsewhere)
    plan = json.loads(ws.cli("plan", "pipeline=folder", f"+files.path={elsewhere}", "--json").out)["stages"]
    assert plan[0]["key"] == key and plan[0]["status"] == "cached"
    # the structure inside the folder still counts
    (elsewhere / "sub" / "b.txt").rename(elsewhere / "b.txt")
    plan = json.loads(ws.cli("plan", "pipeline=folder", f"+files.path={elsewhere}", "--json").out)["stages"]
    assert plan[0]["key"] != key and plan[0]["reason"] == "content of files.path changed"


def test_a_tool_upgrade_shows_in_plan_and_reruns(ws, monkeypatch):
    from importlib import metadata

    import engine.store.cache
    from engine.config import registry

    assert ws.cli("run").rc == 0
    installed = metadata.version("pyyaml")
    real = metadata.version
    # what `pip install -U pyyaml` would do to the version the key reads (package metadata)
    monkeypatch.setattr(metadata, "version", lambda d: "99.0" if d == "pyyaml" else real(d))
    monkeypatch.setenv("EDGEPIPE_COMPOSE_CACHE", "off")  # plan_memo's versions: tests/engine_tests/test_plan_memo.py
    plan = {s["name"]: s for s in json.loads(ws.cli("plan", "--json").out)["stages"]}
    assert plan["src"]["status"] == "will run" and plan["src"]["reason"] == f"pyyaml {installed} -> 99.0"
    ws.reset_counts()
    assert ws.cli("run").rc == 0
    assert ws.counts() == {"src": 1} and ws.statuses()["scale"] == "cached"  # same output: cut off
    # the real stages declare the toolkits that make their outputs
    assert engine.store.cache.tool_versions(registry.get("rknn_quantize"))["rknn-toolkit2"] == real("rknn-toolkit2")
    assert {"pnnx", "ncnn"} <= set(registry.get("ncnn").tools) and "torch" in registry.get("train").tools


def test_bad_remote_settings_are_one_line_errors(ws):
    r = ws.cli("plan", "cache.remote=nosuch://bucket/x")
    assert_clean_failure(r, 2, "cache.remote", "nosuch")
    r = ws.cli("plan", "cache.remote=s3://bucket/x", "+cache.remote_options.secret=abc")
    assert_clean_failure(r, 2, "cache.remote_options.secret", "credentials")
    if importlib.util.find_spec("gcsfs") is None:  # not a dependency: what a user without it sees
        assert_clean_failure(ws.cli("plan", "cache.remote=gs://bucket/x"), 2, "cache.remote", "gcsfs", "pip install")
    r = ws.cli("plan", "cache.remote=sftp://me:hunter2@host/cache")
    assert "hunter2" not in r.err and "credentials" in assert_clean_failure(r, 2, "cache.remote")
    r = ws.cli("push")
    assert_clean_failure(r, 2, "latest")  # no run yet
    assert ws.cli("run").rc == 0
    assert_clean_failure(ws.cli("push"), 2, "cache.remote")  # the run names no remote


def test_s3_remote_second_machine_computes_nothing(ws, tmp_path, capsys, monkeypatch, s3):
    remote = ["pipeline=nine", "cache.remote=s3://team/edgepipe",
              f"+cache.remote_options.client_kwargs.endpoint_url={s3}"]
    assert ws.cli("run", *remote).rc == 0
    r = ws.cli("push")
    assert r.rc == 0 and "8 uploaded" in r.out, r.out + r.err  # train and calib share an entry
    saved = (ws.runs / "latest" / ".hydra" / "config.yaml").read_text()
    assert "testing" not in saved  # credentials never reach a config or a run folder

    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", *remote)
    assert r.rc == 0, r.err
    assert set(b.statuses().values()) == {"cached"} and not b.counts()
    assert b.latest()["headline"] == ws.latest()["headline"]

    # the standard AWS_ENDPOINT_URL variable reaches s3fs too (botocore reads it)
    c = machine(tmp_path, "c", capsys, monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    r = c.cli("pull", "pipeline=nine", "cache.remote=s3://team/edgepipe")
    assert r.rc == 0 and "8 fetched, 1 already here" in r.out, r.out + r.err  # calib: train's entry


def test_unreachable_s3_remote_is_one_line(ws, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = ws.cli("run", "cache.remote=s3://team/edgepipe", f"+cache.remote_options.client_kwargs.endpoint_url=http://127.0.0.1:{port}",
               "+cache.remote_options.config_kwargs.retries.max_attempts=1")
    err = assert_clean_failure(r, 1, "cache.remote", "s3://team/edgepipe", "cache.remote=null")
    assert len(err.strip().splitlines()) == 1, err
    assert not (ws.runs / "latest").exists() or ws.latest()["status"] != "ok"
