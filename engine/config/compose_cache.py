"""Composed configs kept by everything that made them, so an unchanged config is not composed again:
Hydra's compose (and importing Hydra) is most of a fully cached run's time.

An entry is found by a key of: the overrides, the working folder (hydra.runtime.cwd), the config
search path's folders with the name, size, mtime, ctime and inode of every .yaml file in them (an
edited, added or removed file is a new key), the Python and edgepipe code that composes, and the
modification times of the folders packages are installed in (installing or upgrading Hydra,
OmegaConf or a Hydra plugin changes them). Values of environment variables the config files and the
overrides read (``${oc.env:NAME}``, ``${oc.env:'NAME'}``) are kept in the entry and must be equal when
it is used; a config that reads one it does not name (``${oc.env:${x}}``, ``oc.decode``) is not
kept. What Hydra resolves at compose time only (``${now:}`` in hydra.run.dir) is resolved again on
every use; the job config keeps its interpolations, as a composed one does. A config whose
``hydra.searchpath`` adds folders is not kept (their files are not in the key).

An entry also keeps what a plan and a fully cached run read of the config, resolved when it was
composed (`Facts`: name, runs_root, cache.remote, hydra.run.dir and hydra.sweep.dir with each
``${now:FORMAT}`` left as a marker filled in on use, and .hydra/resolved.yaml's text), so that they
do not import OmegaConf: a `Kept` entry makes its DictConfig only when something reads the config.
A config whose values the key does not settle (a ``${hydra:...}`` resolver, a ``${now:}`` outside
the two folders, a value that fails to resolve) keeps no facts and is read through OmegaConf.

Entries are JSON files under $EDGEPIPE_COMPOSE_CACHE (default ~/.cache/edgepipe/compose, or
$XDG_CACHE_HOME's); EDGEPIPE_COMPOSE_CACHE=off turns the cache off. A damaged entry is a miss.

The folder may be shared, or written by someone else: every entry (and plan_memo's) is sealed with
an HMAC under its file name, with a key only this user can read (`.seal-key-<uid>`, made on first use,
mode 0600, refused when anyone else owns it or can read it). An edited, planted or renamed entry is a
miss, never a config or a plan that no config file says.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import sysconfig
import tempfile
from datetime import datetime
from pathlib import Path

from engine.contract.fetching import Memo
from engine.contract.hashing import scan_files

FORMAT = 3  # 2: .hydra/ texts kept; 3: facts
ENV = "EDGEPIPE_COMPOSE_CACHE"
KEEP = 200  # entries; the oldest go first
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # .hydra/ texts an entry keeps
# Where a config reads the environment: each use of OmegaConf's env resolvers, and its name when it is
# written out (quoted or not). A use whose name is not (`${oc.env:${x}}`), or oc.decode, which can
# build an interpolation from strings, makes a config one that is not kept.
_ENV_USE = re.compile(r"\$\{\s*(?:oc\s*\.\s*)?env\s*:")
_ENV_NAME = re.compile(r"""\$\{\s*(?:oc\s*\.\s*)?env\s*:\s*(['"]?)([A-Za-z_][A-Za-z0-9_]*)\1\s*[,}]""")
_DECODE = re.compile(r"\boc\s*\.\s*decode\b")
UNCACHEABLE = "\0uncacheable"  # an env name no variable has: the entry is never used
# engine/ files whose code makes the Job
_CODE = ("config/compose.py", "config/compose_cache.py", "config/targets.py", "__init__.py")


def folder() -> Path | None:
    named = os.environ.get(ENV)
    if named:
        return None if named.lower() in ("off", "0", "false", "no") else Path(named).expanduser()
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home folder to be found: no cache
        return None
    return Path(base) / "edgepipe" / "compose"


class Key:
    """What a composition depends on, computed before composing (a file edited while Hydra reads it
    then makes the next run miss, never hit on a config the edit is not in)."""

    def __init__(self, overrides: list[str], folders: list[Path]) -> None:
        self.overrides, self.folders = list(overrides), folders
        self.files = [(str(f), _yaml_stats(f)) for f in folders]
        here = Path(__file__).parents[1]  # engine/
        installed = {p for p in (sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")) if p}
        material = {"format": FORMAT, "overrides": self.overrides, "cwd": os.getcwd(), "files": self.files,
                    "config_name": os.environ.get("EDGEPIPE_CONFIG_NAME", ""),
                    "python": sys.version, "prefix": sys.prefix,
                    "code": [_stat(here / name) for name in _CODE],
                    "installed": sorted((p, _stat(Path(p))) for p in installed)}
        self.digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:40]


def _stat(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _yaml_stats(root: Path) -> list[str]:
    return [f"{rel}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
            for rel, st in scan_files(root) if rel.endswith((".yaml", ".yml"))]


def _env_names(folders: list[Path], overrides: list[str]) -> list[str]:
    """Every environment variable the config files and the overrides can read through an
    interpolation; [UNCACHEABLE] when one of them reads one that cannot be named."""
    texts = list(overrides)
    for root in folders:
        for rel, _ in scan_files(root, stat=False):
            if rel.endswith((".yaml", ".yml")):
                try:
                    texts.append((root / rel).read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    return [UNCACHEABLE]  # an env name may hide in it
    names: set[str] = set()
    for text in texts:
        found = [name for _, name in _ENV_NAME.findall(text)]
        if len(found) != len(_ENV_USE.findall(text)) or _DECODE.search(text):
            return [UNCACHEABLE]
        names.update(found)
    return sorted(names)


def load(key: Key) -> Kept | None:
    """The config composed earlier for this key, or None. compose.compose makes the Job of it."""
    where = folder()
    if where is None:
        return None
    try:
        text = read_entry(where / f"{key.digest}.json")
        if text is None:
            return None
        entry = json.loads(text)
        if entry.get("format") != FORMAT or entry["overrides"] != key.overrides:
            return None
        if any(os.environ.get(name) != value for name, value in entry["env"].items()):
            return None
        files = entry["hydra_files"]  # written into .hydra/ by name: exactly these, all text
        if sorted(files) != sorted(HYDRA_FILES) or not all(isinstance(t, str) for t in files.values()):
            return None
        if not isinstance(entry["cfg"], dict) or not isinstance(entry["hydra"], dict):
            return None
        facts = Facts.from_entry(entry.get("facts"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return Kept(entry, facts)


class Kept:
    """A composed config as an entry keeps it: plain data (cfg, its hydra node), its Facts when it
    has them, the sources and .hydra/ texts; `configs()` makes OmegaConf's DictConfigs of it."""

    def __init__(self, entry: dict, facts: Facts | None) -> None:
        self.cfg_tree, self.hydra_tree = entry["cfg"], entry["hydra"]
        self.struct, self.sources, self.hydra_files = bool(entry["struct"]), entry["sources"], entry["hydra_files"]
        self.facts = facts
        self._entry = entry

    def tree(self) -> dict:
        """The composed config with its hydra node, as plain containers (unresolved)."""
        return {**self.cfg_tree, "hydra": self.hydra_tree}

    def configs(self):
        """(job config, hydra node) as DictConfigs, the job config with the struct flag it was composed
        with, and Hydra's resolvers registered for them."""
        from omegaconf import OmegaConf

        _register_resolvers(self._entry)
        cfg = OmegaConf.create(self.cfg_tree)
        OmegaConf.set_struct(cfg, self.struct)
        return cfg, OmegaConf.create(self.hydra_tree)


# ${now:FORMAT}, as Hydra's hydra.run.dir writes it; any other use of `now` keeps no facts
_NOW = re.compile(r"\$\{now:([^${}]*)\}")
_NOW_USE = re.compile(r"\bnow\s*:")
_MARK = "\ue000now{}\ue000"  # a private-use character: no config value holds one


class Facts:
    """What plan and a cached run read of a composed config, resolved at composition: name, runs_root,
    cache.remote, and hydra.run.dir / hydra.sweep.dir with each ${now:FORMAT} a marker (`dirs`
    fills them with the time of use), and .hydra/resolved.yaml's text (the job config resolved)."""

    def __init__(self, name: str, runs_root: str, cache_remote: str | None, run_dir: str, sweep_dir: str,
                 now: list[str], resolved: str) -> None:
        self.name, self.runs_root, self.cache_remote = name, runs_root, cache_remote
        self.run_dir, self.sweep_dir, self.now, self.resolved = run_dir, sweep_dir, now, resolved

    def dirs(self, when: datetime | None = None) -> tuple[Path, Path]:
        """(hydra.run.dir, hydra.sweep.dir) at this time (one clock reading for both, as Hydra's
        cached ${now:} resolver gives)."""
        when = when or datetime.now()

        def filled(template: str) -> Path:
            for i, fmt in enumerate(self.now):
                template = template.replace(_MARK.format(i), when.strftime(fmt))
            return Path(template)

        return filled(self.run_dir), filled(self.sweep_dir)

    def as_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_entry(cls, data) -> Facts | None:
        if data is None:
            return None
        facts = cls(**data)
        if not isinstance(facts.now, list):
            raise TypeError("facts.now")
        strings = [facts.name, facts.runs_root, facts.run_dir, facts.sweep_dir, facts.resolved, *facts.now]
        if not all(isinstance(v, str) for v in strings) or not isinstance(facts.cache_remote, (str, type(None))):
            raise TypeError("facts")
        return facts

    @classmethod
    def of(cls, cfg_tree: dict, hydra_tree: dict) -> Facts | None:
        """Facts of a composed config (plain containers), or None when the key does not settle them."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        formats: list[str] = []

        def mark(value):
            if isinstance(value, dict):
                return {k: mark(v) for k, v in value.items()}
            if isinstance(value, list):
                return [mark(v) for v in value]
            if not isinstance(value, str):
                return value
            if "${hydra:" in value.replace(" ", ""):
                raise _Unsettled
            uses = len(_NOW_USE.findall(value))

            def marker(m: re.Match) -> str:
                formats.append(m.group(1))
                return _MARK.format(len(formats) - 1)

            marked, n = _NOW.subn(marker, value)
            if n != uses:
                raise _Unsettled
            return marked

        try:
            marked_cfg = mark(cfg_tree)
            if formats:  # a job value that reads the time is resolved on every use
                return None
            marked_hydra = mark(hydra_tree)
            full = OmegaConf.create({**marked_cfg, "hydra": marked_hydra})
            remote = OmegaConf.select(full, "cache.remote", default=None, throw_on_missing=False)
            return cls(str(full.name), str(full.runs_root), None if remote is None else str(remote),
                       str(full.hydra.run.dir), str(full.hydra.sweep.dir), formats,
                       OmegaConf.to_yaml(OmegaConf.create(marked_cfg), resolve=True))
        except (_Unsettled, OmegaConfBaseException, AttributeError, KeyError, TypeError, ValueError):
            return None


class _Unsettled(Exception):
    """A value the compose key does not settle."""


def store(key: Key, job, hydra_files: dict[str, str]) -> bool:
    """Keep job (with its .hydra/ texts) for key; a config that cannot come back equal from JSON is not
    kept. True when kept."""
    from omegaconf import OmegaConf

    where = folder()
    if where is None or OmegaConf.select(job.hydra_cfg, "searchpath"):
        return False
    cfg = OmegaConf.to_container(job.cfg, resolve=False)
    hydra = OmegaConf.to_container(job.hydra_cfg, resolve=False)
    facts = Facts.of(cfg, hydra)
    entry = {"format": FORMAT, "overrides": key.overrides, "cfg": cfg, "hydra": hydra,
             "struct": bool(OmegaConf.is_struct(job.cfg)), "sources": job.sources,
             "hydra_files": hydra_files, "facts": None if facts is None else facts.as_dict(),
             "env": {name: os.environ.get(name) for name in _env_names(key.folders, key.overrides)}}
    if UNCACHEABLE in entry["env"]:
        return False
    try:
        text = json.dumps(entry, allow_nan=False)
        if json.loads(text) != entry:  # e.g. an integer key would come back a string
            return False
        if not write_entry(where / f"{key.digest}.json", text):
            return False
        marker = _one_job_marker(where, key.overrides)
        write_entry(marker, '{"one_job": true}')
        prune(where)
        prune(marker.parent)
    except (OSError, TypeError, ValueError):  # a read-only home, a value JSON cannot hold: no cache
        return False
    return True


def write_entry(path: Path, text: str) -> bool:
    """path's content becomes text (a JSON object), sealed, at once (a temp file renamed): a reader
    sees all of it or none. False when there is no key to seal it with (nothing written)."""
    sealed = _sealed(path.name, text)
    if sealed is None:
        return False
    _replace(path, sealed.encode("utf-8"))
    return True


def _replace(path: Path, data: bytes) -> None:
    """path's content becomes data through a temp file of a name no one can plant a link at first
    (mkstemp: O_EXCL, mode 0600), renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(path: Path) -> str | None:
    """The JSON text write_entry sealed into path, or None: missing, damaged, edited, sealed under
    another name (a renamed entry) or by another key."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    return _unsealed(path.name, raw)


# A sealed entry is still one JSON object: {"seal": "<hmac>", <the entry's own items>}.
_SEAL_HEAD, _SEAL_TAIL, _MAC_LENGTH = '{"seal": "', '", ', 64


def _sealed(name: str, text: str) -> str | None:
    key = _seal_key()
    if key is None or not text.startswith("{") or text.lstrip("{ ").startswith("}"):  # an object with items
        return None
    return f"{_SEAL_HEAD}{_mac(key, name, text)}{_SEAL_TAIL}{text[1:]}"


def _unsealed(name: str, raw: str) -> str | None:
    key = _seal_key()
    if key is None or not raw.startswith(_SEAL_HEAD):
        return None
    mac, rest = raw[len(_SEAL_HEAD): len(_SEAL_HEAD) + _MAC_LENGTH], raw[len(_SEAL_HEAD) + _MAC_LENGTH:]
    text = "{" + rest[len(_SEAL_TAIL):]
    if not rest.startswith(_SEAL_TAIL) or not hmac.compare_digest(mac, _mac(key, name, text)):
        return None
    return text


def write_sealed_bytes(path: Path, data: bytes) -> bool:
    """write_entry for bytes (the report template's compiled code): the HMAC, then the data."""
    key = _seal_key()
    if key is None:
        return False
    _replace(path, _mac_bytes(key, path.name, data) + data)
    return True


def read_sealed_bytes(path: Path) -> bytes | None:
    """What write_sealed_bytes wrote into path, or None when it is missing or not sealed by this user."""
    key = _seal_key()
    try:
        raw = path.read_bytes() if key is not None else b""
    except OSError:
        return None
    mac, data = raw[:32], raw[32:]
    return data if len(mac) == 32 and hmac.compare_digest(mac, _mac_bytes(key, path.name, data)) else None


def _mac_bytes(key: bytes, name: str, data: bytes) -> bytes:
    return hmac.new(key, name.encode("utf-8", "surrogateescape") + b"\0" + data, hashlib.sha256).digest()


def _mac(key: bytes, name: str, text: str) -> str:
    """Bound to the file name too: an entry copied under another key's name does not verify."""
    return hmac.new(key, f"{name}\0{text}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


_keys: dict[Path, bytes | None] = {}


def _seal_key() -> bytes | None:
    """This user's sealing key in the cache folder, made on first use; None (no cache) when the file
    there is not one only this user can read and write."""
    where = folder()
    if where is None:
        return None
    if where not in _keys:
        path = where / f".seal-key-{os.getuid()}"
        _keys[where] = _read_key(path) or (_make_key(path) and _read_key(path))
        if _keys[where] is None and os.path.lexists(path):  # someone else's, or readable by others: say so once
            print(f"edgepipe: the compose cache in {where} is off: {path} is not a file only you can read; "
                  "remove it (a new key is made)", file=sys.stderr)
    return _keys[where]


def _read_key(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
        key = os.read(fd, 64) if ours else b""
    finally:
        os.close(fd)
    return key if len(key) == 32 else None


def _make_key(path: Path) -> bool:
    """A new random key, published by a hard link so that it never replaces one another process made."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


_RESOLVED_NAME = re.compile(r"[0-9a-f][0-9a-f-]{0,127}")


def resolved_memo() -> Memo | None:
    """Where validators keep what a name resolved to (engine.contract.fetching.remember): sealed
    entries under folder()/resolved/; None when the cache is off."""
    where = folder()
    if where is None:
        return None
    where = where / "resolved"

    def read(name: str) -> str | None:
        return read_entry(where / f"{name}.json") if _RESOLVED_NAME.fullmatch(name) else None

    def write(name: str, text: str) -> None:
        if not _RESOLVED_NAME.fullmatch(name):
            return
        try:
            if write_entry(where / f"{name}.json", text):
                prune(where)
        except OSError:  # a read-only home: resolved again next time
            pass

    return Memo(read, write)


def _one_job_marker(where: Path, overrides: list[str]) -> Path:
    return where / "one-job" / hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:40]


def composed_as_one_job(overrides: list[str]) -> bool:
    """True when these overrides were composed as one job before: whether an override list is a sweep
    is its syntax alone, so the answer holds for any config."""
    where = folder()
    return where is not None and read_entry(_one_job_marker(where, overrides)) is not None


def prune(where: Path) -> None:
    """Keep the KEEP newest files of the folder (its sub-folders and the sealing keys are left alone)."""
    entries = sorted((p for p in where.iterdir() if p.is_file() and not p.name.startswith(".seal-key-")), key=_mtime)
    for old in entries[: max(0, len(entries) - KEEP)]:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


_current: dict = {}


def _hydra_node(path: str):
    """${hydra:path} of the job last taken from the cache (Hydra's resolver reads HydraConfig, which
    only a composition in this process sets)."""
    from omegaconf import OmegaConf

    if "full" not in _current:
        entry = _current["entry"]
        _current["full"] = OmegaConf.create({**entry["cfg"], "hydra": entry["hydra"]})
    return OmegaConf.select(_current["full"].hydra, path)


def _register_resolvers(entry: dict) -> None:
    """The resolvers Hydra registers when it composes (hydra.core.utils.setup_globals), for a job that
    was not composed in this process. A later composition by Hydra registers Hydra's again."""
    from omegaconf import OmegaConf

    _current.clear()
    _current["entry"] = entry
    OmegaConf.register_new_resolver("hydra", _hydra_node, replace=True)
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern), use_cache=True)
    if not OmegaConf.has_resolver("python_version"):
        levels = {"major": f"{sys.version_info[0]}", "minor": "{}.{}".format(*sys.version_info),
                  "micro": "{}.{}.{}".format(*sys.version_info)}
        OmegaConf.register_new_resolver("python_version", lambda level="minor": levels.get(level))
