"""Reading a split of a `dataset` stage's output: the one place that knows its file names and checks
them, for every stage that takes a `data` input (train, calibration, rknn_quantize, evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.contract.stage import StageError

SPLITS = ("train", "val", "test")


def split_files(folder: Path, split: str) -> tuple[Path, Path]:
    return Path(folder) / f"images_{split}.npy", Path(folder) / f"labels_{split}.npy"


def load_split(folder: Path, split: str, size: tuple[int, int] | None = None, what: str = "input data",
               split_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x H x W x 3 RGB, memory-mapped; labels int64 N) of one split, checked.

    `size` (H, W), when given, must match the images: the model's input size. `split_key` names the
    config key that chose the split, for the message when the dataset has no such split."""
    img_file, lab_file = split_files(folder, split)
    for f in (img_file, lab_file):
        if not f.is_file():
            hint = (f"{split_key}={split!r} is not a split of this dataset" if split_key
                    else "expected a dataset stage's output")
            raise StageError(f"{what}: {folder} has no {f.name}: {hint}")
    images = np.load(img_file, mmap_mode="r")
    labels = np.load(lab_file).astype(np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise StageError(f"{what}: {img_file.name} holds {images.dtype} {list(images.shape)}; "
                         "expected uint8 N x H x W x 3 (RGB)")
    if len(images) != len(labels):
        raise StageError(f"{what}: {img_file.name} has {len(images)} images but {lab_file.name} {len(labels)} labels")
    if size is not None and len(images) and tuple(images.shape[1:3]) != tuple(size):
        raise StageError(f"{what}: {img_file.name} images are {tuple(images.shape[1:3])} (H, W) but the model takes "
                         f"{tuple(size)}: the dataset and the model were made with different preprocess.input_size")
    return images, labels


def read_rows(images: np.ndarray, rows) -> np.ndarray:
    """A copy of some rows (a slice or sorted indices) of a split's memory-mapped array. The map's pages
    are handed back afterwards (MADV_DONTNEED; they stay in the page cache): pages read through a map
    count as the process's resident memory until unmapped, so reading a 100,000-image split batch by
    batch would otherwise grow the process by the whole file."""
    import mmap

    batch = np.array(images[rows])
    mapped = getattr(images, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    return batch
