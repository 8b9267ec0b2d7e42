"""Plan and execute a validated pipeline against the cache."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config.dag import Graph
from engine.contract import names
from engine.report.run_report import write_report
from engine.store import runs
from engine.store.cache import Cache, CorruptEntry, Hit, library_versions, read_manifest, stage_key
from engine.store.runs import RunRecord, StageRecord

if TYPE_CHECKING:  # pydantic, and through it the stage contract, load only when a config is validated
    from omegaconf import DictConfig

    from engine.config.validate import StageSpec
    from engine.contract.stage import Stage
    from engine.run.plan_memo import Remembered

log = logging.getLogger("edgepipe")

@dataclass
class Options:
    only: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)
    no_cache: bool = False
    keep_going: bool = False
    jobs: int = 1  # stages run at the same time (scheduler.py); 1: one after another, in this process
    max_memory_mb: float | None = None  # the declared peak memory of stages running at once; None: a default


@dataclass
class PlanItem:
    name: str
    type: str
    status: str  # cached | will run
    key: str | None
    reason: str


class Pipeline:
    """A composed config, validated, as a DAG over the cache. Given what plan_memo remembered of
    the same config and code, it plans, and runs a fully cached pipeline, without validating; the
    first stage that misses the cache makes it validate (_validated) before it runs."""

    def __init__(self, cfg: DictConfig | Callable[[], DictConfig], runs_root: Path,
                 remembered: Remembered | None = None, cache_remote: str | None = None) -> None:
        """cfg: the composed config, or what makes it when first read (a remembered pipeline reads it
        only to validate); cache_remote: a remembered pipeline's cache.remote, resolved."""
        self._cfg = cfg
        self.runs_root = Path(runs_root)
        self.remembered = remembered is not None
        # what validators read besides the config (environment, distributions): plan_memo keeps it
        self.outside: dict | None = None
        if remembered is None:
            self.spec, self.stages = self._validate()
        else:
            self.spec, self.stages = remembered, remembered.stages
        self.graph = Graph(self.stages, check_wiring=not self.remembered)
        self._save_lock = threading.Lock()
        self._validate_lock = threading.Lock()
        # a remembered pipeline's cache section was checked: without a remote, nothing of engine/remote.py
        # (fsspec, pydantic) loads, nor is the config read
        remote = None if remembered is not None and not cache_remote else _remote(self.cfg)
        self.cache = Cache(self.runs_root / "cache", remote=remote)
        if remembered is not None:
            self.cache.versions.update(remembered.versions)

    @property
    def cfg(self) -> DictConfig:
        if callable(self._cfg):
            self._cfg = self._cfg()
        return self._cfg

    def validate_now(self) -> None:
        """Replace remembered stage specs by validated ones (the same keys: plan_memo's key holds
        everything validation reads)."""
        with self._validate_lock:
            if self.remembered:
                self.spec, self.stages = self._validate()
                self.graph = Graph(self.stages)
                self.remembered = False

    def _validate(self) -> tuple[Any, dict[str, StageSpec]]:
        from engine.config.validate import validate
        from engine.contract import fetching

        with fetching.recording() as outside:
            validated = validate(self.cfg)
        self.outside = outside.as_dict()
        return validated

    def _validated(self, name: str) -> StageSpec:
        self.validate_now()
        return self.stages[name]

    # ------------------------------------------------------------------ plan (dry run)
    def plan(self, options: Options, run_name: str | None = None) -> list[PlanItem]:
        forced = self.forced(options)
        self.cache.check_remote()
        items: list[PlanItem] = []
        digests: dict[str, str | None] = {}
        for name in self.graph.select(options.only):
            st = self.stages[name]
            pending = [up for up in st.entry.needs.values() if digests.get(up) is None]
            if pending:
                digests[name] = None
                items.append(PlanItem(name, st.type, "will run", None,
                                      f"input from {', '.join(pending)} is computed first"))
                continue
            key, material = stage_key(st.recipe, self._input_digests(st, digests), self.cache)
            hit, damage = None, None
            if name not in forced:
                try:
                    hit = self.cache.lookup(st.type, key, fetch=False, volatile=st.recipe.volatile,
                                            executes=st.recipe.executes)
                except CorruptEntry as e:
                    damage = str(e)
            if hit:
                digests[name] = hit.digest
                items.append(PlanItem(name, st.type, "cached", key,
                                      "in cache.remote (fetched when run)" if hit.remote_only else "up to date"))
            else:
                digests[name] = None
                reason = ("forced" if name in forced else f"cache entry damaged: {damage}" if damage
                          else self.why(st, material, run_name))
                items.append(PlanItem(name, st.type, "will run", key, reason))
        self.cache.index.save()
        return items

    def downloads(self, options: Options) -> list[tuple[str, str]]:
        """(URL, path) of each file a selected stage reads that is not here yet and that `run`
        downloads first: a content path with a published digest (stage.PublishedDigest)."""
        found: dict[str, str] = {}
        for name in self.graph.select(options.only):
            recipe = self.stages[name].recipe
            for field_path, published in recipe.published.items():
                path = recipe.content.get(field_path)
                if path is not None and not Path(path).exists():
                    found.setdefault(path, published["url"])
        return [(url, path) for path, url in found.items()]

    def why(self, st: StageSpec, material: Mapping, run_name: str | None) -> str:
        """Which parameter or input changed since this stage last completed."""
        from engine.errors import config_key

        prev = runs.previous_record(self.runs_root, st.name, run_name)
        if prev is None or not prev.path:
            return "never ran"
        try:
            old = read_manifest(Path(prev.path))
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
        old_t = old.get("tools", {})
        changes += [f"{t} {old_t.get(t, '<unset>')} -> {v}" for t, v in material["tools"].items() if old_t.get(t) != v]
        for k in sorted(set(old.get("inputs", {})) | set(material["inputs"])):
            if old.get("inputs", {}).get(k) != material["inputs"].get(k):
                changes.append(f"input '{k}' changed")
        for k in sorted(set(old.get("content", {})) | set(material["content"])):
            if old.get("content", {}).get(k) != material["content"].get(k):
                changes.append(f"content of {config_key(st, k)} changed")
        return "; ".join(changes) if changes else "no previous output with this key"

    # ------------------------------------------------------------------ execute
    def execute(self, record: RunRecord, options: Options, display: Any) -> RunRecord:
        forced = self.forced(options)
        self.cache.check_remote()
        order = self.graph.select(options.only)
        for name in order:
            record.stages[name] = StageRecord(name=name, type=self.stages[name].type)
        record.save()
        failed: set[str] = set()
        # failures that stop the run (without --keep-going); a Refusal does not: independent stages still run
        self._stopping: set[str] = set()

        def finished(name: str) -> None:
            rec = record.stages[name]
            if rec.status == "failed":
                failed.add(name)
            else:
                runs.link_stage(Path(record.run_dir), name, Path(rec.path))
            if rec.status != "cached":  # what ran is on disk at once; a cache hit is, with the final save
                self._save(record)

        if options.jobs <= 1:
            for name in order:
                if not self._skipped(name, record, failed, options, display):
                    self._run_stage(self.stages[name], record.stages[name], record, name in forced, display)
                    finished(name)
        else:
            self._execute_parallel(order, record, options, display, forced, failed, finished)
        self.cache.index.save()
        record.status = "failed" if failed else "ok"
        record.finished = time.time()
        record.headline = self._headline(record)
        record.save()
        write_report(record)
        return record

    def _skipped(self, name: str, record: RunRecord, failed: set[str], options: Options, display: Any) -> bool:
        """Record why `name` does not run (an upstream stage failed; without --keep-going, any stage)."""
        rec = record.stages[name]
        blocked = [up for up in self.graph.upstream(name) if up in failed]
        if blocked:
            rec.status, rec.reason = "skipped", f"{', '.join(blocked)} failed"
            failed.add(name)
        elif self._stopping and not options.keep_going:
            rec.status, rec.reason = "skipped", "an earlier stage failed (use --keep-going to run independent branches)"
        else:
            return False
        display.finished(rec)
        return True

    def _execute_parallel(self, order: list[str], record: RunRecord, options: Options, display: Any,
                          forced: set[str], failed: set[str], finished: Callable[[str], None]) -> None:
        """--jobs N: independent stages at the same time, each stage's `run` in a worker process.
        Stages already running when one fails (without --keep-going) finish; nothing new starts."""
        from engine.run import scheduler  # --jobs N only

        budget = options.max_memory_mb or scheduler.default_memory_mb()
        workers = scheduler.StageProcesses(
            options.jobs, on_progress=lambda n, c, t, d, i: display.update(n, c, t, d, important=i))
        try:
            scheduler.run_parallel(
                order, {n: self.graph.upstream(n) for n in order}, jobs=options.jobs, budget_mb=budget,
                memory_mb=lambda n: (st := self._validated(n)).cls.peak_memory(st.params),
                skip=lambda n: self._skipped(n, record, failed, options, display),
                start=lambda n: self._run_stage(self.stages[n], record.stages[n], record, n in forced, display,
                                                call=workers.call),
                finished=finished, interrupt=workers.stop_workers)
        finally:
            workers.close()

    def _save(self, record: RunRecord) -> None:
        with self._save_lock:  # stage threads and the scheduler both write run.json
            record.save()

    def _run_stage(self, st: StageSpec, rec: StageRecord, record: RunRecord, forced: bool, display: Any,
                   call: Callable[..., tuple[dict, dict[str, str]]] | None = None) -> None:
        """Look the stage up in the cache under its key's lock, else run it (`call`: in this process
        by default, scheduler.StageProcesses.call for --jobs N) and publish its outputs."""
        digests = {i: record.stages[up].digest for i, up in st.entry.needs.items()}
        inputs = {i: Path(record.stages[up].path) for i, up in st.entry.needs.items()}
        key, material = stage_key(st.recipe, digests, self.cache)
        rec.key = key
        t0 = time.time()
        display.started(rec)
        with self.cache.lock(st.type, key,
                             on_wait=lambda: display.update(rec.name,
                                                            description="waiting for another process computing it")):
            hit: Hit | None = None
            if forced:
                rec.reason = "forced"
            else:
                try:
                    hit = self.cache.lookup(st.type, key, volatile=st.recipe.volatile,
                                            executes=st.recipe.executes)
                except CorruptEntry as e:
                    log.warning("stage %s: cache entry damaged (%s); recomputing", st.name, e)
                    rec.reason = f"cache entry damaged: {e}"
            if hit:
                rec.status, rec.seconds = "cached", time.time() - t0
                rec.reason = "fetched from cache.remote" if hit.fetched else rec.reason
                rec.path, rec.digest, rec.metrics = str(hit.path), hit.digest, hit.manifest.get("metrics") or {}
                display.finished(rec)
                return
            st = self._validated(st.name)  # a miss runs code: the config is validated first
            rec.reason = rec.reason or self.why(st, material, record.name)
            tmp = self.cache.new_tmp(st.cls.name, key)
            context = dict(
                scratch=self.cache.root / ".scratch" / st.cls.name,
                content_digests=dict(material["content"]),
                sources={i: {"type": record.stages[up].type, "stage": up, "key": record.stages[up].key,
                             "digest": record.stages[up].digest} for i, up in st.entry.needs.items()})
            try:
                metrics, libraries = (call or _call_in_process)(st.cls, st.name, st.params, inputs, tmp, context,
                                                                display)
            except BaseException as e:  # every failure is recorded, none leaves an entry
                from engine.contract.stage import Refusal, StageError

                # What the failed stage wrote (its logs above all) moves to the run folder, never
                # into the cache; messages that name a file in it are pointed at the new place.
                failed_dir = Path(record.run_dir) / "failed"
                kept = names.join(failed_dir, st.name, what="stage name")
                failed_dir.mkdir(exist_ok=True)
                if names.remove_tree(kept, within=Path(record.run_dir)):
                    shutil.move(str(tmp), kept)
                else:  # failed/ is a link out of the run folder: nothing is deleted or written there
                    log.warning("%s leads out of the run folder; stage %s's files stay in %s", failed_dir, st.name, tmp)
                    kept = tmp
                rec.status, rec.seconds = "failed", time.time() - t0
                rec.path = None
                if not isinstance(e, Refusal):
                    self._stopping.add(st.name)
                if isinstance(e, StageError):
                    rec.error = str(e).replace(str(tmp), str(kept))
                    log.error("stage %s failed: %s", st.name, e)
                elif isinstance(e, Exception):
                    rec.error = f"{type(e).__name__}: {e}"
                    log.error("stage %s failed:\n%s", st.name, traceback.format_exc())
                else:  # KeyboardInterrupt / SystemExit: record and stop
                    rec.error = f"interrupted ({type(e).__name__})"
                    record.status, record.finished = "failed", time.time()
                    self._save(record)
                    raise
                display.finished(rec)
                return
            seconds = time.time() - t0
            manifest = {
                **material, "key": key, "stage": st.name, "seconds": round(seconds, 3),
                "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "libraries": libraries,
            }
            hit = self.cache.publish(tmp, st.cls.name, key, manifest, volatile=st.cls.volatile_outputs)
        rec.status, rec.seconds = "ran", seconds
        rec.path, rec.digest, rec.metrics = str(hit.path), hit.digest, metrics
        display.finished(rec)

    # ------------------------------------------------------------------ helpers
    def forced(self, options: Options) -> set[str]:
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


def _remote(cfg: DictConfig):
    """cache.remote's Remote, or None."""
    from engine.store import remote

    return remote.from_config(cfg)


def _call_in_process(cls: type[Stage], stage_name: str, params: Any, inputs: Mapping[str, Path], out: Path,
                     context: Mapping[str, Any], display: Any) -> tuple[dict, dict[str, str]]:
    """--jobs 1: the stage runs in this process. Returns (metrics, library versions)."""
    from engine.contract.stage import invoke

    metrics = invoke(cls, params, inputs, out, stage=stage_name, **context,
                     progress=lambda c, t, d, i: display.update(stage_name, c, t, d, important=i)) or {}
    return metrics, library_versions()

