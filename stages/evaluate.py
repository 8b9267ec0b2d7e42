"""`evaluate`: every backend the pipeline produced, scored on the same test images, in one table.

Inputs: ``data`` (required) is a ``dataset`` folder; every other input is a backend, labelled by its
input name, whose kind is detected from its folder by the backend registry
(``backends.base``: PyTorch ``model.pt``, TorchScript, ONNX Runtime, ncnn, and the RKNN simulator's
stored ``test_logits.npy``; the registered class first in order that recognises the folder wins).
An ``rknn_quantize`` folder run with ``quantize.board_eval.device_id`` also holds the board NPU's
logits: scored as a second row, ``<input>_board`` (kind ``rknn_board``), beside the simulator's.

Each backend gets the test images through its own ``preprocess.json`` with the shared
``stages.common.preprocess.normalize`` (uint8 RGB -> float NCHW in its channel order): the code
training used. Input/output blob names come from its ``io.json``. The split is read memory-mapped,
a batch at a time (a 100,000-image split is never in memory at once).

Per backend: top-1, per-class accuracy, confusion matrix (``confusion_<backend>.png``), and against
the fp32 reference (the first PyTorch backend unless ``evaluate.reference`` names one): top-1
agreement, max/mean abs logit difference and the top-1 change in points. Quality targets are checked
per backend: float backends agree 100% within ``float_tolerance`` plus ``parity.RTOL`` x the
reference logit range (the converting stages' rule); quantized ones (backend target "quantized") are
judged by the int8 gate, ``stages.common.quant_gate``, on the scored split: images lost and gained
against the reference, the net drop with its exact 95% interval, one image in points, and the rule
(net images lost at most ``quant_max_drop`` rounded up to whole images). Their ``agreement`` and
``logit_cosine`` need no labels, so they cover every image that is not training data: val and test
(``label_free_splits``; the reference runs on val too, a precomputed backend gives its stored val
logits when its stage stored them). ``metrics.json`` holds ``target_met``, a one-line ``missed`` (the
gate's verdict, e.g. ``net +2 images of 72 (...) > 1 image allowed by the 1-point target``) and
``model_digest`` (the engine's digest of the model folder the row scored), which the package stage
reads to refuse a model that missed its target (``package.enforce_targets``); evaluate itself never
fails on a miss. Outputs: ``metrics.json``, ``eval.md``,
``predictions.npz``, ``confusion_<backend>.png``, ``features.npz`` (penultimate-layer features of the
first PyTorch backend on up to ``features_samples`` seeded test images, float16, with their labels,
row indices and predictions: what the report's t-SNE draws), ``timing.json`` (not in the digest).

Multi-crop (``evaluate.multicrop.enabled``; ``stages.common.multicrop``): K overlapping windows of
each test image's original file, combined by mean probability and by vote (a class wins when at
least ``vote_threshold`` of the crops agree; otherwise ``negative_class`` when given, else the
mean-probability class, counted as undecided). RKNN models get theirs from rknn_quantize, which
reads the same ``evaluate.multicrop`` section and runs the crops through the simulator in its build
session (``test_crop_logits.npy``). Not available for datasets without files (kind=digits).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from backends import base as backends
from backends.base import Backend
from engine.contract.markdown import code, escape
from engine.contract.stage import NOT_IN_KEY, Context, Input, Params, Stage, StageError
from stages.common.bundle import LABELS, PREPROCESS, check_bundle, read_io, read_labels
from stages.common.multicrop import MultiCrop, combine_crops, crop_batches, crop_boxes, original_files

__all__ = ["Evaluate", "MultiCrop", "combine_crops", "crop_boxes", "detect_kind"]

# images normalised and run per batch: bounds memory for any split size
STEP = 256


class Evaluate(Stage):
    name = "evaluate"
    # MB, for run --jobs: every backend loaded, the rknn simulator too (~1.1 GB measured at 32 px)
    peak_memory_mb = 1500
    tools = ("torch", "onnxruntime", "ncnn")  # their versions are in the cache key
    # 2: features.npz; RKNN multi-crop and board rows
    # 3: metrics.json's missed + model_digest per backend; confusion PNGs drawn with a CJK font when installed
    # 4: quantized rows judged by stages.common.quant_gate (lost/gained images, interval, whole-image rule);
    #    their agreement and logit_cosine over val + test
    # 5: evaluate.limit scores a seeded class-stratified sample (sampling.limited), the one quantize.data_limit
    #    stores logits of; stored logits are matched to the scored images by row; predictions.npz's `rows`
    version = 5
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
        # score N images of the split, a seeded class-stratified sample (null: all); the same N of the other
        # split for the label-free figures; quantize.data_limit=N stores the simulator's logits of the same N
        limit: int | None = Field(None, ge=1)
        # quality targets (reported here; package.enforce_targets refuses a shipped model that misses
        # them): float backends agree 100% with max abs logit difference <= float_tolerance; quantized
        # backends lose at most quant_max_drop top-1 points, rounded up to whole images (README "Evaluation")
        float_tolerance: float = Field(1e-3, gt=0)
        quant_max_drop: float = Field(1.0, ge=0)
        multicrop: MultiCrop = MultiCrop()
        # features.npz: penultimate-layer features of at most this many images (0: none), drawn with the seed
        features_samples: int = Field(2000, ge=0)
        features_seed: int = 0
        # batch size for backends that take one (torch, torchscript, dynamic-batch ONNX)
        batch: Annotated[int, NOT_IN_KEY] = Field(32, ge=1)
        threads: Annotated[int, NOT_IN_KEY] = Field(1, ge=1)

        @model_validator(mode="after")
        def _check(self) -> Evaluate.Params:
            if self.multicrop.enabled and self.multicrop.root is None:
                raise ValueError("multicrop.enabled=true needs multicrop.root: the folder the dataset's index.csv "
                                 "paths are relative to (usually dataset.path)")
            return self

    def run(self, p: Evaluate.Params, inputs: Mapping[str, Path], out: Path, ctx: Context) -> dict[str, Any]:
        split = _read_split(inputs["data"], p)
        models = [m for name, folder in inputs.items() if name != "data"
                  for m in _load_backends(name, folder, split, p, ctx)]
        if not models:
            raise StageError("evaluate has no backend to score: add model folders to its `needs:` "
                             "(e.g. model: train, onnx: onnx, rknn: rknn)")
        split = _stored_first(split, models)
        ref = _pick_reference(models, p.reference)
        results = {m.name: _single_crop(m, split, ctx) for m in models}
        if p.multicrop.enabled:
            _add_crop_logits(results, models, split, p, ctx)
        label_free = _label_free(models, ref, results, split, p, ctx)
        ctx.progress(len(models), len(models), "scoring")
        table = _score(results, split.labels, split.classes, ref.name if ref else None, p, label_free)
        for m in models:
            if "note" in table[m.name]:
                ctx.note(table[m.name]["note"])
        for m in models:  # which model folder each row scored: the package stage finds its own by it
            table[m.name]["input"] = m.input
            if ctx.sources.get(m.input, {}).get("digest"):
                table[m.name]["model_digest"] = ctx.sources[m.input]["digest"]
        report = _report(table, split, ref, p)
        _write_outputs(out, results, table, report, split, p)
        _write_features(out, models, ref, results, split, p, ctx)
        return _flat_metrics(report)


# -- the split --------------------------------------------------------------------------------------------
@dataclass
class _Split:
    """The scored images of a dataset split: ``rows`` of the stored split (evaluate.limit's sample), in the
    order every result lists them; images stay memory-mapped (read a batch at a time)."""

    name: str
    folder: Path
    classes: list[str]
    images: np.ndarray  # uint8 N x H x W x 3, the whole stored split, memory-mapped
    all_labels: np.ndarray  # int64 N, the whole stored split
    rows: np.ndarray  # int64 n: the scored rows of the stored split
    spec: Any  # the dataset's Preprocess, or None

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self.all_labels[self.rows]

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])


def _read_split(data: Path, p) -> _Split:
    from stages.common.preprocess import Preprocess
    from stages.common.sampling import limited
    from stages.common.splits import load_split

    check_bundle(data, (LABELS,), input="data", hint="expected a dataset folder")
    images, labels = load_split(data, p.split, split_key="evaluate.split")
    if len(labels) == 0:
        raise StageError(f"input data: the {p.split} split is empty")
    spec = Preprocess.load(data) if (data / PREPROCESS).is_file() else None
    return _Split(p.split, data, read_labels(data), images, np.asarray(labels), limited(labels, p.limit), spec)


def _stored_rows(all_labels: np.ndarray, stored: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``rows`` a stage's ``stored`` logits cover and where: (positions in ``rows``, indices into the
    stored logits). A stage that limits the images it runs keeps ``sampling.limited(labels, N)``'s rows in
    row order (rknn_quantize's quantize.data_limit), so N alone says which rows they are."""
    from stages.common.sampling import limited

    kept = limited(all_labels, stored)
    at = np.minimum(np.searchsorted(kept, rows), max(len(kept) - 1, 0))
    covered = np.flatnonzero(kept[at] == rows) if len(kept) else np.zeros(0, np.int64)
    return covered, at[covered]


def _stored_first(split: _Split, models: list[_Backend]) -> _Split:
    """The scored rows reordered so that the rows every precomputed backend stored come first (then those
    fewer of them stored): each such backend's logits cover a prefix of the scored images, the layout every
    result, predictions.npz and the report share. Unchanged when they stored every scored row."""
    stored = [len(m.runner.stored_logits()) for m in models if m.runner.precomputed]
    coverage = np.zeros(split.n, np.int64)
    for count in stored:
        coverage[_stored_rows(split.all_labels, count, split.rows)[0]] += 1
    order = np.lexsort((split.rows, -coverage))
    return replace(split, rows=split.rows[order])


# -- backends -------------------------------------------------------------------------------------------
@dataclass
class _Backend:
    """One scored backend: its row name, its input's name, its folder's preprocess.json and the loaded
    backend."""

    name: str
    input: str
    folder: Path
    spec: Any
    runner: Backend

    @property
    def kind(self) -> str:
        return self.runner.kind

    def logits(self, images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Logits of uint8 N x H x W x 3 images, or of those ``rows`` of them, in that order (a memory map
        is read STEP images at a time)."""
        from stages.common.preprocess import normalize
        from stages.common.splits import read_rows

        outs = []
        for i in range(0, len(images) if rows is None else len(rows), STEP):
            x = normalize(read_rows(images, slice(i, i + STEP) if rows is None else rows[i:i + STEP]), self.spec)
            outs.append(np.asarray(self.runner.logits(x), dtype=np.float32).reshape(len(x), -1))
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def detect_kind(folder: Path) -> str | None:
    """The backend kind a model folder holds (the first registered backend that recognises it), or None."""
    cls = backends.recognise(folder)
    return cls.kind if cls else None


def _load_backends(name: str, folder: Path, split: _Split, p, ctx) -> list[_Backend]:
    """The backend(s) of one input: the class that recognises its folder, and its companions there."""
    from stages.common.preprocess import Preprocess

    classes = backends.recognise_all(folder)
    if not classes:
        raise StageError(f"input {name}: {folder} holds no model evaluate can run ({backends.model_files()}; "
                         f"model.rknn needs test_logits.npy beside it)")
    check_bundle(folder, (PREPROCESS,), input=name, hint="every model bundle carries it")
    spec = Preprocess.load(folder)
    if tuple(spec.input_size) != split.hw:
        raise StageError(f"input {name}: the model takes {spec.height}x{spec.width} but the dataset's images are "
                         f"{split.hw[0]}x{split.hw[1]}: they were made with different preprocess.input_size")
    if (folder / LABELS).is_file() and read_labels(folder) != split.classes:
        raise StageError(f"input {name}: its labels.txt {read_labels(folder)[:6]} does not match the dataset's "
                         f"{split.classes[:6]} (a model trained on other classes or another class order)")
    if split.spec is not None and (spec.resize, spec.interpolation) != (split.spec.resize, split.spec.interpolation):
        ctx.log.warning("backend %s: preprocess resize=%s/%s differs from the dataset's %s/%s; the test images were "
                        "resized the dataset's way", name, spec.resize, spec.interpolation, split.spec.resize,
                        split.spec.interpolation)
    io = read_io(folder)
    loaded = []
    for cls in classes:
        try:
            runner = cls(folder, io, threads=p.threads, batch=p.batch)
            runner.check_data(split.folder, p.split, split.classes)
        except backends.BackendError as e:
            raise StageError(f"input {name}: {e}") from None
        loaded.append(_Backend(name + cls.suffix, name, folder, spec, runner))
    return loaded


def _pick_reference(models: list[_Backend], wanted: str | None) -> _Backend | None:
    if wanted is not None:
        for b in models:
            if b.name == wanted:
                return b
        raise StageError(f"evaluate.reference={wanted!r} is not one of the backend inputs "
                         f"{[b.name for b in models]}")
    # the backend class says whether it can be the reference (Backend.reference_rank: lowest first)
    ranked = sorted((b for b in models if b.runner.reference_rank is not None), key=lambda b: b.runner.reference_rank)
    return ranked[0] if ranked else None


def _single_crop(m: _Backend, split: _Split, ctx) -> dict[str, Any]:
    """The backend's logits on the split's arrays (stored ones for precomputed backends), checked."""
    ctx.progress(None, None, f"{m.name} ({m.kind})")
    t0 = time.perf_counter()
    if m.runner.precomputed:
        logits = _stored_prefix(m, m.runner.stored_logits(), split)
    else:
        logits = m.logits(split.images, split.rows)
    if logits.ndim != 2 or logits.shape[1] != len(split.classes):
        raise StageError(f"input {m.name}: the model gives outputs of shape {list(logits.shape)}, expected "
                         f"N x {len(split.classes)} (one logit per class of labels.txt)")
    return {"kind": m.kind, "folder": str(m.folder), "logits": logits, "target": m.runner.target,
            "seconds": round(time.perf_counter() - t0, 3), "detail": m.runner.detail}


def _stored_prefix(m: _Backend, stored: np.ndarray, split: _Split) -> np.ndarray:
    """The rows of a precomputed backend's stored logits (or crop logits) that belong to the scored images,
    in their order: a prefix of them (``_stored_first``)."""
    covered, at = _stored_rows(split.all_labels, len(stored), split.rows)
    if not np.array_equal(covered, np.arange(len(covered))):
        raise StageError(f"input {m.input}: its stored logits cover other {split.name} images than another input's "
                         f"(their stages ran with different quantize.data_limit): give them the same one")
    return stored[at]


# -- label-free figures: every image that is not training data ------------------------------------------
def _label_free(models: list[_Backend], ref: _Backend | None, results: dict, split: _Split, p,
                ctx) -> dict[str, dict[str, Any]]:
    """Each quantized backend's top-1 agreement and mean logit cosine with the reference over the scored
    split and the other non-training split (val beside test): they need no labels, so they can use
    every image the model was not trained on. A precomputed backend gives the other split's logits
    only when its stage stored them; otherwise the row says which splits it covers."""
    from stages.common.quant_gate import agreement_and_cosine

    quantized = [m for m in models if m.runner.target == "quantized" and m is not ref]
    if ref is None or not quantized:
        return {}
    other = "val" if split.name == "test" else "test"
    images = _other_split(split.folder, other, p)
    ref_other = None if images is None else _split_logits(ref, split, other, images, ctx)
    if ref_other is not None:  # the reference's logits at every kept row (NaN where it stored none)
        full = np.full((len(images[2]), ref_other[1].shape[1]), np.nan, np.float32)
        full[ref_other[0]] = ref_other[1]
        ref_other = full
    figures: dict[str, dict[str, Any]] = {}
    for m in quantized:
        k = min(len(results[m.name]["logits"]), len(results[ref.name]["logits"]))
        parts = {split.name: (results[ref.name]["logits"][:k], results[m.name]["logits"][:k])}
        quant_other = None if ref_other is None else _split_logits(m, split, other, images, ctx)
        if quant_other is not None:
            both = ~np.isnan(ref_other[quant_other[0]]).any(1)  # rows both have
            parts[other] = (ref_other[quant_other[0]][both], quant_other[1][both])
        elif images is not None:
            ctx.log.info("%s: agreement and logit cosine over the %s split only (%s stored no %s logits)",
                         m.name, split.name, m.folder, other)
        names = [s for s in ("val", "test") if s in parts]
        agreement, cosine = agreement_and_cosine(np.concatenate([parts[s][0] for s in names]),
                                                 np.concatenate([parts[s][1] for s in names]))
        figures[m.name] = {"agreement": agreement, "logit_cosine": round(cosine, 6), "label_free_splits": names,
                           "label_free_images": int(sum(len(parts[s][0]) for s in names))}
    return figures


def _other_split(data: Path, name: str, p) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The dataset's other non-training split: (images, memory-mapped; labels; the rows `limit` keeps,
    the same seeded class-stratified sample as the scored split's), or None when it has none."""
    from stages.common.sampling import limited
    from stages.common.splits import load_split, split_files

    if not all(f.is_file() for f in split_files(data, name)):
        return None
    images, labels = load_split(data, name, what="input data")
    return (images, np.asarray(labels), limited(labels, p.limit)) if len(labels) else None


def _split_logits(m: _Backend, split: _Split, name: str, other: tuple, ctx):
    """A backend's logits on another split's kept rows, as (their positions among the kept rows, logits):
    computed on all of them, or those of the rows its stage stored (None when it stored none)."""
    images, labels, rows = other
    ctx.progress(None, None, f"{m.name} on the {name} split (label-free figures)")
    if not m.runner.precomputed:
        return np.arange(len(rows)), m.logits(images, rows)
    try:
        stored = m.runner.stored_split_logits(split.folder, name, split.classes)
    except backends.BackendError as e:
        raise StageError(f"input {m.input}: {e}") from None
    if stored is None:
        return None
    covered, at = _stored_rows(labels, len(stored), rows)
    return covered, stored[at]


# -- multi-crop -------------------------------------------------------------------------------------------
def _add_crop_logits(results: dict, models: list[_Backend], split: _Split, p, ctx) -> None:
    """results[name]["crop_logits"] (N x K x C) for every backend that has them: computed ones run the
    crops of each chunk of original files; precomputed ones give what their stage stored."""
    k = p.multicrop.crops
    computed = [m for m in models if not m.runner.precomputed]
    for m in models:
        if m.runner.precomputed:
            _stored_crop_logits(results[m.name], m, split, k, ctx)
    if not computed:
        return
    listed = original_files(split.folder, split.name, int(split.rows.max()) + 1, p.multicrop.root)
    files = [listed[r] for r in split.rows]
    parts: dict[str, list[np.ndarray]] = {m.name: [] for m in computed}
    for start, crops in crop_batches(files, k, split.spec or computed[0].spec, split.hw):
        ctx.progress(start, split.n, "multi-crop: reading original images" if start == 0 else None)
        for m in computed:
            parts[m.name].append(m.logits(crops.reshape(-1, *crops.shape[2:])).reshape(len(crops), k, -1))
    for name, chunks in parts.items():
        results[name]["crop_logits"] = np.concatenate(chunks)


def _stored_crop_logits(result: dict, m: _Backend, split: _Split, k: int, ctx) -> None:
    stored = m.runner.stored_crop_logits()
    if stored is None:
        if not m.runner.stores_crops:  # eval.md says "no crop logits" on its row
            return
        ctx.note(f"{m.name}: no multi-crop logits in {m.folder} ({m.kind}: its stage computes them; rknn_quantize "
                 f"does when it reads the same evaluate.multicrop settings with enabled=true)")
        return
    if stored.ndim != 3 or stored.shape[1] != k:
        raise StageError(f"input {m.name}: its test_crop_logits.npy holds {list(stored.shape)[1:2]} crops per image, "
                         f"evaluate.multicrop.crops={k}: rebuild it with the same evaluate.multicrop settings")
    result["crop_logits"] = _stored_prefix(m, stored, split)


# -- scoring ----------------------------------------------------------------------------------------------
def confusion(labels: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def _score(results, labels, classes, ref_name, p, label_free) -> dict[str, dict[str, Any]]:
    """One row per backend: top-1, per-class accuracy, confusion; against the reference: agreement,
    logit differences, the top-1 change and the quality target; multi-crop figures."""
    ref = results.get(ref_name) if ref_name else None
    table: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        row = _accuracy_row(r, labels, classes)
        if ref is not None and name != ref_name:
            row.update(_versus_reference(name, r, ref["logits"], labels, p, label_free.get(name)))
        if "crop_logits" in r:
            row["multicrop"] = _multicrop_row(r["crop_logits"], labels, classes, p)
        table[name] = row
    return table


def _accuracy_row(r: dict, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    logits = r["logits"]
    m = len(logits)
    y = labels[:m]
    pred = logits.argmax(1)
    cm = confusion(y, pred, len(classes))
    support = cm.sum(1)
    row: dict[str, Any] = {
        "kind": r["kind"], "samples": int(m),
        "top1": float((pred == y).mean()) if m else float("nan"),
        "per_class": {cls: (float(cm[i, i] / support[i]) if support[i] else None) for i, cls in enumerate(classes)},
        "confusion": cm.tolist(), "seconds": r["seconds"],
    }
    if r.get("detail"):
        row["detail"] = r["detail"]
    return row


def _versus_reference(name: str, r: dict, ref_logits: np.ndarray, labels: np.ndarray, p,
                      label_free: dict | None) -> dict[str, Any]:
    from stages.common import parity  # float backends: the converting stages' scale-aware rule

    k = min(len(r["logits"]), len(ref_logits))
    rl, bl = ref_logits[:k], r["logits"][:k]
    diff = np.abs(rl.astype(np.float64) - bl.astype(np.float64))
    ref_top1 = float((rl.argmax(1) == labels[:k]).mean())
    row: dict[str, Any] = {
        "agreement": float((rl.argmax(1) == bl.argmax(1)).mean()),
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "reference_top1": ref_top1,
        "drop_points": round((ref_top1 - float((bl.argmax(1) == labels[:k]).mean())) * 100, 4),
    }
    ok, missed = None, []
    if r["target"] == "float":
        allowed = parity.allowed_abs_diff(rl, p.float_tolerance)
        if row["agreement"] < 1.0:
            missed.append(f"top-1 agreement with fp32 {row['agreement']:.2%} < 100%")
        if row["max_abs_diff"] > allowed:
            missed.append(f"max abs logit diff {row['max_abs_diff']:.3g} > {allowed:.3g}")
        ok = not missed
        row["target"] = (f"agreement 100% and max abs diff <= {allowed:.3g} "
                         f"({p.float_tolerance:g} + {parity.RTOL:g} x reference logit range)")
    elif r["target"] == "quantized":
        gate = _int8_gate(rl, bl, labels[:k], p)
        ok = gate.pop("holds")
        row.update(gate, **(label_free or {}))
        if not ok:
            missed.append(row["verdict"])
    row["target_met"] = ok
    if missed:  # one line, with the row's name in front: what package.enforce_targets stops on
        row["missed"] = ", ".join(missed)
    if r["target"] == "quantized" and (ok is False or not row["resolved"]):
        row["note"] = f"{name}: {'holds' if ok else 'misses'} its target ({row['target']}): {row['verdict']}"
    elif ok is False:
        row["note"] = (f"{name}: misses its target ({row['target']}): agreement {row['agreement']:.2%}, "
                       f"max abs diff {row['max_abs_diff']:.3g}, drop {row['drop_points']:.2f} points")
    return row


def _int8_gate(ref_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, p) -> dict[str, Any]:
    """The int8 gate (stages.common.quant_gate, the one rule) on the scored split: flips both ways, the
    net drop and its interval, one image in points, and the verdict."""
    from stages.common.quant_gate import judge, paired_drop

    drop = paired_drop(labels, ref_logits, logits)
    verdict = judge(drop, p.quant_max_drop)
    return {"lost_images": drop.lost, "gained_images": drop.gained, "drop_points": drop.drop_points,
            "drop_ci95": list(drop.drop_ci95), "resolution_points": drop.resolution_points,
            "allowed_images": verdict.allowed_images, "resolved": verdict.resolved, "verdict": verdict.reason,
            "holds": verdict.holds,
            "target": (f"top-1 drop <= {p.quant_max_drop:g} points: at most {verdict.allowed_images} net "
                       f"image{'s' if verdict.allowed_images != 1 else ''} lost of {drop.n}")}


def _multicrop_row(crop_logits: np.ndarray, labels: np.ndarray, classes: list[str], p) -> dict[str, Any]:
    mc = p.multicrop
    neg = None
    if mc.negative_class is not None:
        if mc.negative_class not in classes:
            raise StageError(f"evaluate.multicrop.negative_class={mc.negative_class!r} is not a class ({classes})")
        neg = classes.index(mc.negative_class)
    pm, pv, undecided = combine_crops(crop_logits, mc.vote_threshold, neg)
    y = labels[:len(crop_logits)]
    return {
        "crops": int(crop_logits.shape[1]), "samples": int(len(crop_logits)),
        "top1_mean": float((pm == y).mean()), "top1_vote": float((pv == y).mean()),
        "undecided": int(undecided.sum()), "vote_threshold": mc.vote_threshold,
        "pred_mean": pm.tolist(), "pred_vote": pv.tolist(),
    }


def _report(table: dict, split: _Split, ref: _Backend | None, p) -> dict[str, Any]:
    """metrics.json's content: per-backend rows without notes, timings or per-image predictions."""
    rows = {name: {k: v for k, v in row.items() if k not in ("note", "seconds")} for name, row in table.items()}
    for row in rows.values():
        if "multicrop" in row:
            row["multicrop"] = {k: v for k, v in row["multicrop"].items() if not k.startswith("pred_")}
    return {
        "split": p.split, "samples": int(split.n), "classes": split.classes,
        "reference": ref.name if ref else None,
        "targets": {"float_tolerance": p.float_tolerance, "quant_max_drop_points": p.quant_max_drop},
        "backends": rows,
    }


def _write_outputs(out: Path, results: dict, table: dict, report: dict, split: _Split, p) -> None:
    """confusion_<backend>.png, predictions.npz, timing.json, metrics.json and eval.md."""
    for name, r in results.items():
        _confusion_png(out / f"confusion_{_safe(name)}.png", np.asarray(table[name]["confusion"]), split.classes,
                       f"{name} ({r['kind']}): top-1 {table[name]['top1']:.2%} on {table[name]['samples']}")
    # rows: the stored split's row of each scored image (evaluate.limit's sample; stored logits first)
    arrays: dict[str, np.ndarray] = {"labels": split.labels, "rows": split.rows}
    for name, r in results.items():
        arrays[f"{name}.logits"] = r["logits"].astype(np.float32)
        arrays[f"{name}.pred"] = r["logits"].argmax(1).astype(np.int64)
        if "crop_logits" in r:
            arrays[f"{name}.crop_logits"] = r["crop_logits"].astype(np.float32)
            arrays[f"{name}.pred_mean"] = np.asarray(table[name]["multicrop"]["pred_mean"], np.int64)
            arrays[f"{name}.pred_vote"] = np.asarray(table[name]["multicrop"]["pred_vote"], np.int64)
    np.savez_compressed(out / "predictions.npz", **arrays)
    (out / "timing.json").write_text(json.dumps({name: {"seconds": row["seconds"]} for name, row in table.items()},
                                                indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    (out / "eval.md").write_text(_markdown(report, p), encoding="utf-8")


def _write_features(out: Path, models: list[_Backend], ref: _Backend | None, results: dict, split: _Split, p,
                    ctx) -> None:
    """features.npz: penultimate-layer features (float16) of the reference PyTorch backend (else the
    first one) on at most features_samples test images drawn with features_seed, with their labels,
    split row indices and predictions. Nothing without a PyTorch backend or with features_samples=0."""
    torch_models = [m for m in models if m.runner.gives_features]
    if not torch_models or p.features_samples == 0:
        return
    m = ref if ref is not None and ref.runner.gives_features else torch_models[0]
    rng = np.random.default_rng(p.features_seed)
    index = np.sort(rng.choice(split.n, size=min(split.n, p.features_samples), replace=False))
    ctx.progress(None, None, f"features of {len(index)} images ({m.name})")
    from stages.common.preprocess import normalize
    from stages.common.splits import read_rows

    feats = [m.runner.features(normalize(read_rows(split.images, split.rows[index[i:i + STEP]]), m.spec)
                               ).astype(np.float16) for i in range(0, len(index), STEP)]
    np.savez_compressed(out / "features.npz", features=np.concatenate(feats), labels=split.labels[index],
                        index=split.rows[index], pred=results[m.name]["logits"][index].argmax(1).astype(np.int64),
                        classes=np.asarray(split.classes), backend=np.asarray(m.name))


def _flat_metrics(report: dict) -> dict[str, Any]:
    """{'top1': {backend: acc}, 'agreement': {...}, ...}: flattened by the engine to top1.onnx etc."""
    out: dict[str, Any] = {"samples": report["samples"]}
    for key in ("top1", "agreement", "max_abs_diff", "drop_points", "lost_images", "gained_images", "logit_cosine",
                "target_met", "missed"):
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
    """eval.md. Class and backend names and config values are text (markdown_text), never markup: a
    class folder named like an HTML tag stays text in any Markdown viewer."""
    ref = report["reference"]
    lines = [f"# Evaluation: {escape(report['split'])} split, {report['samples']} images, "
             f"{len(report['classes'])} classes", ""]
    lines.append(f"fp32 reference: {code(ref)}" if ref else "no fp32 (PyTorch) backend: agreement columns are empty")
    lines += ["", "| backend | kind | samples | top-1 | Δ vs fp32 (points) | agreement with fp32 "
                  "| max abs logit diff | target |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, row in report["backends"].items():
        tgt = {True: "✓", False: "✗", None: ""}[row.get("target_met")]
        if row.get("missed"):
            tgt += f" **{row['missed']}**"
        if tgt and row.get("target"):
            tgt += f" ({escape(row['target'])})"
        if name == ref:
            tgt = "reference"
        drop = f"{-row['drop_points'] + 0.0:+.2f}" if "drop_points" in row else ""
        agree = f"{row['agreement']:.2%}" if "agreement" in row else ""
        mad = f"{row['max_abs_diff']:.3g}" if "max_abs_diff" in row else ""
        kind = escape(row["kind"] + (f" ({row['detail']})" if row.get("detail") else ""))
        lines.append(f"| {escape(name)} | {kind} | {row['samples']} | {row['top1']:.2%} | {drop} | {agree} | {mad} "
                     f"| {tgt} |")
    lines += _gate_markdown(report, p)
    if p.multicrop.enabled:
        lines += _multicrop_markdown(report, p)
    names = list(report["backends"])
    lines += ["", "## Per-class accuracy", "", "| class | " + " | ".join(map(escape, names)) + " |",
              "|---|" + "---:|" * len(names)]
    for cls in report["classes"]:
        cells = []
        for n in names:
            v = report["backends"][n]["per_class"].get(cls)
            cells.append("" if v is None else f"{v:.1%}")
        lines.append(f"| {escape(cls)} | " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrices (rows: true class, columns: predicted)", ""]
    for n in names:
        lines.append(f"![{escape(n)}](confusion_{_safe(n)}.png)")
    lines.append("")
    return "\n".join(lines)


def _gate_markdown(report: dict, p) -> list[str]:
    """The quantized rows against fp32: flips both ways, the net drop with its interval, what one image
    weighs, the label-free figures and the verdict; in words when the split cannot resolve the target."""
    from stages.common.quant_gate import CI_METHOD

    gated = {n: row for n, row in report["backends"].items() if "lost_images" in row}
    if not gated:
        return []
    lines = ["", f"## Quantized builds against fp32 ({escape(report['split'])} split, "
                 f"target: top-1 drop <= {p.quant_max_drop:g} points)", "",
             "| backend | lost | gained | net drop (points) | 95% interval | one image (points) | allowed images "
             "| logit cosine | agreement | over (no labels) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, row in gated.items():
        lo, hi = row["drop_ci95"]
        lines.append(f"| {escape(n)} | {row['lost_images']} | {row['gained_images']} | {row['drop_points']:+.2f} "
                     f"| {lo:+.2f} to {hi:+.2f} | {row['resolution_points']:.3g} | {row['allowed_images']} "
                     f"| {row['logit_cosine']:.4f} | {row['agreement']:.2%} "
                     f"| {escape(' + '.join(row['label_free_splits']))} ({row['label_free_images']} images) |")
    lines.append("")
    for n, row in gated.items():
        lines.append(f"- {escape(n)}: {'holds' if row['target_met'] else '**misses**'}: {escape(row['verdict'])}")
    # rows may score different numbers of images (an RKNN build's quantize.data_limit): one sentence per weight
    unresolved: dict[float, list[str]] = {}
    for n, row in gated.items():
        if not row["resolved"]:
            unresolved.setdefault(row["resolution_points"], []).append(n)
    for weight, names in unresolved.items():
        lines += ["", f"**The {escape(report['split'])} split cannot resolve the {p.quant_max_drop:g}-point target:** "
                      f"one image = {weight:.3g} points > {p.quant_max_drop:g} ({', '.join(map(escape, names))}). "
                      "The verdict is the rule's (net images lost at most the target rounded up to whole images); "
                      "the interval shows how far the true drop may lie. More test images resolve it."]
    lines += ["", f"Rule: a build holds when its net loss (lost - gained) is at most the target rounded up to "
                  f"whole images. Interval: {escape(CI_METHOD)}."]
    return lines


def _multicrop_markdown(report: dict, p) -> list[str]:
    """The multi-crop table: single-crop beside mean-probability and vote top-1, one row per backend
    (a backend without crop logits says so)."""
    lines = ["", f"## Multi-crop ({p.multicrop.crops} crops of the original images)", "",
             "| backend | single-crop top-1 | mean-probability top-1 | vote top-1 | undecided |",
             "|---|---:|---:|---:|---:|"]
    for n, row in report["backends"].items():
        mc = row.get("multicrop")
        cells = (f"{mc['top1_mean']:.2%} | {mc['top1_vote']:.2%} | {mc['undecided']}" if mc
                 else "no crop logits | |")
        lines.append(f"| {escape(n)} | {row['top1']:.2%} | {cells} |")
    lines.append("")
    lines.append(f"Vote: a class wins when at least {p.multicrop.vote_threshold:.0%} of the crops agree"
                 + (f"; otherwise {code(p.multicrop.negative_class)}." if p.multicrop.negative_class
                    else "; otherwise the mean-probability class (counted as undecided)."))
    return lines


def _confusion_png(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    from engine.contract.figures import confusion_png  # the report draws the same picture

    path.write_bytes(confusion_png(cm, classes, title))


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
