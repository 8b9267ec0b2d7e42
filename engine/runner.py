"""Plan and execute a validated pipeline against the cache."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from . import runs
from .cache import Cache, CorruptEntry, Hit, stage_key
from .config import StageSpec, config_key, validate
from .graph import Graph
from .runs import RunRecord, StageRecord
from .stage import Context, StageError

log = logging.getLogger("edgepipe")

# Distributions whose versions a manifest records when the stage imported them.
_TRACKED = {"torch": "torch", "torchvision": "torchvision", "pytorch_lightning": "pytorch-lightning",
            "onnx": "onnx", "onnxruntime": "onnxruntime", "ncnn": "ncnn", "pnnx": "pnnx",
            "rknn": "rknn-toolkit2", "numpy": "numpy", "PIL": "pillow", "sklearn": "scikit-learn"}


@dataclass
class Options:
    only: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)
    no_cache: bool = False
    keep_going: bool = False


@dataclass
class PlanItem:
    name: str
    type: str
    status: str  # cached | will run
    key: str | None
    reason: str


class Pipeline:
    """A composed config, validated, as a DAG over the cache."""

    def __init__(self, cfg: DictConfig, runs_root: Path) -> None:
        self.cfg = cfg
        self.runs_root = Path(runs_root)
        self.spec, self.stages = validate(cfg)
        self.graph = Graph(self.stages)
        self.cache = Cache(self.runs_root / "cache")

    # ------------------------------------------------------------------ plan (dry run)
    def plan(self, options: Options, run_name: str | None = None) -> list[PlanItem]:
        forced = self._forced(options)
        items: list[PlanItem] = []
        digests: dict[str, str | None] = {}
        for name in self.graph.select(options.only):
            st = self.stages[name]
            pending = [up for up in st.entry.needs.values() if digests.get(up) is None]
            if pending:
                digests[name] = None
                items.append(PlanItem(name, st.cls.name, "will run", None,
                                      f"input from {', '.join(pending)} is computed first"))
                continue
            key, material = stage_key(st.cls, st.params, self._input_digests(st, digests), self.cache.index)
            hit, damage = None, None
            if name not in forced:
                try:
                    hit = self.cache.lookup(st.cls.name, key)
                except CorruptEntry as e:
                    damage = str(e)
            if hit:
                digests[name] = hit.digest
                items.append(PlanItem(name, st.cls.name, "cached", key, "up to date"))
            else:
                digests[name] = None
                reason = ("forced" if name in forced else f"cache entry damaged: {damage}" if damage
                          else self.why(st, material, run_name))
                items.append(PlanItem(name, st.cls.name, "will run", key, reason))
        self.cache.index.save()
        return items

    def why(self, st: StageSpec, material: Mapping, run_name: str | None) -> str:
        """Which parameter or input changed since this stage last completed."""
        prev = runs.previous_record(self.runs_root, st.name, run_name)
        if prev is None or not prev.path:
            return "never ran"
        try:
            old = json.loads((Path(prev.path) / "manifest.json").read_text())
        except (OSError, ValueError):
            return f"previous output {prev.key} is no longer in the cache"
        changes = []
        if old.get("type") != material["type"]:
            changes.append(f"type {old.get('type')} -> {material['type']}")
        if old.get("version") != material["version"]:
            changes.append(f"stage version {old.get('version')} -> {material['version']}")
        old_p, new_p = runs.flat_metrics(old.get("params", {})), runs.flat_metrics(material["params"])
        for k in sorted(set(old_p) | set(new_p)):
            if old_p.get(k, "<unset>") != new_p.get(k, "<unset>"):
                changes.append(f"{config_key(st, k)}: {old_p.get(k, '<unset>')} -> {new_p.get(k, '<unset>')}")
        for k in sorted(set(old.get("inputs", {})) | set(material["inputs"])):
            if old.get("inputs", {}).get(k) != material["inputs"].get(k):
                changes.append(f"input '{k}' changed")
        for k in sorted(set(old.get("content", {})) | set(material["content"])):
            if old.get("content", {}).get(k) != material["content"].get(k):
                changes.append(f"content of {config_key(st, k)} changed")
        return "; ".join(changes) if changes else "no previous output with this key"

    # ------------------------------------------------------------------ execute
    def execute(self, record: RunRecord, options: Options, display: Any) -> RunRecord:
        forced = self._forced(options)
        order = self.graph.select(options.only)
        for name in order:
            record.stages[name] = StageRecord(name=name, type=self.stages[name].cls.name)
        record.save()
        failed: set[str] = set()
        for name in order:
            st, rec = self.stages[name], record.stages[name]
            blocked = [up for up in self.graph.upstream(name) if up in failed]
            if blocked:
                rec.status, rec.reason = "skipped", f"{', '.join(blocked)} failed"
                failed.add(name)
                display.finished(rec)
                continue
            if failed and not options.keep_going:
                rec.status, rec.reason = "skipped", "an earlier stage failed (use --keep-going to run independent branches)"
                display.finished(rec)
                continue
            self._run_stage(st, rec, record, name in forced, display)
            if rec.status == "failed":
                failed.add(name)
            else:
                runs.link_stage(Path(record.run_dir), name, Path(rec.path))
            record.save()
        self.cache.index.save()
        record.status = "failed" if failed else "ok"
        record.finished = time.time()
        record.headline = self._headline(record)
        record.save()
        runs.write_report(record)
        return record

    def _run_stage(self, st: StageSpec, rec: StageRecord, record: RunRecord, forced: bool, display: Any) -> None:
        digests = {i: record.stages[up].digest for i, up in st.entry.needs.items()}
        inputs = {i: Path(record.stages[up].path) for i, up in st.entry.needs.items()}
        key, material = stage_key(st.cls, st.params, digests, self.cache.index)
        rec.key = key
        t0 = time.time()
        display.started(rec)
        with self.cache.lock(st.cls.name, key, on_wait=lambda: display.update(rec.name, description="waiting for another process computing it")):
            hit: Hit | None = None
            if forced:
                rec.reason = "forced"
            else:
                try:
                    hit = self.cache.lookup(st.cls.name, key)
                except CorruptEntry as e:
                    log.warning("stage %s: cache entry damaged (%s); recomputing", st.name, e)
                    rec.reason = f"cache entry damaged: {e}"
            if hit:
                rec.status, rec.seconds = "cached", time.time() - t0
                rec.path, rec.digest, rec.metrics = str(hit.path), hit.digest, hit.manifest.get("metrics") or {}
                display.finished(rec)
                return
            rec.reason = rec.reason or self.why(st, material, record.name)
            tmp = self.cache.new_tmp(st.cls.name, key)
            ctx = Context(stage=st.name, out=tmp, log=logging.getLogger(f"edgepipe.stage.{st.name}"),
                          scratch=self.cache.root / ".scratch" / st.cls.name,
                          _progress=lambda c, t, d, i: display.update(rec.name, c, t, d, important=i))
            try:
                metrics = st.cls().run(st.params, inputs, tmp, ctx) or {}
            except BaseException as e:  # noqa: BLE001 - every failure is recorded, none leaves an entry
                # What the failed stage wrote (its logs above all) moves to the run folder, never
                # into the cache; messages that name a file in it are pointed at the new place.
                kept = Path(record.run_dir) / "failed" / st.name
                kept.parent.mkdir(exist_ok=True)
                if kept.exists():
                    shutil.rmtree(kept)
                shutil.move(str(tmp), kept)
                rec.status, rec.seconds = "failed", time.time() - t0
                rec.path = None
                if isinstance(e, StageError):
                    rec.error = str(e).replace(str(tmp), str(kept))
                    log.error("stage %s failed: %s", st.name, e)
                elif isinstance(e, Exception):
                    rec.error = f"{type(e).__name__}: {e}"
                    log.error("stage %s failed:\n%s", st.name, traceback.format_exc())
                else:  # KeyboardInterrupt / SystemExit: record and stop
                    rec.error = f"interrupted ({type(e).__name__})"
                    record.status, record.finished = "failed", time.time()
                    record.save()
                    raise
                display.finished(rec)
                return
            seconds = time.time() - t0
            manifest = {
                **material, "key": key, "stage": st.name, "seconds": round(seconds, 3),
                "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "libraries": _library_versions(),
            }
            hit = self.cache.publish(tmp, st.cls.name, key, manifest, volatile=st.cls.volatile_outputs)
        rec.status, rec.seconds = "ran", seconds
        rec.path, rec.digest, rec.metrics = str(hit.path), hit.digest, metrics
        display.finished(rec)

    # ------------------------------------------------------------------ helpers
    def _forced(self, options: Options) -> set[str]:
        if options.no_cache:
            return set(self.stages)
        self.graph.select(options.force, "--force")  # validates the names
        return set(options.force)

    @staticmethod
    def _input_digests(st: StageSpec, digests: Mapping[str, str | None]) -> dict[str, str]:
        return {i: digests[up] for i, up in st.entry.needs.items()}  # type: ignore[misc]

    def _headline(self, record: RunRecord) -> dict[str, Any] | None:
        wanted = self.spec.headline
        if wanted:
            stage, _, metric = wanted.partition(".")
            rec = record.stages.get(stage)
            value = runs.flat_metrics(rec.metrics).get(metric) if rec else None
            return {"key": wanted, "value": value} if value is not None else None
        for rec in reversed(list(record.stages.values())):
            for k, v in runs.flat_metrics(rec.metrics).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return {"key": f"{rec.name}.{k}", "value": v}
        return None


def _library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for module, dist in _TRACKED.items():
        if module in sys.modules:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return found

