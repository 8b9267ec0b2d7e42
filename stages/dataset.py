"""The ``dataset`` stage: read an image-classification dataset, split it, decode and resize it once.

Kinds (``dataset=KIND dataset.path=...``):
- ``digits``        scikit-learn's bundled ``load_digits`` (8x8 grayscale, 0..16), offline default.
- ``folder``        ``path/<class>/**/<image>``; class names are folder names (unicode, spaces ok).
- ``split_folders`` ``path/{train,val,test}/<class>/...``; a missing val/test is carved out of train.
- ``filelist``      text lines ``relative/path<SEP>label`` (label = class name or index); ``path`` is
                    one list file (split by ratios) or a folder with ``train.txt``/``val.txt``/``test.txt``.
                    A line whose file lies outside the dataset folder (``root``, symlinks resolved) is
                    refused unless ``allow_outside_root``; then those files' content enters the cache key.
- ``idx``           MNIST-format ``*-images-idx3-ubyte[.gz]`` + ``*-labels-idx1-ubyte[.gz]``.

Outputs (DEVELOPERS.md): ``images_{split}.npy`` (uint8 N x H x W x 3 RGB, resized with the
``preprocess`` section), ``labels_{split}.npy`` (int64), ``index.csv`` (path,label,split),
``labels.txt``, ``class_counts.json``, ``skipped.csv`` (path,reason), ``preprocess.json``; also
``duplicates.csv`` (identical files found in two splits) and ``dataset.json`` (a summary).

Memory does not grow with the number of images: decoding workers write the decoded rows into pack
files (stages/common/packs.py, a pack per task of ~2 MB), and each split's array is copied from the
packs by the kernel, a run of rows at a time; the bytes are those ``np.save`` of the whole stack would
write. Results are taken in index order, so the arrays are the same for any worker count. With
``keep_decoded`` the packs live in the engine's scratch folder (``Context.scratch``) and name each
row by its file's sha256, so a re-run decodes only new or changed files; without, they live in
``out`` until the arrays are written.

Everything the stage reads is in its cache key: the folders named by ``path``/``root`` are hashed with
symlinks followed (engine.contract.hashing.list_files, loops skipped), files a list names outside them by
``outside_root_digest``. Class names travel as lines of ``labels.txt``: a name with a line break is
refused.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import struct
import unicodedata
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from engine.contract.hashing import ContentIndex, list_files, sha256_file, signature, tree_digest
from engine.contract.stage import FROM_FILES, HASH_CONTENT, NOT_IN_KEY, Context, Input, Params, Stage, StageError
from stages.common.bundle import LABELS, write_labels
from stages.common.decoding import decode_chunk, kept_store, one_thread, resize_spec
from stages.common.packs import Location, PackStore, StoreError
from stages.common.preprocess import Preprocess

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "t10k": "test",
}


class SplitRatios(Params):
    """Fractions of each class that go to each split (train = 1 - val - test when left out)."""

    train: float | None = None
    val: float = 0.1
    test: float = 0.1

    @model_validator(mode="after")
    def _check(self) -> SplitRatios:
        for k in ("val", "test"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ValueError(f"split.{k} must be in [0, 1)")
        train = 1.0 - self.val - self.test if self.train is None else self.train
        if train <= 0:
            raise ValueError(f"split.train must be > 0 (val + test = {self.val + self.test:g})")
        if abs(train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got train={train:g} val={self.val:g} test={self.test:g}")
        return self

    def ratios(self) -> dict[str, float]:
        train = 1.0 - self.val - self.test if self.train is None else self.train
        return {"train": train, "val": self.val, "test": self.test}


@dataclass
class _Item:
    path: str  # as written to index.csv (relative to the dataset root) or "digits/17"
    label: int
    split: str | None = None  # fixed by the source (split folders/lists/idx files), else None
    file: Path | str | None = None  # file to decode (None: `array` holds the pixels)
    array: np.ndarray | None = None  # uint8 H x W (grayscale) or H x W x 3
    group: str | None = None


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def _is_hidden(rel: str) -> bool:
    """``rel``: a relative POSIX path."""
    return any(part.startswith(".") or part in ("__MACOSX", "Thumbs.db", "desktop.ini") for part in rel.split("/"))


def _files_under(folder: Path, loops: list[Path]) -> list[str]:
    """Files under folder as relative POSIX paths, symlinks followed like the cache key's hashing
    does; loops go to ``loops``."""
    return [rel for rel in list_files(folder, on_loop=loops.append) if not _is_hidden(rel)]


def _line_break_in(name: str) -> bool:
    """True if ``name`` would not come back as one line of labels.txt (``\n``, ``\r`` and every other
    boundary str.splitlines knows)."""
    return name.splitlines() != [name]


def _list_files(path: Path, root: Path | None) -> list[tuple[Path, str | None]]:
    """The list files of a filelist dataset and the split each one fixes (None: split by ratios)."""
    if path.is_file():
        if root is None:
            raise StageError(
                "dataset.root is required when dataset.path is a single list file: name the image folder "
                "so its content is part of the cache key (or point dataset.path at the folder holding the lists)"
            )
        return [(path, None)]
    if not path.is_dir():
        raise StageError(f"dataset.path does not exist: {path}")
    lists: list[tuple[Path, str | None]] = []
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() in (".txt", ".list", ".lst", ".csv"):
            s = _SPLIT_ALIASES.get(f.stem.lower())
            if s is not None:
                lists.append((f, s))
    if not lists:
        candidates = [f for f in sorted(path.iterdir())
                      if f.is_file() and f.suffix.lower() in (".txt", ".list", ".lst")]
        candidates = [f for f in candidates if f.name not in ("labels.txt", "classes.txt")]
        if len(candidates) != 1:
            raise StageError(
                f"kind=filelist: {path} must hold train.txt (and optional val.txt, test.txt) or exactly one list "
                f"file; found {[f.name for f in candidates]}"
            )
        lists = [(candidates[0], None)]
    if not any(s == "train" for _, s in lists) and any(s for _, s in lists):
        raise StageError(f"kind=filelist: {path} has {[f.name for f, _ in lists]} but no train list")
    return lists


@dataclass
class _Row:
    """One entry of a list file."""

    list_file: Path
    line: int
    rel: str  # the path as written
    label: str
    split: str | None
    file: Path  # root / rel, or rel when absolute
    outside: bool  # resolves (symlinks followed) to a place outside root


def _read_lists(path: Path, root: Path | None, sep: str) -> tuple[Path, list[_Row]]:
    """(root, rows) of a filelist dataset; root defaults to the folder holding the lists."""
    lists = _list_files(path, root)
    root = Path(root) if root is not None else (path if path.is_dir() else path.parent)
    if not root.is_dir():
        raise StageError(f"dataset.root is not a folder: {root}")
    real_root = root.resolve()
    rows: list[_Row] = []
    for lf, s in lists:
        try:
            text = lf.read_bytes().decode("utf-8-sig", errors="strict")
        except UnicodeDecodeError as e:
            raise StageError(f"{lf}: not UTF-8 text ({e.reason} at byte {e.start}); save the list as UTF-8") from None
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if sep not in line:
                raise StageError(f"{lf}:{n}: no separator {sep!r} in line {raw!r} (set dataset.separator)")
            rel, tok = line.rsplit(sep, 1)
            rel, tok = rel.strip(), _nfc(tok.strip())
            if not rel or not tok:
                raise StageError(f"{lf}:{n}: expected 'path{sep}label', got {raw!r}")
            f = Path(rel) if Path(rel).is_absolute() else root / rel
            try:
                outside = not f.resolve().is_relative_to(real_root)
            except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
                raise StageError(f"{lf}:{n}: cannot use the path {rel!r}: {e}") from None
            rows.append(_Row(lf, n, rel, tok, s, f, outside))
    return root, rows


_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime_ns, ctime_ns) -> sha256, for this process


def _outside_root_digest(path: Path, root: Path | None, sep: str) -> str | None:
    """Digest of the (existing) files the lists name outside root; None when there are none or the
    lists cannot be read (the stage then says why)."""
    try:
        _, rows = _read_lists(Path(path), root, sep)
    except (StageError, OSError):
        return None
    files: dict[str, str] = {}
    for row in rows:
        if not row.outside or not row.file.is_file():
            continue
        real = row.file.resolve()
        st = real.stat()
        memo = (str(real), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if memo not in _DIGESTS:
            _DIGESTS[memo] = sha256_file(real)
        files[str(real)] = _DIGESTS[memo]
    return tree_digest(files) if files else None


def _class_dirs(folder: Path) -> list[Path]:
    dirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"]
    return sorted(dirs, key=lambda d: _nfc(d.name))



# -- decoding, streamed -----------------------------------------------------------------------------
_CHUNK = 64  # images per task of a decoding worker at most; under 2 * _CHUNK images no worker starts
_CHUNK_BYTES = 2 << 20  # ... and about this many bytes of decoded rows: 13 images of 224 px (~40 ms), so the
# worker that finishes first waits little for the other's last task


def _chunk_size(row: int) -> int:
    return max(4, min(_CHUNK, _CHUNK_BYTES // row))


def _cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Sources:
    """The sha256 of each source file by its stat (size, mtime, inode, device), kept in the scratch
    folder (engine.contract.hashing.ContentIndex, sqlite), so a re-run neither reads nor hashes a file that did
    not change: with its decoded row kept, it costs a stat."""

    def __init__(self, scratch: Path) -> None:
        self.index = ContentIndex(Path(scratch) / "sources.sqlite")
        self.known = self.index.recorded()
        self.cwd = os.getcwd()
        self.seen: dict[int, tuple[str, str]] = {}  # item -> (absolute path, stat signature before reading)

    def lookup(self, i: int, file: Path) -> str | None:
        """The recorded sha256 of item i's file if its stat is the recorded one; None otherwise."""
        path = os.fspath(file)
        if not path.startswith("/"):  # relative; no resolve per file
            path = os.path.join(self.cwd, path)
        try:
            sig = signature(os.stat(path))
        except OSError:
            return None
        self.seen[i] = (path, sig)
        hit = self.known.get(path)
        return hit[1] if hit is not None and hit[0] == sig else None

    def record(self, i: int, digest: str) -> None:
        if i in self.seen:
            self.index.record(*self.seen[i], digest)


@dataclass
class _Decoded:
    """What decoding gave each item (index order): where its row is in the store (None: skipped), its
    content digest, why it was skipped; and how many images were decoded (the rest were kept)."""

    rows: list[Location | None]
    digests: list[str | None]
    why: list[str | None]
    n_decoded: int = 0

    @classmethod
    def empty(cls, n: int) -> _Decoded:
        return cls([None] * n, [None] * n, [None] * n)

    def skipped(self, items: list[_Item]) -> list[tuple[str, str]]:
        return [(it.path, why) for it, why in zip(items, self.why) if why is not None]


def _unchanged(items: list[_Item], sources: _Sources, known: dict[str, Location], got: _Decoded) -> list[int]:
    """Items whose file has its recorded stat and a kept row take that row without being read; the
    indices of the rest."""
    rest = []
    for i, it in enumerate(items):
        digest = sources.lookup(i, it.file) if it.file is not None else None
        got.digests[i] = digest  # known by its stat: not hashed again when its row is not kept
        if digest is not None and digest in known:
            got.rows[i] = known[digest]
        else:
            rest.append(i)
    return rest


def _still_to_decode(items: list[_Item], todo: list[int], sources: _Sources | None, known: dict[str, Location],
                     got: _Decoded) -> Iterator[int]:
    """The items of ``todo`` to decode. With rows kept, a file is read and hashed here first: one
    copied, touched or checked out again has a kept row under its digest (a 224-px photo decodes in
    ~3 ms and hashes in ~0.1 ms); an unreadable one goes to the workers, which say why."""
    for i in todo:
        file = items[i].file
        if known and file is not None and got.digests[i] is None:
            try:
                digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
            except OSError:
                digest = None
            if digest in known:
                got.rows[i], got.digests[i] = known[digest], digest
                sources.record(i, digest)
                continue
        yield i


def _chunks(todo: Iterator[int], size: int) -> Iterator[list[int]]:
    while chunk := list(itertools.islice(todo, size)):
        yield chunk


def _in_order(pool: ProcessPoolExecutor | None, task, chunks: Iterator[tuple], window: int) -> Iterator[tuple]:
    """(key, ``task(arg)``) for the (key, arg) of ``chunks``, in order, with at most ``window`` tasks in
    flight in ``pool`` (so workers run at most that far ahead of the chunk the main process waits
    for), or one after another here."""
    if pool is None:
        yield from ((key, task(arg)) for key, arg in chunks)
        return
    pending: deque = deque((key, pool.submit(task, arg)) for key, arg in itertools.islice(chunks, window))
    while pending:
        key, future = pending.popleft()
        result = future.result()
        for nxt, arg in itertools.islice(chunks, 1):
            pending.append((nxt, pool.submit(task, arg)))
        yield key, result


def _store(items: list[_Item], p, out: Path, ctx) -> PackStore:
    """Where the decoded rows go: the kept store when there is a scratch folder and the images are
    files, else a temporary one in ``out`` (removed once the arrays are written). A kept store whose
    folder cannot be made costs the reuse next time, not this run."""
    shape = (*p.preprocess.input_size, 3)
    if ctx.scratch is not None and p.keep_decoded and items and items[0].file is not None:
        kept = kept_store(ctx.scratch, p.preprocess)
        try:
            os.makedirs(os.path.join(kept.folder, ".tmp"), exist_ok=True)
            return kept
        except OSError as e:
            ctx.note(f"decoded images are not kept this run: cannot make {kept.folder} ({e.strerror or e})")
    return PackStore.temporary_in(out, shape)


# -- outputs ----------------------------------------------------------------------------------------
def _check_decoded(items: list[_Item], keep: list[int], classes: list[str], skipped, p) -> Counter:
    """Images per class among those decoded; an error for strict mode's skips or an empty class."""
    if skipped and p.strict:
        lines = "; ".join(f"{path}: {why}" for path, why in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        raise StageError(f"{len(skipped)} unreadable image(s) with dataset.strict=true: {lines}{more}")
    counts = Counter(items[i].label for i in keep)
    for c, name in enumerate(classes):
        if counts[c] == 0:
            n_bad = sum(1 for it in items if it.label == c)
            hint = f" (all {n_bad} of its files were unreadable)" if n_bad else ""
            raise StageError(f"class {name!r} has no images{hint} in {p.path or p.kind}; remove it or add images")
    return counts


def _write_arrays(items: list[_Item], by_split: dict[str, list[int]], store: PackStore, got: _Decoded,
                  out: Path) -> None:
    for s in SPLITS:
        idx = by_split[s]
        try:
            store.copy_rows([got.rows[i] for i in idx], out / f"images_{s}.npy")
        except StoreError as e:
            raise StageError(f"decoded images kept under {store.folder} went missing during the run ({e}; "
                             f"`edgepipe gc` or a removed scratch folder?); run again") from None
        np.save(out / f"labels_{s}.npy", np.asarray([items[i].label for i in idx], dtype=np.int64))


def _deal(groups: list[list[int]], targets: dict[str, float], splits: dict[int, str]) -> None:
    """Give each group (in the order given) to the split furthest below its share of the class so far
    (ties to the earlier of train, val, test); the first group goes to train, so every class has one."""
    total = sum(len(g) for g in groups)
    names = [s for s in SPLITS if targets.get(s, 0.0) * total > 0]
    want = [targets[s] * total for s in names]
    have = [0] * len(names)
    for j, g in enumerate(groups):
        if j == 0:
            s = "train"
            if s in names:
                have[names.index(s)] += len(g)
        else:
            k, gap = 0, want[0] - have[0]
            for m in range(1, len(names)):
                if want[m] - have[m] > gap:
                    k, gap = m, want[m] - have[m]
            s = names[k]
            have[k] += len(g)
        for i in g:
            splits[i] = s


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(header)
        wr.writerows(rows)


def _write_class_counts(items: list[_Item], by_split: dict[str, list[int]], classes: list[str], counts: Counter,
                        out: Path) -> None:
    per_split = {s: Counter(items[i].label for i in by_split[s]) for s in SPLITS}
    class_counts = {s: {c: per_split[s][k] for k, c in enumerate(classes)} for s in SPLITS}
    class_counts["total"] = {c: counts[k] for k, c in enumerate(classes)}
    (out / "class_counts.json").write_text(json.dumps(class_counts, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")


class Dataset(Stage):
    name = "dataset"
    tools = ("pillow",)  # their versions are in the cache key
    version = 1
    sections = {"preprocess": "preprocess"}
    inputs: dict[str, Input] = {}

    class Params(Params):
        kind: Literal["digits", "folder", "split_folders", "filelist", "idx"] = "digits"
        # dataset folder, list file or idx file/folder (content-hashed into the cache key)
        path: Annotated[Path | None, HASH_CONTENT] = None
        # filelist: the folder list paths are relative to (default: the folder holding `path`)
        root: Annotated[Path | None, HASH_CONTENT] = None
        separator: str = "----"
        # filelist: read lines whose file lies outside the dataset folder (`root`, symlinks resolved);
        # off, such a line is an error naming the list file and line
        allow_outside_root: bool = False
        # class names in label-index order (filelist/idx labels given as indices); or a labels file
        classes: list[str] | None = None
        classes_file: Annotated[Path | None, HASH_CONTENT] = None
        split: SplitRatios = SplitRatios()
        seed: int = 0
        # regex searched in each file name; files with the same match (group 1 if any) share a split
        group_by: str | None = None
        # true: any unreadable image is an error instead of a line in skipped.csv
        strict: bool = False
        # decoding processes (0 or null: one per CPU); the arrays are the same for any count
        workers: Annotated[int | None, NOT_IN_KEY] = None
        # keep decoded images per file in the cache's scratch folder (runs/cache/.scratch/dataset), so a
        # re-run after changing k files (or the split seed) decodes k files; false: no copy on disk
        keep_decoded: Annotated[bool, NOT_IN_KEY] = True
        preprocess: Preprocess = Preprocess()
        # not a setting, computed here: the content digest of the files the lists name outside `root`
        # (allow_outside_root=true), so that editing one of them re-runs the stage
        outside_root_digest: Annotated[str | None, FROM_FILES] = Field(None, validate_default=True)

        @field_validator("outside_root_digest", mode="after")
        @classmethod
        def _outside_root_digest(cls, value: Any, info: ValidationInfo) -> str | None:
            d = info.data
            if d.get("kind") != "filelist" or not d.get("allow_outside_root") or d.get("path") is None:
                return None
            return _outside_root_digest(d["path"], d.get("root"), d.get("separator") or "----")

        @field_validator("classes", mode="after")
        @classmethod
        def _one_line_names(cls, value: list[str] | None) -> list[str] | None:
            broken = [c for c in value or [] if _line_break_in(str(c))]
            if broken:
                raise ValueError(f"{broken[0]!r} holds a line break; labels.txt keeps one class a line")
            return value

        @model_validator(mode="after")
        def _check(self) -> Dataset.Params:
            if self.kind != "digits" and self.path is None:
                raise ValueError(f"dataset.path is required for kind={self.kind} (a folder or file)")
            if not self.separator:
                raise ValueError("separator must not be empty")
            if self.group_by is not None:
                try:
                    re.compile(self.group_by)
                except re.error as e:
                    raise ValueError(f"group_by is not a valid regex: {e}") from e
            if self.classes is not None and self.classes_file is not None:
                raise ValueError("give classes or classes_file, not both")
            return self

    # ------------------------------------------------------------------------------------------
    def run(self, params: Dataset.Params, inputs, out: Path, ctx: Context) -> dict[str, Any]:
        p = params
        given = self._given_classes(p)
        if p.group_by and p.kind in ("digits", "idx"):
            raise StageError(f"dataset.group_by works on file names; kind={p.kind} has none (remove group_by)")
        reader = {
            "digits": self._digits,
            "folder": self._folder,
            "split_folders": self._split_folders,
            "filelist": self._filelist,
            "idx": self._idx,
        }[p.kind]
        items, classes = reader(p, given, ctx)
        if len(classes) < 2:
            raise StageError(f"dataset needs at least two classes, found {len(classes)} ({classes}) in {p.path}")
        if p.group_by:
            rx = re.compile(p.group_by)
            for it in items:
                m = rx.search(Path(it.path).name)
                it.group = (m.group(1) if m.groups() else m.group(0)) if m else None

        store = _store(items, p, out, ctx)
        try:
            return self._write(items, classes, store, p, out, ctx)
        finally:
            store.close()

    def _write(self, items: list[_Item], classes: list[str], store: PackStore, p, out: Path, ctx) -> dict[str, Any]:
        got = self._decode(items, p, store, ctx)
        keep = [i for i, row in enumerate(got.rows) if row is not None]
        skipped, digests = got.skipped(items), got.digests
        counts = _check_decoded(items, keep, classes, skipped, p)
        splits = self._assign(items, keep, classes, p)
        train_labels = {items[i].label for i in keep if splits[i] == "train"}
        for c, name in enumerate(classes):
            if c not in train_labels:
                raise StageError(f"class {name!r} has no training images; add some or change the split")
        by_split: dict[str, list[int]] = {s: [i for i in keep if splits[i] == s] for s in SPLITS}
        _write_arrays(items, by_split, store, got, out)
        _write_csv(out / "index.csv", ["path", "label", "split"],
                   ([items[i].path, items[i].label, s] for s in SPLITS for i in by_split[s]))
        write_labels(out / LABELS, classes)
        _write_class_counts(items, by_split, classes, counts, out)
        _write_csv(out / "skipped.csv", ["path", "reason"], skipped)
        dups = self._duplicates(items, keep, splits, digests)
        _write_csv(out / "duplicates.csv", ["sha1", "split", "path"],
                   ([digest, s, path] for digest, rows in dups for s, path in rows))
        p.preprocess.save(out)
        summary = {
            "kind": p.kind,
            "num_classes": len(classes),
            "splits": {s: len(by_split[s]) for s in SPLITS},
            "input_size": list(p.preprocess.input_size),
            "skipped": len(skipped),
            "duplicates_across_splits": len(dups),
        }
        (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if skipped:
            ctx.note(f"skipped {len(skipped)} unreadable file(s): see skipped.csv")
        if dups:
            ctx.note(f"{len(dups)} identical file(s) appear in two splits: see duplicates.csv")
        return {
            "num_classes": len(classes),
            **{f"n_{s}": len(by_split[s]) for s in SPLITS},
            "skipped": len(skipped),
            "duplicates_across_splits": len(dups),
            "decoded": got.n_decoded,  # the rest came from decoded images kept by an earlier run
        }

    # -- classes --------------------------------------------------------------------------------
    @staticmethod
    def _given_classes(p: Dataset.Params) -> list[str] | None:
        if p.classes is not None:
            names = [_nfc(str(c)) for c in p.classes]
        elif p.classes_file is not None:
            if not p.classes_file.is_file():
                raise StageError(f"dataset.classes_file not found: {p.classes_file}")
            names = [_nfc(x.strip()) for x in p.classes_file.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
        else:
            return None
        dup = [n for n, k in Counter(names).items() if k > 1]
        if dup:
            raise StageError(f"dataset classes repeat a name: {dup}")
        return names

    # -- readers --------------------------------------------------------------------------------
    def _digits(self, p, given, ctx):
        if p.path is not None:
            raise StageError("dataset.path is not used by kind=digits (remove it, or pick another dataset kind)")
        from sklearn.datasets import load_digits

        d = load_digits()
        pix = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        classes = given or [str(i) for i in range(10)]
        if len(classes) != 10:
            raise StageError(f"digits has 10 classes, dataset.classes lists {len(classes)}")
        items = [_Item(path=f"digits/{i}", label=int(t), array=pix[i]) for i, t in enumerate(d.target)]
        return items, classes

    def _dir(self, p) -> Path:
        path = Path(p.path)
        if not path.is_dir():
            raise StageError(f"dataset.path must be a folder for kind={p.kind}: {path} "
                             f"{'is a file' if path.exists() else 'does not exist'}")
        return path

    def _folder(self, p, given, ctx, base: Path | None = None, split: str | None = None, classes=None):
        root = self._dir(p)
        base = base or root
        dirs = _class_dirs(base)
        names = [_nfc(d.name) for d in dirs]
        for d, name in zip(dirs, names):
            if _line_break_in(name):
                raise StageError(f"class folder {str(d)!r} has a line break in its name; labels.txt holds one "
                                 f"class a line: rename the folder")
        if classes is None:
            classes = given if given is not None else names
            unknown = [n for n in names if n not in classes]
            if unknown:
                raise StageError(f"class folder(s) {unknown} in {base} are not in dataset.classes {classes}")
        if not dirs:
            raise StageError(f"no class folders in {base} (expected {base}/<class>/<image files>)")
        items = []
        for d, name in zip(dirs, names):
            if name not in classes:
                raise StageError(f"class folder {d} is not a class of the train split ({classes})")
            loops: list[Path] = []
            files = _files_under(d, loops)
            for link in loops:
                ctx.note(f"skipped {link}: a symlink loop (it points to a folder it is in)")
            if not files:
                raise StageError(f"class folder {d} has no files; remove it or add images")
            label = classes.index(name)
            shown, where = d.relative_to(root).as_posix(), str(d)  # strings per file: Path objects cost seconds
            items += [_Item(path=f"{shown}/{rel}", label=label, split=split, file=f"{where}/{rel}") for rel in files]
        return items, classes

    def _split_folders(self, p, given, ctx):
        root = self._dir(p)
        found: dict[str, Path] = {}
        for d in sorted(root.iterdir()):
            s = _SPLIT_ALIASES.get(d.name.lower()) if d.is_dir() else None
            if s is not None:
                if s in found:
                    raise StageError(f"two folders for split {s!r} in {root}: {found[s].name}, {d.name}")
                found[s] = d
        if "train" not in found:
            raise StageError(f"kind=split_folders needs {root}/train/<class>/... "
                             f"(found {sorted(x.name for x in root.iterdir())})")
        items, classes = self._folder(p, given, ctx, base=found["train"], split="train")
        if given is None:  # classes of val/test that train lacks are an error, not new classes
            classes = list(classes)
        for s in ("val", "test"):
            if s in found:
                more, _ = self._folder(p, given, ctx, base=found[s], split=s, classes=classes)
                items += more
        return items, classes

    def _filelist(self, p, given, ctx):
        root, rows = _read_lists(Path(p.path), p.root, p.separator)
        if given is not None:
            classes = given
            lookup = {c: i for i, c in enumerate(classes)}
        elif rows and all(re.fullmatch(r"\d+", r.label) for r in rows):
            classes = [str(i) for i in range(max(int(r.label) for r in rows) + 1)]
            lookup = {c: i for i, c in enumerate(classes)}
        else:
            classes = sorted({r.label for r in rows})
            lookup = {c: i for i, c in enumerate(classes)}
        items = []
        for r in rows:
            where = f"{r.list_file}:{r.line}"
            if r.label in lookup:
                label = lookup[r.label]
            elif re.fullmatch(r"\d+", r.label) and int(r.label) < len(classes):
                label = int(r.label)
            else:
                raise StageError(f"{where}: unknown label {r.label!r}; known classes: {classes[:20]}")
            # checked before the file is touched: a list must not make edgepipe read /etc/passwd
            if r.outside and not p.allow_outside_root:
                raise StageError(
                    f"{where}: {r.rel!r} lies outside the dataset folder {root} (it resolves to {r.file.resolve()}); "
                    f"move it under that folder, or set dataset.allow_outside_root=true to read it anyway"
                )
            if not r.file.is_file():
                raise StageError(f"{where}: file {r.rel!r} not found (looked for {r.file})")
            shown = r.rel if r.outside else r.file.resolve().relative_to(root.resolve()).as_posix()
            items.append(_Item(path=shown, label=label, split=r.split, file=r.file))
        if not items:
            raise StageError(f"no entries in the list file(s) of dataset.path={p.path}")
        return items, classes

    @staticmethod
    def _read_idx(path: Path) -> np.ndarray:
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                data = f.read()
            zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
            if zero != 0:
                raise ValueError("bad magic number")
            dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[dtype_code]
            shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
            arr = np.frombuffer(data, dtype=dt, offset=4 + 4 * ndim)
            if arr.size != int(np.prod(shape)):
                raise ValueError(f"header says shape {shape} but the file holds {arr.size} values")
            return arr.reshape(shape)
        except (OSError, EOFError, KeyError, struct.error, ValueError) as e:
            raise StageError(f"cannot read idx file {path}: {type(e).__name__}: {e}") from e

    def _idx(self, p, given, ctx):
        path = Path(p.path)
        if path.is_file():
            image_files = [path]
        elif path.is_dir():
            image_files = sorted(f for f in path.iterdir()
                                 if f.is_file() and "idx3" in f.name and "image" in f.name.lower())
        else:
            raise StageError(f"dataset.path does not exist: {path}")
        if not image_files:
            raise StageError(f"kind=idx: no '*images-idx3-ubyte[.gz]' files in {path}")
        parts = []
        for imf in image_files:
            lname = imf.name.replace("images", "labels").replace("idx3", "idx1")
            lbf = imf.with_name(lname)
            if not lbf.is_file():
                raise StageError(f"kind=idx: labels file {lbf.name} for {imf.name} not found in {imf.parent}")
            imgs, labels = self._read_idx(imf), self._read_idx(lbf)
            if imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[-1] not in (1, 3)):
                raise StageError(f"{imf}: expected N x H x W (or N x H x W x 1|3) images, got shape {imgs.shape}")
            if labels.ndim != 1 or len(labels) != len(imgs):
                raise StageError(f"{lbf}: {labels.shape} labels for {len(imgs)} images in {imf.name}")
            if imgs.dtype != np.uint8:
                raise StageError(f"{imf}: images must be unsigned bytes (idx type 0x08), got {imgs.dtype}")
            low = imf.name.lower()
            split = ("test" if ("t10k" in low or "test" in low) else "val" if "val" in low
                     else "train" if "train" in low else None)
            parts.append((imf, imgs, labels.astype(np.int64), split))
        values = sorted({int(v) for _, _, lab, _ in parts for v in np.unique(lab)})
        if given is not None:
            if values and (values[0] < 0 or values[-1] >= len(given)):
                raise StageError(f"kind=idx: labels run {values[0]}..{values[-1]} but dataset.classes has "
                                 f"{len(given)} names")
            classes, remap = given, {v: v for v in values}
        else:
            classes, remap = [str(v) for v in values], {v: i for i, v in enumerate(values)}
        splits = [s for *_, s in parts]
        if len(parts) > 1 and None in splits:
            raise StageError(f"kind=idx: cannot tell the split of {[f.name for f, *_, s in parts if s is None]} "
                             "(name them train-/t10k-)")
        items = []
        for imf, imgs, labels, split in parts:
            imgs = imgs[..., 0] if imgs.ndim == 4 and imgs.shape[-1] == 1 else imgs
            for i in range(len(imgs)):
                items.append(_Item(path=f"{imf.name}#{i}", label=remap[int(labels[i])], split=split, array=imgs[i]))
        return items, classes

    # -- decoding -------------------------------------------------------------------------------
    def _decode(self, items: list[_Item], p, store: PackStore, ctx) -> _Decoded:
        """Each item's row in ``store``: the kept row of an unchanged file, else decoded (in worker
        processes, which write the rows into packs); the same pixels whatever the worker count."""
        n, got = len(items), _Decoded.empty(len(items))
        sources = None if store.temporary else _Sources(ctx.scratch)
        known = {} if store.temporary else store.index()
        ctx.progress(0, n, f"decoding {n} images")
        todo = _unchanged(items, sources, known, got) if sources is not None else list(range(n))
        done, step = n - len(todo), max(1, n // 50)
        for i, (digest, why, row) in self._decoded(items, todo, _still_to_decode(items, todo, sources, known, got),
                                                    p, store):
            got.n_decoded += 1
            got.digests[i], got.why[i], got.rows[i] = digest, why, row
            if why is None and sources is not None:
                sources.record(i, digest)
            done += 1
            if done % step == 0:
                ctx.progress(done, n, f"decoding images {done}/{n}")
        ctx.progress(n, n, f"decoded {got.n_decoded} of {n} images")
        if sources is not None:
            sources.index.save()
        return got

    def _decoded(self, items: list[_Item], todo: list[int], decode: Iterator[int], p,
                 store: PackStore) -> Iterator[tuple[int, tuple]]:
        """(index, (digest, why skipped, its Location or None)) of the items ``decode`` yields, their
        rows written into ``store`` by ``workers`` spawned processes (chunks of ``_chunk_size``
        images, a bounded window of them in flight) or by this one."""
        workers = p.workers or _cpus()

        def jobs(chunk):
            return [(str(items[i].file) if items[i].array is None else None, items[i].array) for i in chunk]

        task = functools.partial(decode_chunk, spec=resize_spec(p.preprocess), store=store)
        pool = None
        # in-memory sources (digits, idx) only resize small arrays: starting processes costs more
        if workers > 1 and len(todo) >= 2 * _CHUNK and any(items[i].file is not None for i in todo):
            # processes, not threads: the Python part of each image's work holds the one GIL; spawn,
            # not fork, so no thread or lock of this process (progress display, torch) is copied
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=one_thread)
        chunks = ((chunk, jobs(chunk)) for chunk in _chunks(decode, _chunk_size(store.row)))
        last = None
        try:
            for chunk, (pack, results) in _in_order(pool, task, chunks, 4 * workers):
                for i, (digest, why, slot) in zip(chunk, results):
                    last = i
                    yield i, (digest, why, None if slot is None else Location(pack, slot))
        except BrokenProcessPool:
            where = items[last if last is not None else todo[0]].path
            raise StageError(f"a decoding worker died (out of memory, or a crash in an image decoder) near "
                             f"{where!r}; rerun with dataset.workers=1 to find the file") from None
        except OSError as e:
            instead = "" if store.temporary else ", or set dataset.keep_decoded=false to keep no copy there"
            raise StageError(f"cannot write decoded images under {store.folder}: {e.strerror or e}; free disk "
                             f"space there{instead}") from None
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    # -- splitting ------------------------------------------------------------------------------
    def _assign(self, items: list[_Item], keep: list[int], classes: list[str], p) -> dict[int, str]:
        """Stratified, seeded split. Splits fixed by the source are kept; the configured ratios split
        the rest (when the source fixes none) or carve the missing splits out of the train pool."""
        splits: dict[int, str] = {}
        fixed = {items[i].split for i in keep if items[i].split is not None}
        ratios = p.split.ratios()
        if fixed:
            pool = []
            for i in keep:
                s = items[i].split
                if s in (None, "train"):
                    pool.append(i)
                else:
                    splits[i] = s
            carve = {s: ratios[s] for s in ("val", "test") if s not in fixed}
            targets = {"train": max(0.0, 1.0 - sum(carve.values())), **carve}
        else:
            pool = list(keep)
            targets = ratios
        # groups: files whose group_by match is equal travel together; others are their own group
        groups: dict[str, list[int]] = defaultdict(list)
        for i in pool:
            key = items[i].group
            groups[f"g:{key}" if key is not None else f"i:{i}"].append(i)
        per_class: dict[int, list[list[int]]] = defaultdict(list)
        for key in sorted(groups):
            members = groups[key]
            if len(members) == 1:  # most files are a group of one
                label = items[members[0]].label
            else:
                label = Counter(items[i].label for i in members).most_common(1)[0][0]
            per_class[label].append(members)
        for c in sorted(per_class):
            rng = np.random.default_rng([p.seed, c])
            glist = per_class[c]
            glist = [glist[j] for j in rng.permutation(len(glist))]
            _deal(glist, targets, splits)
        return splits

    @staticmethod
    def _duplicates(items, keep, splits, digests) -> list[tuple[str, list[tuple[str, str]]]]:
        """(sha1, [(split, path)]) of identical files (equal digests) in more than one split, by sha1
        (duplicates.csv's column; a file's digest here is its sha256, hashed again with sha1 only for
        the few files listed)."""
        first: dict[str, int] = {}
        repeated = set()
        for i in keep:
            d = digests[i]
            if d is not None and first.setdefault(d, i) != i:
                repeated.add(d)
        where: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i in keep if repeated else ():
            if digests[i] in repeated:
                where[digests[i]].append((splits[i], items[i].path))
        found = []
        for d, rows in where.items():
            if len({s for s, _ in rows}) > 1:
                it = items[first[d]]
                found.append((d if it.file is None else hashlib.sha1(Path(it.file).read_bytes()).hexdigest(), rows))
        return sorted(found)
