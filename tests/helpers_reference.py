"""The independent reference that accuracy floors come from: a plain PyTorch loop, written without any
of edgepipe's training code, on the very arrays an edgepipe run trains and tests on.

torchvision's own model constructor and transforms, torchvision weights loaded strictly (all but the
head), AdamW with a cosine schedule, a shuffled DataLoader, and ``torch.optim.swa_utils.update_bn``
over a shuffled loader of the un-augmented training images before evaluation: what a careful user
would write by hand. ``bench/real_photos.py`` prints its figure beside every real-photo experiment's
backends; the tests' floors are those figures less a binomial margin (at the lower of the one- and
two-thread figures: training's float sums follow the thread count), and each floor's comment says so."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference_top1(data: Path, arch: str, weights: Path | None, epochs: int, lr: float, batch_size: int,
                   hflip: float = 0.0, seed: int = 0, weight_decay: float = 1e-4) -> dict:
    """Train torchvision's ``arch`` on ``data`` (a dataset stage output: images_*.npy, labels_*.npy) and
    return {"test_top1", "val_top1", "n_test"} after update_bn over a shuffled loader."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    classes = len(Path(data, "labels.txt").read_text(encoding="utf-8").splitlines())

    def split(name):
        x = torch.from_numpy(np.load(Path(data) / f"images_{name}.npy")).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(np.load(Path(data) / f"labels_{name}.npy")).long()

    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    augment = v2.Compose([v2.RandomResizedCrop(tuple(split("train")[0].shape[2:]), scale=(0.8, 1.0), antialias=True),
                          v2.RandomHorizontalFlip(hflip), v2.RandomRotation(10)])
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if own[k].shape == v.shape}, strict=False)
    xs, ys = split("train")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(ys), generator=gen)
        for i in range(0, len(order) - (1 if len(order) % batch_size == 1 else 0), batch_size):
            idx = order[i:i + batch_size]
            x = normalize(torch.stack([augment(img) for img in xs[idx]]))
            loss = torch.nn.functional.cross_entropy(model(x), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    loader = torch.utils.data.DataLoader(normalize(xs), batch_size=batch_size, shuffle=True, generator=gen)
    torch.optim.swa_utils.update_bn(loader, model)
    model.eval()
    result = {}
    with torch.no_grad():
        for name in ("val", "test"):
            x, y = split(name)
            if len(y):
                pred = torch.cat([model(normalize(x[i:i + 64])).argmax(1) for i in range(0, len(y), 64)])
                result[f"{name}_top1"] = float((pred == y).float().mean())
            result[f"n_{name}"] = int(len(y))
    return result


def binomial_margin(top1: float, n: int, sds: float = 2.0) -> float:
    """``sds`` binomial standard deviations of a top-1 on ``n`` images (at least one image)."""
    return max(sds * math.sqrt(max(top1 * (1 - top1), 0.0) / n), 1.0 / n)
