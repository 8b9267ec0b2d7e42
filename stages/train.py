"""The ``train`` stage: Lightning training of a model-zoo network on a dataset stage's arrays.

Inputs: ``data`` (a dataset output folder), optional ``init`` (a folder holding ``model.pt`` — e.g. a
clip_outliers or train output — used as starting weights by ``mode: finetune``; or a train output
whose ``checkpoints/last.ckpt`` ``mode: resume`` continues).

Determinism: the shuffle order and every augmentation are functions of (seed, epoch, sample index),
and the main RNG is reseeded from (seed, epoch) at each epoch start. The same seed gives the same
metrics, whatever ``workers`` is, and a resumed run sees the same data stream as an uninterrupted one.

Normalisation is ``stages.common.preprocess.normalize`` applied to each uint8 batch, the very function
evaluation, calibration and the deploy scripts call. Augmentations (random resized crop, flips,
rotation, colour jitter) act on uint8 tensors before it and never at evaluation.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.stage import HASH_CONTENT, NOT_IN_KEY, Context, Input, Params, Stage, StageError
from stages.common.models import ModelParams

_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning", "torch.utils.data")


class Augment(Params):
    """Training-time augmentations, applied per batch on uint8 pixels before normalisation; never at
    evaluation. All off = no augmentation."""

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.0  # probability; 0.5 for natural images (digits are not mirror-symmetric)
    vflip: float = 0.0
    rotation: float = 0.0  # max degrees either way
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "Augment":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must satisfy 0 < low <= high")
        for k in ("hflip", "vflip"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} is a probability in [0, 1]")
        if not 0 <= self.hue <= 0.5:
            raise ValueError("hue must be in [0, 0.5]")
        for k in ("rotation", "brightness", "contrast", "saturation"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")
        return self

    def enabled(self) -> bool:
        return bool(
            self.random_resized_crop or self.hflip or self.vflip or self.rotation
            or self.brightness or self.contrast or self.saturation or self.hue
        )


class EarlyStopping(Params):
    patience: int = 5
    min_delta: float = 0.0


class Train(Stage):
    name = "train"
    version = 1
    sections = {"model": "model"}
    inputs = {
        "data": Input(required=True, doc="a dataset stage output (images_*.npy, labels_*.npy, preprocess.json)"),
        "init": Input(required=False, doc="model.pt to finetune from, or a train output to resume"),
    }

    class Params(Params):
        mode: Literal["fromscratch", "finetune", "resume"] = "fromscratch"
        epochs: int = Field(10, ge=1)
        batch_size: int = Field(64, ge=1)
        optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
        lr: float = Field(1e-3, gt=0)
        weight_decay: float = Field(1e-4, ge=0)  # not applied to biases and norm layers
        momentum: float = 0.9  # sgd
        nesterov: bool = False  # sgd
        scheduler: Literal["none", "step", "cosine"] = "cosine"
        step_every: int = Field(10, ge=1)  # step: multiply lr by step_factor every step_every epochs
        step_factor: float = 0.1
        min_lr: float = 0.0  # cosine floor
        label_smoothing: float = 0.0
        # finetune: train only the classifier head (and GeM p); BN statistics stay frozen
        freeze_features: bool = False
        # resume: a .ckpt file or a train output folder (default: the init input's last.ckpt)
        resume_from: Annotated[Path | None, HASH_CONTENT] = None
        augment: Augment = Augment()
        early_stopping: EarlyStopping | None = None  # monitors val_acc
        checkpoint_every: int = 0  # also keep checkpoints/epoch=N.ckpt every N epochs (0: off)
        seed: int = 0
        precision: Literal["32", "64", "bf16-mixed", "16-mixed"] = "32"
        accelerator: Literal["auto", "cpu", "gpu"] = "auto"
        # cap on training batches per epoch (int) or fraction (float); null: all (tests, smoke runs)
        limit_train_batches: int | float | None = None
        workers: Annotated[int, NOT_IN_KEY] = 0
        model: ModelParams = ModelParams()

        @field_validator("precision", mode="before")
        @classmethod
        def _precision(cls, v: Any) -> Any:
            return {32: "32", 64: "64", "32-true": "32", "64-true": "64", 16: "16-mixed", "bf16": "bf16-mixed"}.get(v, v)

        @model_validator(mode="after")
        def _check(self) -> "Train.Params":
            if self.epochs < 1:
                raise ValueError("epochs must be >= 1")
            if self.batch_size < 1:
                raise ValueError("batch_size must be >= 1")
            if self.lr <= 0:
                raise ValueError("lr must be > 0")
            if self.step_every < 1:
                raise ValueError("step_every must be >= 1")
            if self.workers < 0:
                raise ValueError("workers must be >= 0")
            if self.checkpoint_every < 0:
                raise ValueError("checkpoint_every must be >= 0 (0 = off)")
            if not 0 <= self.label_smoothing < 1:
                raise ValueError("label_smoothing must be in [0, 1)")
            if self.resume_from is not None and self.mode != "resume":
                raise ValueError("resume_from is only used with mode: resume")
            if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
                raise ValueError("nesterov needs momentum > 0")
            if self.freeze_features and self.mode != "finetune":
                raise ValueError("freeze_features needs mode: finetune")
            return self

    # ------------------------------------------------------------------------------------------
    def run(self, params: "Train.Params", inputs, out: Path, ctx: Context) -> dict[str, Any]:
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _parts()  # import Lightning first: its import resets its logger's level
        levels = {name: logging.getLogger(name).level for name in _LOGGERS}
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return _train(params, inputs, out, ctx)
                finally:
                    _write_warnings(caught, logs / "warnings.log")
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _write_warnings(caught, path: Path) -> None:
    seen: dict[str, None] = {}
    for w in caught:
        seen.setdefault(f"{w.category.__name__}: {str(w.message).strip()}", None)
    if seen:
        path.write_text("\n".join(seen) + "\n", encoding="utf-8")


# -- torch parts, created on first use (the engine imports this module without torch) ------------
_PARTS: dict[str, Any] = {}


def _seed_for(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _parts() -> dict[str, Any]:
    if _PARTS:
        return _PARTS
    import numpy as np
    import pytorch_lightning as pl
    import torch
    from torch import nn

    from stages.common.models import build_model, trainable_prefixes
    from stages.common.preprocess import normalize
    from stages.common.splits import load_split

    class EpochBatchSampler:
        """Yields lists of (index, epoch); the order is a function of (seed, epoch) only."""

        def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int) -> None:
            self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __len__(self) -> int:
            return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

        def __iter__(self):
            epoch = self.epoch
            if self.shuffle:
                order = np.random.default_rng(_seed_for(self.seed, epoch, 1)).permutation(self.n)
            else:
                order = np.arange(self.n)
            for start in range(0, len(self) * self.batch_size, self.batch_size):
                yield [(int(i), epoch) for i in order[start : start + self.batch_size]]

    class ArrayBatches(torch.utils.data.Dataset):
        """Whole batches from the uint8 N x H x W x 3 arrays, normalised by preprocess.normalize."""

        def __init__(self, images, labels, spec, augment: Augment | None = None, seed: int = 0) -> None:
            self.images, self.labels, self.spec, self.seed = images, labels, spec, seed
            self.augment = augment if augment is not None and augment.enabled() else None

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, batch):
            idx = np.asarray([i for i, _ in batch], dtype=np.int64)
            # a sorted fancy-index read is fastest on a memmap; reorder afterwards
            order = np.argsort(idx, kind="stable")
            raw = np.empty((len(idx),) + self.images.shape[1:], np.uint8)
            raw[order] = self.images[idx[order]]
            if self.augment is not None:
                seeds = [_seed_for(self.seed, epoch, i, 2) for i, epoch in batch]
                raw = augment_batch(raw, self.augment, seeds)
            x = torch.from_numpy(normalize(raw, self.spec))
            y = torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))
            return x, y

    def augment_batch(raw, aug: Augment, seeds: list[int]):
        """uint8 N x H x W x 3 -> augmented uint8 N x H x W x 3. Each sample's random parameters come
        from its own seed. Random resized crop, flips and rotation are composed into one affine map per
        sample and applied to the whole batch with one grid_sample (bilinear; rotation samples the
        surrounding image where there is one, black outside). Colour jitter: brightness, contrast,
        saturation (torchvision's formulas), hue as a rotation in YIQ space."""
        import math

        import torch.nn.functional as F

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

        def __init__(self, folder: Path, spec, batch_size: int, workers: int, augment: Augment, seed: int) -> None:
            super().__init__()
            self.folder, self.spec, self.batch_size, self.workers = Path(folder), spec, batch_size, workers
            self.augment, self.seed = augment, seed
            self.arrays: dict[str, tuple[Any, Any]] = {}
            for split in ("train", "val", "test"):
                self.arrays[split] = load_split(self.folder, split, size=tuple(spec.input_size))

        def size(self, split: str) -> int:
            return len(self.arrays[split][1])

        def _loader(self, split: str, train: bool):
            images, labels = self.arrays[split]
            ds = ArrayBatches(images, labels, self.spec, self.augment if train else None, self.seed)
            n = len(labels)
            sampler = EpochBatchSampler(n, self.batch_size, shuffle=train, drop_last=train and n > self.batch_size, seed=self.seed)
            # an own generator: creating the iterator must not draw from the global RNG (it would
            # shift dropout's stream depending on when Lightning creates the iterator)
            return torch.utils.data.DataLoader(
                ds, sampler=sampler, batch_size=None, num_workers=self.workers,
                persistent_workers=self.workers > 0, pin_memory=False,
                generator=torch.Generator().manual_seed(_seed_for(self.seed, 4)),
            )

        def train_dataloader(self):
            return self._loader("train", True)

        def val_dataloader(self):
            return self._loader("val", False)

        def test_dataloader(self):
            return self._loader("test", False)

    class Classifier(pl.LightningModule):
        def __init__(self, arch: dict, num_classes: int, opt: dict) -> None:
            super().__init__()
            self.save_hyperparameters({"arch": arch, "num_classes": num_classes, "opt": opt})
            self.opt = opt
            self.model = build_model(arch, num_classes)
            self.criterion = nn.CrossEntropyLoss(label_smoothing=opt["label_smoothing"])
            self.frozen_modules: list[nn.Module] = []

        def freeze_features(self) -> None:
            keep = tuple(trainable_prefixes(self.model))
            for name, prm in self.model.named_parameters():
                prm.requires_grad = name.startswith(keep)
            self.frozen_modules = [
                m for name, m in self.model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (name + ".").startswith(keep)
            ]

        def forward(self, x):
            return self.model(x)

        def _step(self, batch, prefix: str):
            x, y = batch
            logits = self.model(x)
            loss = self.criterion(logits, y)
            acc = (logits.argmax(1) == y).float().mean()
            self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
            self.log(f"{prefix}_acc", acc, on_step=False, on_epoch=True, batch_size=len(y))
            return loss

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            self._step(batch, "val")

        def on_train_batch_start(self, batch, batch_idx: int) -> None:
            if batch_idx == 0:  # dropout etc.: a function of (seed, epoch), resumed or not
                torch.manual_seed(_seed_for(self.opt["seed"], self.current_epoch, 3))

        def on_train_epoch_start(self) -> None:
            for m in self.frozen_modules:
                m.eval()
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

        def configure_optimizers(self):
            o = self.opt
            decay, no_decay = [], []
            for name, prm in self.model.named_parameters():
                if prm.requires_grad:
                    (no_decay if prm.ndim <= 1 else decay).append(prm)
            groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
            if o["optimizer"] == "sgd":
                opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"])
            elif o["optimizer"] == "adam":
                opt = torch.optim.Adam(groups, lr=o["lr"])
            else:
                opt = torch.optim.AdamW(groups, lr=o["lr"])
            if o["scheduler"] == "step":
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o["step_every"], gamma=o["step_factor"])
            elif o["scheduler"] == "cosine":
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o["epochs"], eta_min=o["min_lr"])
            else:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    class EpochBook(pl.Callback):
        """Per-epoch history, last/best/periodic checkpoints, progress and train throughput."""

        def __init__(self, ckpt_dir: Path, every: int, epochs: int, ctx: Context, has_val: bool) -> None:
            self.ckpt_dir, self.every, self.epochs, self.ctx, self.has_val = ckpt_dir, every, epochs, ctx, has_val
            self.history: list[dict] = []
            self.best_acc: float | None = None
            self.best_epoch: int | None = None
            self.best_state: dict | None = None
            self.train_seconds: list[float] = []
            self.train_images: list[int] = []
            self.step_rates: list[float] = []  # images/s of each training step after the first epoch
            self._t0 = 0.0
            self._tb = 0.0
            self._n = 0
            self._timing = False
            self._nb = 1

        @property
        def state_key(self) -> str:
            return "edgepipe.EpochBook"

        def state_dict(self) -> dict:
            return {"history": self.history, "best_acc": self.best_acc, "best_epoch": self.best_epoch}

        def load_state_dict(self, state: dict) -> None:
            self.history = list(state.get("history", []))
            self.best_acc, self.best_epoch = state.get("best_acc"), state.get("best_epoch")

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._nb = max(1, int(trainer.num_training_batches) if trainer.num_training_batches != float("inf") else 1)
            self._n, self._timing, self._t0 = 0, True, time.perf_counter()
            self._tb = self._t0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.train_seconds and batch_idx > 0:  # not the warm-up epoch, not the first fetch
                self.step_rates.append(len(batch[1]) / max(now - self._tb, 1e-9))
            self._tb = now
            self._n += len(batch[1])
            step = max(1, self._nb // 20)
            if (batch_idx + 1) % step == 0:
                e = trainer.current_epoch
                self.ctx.progress(e + (batch_idx + 1) / self._nb, self.epochs, f"epoch {e + 1}/{self.epochs} batch {batch_idx + 1}/{self._nb}")

        def _stop_timer(self) -> None:
            if self._timing:
                self.train_seconds.append(time.perf_counter() - self._t0)
                self.train_images.append(self._n)
                self._timing = False

        def on_validation_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self._stop_timer()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self._stop_timer()
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            epoch = trainer.current_epoch + 1
            row = {"epoch": epoch}
            for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                if k in m:
                    row[k] = m[k]
            self.history = [h for h in self.history if h["epoch"] < epoch] + [row]
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            val = row.get("val_acc")
            improved = self.has_val and val is not None and (self.best_acc is None or val > self.best_acc)
            if improved:
                self.best_acc, self.best_epoch = val, epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt", weights_only=False)
            if improved:
                shutil.copyfile(self.ckpt_dir / "last.ckpt", self.ckpt_dir / "best.ckpt")
            if self.every and epoch % self.every == 0:
                shutil.copyfile(self.ckpt_dir / "last.ckpt", self.ckpt_dir / f"epoch={epoch}.ckpt")
            desc = f"epoch {epoch}/{self.epochs} loss {row.get('train_loss', float('nan')):.3f}"
            if val is not None:
                desc += f" val_acc {val:.3f}"
            self.ctx.progress(epoch, self.epochs, desc)

    _PARTS.update(
        np=np, pl=pl, torch=torch, nn=nn, NpyDataModule=NpyDataModule, Classifier=Classifier,
        EpochBook=EpochBook, EpochBatchSampler=EpochBatchSampler, ArrayBatches=ArrayBatches,
        augment_batch=augment_batch,
    )
    return _PARTS


def _opt_dict(p: "Train.Params") -> dict:
    keys = ("optimizer", "lr", "weight_decay", "momentum", "nesterov", "scheduler", "step_every", "step_factor",
            "min_lr", "label_smoothing", "epochs", "seed")
    return {k: getattr(p, k) for k in keys}


def _read_classes(data: Path) -> list[str]:
    f = data / "labels.txt"
    if not f.is_file():
        raise StageError(f"input 'data' ({data}) has no labels.txt: wire a dataset stage output")
    return [line for line in f.read_text(encoding="utf-8").splitlines() if line]


def _resume_checkpoint(p: "Train.Params", inputs) -> Path:
    src = p.resume_from if p.resume_from is not None else inputs.get("init")
    if src is None:
        raise StageError("train.mode=resume needs train.resume_from (a .ckpt or a train output) or an 'init' input")
    src = Path(src)
    ckpt = src / "checkpoints" / "last.ckpt" if src.is_dir() else src
    if not ckpt.is_file():
        raise StageError(f"resume checkpoint not found: {ckpt} (expected a train output's checkpoints/last.ckpt)")
    return ckpt


def _next_epoch(ckpt_path: Path, torch) -> int:
    """The epoch index a Lightning checkpoint resumes at."""
    try:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"cannot read checkpoint {ckpt_path}: {type(e).__name__}: {e}") from None
    try:
        return int(ck["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ck.get("epoch", -1)) + 1


def make_trainer(p: "Train.Params", out: Path, callbacks: list, loggers: bool = True):
    """The Trainer the stage uses (also used by bench/train_throughput.py)."""
    P = _parts()
    pl = P["pl"]
    kwargs: dict[str, Any] = {}
    if loggers:
        from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

        kwargs["logger"] = [
            TensorBoardLogger(save_dir=str(out / "logs"), name="tensorboard", version="", default_hp_metric=False),
            CSVLogger(save_dir=str(out / "logs"), name="csv", version=""),
        ]
    else:
        kwargs["logger"] = False
    precision = {"32": "32-true", "64": "64-true"}.get(p.precision, p.precision)
    return pl.Trainer(
        max_epochs=p.epochs,
        accelerator=p.accelerator,
        devices=1,
        precision=precision,
        # CPU ops are deterministic; a CUDA op without a deterministic kernel (adaptive pooling's
        # backward) warns into logs/warnings.log instead of failing the run
        deterministic="warn",
        benchmark=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_train_batches=p.limit_train_batches,
        log_every_n_steps=10,
        default_root_dir=str(out),
        **kwargs,
    )


def _evaluate(module, loader, torch) -> tuple[float | None, float | None]:
    n, correct, loss_sum = 0, 0, 0.0
    module.eval()
    device = next(module.parameters()).device
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = module(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return (correct / n, loss_sum / n) if n else (None, None)


def _train(p: "Train.Params", inputs, out: Path, ctx: Context) -> dict[str, Any]:
    from stages.common.models import WeightsError, load_weights, save_model
    from stages.common.preprocess import Preprocess

    data = Path(inputs["data"])
    classes = _read_classes(data)
    if not (data / "preprocess.json").is_file():
        raise StageError(f"input 'data' ({data}) has no preprocess.json: wire a dataset stage output")
    spec = Preprocess.load(data)
    if p.model.in_channels != 3:
        raise StageError("model.in_channels must be 3 for the train stage (the dataset arrays are RGB)")

    # mode checks before anything heavy
    init = inputs.get("init")
    if p.mode == "fromscratch":
        if init is not None:
            raise StageError("an 'init' input is wired but train.mode=fromscratch; set train.mode=finetune (or resume)")
        if p.model.pretrained is not None:
            raise StageError("model.pretrained is set but train.mode=fromscratch; set train.mode=finetune or model.pretrained=null")
    ckpt_path = _resume_checkpoint(p, inputs) if p.mode == "resume" else None
    weights_src = None
    if p.mode == "finetune":
        if init is not None:
            weights_src = Path(init) / "model.pt"
            if not weights_src.is_file():
                raise StageError(f"'init' input {init} has no model.pt (wire a train or clip_outliers output)")
        elif p.model.pretrained is not None:
            weights_src = Path(p.model.pretrained)
            if not weights_src.is_file():
                raise StageError(f"model.pretrained: file not found: {weights_src}")
        else:
            raise StageError("train.mode=finetune needs model.pretrained=PATH or an 'init' input (a folder with model.pt)")

    P = _parts()
    torch, pl = P["torch"], P["pl"]
    det_before = torch.are_deterministic_algorithms_enabled()
    try:
        pl.seed_everything(p.seed, workers=False, verbose=False)
        dm = P["NpyDataModule"](data, spec, p.batch_size, p.workers, p.augment, p.seed)
        if dm.size("train") == 0:
            raise StageError(f"input 'data' ({data}) has no training images")
        has_val = dm.size("val") > 0
        if p.early_stopping is not None and not has_val:
            raise StageError("train.early_stopping monitors val_acc but the dataset has no validation split (dataset.split.val)")
        module = P["Classifier"](p.model.arch_dict(), len(classes), _opt_dict(p))
        init_report = None
        if weights_src is not None:
            try:
                init_report = load_weights(module.model, weights_src)
            except WeightsError as e:
                raise StageError(str(e)) from None
            init_report = {k: v for k, v in init_report.items() if k != "kept"}
            # no machine-specific absolute paths in the outputs (they are content-addressed)
            init_report["source"] = "init/model.pt" if init is not None else f"model.pretrained ({weights_src.name})"
            if p.freeze_features:
                module.freeze_features()
        if ckpt_path is not None:
            best_src = ckpt_path.parent / "best.ckpt"
            if best_src.is_file() and best_src != ckpt_path:
                (out / "checkpoints").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(best_src, out / "checkpoints" / "best.ckpt")
        book = P["EpochBook"](out / "checkpoints", p.checkpoint_every, p.epochs, ctx, has_val)
        callbacks: list = [book]
        if p.early_stopping is not None:
            from pytorch_lightning.callbacks import EarlyStopping as PLEarlyStopping

            callbacks.append(PLEarlyStopping(
                monitor="val_acc", mode="max", patience=p.early_stopping.patience,
                min_delta=p.early_stopping.min_delta, check_on_train_epoch_end=False,
            ))
        try:
            trainer = make_trainer(p, out, callbacks)
        except Exception as e:  # noqa: BLE001 - e.g. 16-mixed on a CPU
            raise StageError(f"cannot set up training (precision={p.precision}, accelerator={p.accelerator}): {e}") from None
        ctx.progress(0, p.epochs, f"training {p.model.arch} for {p.epochs} epochs")
        val_loader = dm.val_dataloader() if has_val else None
        train_loader = dm.train_dataloader()
        if ckpt_path is not None:
            # Lightning creates the first iterator (and prefetches) before it calls set_epoch on a
            # resumed run: start the sampler at the checkpoint's next epoch so the stream is the same
            train_loader.sampler.set_epoch(_next_epoch(ckpt_path, torch))
        try:
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                        ckpt_path=str(ckpt_path) if ckpt_path else None)
        except KeyError as e:
            raise StageError(f"checkpoint {ckpt_path} does not fit: missing {e}") from None
        except RuntimeError as e:
            if ckpt_path is not None and "state_dict" in str(e):
                raise StageError(f"checkpoint {ckpt_path} does not fit model.{p.model.arch}: {str(e)[:2000]}") from None
            raise

        # best weights: this run's best, else (resume without improvement) the copied best.ckpt, else last
        if book.best_state is not None:
            module.model.load_state_dict(book.best_state)
        elif (out / "checkpoints" / "best.ckpt").is_file() and has_val:
            from stages.common.models import read_state_dict

            sd, _ = read_state_dict(out / "checkpoints" / "best.ckpt")
            module.model.load_state_dict(sd)
        model = module.model.float().cpu().eval()
        val_acc, val_loss = _evaluate(model, dm.val_dataloader(), torch) if has_val else (None, None)
        test_acc, test_loss = _evaluate(model, dm.test_dataloader(), torch) if dm.size("test") else (None, None)
        save_model(out / "model.pt", model, p.model, len(classes))
    finally:
        torch.use_deterministic_algorithms(det_before)

    shutil.copyfile(data / "preprocess.json", out / "preprocess.json")
    shutil.copyfile(data / "labels.txt", out / "labels.txt")
    history = book.history
    best_epoch = book.best_epoch if has_val else (history[-1]["epoch"] if history else None)
    metrics = {
        "mode": p.mode,
        "arch": p.model.arch,
        "num_classes": len(classes),
        "n_train": dm.size("train"),
        "n_val": dm.size("val"),
        "n_test": dm.size("test"),
        "epochs_run": len(history),
        "stopped_early": bool(p.early_stopping is not None and history and history[-1]["epoch"] < p.epochs),
        "best_epoch": best_epoch,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "init": init_report,
        "resumed_from": (("init/" if p.resume_from is None else "resume_from/") + ckpt_path.name) if ckpt_path else None,
        "epochs": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    secs, imgs = book.train_seconds, book.train_images
    if len(secs) > 1:  # leave the first (warm-up) epoch out
        secs, imgs = secs[1:], imgs[1:]
    headline = {
        "val_acc": val_acc,
        "test_acc": test_acc,
        "best_epoch": best_epoch,
        "train_loss": history[-1].get("train_loss") if history else None,
        "epochs_run": len(history),
        "train_images_per_s": round(sum(imgs) / sum(secs), 1) if secs and sum(secs) > 0 else None,
        "train_images_per_s_median_step": round(statistics.median(book.step_rates), 1) if book.step_rates else None,
    }
    return headline
