"""``calibration``: a class-stratified, seeded sample of a dataset split, written as image files for
the quantizers.

Input ``data``: a ``dataset`` output (``images_{split}.npy`` uint8 N x H x W x 3 RGB, already resized
with the preprocessing definition; ``labels_{split}.npy``; ``labels.txt``).
Output: ``images/`` (PNG files and nothing else: MaixHub's layout), ``dataset.txt`` (one path per
line, relative to the output folder: what rknn-toolkit2's ``build(dataset=...)`` reads),
``calibration.json`` (what was picked and why).

The images are the dataset's arrays written losslessly, not re-resized: the same preprocessing
definition and size as training. Normalisation (mean/std) is not applied: quantizers take raw 0..255
pixels and apply mean/std themselves (rknn ``mean_values``/``std_values``, awnn mean/norm).

Config section ``calibration`` (conf/calibration/default.yaml).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from engine.contract.stage import Context, Input, Params, Stage, StageError
from stages.common.bundle import read_labels
from stages.common.sampling import select


def picked_rows(images: np.ndarray, picked: np.ndarray, chunk: int = 256):
    """(index, uint8 H x W x 3 row) of each picked index, read from the memory-mapped split ``chunk``
    rows at a time (splits.read_rows), so memory holds a chunk, never the split."""
    from stages.common.splits import read_rows

    for start in range(0, len(picked), chunk):
        rows = picked[start : start + chunk]
        yield from zip(rows.tolist(), read_rows(images, rows))


class Calibration(Stage):
    """Pick ``count`` images of a split, stratified by class, as PNG files plus the list rknn reads."""

    name = "calibration"
    tools = ("pillow",)  # their versions are in the cache key
    version = 2  # 2: the images listed in a seeded order that mixes the classes, not in class order
    inputs = {"data": Input(required=True, doc="dataset output: images_{split}.npy, labels_{split}.npy, labels.txt")}

    class Params(Params):
        # how many images (all of the split, with a warning, if it has fewer)
        count: int = Field(50, ge=1)
        # which split to draw from; never the test split you report accuracy on, unless on purpose
        split: Literal["train", "val", "test"] = "train"
        seed: int = 0

    def run(self, params: Calibration.Params, inputs: Mapping[str, Path], out: Path, ctx: Context) -> dict[str, Any]:
        from PIL import Image

        from stages.common.splits import load_split

        src = inputs["data"]
        images, labels = load_split(src, params.split, split_key="calibration.split")
        if len(images) == 0:
            raise StageError(f"split {params.split!r} of {src} is empty: choose another calibration.split")
        names = _class_names(src)

        warning = None
        if params.count > len(images):
            warning = (f"calibration.count={params.count} but split {params.split!r} has only {len(images)} images; "
                       f"using all {len(images)}")
            ctx.log.warning(warning)

        picked = select(labels, params.count, params.seed)
        (out / "images").mkdir()
        files = []
        width = max(4, len(str(len(picked) - 1)))
        for k, (i, pixels) in enumerate(picked_rows(images, picked)):
            label = int(labels[i])
            rel = f"images/{k:0{width}d}.png"
            # PNG: lossless, so the pixels are exactly the dataset's preprocessed ones
            Image.fromarray(pixels, "RGB").save(out / rel, format="PNG", optimize=False)
            files.append({"file": rel, "index": int(i), "label": label,
                          "class": names[label] if 0 <= label < len(names) else str(label)})
            if k % 16 == 0:
                ctx.progress(k, len(picked), "writing calibration images")
        (out / "dataset.txt").write_text("".join(f["file"] + "\n" for f in files), encoding="utf-8")

        per_class: dict[str, int] = {}
        for f in files:
            per_class[f["class"]] = per_class.get(f["class"], 0) + 1
        report = {
            "split": params.split,
            "requested": params.count,
            "count": len(files),
            "seed": params.seed,
            "available": int(len(images)),
            "image_size": [int(images.shape[1]), int(images.shape[2])],
            "format": "png",
            "per_class": per_class,
            "warning": warning,
            "files": files,
        }
        (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        ctx.progress(len(files), len(files), "done")
        return {"count": len(files), "classes": len(per_class), "warning": warning is not None}


def _class_names(src: Path) -> list[str]:
    f = src / "labels.txt"
    if not f.is_file():
        return []
    return read_labels(f)
