"""`edgepipe push` and `edgepipe pull`: a run's cache entries to the shared remote cache, and what a
plan needs from it (engine.store.remote is the transport and its checks)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from engine.contract import names
from engine.store.cache import MANIFEST, OUT, Cache, CorruptEntry, entry_of, stage_key
from engine.store.remote import NotPushable, Remote

log = logging.getLogger("edgepipe")


def push(record: Any, cache: Cache, remote: Remote) -> int:
    """`edgepipe push`: upload the entries a run used (a RunRecord), each once. Returns the exit status."""
    remote.check()
    done = {"uploaded": 0, "already in cache.remote": 0, "skipped": 0}
    seen: set[tuple[str, str]] = set()  # two stages of a run can share an entry (same type, same key)
    for rec in record.stages.values():
        if not rec.path or not rec.key or rec.status not in ("ran", "cached") or (rec.type, rec.key) in seen:
            continue
        seen.add((rec.type, rec.key))
        why = names.problem(rec.type) or names.problem(rec.key)
        # What is pushed is the cache's own entry of that type and key, whatever run.json says its path is
        entry = cache.entry(rec.type, rec.key) if not why else None
        if entry is None or os.path.realpath(entry_of(Path(rec.path))) != os.path.realpath(entry):
            print(f"{rec.name}: not pushed: run.json names {rec.type}/{rec.key} at {rec.path}, which is not "
                  f"that entry of the cache ({why or 'another folder'})")
            done["skipped"] += 1
            continue
        with cache.lock(rec.type, rec.key):  # gc leaves it alone meanwhile
            why = _unpushable(entry)
            if why:
                print(f"{rec.name}: not pushed: {why}")
                done["skipped"] += 1
                continue
            try:
                status = "uploaded" if remote.upload(entry, rec.type, rec.key) else "already in cache.remote"
            except NotPushable as e:
                print(f"{rec.name}: not pushed: {e}")
                done["skipped"] += 1
                continue
        print(f"{rec.name}: {status} ({rec.type}/{rec.key[:10]})")
        done[status] += 1
    print("push: " + ", ".join(f"{n} {what}" for what, n in done.items()) + f" ({remote.url})")
    return 1 if done["skipped"] else 0


def _unpushable(entry: Path) -> str | None:
    """Why a local entry cannot be pushed: gone, from an older layout, or damaged."""
    if not (entry / OUT).is_dir() or not (entry / MANIFEST).is_file():
        return (f"{entry} is not in the local cache (removed by gc, or made before manifests moved beside out/; "
                "re-run it)")
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
        from engine.errors import ConfigError

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
                hit = cache.lookup(st.cls.name, key, volatile=st.recipe.volatile,
                                   executes=st.recipe.executes)
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
