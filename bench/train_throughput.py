"""Training throughput: the Lightning `train` stage vs a hand-written PyTorch loop.

Same model, same data (the dataset stage's digits arrays), same batch size, same optimizer/scheduler,
same input pipeline (stages.train's loaders: augmentation + stages.common.preprocess.normalize).
Both figures count training batches only (no validation), leave the first epoch out as warm-up, and
are taken alternately so that other load on the machine hits both alike.

    .venv/bin/python bench/train_throughput.py                    # resnet18, 64 px, batch 64
    .venv/bin/python bench/train_throughput.py --arch mobilenet_v3_small --size 32 --reps 3
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

from engine.testing import run_stage  # noqa: E402
from stages.dataset import Dataset  # noqa: E402
from stages.train import Train, _opt_dict, _parts  # noqa: E402


def hand_loop(params, data: Path) -> float:
    """images/s of a plain PyTorch loop over the stage's own loaders and model."""
    from stages.common.preprocess import Preprocess

    P = _parts()
    torch, pl = P["torch"], P["pl"]
    spec = Preprocess.load(data)
    classes = (data / "labels.txt").read_text(encoding="utf-8").split()
    pl.seed_everything(params.seed, verbose=False)
    torch.use_deterministic_algorithms(True)
    dm = P["NpyDataModule"](data, spec, params.batch_size, params.workers, params.augment, params.seed)
    module = P["Classifier"](params.model.arch_dict(), len(classes), _opt_dict(params))
    conf = module.configure_optimizers()
    opt = conf["optimizer"] if isinstance(conf, dict) else conf
    sched = conf["lr_scheduler"]["scheduler"] if isinstance(conf, dict) else None
    model, crit = module.model, module.criterion
    loader = dm.train_dataloader()
    limit = params.limit_train_batches
    secs, imgs, rates = [], [], []
    for epoch in range(params.epochs):
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch)
        model.train()
        n, t0 = 0, time.perf_counter()
        tb = t0
        for b, (x, y) in enumerate(loader):
            if limit is not None and b >= limit:
                break
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
            now = time.perf_counter()
            if epoch > 0 and b > 0:
                rates.append(len(y) / (now - tb))
            tb = now
        secs.append(time.perf_counter() - t0)
        imgs.append(n)
        if sched is not None:
            sched.step()
    torch.use_deterministic_algorithms(False)
    return sum(imgs[1:]) / sum(secs[1:]), statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="per measurement; the first is warm-up")
    ap.add_argument("--batches", type=int, default=8, help="training batches per epoch")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-augment", action="store_true")
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
    p = Train.Params.model_validate(params)
    hand, light, hand_med, light_med, wall = [], [], [], [], []
    for rep in range(args.reps):
        mean_rate, med_rate = hand_loop(p, data)
        hand.append(mean_rate)
        hand_med.append(med_rate)
        t0 = time.perf_counter()
        m = run_stage(Train, params, {"data": data}, tmp / f"train{rep}")
        wall.append(time.perf_counter() - t0)
        light.append(m["train_images_per_s"])
        light_med.append(m["train_images_per_s_median_step"])
        print(f"rep {rep + 1}: hand loop {hand[-1]:.1f} img/s (median step {hand_med[-1]:.1f}), "
              f"Lightning stage {light[-1]:.1f} img/s (median step {light_med[-1]:.1f})", flush=True)
    h, lt = statistics.median(hand), statistics.median(light)
    hm, lm = statistics.median(hand_med), statistics.median(light_med)
    print(f"model {args.arch}, {args.size} px digits, batch {args.batch}, {args.batches} batches x "
          f"{args.epochs - 1} timed epochs, workers {args.workers}, augment {'off' if args.no_augment else 'on'}")
    print(f"hand-written PyTorch loop : {h:8.1f} images/s")
    print(f"Lightning train stage     : {lt:8.1f} images/s")
    print(f"ratio Lightning / hand    : {lt / h:8.3f}   (target >= 0.95)")
    print(f"median-step images/s      : hand {hm:.1f}, Lightning {lm:.1f}, ratio {lm / hm:.3f} (robust to load spikes)")
    print(f"train stage wall (incl. validation, test, checkpoints, logs): {statistics.median(wall):.1f} s")


if __name__ == "__main__":
    main()
