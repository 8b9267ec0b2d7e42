"""Training throughput: the Lightning `train` stage vs a hand-written PyTorch loop.

Same model architecture, same data (the dataset stage's digits arrays), same batch size, same
optimizer, same input pipeline (stages.train's loader: augmentation + stages.common.preprocess.normalize).

Default (paired) measurement: the real train stage runs (run_stage, its own Trainer, callbacks,
loggers); after each of its training steps a callback runs one step of the hand-written loop on its
own copy of the model and its own loader. Each Lightning step interval (from the end of the previous
hand step to the end of this Lightning step: fetch, forward, backward, optimizer, Lightning's hooks
and logging) is paired with the hand step that follows it, so load from other processes hits both
alike. The first epoch is warm-up; figures are images / median step time.

--sequential instead times whole runs one after the other (only meaningful on an idle machine).

    .venv/bin/python bench/train_throughput.py                     # resnet18, 64 px, batch 64
    .venv/bin/python bench/train_throughput.py --arch mobilenet_v3_small --size 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stages.train as train_mod
from engine.run.testing import run_stage
from stages.dataset import Dataset
from stages.train import Train, _opt_dict


class HandLoop:
    """A plain PyTorch training loop over the stage's own loader and model definition."""

    def __init__(self, params, data: Path) -> None:
        import torch

        from stages.common.preprocess import Preprocess
        from stages.common.train_data import NpyDataModule
        from stages.common.train_module import Classifier

        self.torch = torch
        spec = Preprocess.load(data)
        classes = (data / "labels.txt").read_text(encoding="utf-8").split()
        dm = NpyDataModule(data, spec, params.batch_size, params.workers, params.augment, params.seed)
        module = Classifier(params.model.arch_dict(), len(classes), _opt_dict(params))
        conf = module.configure_optimizers()
        self.opt = conf["optimizer"] if isinstance(conf, dict) else conf
        self.model, self.crit = module.model.train(), module.criterion
        self.loader = dm.train_dataloader()
        self.epoch = 0
        self.it = iter(self.loader)

    def step(self) -> int:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.loader.sampler.set_epoch(self.epoch)
            self.it = iter(self.loader)
            x, y = next(self.it)
        loss = self.crit(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return len(y)

    def run(self, epochs: int, limit: int | None) -> float:
        """images/s over whole epochs after the first (sequential mode)."""
        secs, imgs = [], []
        for epoch in range(epochs):
            self.loader.sampler.set_epoch(epoch)
            n, t0 = 0, time.perf_counter()
            for b, (x, y) in enumerate(self.loader):
                if limit is not None and b >= limit:
                    break
                loss = self.crit(self.model(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                n += len(y)
            secs.append(time.perf_counter() - t0)
            imgs.append(n)
        return sum(imgs[1:]) / sum(secs[1:])


def paired(params_dict: dict, data: Path, out: Path) -> tuple[list[float], list[float], list[int], float]:
    import pytorch_lightning as pl

    p = Train.Params.model_validate(params_dict)
    hand = HandLoop(p, data)

    class Pair(pl.Callback):
        def __init__(self) -> None:
            self.light: list[float] = []
            self.hand: list[float] = []
            self.sizes: list[int] = []
            self.t: float | None = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.t = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            timed = trainer.current_epoch >= 1 and self.t is not None
            if timed:
                self.light.append(now - self.t)
            t0 = time.perf_counter()
            hand.step()
            t1 = time.perf_counter()
            if timed:
                self.hand.append(t1 - t0)
                self.sizes.append(len(batch[1]))
            self.t = time.perf_counter()

    pair = Pair()
    original = train_mod.make_trainer
    train_mod.make_trainer = lambda p, out, callbacks, loggers=True: original(p, out, [*callbacks, pair], loggers)
    try:
        t0 = time.perf_counter()
        run_stage(Train, params_dict, {"data": data}, out)
        wall = time.perf_counter() - t0
    finally:
        train_mod.make_trainer = original
    return pair.light, pair.hand, pair.sizes, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    ap.add_argument("--batches", type=int, default=12, help="training batches per epoch")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="time whole runs one after the other")
    ap.add_argument("--reps", type=int, default=3, help="sequential mode: alternating repetitions")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-bench-"))
    data = tmp / "data"
    run_stage(Dataset, {"kind": "digits", "preprocess": {"input_size": args.size}}, {}, data)
    augment = {"random_resized_crop": False} if args.no_augment else {"rotation": 10}
    params = {
        "epochs": args.epochs, "batch_size": args.batch, "limit_train_batches": args.batches,
        "workers": args.workers, "augment": augment, "model": {"arch": args.arch}, "seed": 0,
    }
    # the input pipeline alone (fetch + augmentation + normalisation), to show it is not the bottleneck
    hl = HandLoop(Train.Params.model_validate(params), data)
    n, t0 = 0, time.perf_counter()
    for _b, (_x, y) in enumerate(hl.loader):
        n += len(y)
    loader_rate = n / (time.perf_counter() - t0)
    print(f"model {args.arch}, {args.size} px digits, batch {args.batch}, {args.batches} batches x "
          f"{args.epochs - 1} timed epochs, workers {args.workers}, augment {'off' if args.no_augment else 'on'}")
    print(f"input pipeline alone      : {loader_rate:8.1f} images/s")
    if args.sequential:
        p = Train.Params.model_validate(params)
        hand, light = [], []
        for rep in range(args.reps):
            hand.append(HandLoop(p, data).run(args.epochs, args.batches))
            m = run_stage(Train, params, {"data": data}, tmp / f"seq{rep}")
            light.append(m["train_images_per_s"])
            print(f"rep {rep + 1}: hand {hand[-1]:.1f} img/s, Lightning {light[-1]:.1f} img/s", flush=True)
        h, lt = statistics.median(hand), statistics.median(light)
    else:
        light_t, hand_t, sizes, wall = paired(params, data, tmp / "paired")
        bs = statistics.median(sizes)
        h, lt = bs / statistics.median(hand_t), bs / statistics.median(light_t)
        ratios = [a / b for a, b in zip(hand_t, light_t)]  # Lightning img/s over hand img/s, per pair
        q = statistics.quantiles(ratios, n=4)
        print(f"train stage wall (incl. paired hand steps, validation, test, checkpoints, logs): {wall:.1f} s")
        print(f"hand-written PyTorch loop : {h:8.1f} images/s (median step)")
        print(f"Lightning train stage     : {lt:8.1f} images/s (median step)")
        print(f"ratio Lightning / hand    : {statistics.median(ratios):8.3f}   median of {len(ratios)} paired steps, "
              f"quartiles {q[0]:.3f}..{q[2]:.3f} (target >= 0.95)")
        return
    print(f"hand-written PyTorch loop : {h:8.1f} images/s")
    print(f"Lightning train stage     : {lt:8.1f} images/s")
    print(f"ratio Lightning / hand    : {lt / h:8.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
