"""The train stage's Lightning side: the LightningModule, the per-epoch bookkeeping callback and
BatchNorm recalibration before each validation.

An ordinary module (imported inside ``Train.run``, never while planning): module-level classes pickle,
as Lightning's multi-process strategies need.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from engine.contract.stage import Context
from stages.common.batchnorm import recalibrate
from stages.common.errors import NonFiniteLoss as NonFiniteLoss  # re-exported: raised here
from stages.common.models import build_model, trainable_prefixes
from stages.common.train_data import seed_for


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
        # DDP: each rank trains on its share of the batches (averaged over ranks at epoch end) but
        # validates on the whole validation split, so validation numbers need no reduction
        sync = prefix == "train" and self.trainer.world_size > 1
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=sync)
        self.log(f"{prefix}_acc", acc, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=sync)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):  # stop at once: every later step and the saved model would be NaN
            raise NonFiniteLoss(self.current_epoch + 1, batch_idx + 1, float(loss))
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # dropout etc.: a function of (seed, epoch), resumed or not
            torch.manual_seed(seed_for(self.opt["seed"], self.current_epoch, 3))

    def on_train_epoch_start(self) -> None:
        for m in self.frozen_modules:
            m.eval()
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        o = self.opt
        decay, no_decay = [], []
        for _name, prm in self.model.named_parameters():
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
        self.best_loss: float | None = None  # breaks ties in val_acc (small validation sets tie often)
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
        return {"history": self.history, "best_acc": self.best_acc, "best_loss": self.best_loss,
                "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.best_acc, self.best_epoch = state.get("best_acc"), state.get("best_epoch")
        self.best_loss = state.get("best_loss")

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
            self.ctx.progress(e + (batch_idx + 1) / self._nb, self.epochs,
                              f"epoch {e + 1}/{self.epochs} batch {batch_idx + 1}/{self._nb}")

    def _stop_timer(self) -> None:
        if self._timing:
            self.train_seconds.append(time.perf_counter() - self._t0)
            self.train_images.append(self._n)
            self._timing = False

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._stop_timer()

    def _better(self, acc: float, loss: float | None) -> bool:
        """Higher validation accuracy, or the same with a lower validation loss."""
        if self.best_acc is None or acc > self.best_acc:
            return True
        return acc == self.best_acc and loss is not None and (self.best_loss is None or loss < self.best_loss)

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
        improved = self.has_val and val is not None and self._better(val, row.get("val_loss"))
        if improved:
            self.best_acc, self.best_loss, self.best_epoch = val, row.get("val_loss"), epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        trainer.save_checkpoint(self.ckpt_dir / "last.ckpt", weights_only=False)  # every rank: a barrier
        if not trainer.is_global_zero:  # DDP: rank 0 alone writes files
            return
        if improved:
            _link(self.ckpt_dir / "last.ckpt", self.ckpt_dir / "best.ckpt")
        if self.every and epoch % self.every == 0:
            _link(self.ckpt_dir / "last.ckpt", self.ckpt_dir / f"epoch={epoch}.ckpt")
        desc = f"epoch {epoch}/{self.epochs} loss {row.get('train_loss', float('nan')):.3f}"
        if val is not None:
            desc += f" val_acc {val:.3f}"
        self.ctx.progress(epoch, self.epochs, desc)


class BnRecalibration(pl.Callback):
    """Before each validation, BatchNorm statistics are recomputed over a fixed sample of un-augmented
    training images, so validation numbers (and the checkpoint chosen as best on them) describe the
    model as it will be exported. Put it after EpochBook: the recalibration pass is not training time."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.images = 0
        self.seconds = 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        t0 = time.perf_counter()
        self.images += recalibrate(pl_module.model, self.batches, pl_module.frozen_modules)
        self.seconds += time.perf_counter() - t0


def accuracy_and_loss(model: nn.Module, batches) -> tuple[float | None, float | None]:
    """(top-1, mean cross-entropy) of ``model`` in eval mode over (x, y) batches; (None, None) if empty."""
    n, correct, loss_sum = 0, 0, 0.0
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return (correct / n, loss_sum / n) if n else (None, None)


def learning_check(val_accs: list[float], n_val: int, train_loss: float | None, num_classes: int) -> str | None:
    """A warning when validation accuracy stayed at chance level (1/classes within two binomial
    standard deviations) in every epoch while the training loss fell well below chance's (ln classes):
    the model fits the training images but nothing carries over to held-out ones."""
    if not val_accs or train_loss is None or n_val == 0 or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    noise = max(2.0 * math.sqrt(chance * (1.0 - chance) / n_val), 0.02)
    if chance + noise >= 1.0:  # too few validation images to tell chance from learning
        return None
    if max(val_accs) > chance + noise or train_loss > 0.5 * math.log(num_classes):
        return None
    return (f"validation accuracy stayed at chance level ({max(val_accs):.2f}, chance 1/{num_classes} = {chance:.2f}) "
            f"while the training loss fell to {train_loss:.3f}: what the model learned does not carry over to "
            "held-out images. Try train.bn_recalibrate=true if it is off, a lower train.lr, stronger "
            "train.augment, or check that every class folder holds the right images")


def _link(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src: a resnet18 checkpoint is 134 MB, and a copy per improved epoch
    doubled every train entry. Safe because Lightning replaces last.ckpt by rename (fsspec transaction),
    never rewrites it in place; a copy where links are refused."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
