"""A cache a team can share: `cache.remote=URL`, any fsspec URL (file:///shared/cache, s3://bucket/prefix,
gs://..., sftp://...), laid out like the local cache: <type>/<key>/out/... and <type>/<key>/manifest.json.

- Reading: on a local miss the remote manifest is read, every file it lists is downloaded into a temp
  folder and checked against its sha256, and the entry is published locally as if computed here. A
  file that is missing or differs makes the entry damaged: one warning, and the stage is recomputed.
- Writing (`edgepipe push`): each file goes up under a temp name and is then moved to its name; the
  manifest goes last, so an entry whose upload was cut short has no manifest and is never seen. An
  entry already there is left alone (the first upload wins; a non-deterministic stage's second build
  would not match the first one's manifest).
- Credentials stay out of configs (configs are saved into every run folder): fsspec's back-ends read
  their own (AWS_* variables or ~/.aws for s3, gcloud's for gs, ~/.ssh for sftp). `cache.remote_options`
  passes everything else to the filesystem (e.g. `client_kwargs: {endpoint_url: ...}` for an
  S3-compatible server; s3's AWS_ENDPOINT_URL variable works too).
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cache import MANIFEST, OUT, Cache, CorruptEntry, entry_of, stage_key
from .errors import RemoteError
from .hashing import sha256_file

log = logging.getLogger("edgepipe")

# Option names that hold credentials: refused in the config (it is saved in every run folder).
_SECRET_NAMES = {"key", "secret", "token", "password", "passphrase", "access_key", "secret_key",
                 "session_token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                 "client_secret", "private_key", "pkey"}
_TODO = ("check the URL, the network and the credentials (the back-end's own: environment variables or its "
         "config file, never the edgepipe config), or run without it: cache.remote=null")


class CacheSettings(BaseModel):
    """The `cache` config section."""

    model_config = ConfigDict(extra="forbid")
    remote: str | None = None
    remote_options: dict[str, Any] = Field(default_factory=dict)


def from_config(cfg: DictConfig) -> "Remote | None":
    """The remote named by `cache.remote`, or None. A bad section is a ConfigError naming the key."""
    from .errors import ConfigError

    section = OmegaConf.select(cfg, "cache", default=None, throw_on_missing=False)
    if section is None:
        return None
    try:
        settings = CacheSettings.model_validate(OmegaConf.to_container(section, resolve=True)
                                                if isinstance(section, DictConfig) else section)
    except ValidationError as e:
        raise ConfigError([f"cache.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]) from None
    if not settings.remote:
        return None
    secrets = sorted(_secret_keys(settings.remote_options, "cache.remote_options"))
    if urlsplit(settings.remote).password:
        secrets.insert(0, "cache.remote")  # sftp://user:password@host/...
    if secrets:
        raise ConfigError([f"{k}: credentials do not belong in the config (it is saved in every run folder); "
                           f"give them to the back-end itself (for s3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                           f"or ~/.aws/credentials)" for k in secrets])
    return Remote(settings.remote, settings.remote_options)


def _secret_keys(options: Mapping[str, Any], prefix: str) -> list[str]:
    found = []
    for k, v in options.items():
        if str(k).lower() in _SECRET_NAMES:
            found.append(f"{prefix}.{k}")
        elif isinstance(v, Mapping):
            found += _secret_keys(v, f"{prefix}.{k}")
    return found


class Remote:
    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        import fsspec
        from fsspec.core import split_protocol

        from .errors import ConfigError

        self.url, self.options = url.rstrip("/"), dict(options or {})
        protocol = split_protocol(self.url)[0] or "file"
        try:
            with warnings.catch_warnings():  # fsspec's note on the s3fs version is not the user's business
                warnings.simplefilter("ignore")
                fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise ConfigError([f"cache.remote: {url} needs a package that is not installed ({_one_line(e)}); "
                               f"install that package into edgepipe's venv (pip install -c constraints.txt NAME) "
                               f"or use another URL"]) from None
        except ValueError:
            raise ConfigError([f"cache.remote: {url}: fsspec knows no protocol '{protocol}'; use a URL such as "
                               f"file:///shared/edgepipe-cache, s3://bucket/prefix, gs://bucket/prefix or "
                               f"sftp://host/path"]) from None
        self._fs_root: tuple[Any, str] | None = None
        self._made: set[str] = set()
        self._checked = False

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    # ---- plumbing ----------------------------------------------------------------------------
    def _fs(self) -> tuple[Any, str]:
        """The filesystem and the root path in it, made on first use (sftp connects here)."""
        if self._fs_root is None:
            import fsspec

            try:
                self._fs_root = fsspec.core.url_to_fs(self.url, **self.options)
            except Exception as e:  # noqa: BLE001 - any back-end failure is one line naming the key
                raise self._error("opened", e) from None
        return self._fs_root

    def _path(self, stage_type: str, key: str, *rest: str) -> str:
        return posixpath.join(self._fs()[1], stage_type, key, *rest)

    def _error(self, what: str, e: BaseException) -> RemoteError:
        return RemoteError(f"cache.remote: {self.url} cannot be {what} ({type(e).__name__}: {_one_line(e)}); {_TODO}")

    def check(self) -> None:
        """Reach the remote once (list its root): a missing root is an empty cache, anything else that
        fails is a RemoteError."""
        if self._checked:
            return
        fs, root = self._fs()
        try:
            fs.ls(root)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._error("reached", e) from None
        self._checked = True

    # ---- reading -----------------------------------------------------------------------------
    def manifest(self, stage_type: str, key: str) -> dict | None:
        """The remote entry's manifest; None when there is none (or it is damaged: warned)."""
        fs, _ = self._fs()
        path = self._path(stage_type, key, MANIFEST)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise self._error("read", e) from None
        try:
            manifest = json.loads(data)
            _check_manifest(manifest)
        except (ValueError, TypeError, KeyError) as e:
            return self._damaged(stage_type, key, f"its manifest is not valid ({_one_line(e)})")
        return manifest

    def download(self, stage_type: str, key: str, manifest: Mapping, dest: Path) -> dict[str, str] | None:
        """Every file of the entry into `dest` (an empty folder), each checked against its sha256.
        Returns {relative path: sha256}, or None when the entry is damaged (warned)."""
        fs, _ = self._fs()
        hashes = {}
        for rel, meta in manifest["files"].items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(self._path(stage_type, key, OUT, rel), str(target))
            except FileNotFoundError:
                return self._damaged(stage_type, key, f"{rel} is missing")
            except Exception as e:  # noqa: BLE001
                raise self._error("read", e) from None
            hashes[rel] = sha256_file(target)
            if hashes[rel] != meta["sha256"]:
                return self._damaged(stage_type, key, f"{rel} does not match its sha256 in the manifest")
        return hashes

    def _damaged(self, stage_type: str, key: str, why: str) -> None:
        log.warning("cache.remote: %s/%s refused: %s; computing it here", stage_type, key, why)
        return None

    # ---- writing -----------------------------------------------------------------------------
    def upload(self, entry: Path, stage_type: str, key: str) -> bool:
        """Upload a local entry (out/ and manifest.json); False if the remote has it already."""
        if self.manifest(stage_type, key) is not None:
            return False
        manifest = json.loads((entry / MANIFEST).read_text())
        for rel in manifest["files"]:
            self._put(entry / OUT / rel, self._path(stage_type, key, OUT, rel))
        self._put(entry / MANIFEST, self._path(stage_type, key, MANIFEST))  # last: the entry is now complete
        return True

    def _put(self, local: Path, remote: str) -> None:
        fs, _ = self._fs()
        tmp = f"{remote}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            parent = posixpath.dirname(remote)
            if parent not in self._made:
                fs.makedirs(parent, exist_ok=True)
                self._made.add(parent)
            fs.put_file(str(local), tmp)
            fs.mv(tmp, remote)
        except Exception as e:  # noqa: BLE001
            raise self._error("written", e) from None


def push(record: Any, cache: Cache, remote: Remote) -> int:
    """`edgepipe push`: upload the entries a run used (a RunRecord), each once. Returns the exit status."""
    remote.check()
    done = {"uploaded": 0, "already in cache.remote": 0, "skipped": 0}
    seen: set[tuple[str, str]] = set()  # two stages of a run can share an entry (same type, same key)
    for rec in record.stages.values():
        if not rec.path or not rec.key or rec.status not in ("ran", "cached") or (rec.type, rec.key) in seen:
            continue
        seen.add((rec.type, rec.key))
        entry = entry_of(Path(rec.path))
        with cache.lock(rec.type, rec.key):  # gc leaves it alone meanwhile
            why = _unpushable(entry)
            if why:
                print(f"{rec.name}: not pushed: {why}")
                done["skipped"] += 1
                continue
            status = "uploaded" if remote.upload(entry, rec.type, rec.key) else "already in cache.remote"
        print(f"{rec.name}: {status} ({rec.type}/{rec.key[:10]})")
        done[status] += 1
    print("push: " + ", ".join(f"{n} {what}" for what, n in done.items()) + f" ({remote.url})")
    return 1 if done["skipped"] else 0


def _unpushable(entry: Path) -> str | None:
    """Why a local entry cannot be pushed: gone, from an older layout, or damaged."""
    if not (entry / OUT).is_dir() or not (entry / MANIFEST).is_file():
        return f"{entry} is not in the local cache (removed by gc, or made before manifests moved beside out/; re-run it)"
    try:
        Cache.verify(entry / OUT, json.loads((entry / MANIFEST).read_text()), rehash=True)
    except (CorruptEntry, ValueError) as e:
        return f"damaged ({e}); re-run it"
    return None


def pull(pipeline: Any) -> int:
    """`edgepipe pull`: fetch what a plan of `pipeline` needs from the remote, in order (a stage's key
    needs its inputs' digests). Returns the exit status."""
    cache = pipeline.cache
    if cache.remote is None:
        from .errors import ConfigError

        raise ConfigError(["cache.remote: not set; name the shared cache (cache.remote=s3://bucket/prefix)"])
    cache.check_remote()
    digests: dict[str, str | None] = {}
    counts = {"fetched": 0, "already here": 0, "not in cache.remote": 0}
    for name in pipeline.graph.select([]):
        st = pipeline.stages[name]
        inputs = {i: digests.get(up) for i, up in st.entry.needs.items()}
        if any(d is None for d in inputs.values()):
            digests[name] = None
            continue  # an input is missing: its key cannot be known
        key, _ = stage_key(st.recipe, inputs, cache)
        with cache.lock(st.cls.name, key):
            try:
                hit = cache.lookup(st.cls.name, key)
            except CorruptEntry as e:
                log.warning("stage %s: local cache entry damaged (%s); run recomputes it", name, e)
                hit = None
        digests[name] = hit.digest if hit else None
        status = "fetched" if hit and hit.fetched else "already here" if hit else "not in cache.remote"
        counts[status] += 1
        print(f"{name}: {status}" + (f" ({st.cls.name}/{key[:10]})" if hit else ""))
    cache.index.save()
    left = len(pipeline.stages) - sum(counts.values())
    print("pull: " + ", ".join(f"{n} {what}" for what, n in counts.items())
          + (f", {left} waiting on a stage not in cache.remote" if left else "") + f" ({cache.remote.url})")
    return 0


def _check_manifest(manifest: Any) -> None:
    """A remote manifest names its files safely (relative, inside the entry) with a sha256 each."""
    if not isinstance(manifest, dict) or not isinstance(manifest["digest"], str):
        raise TypeError("no digest")
    for rel, meta in manifest["files"].items():
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or ".." in parts or not parts:
            raise ValueError(f"file name {rel!r} leaves the entry")
        if not isinstance(meta["sha256"], str):
            raise TypeError(f"{rel} has no sha256")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
