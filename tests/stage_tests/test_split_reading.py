"""Training and calibration read a dataset split memory-mapped, a batch at a time, and hand the map's
pages back: after reading every row of a 24 MB split, the process holds almost none of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.calibration import picked_rows
from stages.common.splits import load_split

N, SIDE = 2000, 64  # 2000 x 64 x 64 x 3 = 24.6 MB


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(folder / "images_train.npy", "w+", np.uint8, (N, SIDE, SIDE, 3))
    for start in range(0, N, 250):
        images[start : start + 250] = rng.integers(0, 256, (250, SIDE, SIDE, 3), np.uint8)
    images.flush()
    del images
    np.save(folder / "labels_train.npy", (np.arange(N) % 4).astype(np.int64))
    return folder


def resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_training_batches_do_not_keep_the_split_resident(split):
    from stages.common.preprocess import Preprocess
    from stages.common.train_data import ArrayBatches, EpochBatchSampler

    images, labels = load_split(split, "train")
    batches = ArrayBatches(images, labels, Preprocess(input_size=SIDE))
    sampler = EpochBatchSampler(N, 128, shuffle=True, drop_last=False, seed=0)
    seen = []
    for batch in sampler:
        x, y = batches[batch]
        assert x.shape == (len(batch), 3, SIDE, SIDE)
        seen += [i for i, _ in batch]
    assert sorted(seen) == list(range(N))
    assert resident_kb(split / "images_train.npy") < 2000  # without handing pages back: ~24,000 kB
    first = batches[[(5, 0), (3, 0)]][1]
    assert first.tolist() == [5 % 4, 3 % 4]


def test_calibration_reads_picked_rows_without_keeping_the_split(split):
    images, labels = load_split(split, "train")
    assert isinstance(images, np.memmap)
    picked = np.arange(0, N, 1)
    seen = 0
    for (i, row), expected in zip(picked_rows(images, picked), range(N)):
        assert i == expected and row.shape == (SIDE, SIDE, 3)
        seen += 1
    assert seen == N
    # an untouched map holds nothing; a plain fancy-index read of the whole split would hold ~24,000 kB
    assert resident_kb(split / "images_train.npy") < 2000
    assert np.array_equal(dict(picked_rows(images, np.array([7])))[7], np.load(split / "images_train.npy")[7])
