"""The dataset stage: every kind on small generated data, splits, the bad-data corpus."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_data import CLASSES, class_image, make_bad_corpus, make_image_folder, save_image, write_idx
from helpers_procs import until

from engine.contract.stage import StageError
from engine.run.testing import run_stage, validate_params
from stages import dataset as dataset_module
from stages.common import decoding, packs
from stages.common.decoding import resize_spec
from stages.common.packs import PackStore
from stages.common.preprocess import Preprocess, load_image, resize
from stages.dataset import Dataset

SPLITS = ("train", "val", "test")


def _index(out: Path) -> list[dict]:
    with open(out / "index.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def _check_outputs(out: Path, size=(16, 16)) -> dict[str, int]:
    n = {}
    for s in SPLITS:
        x, y = np.load(out / f"images_{s}.npy"), np.load(out / f"labels_{s}.npy")
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (*size, 3)
        assert y.dtype == np.int64 and len(y) == len(x)
        n[s] = len(y)
    rows = _index(out)
    assert len(rows) == sum(n.values())
    for s in SPLITS:  # index order == array order
        labels = [int(r["label"]) for r in rows if r["split"] == s]
        assert labels == np.load(out / f"labels_{s}.npy").tolist()
    assert Preprocess.load(out).input_size == size
    counts = json.loads((out / "class_counts.json").read_text(encoding="utf-8"))
    assert sum(counts["total"].values()) == sum(n.values())
    return n


PRE = {"input_size": 16}


def test_digits_default_deterministic(tmp_path):
    m = run_stage(Dataset, {"preprocess": PRE}, {}, tmp_path / "a")
    assert m["num_classes"] == 10 and m["n_train"] + m["n_val"] + m["n_test"] == 1797
    n = _check_outputs(tmp_path / "a")
    assert abs(n["val"] - 180) <= 10 and abs(n["test"] - 180) <= 10
    assert (tmp_path / "a" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    counts = json.loads((tmp_path / "a" / "class_counts.json").read_text())
    assert all(v > 0 for s in SPLITS for v in counts[s].values())  # stratified: every class everywhere
    run_stage(Dataset, {"preprocess": PRE}, {}, tmp_path / "b")
    for f in ("images_train.npy", "labels_val.npy", "index.csv", "class_counts.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    run_stage(Dataset, {"preprocess": PRE, "seed": 1}, {}, tmp_path / "c")
    assert (tmp_path / "a" / "index.csv").read_bytes() != (tmp_path / "c" / "index.csv").read_bytes()


def test_folder_unicode_classes_nested(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=10, nested=True)
    m = run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, "split": {"val": 0.2, "test": 0.2}},
                  {}, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "labels.txt").read_text(encoding="utf-8").splitlines() == sorted(CLASSES)
    n = _check_outputs(out)
    assert n == {"train": 18, "val": 6, "test": 6} and m["skipped"] == 0
    rows = _index(out)
    assert any("/sub/" in r["path"] for r in rows)
    name0 = sorted(CLASSES)[0]
    assert all(r["path"].startswith(sorted(CLASSES)[int(r["label"])] + "/") for r in rows)
    assert any(r["path"].startswith(name0) for r in rows)


def test_split_folders_fixed_and_carved(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=8, classes=["a", "b"])
    make_image_folder(root / "test", per_class=2, classes=["a", "b"], seed=1)
    m = run_stage(Dataset, {"kind": "split_folders", "path": root, "preprocess": PRE,
                            "split": {"val": 0.25, "test": 0.1}},
                  {}, tmp_path / "out")
    assert (m["n_train"], m["n_val"], m["n_test"]) == (12, 4, 4)  # test fixed by test/, val carved from train
    rows = _index(tmp_path / "out")
    assert all(r["path"].startswith("test/") for r in rows if r["split"] == "test")
    assert all(r["path"].startswith("train/") for r in rows if r["split"] != "test")
    make_image_folder(root / "val", per_class=2, classes=["a", "c"], seed=2)
    with pytest.raises(StageError, match="not a class of the train split"):
        run_stage(Dataset, {"kind": "split_folders", "path": root, "preprocess": PRE}, {}, tmp_path / "bad")


@pytest.mark.parametrize("sep", ["----", "\t"])
def test_filelist_separators_names_and_indices(tmp_path, sep):
    images = make_image_folder(tmp_path / "imgs", per_class=6, classes=["x y", "z"])
    by_name = [f"x y/img {i}.png{sep}x y" for i in range(6)] + [f"z/img {i}.png{sep}z" for i in range(6)]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("# comment\n\n" + "\n".join(by_name[:4] + by_name[6:10]) + "\n", encoding="utf-8")
    by_index = [f"x y/img {i}.png{sep}0" for i in (4, 5)] + [f"z/img {i}.png{sep}1" for i in (4, 5)]
    (lists / "test.txt").write_text("\n".join(by_index) + "\n", encoding="utf-8")
    params = {"kind": "filelist", "path": lists, "root": images, "separator": sep, "classes": ["x y", "z"],
              "preprocess": PRE, "split": {"val": 0.25, "test": 0.1}}
    m = run_stage(Dataset, params, {}, tmp_path / "out")
    assert (m["n_train"], m["n_val"], m["n_test"]) == (6, 2, 4)
    rows = _index(tmp_path / "out")
    assert {r["path"] for r in rows if r["split"] == "test"} == {f"x y/img {i}.png" for i in (4, 5)} | {
        f"z/img {i}.png" for i in (4, 5)}
    # one list file, names inferred (sorted), split by ratio
    single = tmp_path / "all.txt"
    single.write_text("\n".join(by_name) + "\n", encoding="utf-8")
    run_stage(Dataset, {**params, "path": single, "classes": None}, {}, tmp_path / "single")
    assert (tmp_path / "single" / "labels.txt").read_text().splitlines() == ["x y", "z"]


def test_filelist_errors_name_file_and_line(tmp_path):
    images = make_image_folder(tmp_path / "imgs", per_class=2, classes=["a", "b"])
    lf = tmp_path / "list.txt"
    base = {"kind": "filelist", "path": lf, "root": images, "preprocess": PRE, "classes": ["a", "b"]}
    lf.write_text("a/img 0.png----a\nb/missing.png----b\n", encoding="utf-8")
    with pytest.raises(StageError, match=r"list\.txt:2: file 'b/missing.png' not found"):
        run_stage(Dataset, base, {}, tmp_path / "o1")
    lf.write_text("a/img 0.png----a\nb/img 0.png----b\nb/img 1.png----zebra\n", encoding="utf-8")
    with pytest.raises(StageError, match=r"list\.txt:3: unknown label 'zebra'"):
        run_stage(Dataset, base, {}, tmp_path / "o2")
    lf.write_text("a/img 0.png----a\nb/img 0.png,b\n", encoding="utf-8")
    with pytest.raises(StageError, match=r"list\.txt:2: no separator"):
        run_stage(Dataset, base, {}, tmp_path / "o3")
    lf.write_text("a/img 0.png----a\n", encoding="utf-8")
    with pytest.raises(StageError, match="root is required"):
        run_stage(Dataset, {**base, "root": None}, {}, tmp_path / "o4")


def test_idx_files(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tr_labels = np.repeat(np.arange(3), 10)
    te_labels = np.repeat(np.arange(3), 2)
    tr = np.stack([class_image(int(c), i, size=(12, 12))[..., 0] for i, c in enumerate(tr_labels)])
    te = np.stack([class_image(int(c), i + 100, size=(12, 12))[..., 0] for i, c in enumerate(te_labels)])
    write_idx(folder / "train-images-idx3-ubyte.gz", tr)
    write_idx(folder / "train-labels-idx1-ubyte.gz", tr_labels)
    write_idx(folder / "t10k-images-idx3-ubyte", te)
    write_idx(folder / "t10k-labels-idx1-ubyte", te_labels)
    m = run_stage(Dataset, {"kind": "idx", "path": folder, "preprocess": PRE, "split": {"val": 0.2, "test": 0.1},
                            "classes": ["zero", "one", "two"]}, {}, tmp_path / "out")
    assert (m["n_train"], m["n_val"], m["n_test"]) == (24, 6, 6)
    assert (tmp_path / "out" / "labels.txt").read_text().split() == ["zero", "one", "two"]
    x = np.load(tmp_path / "out" / "images_test.npy")
    assert np.all(x[..., 0] == x[..., 1])  # grayscale -> RGB
    rows = _index(tmp_path / "out")
    assert rows[-1]["path"].startswith("t10k-images-idx3-ubyte#")
    # a single pair is split by ratio; a label count mismatch names the file
    one = tmp_path / "one"
    one.mkdir()
    write_idx(one / "train-images-idx3-ubyte", tr)
    write_idx(one / "train-labels-idx1-ubyte", tr_labels[:-1])
    with pytest.raises(StageError, match="train-labels-idx1-ubyte"):
        run_stage(Dataset, {"kind": "idx", "path": one, "preprocess": PRE}, {}, tmp_path / "bad")
    write_idx(one / "train-labels-idx1-ubyte", tr_labels)
    rng.shuffle(tr_labels)
    m = run_stage(Dataset, {"kind": "idx", "path": one / "train-images-idx3-ubyte", "preprocess": PRE},
                  {}, tmp_path / "o2")
    assert m["n_train"] + m["n_val"] + m["n_test"] == 30 and m["n_test"] == 3


def test_bad_data_corpus(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, per_class=4, classes=["good"])
    kinds = make_bad_corpus(root / "mixed")
    m = run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, "split": {"val": 0.0, "test": 0.0}},
                  {}, tmp_path / "out")
    skipped = _skipped(tmp_path / "out")
    bad = {f"mixed/{n}" for n, k in kinds.items() if k == "bad"}
    assert set(skipped) == bad and m["skipped"] == len(bad)
    assert skipped["mixed/zero.jpg"] == "empty file (0 bytes)"
    assert "truncated" in skipped["mixed/truncated.jpg"]
    assert "not an image" in skipped["mixed/notes.jpg"]
    rows = _index(tmp_path / "out")
    kept = {r["path"] for r in rows}
    assert {f"mixed/{n}" for n, k in kinds.items() if k == "good"} <= kept
    assert not any(".DS_Store" in p for p in kept | set(skipped))
    x = np.load(tmp_path / "out" / "images_train.npy")
    exif = x[[r["path"] for r in rows].index("mixed/exif_rotated.jpg")].mean(axis=(1, 2))
    assert exif[:8].mean() > 200 and exif[8:].mean() < 50  # EXIF rotation applied before the resize
    with pytest.raises(StageError, match=r"strict=true.*mixed/"):
        run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, "strict": True}, {}, tmp_path / "strict")


def test_class_errors(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3, classes=["a", "b"])
    (root / "empty").mkdir()
    with pytest.raises(StageError, match="empty.*has no files"):
        run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE}, {}, tmp_path / "o1")
    (root / "empty" / "junk.png").write_bytes(b"junk")
    with pytest.raises(StageError, match="'empty' has no images.*unreadable"):
        run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE}, {}, tmp_path / "o2")
    shutil.rmtree(root / "empty")
    shutil.rmtree(root / "b")
    with pytest.raises(StageError, match="at least two classes"):
        run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE}, {}, tmp_path / "o3")
    with pytest.raises(ValueError, match="path is required"):
        validate_params(Dataset, {"kind": "folder"})


def test_duplicates_across_splits_reported(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=3, classes=["a", "b"])
    make_image_folder(root / "test", per_class=1, classes=["a", "b"], seed=5)
    shutil.copyfile(root / "train" / "a" / "img 0.png", root / "test" / "a" / "copy.png")
    m = run_stage(Dataset, {"kind": "split_folders", "path": root, "preprocess": PRE, "split": {"val": 0.0}},
                  {}, tmp_path / "out")
    assert m["duplicates_across_splits"] == 1
    with open(tmp_path / "out" / "duplicates.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["split"], r["path"]) for r in rows} == {("train", "train/a/img 0.png"), ("test", "test/a/copy.png")}


def test_group_by_keeps_videos_together(tmp_path):
    root = tmp_path / "data"
    for c, name in enumerate(["a", "b"]):
        for v in range(5):
            for f in range(4):
                save_image(class_image(c, v * 10 + f), root / name / f"vid{v}_frame{f}.png")
    params = {"kind": "folder", "path": root, "preprocess": PRE, "group_by": r"^(vid\d+)_",
              "split": {"val": 0.2, "test": 0.2}}
    run_stage(Dataset, params, {}, tmp_path / "out")
    where: dict[str, set] = {}
    for r in _index(tmp_path / "out"):
        video = r["path"].split("_frame")[0]
        where.setdefault(video, set()).add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    assert {next(iter(s)) for s in where.values()} == set(SPLITS)


def test_grayscale_source_and_letterbox(tmp_path):
    root = tmp_path / "data"
    for c in range(2):
        for i in range(4):
            save_image(class_image(c, i, size=(10, 30))[..., 0], root / f"c{c}" / f"{i}.png")
    run_stage(Dataset, {"kind": "folder", "path": root,
                        "preprocess": {"input_size": 12, "resize": "letterbox", "pad_value": 9},
                        "split": {"val": 0.0, "test": 0.0}}, {}, tmp_path / "out")
    x = np.load(tmp_path / "out" / "images_train.npy")
    assert x.shape == (8, 12, 12, 3) and np.all(x[:, :4] == 9)  # 12 x 4 content, padded rows


def test_config_groups_validate():
    """Every file of the dataset/preprocess/model/train/clip groups is a valid section for its stage."""
    from omegaconf import OmegaConf

    from stages.clip_outliers import ClipOutliers
    from stages.common.models import ModelParams
    from stages.train import Train

    conf = Path(__file__).resolve().parents[2] / "conf"

    def load(group: str, name: str) -> dict:
        cfg = OmegaConf.create({"seed": 3, "section": OmegaConf.load(conf / group / f"{name}.yaml")})
        return OmegaConf.to_container(cfg, resolve=True)["section"]

    for f in sorted((conf / "preprocess").glob("*.yaml")):
        Preprocess.model_validate(load("preprocess", f.stem))
    for f in sorted((conf / "model").glob("*.yaml")):
        assert ModelParams.model_validate(load("model", f.stem)).arch == f.stem
    for f in sorted((conf / "dataset").glob("*.yaml")):
        section = load("dataset", f.stem)
        if section.get("path", "x") is None:
            section["path"] = "/data"
        p = validate_params(Dataset, section)
        assert p.kind == f.stem and p.seed == 3
    for f in sorted((conf / "train").glob("*.yaml")):
        assert validate_params(Train, load("train", f.stem)).seed == 3
    for f in sorted((conf / "clip").glob("*.yaml")):
        assert validate_params(ClipOutliers, load("clip", f.stem)).method == f.stem
    assert Preprocess.model_validate(load("preprocess", "default")) == Preprocess()  # defaults agree


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_streamed_arrays_equal_plain_decode(tmp_path):
    """images_{split}.npy, written a chunk at a time, hold exactly the bytes np.save gives for the stack
    of load_image + resize of the files index.csv lists; an empty split is a valid empty array; the
    scratch file of decoded rows is gone."""
    root = make_image_folder(tmp_path / "data", per_class=12, ext="jpg", nested=True)
    make_bad_corpus(root / CLASSES[0] / "bad")
    pre = {"input_size": [12, 20], "resize": "letterbox"}
    run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": pre, "workers": 1,
                        "split": {"val": 0.25, "test": 0.0}}, {}, tmp_path / "out")
    out, spec = tmp_path / "out", Preprocess(**pre)
    rows = _index(out)
    for s in SPLITS:
        paths = [r["path"] for r in rows if r["split"] == s]
        want = (np.stack([resize(load_image(root / p), spec) for p in paths]) if paths
                else np.zeros((0, 12, 20, 3), np.uint8))
        assert (out / f"images_{s}.npy").read_bytes() == _npy_bytes(want), s
    assert len(np.load(out / "images_test.npy")) == 0 and len(np.load(out / "images_val.npy")) > 0
    assert not [f for f in out.iterdir() if f.name.startswith(".")]


def test_workers_give_identical_bytes(tmp_path):
    """dataset.workers=2 decodes in worker processes, which write the rows and the kept entries; every
    output file is byte for byte the one workers=1 writes (idx arrays and image files, skipped ones
    included), and so is a re-run with one worker that takes every image from the kept entries."""
    root = make_image_folder(tmp_path / "data", per_class=50, ext="jpg")
    make_bad_corpus(root / CLASSES[1] / "bad")
    outs, scratch = {}, tmp_path / "scratch"
    for name, w, kept in (("w1", 1, None), ("w2", 2, None), ("w2 kept", 2, scratch), ("w1 from kept", 1, scratch)):
        outs[name] = tmp_path / name
        m = run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, "workers": w}, {}, outs[name],
                      scratch=kept)
        images = m["n_train"] + m["n_val"] + m["n_test"]
        assert images >= 2 * dataset_module._CHUNK and m["skipped"] > 0  # pooled
        assert m["decoded"] == m["skipped"] + (0 if name == "w1 from kept" else images)  # skipped: tried again
    names = sorted(f.name for f in outs["w1"].iterdir())
    for other in ("w2", "w2 kept", "w1 from kept"):
        assert names == sorted(f.name for f in outs[other].iterdir())
        for name in names:
            assert (outs["w1"] / name).read_bytes() == (outs[other] / name).read_bytes(), (other, name)


def test_workers_write_rows_into_a_pack_and_send_back_no_pixels(tmp_path):
    """A decoding task writes the pixels of the images it decodes into one pack of the store itself and
    returns only (pack name, [(digest, why skipped, slot)]): no array crosses to the main process; a
    skipped file has no slot; the pack's header names each row by its file's sha256."""
    root = make_image_folder(tmp_path / "data", per_class=3, ext="jpg")
    (root / CLASSES[0] / "broken.jpg").write_bytes(b"not a jpeg")
    files = sorted(str(f) for f in root.rglob("*.jpg"))
    spec = Preprocess(**PRE)
    store = PackStore(str(tmp_path / "store"), (16, 16, 3))
    pack, results = decoding.decode_chunk([(f, None) for f in files], resize_spec(spec), store)
    assert all(not isinstance(x, np.ndarray) for r in results for x in r)
    assert [f.name for f in (tmp_path / "store").iterdir() if f.is_file()] == [pack]
    index = store.index()
    assert len(index) == len(files) - 1 == len({slot for _, _, slot in results if slot is not None})
    for f, (digest, why, slot) in zip(files, results):
        assert digest == hashlib.sha256(Path(f).read_bytes()).hexdigest()
        if f.endswith("broken.jpg"):
            assert why.startswith("not an image") and slot is None and digest not in index
        else:
            assert why is None and index[digest] == (pack, slot)
            store.copy_rows([index[digest]], tmp_path / "one.npy")
            assert (np.load(tmp_path / "one.npy")[0] == resize(load_image(f), spec)).all(), f


def test_decoding_workers_import_no_pydantic():
    """What a spawned decoding worker imports to run its task (the task's module, the plain resize spec)
    leaves out pydantic and the engine's stage machinery: start-up every worker of every run pays."""
    code = ("import json, pickle, sys; from stages.common.decoding import decode_chunk; "
            "pickle.loads(sys.stdin.buffer.read()); "
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('pydantic', 'stages', 'engine')]))")
    task = pickle.dumps((decoding.decode_chunk, resize_spec(Preprocess(input_size=[12, 20]))))
    r = subprocess.run([sys.executable, "-c", code], input=task, capture_output=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) <= {"engine", "engine.contract", "engine.contract.hashing", "engine.errors",
                                         "stages", "stages.common", "stages.common.decoding", "stages.common.errors",
                                         "stages.common.packs", "stages.common.preprocess_numpy"}, r.stdout


@pytest.mark.parametrize("kernel_copy", ["works", "missing", "fails", "fails part way"])
def test_split_arrays_are_np_save_bytes_however_rows_are_copied(tmp_path, monkeypatch, kernel_copy):
    """copy_rows writes np.save's bytes of the rows it names (runs of consecutive rows of a pack longer
    than one copy, single rows, rows of two packs, out of order) with os.copy_file_range, and without
    it: not in this os (macOS), refused by the file system (EXDEV), or refused after some rows were
    copied."""
    rng = np.random.default_rng(0)
    n, size = 100, (200, 200)  # 120 kB rows: a copy moves at most 34 of them
    pixels = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    store = PackStore(str(tmp_path / "store"), (*size, 3))
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(n)]
    first, second = store.write(digests[:90], pixels[:90]), store.write(digests[90:], pixels[90:])
    where = [packs.Location(first, i) if i < 90 else packs.Location(second, i - 90) for i in range(n)]
    assert store.index() == dict(zip(digests, where))
    idx = [*range(3, 83), 85, 90, 91, 99, 0, 89, 90]
    real, calls = getattr(os, "copy_file_range", None), []

    def refuse(*args):
        calls.append(args)
        if kernel_copy == "fails" or len(calls) > 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(*args)

    if kernel_copy == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif kernel_copy != "works":
        monkeypatch.setattr(os, "copy_file_range", refuse)
    store.copy_rows([where[i] for i in idx], tmp_path / "x.npy")
    assert (tmp_path / "x.npy").read_bytes() == _npy_bytes(pixels[idx])
    store.copy_rows([], tmp_path / "empty.npy")
    assert (tmp_path / "empty.npy").read_bytes() == _npy_bytes(np.zeros((0, *size, 3), np.uint8))


def test_small_rows_are_gathered_from_whole_packs(tmp_path):
    """Rows under 64 kB are gathered from packs read whole (more packs than are kept in memory at once,
    rows in any order, repeated, more than one write's worth): np.save's bytes all the same."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (1000, 64, 64, 3), dtype=np.uint8)  # 12 kB rows, 12 MB in all
    store = PackStore(str(tmp_path / "store"), (64, 64, 3))
    where = []
    for k in range(0, 1000, 50):
        pack = store.write([hashlib.sha256(b"%d" % (k + j)).hexdigest() for j in range(50)], pixels[k : k + 50])
        where += [packs.Location(pack, j) for j in range(50)]
    idx = [*rng.permutation(1000), *range(100, 400), 7, 7]
    store.copy_rows([where[i] for i in idx], tmp_path / "x.npy")
    assert (tmp_path / "x.npy").read_bytes() == _npy_bytes(pixels[idx])


def test_damaged_or_foreign_packs_are_left_out(tmp_path):
    """A store's index takes only whole packs of its own row size: a truncated pack, one of another row
    size, a file that is no pack and a temp file are not read as rows (the damaged ones are removed)."""
    store = PackStore(str(tmp_path / "store"), (4, 4, 3))
    rows = np.arange(2 * 48, dtype=np.uint8).reshape(2, 4, 4, 3)
    good = store.write(["aa" * 32, "bb" * 32], rows)
    cut = store.write(["cc" * 32], rows[:1])
    with open(tmp_path / "store" / cut, "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)
    other = PackStore(str(tmp_path / "store"), (2, 2, 3)).write(["dd" * 32], np.zeros((1, 2, 2, 3), np.uint8))
    (tmp_path / "store" / "junk.pack").write_bytes(b"EDGEPACK" + b"\xff" * 40)
    assert store.index() == {"aa" * 32: (good, 0), "bb" * 32: (good, 1)}
    assert sorted(f.name for f in (tmp_path / "store").iterdir() if f.is_file()) == [good]
    assert other != good


def test_a_dead_decoding_worker_is_a_one_line_error(tmp_path):
    """A decoding worker killed mid-run (the OOM killer, a crash in a decoder) fails the stage with one
    line that names a file near it and says to rerun with dataset.workers=1; no process is left."""
    import threading

    import psutil

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(600):
        save_image(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), root / "ab"[i % 2] / f"{i}.jpg")
    errors = []

    def stage() -> None:
        try:
            run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, "workers": 2}, {}, tmp_path / "out")
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    def decoding_workers() -> list:
        found = []
        for child in psutil.Process().children():
            try:
                if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.Error:  # ended meanwhile
                pass
        return found

    thread = threading.Thread(target=stage)
    thread.start()
    store = tmp_path / "out" / ".decoded.tmp"  # the packs the workers write

    try:
        until(lambda: any(store.glob("*.pack")) or not thread.is_alive(), timeout=120,
              what="a worker to write a pack of decoded rows")
        assert thread.is_alive(), "the stage ended before a worker could be killed"
        decoding_workers()[0].kill()
    finally:
        thread.join(timeout=120)
    [error] = errors
    assert isinstance(error, StageError), repr(error)
    error = str(error)
    assert "a decoding worker died" in error and "dataset.workers=1" in error and "\n" not in error
    assert "near 'a/" in error or "near 'b/" in error
    until(lambda: not decoding_workers(), timeout=30, what="the other worker to end")


def kept_packs(scratch: Path) -> list[Path]:
    return sorted(scratch.glob("decoded/*/*.pack"))


def kept_rows(scratch: Path, size: int = 16) -> dict[str, bytes]:
    """Every row the kept packs under ``scratch`` hold, by the digest their headers name."""
    found = {}
    for pack in kept_packs(scratch):
        store = PackStore(str(pack.parent), (size, size, 3))
        digests, data = store.header(str(pack)), pack.read_bytes()
        for slot, digest in enumerate(digests):
            at = store.offset(len(digests), slot)
            found[digest] = data[at : at + store.row]
    return found


def test_kept_decoded_images_reused(tmp_path):
    """With a scratch folder, a re-run decodes only new or changed files (none for a new split seed), in
    worker processes too, and writes the bytes a cold run writes; a deleted file leaves index.csv; a
    damaged pack is decoded again; a killed run's old temp files go; no temp file is left in the store."""
    root = make_image_folder(tmp_path / "data", per_class=45, ext="jpg")
    scratch = tmp_path / "scratch"

    def same_as_cold(out: Path, **params) -> None:
        cold = tmp_path / f"cold_{out.name}"
        run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, **params}, {}, cold)
        names = sorted(f.name for f in cold.iterdir())
        assert names == sorted(f.name for f in out.iterdir())
        for name in names:
            assert (cold / name).read_bytes() == (out / name).read_bytes(), name

    def run(name: str, **params) -> dict:
        prm = {"kind": "folder", "path": root, "preprocess": PRE, "workers": 1, **params}
        return run_stage(Dataset, prm, {}, tmp_path / name, scratch=scratch)

    assert run("first")["decoded"] == 135
    assert run("seed", seed=1)["decoded"] == 0
    same_as_cold(tmp_path / "seed", seed=1)
    save_image(class_image(1, 99), root / CLASSES[0] / "img 0.jpg")  # changed
    save_image(class_image(2, 98), root / CLASSES[2] / "new.jpg")  # added
    (root / CLASSES[1] / "img 3.jpg").unlink()  # deleted
    assert run("changed", workers=2)["decoded"] == 2
    same_as_cold(tmp_path / "changed")
    assert f"{CLASSES[1]}/img 3.jpg" not in {r["path"] for r in _index(tmp_path / "changed")}
    assert len(kept_rows(scratch)) == 137 and not list(scratch.glob("decoded/*/.tmp/*/*"))
    kept = kept_packs(scratch)[0].parent  # scratch/decoded/<settings>/<pack>
    stale = kept / ".tmp" / "4242" / "0a1b.pack"  # what a run killed between write and rename leaves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    sha256 = hashlib.sha256((root / CLASSES[2] / "new.jpg").read_bytes()).hexdigest()
    [pack] = [f for f in kept_packs(scratch) if sha256 in PackStore(str(kept), (16, 16, 3)).header(str(f))]
    pack.write_bytes(pack.read_bytes()[:-1])  # damaged: its 2 rows are decoded again
    assert run("damaged")["decoded"] == 2
    same_as_cold(tmp_path / "damaged")
    assert not stale.parent.exists() and [f.name for f in (kept / ".tmp").iterdir()] == []


KILLED_RUN = """
import sys
from pathlib import Path
from engine.run.testing import run_stage
from stages.dataset import Dataset
root, out, scratch = map(Path, sys.argv[1:])
run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": {"input_size": 32}, "workers": 1}, {}, out,
          scratch=scratch)
"""


def test_killed_run_leaves_whole_entries(tmp_path):
    """SIGKILL in the middle of decoding: every pack of decoded rows left is whole and right (each row
    the pixels of the file whose sha256 its header names), and the next run decodes only the files
    without one."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(300):
        save_image(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), root / "ab"[i % 2] / f"{i}.jpg")
    scratch = tmp_path / "scratch"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(root), str(tmp_path / "killed"), str(scratch)],
                            cwd=Path(__file__).resolve().parents[2])
    try:  # 64 rows of 32 px a pack: a run makes 5
        until(lambda: len(kept_packs(scratch)) >= 1 or proc.poll() is not None, timeout=120,
              what="packs of decoded images to be kept")
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    spec = Preprocess(input_size=32)
    by_sha256 = {hashlib.sha256(f.read_bytes()).hexdigest(): f for f in root.rglob("*.jpg")}
    rows = kept_rows(scratch, size=32)
    assert 64 <= len(rows) < 300
    for digest, pixels in rows.items():
        assert pixels == resize(load_image(by_sha256[digest]), spec).tobytes(), digest
    m = run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": {"input_size": 32}}, {}, tmp_path / "next",
                  scratch=scratch)
    assert m["decoded"] == 300 - len(rows)


def test_gc_removes_decoded_images_unused_for_a_week(tmp_path):
    """`edgepipe gc` removes packs of kept decoded images not read or written for SCRATCH_DAYS (the
    scratch folder would otherwise grow with every file ever decoded); the next run decodes just the
    rows of those packs again."""
    from engine.store import gc

    root = make_image_folder(tmp_path / "data", per_class=30, ext="jpg")
    scratch = tmp_path / "cache" / ".scratch"

    def run(name: str) -> dict:
        return run_stage(Dataset, {"kind": "folder", "path": root, "preprocess": PRE, "workers": 1}, {},
                         tmp_path / name, scratch=scratch / "dataset")

    assert run("first")["decoded"] == 90
    found = kept_packs(scratch / "dataset")
    assert len(found) == 2  # 64 rows of 16 px a pack at most
    in_old = len(PackStore(str(found[0].parent), (16, 16, 3)).header(str(found[0])))  # read before aging it
    old = time.time() - (gc.SCRATCH_DAYS + 1) * 86400
    os.utime(found[0], (old, old))
    assert gc.collect_scratch(scratch, dry_run=True)[0] == 1 and kept_packs(scratch / "dataset") == found
    removed, freed = gc.collect_scratch(scratch)
    assert removed == 1 and freed == packs_size(in_old, 16 * 16 * 3)
    assert kept_packs(scratch / "dataset") == found[1:]
    assert run("again")["decoded"] == in_old


def packs_size(rows: int, row: int) -> int:
    return packs.HEADER.size + rows * (packs.DIGEST_BYTES + row)


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    """With decoded images kept, a re-run takes each unchanged file's sha256 from the stat it was
    recorded under (scratch/sources.sqlite) and its pixels from the kept entry: no file is read but a
    changed one; the outputs, duplicates.csv's sha1 column included, equal a cold run's."""
    root = make_image_folder(tmp_path / "data", per_class=20, ext="jpg")
    for k in range(6):  # identical files in two classes: some land in two splits
        shutil.copy(root / CLASSES[0] / f"img {k}.jpg", root / CLASSES[1] / f"copy {k}.jpg")
    scratch = tmp_path / "scratch"
    prm = {"kind": "folder", "path": root, "preprocess": PRE, "workers": 1}
    assert run_stage(Dataset, prm, {}, tmp_path / "first", scratch=scratch)["decoded"] == 66
    read, real = [], decoding.decode_one
    monkeypatch.setattr(decoding, "decode_one",
                        lambda file, array, spec: read.append(Path(file).name) or real(file, array, spec))
    assert run_stage(Dataset, prm, {}, tmp_path / "again", scratch=scratch)["decoded"] == 0 and read == []
    save_image(class_image(2, 97), root / CLASSES[2] / "img 1.jpg")
    assert run_stage(Dataset, prm, {}, tmp_path / "changed", scratch=scratch)["decoded"] == 1
    assert read == ["img 1.jpg"]
    run_stage(Dataset, prm, {}, tmp_path / "cold")
    assert len(_index(tmp_path / "cold")) == 66 and (tmp_path / "cold" / "duplicates.csv").read_text().count("\n") > 1
    for name in sorted(f.name for f in (tmp_path / "cold").iterdir()):
        assert (tmp_path / "changed" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes(), name


def test_copied_or_touched_files_take_their_kept_rows(tmp_path):
    """A file whose stat changed but not its bytes (touched, checked out again, the folder copied
    elsewhere) is hashed, not decoded: its kept row is found under its sha256; the arrays are a cold
    run's."""
    root = make_image_folder(tmp_path / "data", per_class=20, ext="jpg")
    scratch = tmp_path / "scratch"
    prm = {"kind": "folder", "path": root, "preprocess": PRE, "workers": 1}
    assert run_stage(Dataset, prm, {}, tmp_path / "first", scratch=scratch)["decoded"] == 60
    for f in root.rglob("*.jpg"):
        os.utime(f, (1, 1))
    shutil.copytree(root, tmp_path / "copy")
    save_image(class_image(0, 96), tmp_path / "copy" / CLASSES[0] / "img 2.jpg")
    assert run_stage(Dataset, prm, {}, tmp_path / "touched", scratch=scratch)["decoded"] == 0
    m = run_stage(Dataset, {**prm, "path": tmp_path / "copy"}, {}, tmp_path / "copied", scratch=scratch)
    assert m["decoded"] == 1
    run_stage(Dataset, {**prm, "path": tmp_path / "copy"}, {}, tmp_path / "cold")
    for name in ("images_train.npy", "images_val.npy", "images_test.npy", "index.csv"):
        assert (tmp_path / "copied" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes(), name


def test_an_unwritable_store_keeps_nothing_and_says_so(tmp_path, caplog):
    """A kept store whose folder cannot be made (here a file stands where it goes) costs the reuse next
    time, not the run: the rows go to a temporary store, a note names the folder, and the arrays are a
    cold run's."""
    root = make_image_folder(tmp_path / "data", per_class=4, ext="jpg")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "decoded").write_text("not a folder")
    prm = {"kind": "folder", "path": root, "preprocess": PRE, "workers": 1}
    with caplog.at_level("INFO"):
        assert run_stage(Dataset, prm, {}, tmp_path / "out", scratch=scratch)["decoded"] == 12
    assert any("decoded images are not kept this run" in r.message and str(scratch / "decoded") in r.message
               for r in caplog.records), caplog.text
    assert not (tmp_path / "out" / ".decoded.tmp").exists()
    run_stage(Dataset, prm, {}, tmp_path / "cold")
    for name in ("images_train.npy", "images_val.npy", "images_test.npy", "index.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes(), name
