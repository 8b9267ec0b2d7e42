"""Pretrained weights by name: ``model.pretrained: imagenet`` (or one of torchvision's weight names,
``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``DEFAULT``) resolved through torchvision's weights API.

The file lives where torchvision keeps it, ``torch.hub.get_dir()/checkpoints/<file name of the
weights' URL>`` (``$TORCH_HOME/hub/checkpoints``), shared with every other torchvision user. It is
downloaded once, by ``run`` while it validates the config (engine/fetching.py), with torch.hub's
download and the sha256 prefix torchvision publishes in the file name checked; ``plan`` never
downloads. ``$EDGEPIPE_WEIGHTS_MIRROR`` replaces the base URL (``https://mirror/models/`` or
``file:///dir/``); the file name and the hash stay torchvision's, so a mirror serving other bytes is
refused and nothing is left in the hub cache. A file found in the hub cache is used as torchvision
uses it; the stage that loads it warns when its digest is not the published one.

What a name resolves to (torchvision's weights name, URL and published sha256 prefix) is kept in the
engine's sealed memo (engine.contract.fetching.remember), keyed by the installed torchvision version
(its metadata, nothing imported), the model and the name; the hub folder is torch.hub's rule on
$TORCH_HOME / $XDG_CACHE_HOME, read here. So torchvision is imported only the first time a name is
resolved with a given torchvision (never when ``model.pretrained`` is a path), and `plan` and a cached
`run` of an experiment with weights by name import neither torch nor torchvision. ``plan`` before the
download names the file: the published prefix stands for it in the key (stage.PublishedDigest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.contract import fetching
from stages.common.errors import WeightsChanged as WeightsChanged  # re-exported: raised here
from stages.common.errors import WeightsError
from stages.common.errors import WeightsUnavailable as WeightsUnavailable  # re-exported: raised here

MIRROR_ENV = "EDGEPIPE_WEIGHTS_MIRROR"
# torch.hub's HASH_REGEX: torchvision's file names end in -<sha256 prefix>.pth
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
# torchvision's enum member names; "imagenet" is ours for DEFAULT (its best ImageNet weights)
_MEMBER = re.compile(r"[A-Z][A-Z0-9_]*")
ALIASES = {"imagenet": "DEFAULT"}
_MEMO_FORMAT = 1  # what a remembered resolution holds


def is_weights_name(value: object) -> bool:
    """A name torchvision's weights API resolves, as opposed to a path: ``imagenet`` or an enum member
    name (a file really called so is given as ``./imagenet``)."""
    text = str(value) if value is not None else ""
    return text.lower() in ALIASES or bool(_MEMBER.fullmatch(text))


@dataclass(frozen=True)
class PublishedWeights:
    """One member of a torchvision weights enum and where its file lives here."""

    name: str  # "ResNet18_Weights.IMAGENET1K_V1": what enters the cache key beside the file's digest
    url: str  # torchvision's own
    path: Path  # torch.hub.get_dir()/checkpoints/<file name>

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def sha256_prefix(self) -> str:
        """The sha256 prefix torchvision publishes in the file name ("" when it carries none)."""
        found = _HASH_IN_NAME.search(os.path.basename(self.url))
        return found.group(1) if found else ""

    def source_url(self) -> str:
        """The URL to download from: the mirror's when $EDGEPIPE_WEIGHTS_MIRROR is set."""
        mirror = (fetching.environ(MIRROR_ENV) or "").strip()
        return f"{mirror.rstrip('/')}/{self.file_name}" if mirror else self.url


def torchvision_model_name(arch: str, depth: int = 18) -> str:
    """The torchvision builder whose weights an architecture of the zoo loads (gem_resnet: the ResNet
    of its depth; GeM's p has no weights and keeps its initial value)."""
    return f"resnet{depth}" if arch == "gem_resnet" else arch


def published(arch: str, name: str, depth: int = 18) -> PublishedWeights:
    """torchvision's weights ``name`` for ``arch`` (ValueError naming what exists when there are none),
    from the memo when this torchvision resolved it before."""
    model = torchvision_model_name(arch, depth)
    version = fetching.distribution("torchvision")
    memo = hashlib.sha256(json.dumps([_MEMO_FORMAT, "torchvision-weights", version, model, name]).encode()).hexdigest()
    try:
        kept = json.loads(fetching.remembered(memo[:40]) or "null")
        resolved = (kept["name"], kept["url"]) if kept and kept["model"] == model and kept["given"] == name else None
    except (ValueError, KeyError, TypeError):  # sealed, so ours: only an older shape can get here
        resolved = None
    if resolved is None:
        resolved = _resolve(model, name)
        if version is not None:
            fetching.remember(memo[:40], json.dumps({"model": model, "given": name, "name": resolved[0],
                                                     "url": resolved[1], "torchvision": version}))
    weights_name, url = resolved
    return PublishedWeights(weights_name, url, hub_dir() / "checkpoints" / os.path.basename(url))


def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, $TORCH_HOME defaulting to
    $XDG_CACHE_HOME/torch, that to ~/.cache (read through fetching, so a remembered plan follows them)."""
    home = fetching.environ("TORCH_HOME")
    if home is None:
        home = os.path.join(fetching.environ("XDG_CACHE_HOME") or "~/.cache", "torch")
    if home.startswith("~"):
        fetching.environ("HOME")
    return Path(os.path.expanduser(home)) / "hub"


def _resolve(model: str, name: str) -> tuple[str, str]:
    """(weights name, URL) through torchvision's weights API: imports torchvision."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(model)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision publishes no weights for {model}") from None
    member = ALIASES.get(name.lower(), name)
    try:
        weights = enum[member]
    except KeyError:
        known = ", ".join(["imagenet", "DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT")])
        raise ValueError(f"{name!r} is not one of torchvision's weights for {model}: {known}, or a file path") from None
    return f"{enum.__name__}.{weights.name}", weights.url


def categories(weights_name: str) -> list[str]:
    """The class names torchvision publishes for its weights (ImageNet's 1000): a head trained on them
    is not a head for anyone's dataset, whatever its row count, so a finetune re-initialises it."""
    from torchvision.models import get_weight

    return list(get_weight(weights_name).meta.get("categories") or [])


def ensure(weights: PublishedWeights, key: str) -> Path:
    """The weights' file in the hub cache: there already, or downloaded now when this command may
    fetch (``run``). Under any other command (``plan``) the path of a file not there yet: its
    published digest stands for it in the key, and the plan says ``run`` downloads it. ``key`` is the
    config setting named in messages (``model.pretrained=imagenet``)."""
    if weights.path.is_file() or not fetching.allowed():
        return weights.path
    url = weights.source_url()
    try:
        with _transient_note(f"edgepipe: {key}: downloading {url} -> {weights.path}"):
            download_verified(url, weights.path)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e  # urllib's URLError: the reason alone
        raise WeightsUnavailable(
            f"{key}: cannot fetch {weights.name} from {url} ({reason}); put the file there by hand: {weights.path} "
            f"(or set {MIRROR_ENV} to a base URL or file:///folder/ holding {weights.file_name})") from None
    return weights.path


@contextlib.contextmanager
def _transient_note(text: str) -> Iterator[None]:
    """A line shown on a terminal while a download runs, wiped when it ends: a failure is one line."""
    shown = sys.stderr.isatty()
    if shown:
        print(text, end="", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def download_verified(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` with torch.hub (a temp file renamed into place whole), checking that
    the content's sha256 starts with the prefix the URL's file name carries (torchvision's naming);
    a file with other content is refused (ValueError) and nothing is left at ``dest``."""
    from torch.hub import download_url_to_file

    found = _HASH_IN_NAME.search(os.path.basename(url))
    if not found or not found.group(1):
        raise ValueError(f"{os.path.basename(url)} carries no sha256 prefix (torchvision's names end in -<hash>.pth)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(dest), hash_prefix=found.group(1), progress=False)
    except RuntimeError as e:
        if "invalid hash" not in str(e):
            raise OSError(str(e)) from None
        raise ValueError(f"refused: its sha256 does not start with torchvision's published {found.group(1)}; "
                         f"nothing was kept in {dest.parent}") from None
    return dest


def read_keyed_file(path: Path, keyed: str | None) -> tuple[bytes, str]:
    """(the bytes of the file at ``path``, their sha256), read once and checked against the digest the
    stage's cache key holds for it (``keyed``: Context.content_digests; None outside a pipeline: nothing
    to check). Load these bytes, never the path again, so that a file swapped after the check is not what
    gets loaded under the key. A file that no longer has those bytes -- the key rests on torchvision's
    published prefix and the file does not start with it, or on another sha256 -- changed after the key
    was made: WeightsChanged, never outputs stored under a key that names other weights. A file that
    cannot be read (removed since the plan, a folder): WeightsError, one line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    digest = hashlib.sha256(data).hexdigest()
    if keyed is not None:
        published = keyed.removeprefix("published-sha256:") if keyed.startswith("published-sha256:") else None
        if not (digest == keyed or (published is not None and digest.startswith(published))):
            held = f"torchvision's published hash {published}" if published is not None else f"sha256 {keyed[:12]}"
            raise WeightsChanged(f"{path} changed after this run keyed it by {held} (its sha256 is now "
                                 f"{digest[:12]}): run again to key the stage by the file as it is")
    return data, digest


def published_hash_mismatch(path: Path, digest: str | None = None) -> str | None:
    """One warning line when a torchvision-named file's sha256 (``digest``, computed when not given)
    does not start with the prefix in its name (a file placed by hand, e.g. the tests' own backbones:
    the key holds its own digest), else None."""
    found = _HASH_IN_NAME.search(path.name)
    if not found or not found.group(1):
        return None
    if digest is None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest.startswith(found.group(1)):
        return None
    return (f"{path} does not match torchvision's published hash {found.group(1)}: not torchvision's own file "
            f"(used as it is)")
