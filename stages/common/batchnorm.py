"""BatchNorm recalibration: running statistics recomputed for the weights a model has now.

BatchNorm layers keep an exponential moving average of activation statistics while training. With few
optimizer steps per epoch and a high learning rate (a few hundred photos per class), that average
lags far behind the weights, and eval mode, every exported model (BN folds into the convolutions) and
every int8 build inherit the stale numbers: 0.50 test accuracy from weights that score 1.00 once the
statistics are recomputed. ``recalibrate`` does what ``torch.optim.swa_utils.update_bn`` does -- reset
the statistics and average them over batches (cumulative average, ``momentum=None``) with no
gradients -- but only BatchNorm layers run in train mode: dropout stays off (no randomness, no draw from
the global RNG, so recalibration is deterministic and leaves the training stream unchanged), and the
layers named in ``frozen`` (a finetune with frozen features) keep their statistics.

The batches must mix the classes (``NpyDataModule.sample_batches`` draws a seeded permutation), as
``update_bn`` expects the shuffled training loader: each batch's variance is averaged, so batches of
one class each measure only the variance within a class and miss the variance between classes.

Imports torch: import it inside a stage's ``run``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batchnorm_layers(model: nn.Module, frozen: Iterable[nn.Module] = ()) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics, minus ``frozen`` ones."""
    skip = {id(m) for m in frozen}
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in skip]


def recalibrate(model: nn.Module, batches: Iterable, frozen: Iterable[nn.Module] = ()) -> int:
    """Recompute the running mean/var of ``model``'s BatchNorm layers over ``batches`` ((x, y) or x; in
    an order that mixes the classes, see the module's text).
    The model's own train/eval flags are restored afterwards. Returns the number of images seen (0 when
    the model has no BatchNorm layer or there are no batches: the model is then left untouched)."""
    layers = batchnorm_layers(model, frozen)
    if not layers or (hasattr(batches, "__len__") and len(batches) == 0):
        return 0  # nothing to recompute with: reset statistics would be worse than stale ones
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    device = next(model.parameters()).device
    seen = 0
    # callers may sit inside Lightning's validation loop, which runs in inference mode
    with torch.inference_mode(False), torch.no_grad():
        try:
            model.eval()
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches, not an EMA
                m.train()
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                seen += len(x)
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
            for m, flag in was_training.items():
                m.train(flag)
    return seen
