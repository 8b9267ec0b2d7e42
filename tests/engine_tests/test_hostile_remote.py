"""Hostile remote caches and cache entries: whoever can write `cache.remote` (or a cache folder) tries
to crash every run, to pass a wrong digest downstream, to serve swapped files, to make a reader
download far more than it declares, and to slip an extra file into an entry.

Machine A runs the engine's test pipeline (tests/engine_stages.py) and pushes it to a file:// remote;
the attacker edits the remote; machine B (another runs root, in this process) runs against it. A
refused entry is one warning line, the stage is computed here, and no temp folder is left."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Workspace
from hostile import assert_clean_failure
from test_remote_cache import machine  # one way to make a second machine in this process

from engine.contract.stage import Stage

KEY = "team-key-0123456789abcdef"  # what a team would keep in a secret store and export


@pytest.fixture
def shared(ws, tmp_path, monkeypatch) -> Path:
    """A file:// remote holding everything machine A computed (the chain pipeline: 5 entries)."""
    remote = tmp_path / "shared"
    assert ws.cli("run", f"cache.remote=file://{remote}").rc == 0
    r = ws.cli("push")
    assert r.rc == 0 and "5 uploaded" in r.out, r.out + r.err
    return remote


def source_entry(shared: Path) -> Path:
    (entry,) = shared.glob("t_source/*/manifest.json")
    return entry.parent


def rewrite(entry: Path, change: Callable[[dict], Any]) -> None:
    """The attacker edits an entry's manifest: `change` edits the dict in place or returns the new
    text (str) or value."""
    path = entry / "manifest.json"
    os.chmod(path, 0o644)
    manifest = json.loads(path.read_text())
    new = change(manifest)
    path.write_text(new if isinstance(new, str) else json.dumps(manifest if new is None else new))


def put_file(entry: Path, rel: str, data: bytes) -> dict:
    """A file in the remote entry's out/; returns its manifest record."""
    f = entry / "out" / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    if f.exists():
        os.chmod(f, 0o644)
    f.write_bytes(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def refused_and_recomputed(b: Workspace, r, *why: str) -> str:
    """B's run went on: exactly one "refused" warning (naming `why`), src computed here, nothing else
    computed (the same bytes give the same keys downstream, which are fetched), no temp folder left."""
    assert r.rc == 0, r.out + r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    refused = [line for line in r.err.splitlines() if "refused" in line]
    assert len(refused) == 1 and "t_source" in refused[0], r.err
    for w in why:
        assert w in refused[0], refused[0]
    assert b.statuses()["src"] == "ran" and b.counts() == {"src": 1}
    assert set(b.statuses().values()) == {"ran", "cached"}
    leftovers = [p for p in (b.runs / "cache").glob("*/.tmp/*")]
    assert not leftovers, leftovers
    return refused[0]


def _dot_name(m: dict, entry: Path) -> None:
    m["files"]["./y.txt"] = put_file(entry, "y.txt", b"y")


def _file_and_folder(m: dict, entry: Path) -> None:
    m["files"]["zz"] = put_file(entry, "zz", b"z")
    m["files"]["zz/q"] = m["files"]["zz"]


def _files_a_list(m: dict, entry: Path) -> None:
    m["files"] = [dict(meta, name=rel) for rel, meta in m["files"].items()]


def _duplicate_name(m: dict, entry: Path) -> str:
    # two records of value.txt: json keeps the last, so which one was meant is unknowable
    text = json.dumps(m)
    record = json.dumps({"value.txt": m["files"]["value.txt"]})[1:-1]
    return text.replace('"files": {', '"files": {' + record + ", ", 1)


MALFORMED = {
    "dot name": (_dot_name, "./y.txt"),
    "file and folder": (_file_and_folder, "both as a file and as a folder"),
    "files a list": (_files_a_list, "files"),
    "duplicate name": (_duplicate_name, "appears twice"),
    "size a string": (lambda m, e: m["files"]["value.txt"].update(size="1"), "size"),
    "size negative": (lambda m, e: m["files"]["value.txt"].update(size=-1), "size"),
    "sha256 not hex": (lambda m, e: m["files"]["value.txt"].update(sha256="../" * 20), "sha256"),
    "digest missing": (lambda m, e: m.pop("digest") and None, "digest"),
    "the entry itself": (lambda m, e: m["files"].update({".": m["files"]["value.txt"]}), "not normalised"),
    "absolute name": (lambda m, e: m["files"].update({"/etc/x": m["files"]["value.txt"]}), "absolute"),
    "climbing name": (lambda m, e: m["files"].update({"a/../../x": m["files"]["value.txt"]}), "leaves the entry"),
    "a list": (lambda m, e: [m], "not a JSON object"),
    "not JSON": (lambda m, e: "{", "not valid JSON"),
    "deep JSON": (lambda m, e: "[" * 100_000, "not valid JSON"),
    "another key's": (lambda m, e: m.update(key="0" * 32), "key"),
    "a lone surrogate": (lambda m, e: m["files"].update({"\ud800": m["files"]["value.txt"]}), "Unicode"),
    "metrics a list": (lambda m, e: m.update(metrics=[1]), "metrics"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_remote_manifest_is_refused_and_computed_here(case, shared, tmp_path, capsys, monkeypatch):
    change, why = MALFORMED[case]
    entry = source_entry(shared)
    rewrite(entry, lambda m: change(m, entry))
    b = machine(tmp_path, "b", capsys, monkeypatch)
    remote = f"cache.remote=file://{shared}"
    plan = json.loads(b.cli("plan", remote, "--json").out)["stages"]
    assert {s["name"]: s["status"] for s in plan}["src"] == "will run"
    refused_and_recomputed(b, b.cli("run", remote), why)


def test_pull_refuses_a_malformed_entry_and_fetches_the_rest(shared, tmp_path, capsys, monkeypatch):
    entry = source_entry(shared)
    rewrite(entry, lambda m: _file_and_folder(m, entry))
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("pull", f"cache.remote=file://{shared}")
    assert r.rc == 0 and "Traceback" not in r.err, r.out + r.err
    assert "1 not in cache.remote" in r.out and "4 waiting" in r.out, r.out
    assert len([line for line in r.err.splitlines() if "refused" in line]) == 1, r.err
    assert not list((b.runs / "cache").glob("*/.tmp/*"))


def test_the_remote_digest_is_recomputed_not_trusted(shared, tmp_path, capsys, monkeypatch):
    rewrite(source_entry(shared), lambda m: m.update(digest="deadbeef" * 8))
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{shared}")
    refused_and_recomputed(b, r, "digest")
    assert "deadbeef" not in b.latest()["stages"]["src"]["digest"]
    (local,) = b.entries("t_source")
    assert json.loads((local / "manifest.json").read_text())["digest"] != "deadbeef" * 8


def test_a_stages_volatile_outputs_are_left_out_of_the_recomputed_digest(ws, tmp_path, capsys, monkeypatch):
    """The digest a reader recomputes uses the stage's own volatile_outputs, as publish did."""
    import engine_stages

    monkeypatch.setattr(engine_stages.Scale, "volatile_outputs", ("value.txt",))
    monkeypatch.setenv("EDGEPIPE_COMPOSE_CACHE", "off")  # a remembered recipe holds the volatile patterns
    remote = f"cache.remote=file://{tmp_path / 'shared'}"
    assert ws.cli("run", remote).rc == 0 and ws.cli("push").rc == 0
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", remote)
    assert r.rc == 0 and "refused" not in r.err, r.err
    assert set(b.statuses().values()) == {"cached"} and not b.counts()


def test_a_file_longer_than_declared_is_not_read_past_its_size(shared, tmp_path, capsys, monkeypatch):
    from fsspec.implementations.local import LocalFileOpener

    entry = source_entry(shared)
    big = b"3" + b"\0" * (4 << 20)  # 4 MB where the manifest says 59 bytes (and gives the big file's sha256)
    swap_value(entry, big)
    rewrite(entry, lambda m: m["files"]["value.txt"].update(size=59))
    read = []  # bytes read from the big file
    real_read = LocalFileOpener.read

    def counted(self, *args):
        data = real_read(self, *args)
        if str(self.path) == str(entry / "out" / "value.txt"):
            read.append(len(data))
        return data

    monkeypatch.setattr(LocalFileOpener, "read", counted)
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{shared}")
    refused_and_recomputed(b, r, "value.txt is longer than its size in the manifest (59 bytes)")
    assert sum(read) == 60, read  # the declared size and one byte to see it is longer


def test_an_entry_over_the_size_limit_is_refused_before_downloading(shared, tmp_path, capsys, monkeypatch):
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{shared}", "+cache.remote_max_entry_size=1B")
    assert r.rc == 0, r.err
    # src's files add up to 1 byte ("3" and an empty file): fetched; every other entry is over
    assert b.statuses() == {"src": "cached", "scale": "ran", "quant": "ran", "side": "ran", "total": "ran"}
    assert r.err.count("over cache.remote_max_entry_size (1)") == 4, r.err
    assert not list((b.runs / "cache").glob("*/.tmp/*"))
    r = b.cli("plan", f"cache.remote=file://{shared}", "+cache.remote_max_entry_size=lots")
    assert_clean_failure(r, 2, "cache.remote_max_entry_size")


def test_a_huge_manifest_is_refused_by_its_first_bytes(shared, tmp_path, capsys, monkeypatch):
    import engine.store.remote

    monkeypatch.setattr(engine.store.remote, "MANIFEST_MAX_BYTES", 64)
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{shared}")
    assert r.rc == 0 and set(b.statuses().values()) == {"ran"}, r.err
    assert r.err.count("manifest is over 64 bytes") == 5, r.err


# ---- signing -------------------------------------------------------------------------------------
def swap_value(entry: Path, value: bytes, keep: bool = True) -> None:
    """What a writer of the remote without the key can do: replace a file and its sha256, size and
    digest together (the entry is self-consistent), keeping or dropping the old signature."""
    from engine.store.cache import output_digest

    def change(m: dict) -> None:
        m["files"]["value.txt"] = put_file(entry, "value.txt", value)
        m["digest"] = output_digest({rel: f["sha256"] for rel, f in m["files"].items()})
        if not keep:
            m.pop("signature", None)

    rewrite(entry, change)


def test_without_signing_a_consistent_swap_is_served(shared, tmp_path, capsys, monkeypatch):
    """The threat signing answers: a remote writer's self-consistent swap passes every other check."""
    swap_value(source_entry(shared), b"4")
    b = machine(tmp_path, "b", capsys, monkeypatch)
    assert b.cli("run", f"cache.remote=file://{shared}").rc == 0
    assert b.statuses()["src"] == "cached" and (b.entries("t_source")[0] / "out" / "value.txt").read_text() == "4"


@pytest.fixture
def signed(ws, tmp_path, monkeypatch) -> Path:
    """A remote that A pushed with the team's key in its environment."""
    monkeypatch.setenv("EDGEPIPE_REMOTE_KEY", KEY)
    remote = tmp_path / "shared"
    assert ws.cli("run", f"cache.remote=file://{remote}", "+cache.remote_signed=true").rc == 0
    r = ws.cli("push")
    assert r.rc == 0 and "5 uploaded" in r.out, r.out + r.err
    for m in remote.glob("*/*/manifest.json"):
        assert json.loads(m.read_text())["signature"].startswith("edgepipe-hmac-sha256/1:")
    return remote


def test_signed_entries_are_fetched_by_a_key_holder(signed, ws, tmp_path, capsys, monkeypatch):
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{signed}", "+cache.remote_signed=true")
    assert r.rc == 0 and "refused" not in r.err, r.err
    assert set(b.statuses().values()) == {"cached"} and not b.counts()
    # the key is in no file edgepipe wrote: not the saved config, not a run record, not a manifest
    for root in (ws.runs, b.runs):
        assert not [p for p in root.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


@pytest.mark.parametrize("keep", [True, False], ids=["old signature kept", "signature dropped"])
def test_a_swap_by_a_writer_without_the_key_is_refused(keep, signed, tmp_path, capsys, monkeypatch):
    swap_value(source_entry(signed), b"4", keep=keep)
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{signed}")
    refused_and_recomputed(b, r, "does not verify" if keep else "not signed")
    assert (b.entries("t_source")[0] / "out" / "value.txt").read_text() == "3"


def test_a_signature_that_is_not_hex_is_refused_like_a_wrong_one(signed, tmp_path, capsys, monkeypatch):
    rewrite(source_entry(signed), lambda m: m.update(signature="é" * 64))
    b = machine(tmp_path, "b", capsys, monkeypatch)
    refused_and_recomputed(b, b.cli("run", f"cache.remote=file://{signed}"), "does not verify")


def test_a_signed_manifest_moved_to_another_key_does_not_verify(signed, tmp_path, capsys, monkeypatch):
    """Keys are predictable: a writer plants a genuine signed entry under the key of another value."""
    import shutil

    b = machine(tmp_path, "b", capsys, monkeypatch)
    plan = json.loads(b.cli("plan", f"cache.remote=file://{signed}", "src.value=4", "--json").out)["stages"]
    key = next(s["key"] for s in plan if s["name"] == "src")
    shutil.copytree(source_entry(signed), signed / "t_source" / key)
    r = b.cli("run", f"cache.remote=file://{signed}", "src.value=4")
    assert r.rc == 0 and b.statuses()["src"] == "ran", r.err
    assert "t_source/" + key in r.err and "does not verify" in r.err, r.err


def test_unsigned_entries_are_refused_when_signing_is_on_and_a_signed_push_replaces_them(
        shared, ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_REMOTE_KEY", KEY)
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{shared}")
    assert r.rc == 0 and r.err.count("not signed") == 5, r.err
    assert set(b.statuses().values()) == {"ran"}
    r = b.cli("push")  # B holds the key: the unsigned entries there are replaced by signed ones
    assert r.rc == 0 and "5 uploaded" in r.out and r.err.count("replacing it") == 5, r.out + r.err
    c = machine(tmp_path, "c", capsys, monkeypatch)
    r = c.cli("run", f"cache.remote=file://{shared}")
    assert r.rc == 0 and "refused" not in r.err and not c.counts(), r.err
    assert "5 already in cache.remote" in c.cli("push").out


def test_signing_settings_are_one_line_errors(ws, monkeypatch, tmp_path):
    remote = f"cache.remote=file://{tmp_path / 'shared'}"
    monkeypatch.delenv("EDGEPIPE_REMOTE_KEY", raising=False)
    assert_clean_failure(ws.cli("plan", remote, "+cache.remote_signed=true"), 2, "cache.remote_signed",
                         "EDGEPIPE_REMOTE_KEY")
    monkeypatch.setenv("EDGEPIPE_REMOTE_KEY", "short")
    assert_clean_failure(ws.cli("plan", remote), 2, "EDGEPIPE_REMOTE_KEY", "too short")


# ---- local entries -------------------------------------------------------------------------------
def test_a_file_added_to_a_cache_entry_is_never_served(ws):
    assert ws.cli("run").rc == 0
    (entry,) = ws.entries("t_source")
    (entry / "out" / "extra.txt").write_text("planted")
    plan = {s["name"]: s for s in json.loads(ws.cli("plan", "--json").out)["stages"]}
    assert plan["src"]["status"] == "will run" and "extra.txt" in plan["src"]["reason"]
    ws.reset_counts()
    r = ws.cli("run")
    assert r.rc == 0, r.err
    assert len([line for line in r.err.splitlines() if "extra.txt" in line]) == 1, r.err
    assert ws.counts() == {"src": 1} and ws.statuses()["scale"] == "cached"
    assert not (entry / "out" / "extra.txt").exists()


def test_a_push_with_another_key_leaves_the_teams_entries_alone(signed, ws, monkeypatch):
    before = {p: p.read_bytes() for p in signed.rglob("*") if p.is_file()}
    monkeypatch.setenv("EDGEPIPE_REMOTE_KEY", "an-old-or-mistyped-key-000")
    r = ws.cli("push")
    assert r.rc == 1 and r.out.count("not pushed") == 5 and "EDGEPIPE_REMOTE_KEY" in r.out, r.out + r.err
    assert {p: p.read_bytes() for p in signed.rglob("*") if p.is_file()} == before


# ---- outputs that run as code (Stage.outputs_execute: TorchScript, board packages) --------------
@pytest.fixture
def src_executes(monkeypatch) -> None:
    """t_source declares what export_torchscript and package declare: its outputs run as code here."""
    import engine_stages

    monkeypatch.setattr(engine_stages.Source, "outputs_execute", True)
    monkeypatch.setenv("EDGEPIPE_COMPOSE_CACHE", "off")  # a remembered recipe holds the fact


def test_an_entry_that_runs_as_code_is_not_taken_from_an_unsigned_remote(shared, src_executes, tmp_path, capsys,
                                                                         monkeypatch):
    b = machine(tmp_path, "b", capsys, monkeypatch)
    remote = f"cache.remote=file://{shared}"
    plan = {s["name"]: s["status"] for s in json.loads(b.cli("plan", remote, "--json").out)["stages"]}
    assert plan["src"] == "will run", plan
    why = refused_and_recomputed(b, b.cli("run", remote), "run as code here", "not signed")
    assert "t_source/" in why and "Signing" in why
    # the same bytes give the same keys downstream: everything else still came from the remote
    assert {n: s for n, s in b.statuses().items() if n != "src"} == dict.fromkeys(["scale", "quant", "side", "total"],
                                                                                  "cached")


def test_an_entry_that_runs_as_code_is_taken_from_a_signed_remote(signed, src_executes, tmp_path, capsys,
                                                                  monkeypatch):
    b = machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", f"cache.remote=file://{signed}", "+cache.remote_signed=true")
    assert r.rc == 0 and "refused" not in r.err, r.err
    assert set(b.statuses().values()) == {"cached"} and not b.counts()
    (entry,) = b.entries("t_source")
    assert json.loads((entry / "manifest.json").read_text())["signed"] is True


def test_an_entry_that_runs_as_code_fetched_unsigned_before_is_computed_again(shared, tmp_path, capsys, monkeypatch):
    """A cache that fetched such an entry from an unsigned remote before the rule existed."""
    import engine_stages

    b = machine(tmp_path, "b", capsys, monkeypatch)
    monkeypatch.setenv("EDGEPIPE_COMPOSE_CACHE", "off")
    assert b.cli("run", f"cache.remote=file://{shared}").rc == 0 and not b.counts()
    monkeypatch.setattr(engine_stages.Source, "outputs_execute", True)
    r = b.cli("run")
    assert r.rc == 0 and b.counts() == {"src": 1}, r.err
    assert "without a signature" in b.latest()["stages"]["src"]["reason"]
    assert b.cli("run").rc == 0 and b.counts() == {"src": 1}  # computed here: a local entry from now on


# A real export_torchscript entry, planted: the TorchScript file that evaluate loads writes a local file
# through torch.from_file(shared=True) (issue 30, item 5). Two cheap stages feed the real ones.
class TinyBundle(Stage):
    """A train-like output (model.pt, preprocess.json, labels.txt) of a random MobileNetV3-Small."""

    name = "t_bundle"

    def run(self, p, inputs, out, ctx):
        from helpers_data import make_model_dir

        make_model_dir(out, num_classes=3, size=32)


class TinyOnnx(Stage):
    """An export_onnx-like output (model.onnx, io.json, preprocess.json, labels.txt) of a tiny net."""

    name = "t_onnx"

    def run(self, p, inputs, out, ctx):
        from helpers_data import export_onnx

        export_onnx(out, labels=[f"class{i}" for i in range(3)])


class TinyData(Stage):
    """A dataset-stage-like output with the bundle's three classes."""

    name = "t_data"

    def run(self, p, inputs, out, ctx):
        from helpers_data import make_dataset

        make_dataset(out, size=32, per_class=2, labels=[f"class{i}" for i in range(3)])


TORCHSCRIPT_CONFIG = """\
defaults: [_self_]
name: torchscript
runs_root: ${oc.env:EDGEPIPE_RUNS,runs}
cache: {remote: null, remote_options: {}}
evaluate: {features_samples: 0}
pipeline:
  stages:
    model: {uses: t_bundle}
    data: {uses: t_data}
    ts: {uses: export_torchscript, needs: {model: model}}
    eval: {uses: evaluate, needs: {data: data, ts: ts}}
hydra:
  run: {dir: "${runs_root}/${now:%Y-%m-%d}/${now:%H-%M-%S}_${name}"}
"""


PACKAGE_CONFIG = """\
defaults: [_self_]
name: package
runs_root: ${oc.env:EDGEPIPE_RUNS,runs}
cache: {remote: null, remote_options: {}}
package: {board: onnxruntime}
pipeline:
  stages:
    onnx: {uses: t_onnx}
    data: {uses: t_data}
    pkg: {uses: package, needs: {model: onnx, data: data}}
hydra:
  run: {dir: "${runs_root}/${now:%Y-%m-%d}/${now:%H-%M-%S}_${name}"}
"""


def torchscript_machine(tmp_path: Path, name: str, capsys, monkeypatch, config: str = TORCHSCRIPT_CONFIG) -> Workspace:
    conf = tmp_path / "test_conf"
    conf.mkdir(exist_ok=True)
    (conf / "config.yaml").write_text(config)
    w = Workspace(tmp_path / name, capsys, conf)
    w.env["EDGEPIPE_PLUGINS"] = "test_hostile_remote"
    w.root.mkdir()
    for k, v in w.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(w.root)
    return w


def pushed_entry(tmp_path: Path, capsys, monkeypatch, config: str, stage_type: str) -> tuple[str, Path, Path]:
    """Machine a runs `config` and pushes to a file:// remote; returns (the remote override, a local victim
    file holding b"precious", the remote's entry of `stage_type`) for a writer of that remote to plant in."""
    a = torchscript_machine(tmp_path, "a", capsys, monkeypatch, config)
    shared = tmp_path / "shared"
    remote = f"cache.remote=file://{shared}"
    r = a.cli("run", remote)
    assert r.rc == 0 and set(a.statuses().values()) == {"ran"}, r.out + r.err
    assert a.cli("push").rc == 0
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (entry,) = [m.parent for m in shared.glob(f"{stage_type}/*/manifest.json")]
    return remote, victim, entry


def evil_torchscript(path: Path, victim: Path) -> bytes:
    """A TorchScript classifier (N x 3 x H x W -> N x 3) whose forward overwrites `victim`."""
    import torch

    class Evil(torch.nn.Module):
        def __init__(self, target: str) -> None:
            super().__init__()
            self.target = target

        def forward(self, x):
            mapped = torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8)
            mapped.fill_(88)  # b"XXXXXXXX" in the victim file
            return x.mean(dim=(2, 3)) + mapped.sum().float() * 0  # used, so the write is not optimised out

    torch.jit.save(torch.jit.script(Evil(str(victim))), str(path))
    return path.read_bytes()


def test_a_planted_torchscript_model_cannot_write_a_local_file(tmp_path, capsys, monkeypatch):
    remote, victim, entry = pushed_entry(tmp_path, capsys, monkeypatch, TORCHSCRIPT_CONFIG, "export_torchscript")
    evil = evil_torchscript(tmp_path / "evil.pt", victim)
    swap_file(entry, "model.torchscript.pt", evil)  # self-consistent: sizes, sha256 and digest

    b = torchscript_machine(tmp_path, "b", capsys, monkeypatch)
    r = b.cli("run", remote)
    assert r.rc == 0, r.out + r.err
    assert victim.read_bytes() == b"precious"
    refused = [line for line in r.err.splitlines() if "refused" in line]
    assert len(refused) == 1 and "export_torchscript/" in refused[0] and "run as code" in refused[0], r.err
    assert b.statuses()["ts"] == "ran", b.statuses()
    (ts,) = b.entries("export_torchscript")
    assert (ts / "out" / "model.torchscript.pt").read_bytes() != evil


def swap_file(entry: Path, rel: str, data: bytes, volatile: tuple[str, ...] = ()) -> None:
    """A writer of an unsigned remote replaces a file with its size, sha256 and the entry's digest
    (`volatile`: the stage's volatile_outputs, left out of the digest as a reader leaves them out)."""
    from engine.store.cache import output_digest

    def change(m: dict) -> None:
        m["files"][rel] = dict(m["files"][rel], **put_file(entry, rel, data))
        m["digest"] = output_digest({name: f["sha256"] for name, f in m["files"].items()}, volatile)

    rewrite(entry, change)


EVIL_SELFTEST = """\
import pathlib
pathlib.Path({victim!r}).write_bytes(b"XXXXXXXX")
print("PASS")
"""


def test_a_planted_board_package_does_not_run_under_selftest(tmp_path, capsys, monkeypatch):
    """A package's scripts run under `edgepipe selftest` (and on the board): a writer of an unsigned
    remote swaps infer.py; the reader's run computes the package here, and its self-test runs ours."""
    from stages.package import Package

    remote, victim, entry = pushed_entry(tmp_path, capsys, monkeypatch, PACKAGE_CONFIG, "package")
    swap_file(entry, "package/infer.py", EVIL_SELFTEST.format(victim=str(victim)).encode(), Package.volatile_outputs)

    b = torchscript_machine(tmp_path, "b", capsys, monkeypatch, PACKAGE_CONFIG)
    ran = b.cli("run", remote)
    assert ran.rc == 0, ran.out + ran.err
    r = b.cli("selftest", str(b.runs / "latest" / "stages" / "pkg"))
    assert victim.read_bytes() == b"precious"
    assert r.rc == 0 and "PASS" in r.out, r.out + r.err
    refused = [line for line in ran.err.splitlines() if "refused" in line]
    assert len(refused) == 1 and "package/" in refused[0] and "run as code" in refused[0], ran.err
    assert b.statuses() == {"onnx": "cached", "data": "cached", "pkg": "ran"}
