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

BatchNorm recalibration (``bn_recalibrate``, on by default): before each validation and before the
final save, BatchNorm running statistics are recomputed over a fixed sample of un-augmented training
images (stages/common/batchnorm.py), so the validation numbers, the checkpoint chosen as best on them,
and every exported or quantized model describe the weights as they are. A non-finite loss stops the
stage at once; a model that fits the training images but stays at chance on validation gets a warning.

The torch side lives in ordinary modules imported inside ``run``: stages/common/train_data.py (arrays
as seeded batches, augmentation) and stages/common/train_module.py (LightningModule, callbacks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.contract.stage import HASH_CONTENT, NOT_IN_KEY, Context, Input, Params, Stage, StageError
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
    def _check(self) -> Augment:
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
    peak_memory_mb = 1500  # MB, for run --jobs: Lightning, the model, its optimizer state and batches
    tools = ("torch", "pytorch-lightning")  # their versions are in the cache key
    # 2: BatchNorm recalibration, train_eval_acc and learning_check in metrics.json
    # 3: recalibration batches drawn as a seeded permutation, not in the class order splits are stored in
    version = 3
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
        # several devices: one DDP process each (torchrun-style workers the stage starts itself);
        # batch_size is per device, as in Lightning. In the key: they change what is computed
        devices: int = Field(1, ge=1)
        strategy: Literal["auto", "ddp"] = "auto"  # auto: ddp when devices > 1; ddp_spawn is ddp here
        sync_batchnorm: bool = False  # DDP: BatchNorm statistics over all ranks' batches
        # cap on training batches per epoch (int) or fraction (float); null: all (tests, smoke runs)
        limit_train_batches: int | float | None = None
        workers: Annotated[int, NOT_IN_KEY] = 0
        # recompute BatchNorm running statistics before each validation and before the final save,
        # over this many un-augmented training images (null: all); see README "BatchNorm recalibration"
        bn_recalibrate: bool = True
        bn_recalibrate_images: int | None = Field(1024, ge=1)
        model: ModelParams = ModelParams()

        @field_validator("precision", mode="before")
        @classmethod
        def _precision(cls, v: Any) -> Any:
            return {32: "32", 64: "64", "32-true": "32", "64-true": "64", 16: "16-mixed",
                    "bf16": "bf16-mixed"}.get(v, v)

        @field_validator("strategy", mode="before")
        @classmethod
        def _strategy(cls, v: Any) -> Any:
            # Lightning's ddp_spawn exists so that ranks start without re-running the command line,
            # which is how every rank starts here: it is ddp by another name (and the same key).
            if v == "ddp_spawn":
                return "ddp"
            if isinstance(v, str) and v.startswith(("fsdp", "deepspeed")):
                raise ValueError(f"{v} shards a model too large for one device; the models here fit one "
                                 "many times over: use ddp (train.devices=N)")
            return v

        @model_validator(mode="after")
        def _check(self) -> Train.Params:
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

    @classmethod
    def check_inputs(cls, params: Train.Params, wired: set[str]):
        # said at plan, not after the dataset stage ran
        if params.mode == "finetune" and "init" not in wired and params.model.pretrained is None:
            yield ("model.pretrained", "train.mode=finetune needs starting weights: set model.pretrained (imagenet, "
                                       "or a weights file), or wire an 'init' input (a folder with model.pt)")

    # ------------------------------------------------------------------------------------------
    def run(self, params: Train.Params, inputs, out: Path, ctx: Context) -> dict[str, Any]:
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import stages.common.train_module  # noqa: F401 - Lightning first: its import resets its loggers' level
        levels = {name: logging.getLogger(name).level for name in _LOGGERS}
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return _train(params, inputs, out, ctx)
                finally:
                    if os.environ.get("RANK", "0") == "0":  # DDP ranks: one writer
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


def _opt_dict(p: Train.Params) -> dict:
    keys = ("optimizer", "lr", "weight_decay", "momentum", "nesterov", "scheduler", "step_every", "step_factor",
            "min_lr", "label_smoothing", "epochs", "seed")
    return {k: getattr(p, k) for k in keys}


def _read_classes(data: Path) -> list[str]:
    from stages.common.bundle import read_labels

    if not (data / "labels.txt").is_file():
        raise StageError(f"input 'data' ({data}) has no labels.txt: wire a dataset stage output")
    return read_labels(data)


def _resume_checkpoint(p: Train.Params, inputs) -> Path:
    src = p.resume_from if p.resume_from is not None else inputs.get("init")
    if src is None:
        raise StageError("train.mode=resume needs train.resume_from (a .ckpt or a train output) or an 'init' input")
    src = Path(src)
    ckpt = src / "checkpoints" / "last.ckpt" if src.is_dir() else src
    if not ckpt.is_file():
        raise StageError(f"resume checkpoint not found: {ckpt} (expected a train output's checkpoints/last.ckpt)")
    return ckpt


def _next_epoch(ckpt_path: Path) -> int:
    """The epoch index a Lightning checkpoint resumes at (read safely: no code runs from the file)."""
    from stages.common.models import WeightsError, safe_torch_load

    try:
        ck = safe_torch_load(ckpt_path)
    except WeightsError as e:
        raise StageError(f"train.resume_from: {e}") from None
    try:
        return int(ck["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ck.get("epoch", -1)) + 1 if isinstance(ck, dict) else 0


def _finetune_source(p: Train.Params, inputs) -> Path | None:
    """The weights file a finetune starts from (None for other modes); mode/input mismatches are errors."""
    init = inputs.get("init")
    if p.mode == "fromscratch":
        if init is not None:
            raise StageError("an 'init' input is wired but train.mode=fromscratch; set train.mode=finetune (or resume)")
        if p.model.pretrained is not None:
            raise StageError("model.pretrained is set but train.mode=fromscratch; set train.mode=finetune or "
                             "model.pretrained=null")
    if p.mode != "finetune":
        return None
    if init is not None:
        src = Path(init) / "model.pt"
        if not src.is_file():
            raise StageError(f"'init' input {init} has no model.pt (wire a train or clip_outliers output)")
        return src
    if p.model.pretrained is None:
        raise StageError("train.mode=finetune needs model.pretrained (imagenet, or a weights file) or an 'init' "
                         "input (a folder with model.pt)")
    if not Path(p.model.pretrained).is_file():
        raise StageError(f"model.pretrained: file not found: {p.model.pretrained}")
    return Path(p.model.pretrained)


def make_trainer(p: Train.Params, out: Path, callbacks: list, loggers: bool = True):
    """The Trainer the stage uses (also used by bench/train_throughput.py)."""
    import pytorch_lightning as pl

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
        devices=p.devices,
        strategy="ddp" if p.devices > 1 else "auto",
        sync_batchnorm=p.sync_batchnorm and p.devices > 1,
        use_distributed_sampler=False,  # EpochBatchSampler splits the batches between ranks itself
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


def _build_module(p: Train.Params, classes: list[str], weights_src: Path | None, inputs, ctx: Context):
    """The LightningModule, with finetune weights loaded (the head following the class names when the
    source carries them); (module, init report or None)."""
    from stages.common.bundle import read_labels
    from stages.common.models import WeightsError, load_weights
    from stages.common.pretrained import categories, published_hash_mismatch, read_keyed_file
    from stages.common.train_module import Classifier

    module = Classifier(p.model.arch_dict(), len(classes), _opt_dict(p))
    if weights_src is None:
        return module, None
    init = inputs.get("init")
    source = "input 'init'" if init is not None else "model.pretrained"
    data = None  # the bytes checked against the key, loaded as they are (a file changed since is refused)
    if init is None:
        data, digest = read_keyed_file(weights_src, ctx.content_digests.get("model.pretrained"))
        if p.model.pretrained_weights and (warning := published_hash_mismatch(weights_src, digest)):
            ctx.log.warning("%s: model.pretrained: %s", ctx.stage, warning)
    if init is not None:
        source_labels = read_labels(init) if (Path(init) / "labels.txt").is_file() else None
    else:  # published weights: their head is ImageNet's (a file placed by hand may have any row count)
        source_labels = categories(p.model.pretrained_weights) if p.model.pretrained_weights else None
    try:
        report = load_weights(module.model, weights_src, labels=classes, source_labels=source_labels, data=data)
    except WeightsError as e:
        raise StageError(f"{source}: {e}") from None
    report = {k: v for k, v in report.items() if k != "kept"}
    # no machine-specific absolute paths in the outputs (they are content-addressed)
    report["source"] = ("init/model.pt" if init is not None else p.model.pretrained_weights
                        or f"model.pretrained ({weights_src.name})")
    ctx.log.info("%s: init from %s: loaded %d tensors, head %s", ctx.stage, report["source"], report["loaded"],
                 report["head"])
    if p.freeze_features:
        module.freeze_features()
    return module, report


def _fit(p: Train.Params, trainer, module, dm, ckpt_path: Path | None, has_val: bool) -> None:
    """trainer.fit with the failures a user can fix turned into one-line errors."""
    from stages.common.train_module import NonFiniteLoss

    val_loader = dm.val_dataloader() if has_val else None
    train_loader = dm.train_dataloader()
    if ckpt_path is not None:
        # Lightning creates the first iterator (and prefetches) before it calls set_epoch on a
        # resumed run: start the sampler at the checkpoint's next epoch so the stream is the same
        train_loader.sampler.set_epoch(_next_epoch(ckpt_path))
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                    ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except NonFiniteLoss as e:
        hint = f"lower train.lr (now {p.lr:g}; try {p.lr / 10:g})"
        if p.optimizer == "sgd":
            hint += " or use train.optimizer=adamw"
        raise StageError(f"training diverged: the loss became {e.value} at epoch {e.epoch}, batch {e.batch}; "
                         f"{hint}. No model was saved") from None
    except KeyError as e:
        raise StageError(f"checkpoint {ckpt_path} does not fit: missing {e}") from None
    except RuntimeError as e:
        if ckpt_path is not None and "state_dict" in str(e):
            raise StageError(f"checkpoint {ckpt_path} does not fit model.{p.model.arch}: {str(e)[:2000]}") from None
        raise


def _final_model(module, book, out: Path, has_val: bool, recal_batches):
    """The weights to save: this run's best, else (resume without improvement) the copied best.ckpt,
    else the last; with BatchNorm statistics recomputed for exactly those weights."""
    from stages.common.batchnorm import recalibrate
    from stages.common.models import read_state_dict

    recalibrated = book.best_state is not None  # its statistics were recomputed before its validation
    if book.best_state is not None:
        module.model.load_state_dict(book.best_state)
    elif (out / "checkpoints" / "best.ckpt").is_file() and has_val:
        sd, _ = read_state_dict(out / "checkpoints" / "best.ckpt")
        module.model.load_state_dict(sd)
    model = module.model.float().cpu().eval()
    if recal_batches is not None and not recalibrated:
        recalibrate(model, recal_batches, module.frozen_modules)
    return model


def _copy_resume_best(ckpt_path: Path | None, out: Path) -> None:
    if ckpt_path is None:
        return
    best_src = ckpt_path.parent / "best.ckpt"
    if best_src.is_file() and best_src != ckpt_path:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best_src, out / "checkpoints" / "best.ckpt")


def _callbacks(p: Train.Params, out: Path, ctx: Context, has_val: bool, recal_batches):
    """(EpochBook, BnRecalibration or None, every callback in Lightning's order)."""
    from stages.common.train_module import BnRecalibration, EpochBook

    book = EpochBook(out / "checkpoints", p.checkpoint_every, p.epochs, ctx, has_val)
    recal = BnRecalibration(recal_batches) if recal_batches is not None else None
    callbacks: list = [book] + ([recal] if recal else [])  # recal after book: not counted as training time
    if p.early_stopping is not None:
        from pytorch_lightning.callbacks import EarlyStopping as PLEarlyStopping

        callbacks.append(PLEarlyStopping(
            monitor="val_acc", mode="max", patience=p.early_stopping.patience,
            min_delta=p.early_stopping.min_delta, check_on_train_epoch_end=False,
        ))
    return book, recal, callbacks


def _check_train_size(data: Path, p: Train.Params) -> None:
    """Every DDP rank needs at least one full batch (a rank without one would leave the others waiting)."""
    from stages.common.splits import load_split

    n = len(load_split(data, "train")[1])
    if n == 0 or (p.devices > 1 and n < p.batch_size * p.devices):
        raise StageError(f"input 'data' ({data}) has {n} training images: too few for "
                         f"train.devices={p.devices} x train.batch_size={p.batch_size}")


def _train(p: Train.Params, inputs, out: Path, ctx: Context) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    from stages.common.bundle import copy_forward
    from stages.common.models import save_model
    from stages.common.preprocess import Preprocess
    from stages.common.train_data import NpyDataModule
    from stages.common.train_module import accuracy_and_loss

    data = Path(inputs["data"])
    classes = _read_classes(data)
    if not (data / "preprocess.json").is_file():
        raise StageError(f"input 'data' ({data}) has no preprocess.json: wire a dataset stage output")
    spec = Preprocess.load(data)
    if p.model.in_channels != 3:
        raise StageError("model.in_channels must be 3 for the train stage (the dataset arrays are RGB)")
    weights_src = _finetune_source(p, inputs)  # mode checks before anything heavy
    ckpt_path = _resume_checkpoint(p, inputs) if p.mode == "resume" else None
    _check_train_size(data, p)  # before any rank starts
    if p.devices > 1 and "LOCAL_RANK" not in os.environ:
        from stages.common.train_ranks import launch

        return launch(Train, p, inputs, out, ctx)  # this function again, once per rank
    rank, world = int(os.environ.get("RANK", 0)), p.devices

    det_before = torch.are_deterministic_algorithms_enabled()
    try:
        pl.seed_everything(p.seed, workers=False, verbose=False)
        dm = NpyDataModule(data, spec, p.batch_size, p.workers, p.augment, p.seed, rank, world)
        has_val = dm.size("val") > 0
        if p.early_stopping is not None and not has_val:
            raise StageError("train.early_stopping monitors val_acc but the dataset has no validation split "
                             "(dataset.split.val)")
        module, init_report = _build_module(p, classes, weights_src, inputs, ctx)
        if rank == 0:
            _copy_resume_best(ckpt_path, out)
        recal_batches = dm.sample_batches("train", p.bn_recalibrate_images) if p.bn_recalibrate else None
        book, recal, callbacks = _callbacks(p, out, ctx, has_val, recal_batches)
        try:
            trainer = make_trainer(p, out, callbacks)
        except Exception as e:  # noqa: BLE001 - e.g. 16-mixed on a CPU
            raise StageError(f"cannot set up training (precision={p.precision}, "
                             f"accelerator={p.accelerator}): {e}") from None
        ctx.progress(0, p.epochs, f"training {p.model.arch} for {p.epochs} epochs")
        _fit(p, trainer, module, dm, ckpt_path, has_val)
        if not trainer.is_global_zero:
            return {}  # DDP: rank 0 writes the outputs
        t0 = time.perf_counter()
        model = _final_model(module, book, out, has_val, recal_batches)
        recal_seconds = (time.perf_counter() - t0 + recal.seconds) if recal else None
        scores = {
            "val": accuracy_and_loss(model, dm.val_dataloader()) if has_val else (None, None),
            "test": accuracy_and_loss(model, dm.test_dataloader()) if dm.size("test") else (None, None),
            "train_eval": accuracy_and_loss(model, dm.sample_batches("train", TRAIN_ACC_SAMPLE)),
        }
        save_model(out / "model.pt", model, p.model, len(classes))
    finally:
        torch.use_deterministic_algorithms(det_before)

    copy_forward(data, out)  # preprocess.json + labels.txt travel with the model
    metrics = _metrics(p, dm, book, scores, len(classes), has_val, init_report, ckpt_path)
    if metrics["learning_check"]:
        ctx.log.warning("%s: %s", ctx.stage, metrics["learning_check"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return _headline(metrics, book, recal_seconds)


# eval-mode accuracy on this many training images (a fixed seeded sample) sits beside val_acc in
# metrics.json: a large train/eval gap points at BatchNorm statistics or augmentation, not the data
TRAIN_ACC_SAMPLE = 1024


def _metrics(p: Train.Params, dm, book, scores: dict, num_classes: int, has_val: bool, init_report,
             ckpt_path: Path | None) -> dict[str, Any]:
    from stages.common.train_module import learning_check

    history = book.history
    (val_acc, val_loss), (test_acc, test_loss) = scores["val"], scores["test"]
    train_loss = history[-1].get("train_loss") if history else None
    val_accs = [h["val_acc"] for h in history if "val_acc" in h] + ([val_acc] if val_acc is not None else [])
    return {
        "mode": p.mode,
        "arch": p.model.arch,
        "num_classes": num_classes,
        "n_train": dm.size("train"),
        "n_val": dm.size("val"),
        "n_test": dm.size("test"),
        "epochs_run": len(history),
        "stopped_early": bool(p.early_stopping is not None and history and history[-1]["epoch"] < p.epochs),
        "best_epoch": book.best_epoch if has_val else (history[-1]["epoch"] if history else None),
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_eval_acc": scores["train_eval"][0],
        "train_eval_images": min(dm.size("train"), TRAIN_ACC_SAMPLE),
        "bn_recalibrate": ({"images": min(dm.size("train"), p.bn_recalibrate_images or dm.size("train"))}
                           if p.bn_recalibrate else None),
        "learning_check": learning_check(val_accs, dm.size("val"), train_loss, num_classes),
        "init": init_report,
        "resumed_from": ((("init/" if p.resume_from is None else "resume_from/") + ckpt_path.name)
                         if ckpt_path else None),
        "epochs": history,
    }


def _headline(m: dict, book, recal_seconds: float | None) -> dict[str, Any]:
    """What run.json and the summary table show (timings are fine here: run.json is not hashed)."""
    secs, imgs = book.train_seconds, book.train_images
    if len(secs) > 1:  # leave the first (warm-up) epoch out
        secs, imgs = secs[1:], imgs[1:]
    history = m["epochs"]
    return {
        "val_acc": m["val_acc"],
        "test_acc": m["test_acc"],
        "train_eval_acc": m["train_eval_acc"],
        "best_epoch": m["best_epoch"],
        "train_loss": history[-1].get("train_loss") if history else None,
        "epochs_run": len(history),
        "bn_recalibrate_seconds": round(recal_seconds, 2) if recal_seconds is not None else None,
        "train_images_per_s": round(sum(imgs) / sum(secs), 1) if secs and sum(secs) > 0 else None,
        "train_images_per_s_median_step": round(statistics.median(book.step_rates), 1) if book.step_rates else None,
    }
