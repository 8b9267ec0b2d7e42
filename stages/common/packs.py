"""Decoded images on disk, a pack file per decoding task: the dataset stage's workers write the rows
they decode into packs, and the stage copies each split's ``images_{split}.npy`` out of them.

A pack is ``MAGIC``, the number of rows, the bytes per row, a 32-byte digest per row (the sha256 of
the source file's bytes), then the rows. It is written under ``.tmp/<pid>/`` and renamed into its
folder, so a pack that is there is whole, and it names its own rows: a store's index is the headers
of its packs, with no second file to keep in step (a killed run leaves whole packs and nothing
else). One file per task, not one per image: creating a file cost ~0.5 ms of kernel time per image
here, and two workers creating files at once slowed each other. The rows are written once: the split
arrays are copied from the packs by the kernel (``os.copy_file_range``).

Imports numpy and the standard library only: decoding workers import this module.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stages.common.errors import StoreError as StoreError  # re-exported: raised here

MAGIC = b"EDGEPACK"
HEADER = struct.Struct("<8sII")  # magic, rows, bytes per row
DIGEST_BYTES = 32
SUFFIX = ".pack"
_COPY_BYTES = 4 << 20  # the most one copy (or one write of gathered rows) moves
_OPEN_PACKS = 64  # descriptors kept open while copying (rows come in pack order, mostly)
_READ_PACKS = 8  # whole packs kept in memory while gathering small rows (~2 MB each at most)
_KERNEL_ROW = 64 << 10  # rows at least this large are copied by the kernel, smaller ones gathered


class Location(NamedTuple):
    pack: str  # file name in the store's folder
    slot: int  # row number in the pack


def pwrite_all(fd: int, data, offset: int) -> int:
    """Write all of ``data`` at ``offset``; the offset after it."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return offset


def _digest_bytes(digest: str) -> bytes:
    return bytes.fromhex(digest).ljust(DIGEST_BYTES, b"\0")[:DIGEST_BYTES]


class PackStore:
    """A folder of packs of rows of one shape. ``kept`` stores live in the engine's scratch folder
    and serve later runs (their folder is named by everything that makes the pixels); a
    ``temporary`` one lives in the stage's output folder and goes when the arrays are written."""

    def __init__(self, folder: str, shape: tuple[int, int, int], temporary: bool = False) -> None:
        self.folder, self.shape, self.temporary = str(folder), tuple(shape), temporary
        self.row = shape[0] * shape[1] * shape[2]

    @classmethod
    def kept(cls, folder: str, shape: tuple[int, int, int]) -> PackStore:
        store = cls(folder, shape)
        store.drop_stale()
        return store

    @classmethod
    def temporary_in(cls, out: Path, shape: tuple[int, int, int]) -> PackStore:
        return cls(str(out / ".decoded.tmp"), shape, temporary=True)

    # -- writing (in decoding workers) ----------------------------------------------------------
    def write(self, digests: Sequence[str], rows: Sequence[np.ndarray]) -> str:
        """Write one pack of ``rows`` (each of the store's shape, uint8) and return its name."""
        name = uuid.uuid4().hex + SUFFIX
        tmp = os.path.join(self.folder, ".tmp", str(os.getpid()), name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            at = pwrite_all(fd, HEADER.pack(MAGIC, len(rows), self.row) + b"".join(map(_digest_bytes, digests)), 0)
            for arr in rows:
                at = pwrite_all(fd, np.ascontiguousarray(arr), at)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, os.path.join(self.folder, name))
        return name

    # -- reading --------------------------------------------------------------------------------
    def index(self) -> dict[str, Location]:
        """Where each digest's row is, from the headers of the packs in the folder. A pack whose size
        does not match its header (damaged) is removed: its rows are decoded again. One that cannot
        be read now (removed meanwhile, a passing error) is left out and left alone."""
        found: dict[str, Location] = {}
        for name in self._packs():
            path = os.path.join(self.folder, name)
            try:
                digests = self.header(path)
            except OSError:
                continue
            if digests is None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            for slot, digest in enumerate(digests):
                found[digest] = (name, slot)  # a Location; a plain tuple is 3x cheaper to make
        return found

    def _packs(self) -> list[str]:
        try:
            with os.scandir(self.folder) as entries:
                return sorted(e.name for e in entries if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False))
        except OSError:  # no folder yet
            return []

    def header(self, path: str) -> list[str] | None:
        """The digests a pack names, or None when the file is not a whole pack of this store's rows;
        OSError when it cannot be read."""
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, HEADER.size)
            if len(head) != HEADER.size:
                return None
            magic, count, row = HEADER.unpack(head)
            size = HEADER.size + count * (DIGEST_BYTES + row)
            if magic != MAGIC or row != self.row or os.fstat(fd).st_size != size:
                return None
            raw = os.pread(fd, count * DIGEST_BYTES, HEADER.size)
        finally:
            os.close(fd)
        return [raw[k : k + DIGEST_BYTES].hex() for k in range(0, len(raw), DIGEST_BYTES)]

    def offset(self, count: int, slot: int) -> int:
        return HEADER.size + count * DIGEST_BYTES + slot * self.row

    def copy_rows(self, rows: Sequence[Location], dest: Path) -> None:
        """``np.save(dest, stack of the rows)``, byte for byte, in one pass over ``rows``. Rows of
        64 kB and more: runs of consecutive rows of one pack are copied by the kernel where it can
        (os.copy_file_range: no pass through this process), else read and written here. Smaller
        rows: a syscall per run would cost more than the bytes (100,000 rows of 32 px: ~35,000
        runs), so whole packs are read (a few kept at a time: rows come in pack order, mostly) and
        the rows gathered into large writes."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                      "fortran_order": False, "shape": (len(rows), *self.shape)})
        with open(dest, "wb", buffering=0) as f, _OpenPacks(self.folder) as packs:
            out = f.fileno()
            at = pwrite_all(out, header.getvalue(), 0)
            if self.row >= _KERNEL_ROW:
                copy = _Copier()
                for pack, first, n in _runs(rows, max(1, _COPY_BYTES // self.row)):
                    fd, count = packs.get(pack)
                    copy(fd, out, n * self.row, self.offset(count, first), at)
                    at += n * self.row
                return
            gathered, size = [], 0
            for pack, first, n in _runs(rows, max(1, _COPY_BYTES // self.row)):
                data, count = packs.data(pack)
                start = self.offset(count, first)
                gathered.append(data[start : start + n * self.row])
                size += n * self.row
                if size >= _COPY_BYTES:
                    at = pwrite_all(out, b"".join(gathered), at)
                    gathered, size = [], 0
            pwrite_all(out, b"".join(gathered), at)

    # -- housekeeping ---------------------------------------------------------------------------
    def drop_stale(self, age_s: float = 3600.0) -> None:
        """Remove temp files an hour old (a killed run's: younger ones may be a live run's) and the
        empty temp folders of processes."""
        tmp = os.path.join(self.folder, ".tmp")
        for path in [tmp, *_subfolders(tmp)]:
            for entry in _files(path):
                with contextlib.suppress(OSError):  # another run removed it first
                    if entry.stat().st_mtime < time.time() - age_s:
                        os.unlink(entry.path)
        self.tidy()

    def tidy(self) -> None:
        """Remove the empty temp folders of processes (this run's workers are done; a live worker of
        another run whose folder goes makes it again)."""
        for path in _subfolders(os.path.join(self.folder, ".tmp")):
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when empty

    def close(self) -> None:
        """A temporary store is removed; a kept one loses its empty temp folders."""
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.tidy()


class _OpenPacks:
    """Descriptors of packs by name, at most ``_OPEN_PACKS`` at once (the oldest closed first), with
    each pack's row count (its header, read once per opening)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.open, self.read = folder, {}, {}

    def get(self, name: str) -> tuple[int, int]:
        if name in self.open:
            return self.open[name]
        if len(self.open) >= _OPEN_PACKS:
            os.close(self.open.pop(next(iter(self.open)))[0])
        path = os.path.join(self.folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"{path}: {e.strerror or e}") from None
        try:
            _, count, _ = HEADER.unpack(os.pread(fd, HEADER.size, 0))
        except (OSError, struct.error) as e:
            os.close(fd)
            raise StoreError(f"{path}: not a whole pack ({e})") from None
        self.open[name] = (fd, count)
        return fd, count

    def data(self, name: str) -> tuple[bytes, int]:
        """A whole pack's bytes and row count (the last ``_READ_PACKS`` read are kept)."""
        if name not in self.read:
            if len(self.read) >= _READ_PACKS:
                del self.read[next(iter(self.read))]
            fd, count = self.get(name)
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
            if len(data) != size:
                raise StoreError(f"{os.path.join(self.folder, name)}: read {len(data)} of {size} bytes")
            self.read[name] = (data, count)
        return self.read[name]

    def __enter__(self) -> _OpenPacks:
        return self

    def __exit__(self, *exc) -> None:
        for fd, _ in self.open.values():
            os.close(fd)
        self.open.clear()


class _Copier:
    """Copies a byte range between descriptors with os.copy_file_range (4-6x faster than read + write
    here), and with pread + pwrite from the first refusal on (no such call, or a file system that
    refuses it)."""

    def __init__(self) -> None:
        self.in_kernel = hasattr(os, "copy_file_range")

    def __call__(self, src: int, dst: int, size: int, src_at: int, dst_at: int) -> None:
        while size and self.in_kernel:
            try:
                n = os.copy_file_range(src, dst, size, src_at, dst_at)
            except OSError:
                self.in_kernel = False
                break
            if n == 0:
                raise StoreError(f"a pack ended {size} bytes early")
            size, src_at, dst_at = size - n, src_at + n, dst_at + n
        while size:
            n = min(size, _COPY_BYTES)
            data = os.pread(src, n, src_at)
            if len(data) != n:
                raise StoreError(f"a pack ended {size - len(data)} bytes early")
            pwrite_all(dst, data, dst_at)
            size, src_at, dst_at = size - n, src_at + n, dst_at + n


def _runs(rows: Sequence[Location], most: int) -> Iterator[tuple[str, int, int]]:
    """(pack, first slot, count) of the runs of consecutive slots of one pack, at most ``most`` long."""
    k = 0
    while k < len(rows):
        pack, first = rows[k]
        n = 1
        while n < most and k + n < len(rows) and rows[k + n] == (pack, first + n):
            n += 1
        yield pack, first, n
        k += n


def _subfolders(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _files(path: str) -> list:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return []
