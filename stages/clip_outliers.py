"""The ``clip_outliers`` stage: clip outlying weights of conv/linear layers before int8 quantization.

Takes a model (input ``model``: a folder holding ``model.pt``, e.g. a train output) or a weights file
(``weights``: a torchvision state_dict, our ``model.pt`` or a train checkpoint; the architecture comes
from the ``model`` section). Each conv/linear weight tensor is clipped to a percentile range or to
mean +- k*std, per tensor or per output channel; BatchNorm weights are left alone unless
``exclude_bn: false``; the first and last layers can be excluded. Everything else (biases, BN
statistics, excluded layers) is copied bit for bit.

Clipped weights change activations, so BatchNorm running statistics computed before the clip are
stale: with a ``data`` input (a dataset output) they are recomputed over its un-augmented training
images (``bn_recalibrate``, stages/common/batchnorm.py); without one the report says they were not, and
a warning suggests wiring ``data`` (a finetune after the clip recalibrates anyway).

Writes ``model.pt`` (bundle), ``clip_report.csv`` / ``clip_report.json`` (per layer: min/max before and
after, fraction clipped) and ``preprocess.json`` / ``labels.txt`` when the input had them. Clip a
pretrained file, then finetune from it (train ``mode: finetune`` with ``needs: {init: clip}``), or clip
after training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from engine.contract.stage import HASH_CONTENT, Context, Input, Params, Stage, StageError
from stages.common.bundle import copy_forward
from stages.common.models import ModelParams


class ClipOutliers(Stage):
    name = "clip_outliers"
    peak_memory_mb = 1000  # MB, for run --jobs: torch, the model and calibration batches
    tools = ("torch",)  # their versions are in the cache key
    # 2: BatchNorm statistics recomputed with a data input; 3: over batches that mix the classes
    version = 3
    sections = {"model": "model"}
    inputs = {
        "model": Input(required=False, doc="a folder holding model.pt (train or clip_outliers output)"),
        "data": Input(required=False,
                      doc="a dataset output: BatchNorm statistics are recomputed over its training images"),
    }

    class Params(Params):
        # none: copy the model unchanged (the report still lists every layer)
        method: Literal["none", "percentile", "std"] = "percentile"
        # percentile: keep [100 - percentile, percentile] of each tensor/channel
        percentile: float = 99.99
        # std: keep mean +- k * std
        k: float = 3.0
        granularity: Literal["tensor", "channel"] = "channel"
        exclude_bn: bool = True
        exclude_first: bool = False
        exclude_last: bool = False
        # with a `data` input: recompute BatchNorm statistics over this many training images (null: all)
        bn_recalibrate: bool = True
        bn_recalibrate_images: int | None = Field(1024, ge=1)
        # a weights file instead of the `model` input (default: model.pretrained)
        weights: Annotated[Path | None, HASH_CONTENT] = None
        model: ModelParams = ModelParams()

        @model_validator(mode="after")
        def _check(self) -> ClipOutliers.Params:
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (50, 100]: the range kept is [100 - p, p]")
            if self.k <= 0:
                raise ValueError("k must be > 0")
            return self

    @classmethod
    def check_inputs(cls, params: ClipOutliers.Params, wired: set[str]):
        # said at plan, before the dataset stage runs: the user set neither, and model.pretrained is
        # the key the experiments name (clip.weights only overrides it)
        if "model" not in wired and params.weights is None and params.model.pretrained is None:
            yield ("model.pretrained", "clip_outliers has no weights to clip: set model.pretrained (imagenet, or a "
                                       "weights file), or wire a 'model' input (a folder with model.pt)")

    def run(self, params: ClipOutliers.Params, inputs, out: Path, ctx: Context) -> dict[str, Any]:
        from stages.common.bundle import write_labels
        from stages.common.models import save_model

        src_dir = inputs.get("model")
        module, arch, num_classes, labels = _load(params, src_dir, ctx)
        rows = _clip(module, params, ctx)
        recalibrated = _recalibrate_bn(module, inputs.get("data"), params, rows, ctx)
        save_model(out / "model.pt", module, arch, num_classes)
        if src_dir is not None:
            copy_forward(src_dir, out, missing_ok=True)
        elif labels is not None:  # a bundle's class names travel on: a finetune's head follows them
            write_labels(out / "labels.txt", labels)
        summary = _write_report(out, rows, params, recalibrated)
        keep = ("layers_clipped", "fraction_clipped", "max_absmax_before", "max_absmax_after", "bn_recalibrated_images")
        return {k: v for k, v in summary.items() if k in keep}


def _load(p: ClipOutliers.Params, src_dir, ctx: Context):
    """(module in eval mode, arch, num_classes, class names or None) from the 'model' input or a
    weights file (clip.weights, else model.pretrained: a file, or torchvision's weights by name)."""
    from stages.common.models import (
        WeightsError,
        build_model,
        infer_num_classes,
        labels_beside,
        load_weights,
        read_bundle,
        read_state_dict,
    )
    from stages.common.pretrained import categories, published_hash_mismatch, read_keyed_file

    weights = p.weights if p.weights is not None else p.model.pretrained
    if src_dir is not None and p.weights is not None:
        raise StageError("clip_outliers: both a 'model' input and clip.weights are given; use one")
    labels = None
    try:
        if src_dir is not None:
            bundle = read_bundle(Path(src_dir) / "model.pt")
            arch, num_classes = bundle["arch"], bundle["num_classes"]
            module = build_model(arch, num_classes)
            module.load_state_dict(bundle["state_dict"], strict=True)
        elif weights is not None:
            field = "weights" if p.weights is not None else "model.pretrained"
            # the bytes checked against the key are the bytes loaded (a file changed since is refused)
            data, digest = read_keyed_file(weights, ctx.content_digests.get(field))
            if p.weights is None and p.model.pretrained_weights and (
                    warning := published_hash_mismatch(weights, digest)):
                ctx.log.warning("%s: model.pretrained: %s", ctx.stage, warning)
            sd, info = read_state_dict(weights, data)
            arch = info.get("arch") or p.model
            num_classes = info.get("num_classes") or infer_num_classes(sd, arch)
            module = build_model(arch, num_classes)
            load_weights(module, sd)
            labels = labels_beside(weights, info) or (
                categories(p.model.pretrained_weights) if p.weights is None and p.model.pretrained_weights else None)
            labels = labels if labels is not None and len(labels) == num_classes else None
        else:
            raise StageError("clip_outliers has no weights to clip: set model.pretrained (imagenet, or a weights "
                             "file) or clip.weights=PATH, or wire a 'model' input (a folder with model.pt)")
    except WeightsError as e:
        source = "input 'model'" if src_dir is not None else "clip.weights" if p.weights else "model.pretrained"
        raise StageError(f"{source}: {e}") from None
    return module.eval(), arch, num_classes, labels


def _clip(module, p: ClipOutliers.Params, ctx: Context) -> list[dict]:
    """Clip every conv/linear (and, unless excluded, BN) weight in place; one report row per layer."""
    import torch

    layers = _layers(module, torch)
    rows = []
    with torch.no_grad():
        for i, (name, kind, mod) in enumerate(layers):
            w = mod.weight
            before = w.detach().clone()
            reason = _skip_reason(p, layers, name, kind)
            if reason is None:
                lo, hi = _bounds(before, p, kind, torch)
                w.copy_(torch.maximum(torch.minimum(before, hi), lo))
            rows.append(_row(name, kind, before, w.detach(), reason))
            ctx.progress(i + 1, len(layers), f"clipping {name}")
    return rows


def _skip_reason(p: ClipOutliers.Params, layers, name: str, kind: str) -> str | None:
    if p.method == "none":
        return "method none"
    if kind == "bn" and p.exclude_bn:
        return "exclude_bn"
    if kind != "bn" and p.exclude_first and name == _first(layers):
        return "exclude_first"
    if kind != "bn" and p.exclude_last and name == _last(layers):
        return "exclude_last"
    return None


def _row(name: str, kind: str, before, after, reason: str | None) -> dict[str, Any]:
    return {
        "layer": name,
        "kind": kind,
        "shape": list(before.shape),
        "clipped": reason is None,
        "skipped_because": reason or "",
        "min_before": float(before.min()),
        "max_before": float(before.max()),
        "min_after": float(after.min()),
        "max_after": float(after.max()),
        "absmax_before": float(before.abs().max()),
        "absmax_after": float(after.abs().max()),
        "fraction_clipped": int((after != before).sum()) / before.numel(),
    }


def _write_report(out: Path, rows: list[dict], p: ClipOutliers.Params, recalibrated: int | None) -> dict[str, Any]:
    """clip_report.csv (a row per layer) and clip_report.json (summary + rows); returns the summary."""
    fields = list(rows[0].keys()) if rows else ["layer"]
    with open(out / "clip_report.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "shape": "x".join(map(str, r["shape"]))})
    clipped = [r for r in rows if r["clipped"]]
    total = sum(_numel(r["shape"]) for r in clipped)
    summary = {
        "method": p.method,
        "percentile": p.percentile if p.method == "percentile" else None,
        "k": p.k if p.method == "std" else None,
        "granularity": p.granularity,
        "layers_clipped": len(clipped),
        "layers_total": len(rows),
        "fraction_clipped": ((sum(r["fraction_clipped"] * _numel(r["shape"]) for r in clipped) / total)
                             if total else 0.0),
        "max_absmax_before": max((r["absmax_before"] for r in clipped), default=None),
        "max_absmax_after": max((r["absmax_after"] for r in clipped), default=None),
        "bn_recalibrated_images": recalibrated,
    }
    (out / "clip_report.json").write_text(json.dumps({"summary": summary, "layers": rows}, indent=2) + "\n",
                                          encoding="utf-8")
    return summary


def _recalibrate_bn(module, data, p: ClipOutliers.Params, rows: list[dict], ctx: Context) -> int | None:
    """Recompute BatchNorm statistics over the data input's training images when clipping changed any
    weight; the number of images used, or None when they were not recomputed (and why is logged)."""
    from stages.common.batchnorm import batchnorm_layers, recalibrate
    from stages.common.preprocess import Preprocess
    from stages.common.train_data import NpyDataModule

    changed = any(r["fraction_clipped"] > 0 for r in rows)
    if not (p.bn_recalibrate and changed and batchnorm_layers(module)):
        return None
    if data is None:
        ctx.log.warning("%s: clipping changed weights but BatchNorm statistics were not recomputed (no 'data' "
                        "input): wire needs: {data: <dataset stage>}, or finetune after the clip", ctx.stage)
        return None
    dm = NpyDataModule(Path(data), Preprocess.load(Path(data)), 64, 0, None, 0)
    if dm.size("train") == 0:
        raise StageError(f"input 'data' ({data}) has no training images to recompute BatchNorm statistics with")
    ctx.progress(None, None, "recomputing BatchNorm statistics")
    return recalibrate(module, dm.sample_batches("train", p.bn_recalibrate_images))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layers(module, torch) -> list[tuple[str, str, Any]]:
    """(name, kind, module) for every conv/linear/batch-norm layer with a weight, in module order."""
    nn = torch.nn
    out = []
    for name, m in module.named_modules():
        if getattr(m, "weight", None) is None:
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            out.append((name, "conv", m))
        elif isinstance(m, nn.Linear):
            out.append((name, "linear", m))
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            out.append((name, "bn", m))
    return out


def _first(layers) -> str | None:
    return next((n for n, k, _ in layers if k != "bn"), None)


def _last(layers) -> str | None:
    return next((n for n, k, _ in reversed(layers) if k != "bn"), None)


def _bounds(w, p, kind: str, torch):
    """Lower/upper clip bounds broadcastable to w."""
    per_channel = p.granularity == "channel" and kind != "bn" and w.dim() > 1
    flat = w.detach().double().reshape(w.shape[0], -1) if per_channel else w.detach().double().reshape(1, -1)
    if p.method == "percentile":
        import numpy as np

        a = flat.numpy()
        lo = np.percentile(a, 100.0 - p.percentile, axis=1)
        hi = np.percentile(a, p.percentile, axis=1)
        lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
    else:
        mean, std = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
        lo, hi = mean - p.k * std, mean + p.k * std
    shape = (-1,) + (1,) * (w.dim() - 1) if per_channel else (1,) * w.dim()
    return lo.to(w.dtype).reshape(shape), hi.to(w.dtype).reshape(shape)
