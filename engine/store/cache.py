"""The content-addressed stage cache: runs/cache/<type>/<key>/ holds out/ (the stage's output folder,
all of it the stage's own) and manifest.json (the engine's record of it) beside it.

Entries are immutable (files are made read-only) and appear atomically: a stage runs into a temp
folder that is renamed into place, with its manifest beside it, only when it is complete, so a killed
run leaves no half-written entry. A per-key file lock makes concurrent processes compute an entry
once. With a remote (engine/remote.py) a local miss is looked up there, checked file by file and
published the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.contract import names
from engine.contract.hashing import (
    ContentIndex,
    content_digest,
    list_files,
    matches,
    sha256_file,
    sha256_json,
    tree_digest,
)
from engine.errors import CorruptEntry as CorruptEntry  # re-exported: raised here

if TYPE_CHECKING:  # pydantic and the stage contract load only where params are validated
    from pydantic import BaseModel

    from engine.contract.stage import Stage

MANIFEST = "manifest.json"
OUT = "out"  # the stage's output folder inside an entry; the manifest sits beside it
# Files a stage keeps for people but that no downstream stage reads (logs carry timestamps): they are
# stored and listed, but left out of the output digest so a byte-identical re-run cuts off early.
VOLATILE = ("*.log", "logs/*", "logs/**/*")
KEY_LENGTH = 32
log = logging.getLogger("edgepipe")


def _has_marker(field: Any, marker: object) -> bool:
    return any(m is marker for m in field.metadata)


@dataclass(frozen=True)
class KeyRecipe:
    """What a stage's key is made of before its inputs' digests are known, as plain JSON values, so
    that engine/plan_memo.py can keep it and a cached run needs neither pydantic nor the stage's code."""

    type: str
    version: Any
    params: dict  # key_params' params
    content: dict[str, str]  # content paths by dotted field path
    tools: list[str]  # the distributions whose installed versions enter the key (Stage.tools)
    from_files: bool = False  # a FROM_FILES field is set: validation read files, not to be remembered
    # content paths whose publisher names their sha256 prefix: {field: {"sha256": prefix, "url": url}}
    # (stage.PublishedDigest); the prefix stands for the file when it is absent or matches
    published: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # Not in the key: the stage's volatile_outputs, which a remote entry's digest is recomputed without
    volatile: tuple[str, ...] = ()
    # Not in the key: Stage.outputs_execute (its outputs run as code here), which decides whether an
    # unsigned remote entry may be taken (admitted())
    executes: bool = False


def key_recipe(cls: type[Stage], params: BaseModel) -> KeyRecipe:
    kp, content, from_files, published = key_params(params)
    return KeyRecipe(cls.name, cls.version, kp, {k: str(v) for k, v in content.items()}, list(cls.tools),
                     from_files, published, tuple(cls.volatile_outputs), bool(cls.outputs_execute))


def key_params(params: BaseModel) -> tuple[dict, dict[str, Path], bool, dict[str, dict[str, str]]]:
    """The params as they enter the cache key (without NOT_IN_KEY fields), the content paths
    (HASH_CONTENT fields) whose digests enter it too, by dotted field path, whether a FROM_FILES
    field is set, and the published digests of content paths (PublishedDigest fields, by the content
    field's dotted path). A content path's string is left out of the params (its digest stands for
    it): the same data at another path, another user's checkout, gives the same key."""
    from pydantic import BaseModel

    from engine.contract.stage import FROM_FILES, HASH_CONTENT, NOT_IN_KEY, PublishedDigest

    content: dict[str, Path] = {}
    published: dict[str, dict[str, str]] = {}
    from_files = False

    def walk(model: BaseModel, prefix: str) -> dict:
        nonlocal from_files
        out = {}
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            from_files = from_files or (value is not None and _has_marker(field, FROM_FILES))
            marker = next((m for m in field.metadata if isinstance(m, PublishedDigest)), None)
            if marker is not None:
                if value is not None:
                    published[prefix + marker.of] = {"sha256": str(value["sha256"]), "url": str(value["url"])}
                continue
            if _has_marker(field, NOT_IN_KEY):
                continue
            if _has_marker(field, HASH_CONTENT) and value is not None:
                content[prefix + name] = Path(value)
                continue
            if isinstance(value, BaseModel):
                out[name] = walk(value, f"{prefix}{name}.")
            else:
                out[name] = _jsonable(value)
        return out

    return walk(params, ""), content, from_files, published


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # a pydantic model
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def tool_versions(cls: type[Stage]) -> dict[str, str]:
    """The installed version of each distribution the stage declares in `tools`."""
    return installed_versions(cls.tools)


def installed_versions(dists: Iterable[str], known: dict[str, str] | None = None) -> dict[str, str]:
    """Read from package metadata (nothing is imported) by every command, so an upgrade anywhere on
    sys.path shows in the next key; ``known``: the versions this command read already."""
    known, dists = ({} if known is None else known), list(dists)
    for dist in dists:
        if dist not in known:
            from importlib import metadata  # ~15 ms: a remembered pipeline's versions need none of it

            try:
                known[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                known[dist] = "not installed"
    return {dist: known[dist] for dist in dists}


# Distributions whose versions a manifest records when the stage imported them.
TRACKED = {"torch": "torch", "torchvision": "torchvision", "pytorch_lightning": "pytorch-lightning",
            "onnx": "onnx", "onnxruntime": "onnxruntime", "ncnn": "ncnn", "pnnx": "pnnx",
            "rknn": "rknn-toolkit2", "numpy": "numpy", "PIL": "pillow", "sklearn": "scikit-learn"}


def library_versions() -> dict[str, str]:
    """The versions of the tracked libraries a stage imported (for its manifest): called in the
    process that ran it."""
    import platform
    import sys

    used = installed_versions(dist for module, dist in TRACKED.items() if module in sys.modules)
    return {"python": platform.python_version(), **{d: v for d, v in used.items() if v != "not installed"}}


def stage_key(recipe: KeyRecipe, input_digests: Mapping[str, str], cache: Cache) -> tuple[str, dict]:
    """Key = hash(type, version, params, input digests, content digests, tool versions). Returns
    (key, material). Nothing in it names a path on this machine. Content digests and tool versions
    are read once per Cache (one command: a plan then a run scans a 100,000-file folder once)."""
    content = {}
    for field, path in recipe.content.items():
        if path not in cache.contents:
            try:
                cache.contents[path] = content_digest(Path(path), cache.index)
            except FileNotFoundError:
                cache.contents[path] = "missing"  # the stage itself reports the missing path clearly
        content[field] = published_or_own(cache.contents[path], recipe.published.get(field))
    material = {
        "type": recipe.type,
        "version": recipe.version,
        "params": recipe.params,
        "inputs": dict(sorted(input_digests.items())),
        "content": content,
        "tools": installed_versions(recipe.tools, cache.versions),
    }
    return sha256_json(material)[:KEY_LENGTH], material


def published_or_own(digest: str, published: Mapping[str, str] | None) -> str:
    """A content path's digest in the key: the published sha256 prefix when there is one and the
    file is absent (downloaded by `run` and checked against it) or its sha256 starts with it; else
    the file's own digest (stage.PublishedDigest)."""
    if published is None:
        return digest
    prefix = published["sha256"]
    if digest == "missing" or (prefix and digest.startswith(prefix)):
        return f"published-sha256:{prefix}"
    return digest


def output_digest(hashes: Mapping[str, str], volatile: Iterable[str] = ()) -> str:
    """An entry's digest from its files' sha256 ({relative path: sha256}), logs and the stage's
    `volatile` patterns left out: what the next stages' keys hold. A remote entry's digest is
    recomputed with it, never taken from the remote."""
    skip = VOLATILE + tuple(volatile)
    return tree_digest({rel: sha for rel, sha in hashes.items() if not matches(rel, skip)})


@dataclass
class Hit:
    path: Path | None  # the entry's output folder (<key>/out); None for a remote entry not fetched
    manifest: dict
    fetched: bool = False  # downloaded from the remote just now
    remote_only: bool = False  # in the remote cache, not (yet) here

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


class Cache:
    def __init__(self, root: Path, remote: Any = None) -> None:  # an engine.store.remote.Remote
        # Absolute, so stages get absolute input and output paths whatever folder they work in.
        self.root = Path(root).resolve()
        # content.json was the index before sqlite: ContentIndex keeps content.sqlite beside that name
        # and removes an old content.json on its first save
        self.index = ContentIndex(self.root / ".index" / "content.json")
        self.remote = remote
        self.versions: dict[str, str] = {}  # tool versions read by this command (stage_key)
        self.contents: dict[str, str] = {}  # content digests by path, read by this command (stage_key)

    def entry(self, stage_type: str, key: str) -> Path:
        """The entry's folder: out/ (the stage's output) and manifest.json; the type and key checked by
        engine.contract.names (they may come from a run.json or a manifest)."""
        return names.join(self.root, stage_type, key, what="cache type or key")

    # ---- lookup ------------------------------------------------------------------------------
    def lookup(self, stage_type: str, key: str, fetch: bool = True, volatile: Iterable[str] = (),
               executes: bool = False) -> Hit | None:
        """The entry if present and intact; None if absent; CorruptEntry if its files changed. On a
        local miss the remote (if any) is asked: with `fetch` (call with the key's lock held) the entry
        is downloaded, checked and published here; without, a remote hit is only reported. Without
        `fetch` nothing is written (`plan`): not even the new times of a file found intact.
        `volatile`: the stage's volatile_outputs (KeyRecipe.volatile), to recompute a remote digest;
        `executes`: its outputs run as code here (KeyRecipe.executes): see admitted()."""
        path = self.entry(stage_type, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            if path.exists():
                raise CorruptEntry(f"{path}: manifest.json is missing") from None
            return self._remote_lookup(stage_type, key, fetch, tuple(volatile), executes) if self.remote else None
        except ValueError:
            raise CorruptEntry(f"{path}: manifest.json is not valid JSON") from None
        _check_fetched_executable(path, manifest, executes)
        moved = self.verify(path / OUT, manifest)
        if moved and fetch:
            manifest = _restamp(path / MANIFEST, manifest, moved)
        return Hit(path / OUT, manifest)

    def _remote_lookup(self, stage_type: str, key: str, fetch: bool, volatile: tuple[str, ...],
                       executes: bool) -> Hit | None:
        """A remote entry checked (manifest, signature, digest, then every file) and published here;
        None when there is none or it is refused (warned by the remote). No temp folder outlives it."""
        from engine.errors import RemoteError

        assert self.remote is not None
        try:
            manifest = self.remote.manifest(stage_type, key, volatile)
        except RemoteError as e:  # reached at the start (check_remote), so a passing failure: compute here
            log.warning("%s; computing %s/%s here", e, stage_type, key)
            return None
        if manifest is None or not admitted(self.remote, stage_type, key, executes, warn=fetch):
            return None
        if not fetch:
            return Hit(None, manifest, remote_only=True)
        tmp = self.new_tmp(stage_type, key)
        try:
            hashes = self.remote.download(stage_type, key, manifest, tmp)
        except RemoteError as e:
            log.warning("%s; computing %s/%s here", e, stage_type, key)
            hashes = None
        except BaseException:  # Ctrl-C, a full disk: it propagates, the temp folder does not
            names.remove_tree(tmp, within=self.root)
            raise
        if hashes is None:  # refused (warned): the stage is recomputed
            names.remove_tree(tmp, within=self.root)
            return None
        record = {k: v for k, v in manifest.items() if k not in ("files", "digest", "signature", "signed")}
        record |= {"fetched": True, "signed": self.remote.signing_key is not None}
        hit = self.publish(tmp, stage_type, key, record, hashes=hashes, digest=manifest["digest"])
        hit.fetched = True
        return hit

    def check_remote(self) -> None:
        """Fail now, with one line naming cache.remote, if the remote cannot be reached."""
        if self.remote:
            self.remote.check()

    @staticmethod
    def verify(path: Path, manifest: Mapping, rehash: bool = False) -> dict[str, os.stat_result]:
        """Check every file of an output folder by size, mtime and ctime (cheap); re-hash only files
        whose times changed. A file the manifest does not list (added by hand) is damage too: the
        next stage would read it. ctime cannot be set from user space, so a same-size edit that
        restores the mtime is caught too; an edit within the filesystem's timestamp granularity of the entry's
        creation is not (use `edgepipe reproduce --verify` to recompute). Returns the stats of the
        files whose times moved while their content did not."""
        others: list[str] = []  # what is neither a file nor a folder holding one: never published
        extra = sorted(set(list_files(path, on_other=others.append)) - set(manifest["files"]))
        if extra:  # added by hand: the next stage would read it, so the entry is not the one recorded
            raise CorruptEntry(f"{path / extra[0]}: not in the manifest (added to the entry after it was made)")
        if others:  # a FIFO would hang the next stage, a dangling link or an empty folder changes what it sees
            raise CorruptEntry(f"{path / min(others)}: {_what(path / min(others))}, not in the manifest (added to "
                               f"the entry after it was made)")
        moved = {}
        for rel, meta in manifest["files"].items():
            f = path / rel
            try:
                st = f.stat()
            except FileNotFoundError:
                raise CorruptEntry(f"{f}: deleted") from None
            if st.st_size != meta["size"]:
                raise CorruptEntry(f"{f}: size {st.st_size} != {meta['size']} in the manifest")
            changed = st.st_mtime_ns != meta["mtime_ns"] or st.st_ctime_ns != meta.get("ctime_ns", st.st_ctime_ns)
            if (rehash or changed) and sha256_file(f) != meta["sha256"]:
                raise CorruptEntry(f"{f}: content changed since it was cached")
            if changed:
                moved[rel] = st
        return moved

    # ---- locking -----------------------------------------------------------------------------
    def lock_path(self, stage_type: str, key: str) -> Path:
        return self.entry(stage_type, key).parent / ".locks" / f"{key}.lock"

    def lock(self, stage_type: str, key: str,
             on_wait: Callable[[], None] | None = None) -> AbstractContextManager[None]:
        """Exclusive per-key lock (released by the OS if the holder dies); `on_wait` is called when
        another process holds it."""
        from engine.contract import locks  # filelock: not for `plan`, which takes no lock

        return locks.held(self.lock_path(stage_type, key), on_wait)

    def lock_if_free(self, stage_type: str, key: str) -> AbstractContextManager[bool]:
        """The key's lock if no process holds it now (gc leaves an entry in use alone)."""
        from engine.contract import locks

        return locks.held_if_free(self.lock_path(stage_type, key))

    # ---- writing -----------------------------------------------------------------------------
    def new_tmp(self, stage_type: str, key: str) -> Path:
        """An empty folder to run a stage into (it becomes the entry's out/). Call with the key's lock
        held: any older temp folder of this key belongs to a dead process (a killed run), so it is
        removed."""
        tmp_root = self.entry(stage_type, key).parent / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for stale in tmp_root.glob(f"{key}-*"):
            names.remove_tree(stale, within=self.root)
        tmp = tmp_root / f"{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def publish(self, tmp: Path, stage_type: str, key: str, manifest: dict, volatile: tuple[str, ...] = (),
                hashes: Mapping[str, str] | None = None, digest: str | None = None) -> Hit:
        """Hash the outputs (or take `hashes`, already checked, and `digest`), make them read-only, and
        rename them into place as out/ with the manifest beside it, in one rename. What is neither a
        file nor a folder holding one (an empty folder, a FIFO, a dangling link) is removed first: a
        verified entry holds none (nor does a fetched one)."""
        _remove_others(tmp)
        listed = list_files(tmp)
        for rel in listed:  # every chmod before any stat: a chmod moves the ctime of each hard link of the
            f = tmp / rel  # file (Lightning links last.ckpt to best.ckpt), and a moved ctime costs a re-hash
            os.chmod(f, stat.S_IMODE(f.stat().st_mode) & ~0o222)
        files: dict[str, dict] = {}
        for rel in listed:
            f = tmp / rel
            st = f.stat()
            files[rel] = {"size": st.st_size, "sha256": hashes[rel] if hashes else sha256_file(f),
                          "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
        manifest = dict(manifest, files=files,
                        digest=digest or output_digest({r: m["sha256"] for r, m in files.items()}, volatile))
        staged = tmp.with_name(f"{tmp.name}-entry")  # in .tmp, named by the key: a killed run's is cleaned
        staged.mkdir()
        _write_manifest(staged / MANIFEST, manifest)
        os.rename(tmp, staged / OUT)
        final = self.entry(stage_type, key)
        if final.exists():  # --force, or replacing a corrupt entry
            trash = self.root / stage_type / ".tmp" / f"trash-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(staged, final)
            names.remove_tree(trash, within=self.root)
        else:
            os.rename(staged, final)
        return Hit(final / OUT, manifest)

    def discard(self, stage_type: str, key: str) -> bool:
        """Remove an entry; False, nothing touched, when a symlink above it leads out of the cache
        (a type folder linked elsewhere): deleting follows no link out of the folder it cleans."""
        path = self.entry(stage_type, key)
        if not names.inside(path, self.root):
            return False
        if path.exists():
            trash = path.parent / ".tmp" / f"trash-{key}-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)
            names.remove_tree(trash, within=self.root)
        return True

    # ---- listing -----------------------------------------------------------------------------
    def entries(self) -> Iterator[tuple[str, str, Path]]:
        """(type, key, entry folder) of every entry."""
        if not self.root.is_dir():
            return
        for type_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for entry in sorted(p for p in type_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                yield type_dir.name, entry.name, entry


# ---- which remote entries are taken (README "Trust model") -------------------------------------------
def admitted(remote: Any, stage_type: str, key: str, executes: bool, warn: bool = True) -> bool:
    """Whether a checked remote entry may be taken. An entry whose outputs run as code here (a stage
    with outputs_execute: TorchScript, a board package) is taken only from a signed remote: any writer
    of an unsigned one could choose that code. Otherwise it is computed here (warned when `warn`).
    The stage declares the fact; no list of stage types is kept here."""
    if not executes or remote.signing_key is not None:
        return True
    if warn:
        log.warning("cache.remote: %s/%s refused: its outputs run as code here and cache.remote is not signed "
                    "(%s); computing it here", stage_type, key, _SIGN_HINT)
    return False


_SIGN_HINT = "a team that shares such entries signs them: README 'A cache a team can share', Signing"


def _check_fetched_executable(path: Path, manifest: Mapping, executes: bool) -> None:
    """An entry fetched from an unsigned remote before admitted() existed, whose outputs run as code
    here, is not served: CorruptEntry, so it is computed here and replaced."""
    if executes and manifest.get("fetched") and not manifest.get("signed"):
        raise CorruptEntry(f"{path}: fetched from cache.remote without a signature, and its outputs run as "
                           f"code here; computing it here")


def _write_manifest(path: Path, manifest: Mapping) -> None:
    path.write_text(json.dumps(manifest, indent=2, default=str))
    os.chmod(path, 0o444)


def _restamp(path: Path, manifest: dict, moved: Mapping[str, os.stat_result]) -> dict:
    """The manifest with the times of files found intact after their times moved (a chmod, a new hard
    link, a restore from backup), replaced atomically, so the next hit re-hashes nothing. A manifest
    that cannot be replaced (a read-only shared cache) stays as it is."""
    files = dict(manifest["files"])
    for rel, st in moved.items():
        files[rel] = dict(files[rel], mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
    manifest = dict(manifest, files=files)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        _write_manifest(tmp, manifest)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return manifest


def entry_of(output: Path) -> Path:
    """The entry folder of an output folder (a run's stage path). Entries made before the manifest
    moved beside the output are their own output folder."""
    output = Path(output)
    return output.parent if output.name == OUT else output


def read_manifest(output: Path) -> dict:
    """The engine's record of an output folder (OSError / ValueError when it is gone or damaged)."""
    return json.loads((entry_of(output) / MANIFEST).read_text())


def _what(path: Path) -> str:
    """What a path that is neither a regular file nor a folder holding one is, in words."""
    if path.is_symlink() and not path.exists():
        return "a dangling symlink"
    if path.is_dir():
        return "an empty folder"
    mode = path.lstat().st_mode
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _remove_others(folder: Path) -> None:
    """Remove from a stage's finished output what no listing holds: dangling links, FIFOs, sockets and
    devices, then empty folders (deepest first: a folder of empty folders goes too). Nothing behind a
    link that leads out of the output."""
    while True:
        others: list[str] = []
        list_files(folder, on_other=others.append)
        removable = [folder / rel for rel in others if names.inside(folder / rel, folder)]
        if not removable:
            return
        for path in removable:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


def entry_size(path: Path) -> int:
    return sum((path / rel).stat().st_size for rel in list_files(path))
