"""Digests of files, folders and JSON values; the (path, size, mtime) index that spares re-reading
unchanged dataset files."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

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


def list_files(root: Path, on_loop: Callable[[Path], None] | None = None) -> list[str]:
    """Every regular file under root as a POSIX relative path, sorted. Symlinks are followed, to files
    and to folders, so the content behind a linked folder counts like any other. A link back to a
    folder it sits in (a loop) is not entered: everything behind it is listed already; ``on_loop``
    gets its path."""
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
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append((folder / entry.name, f"{rel}{entry.name}/", ancestors | {real}))
                elif entry.is_file():
                    found.append(rel + entry.name)
            except OSError:  # a dangling or unreadable link
                continue
    return sorted(found)


def matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)


def tree_digest(files: Mapping[str, str]) -> str:
    """Digest of a set of files given as {relative path: sha256}."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


class ContentIndex:
    """Remembers sha256 by (absolute path, size, mtime_ns, inode, device) so a dataset folder whose
    files did not change is hashed without reading them. Stored as one JSON file; a damaged index is
    ignored. The stat follows symlinks: a link pointed at another file misses by the target's inode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def sha256(self, path: Path, key: str | None = None) -> str:
        """``key``: the absolute path the entry is stored under (default: path resolved; a folder's
        files pass their resolved folder + relative path, sparing a resolve per file)."""
        st = os.stat(path)
        key = key or str(Path(path).resolve())
        hit = self._load().get(key)
        if hit and hit[:2] == [st.st_size, st.st_mtime_ns] and hit[3:] == [st.st_ino, st.st_dev]:
            return hit[2]
        digest = sha256_file(path)
        self._load()[key] = [st.st_size, st.st_mtime_ns, digest, st.st_ino, st.st_dev]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.path)
        self._dirty = False


def content_digest(path: Path, index: ContentIndex) -> str:
    """Digest of a file's or a folder's content (names and bytes, not timestamps)."""
    path = Path(path)
    if path.is_dir():
        real = path.resolve()
        return tree_digest({rel: index.sha256(path / rel, key=f"{real}/{rel}") for rel in list_files(path)})
    if path.is_file():
        return index.sha256(path)
    raise FileNotFoundError(path)
