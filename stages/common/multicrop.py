"""Multi-crop of the original test files, shared by ``evaluate`` and ``rknn_quantize`` (whose x86
simulator only runs in its build session, so it computes the RKNN model's crop logits there).

The dataset's arrays are already resized (stretched, letterboxed or centre-cropped) to the model's
input, so crops cannot be cut from them: multi-crop re-reads each test image's original file
(``index.csv`` path under ``MultiCrop.root``, normally ``dataset.path``), cuts K overlapping windows
of the model's aspect ratio along the long side and resizes each to the input size
(``crop_batches``). ``combine_crops`` turns N x K x C crop logits into the mean-probability and the
vote prediction.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from engine.contract.stage import HASH_CONTENT, Params, StageError

# original files read (and crops made) per batch: bounded memory for any split size
CHUNK = 64


class MultiCrop(Params):
    """``evaluate.multicrop``: K overlapping crops of the original (non-square) test images."""

    enabled: bool = False
    crops: int = Field(3, ge=2, le=16)
    # vote: a class wins when at least this share of the crops predicts it
    vote_threshold: float = Field(0.5, gt=0.0, le=1.0)
    # vote: the class predicted when no class reaches the threshold (e.g. "background"); null: fall back
    # to the mean-probability class and count the image as undecided
    negative_class: str | None = None
    # the folder index.csv paths are relative to (normally the dataset's `path`)
    root: Annotated[Path | None, HASH_CONTENT] = None


def crop_boxes(w: int, h: int, aspect: float, k: int) -> list[tuple[int, int, int, int]]:
    """K windows (left, top, right, bottom) of width/height ``aspect``, as large as the image allows,
    evenly spaced along its long side (overlapping when K windows do not fit side by side)."""
    if w / h >= aspect:
        ch, cw = h, max(1, min(w, round(h * aspect)))
        xs = np.linspace(0, w - cw, k).round().astype(int)
        return [(int(x), 0, int(x) + cw, ch) for x in xs]
    cw, ch = w, max(1, min(h, round(w / aspect)))
    ys = np.linspace(0, h - ch, k).round().astype(int)
    return [(0, int(y), cw, int(y) + ch) for y in ys]


def original_files(data: Path, split: str, n: int, root: Path, key: str = "evaluate.multicrop") -> list[Path]:
    """The original files of the first ``n`` rows of ``split``, checked to exist."""
    index = Path(data) / "index.csv"
    if not index.is_file():
        raise StageError(f"{key} needs {index} (the dataset's list of original files)")
    with open(index, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == split]
    if len(rows) < n:
        raise StageError(f"{index} lists {len(rows)} {split} images, the arrays hold {n}")
    root = Path(root)
    if root.is_file():
        root = root.parent
    paths = [root / row["path"] for row in rows[:n]]
    for i, path in enumerate(paths):
        if not path.is_file():
            raise StageError(f"{key}: {path} (index.csv row of {split} image {i}) does not exist; "
                             f"multicrop.root must be the folder index.csv paths are relative to (dataset.path). "
                             f"Datasets without files (kind=digits) cannot be multi-cropped")
    return paths


def crop_batches(files: list[Path], k: int, spec, hw: tuple[int, int], chunk: int = CHUNK
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, uint8 m x K x H x W x 3 crops) for consecutive chunks of ``files``, resized with
    ``spec`` (the model's preprocess: the code training used)."""
    from stages.common.preprocess_numpy import load_image, resize

    h, w = hw
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        crops = np.empty((len(part), k, h, w, 3), np.uint8)
        for i, path in enumerate(part):
            img = load_image(path)
            for j, box in enumerate(crop_boxes(img.width, img.height, w / h, k)):
                crops[i, j] = resize(img.crop(box), spec)
        yield start, crops


def combine_crops(crop_logits: np.ndarray, threshold: float, negative: int | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean-probability prediction, vote prediction, undecided mask) from N x K x C crop logits."""
    z = crop_logits - crop_logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pred_mean = prob.mean(1).argmax(-1)
    n, k, c = crop_logits.shape
    votes = np.zeros((n, c), np.int64)
    for j in range(k):
        np.add.at(votes, (np.arange(n), crop_logits[:, j].argmax(-1)), 1)
    if negative is not None:
        votes_pos = votes.copy()
        votes_pos[:, negative] = -1
        best = votes_pos.argmax(-1)
        decided = votes_pos[np.arange(n), best] >= threshold * k - 1e-9
        pred_vote = np.where(decided, best, negative)
        return pred_mean, pred_vote, np.zeros(n, bool)
    best = votes.argmax(-1)
    decided = votes[np.arange(n), best] >= threshold * k - 1e-9
    return pred_mean, np.where(decided, best, pred_mean), ~decided
