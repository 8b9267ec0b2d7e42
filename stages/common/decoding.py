"""What a decoding worker of the dataset stage runs (stages/dataset.py starts the workers, gathers
their results and writes the arrays). It imports numpy, Pillow, pixels.py and engine.hashing only,
not pydantic or the engine's stage machinery: a spawned worker imports the module of the function it
runs, and this one takes ~0.1 s where stages.dataset takes ~0.25 s, start-up paid by every worker of
every run. The resize settings come as pixels.PreprocessSpec (plain) for the same reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.hashing import sha256_file, sha256_json
from stages.common.pixels import PreprocessSpec, load_image, resize

RESIZE_SETTINGS = ("input_size", "resize", "interpolation", "pad_value")  # what resize() reads of a spec


def resize_spec(preprocess) -> PreprocessSpec:
    """The plain spec of the settings resize() reads, for a worker: unpickling the host's pydantic
    ``Preprocess`` would import pydantic there."""
    return PreprocessSpec(**{k: getattr(preprocess, k) for k in RESIZE_SETTINGS})


def one_thread() -> None:
    """Decoding workers run one thread each: the workers are the parallelism."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


@dataclass(frozen=True)
class Decoded:
    """Decoded images kept per file between runs (``Context.scratch``): ``folder/<sha256 of the file>``
    holds the row's raw bytes. ``folder`` is named by everything else that makes the pixels (the
    resize settings, pixels.py's code, Pillow's version), so an entry is valid for any run that finds
    it. Entries are written into ``folder/.tmp/<pid>/`` and renamed, so a killed run leaves none
    half-written; its temp files are removed by a later run once an hour old (younger ones may be a
    live run's). A folder per process: two workers creating files in one folder each spent ~1.1 ms
    of kernel time per file here, in folders of their own ~0.5 ms."""

    folder: str
    shape: tuple[int, int, int]

    @classmethod
    def under(cls, scratch: Path, spec) -> "Decoded":
        import PIL

        from stages.common import pixels

        made_by = {"format": 1, "pillow": PIL.__version__, "pixels.py": sha256_file(Path(pixels.__file__)),
                   **{k: getattr(spec, k) for k in RESIZE_SETTINGS}}
        h, w = spec.input_size
        kept = cls(os.path.join(scratch, "decoded", sha256_json(made_by)[:32]), (h, w, 3))
        kept.drop_stale()
        return kept

    def drop_stale(self, age_s: float = 3600.0) -> None:
        """Remove temp files an hour old (a killed run's) and the empty temp folders of processes."""
        tmp = os.path.join(self.folder, ".tmp")
        for path in [tmp, *_subfolders(tmp)]:
            for entry in _files(path):
                try:
                    if entry.stat().st_mtime < time.time() - age_s:
                        os.unlink(entry.path)
                except OSError:  # another run removed it first
                    pass
        self.tidy()

    def tidy(self) -> None:
        """Remove the empty temp folders of processes (this run's workers are done; a live worker of
        another run whose folder goes makes it again)."""
        for path in _subfolders(os.path.join(self.folder, ".tmp")):
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when empty

    def read(self, digest: str) -> bytes | None:
        """The row's bytes, or None (no entry, or a damaged one of another size). Called once per
        unchanged file of a re-run: plain os calls on a string path take half the time of open()."""
        size = self.shape[0] * self.shape[1] * self.shape[2]
        try:
            fd = os.open(f"{self.folder}/{digest[:2]}/{digest}", os.O_RDONLY)
        except OSError:
            return None
        try:
            data = os.read(fd, size + 1)  # one byte more: a longer entry is damaged too
        except OSError:
            return None
        finally:
            os.close(fd)
        return data if len(data) == size else None

    def get(self, digest: str) -> np.ndarray | None:
        data = self.read(digest)
        return None if data is None else np.frombuffer(data, np.uint8).reshape(self.shape)

    def put(self, digest: str, arr: np.ndarray) -> None:
        """Write the entry to a temp name, then rename it. Folders are made only when a call finds
        one missing: creating a file costs ~0.5 ms of kernel time here, two mkdir calls per image
        another 0.1 ms, in each worker."""
        entry, tmp = f"{self.folder}/{digest[:2]}/{digest}", f"{self.folder}/.tmp/{os.getpid()}/{digest}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                pwrite_all(fd, np.ascontiguousarray(arr), 0)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, entry)
            except FileNotFoundError:  # the first entry of its folder
                os.makedirs(os.path.dirname(entry), exist_ok=True)
                os.replace(tmp, entry)
        except OSError:  # a full or read-only disk costs the reuse next time, not this run
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _subfolders(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:  # no folder yet
        return []


def _files(path: str) -> list:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def decode_one(file: str | None, array: np.ndarray | None, spec, kept: Decoded | None = None) -> tuple:
    """(uint8 H x W x 3 pixels, digest, None, decoded here) or (None, digest or None, why it was
    skipped, True). The digest is the sha256 of a file's bytes (sha1 of an in-memory array's).
    Pixels ``kept`` from an earlier run for the same bytes are not decoded again."""
    from PIL import Image

    if array is not None:
        img = Image.fromarray(np.ascontiguousarray(array), "L" if array.ndim == 2 else "RGB").convert("RGB")
        return resize(img, spec), hashlib.sha1(array.tobytes()).hexdigest(), None, True
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        return None, None, f"unreadable: {e.strerror or e}", True
    if not data:
        return None, None, "empty file (0 bytes)", True
    # sha256, not sha1: crafted sha1 collisions exist, and two files must never share kept pixels
    digest = hashlib.sha256(data).hexdigest()
    if kept is not None and (arr := kept.get(digest)) is not None:
        return arr, digest, None, False
    try:
        arr = resize(load_image(io.BytesIO(data)), spec)
    except Exception as e:  # noqa: BLE001 - every decoder failure is a skip reason
        if type(e).__name__ == "UnidentifiedImageError":
            return None, digest, "not an image (Pillow cannot identify the format)", True
        return None, digest, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'decode failed'}", True
    if kept is not None:
        kept.put(digest, arr)
    return arr, digest, None, True


def decode_chunk(jobs: list[tuple[int, str | None, np.ndarray | None]], spec, kept: Decoded | None,
                  rows: "RowsFile") -> list[tuple]:
    """Decode ``jobs`` (row, file, array) and write each image's pixels at its row of ``rows`` here, in
    the worker: only (digest, why skipped, decoded here) go back to the main process, not the pixels
    (150 KB per 224-px image, which the main process would unpickle and write, on the cores the
    workers decode on)."""
    out = []
    with rows.opened() as put:
        for i, file, array in jobs:
            arr, digest, why, decoded = decode_one(file, array, spec, kept)
            if why is None:
                put(i, arr)
            out.append((digest, why, decoded))
    return out


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@dataclass(frozen=True)
class RowsFile:
    """The rows file of ``_Rows`` as a decoding worker opens it: by path, with a descriptor of its own.
    Workers write disjoint rows with os.pwrite, so they need no lock and no order."""

    path: str
    shape: tuple[int, int, int]

    @contextlib.contextmanager
    def opened(self) -> Iterator:
        """``put(i, arr)``: write row i."""
        row = self.shape[0] * self.shape[1] * self.shape[2]
        fd = os.open(self.path, os.O_WRONLY)

        def put(i: int, arr: np.ndarray) -> None:
            if arr.shape != self.shape or arr.dtype != np.uint8:  # resize() always gives this; a guard, not a path
                from engine.stage import StageError

                raise StageError(f"decoded image {i} has shape {arr.shape} {arr.dtype}, expected {self.shape} uint8")
            pwrite_all(fd, np.ascontiguousarray(arr), i * row)

        try:
            yield put
        finally:
            os.close(fd)
