"""The train stage's data side: the dataset stage's arrays as seeded, deterministic batches.

An ordinary module (imported inside ``Train.run``, never while planning), so its classes pickle for
DataLoader workers and Lightning's multi-process strategies. The shuffle order and every augmentation
are functions of (seed, epoch, sample index): the same seed gives the same batches whatever
``workers`` is, and a resumed run sees the same stream as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from stages.common.preprocess import normalize
from stages.common.splits import load_split, read_rows


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix-style): one stream per (seed, epoch, sample, use)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochBatchSampler:
    """Yields lists of (index, epoch); the order is a function of (seed, epoch) only. With several
    ranks (DDP), rank r takes global batches r, r + world, r + 2 world, ... of that same order, and
    every rank gets the same number of batches (a rank waiting for another's last step would hang)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        batches = self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return batches // self.world

    def __iter__(self):
        epoch = self.epoch
        if self.shuffle:
            order = np.random.default_rng(seed_for(self.seed, epoch, 1)).permutation(self.n)
        else:
            order = np.arange(self.n)
        for b in range(len(self)):
            start = (b * self.world + self.rank) * self.batch_size
            yield [(int(i), epoch) for i in order[start : start + self.batch_size]]


class ArrayBatches(torch.utils.data.Dataset):
    """Whole batches from the uint8 N x H x W x 3 arrays, normalised by preprocess.normalize."""

    def __init__(self, images, labels, spec, augment=None, seed: int = 0) -> None:
        self.images, self.labels, self.spec, self.seed = images, labels, spec, seed
        self.augment = augment if augment is not None and augment.enabled() else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch):
        idx = np.asarray([i for i, _ in batch], dtype=np.int64)
        # a sorted fancy-index read is fastest on a memmap; reorder afterwards. read_rows hands the
        # map's pages back, so an epoch over a 100,000-image split does not grow the process by it
        order = np.argsort(idx, kind="stable")
        raw = np.empty((len(idx),) + self.images.shape[1:], np.uint8)
        raw[order] = read_rows(self.images, idx[order])
        if self.augment is not None:
            seeds = [seed_for(self.seed, epoch, i, 2) for i, epoch in batch]
            raw = augment_batch(raw, self.augment, seeds)
        x = torch.from_numpy(normalize(raw, self.spec))
        y = torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))
        return x, y


def augment_batch(raw, aug, seeds: list[int]):
    """uint8 N x H x W x 3 -> augmented uint8 N x H x W x 3. Each sample's random parameters come
    from its own seed. Random resized crop, flips and rotation are composed into one affine map per
    sample and applied to the whole batch with one grid_sample (bilinear; rotation samples the
    surrounding image where there is one, black outside). Colour jitter: brightness, contrast,
    saturation (torchvision's formulas), hue as a rotation in YIQ space."""
    n, h, w, _ = raw.shape
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
    geometric = aug.random_resized_crop or aug.hflip or aug.vflip or aug.rotation
    theta = np.zeros((n, 2, 3), np.float64)
    jitter = np.ones((n, 4), np.float64)
    jitter[:, 3] = 0.0
    lo_r, hi_r = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    for k, sd in enumerate(seeds):
        rng = np.random.default_rng(sd)
        ax, ay, cx, cy = 1.0, 1.0, 0.0, 0.0
        if aug.random_resized_crop:
            for _ in range(10):
                area = rng.uniform(*aug.crop_scale)
                ratio = math.exp(rng.uniform(lo_r, hi_r))
                fw, fh = math.sqrt(area * ratio), math.sqrt(area / ratio)  # fractions of W, H
                if fw <= 1.0 and fh <= 1.0:
                    ax, ay = fw, fh
                    cx, cy = rng.uniform(-(1 - fw), 1 - fw), rng.uniform(-(1 - fh), 1 - fh)
                    break
        fx = -1.0 if aug.hflip and rng.random() < aug.hflip else 1.0
        fy = -1.0 if aug.vflip and rng.random() < aug.vflip else 1.0
        phi = math.radians(rng.uniform(-aug.rotation, aug.rotation)) if aug.rotation else 0.0
        # output -> input: crop(flip(rotate^-1(p))), rotation in pixel units (aspect-correct)
        c, s = math.cos(phi), math.sin(phi)
        rot = np.array([[c, s * h / w], [-s * w / h, c]])
        theta[k, :, :2] = np.diag([ax * fx, ay * fy]) @ rot
        theta[k, :, 2] = (cx, cy)
        if aug.brightness:
            jitter[k, 0] = rng.uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness)
        if aug.contrast:
            jitter[k, 1] = rng.uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast)
        if aug.saturation:
            jitter[k, 2] = rng.uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation)
        if aug.hue:
            jitter[k, 3] = rng.uniform(-aug.hue, aug.hue)
    if geometric:
        grid = F.affine_grid(torch.from_numpy(theta).float(), [n, 3, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        j = torch.from_numpy(jitter).float()
        gray_w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        if aug.brightness:
            x = (x * j[:, 0].view(n, 1, 1, 1)).clamp(0, 255)
        if aug.contrast:
            m = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            x = ((x - m) * j[:, 1].view(n, 1, 1, 1) + m).clamp(0, 255)
        if aug.saturation:
            g = (x * gray_w).sum(1, keepdim=True)
            x = ((x - g) * j[:, 2].view(n, 1, 1, 1) + g).clamp(0, 255)
        if aug.hue:
            to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
            from_yiq = torch.linalg.inv(to_yiq)
            a = j[:, 3] * 2 * math.pi
            cos, sin = torch.cos(a), torch.sin(a)
            rot = torch.zeros(n, 3, 3)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            m = from_yiq @ rot @ to_yiq  # n x 3 x 3
            x = torch.einsum("nij,njhw->nihw", m, x).clamp(0, 255)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

class NpyDataModule(pl.LightningDataModule):
    """The dataset stage's arrays as train/val/test loaders (one batch = one dataset item)."""

    def __init__(self, folder: Path, spec, batch_size: int, workers: int, augment, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.folder, self.spec, self.batch_size, self.workers = Path(folder), spec, batch_size, workers
        self.augment, self.seed = augment, seed
        self.rank, self.world = rank, world  # training batches are split between DDP ranks
        self.arrays: dict[str, tuple[Any, Any]] = {}
        for split in ("train", "val", "test"):
            self.arrays[split] = load_split(self.folder, split, size=tuple(spec.input_size))

    def size(self, split: str) -> int:
        return len(self.arrays[split][1])

    def _loader(self, split: str, train: bool):
        images, labels = self.arrays[split]
        ds = ArrayBatches(images, labels, self.spec, self.augment if train else None, self.seed)
        n = len(labels)
        sampler = EpochBatchSampler(n, self.batch_size, shuffle=train, drop_last=train and n > self.batch_size,
                                    seed=self.seed, rank=self.rank if train else 0, world=self.world if train else 1)
        # an own generator: creating the iterator must not draw from the global RNG (it would
        # shift dropout's stream depending on when Lightning creates the iterator)
        return torch.utils.data.DataLoader(
            ds, sampler=sampler, batch_size=None, num_workers=self.workers,
            persistent_workers=self.workers > 0, pin_memory=False,
            generator=torch.Generator().manual_seed(seed_for(self.seed, 4)),
        )

    def sample_batches(self, split: str, limit: int | None) -> SampleBatches:
        """Un-augmented batches of a fixed, seeded sample of ``split`` (at most ``limit`` images, None:
        all): the same images in the same order every epoch, for BatchNorm recalibration and the
        eval-mode train accuracy. The order is a seeded permutation, never the stored one: the dataset
        stage stores a split in class order, and BatchNorm statistics averaged over batches of one class
        each miss the variance between classes (eval mode then normalises with variances that are far
        too small: 0.62 eval-mode accuracy on the training images of a model at 0.97 in train mode)."""
        images, labels = self.arrays[split]
        n = len(labels)
        pick = np.random.default_rng(seed_for(self.seed, 5)).permutation(n)
        if limit is not None:
            pick = pick[:limit]
        return SampleBatches(ArrayBatches(images, labels, self.spec), pick, self.batch_size)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


class SampleBatches:
    """Batches of chosen indices of an ArrayBatches, read lazily (a whole split never sits in memory)."""

    def __init__(self, batches: ArrayBatches, indices: np.ndarray, batch_size: int) -> None:
        self.batches, self.indices, self.batch_size = batches, indices, batch_size

    def _bounds(self) -> list[tuple[int, int]]:
        n, bs = len(self.indices), self.batch_size
        bounds = [(start, min(start + bs, n)) for start in range(0, n, bs)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            # a lone last image: train-mode BatchNorm cannot take one value per channel (1x1 maps)
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    def __len__(self) -> int:
        return len(self._bounds())

    def __iter__(self):
        for start, stop in self._bounds():
            yield self.batches[[(int(i), 0) for i in self.indices[start:stop]]]
