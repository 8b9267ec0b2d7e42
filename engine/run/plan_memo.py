"""Validated pipelines remembered between commands, so that `plan` and a fully cached `run` of an
unchanged config import neither pydantic nor any stage's code: once the composed config comes from
engine/compose_cache.py, validating it is most of what is left of their time.

An entry is found by the composed config's key (compose_cache.Key: every config file's stats, the
overrides, the environment the configs name, the installed packages) and by the stats of every file
of edgepipe's own code (engine/, stages/, boards/); the code of a plugin's stage type (its top-level
package or module) is checked against the stats kept in the entry. It holds what validation gave
that a plan needs: each stage's type, wiring and cache.KeyRecipe, the headline, and the warnings
that were printed, and the environment variables and distribution versions validators read
(engine.contract.fetching: $TORCH_HOME and torchvision's version for weights by name), compared on
use. Nothing is remembered when a params field was computed from files (stage.FROM_FILES). A
remembered pipeline plans (and says why a stage would run) but runs nothing: before a stage runs,
runner.Pipeline validates the config for real.

Entries: compose_cache.folder()/validated/*.json, written atomically and sealed (compose_cache's
HMAC over the file name, which holds the compose key, and the content), the oldest pruned; a damaged,
unreadable, edited or copied one is a miss. So a hit is tied to the exact composed config it was
validated from: the compose key names the sealed compose entry that config came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import compose_cache
from engine.config.registry import PLUGINS_ENV
from engine.contract.fetching import Outside
from engine.contract.hashing import scan_files
from engine.contract.plugins import site_stats
from engine.store.cache import KeyRecipe, installed_versions

if TYPE_CHECKING:
    from engine.config.compose import Job

FORMAT = 4  # 2: what config_key reads; 3: tool versions; 4: published digests, what validators read outside
_OWN_PACKAGES = ("engine", "stages", "boards")  # the code validation runs


@dataclass
class Wiring:
    needs: dict[str, str]
    after: list[str]
    with_: dict


@dataclass
class RememberedStage:
    """What runner.Pipeline reads of a config.StageSpec while planning (config_key's too: a plan
    says which config key changed without validating)."""

    name: str
    type: str
    entry: Wiring
    recipe: KeyRecipe
    section: str
    sections: dict[str, str]


@dataclass
class Remembered:
    """Stands for config.validate's (PipelineSpec, {name: StageSpec}) in runner.Pipeline."""

    stages: dict[str, RememberedStage]
    headline: str | None
    headline_direction: str | None
    warnings: list[str]
    versions: dict[str, str]  # the stages' tool versions, while no folder of sys.path changed


def load(job: Job) -> Remembered | None:
    path = _entry(job)
    if path is None:
        return None
    try:
        text = compose_cache.read_entry(path)  # sealed: an edited or copied memo is a miss
        if text is None:
            return None
        data = json.loads(text)
        if data["format"] != FORMAT:
            return None
        if any(_code_stats(Path(root)) != stats for root, stats in data["plugins"].items()):
            return None
        site_unchanged = data["site"] == site_stats()  # no install since: the versions are those read then
        if not Outside.unchanged(data["outside"], installs_changed=not site_unchanged):
            return None  # another $TORCH_HOME, torchvision: validated again
        stages = {name: RememberedStage(name, s["type"], Wiring(**s["entry"]), KeyRecipe(**s["recipe"]),
                                        s["section"], s["sections"]) for name, s in data["stages"].items()}
        # validation refuses a content path that does not exist (one line, before runs/ is touched):
        # a dataset folder removed since is validated again, not planned as changed content
        if not all(os.path.exists(path) for s in stages.values() for path in s.recipe.content.values()):
            return None
        versions = data["versions"] if site_unchanged else {}
        return Remembered(stages, data["headline"], data["headline_direction"], list(data["warnings"]), versions)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a damaged entry is a miss
        return None


def store(job: Job, pipeline: Any, warnings: list[str]) -> None:  # an engine.run.pipeline.Pipeline
    """Remember the validated pipeline of job, when it can be (see the module's docstring)."""
    path = _entry(job)
    specs = pipeline.stages
    if path is None or pipeline.outside is None or any(s.recipe.from_files for s in specs.values()):
        return
    roots = {_plugin_root(s.cls) for s in specs.values()}
    if "unknown" in roots:  # code whose files cannot be named cannot be checked
        return
    plugins = sorted(root for root in roots if isinstance(root, Path))
    site = site_stats()  # before reading versions: an install in between is then a miss, not stale
    versions = installed_versions({tool for s in specs.values() for tool in s.recipe.tools}, pipeline.cache.versions)
    data = {"format": FORMAT, "plugins": {str(root): _code_stats(root) for root in plugins},
            "site": site, "versions": versions, "outside": pipeline.outside,
            "headline": pipeline.spec.headline,
            "headline_direction": pipeline.spec.headline_direction, "warnings": warnings,
            "stages": {name: {"type": s.type, "recipe": asdict(s.recipe), "section": s.section,
                              "sections": dict(s.sections),
                              "entry": {"needs": dict(s.entry.needs), "after": list(s.entry.after),
                                        "with_": dict(s.entry.with_)}}
                       for name, s in specs.items()}}
    try:
        compose_cache.write_entry(path, json.dumps(data, allow_nan=False))
    except (OSError, TypeError, ValueError):  # a read-only home, a value JSON cannot hold: not kept
        return
    compose_cache.prune(path.parent)


def _entry(job: Job) -> Path | None:
    where = compose_cache.folder()
    if where is None or job.digest is None:
        return None
    return where / "validated" / f"{job.digest}-{_code_digest()}.json"


def _code_digest() -> str:
    """Stats of every file of the packages whose code validates, and where Python finds the modules
    that register stage types (another $EDGEPIPE_PLUGINS or sys.path may name another class)."""
    root = Path(__file__).resolve().parents[2]
    found_by = json.dumps([os.environ.get(PLUGINS_ENV, ""), sys.path])
    stats = "".join(_code_stats(root / package) for package in _OWN_PACKAGES)
    return hashlib.sha256((found_by + stats).encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _code_stats(root: Path) -> str:
    """A digest of the name, size, mtime, ctime and inode of root (a module) or of every file under it
    (a package; not its bytecode caches)."""
    if root.is_file():
        files = [("", root.stat())]
    else:
        files = [(rel, st) for rel, st in scan_files(root) if "__pycache__/" not in rel]
    h = hashlib.sha256(str(root).encode("utf-8", "surrogateescape"))
    for rel, st in files:
        h.update(f"{rel}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n"
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _plugin_root(cls: type) -> Path | str | None:
    """The folder of the top-level package (or the file of the module) a stage type outside
    edgepipe's own packages comes from; None for edgepipe's own, "unknown" for a module without a
    file (a namespace package, a module made in memory)."""
    top = cls.__module__.split(".")[0]
    if top in _OWN_PACKAGES:
        return None
    file = getattr(sys.modules.get(top), "__file__", None)
    if not file:
        return "unknown"
    path = Path(file).resolve()
    return path.parent if path.name == "__init__.py" else path


