"""Small model bundles and datasets for the deployment-stage tests (export, ncnn, calibration).

Plain functions (not fixtures) so any test module can import them:

    from helpers_models import make_model_dir, make_dataset_dir
    model_dir = make_model_dir(tmp_path / "model", arch="mobilenet_v3_small", num_classes=4, size=32)

Models are random-init (no weights exist on this machine) with the batch-norm statistics perturbed so
that the logits are not all alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # so test modules can `import helpers_models` without a conftest entry
    sys.path.insert(0, str(TESTS))


def _perturb(module, seed: int) -> None:
    """Give batch-norm layers non-trivial running statistics/affine params (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def make_module(arch: str | dict = "mobilenet_v3_small", num_classes: int = 4, seed: int = 0):
    import torch

    from stages.common.models import build_model

    torch.manual_seed(seed)
    module = build_model(arch, num_classes)
    _perturb(module, seed)
    return module.eval()


def write_preprocess(folder: Path, size: int | tuple[int, int] = 32, **kw) -> None:
    from stages.common.preprocess import Preprocess

    Preprocess.model_validate({"input_size": size, **kw}).save(folder)


def make_model_dir(
    folder: Path,
    arch: str | dict = "mobilenet_v3_small",
    num_classes: int = 4,
    size: int | tuple[int, int] = 32,
    seed: int = 0,
    module=None,
    **preprocess,
) -> Path:
    """A train-stage-like output: model.pt (bundle), preprocess.json, labels.txt."""
    from stages.common.models import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = module if module is not None else make_module(arch, num_classes, seed)
    save_model(folder / "model.pt", module, arch if isinstance(arch, dict) else {"arch": arch}, num_classes)
    write_preprocess(folder, size, **preprocess)
    (folder / "labels.txt").write_text("".join(f"class{i}\n" for i in range(num_classes)), encoding="utf-8")
    return folder


def make_dataset_dir(
    folder: Path,
    counts: dict[str, list[int]] | None = None,
    size: int = 16,
    seed: int = 0,
) -> Path:
    """A dataset-stage-like output. ``counts`` maps split -> images per class (default: train
    [12, 6, 3], val [2, 2, 2], test [2, 2, 2]). Each image's top-left pixel encodes its index in
    the split (R = index % 256, G = index // 256) so tests can tell which one was picked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": [12, 6, 3], "val": [2, 2, 2], "test": [2, 2, 2]}
    k = len(next(iter(counts.values())))
    rng = np.random.default_rng(seed)
    rows = []
    for split, per_class in counts.items():
        labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(per_class)])
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        for i in range(len(labels)):
            images[i, 0, 0, 0] = i % 256
            images[i, 0, 0, 1] = i // 256
        np.save(folder / f"images_{split}.npy", images)
        np.save(folder / f"labels_{split}.npy", labels)
        rows += [f"{split}/{i}.png,{int(l)},{split}" for i, l in enumerate(labels)]
    (folder / "index.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (folder / "labels.txt").write_text("".join(f"class{i}\n" for i in range(k)), encoding="utf-8")
    (folder / "class_counts.json").write_text(json.dumps(counts), encoding="utf-8")
    (folder / "skipped.csv").write_text("path,reason\n", encoding="utf-8")
    write_preprocess(folder, size)
    return folder


def pixel_index(image: np.ndarray) -> int:
    """The split index a make_dataset_dir image carries in its top-left pixel."""
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])
