"""Digests of files, folders and JSON values; the content index (sqlite: each file's digest by its
stat, each folder's by its listing) that spares re-reading unchanged dataset files."""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import hashlib
import json
import os
import sqlite3
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import itemgetter
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text, so equal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def list_files(root: Path, on_loop: Callable[[Path], None] | None = None,
               on_other: Callable[[str], None] | None = None) -> list[str]:
    """Every regular file under root as a POSIX relative path, sorted. Symlinks are followed, to files
    and to folders, so the content behind a linked folder counts like any other. A link back to a
    folder it sits in (a loop) is not entered: everything behind it is listed already; ``on_loop``
    gets its path. ``on_other`` gets the relative path of what is neither listed nor entered (a
    dangling link, a FIFO, a socket, a device) and of every empty folder below root."""
    return [rel for rel, _ in scan_files(root, on_loop, stat=False, on_other=on_other)]


def scan_files(root: Path, on_loop: Callable[[Path], None] | None = None, stat: bool = True,
               on_other: Callable[[str], None] | None = None) -> list[tuple[str, os.stat_result | None]]:
    """list_files' listing as (relative path, stat with symlinks followed), sorted: one os.scandir
    per folder and one stat per file, no path resolved per file (root/rel is the file's path)."""
    with _no_gc():
        return _scan(root, on_loop, stat, on_other)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """100,000 new tuples would start collections that walk every object (~10 % of a scan)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _scan(root: Path, on_loop: Callable[[Path], None] | None, stat: bool,
          on_other: Callable[[str], None] | None = None) -> list[tuple[str, os.stat_result | None]]:
    found = []
    stack: list[tuple[Path, str, frozenset[str]]] = [(Path(root), "", frozenset())]
    while stack:
        folder, rel, ancestors = stack.pop()
        real = os.path.realpath(folder)
        if real in ancestors:
            if on_loop is not None:
                on_loop(folder)
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folder: as os.walk, list what can be read
            continue
        if not entries and rel and on_other is not None:
            on_other(rel[:-1])
        for entry in entries:
            try:
                if entry.is_file():  # first: the common case, one call per file
                    found.append((rel + entry.name, entry.stat() if stat else None))
                elif entry.is_dir():
                    stack.append((folder / entry.name, f"{rel}{entry.name}/", ancestors | {real}))
                elif on_other is not None:  # a dangling link, a FIFO, a socket, a device
                    on_other(rel + entry.name)
            except OSError:  # an unreadable link
                if on_other is not None:
                    on_other(rel + entry.name)
                continue
    found.sort(key=itemgetter(0))
    return found


def matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)


def tree_digest(files: Mapping[str, str]) -> str:
    """Digest of a set of files given as {relative path: sha256}."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


class ContentIndex:
    """Remembers each file's sha256 by its stat (size, mtime_ns, inode, device: symlinks followed, so
    a link pointed at another file misses by the target's inode), and each folder's tree digest by a
    digest of its listing (every file's relative path and stat), so a folder whose files did not
    change costs one scan and one row (what makes `plan` on 100,000 files fast), and a changed file
    costs its own hash. An sqlite file; a damaged one is replaced with a warning. Nothing is written
    until ``save``."""

    def __init__(self, path: Path) -> None:
        # An index named .json (the format before sqlite) is kept beside it as .sqlite; the old file is removed
        self.path = Path(path).with_suffix(".sqlite")
        self._old = Path(path) if Path(path).suffix == ".json" else None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, possibly used from a runner's threads
        self._files: dict[str, tuple[str, str] | None] = {}  # path -> (stat, sha256); None: remove
        self._trees: dict[str, tuple[str, str]] = {}  # folder -> (listing digest, tree digest)

    # ---- storage -----------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple) -> list[tuple]:
        """Rows of a read; none when there is no index yet or it is damaged (warned once)."""
        with self._lock:
            try:
                if self._db is None:
                    if not self.path.is_file():
                        return []
                    self._db = self._connect()
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                self._damaged(e)
                return []

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.executescript(_SCHEMA)
        return db

    def _damaged(self, e: Exception) -> None:
        print(f"edgepipe: warning: the content index {self.path} is damaged ({e}); rebuilding it "
              f"(unchanged files are hashed once more)", file=sys.stderr)
        if self._db is not None:
            self._db.close()
        self._db = None
        for p in (self.path, Path(f"{self.path}-journal"), Path(f"{self.path}-wal")):
            p.unlink(missing_ok=True)

    def save(self) -> None:
        if not (self._files or self._trees):
            return
        for attempt in (1, 2):
            with self._lock:
                try:
                    self._write()
                    break
                except sqlite3.OperationalError as e:  # locked past the timeout: the next run hashes again
                    if "locked" in str(e) or attempt == 2:
                        print(f"edgepipe: warning: content index {self.path} not updated: {e}", file=sys.stderr)
                        break
                    self._damaged(e)
                except sqlite3.DatabaseError as e:
                    self._damaged(e)
                except OSError as e:  # a read-only or full disk costs the speed-up, not the run
                    print(f"edgepipe: warning: content index {self.path} not updated: {e}", file=sys.stderr)
                    break
        self._files.clear()
        self._trees.clear()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._old is not None:
            self._old.unlink(missing_ok=True)
        if self._db is None:
            self._db = self._connect()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = [(p,) for p, row in self._files.items() if row is None]
            db.executemany("DELETE FROM files WHERE path = ?", gone)
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)",
                           [(p, *row) for p, row in self._files.items() if row is not None])
            db.executemany("INSERT OR REPLACE INTO trees VALUES (?, ?, ?)",
                           [(f, *row) for f, row in self._trees.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # ---- lookups -----------------------------------------------------------------------------
    def _known(self, key: str) -> tuple[str, str] | None:
        if key in self._files:
            return self._files[key]
        rows = self._query("SELECT stat, sha256 FROM files WHERE path = ?", (key,))
        return rows[0] if rows else None

    def sha256(self, path: Path, key: str | None = None) -> str:
        """``key``: the absolute path the entry is stored under (default: path resolved)."""
        st = os.stat(path)
        key = key or str(Path(path).resolve())
        sig = signature(st)
        hit = self._known(key)
        if hit and hit[0] == sig:
            return hit[1]
        digest = sha256_file(path)
        self._files[key] = (sig, digest)
        return digest

    def recorded(self) -> dict[str, tuple[str, str]]:
        """Every file entry, {absolute path: (stat signature, sha256)}: one query, for a caller that
        looks up many files (the dataset stage's own index of its sources)."""
        found = {p: (sig, d) for p, sig, d in self._query("SELECT path, stat, sha256 FROM files", ())}
        found.update({p: row for p, row in self._files.items() if row is not None})
        return found

    def record(self, key: str, sig: str, digest: str) -> None:
        """Remember ``digest`` for the file at absolute path ``key`` while its stat is ``sig``
        (``signature`` of the stat taken before the file was read)."""
        self._files[key] = (sig, digest)

    def folder_digest(self, folder: Path) -> str:
        """tree_digest of the folder's files (list_files' listing): one stat per file; the files are
        read only when their stat is not the one their digest was recorded under."""
        with _no_gc():
            return self._folder_digest(folder)

    def _folder_digest(self, folder: Path) -> str:
        real = os.path.realpath(folder)
        listing = scan_files(folder)
        listed = listing_digest(listing)
        tree = self._trees.get(real) or next(iter(self._query(
            "SELECT listing, digest FROM trees WHERE folder = ?", (real,))), None)
        if tree is not None and tree[0] == listed:
            return tree[1]
        prefix = f"{real}/"
        known = {p[len(prefix):]: (s, d) for p, s, d in self._query(
            "SELECT path, stat, sha256 FROM files WHERE path >= ? AND path < ?", (prefix, f"{real}0"))}
        digests = {}
        for rel, st in listing:
            sig = signature(st)
            hit = self._files.get(prefix + rel) or known.get(rel)
            if hit and hit[0] == sig:
                digests[rel] = hit[1]
            else:
                digests[rel] = sha256_file(os.path.join(folder, rel))
                self._files[prefix + rel] = (sig, digests[rel])
        for rel in known.keys() - digests.keys():  # deleted files leave the index
            self._files[prefix + rel] = None
        digest = tree_digest(digests)
        self._trees[real] = (listed, digest)
        return digest


def listing_digest(listing: list[tuple[str, os.stat_result]]) -> str:
    """sha256 of a scan_files listing: every relative path, size, inode, device, mtime_ns and ctime_ns
    (a file rewritten in place with its old mtime put back still moves its ctime). Packed
    as arrays in one pass rather than one string per file: on 100,000 files this is most of an
    unchanged plan after the stats themselves."""
    unsigned, times = array("Q"), array("q")  # mtime_ns may be negative (before 1970)
    add, add_times = unsigned.extend, times.extend
    for _, st in listing:
        add((st.st_size, st.st_ino, st.st_dev))
        add_times((st.st_mtime_ns, st.st_ctime_ns))
    h = hashlib.sha256("\0".join([rel for rel, _ in listing]).encode("utf-8", "surrogateescape"))
    h.update(unsigned.tobytes())
    h.update(times.tobytes())
    return h.hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT NOT NULL, sha256 TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trees (folder TEXT PRIMARY KEY, listing TEXT NOT NULL, digest TEXT NOT NULL) WITHOUT ROWID;
"""


def signature(st: os.stat_result) -> str:
    """What a file's recorded digest is valid for (text: an inode may not fit sqlite's 64-bit integer).
    ctime too: `touch -r` puts an old mtime back on a rewritten file, but nothing sets ctime back."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def content_digest(path: Path, index: ContentIndex) -> str:
    """Digest of a file's or a folder's content (names and bytes, not timestamps)."""
    path = Path(path)
    if path.is_dir():
        return index.folder_digest(path)
    if path.is_file():
        return index.sha256(path)
    raise FileNotFoundError(path)
