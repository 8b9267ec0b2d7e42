"""`edgepipe gc`: remove cache entries that no run refers to, and scratch files unused for a week."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from engine.contract import names
from engine.store import runs
from engine.store.cache import Cache, entry_of, entry_size


def referenced_entries(runs_root: Path) -> set[str]:
    """Absolute paths of cache entries (the folder holding out/ and manifest.json) named by any run.json
    (any status) or linked from any run's stages/ folder: a run whose run.json was damaged still keeps
    its outputs."""
    keep: set[str] = set()
    for run_dir in runs.iter_runs(runs_root):
        links = run_dir / "stages"
        keep |= {str(entry_of(link.resolve())) for link in links.iterdir()} if links.is_dir() else set()
        try:
            record = runs.RunRecord.load(run_dir)
        except (OSError, runs.RunFolderError) as e:
            print(f"edgepipe: warning: {e}; keeping the entries its stages/ folder links to", file=sys.stderr)
            continue
        keep |= {str(entry_of(Path(rec.path).resolve())) for rec in record.stages.values() if rec.path}
    return keep


def collect(runs_root: Path, dry_run: bool = False) -> int:
    cache = Cache(Path(runs_root) / "cache")
    keep = referenced_entries(runs_root)
    removed, freed = 0, 0
    linked_out: set[str] = set()  # type folders that are links out of the cache: gc deletes nothing there
    for stage_type, key, path in list(cache.entries()):
        if str(path.resolve()) in keep or names.problem(key) or names.problem(stage_type):
            continue
        if not names.inside(path, cache.root):
            linked_out.add(stage_type)
            continue
        with cache.lock_if_free(stage_type, key) as free:
            if not free:  # an entry being written or read under lock right now is left alone
                continue
            size = entry_size(path)
            print(f"{'would remove' if dry_run else 'removed'} {stage_type}/{key} ({size / 1e6:.1f} MB)")
            if not dry_run:
                cache.discard(stage_type, key)
            removed += 1
            freed += size
    for stage_type in sorted(linked_out):
        print(f"edgepipe: warning: {cache.root / stage_type} is a link out of the cache "
              f"({(cache.root / stage_type).resolve()}); gc removes nothing there", file=sys.stderr)
    # Temp folders of killed runs (their key's lock is free) are garbage too.
    for tmp in sorted(cache.root.glob("*/.tmp/*")) if cache.root.is_dir() else []:
        key = tmp.name.split("-")[0] if not tmp.name.startswith("trash-") else tmp.name.split("-")[1]
        stage_type = tmp.parent.parent.name
        if names.problem(key) or names.problem(stage_type) or not names.inside(tmp, cache.root):
            continue  # not a temp folder of ours, or behind a link out of the cache
        with cache.lock_if_free(stage_type, key) as free:
            if not free:
                continue
            print(f"{'would remove' if dry_run else 'removed'} unfinished {tmp.relative_to(cache.root)}")
            if not dry_run:
                names.remove_tree(tmp, within=cache.root)
    verb = "would free" if dry_run else "freed"
    print(f"gc: {removed} unreferenced cache entries, {verb} {freed / 1e6:.1f} MB")
    n_scratch, scratch_bytes = collect_scratch(cache.root / ".scratch", dry_run)
    print(f"gc: {n_scratch} scratch files unused for {SCRATCH_DAYS} days, {verb} {scratch_bytes / 1e6:.1f} MB")
    return 0


SCRATCH_DAYS = 7


def collect_scratch(scratch: Path, dry_run: bool = False, days: float = SCRATCH_DAYS) -> tuple[int, int]:
    """Files of the stages' scratch folder (packs of kept decoded images, memoised report figures) not
    read or written for ``days`` (atime: relatime updates it once a day): they only spare work, and the
    dataset stage keeps a row for every file it ever decoded, so the folder would grow without end. A stage
    that finds one removed computes it again. Empty folders left behind go too."""
    cutoff, removed, freed = time.time() - days * 86400, 0, 0
    if not scratch.is_dir() or scratch.is_symlink():
        return 0, 0  # none, or a link out of the cache: gc deletes nothing there (os.walk follows no other)
    for folder, _, files in os.walk(scratch, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
                if max(st.st_atime, st.st_mtime) >= cutoff:
                    continue
                if not dry_run:
                    os.unlink(path)
            except OSError:  # removed by a running stage meanwhile
                continue
            removed, freed = removed + 1, freed + st.st_size
        if not dry_run and folder != str(scratch):
            try:
                os.rmdir(folder)  # only when empty
            except OSError:
                pass
    return removed, freed
