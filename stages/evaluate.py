"""`evaluate`: every backend the pipeline produced, scored on the same test images, in one table.

Inputs: ``data`` (required) is a ``dataset`` folder; every other input is a backend, labelled by its
input name, whose kind is detected from its folder by the backend registry
(``stages.common.backends``: PyTorch ``model.pt``, TorchScript, ONNX Runtime, ncnn, and the RKNN
simulator's stored ``test_logits.npy``; the first registered class that recognises the folder wins).

Each backend gets the test images through its own ``preprocess.json`` with the shared
``stages.common.preprocess.normalize`` (uint8 RGB -> float NCHW in its channel order): the code
training used. Input/output blob names come from its ``io.json``.

Per backend: top-1, per-class accuracy, confusion matrix (``confusion_<backend>.png``), and against
the fp32 reference (the first PyTorch backend unless ``evaluate.reference`` names one): top-1
agreement, max/mean abs logit difference and the top-1 change in points. Quality targets (float
backends agree 100% within ``float_tolerance`` plus ``parity.RTOL`` x the reference logit range, the
converting stages' rule; quantized ones lose at most ``quant_max_drop``
points) are checked and printed, not enforced. Outputs: ``metrics.json``, ``eval.md``,
``predictions.npz``, ``confusion_<backend>.png``.

Multi-crop (``evaluate.multicrop.enabled``): the dataset's arrays are already resized (stretched,
letterboxed or centre-cropped) to the model's input, so crops cannot be cut from them. Multi-crop
re-reads each test image's original file (``index.csv`` path under ``multicrop.root``, normally
``dataset.path``), cuts K overlapping windows of the model's aspect ratio along the long side,
resizes each to the input size, and combines the K predictions by mean probability and by vote
(a class wins when at least ``vote_threshold`` of the crops agree; otherwise ``negative_class``
when given, else the mean-probability class, counted as undecided). Not available for datasets
without files (kind=digits) nor for RKNN backends (their logits come from the build session).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import numpy as np
from pydantic import Field, model_validator

from engine.stage import HASH_CONTENT, NOT_IN_KEY, Context, Input, Params, Stage, StageError
from stages.common import backends
from stages.common.backends import Backend
from stages.common.bundle import LABELS, PREPROCESS, check_bundle, read_io, read_labels

# the reference when evaluate.reference is null: the first backend of these kinds
REFERENCE_KINDS = ("torch", "torchscript", "onnx")


class MultiCrop(Params):
    """``evaluate.multicrop``: K overlapping crops of the original (non-square) test images."""

    enabled: bool = False
    crops: int = Field(3, ge=2, le=16)
    # vote: a class wins when at least this share of the crops predicts it
    vote_threshold: float = Field(0.5, gt=0.0, le=1.0)
    # vote: the class predicted when no class reaches the threshold (e.g. "background"); null: fall back
    # to the mean-probability class and count the image as undecided
    negative_class: str | None = None
    # the folder index.csv paths are relative to (normally the dataset's `path`)
    root: Annotated[Path | None, HASH_CONTENT] = None


class Evaluate(Stage):
    name = "evaluate"
    version = 1
    extra_inputs = True
    inputs = {"data": Input(required=True, doc="dataset folder; every other input is a backend to score")}
    # Wall times differ on every run: kept apart so that metrics.json (which package reads) is
    # byte-identical when the predictions are, and downstream stages stay cached.
    volatile_outputs = ("timing.json",)

    class Params(Params):
        """The ``evaluate`` section."""

        split: Literal["test", "val"] = "test"
        # input name of the fp32 reference; null: the first PyTorch (model.pt) backend
        reference: str | None = None
        # score only the first N images of the split (null: all)
        limit: int | None = Field(None, ge=1)
        # quality targets (reported, not enforced): float backends agree 100% with max abs logit
        # difference <= float_tolerance; quantized backends lose at most quant_max_drop top-1 points
        float_tolerance: float = Field(1e-3, gt=0)
        quant_max_drop: float = Field(1.0, ge=0)
        multicrop: MultiCrop = MultiCrop()
        # batch size for backends that take one (torch, torchscript, dynamic-batch ONNX)
        batch: Annotated[int, NOT_IN_KEY] = Field(32, ge=1)
        threads: Annotated[int, NOT_IN_KEY] = Field(1, ge=1)

        @model_validator(mode="after")
        def _check(self) -> "Evaluate.Params":
            if self.multicrop.enabled and self.multicrop.root is None:
                raise ValueError("multicrop.enabled=true needs multicrop.root: the folder the dataset's index.csv "
                                 "paths are relative to (usually dataset.path)")
            return self

    # ------------------------------------------------------------------------------------------------
    def run(self, p: "Evaluate.Params", inputs: Mapping[str, Path], out: Path, ctx: Context) -> dict[str, Any]:
        from stages.common.preprocess import Preprocess

        from stages.common.splits import load_split

        data = inputs["data"]
        check_bundle(data, (LABELS,), input="data", hint="expected a dataset folder")
        classes = read_labels(data)
        images, labels = load_split(data, p.split, split_key="evaluate.split")
        n = len(labels) if p.limit is None else min(len(labels), p.limit)
        if n == 0:
            raise StageError(f"input data: the {p.split} split is empty")
        images = np.asarray(images[:n])
        labels = labels[:n]
        data_spec = Preprocess.load(data) if (data / "preprocess.json").is_file() else None

        backends = [_detect(name, path, classes, images.shape[1:3], p, data, ctx)
                    for name, path in inputs.items() if name != "data"]
        if not backends:
            raise StageError("evaluate has no backend to score: add model folders to its `needs:` "
                             "(e.g. model: train, onnx: onnx, rknn: rknn)")
        if data_spec is not None:
            for b in backends:
                if (b.spec.resize, b.spec.interpolation) != (data_spec.resize, data_spec.interpolation):
                    ctx.log.warning("backend %s: preprocess resize=%s/%s differs from the dataset's %s/%s; the test "
                                    "images were resized the dataset's way", b.name, b.spec.resize,
                                    b.spec.interpolation, data_spec.resize, data_spec.interpolation)
        ref = _pick_reference(backends, p.reference)

        crops = None
        if p.multicrop.enabled:
            crops = _multicrop_images(data, p, data_spec or backends[0].spec, images.shape[1:3], n, ctx)

        # -- run every backend --------------------------------------------------------------------------
        results: dict[str, dict[str, Any]] = {}
        for i, b in enumerate(backends):
            ctx.progress(i, len(backends), f"{b.name} ({b.kind})")
            t0 = time.perf_counter()
            logits = b.runner.stored_logits()[:n] if b.runner.precomputed else b.logits(images, ctx)
            if logits.ndim != 2 or logits.shape[1] != len(classes):
                raise StageError(f"input {b.name}: the model gives outputs of shape {list(logits.shape)}, expected "
                                 f"N x {len(classes)} (one logit per class of labels.txt)")
            r: dict[str, Any] = {"kind": b.kind, "folder": str(b.folder), "logits": logits, "target": b.runner.target,
                                 "seconds": round(time.perf_counter() - t0, 3), "detail": b.runner.detail}
            if crops is not None and not b.runner.precomputed:
                k = crops.shape[1]
                flat = b.logits(crops.reshape(-1, *crops.shape[2:]), ctx)
                r["crop_logits"] = flat.reshape(n, k, -1)
            results[b.name] = r
        ctx.progress(len(backends), len(backends), "scoring")

        # -- score --------------------------------------------------------------------------------------
        table = _score(results, labels, classes, ref.name if ref else None, p)
        for b in backends:
            if "note" in table[b.name]:
                ctx.note(table[b.name]["note"])

        for name, r in results.items():
            _confusion_png(out / f"confusion_{_safe(name)}.png", np.asarray(table[name]["confusion"]), classes,
                           f"{name} ({r['kind']}): top-1 {table[name]['top1']:.2%} on {table[name]['samples']}")
        arrays: dict[str, np.ndarray] = {"labels": labels}
        for name, r in results.items():
            arrays[f"{name}.logits"] = r["logits"].astype(np.float32)
            arrays[f"{name}.pred"] = r["logits"].argmax(1).astype(np.int64)
            if "crop_logits" in r:
                arrays[f"{name}.crop_logits"] = r["crop_logits"].astype(np.float32)
                arrays[f"{name}.pred_mean"] = np.asarray(table[name]["multicrop"]["pred_mean"], np.int64)
                arrays[f"{name}.pred_vote"] = np.asarray(table[name]["multicrop"]["pred_vote"], np.int64)
        np.savez_compressed(out / "predictions.npz", **arrays)

        report = {
            "split": p.split, "samples": int(n), "classes": classes,
            "reference": ref.name if ref else None,
            "targets": {"float_tolerance": p.float_tolerance, "quant_max_drop_points": p.quant_max_drop},
            "backends": {name: {k: v for k, v in row.items() if k not in ("note", "seconds")}
                         for name, row in table.items()},
        }
        (out / "timing.json").write_text(json.dumps({name: {"seconds": row["seconds"]} for name, row in table.items()},
                                                    indent=2) + "\n")
        for row in report["backends"].values():
            if "multicrop" in row:
                row["multicrop"] = {k: v for k, v in row["multicrop"].items() if not k.startswith("pred_")}
        (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        (out / "eval.md").write_text(_markdown(report, p), encoding="utf-8")
        return _flat_metrics(report)


# -- backends -------------------------------------------------------------------------------------------
@dataclass
class _Backend:
    """One backend input: its name, its preprocess.json and the loaded backend (stages.common.backends)."""

    name: str
    folder: Path
    spec: Any
    runner: Backend

    @property
    def kind(self) -> str:
        return self.runner.kind

    def logits(self, images: np.ndarray, ctx: Context) -> np.ndarray:
        from stages.common.preprocess import normalize

        outs = []
        step = 256
        for i in range(0, len(images), step):
            x = normalize(np.asarray(images[i:i + step]), self.spec)
            outs.append(np.asarray(self.runner.logits(x), dtype=np.float32).reshape(len(x), -1))
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def detect_kind(folder: Path) -> str | None:
    """The backend kind a model folder holds (the first registered backend that recognises it), or None."""
    cls = backends.recognise(folder)
    return cls.kind if cls else None


def _detect(name: str, folder: Path, classes: list[str], hw: tuple[int, int], p, data: Path, ctx) -> _Backend:
    from stages.common.preprocess import Preprocess

    cls = backends.recognise(folder)
    if cls is None:
        raise StageError(f"input {name}: {folder} holds no model evaluate can run ({backends.model_files()}; "
                         f"model.rknn needs test_logits.npy beside it)")
    check_bundle(folder, (PREPROCESS,), input=name, hint="every model bundle carries it")
    spec = Preprocess.load(folder)
    if tuple(spec.input_size) != tuple(hw):
        raise StageError(f"input {name}: the model takes {spec.height}x{spec.width} but the dataset's images are "
                         f"{hw[0]}x{hw[1]}: they were made with different preprocess.input_size")
    if (folder / LABELS).is_file():
        theirs = read_labels(folder)
        if theirs != classes:
            raise StageError(f"input {name}: its labels.txt {theirs[:6]} does not match the dataset's {classes[:6]} "
                             f"(a model trained on other classes or another class order)")
    io = read_io(folder)
    try:
        runner = cls(folder, io, threads=p.threads, batch=p.batch)
        runner.check_data(data, p.split, classes)
    except backends.BackendError as e:
        raise StageError(f"input {name}: {e}") from None
    if runner.precomputed and p.multicrop.enabled:
        ctx.log.info("backend %s: %s logits are single-crop only (multi-crop needs the build session)",
                     name, runner.kind)
    return _Backend(name, folder, spec, runner)


def _pick_reference(backends: list[_Backend], wanted: str | None) -> _Backend | None:
    if wanted is not None:
        for b in backends:
            if b.name == wanted:
                return b
        raise StageError(f"evaluate.reference={wanted!r} is not one of the backend inputs "
                         f"{[b.name for b in backends]}")
    for kind in REFERENCE_KINDS:
        for b in backends:
            if b.kind == kind:
                return b
    return None


# -- multi-crop -------------------------------------------------------------------------------------------
def crop_boxes(w: int, h: int, aspect: float, k: int) -> list[tuple[int, int, int, int]]:
    """K windows (left, top, right, bottom) of width/height ``aspect``, as large as the image allows,
    evenly spaced along its long side (overlapping when K windows do not fit side by side)."""
    if w / h >= aspect:
        ch, cw = h, max(1, min(w, round(h * aspect)))
        xs = np.linspace(0, w - cw, k).round().astype(int)
        return [(int(x), 0, int(x) + cw, ch) for x in xs]
    cw, ch = w, max(1, min(h, round(w / aspect)))
    ys = np.linspace(0, h - ch, k).round().astype(int)
    return [(0, int(y), cw, int(y) + ch) for y in ys]


def _multicrop_images(data: Path, p, spec, hw, n: int, ctx) -> np.ndarray:
    """uint8 N x K x H x W x 3 crops of the original files of the first N rows of the split."""
    from stages.common.preprocess import load_image, resize

    index = data / "index.csv"
    if not index.is_file():
        raise StageError(f"evaluate.multicrop needs {index} (the dataset's list of original files)")
    with open(index, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == p.split]
    if len(rows) < n:
        raise StageError(f"{index} lists {len(rows)} {p.split} images, the arrays hold {n}")
    root = Path(p.multicrop.root)
    if root.is_file():
        root = root.parent
    h, w = hw
    k = p.multicrop.crops
    crops = np.empty((n, k, h, w, 3), np.uint8)
    for i, row in enumerate(rows[:n]):
        path = root / row["path"]
        if not path.is_file():
            raise StageError(f"evaluate.multicrop: {path} (index.csv row of {p.split} image {i}) does not exist; "
                             f"multicrop.root must be the folder index.csv paths are relative to (dataset.path). "
                             f"Datasets without files (kind=digits) cannot be multi-cropped")
        img = load_image(path)
        for j, box in enumerate(crop_boxes(img.width, img.height, w / h, k)):
            crops[i, j] = resize(img.crop(box), spec)
        if i % 64 == 0:
            ctx.progress(i, n, "multi-crop: reading original images" if i == 0 else None)
    return crops


def combine_crops(crop_logits: np.ndarray, threshold: float, negative: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean-probability prediction, vote prediction, undecided mask) from N x K x C crop logits."""
    z = crop_logits - crop_logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pred_mean = prob.mean(1).argmax(-1)
    n, k, c = crop_logits.shape
    votes = np.zeros((n, c), np.int64)
    for j in range(k):
        np.add.at(votes, (np.arange(n), crop_logits[:, j].argmax(-1)), 1)
    if negative is not None:
        votes_pos = votes.copy()
        votes_pos[:, negative] = -1
        best = votes_pos.argmax(-1)
        decided = votes_pos[np.arange(n), best] >= threshold * k - 1e-9
        pred_vote = np.where(decided, best, negative)
        return pred_mean, pred_vote, np.zeros(n, bool)
    best = votes.argmax(-1)
    decided = votes[np.arange(n), best] >= threshold * k - 1e-9
    return pred_mean, np.where(decided, best, pred_mean), ~decided


# -- scoring ----------------------------------------------------------------------------------------------
def confusion(labels: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def _score(results, labels, classes, ref_name, p) -> dict[str, dict[str, Any]]:
    from stages.common import parity  # float backends: the converting stages' scale-aware rule

    c = len(classes)
    table: dict[str, dict[str, Any]] = {}
    ref = results.get(ref_name) if ref_name else None
    for name, r in results.items():
        logits = r["logits"]
        m = len(logits)
        y = labels[:m]
        pred = logits.argmax(1)
        cm = confusion(y, pred, c)
        support = cm.sum(1)
        row: dict[str, Any] = {
            "kind": r["kind"], "samples": int(m),
            "top1": float((pred == y).mean()) if m else float("nan"),
            "per_class": {cls: (float(cm[i, i] / support[i]) if support[i] else None) for i, cls in enumerate(classes)},
            "confusion": cm.tolist(), "seconds": r["seconds"],
        }
        if r.get("detail"):
            row["detail"] = r["detail"]
        if ref is not None and name != ref_name:
            k = min(m, len(ref["logits"]))
            rl, bl = ref["logits"][:k], logits[:k]
            diff = np.abs(rl.astype(np.float64) - bl.astype(np.float64))
            ref_top1 = float((rl.argmax(1) == labels[:k]).mean())
            row.update({
                "agreement": float((rl.argmax(1) == bl.argmax(1)).mean()),
                "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                "reference_top1": ref_top1,
                "drop_points": round((ref_top1 - float((bl.argmax(1) == labels[:k]).mean())) * 100, 4),
            })
            if r["target"] == "float":
                allowed = parity.allowed_abs_diff(rl, p.float_tolerance)
                ok = row["agreement"] == 1.0 and row["max_abs_diff"] <= allowed
                row["target"] = (f"agreement 100% and max abs diff <= {allowed:.3g} "
                                 f"({p.float_tolerance:g} + {parity.RTOL:g} x reference logit range)")
            elif r["target"] == "quantized":
                ok = row["drop_points"] <= p.quant_max_drop
                row["target"] = f"top-1 drop <= {p.quant_max_drop:g} points"
            else:
                ok = None
            row["target_met"] = ok
            if ok is False:
                row["note"] = (f"{name}: misses its target ({row['target']}): agreement {row['agreement']:.2%}, "
                               f"max abs diff {row['max_abs_diff']:.3g}, drop {row['drop_points']:.2f} points")
        if "crop_logits" in r:
            neg = None
            if p.multicrop.negative_class is not None:
                if p.multicrop.negative_class not in classes:
                    raise StageError(f"evaluate.multicrop.negative_class={p.multicrop.negative_class!r} is not a class "
                                     f"({classes})")
                neg = classes.index(p.multicrop.negative_class)
            pm, pv, undecided = combine_crops(r["crop_logits"], p.multicrop.vote_threshold, neg)
            row["multicrop"] = {
                "crops": int(r["crop_logits"].shape[1]),
                "top1_mean": float((pm == labels[:m]).mean()), "top1_vote": float((pv == labels[:m]).mean()),
                "undecided": int(undecided.sum()), "vote_threshold": p.multicrop.vote_threshold,
                "pred_mean": pm.tolist(), "pred_vote": pv.tolist(),
            }
        table[name] = row
    return table


def _flat_metrics(report: dict) -> dict[str, Any]:
    """{'top1': {backend: acc}, 'agreement': {...}, ...}: flattened by the engine to top1.onnx etc."""
    out: dict[str, Any] = {"samples": report["samples"]}
    for key in ("top1", "agreement", "max_abs_diff", "drop_points", "target_met"):
        vals = {name: row[key] for name, row in report["backends"].items() if key in row and row[key] is not None}
        if vals:
            out[key] = vals
    mc = {name: row["multicrop"]["top1_mean"] for name, row in report["backends"].items() if "multicrop" in row}
    if mc:
        out["multicrop_top1_mean"] = mc
        out["multicrop_top1_vote"] = {name: row["multicrop"]["top1_vote"]
                                      for name, row in report["backends"].items() if "multicrop" in row}
    return out


# -- reports ----------------------------------------------------------------------------------------------
def _markdown(report: dict, p) -> str:
    ref = report["reference"]
    lines = [f"# Evaluation: {report['split']} split, {report['samples']} images, {len(report['classes'])} classes", ""]
    lines.append(f"fp32 reference: `{ref}`" if ref else "no fp32 (PyTorch) backend: agreement columns are empty")
    lines += ["", "| backend | kind | samples | top-1 | Δ vs fp32 (points) | agreement with fp32 | max abs logit diff | target |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, row in report["backends"].items():
        tgt = {True: "✓", False: "✗", None: ""}[row.get("target_met")]
        if tgt and row.get("target"):
            tgt += f" ({row['target']})"
        if name == ref:
            tgt = "reference"
        drop = f"{-row['drop_points'] + 0.0:+.2f}" if "drop_points" in row else ""
        agree = f"{row['agreement']:.2%}" if "agreement" in row else ""
        mad = f"{row['max_abs_diff']:.3g}" if "max_abs_diff" in row else ""
        kind = row["kind"] + (f" ({row['detail']})" if row.get("detail") else "")
        lines.append(f"| {name} | {kind} | {row['samples']} | {row['top1']:.2%} | {drop} | {agree} | {mad} | {tgt} |")
    mc_rows = [(n, r["multicrop"]) for n, r in report["backends"].items() if "multicrop" in r]
    if mc_rows:
        lines += ["", f"## Multi-crop ({mc_rows[0][1]['crops']} crops of the original images)", "",
                  "| backend | single-crop top-1 | mean-probability top-1 | vote top-1 | undecided |", "|---|---:|---:|---:|---:|"]
        for n, mc in mc_rows:
            lines.append(f"| {n} | {report['backends'][n]['top1']:.2%} | {mc['top1_mean']:.2%} | {mc['top1_vote']:.2%} "
                         f"| {mc['undecided']} |")
        lines.append("")
        lines.append(f"Vote: a class wins when at least {p.multicrop.vote_threshold:.0%} of the crops agree"
                     + (f"; otherwise `{p.multicrop.negative_class}`." if p.multicrop.negative_class
                        else "; otherwise the mean-probability class (counted as undecided)."))
    names = list(report["backends"])
    lines += ["", "## Per-class accuracy", "", "| class | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for cls in report["classes"]:
        cells = []
        for n in names:
            v = report["backends"][n]["per_class"].get(cls)
            cells.append("" if v is None else f"{v:.1%}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrices (rows: true class, columns: predicted)", ""]
    for n in names:
        lines.append(f"![{n}](confusion_{_safe(n)}.png)")
    lines.append("")
    return "\n".join(lines)


def _confusion_png(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(classes)
    size = min(12.0, max(4.0, 0.45 * c + 2.5))
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(c)
    short = [s if len(s) <= 14 else s[:13] + "…" for s in classes]
    ax.set_xticks(ticks, short, rotation=90 if c > 6 else 0, fontsize=8)
    ax.set_yticks(ticks, short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


# -- small helpers ---------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)



def _json_safe(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
