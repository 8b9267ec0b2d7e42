"""A cache a team can share: `cache.remote=URL`, any fsspec URL (file:///shared/cache, s3://bucket/prefix,
gs://..., sftp://...), laid out like the local cache: <type>/<key>/out/... and <type>/<key>/manifest.json.

- Reading: on a local miss the remote manifest is read and checked before any file is: its shape
  (types; file names relative, normalised, inside the entry, no clashes or duplicates), its signature
  when $EDGEPIPE_REMOTE_KEY is set, that it is this type's and key's, its digest (recomputed here from
  the listed sha256, as a local entry's is made) and the sum of its sizes (cache.remote_max_entry_size).
  Then every file is downloaded into a temp folder, read no further than its declared size + 1 byte
  and checked against its sha256, and the entry is published locally as if computed here. Anything
  that fails refuses the entry: one warning line, the stage is computed here, no temp folder is left.
  An entry whose outputs run as code here (Stage.outputs_execute: TorchScript, board packages) is
  taken only when signing is on (engine.store.cache.admitted).
- Writing (`edgepipe push`): each file goes up under a temp name and is then moved to its name; the
  manifest goes last (signed, with a key), so an entry whose upload was cut short has no manifest and
  is never seen. An entry already there is left alone (the first upload wins; a non-deterministic
  stage's second build would not match the first one's manifest), unless a reader would refuse it.
- Credentials stay out of configs (configs are saved into every run folder): fsspec's back-ends read
  their own (AWS_* variables or ~/.aws for s3, gcloud's for gs, ~/.ssh for sftp). `cache.remote_options`
  passes everything else to the filesystem (e.g. `client_kwargs: {endpoint_url: ...}` for an
  S3-compatible server; s3's AWS_ENDPOINT_URL variable works too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import posixpath
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ByteSize, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from engine.contract.hashing import canonical_json
from engine.errors import BadSignature as BadSignature  # re-exported: raised here
from engine.errors import NotPushable as NotPushable
from engine.errors import Refused as Refused
from engine.errors import RemoteError as RemoteError
from engine.store.cache import MANIFEST, OUT, output_digest

log = logging.getLogger("edgepipe")

# Option names that hold credentials: refused in the config (it is saved in every run folder).
_SECRET_NAMES = {"key", "secret", "token", "password", "passphrase", "access_key", "secret_key",
                 "session_token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                 "client_secret", "private_key", "pkey"}
# Signing (README "Safety"): the team's key, read from the environment only (a config is saved into
# every run folder); with it, push signs each manifest and a reader refuses what does not verify.
KEY_VARIABLE = "EDGEPIPE_REMOTE_KEY"
MIN_KEY_LENGTH = 16
SIGNATURE_FORMAT = "edgepipe-hmac-sha256/1"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists files: even 100,000 of them take ~20 MB
_SHA256 = r"^[0-9a-f]{64}$"
_CHUNK = 1 << 20
_TODO = ("check the URL, the network and the credentials (the back-end's own: environment variables or its "
         "config file, never the edgepipe config), or run without it: cache.remote=null")


class CacheSettings(BaseModel):
    """The `cache` config section."""

    model_config = ConfigDict(extra="forbid")
    remote: str | None = None
    remote_options: dict[str, Any] = Field(default_factory=dict)
    # true: every remote entry must be signed with the team's key ($EDGEPIPE_REMOTE_KEY), and a
    # machine without the key is a config error rather than a reader of unsigned entries
    remote_signed: bool = False
    # the most a remote entry's files may add up to (declared sizes, checked before downloading)
    remote_max_entry_size: ByteSize = ByteSize(32 << 30)


def from_config(cfg: DictConfig) -> Remote | None:
    """The remote named by `cache.remote`, or None. A bad section is a ConfigError naming the key."""
    from engine.errors import ConfigError

    section = OmegaConf.select(cfg, "cache", default=None, throw_on_missing=False)
    if section is None:
        return None
    try:
        settings = CacheSettings.model_validate(OmegaConf.to_container(section, resolve=True)
                                                if isinstance(section, DictConfig) else section)
    except ValidationError as e:
        raise ConfigError([f"cache.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                           for err in e.errors()]) from None
    if not settings.remote:
        return None
    secrets = sorted(_secret_keys(settings.remote_options, "cache.remote_options"))
    if urlsplit(settings.remote).password:
        secrets.insert(0, "cache.remote")  # sftp://user:password@host/...
    if secrets:
        raise ConfigError([f"{k}: credentials do not belong in the config (it is saved in every run folder); "
                           f"give them to the back-end itself (for s3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                           f"or ~/.aws/credentials)" for k in secrets])
    signing_key = os.environ.get(KEY_VARIABLE, "")
    if settings.remote_signed and not signing_key:
        raise ConfigError([f"cache.remote_signed: true, but {KEY_VARIABLE} is not set; export the team's key "
                           f"({KEY_VARIABLE}=...) or ask whoever keeps it"])
    if signing_key and len(signing_key) < MIN_KEY_LENGTH:
        raise ConfigError([f"{KEY_VARIABLE}: {len(signing_key)} characters, too short to sign with; use at least "
                           f"{MIN_KEY_LENGTH} random ones (python -c 'import secrets; print(secrets.token_hex(32))')"])
    return Remote(settings.remote, settings.remote_options, signing_key.encode() or None,
                  int(settings.remote_max_entry_size))


def _secret_keys(options: Mapping[str, Any], prefix: str) -> list[str]:
    found = []
    for k, v in options.items():
        if str(k).lower() in _SECRET_NAMES:
            found.append(f"{prefix}.{k}")
        elif isinstance(v, Mapping):
            found += _secret_keys(v, f"{prefix}.{k}")
    return found


class Remote:
    def __init__(self, url: str, options: Mapping[str, Any] | None = None, signing_key: bytes | None = None,
                 max_entry_size: int = 32 << 30) -> None:
        import fsspec
        from fsspec.core import split_protocol

        from engine.errors import ConfigError

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
        self.signing_key = signing_key  # from the environment only: with it, entries are signed and checked
        self.max_entry_size = max_entry_size
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
    def manifest(self, stage_type: str, key: str, volatile: tuple[str, ...] = ()) -> dict | None:
        """The remote entry's manifest, checked before any of its files is read: its shape, its
        signature (when a key is set), its key, its digest (recomputed from the listed sha256 with
        the stage's `volatile` patterns) and its size. None when there is none or it is refused
        (one warning line)."""
        try:
            return self._checked_manifest(stage_type, key, volatile)
        except Refused as e:
            return self._damaged(stage_type, key, str(e))

    def _checked_manifest(self, stage_type: str, key: str, volatile: tuple[str, ...] | None) -> dict | None:
        """The manifest or None (none there); Refused with why. `volatile` None: the digest is not
        recomputed (push, which knows no stage's volatile patterns)."""
        fs, _ = self._fs()
        try:  # a range read: a huge manifest is refused by its first bytes, not read whole
            data = fs.cat_file(self._path(stage_type, key, MANIFEST), start=0, end=MANIFEST_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise self._error("read", e) from None
        if len(data) > MANIFEST_MAX_BYTES:
            raise Refused(f"its manifest is over {MANIFEST_MAX_BYTES} bytes")
        try:
            manifest = json.loads(data, object_pairs_hook=_no_duplicate_names)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise Refused(f"its manifest is not valid JSON ({_one_line(e)})") from None
        if not isinstance(manifest, dict):
            raise Refused("its manifest is not a JSON object")
        try:  # JSON escapes can spell lone surrogates: no file name, signature or printout can hold them
            canonical_json(manifest).encode()
        except UnicodeEncodeError:
            raise Refused("its manifest holds text that is not valid Unicode") from None
        if self.signing_key is not None:  # before anything else of it is believed
            _check_signature(manifest, stage_type, key, self.signing_key)
        _check_manifest(manifest, stage_type, key)
        hashes = {rel: meta["sha256"] for rel, meta in manifest["files"].items()}
        if volatile is not None and output_digest(hashes, volatile) != manifest["digest"]:
            raise Refused("its digest is not the one its files' sha256 give")
        total = sum(meta["size"] for meta in manifest["files"].values())
        if total > self.max_entry_size:
            raise Refused(f"its files add up to {total} bytes, over cache.remote_max_entry_size "
                          f"({self.max_entry_size}); raise that setting if the entry is expected to be this big")
        return manifest

    def download(self, stage_type: str, key: str, manifest: Mapping, dest: Path) -> dict[str, str] | None:
        """Every file of a checked manifest into `dest` (an empty folder), each read up to its declared
        size (one byte more shows a longer file) and checked against its sha256. Returns {relative
        path: sha256}, or None when the entry is refused (warned)."""
        hashes = {}
        for rel, meta in manifest["files"].items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                hashes[rel] = self._fetch(self._path(stage_type, key, OUT, rel), target, rel, meta)
            except Refused as e:
                return self._damaged(stage_type, key, str(e))
        return hashes

    def _fetch(self, remote: str, target: Path, rel: str, meta: Mapping) -> str:
        """One file, hashed as it is written; never more than its declared size + 1 byte is read."""
        fs, _ = self._fs()
        size, digest, done = meta["size"], hashlib.sha256(), 0
        try:
            # a block no bigger than the file should be: a remote back-end reads ahead a block at a time
            with fs.open(remote, "rb", block_size=min(size + 1, _CHUNK * 8)) as src, open(target, "xb") as out:
                while done <= size:
                    chunk = src.read(min(_CHUNK, size + 1 - done))
                    if not chunk:
                        break
                    done += len(chunk)
                    digest.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            raise Refused(f"{rel} is missing") from None
        except Exception as e:  # noqa: BLE001 - a back-end failure: warned, computed here
            raise self._error("read", e) from None
        if done != size:
            raise Refused(f"{rel} is {'longer' if done > size else 'shorter'} than its size in the manifest "
                          f"({size} bytes)")
        if digest.hexdigest() != meta["sha256"]:
            raise Refused(f"{rel} does not match its sha256 in the manifest")
        return digest.hexdigest()

    def _damaged(self, stage_type: str, key: str, why: str) -> None:
        log.warning("cache.remote: %s/%s refused: %s; computing it here", stage_type, key, why)
        return None

    # ---- writing -----------------------------------------------------------------------------
    def upload(self, entry: Path, stage_type: str, key: str) -> bool:
        """Upload a local entry (out/ and manifest.json, signed when a key is set); False if the remote
        has it already. An entry there whose manifest a reader would refuse (malformed, another key's,
        unsigned or wrongly signed with signing on) is replaced: a planted or broken entry must not
        block its key for good. One signed with another key is not (NotPushable): the pusher's key
        may be the wrong one, and overwriting the team's entries would be worse than skipping."""
        try:
            if self._checked_manifest(stage_type, key, None) is not None:
                return False
        except BadSignature as e:
            raise NotPushable(f"the entry in cache.remote is {e}; check {KEY_VARIABLE}, or delete that entry "
                              f"from the remote if nobody on the team pushed it") from None
        except Refused as e:
            log.warning("cache.remote: %s/%s there is refused (%s); replacing it", stage_type, key, e)
        manifest = json.loads((entry / MANIFEST).read_text())
        for rel in manifest["files"]:
            self._put(entry / OUT / rel, self._path(stage_type, key, OUT, rel))
        if self.signing_key is not None:
            manifest["signature"] = signature(manifest, stage_type, key, self.signing_key)
        data = json.dumps(manifest, indent=2, default=str).encode()
        self._put_bytes(data, self._path(stage_type, key, MANIFEST))  # last: the entry is now complete
        return True

    def _put(self, local: Path, remote: str) -> None:
        self._put_with(remote, lambda fs, tmp: fs.put_file(str(local), tmp))

    def _put_bytes(self, data: bytes, remote: str) -> None:
        self._put_with(remote, lambda fs, tmp: fs.pipe_file(tmp, data))

    def _put_with(self, remote: str, write: Any) -> None:
        """Write under a temp name, then move it to its name: a reader never sees half a file."""
        fs, _ = self._fs()
        tmp = f"{remote}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            parent = posixpath.dirname(remote)
            if parent not in self._made:
                fs.makedirs(parent, exist_ok=True)
                self._made.add(parent)
            write(fs, tmp)
            fs.mv(tmp, remote)
        except Exception as e:  # noqa: BLE001
            raise self._error("written", e) from None


class _RemoteFile(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # mtime_ns and ctime_ns: the pusher's, unused
    size: StrictInt = Field(ge=0)
    sha256: StrictStr = Field(pattern=_SHA256)


class _RemoteManifest(BaseModel):
    """What a reader relies on in a remote manifest; the rest (params, tools, seconds...) is a record."""

    model_config = ConfigDict(extra="allow", strict=True)
    files: dict[str, _RemoteFile]
    digest: StrictStr = Field(pattern=_SHA256)
    type: StrictStr | None = None
    key: StrictStr | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # read by runs and reports


def _check_manifest(manifest: dict, stage_type: str, key: str) -> None:
    """Refused unless the manifest has the shape a reader relies on, names each file the way a local
    listing would (relative, normalised, inside the entry, no file where another needs a folder),
    and is the manifest of this type and key (not another entry's copied here)."""
    try:
        checked = _RemoteManifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors()[0]
        raise Refused(f"its manifest is not valid ({'.'.join(str(p) for p in err['loc'])}: {err['msg']})") from None
    for rel in checked.files:
        why = _bad_name(rel)
        if why:
            raise Refused(f"its manifest names a file {rel!r}: {why}")
    for rel in checked.files:  # `zz` beside `zz/q`: one cannot be both a file and a folder
        parts = rel.split("/")
        clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in checked.files), None)
        if clash:
            raise Refused(f"its manifest names {clash!r} both as a file and as a folder")
    for field, expected in (("type", stage_type), ("key", key)):
        found = getattr(checked, field)
        if found is not None and found != expected:
            raise Refused(f"its manifest is the one of {field} {found!r}, not this entry's")


def _bad_name(rel: str) -> str | None:
    """Why a file name from a remote manifest cannot be an entry's file, or None."""
    if not rel or any(ord(c) < 32 or c == "\x7f" for c in rel):
        return "empty or with a control character"
    if rel.startswith("/"):
        return "absolute"
    if ".." in rel.split("/"):
        return "leaves the entry"
    if posixpath.normpath(rel) != rel or rel == ".":
        return "not normalised (a '.' part, a doubled or trailing '/')"
    return None


def _no_duplicate_names(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads keeps the last of two equal names silently; a manifest with both is refused."""
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise ValueError(f"the name {name!r} appears twice")
        seen.add(name)
    return dict(pairs)


def signature(manifest: Mapping, stage_type: str, key: str, signing_key: bytes) -> str:
    """HMAC-SHA256 of the canonical JSON of the manifest (its own signature left out) with the entry's
    type and key, so a signed manifest copied under another key does not verify."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    text = canonical_json({"format": SIGNATURE_FORMAT, "type": stage_type, "key": key, "manifest": body})
    return f"{SIGNATURE_FORMAT}:{hmac.new(signing_key, text.encode(), hashlib.sha256).hexdigest()}"


def _check_signature(manifest: Mapping, stage_type: str, key: str, signing_key: bytes) -> None:
    found = manifest.get("signature")
    if found is None:
        raise Refused(f"not signed (signing is on: {KEY_VARIABLE} is set); whoever pushed it has no key, "
                      f"or pushed before signing was on: push it again with the key")
    expected = signature(manifest, stage_type, key, signing_key)
    if not isinstance(found, str) or not hmac.compare_digest(found.encode(), expected.encode()):
        raise BadSignature(f"signed, but its signature does not verify with {KEY_VARIABLE} (signed with "
                           f"another key, or edited after signing)")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
