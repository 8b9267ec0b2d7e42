"""`rknn_quantize`: ONNX model bundle -> ``model.rknn`` for a Rockchip NPU, with rknn-toolkit2.

Inputs
- ``onnx`` (required): an ``export_onnx`` folder (model.onnx, io.json, preprocess.json, labels.txt).
- ``calib`` (required when quantizing): a ``calibration`` folder (dataset.txt + images/).
- ``data`` (optional): a ``dataset`` folder. When wired, the quantized model runs in the toolkit's x86
  simulator on the test split and ``test_logits.npy`` is written; ``evaluate`` reads it. This has to
  happen here: the simulator only runs a model built in the same session (``load_rknn`` followed by
  ``init_runtime()`` without a target is refused by rknn-toolkit2 2.5.0). For the same reason the
  crops of ``evaluate.multicrop`` (read from that section) run here: ``test_crop_logits.npy``.

With ``quantize.search.enabled`` (and ``data`` wired) the stage searches for the cheapest int8 build that
holds ``evaluate.quant_max_drop`` on the val split (``stages.common.quant_search``, implemented here by
``RknnQuantizer``): algorithms x methods x class-balanced calibration subsets cheapest first, then layers
moved to float16 (int16 on rv1103/rv1106, whose NPU has no float16) guided by ``accuracy_analysis``,
then the toolkit's ``build(auto_hybrid=True)`` where the chip has float16. Every candidate is cached
under ``ctx.scratch``; the chosen one's files are this stage's output, beside ``search.json``. When no
candidate holds, the stage fails with one line (best candidate, its drop, the next step).

Config section ``quantize`` (conf/quantize/*.yaml). mean/std are never typed: they come from
``preprocess.json`` (``Preprocess.rknn_mean_std()``: mean*255, std*255 in the model's channel order).
``quantize.board_eval.device_id=SERIAL`` also runs the test split on that board's NPU
(``init_runtime(target=..., device_id=...)``, adb + rknn_server): ``board_test_logits.npy``; the
connection is checked (``stages.common.adb``) before the build.

Outputs: model.rknn, build.json, error_analysis.txt, layers.json (accuracy_analysis per layer, in
network order), rknn.log, test_logits.npy and val_logits.npy (with ``data``), test_crop_logits.npy
(with multi-crop), board_test_logits.npy (with board_eval), search.json (with the search), io.json,
preprocess.json, labels.txt.

Every toolkit call runs inside ``stages.common.rknn_toolkit.toolkit(out / "rknn.log")``: the toolkit
prints from native code, so only redirecting the process's file descriptors keeps the terminal clean.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from boards.rockchip import RKNN_CHIPS
from engine.contract.hashing import sha256_file
from engine.contract.stage import NOT_IN_KEY, Input, Params, Stage, StageError
from stages.common import adb
from stages.common.multicrop import MultiCrop
from stages.common.quant_search import Built, Candidate, CandidateFailed, LayerScore
from stages.common.rknn_toolkit import PeakRss, ToolkitFailure, logged_exception, maxrss_mb, ok, reason, toolkit
from stages.common.rknn_toolkit import version as toolkit_version

# The chips and what the toolkit builds for each come from one table, boards/rockchip.py RKNN_CHIPS.
TARGETS = tuple(RKNN_CHIPS)
DTYPES = ("w8a8", "w8a16", "w16a16i_dfp", "w4a16")
DTYPES_BY_TARGET: dict[str, tuple[str, ...]] = {chip: c.dtypes for chip, c in RKNN_CHIPS.items()}
# build(do_quantization=False) fails on these: their NPU has no float16 path.
INT_ONLY_TARGETS = tuple(chip for chip, c in RKNN_CHIPS.items() if not c.float16)

LOG_NAME = "rknn.log"
# test images (or original files, for crops) read and run per chunk
CHUNK = 64
# selection (val) images run between two early-rejection checks of a search candidate
SELECTION_CHUNK = 8
# the files of a build that ship (the rest of a candidate's folder is the search's record)
SHIPPED = ("model.rknn", "build.json", "error_analysis.txt", "layers.json", LOG_NAME, "test_logits.npy",
           "val_logits.npy", "test_crop_logits.npy")
ALGORITHM_ORDER = ("normal", "kl_divergence", "mmse")  # cheapest first: seconds, more, minutes


class CropSource(MultiCrop):
    """``evaluate.multicrop`` as rknn_quantize reads it: only what makes the crops is in its cache key
    (changing the vote does not rebuild the model)."""

    vote_threshold: Annotated[float, NOT_IN_KEY] = Field(0.5, gt=0.0, le=1.0)
    negative_class: Annotated[str | None, NOT_IN_KEY] = None

    @model_validator(mode="before")
    @classmethod
    def _unused_when_disabled(cls, data: Any) -> Any:
        # disabled: crops and root make nothing, so they must not change the build's cache key either
        if isinstance(data, dict) and not data.get("enabled", False):
            data = {k: v for k, v in data.items() if k not in ("crops", "root")}
        return data


class BoardEval(Params):
    """``quantize.board_eval``: the test split on a board connected through adb (rknn_server running on it)."""

    # the board's adb serial (`adb devices`); null: simulator only
    device_id: str | None = None


class Hybrid(Params):
    """``quantize.search.hybrid``: layers moved to float when no all-int8 candidate holds."""

    enabled: bool = True
    # at most this many layers in float (float16; int16 on chips without float16: rv1103/rv1106)
    max_float_layers: int = Field(8, ge=0)
    # layers moved at a time (a step that makes the selection figure worse is taken back)
    step: int = Field(2, ge=1)
    # then rknn-toolkit2's build(auto_hybrid=True), on chips with float16 (rv1103/rv1106 refuse it)
    auto_hybrid: bool = True


class Search(Params):
    """``quantize.search``: the cheapest build that holds evaluate.quant_max_drop on the val split."""

    enabled: bool = False
    # tried cheapest first: algorithms (in ALGORITHM_ORDER), then calibration sizes, then methods
    algorithms: list[Literal["normal", "kl_divergence", "mmse"]] = Field(
        default_factory=lambda: ["normal", "kl_divergence", "mmse"], min_length=1)
    methods: list[Literal["channel", "layer"]] = Field(default_factory=lambda: ["channel", "layer"], min_length=1)
    # class-balanced, seeded subsets of the calibration set (larger than the set: the whole set)
    calib_images: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64, 200], min_length=1)
    seed: int = 0
    hybrid: Hybrid = Hybrid()
    # no new candidate build starts after this many seconds (cached candidates still count); null: none
    budget_s: float | None = Field(300.0, ge=0)


class RknnQuantize(Stage):
    name = "rknn_quantize"
    peak_memory_mb = 1000  # MB, for run --jobs: rknn-toolkit2 with torch and onnxruntime; mmse: see peak_memory
    tools = ("rknn-toolkit2", "onnx")  # their versions are in the cache key
    config_section = "quantize"
    # 2: test_crop_logits.npy (evaluate.multicrop), board_test_logits.npy (quantize.board_eval)
    # 3: val_logits.npy, layers.json; quantize.search (search.json)
    # 4: quantize.data_limit keeps a seeded class-stratified sample (sampling.limited), not the first rows
    version = 4
    sections = {"multicrop": "evaluate.multicrop", "max_drop": "evaluate.quant_max_drop"}
    # rknn-toolkit2 writes a different model.rknn for the same inputs (~9.5k bytes differ between two
    # identical builds); the simulator outputs are reproducible. model.rknn stays in the output digest
    # (a forced rebuild re-runs evaluate/package, so a package always holds this entry's model);
    # build.json (timings, memory) does not.
    deterministic = False
    volatile_outputs = ("build.json",)

    inputs = {
        "onnx": Input(required=True, doc="export_onnx folder: model.onnx, io.json, preprocess.json, labels.txt"),
        "calib": Input(required=False, doc="calibration folder: dataset.txt + images/ (required when quantizing)"),
        "data": Input(required=False, doc="dataset folder: run the simulator on its test split"),
    }

    class Params(Params):
        """The ``quantize`` section."""

        # target_platform of rknn-toolkit2 (a board profile usually sets it)
        target: Literal[TARGETS] = "rv1103"  # type: ignore[valid-type]  (boards/rockchip.py RKNN_CHIPS)
        # quantized_algorithm: normal (seconds), mmse (minutes, usually the most accurate), kl_divergence
        algorithm: Literal["normal", "mmse", "kl_divergence"] = "normal"
        # quantized_method: per-channel or per-layer weight scales
        method: Literal["channel", "layer"] = "channel"
        # quantized_dtype: which chip builds which is DTYPES_BY_TARGET (w8a8 and w16a16i_dfp everywhere)
        dtype: Literal["w8a8", "w8a16", "w16a16i_dfp", "w4a16"] = "w8a8"
        optimization_level: int = Field(3, ge=0, le=3)
        # false: a float16 model (not on INT_ONLY_TARGETS, whose NPU is integer-only)
        do_quantization: bool = True
        # calibration images analysed layer by layer (error_analysis.txt); 0 skips the analysis
        accuracy_analysis_samples: int = Field(2, ge=0)
        # simulate at most this many test images, a seeded class-stratified sample (null: the whole split)
        data_limit: int | None = Field(None, ge=1)
        # the toolkit's debug-level log in rknn.log (~2.5x bigger): it holds the compiler's layer table
        # (which layers run on the CPU) and memory totals that board checks read; never changes the model
        verbose_log: Annotated[bool, NOT_IN_KEY] = True
        # evaluate.multicrop (read from that section): with `data` wired and enabled, the simulator also
        # runs the crops of the original test files (test_crop_logits.npy)
        multicrop: CropSource = CropSource()
        # run the test split on a connected board's NPU too (board_test_logits.npy)
        board_eval: BoardEval = BoardEval()
        # accuracy-aware int8: candidates until one holds max_drop on the val split
        search: Search = Search()
        # evaluate.quant_max_drop (read from that section): the target the search holds, in top-1 points
        max_drop: float = Field(1.0, ge=0)

        @model_validator(mode="before")
        @classmethod
        def _search_off_is_not_in_the_key(cls, data: Any) -> Any:
            # without the search, its settings and the target change nothing the stage makes
            if isinstance(data, dict):
                search = data.get("search")
                if not (isinstance(search, dict) and search.get("enabled", False)):
                    data = {k: v for k, v in data.items() if k not in ("search", "max_drop")}
            return data

        @model_validator(mode="after")
        def _check(self) -> RknnQuantize.Params:
            if not self.do_quantization and self.target in INT_ONLY_TARGETS:
                raise ValueError(
                    f"do_quantization=false: {self.target} has no float16 NPU path, rknn-toolkit2 only builds "
                    f"quantized models for it; set do_quantization=true (or pick a target such as rk3588)"
                )
            if self.do_quantization and self.dtype not in DTYPES_BY_TARGET[self.target]:
                raise ValueError(
                    f"dtype={self.dtype} is not supported on {self.target} by rknn-toolkit2; "
                    f"use one of {list(DTYPES_BY_TARGET[self.target])}"
                )
            if self.search.enabled and not self.do_quantization:
                raise ValueError("search.enabled=true searches int8 builds: set do_quantization=true "
                                 "(or search.enabled=false for a float16 model)")
            return self

    @classmethod
    def peak_memory(cls, params) -> float:
        """run --jobs: an mmse build holds ~1.7 GB (resnet18 in one process); normal and kl much less."""
        mmse = params.algorithm == "mmse" or (params.search.enabled and "mmse" in params.search.algorithms)
        return 1800 if params.do_quantization and mmse else cls.peak_memory_mb

    def run(self, p: RknnQuantize.Params, inputs, out: Path, ctx) -> dict[str, Any]:
        from stages.common.bundle import copy_forward

        onnx_dir = inputs["onnx"]
        spec, io, shape = _read_onnx_bundle(onnx_dir)
        if p.board_eval.device_id is not None:  # before a build of minutes, not after it
            if "data" not in inputs:
                raise StageError("quantize.board_eval.device_id needs the rknn_quantize stage's `data` input (the "
                                 "test split to run on the board): add `data: <dataset stage>` to its `needs:`")
            adb.check_connected(p.board_eval.device_id, "quantize.board_eval.device_id")
        if p.search.enabled:
            metrics = _search(p, spec, io, shape, inputs, out, ctx)
            copy_forward(onnx_dir, out, io=True)
            return metrics
        calib_list, analysis_inputs, n_calib = _calibration_list(p, inputs, out, spec)
        info = _build_info(p, spec, io, shape, n_calib)
        metrics: dict[str, Any] = {}
        rknn = None
        sampler = PeakRss()
        log_path = out / LOG_NAME
        try:
            if p.do_quantization and p.algorithm == "mmse":
                ctx.note(f"mmse quantization takes minutes ({n_calib} calibration images at "
                         f"{spec.height}x{spec.width}; resnet18 at 224 px took ~6 min here, normal ~6 s)")
            else:
                ctx.progress(None, None, "building" + (f" ({p.algorithm})" if p.do_quantization else " (float16)"))
            with sampler:
                rknn = _build(p, spec, io, shape, onnx_dir, calib_list, out, info, p.algorithm, p.method)
            info.update(rss_peak_mb=sampler.peak_mb, process_maxrss_mb=maxrss_mb(),
                        model_bytes=(out / "model.rknn").stat().st_size)
            if calib_list is not None:
                calib_list.unlink()
            info["accuracy_analysis"] = _analyse(rknn, analysis_inputs, out, ctx)
            metrics.update(build_s=info["build_s"], rss_peak_mb=info["rss_peak_mb"])
            if "data" in inputs:
                info["simulator"] = _simulate(rknn, inputs["data"], spec, p, out, ctx)
                info["simulator_val"] = _run_split(rknn, inputs["data"], spec, None, out / "val_logits.npy", out, ctx,
                                                   "simulator", split="val")
                metrics["sim_top1"] = info["simulator"]["top1"]
            if p.board_eval.device_id is not None:
                info["board"] = _on_board(rknn, inputs["data"], spec, p, out, ctx)
                metrics["board_top1"] = info["board"]["top1"]
        except ToolkitFailure as e:
            raise StageError(_failure_message(e, log_path, p)) from None
        finally:
            _release(rknn, log_path)
            if calib_list is not None and calib_list.exists():
                calib_list.unlink()

        copy_forward(onnx_dir, out, io=True)
        (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        return metrics


# -- the search: the chosen candidate's files are the output ------------------------------------------
def _search(p, spec, io: dict, shape: list[int], inputs, out: Path, ctx) -> dict[str, Any]:
    """quant_search.search with RknnQuantizer; search.json; the chosen build's files copied into ``out``.
    Nothing holds: StageError with the one line (every candidate stays cached under ctx.scratch)."""
    from stages.common.quant_search import HybridSettings, search

    for name, what in (("data", "the dataset stage: its val split is the selection split"),
                       ("calib", "the calibration stage")):
        if name not in inputs:
            raise StageError(f"quantize.search.enabled needs the rknn_quantize stage's `{name}` input ({what}): "
                             f"add `{name}: <stage>` to its `needs:`")
    labels, float_logits, digest = _selection(inputs["onnx"], io, inputs["data"], spec)
    if ctx.scratch is not None:
        cache = Path(ctx.scratch) / "candidates"
    else:  # engine.run.testing without scratch: candidates live as long as this build
        cache = Path(tempfile.mkdtemp(prefix=".candidates-", dir=out))
    quantizer = RknnQuantizer(p, spec, io, shape, inputs, cache / "step1", ctx)
    h = p.search.hybrid
    result = search(quantizer, labels, float_logits, digest, p.max_drop, p.search.budget_s, cache,
                    hybrid=HybridSettings(enabled=h.enabled, max_float_layers=h.max_float_layers, step=h.step),
                    progress=ctx.note)
    record = result.as_dict()
    record.update(target_points=p.max_drop, toolkit=f"rknn-toolkit2 {toolkit_version()}", target=p.target,
                  float_layer_dtype=quantizer.float_dtype,
                  selection={"split": "val", "images": int(len(labels)),
                             "float_top1": round(float((float_logits.argmax(1) == labels).mean()), 6)})
    (out / "search.json").write_text(json.dumps(record, indent=2) + "\n")
    chosen = result.chosen
    if chosen is not None:
        for name in SHIPPED:
            if (chosen.folder / name).is_file():
                shutil.copyfile(chosen.folder / name, out / name)
    if cache.is_relative_to(out):  # after the chosen build's files are copied out of it
        shutil.rmtree(cache, ignore_errors=True)
    if chosen is None:
        raise StageError(result.line())
    build = json.loads((out / "build.json").read_text())
    board_top1 = None
    if p.board_eval.device_id is not None:  # the board runs a loaded .rknn (only the simulator refuses one)
        build["board"] = _board_of_loaded(out, inputs["data"], spec, p, ctx)
        board_top1 = build["board"]["top1"]
        (out / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    ctx.note(f"int8 search: {chosen.candidate.label} ships ({len(result.tried)} candidate(s) tried)")
    # run.json, and so `edgepipe show`: which candidates were tried and why this one ships
    metrics = {"sim_top1": build["simulator"]["top1"], "build_s": build.get("build_s"),
               "search_s": round(result.seconds, 3), "search": result.summary()}
    if board_top1 is not None:
        metrics["board_top1"] = board_top1
    return metrics


def _board_of_loaded(out: Path, data_dir: Path, spec, p, ctx) -> dict[str, Any]:
    """The shipped model.rknn, loaded in a new session, on the connected board (board_test_logits.npy)."""
    log = out / LOG_NAME
    rknn = None
    try:
        with toolkit(log, "== load_rknn (board_eval)"):
            from rknn.api import RKNN

            rknn = RKNN(verbose=True if p.verbose_log else False)
            ok("load_rknn", rknn.load_rknn(str(out / "model.rknn")))
        return _on_board(rknn, data_dir, spec, p, out, ctx)
    except ToolkitFailure as e:
        raise StageError(_failure_message(e, log, p)) from None
    finally:
        _release(rknn, log)


def _selection(onnx_dir: Path, io: dict, data_dir: Path, spec) -> tuple[Any, Any, str]:
    """(labels, the float ONNX model's logits, a digest of the split) of the val split: what the search
    judges candidates on (never the test split whose figure evaluate reports)."""
    import numpy as np

    from backends.base import load as load_backend
    from stages.common.preprocess import normalize
    from stages.common.splits import load_split, read_rows, split_files

    images, labels = load_split(data_dir, "val", size=(spec.height, spec.width))
    if not len(images):
        raise StageError(f"input data: {data_dir} has an empty val split; quantize.search judges its candidates on "
                         f"the val split: give the dataset one, or set quantize.search.enabled=false")
    backend = load_backend("onnx", onnx_dir, io, batch=None)
    logits = np.concatenate([backend.logits(normalize(read_rows(images, slice(i, i + CHUNK)), spec))
                             for i in range(0, len(images), CHUNK)]).astype(np.float32)
    digest = "".join(sha256_file(f) for f in split_files(data_dir, "val"))
    return labels, logits, digest


class RknnQuantizer:
    """rknn-toolkit2 as a ``stages.common.quant_search.Quantizer``. Each candidate is built in its own
    session, which runs the val split (the selection), then the test split (and multi-crop), and
    ``accuracy_analysis`` on the val images where float and int8 disagree most: the simulator only runs a
    model built in the same session. Hybrid candidates: ``hybrid_quantization_step1`` once per base
    candidate (kept under ``step1/``), its config's ``custom_quantize_layers`` set, ``step2``."""

    name = "rknn-toolkit2"
    FORMAT = 3  # bump when a candidate's folder holds something else, or is judged otherwise
    # (2: data_limit is a stratified sample; 3: the toolkit's benign E lines, rknn_toolkit.BENIGN_ERRORS,
    # no longer fail a candidate)

    def __init__(self, p, spec, io: dict, shape: list[int], inputs, step1_cache: Path, ctx) -> None:
        self.p, self.spec, self.io, self.shape, self.ctx = p, spec, io, shape, ctx
        self.onnx_dir, self.calib_dir, self.data_dir = inputs["onnx"], inputs["calib"], inputs["data"]
        self.step1_cache = step1_cache
        self.entries = _calibration_entries(self.calib_dir, spec)
        self.calib_labels = _calibration_labels(self.calib_dir, len(self.entries))
        self.float_dtype = "float16" if RKNN_CHIPS[p.target].float16 else "int16"

    def identity(self) -> dict[str, Any]:
        from stages.common.splits import split_files

        p = self.p
        mean, std = self.spec.rknn_mean_std()
        calibration = [[sha256_file(Path(f)) for f in e] for e in self.entries]
        return {
            "toolkit": self.name, "version": toolkit_version(), "format": self.FORMAT,
            "onnx": sha256_file(self.onnx_dir / "model.onnx"), "io": self.io, "shape": self.shape,
            "calibration": calibration, "calibration_labels": self.calib_labels, "seed": p.search.seed,
            "target": p.target, "dtype": p.dtype, "optimization_level": p.optimization_level,
            "mean": mean, "std": std, "channel_order": self.spec.channel_order,
            # what a candidate's folder holds beside the model: the test split's logits, the analysis
            "test": [sha256_file(f) for f in split_files(self.data_dir, "test")], "data_limit": p.data_limit,
            "multicrop": p.multicrop.model_dump(mode="json") if p.multicrop.enabled else None,
            "analysis_images": p.accuracy_analysis_samples, "float_layer_dtype": self.float_dtype,
        }

    def candidates(self) -> list[Candidate]:
        s = self.p.search
        sizes = sorted({min(n, len(self.entries)) for n in s.calib_images})
        algorithms = sorted(set(s.algorithms), key=ALGORITHM_ORDER.index)
        methods = list(dict.fromkeys(s.methods))
        return [Candidate(a, m, n) for a in algorithms for n in sizes for m in methods]

    def toolkit_hybrid(self, base: Candidate) -> list[Candidate]:
        """build(auto_hybrid=True) where the chip has float16 (rv1103/rv1106: 'not supported float16')."""
        if not self.p.search.hybrid.auto_hybrid or self.float_dtype != "float16":
            return []
        return [replace(base, float_layers=(), variant="auto_hybrid")]

    def build(self, c: Candidate, folder: Path, selection) -> Built:
        log = folder / LOG_NAME
        calib_list = self._calibration_subset(c, folder)
        info = _build_info(self.p, self.spec, self.io, self.shape, c.calib_images)
        info.update(algorithm=c.algorithm, method=c.granularity, float_layers=list(c.float_layers),
                    float_layer_dtype=self.float_dtype if c.float_layers else None, variant=c.variant or None)
        rknn = None
        try:
            start = log.stat().st_size if log.exists() else 0
            if c.float_layers:
                rknn = self._hybrid_session(c, calib_list, folder, info)
            else:
                rknn = _build(self.p, self.spec, self.io, self.shape, self.onnx_dir, calib_list, folder, info,
                              c.algorithm, c.granularity, auto_hybrid=c.variant == "auto_hybrid")
            logged = logged_exception(log, start)
            if logged:  # some toolkit versions log an exception (in mmse) and still write a worse model
                raise CandidateFailed(f"the toolkit logged an exception while building: {logged}; see its log")
            info["model_bytes"] = (folder / "model.rknn").stat().st_size
            with toolkit(log, "== init_runtime (simulator)"):
                ok("init_runtime", rknn.init_runtime())
            info["selection"] = self._selection_pass(rknn, selection, folder)
            if selection.complete:
                info["simulator_val"] = self._save_selection(selection, folder)
                info["simulator"] = _simulate(rknn, self.data_dir, self.spec, self.p, folder, self.ctx, init=False)
            layers = self._rank(rknn, selection, folder, info)
        except ToolkitFailure as e:
            raise CandidateFailed(f"{e.what}: {reason(e, log)}") from None
        finally:
            _release(rknn, log)
            calib_list.unlink(missing_ok=True)
        (folder / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        return Built(layers=layers, facts={"build_s": info.get("build_s"), "model_bytes": info.get("model_bytes")})

    # -- a candidate's parts ------------------------------------------------------------------------
    def _calibration_subset(self, c: Candidate, folder: Path) -> Path:
        """The class-balanced, seeded subset of the calibration set (absolute paths, rknn's list format)."""
        from stages.common.sampling import select

        picked = select(self.calib_labels, c.calib_images, self.p.search.seed)
        path = folder / ".dataset_abs.txt"
        path.write_text("".join(" ".join(self.entries[i]) + "\n" for i in picked))
        return path

    def _hybrid_session(self, c: Candidate, calib_list: Path, folder: Path, info: dict):
        """hybrid_quantization_step1 of the base candidate (cached), its config with the float layers,
        step2 and export_rknn; returns the session."""
        base = replace(c, float_layers=())
        step1 = self._step1(base, calib_list, folder)
        cfg = folder / "hybrid.quantization.cfg"
        _hybrid_config(step1 / "model.quantization.cfg", c.float_layers, self.float_dtype, cfg)
        t0 = time.perf_counter()
        rknn = None
        try:
            with toolkit(folder / LOG_NAME, "== config, hybrid_quantization_step2, export_rknn"):
                rknn = _session(self.p, self.spec, c.algorithm, c.granularity)
                ok("hybrid_quantization_step2", rknn.hybrid_quantization_step2(
                    model_input=str(step1 / "model.model"), data_input=str(step1 / "model.data"),
                    model_quantization_cfg=str(cfg)))
                ok("export_rknn", rknn.export_rknn(str(folder / "model.rknn")))
        except BaseException:
            _release(rknn, folder / LOG_NAME)
            raise
        info.update(build_s=round(time.perf_counter() - t0, 3), step1_s=self._step1_s)
        return rknn

    def _step1(self, base: Candidate, calib_list: Path, folder: Path) -> Path:
        """hybrid_quantization_step1's files (model.model, model.data, model.quantization.cfg) of ``base``:
        the quantization itself (minutes for mmse), kept for every hybrid step from it."""
        import hashlib

        key = hashlib.sha256(json.dumps([self.identity(), base.key()], sort_keys=True, default=str)
                             .encode()).hexdigest()[:32]
        dest = self.step1_cache / key
        self._step1_s = 0.0
        if (dest / "model.quantization.cfg").is_file():
            return dest
        self.step1_cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.step1_cache))
        rknn = None
        t0 = time.perf_counter()
        try:
            with toolkit(folder / LOG_NAME, f"== config, load_onnx, hybrid_quantization_step1 ({base.label})"):
                import os

                rknn = _session(self.p, self.spec, base.algorithm, base.granularity)
                ok("load_onnx", rknn.load_onnx(model=str(self.onnx_dir / "model.onnx"), inputs=[self.io["input"]],
                                               input_size_list=[self.shape], outputs=[self.io["output"]]))
                ok("hybrid_quantization_step1", rknn.hybrid_quantization_step1(dataset=str(calib_list)))
                for name in ("model.model", "model.data", "model.quantization.cfg"):  # written into the cwd
                    shutil.move(os.path.join(os.getcwd(), name), tmp / name)
            self._step1_s = round(time.perf_counter() - t0, 3)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        finally:
            _release(rknn, folder / LOG_NAME)
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _selection_pass(self, rknn, selection, folder: Path) -> dict[str, Any]:
        """The val split through the simulator, a few images at a time, until the search says stop."""
        from stages.common.preprocess import to_channel_order
        from stages.common.splits import load_split, read_rows

        images, _labels = load_split(self.data_dir, "val", size=(self.spec.height, self.spec.width))
        n = len(images)
        t0 = time.perf_counter()
        for start in range(0, n, SELECTION_CHUNK):
            self.ctx.progress(start, n, "selection split (val)" if start == 0 else None)
            rows = read_rows(images, slice(start, min(n, start + SELECTION_CHUNK)))
            if not selection.feed(_infer(rknn, to_channel_order(rows, self.spec), folder)):
                break
        return {"images": selection.seen, "of": n, "complete": selection.complete,
                "seconds": round(time.perf_counter() - t0, 3)}

    def _save_selection(self, selection, folder: Path) -> dict[str, Any]:
        """val_logits.npy (the whole val split: evaluate's label-free figures read it) and what it was."""
        import numpy as np

        from stages.common.splits import split_files

        logits = selection.logits()
        np.save(folder / "val_logits.npy", logits)
        img_path, lab_path = split_files(self.data_dir, "val")
        return {"samples": int(len(logits)), "of": int(selection.n),
                "top1": round(float((logits.argmax(1) == selection.labels).mean()), 6),
                "images_val_sha256": sha256_file(img_path), "labels_val_sha256": sha256_file(lab_path)}

    def _rank(self, rknn, selection, folder: Path, info: dict) -> list[LayerScore]:
        """accuracy_analysis on the val images where float and int8 disagree most: error_analysis.txt,
        layers.json (network order); the ranking, worst cosine alone first."""
        from PIL import Image

        from stages.common.splits import load_split, read_rows

        picked = selection.disagreeing(self.p.accuracy_analysis_samples)
        images, _labels = load_split(self.data_dir, "val", size=(self.spec.height, self.spec.width))
        tmp = Path(tempfile.mkdtemp(prefix=".analysis-", dir=folder))
        try:
            paths = []
            for i in picked:  # raw RGB like the calibration PNGs: the toolkit applies mean/std (and RGB2BGR)
                path = tmp / f"val_{i:05d}.png"
                Image.fromarray(read_rows(images, [i])[0], "RGB").save(path, format="PNG")
                paths.append(str(path))
            info["accuracy_analysis"] = _analyse(rknn, paths, folder, self.ctx)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        layers = _write_layers(folder)
        return sorted(layers, key=lambda x: (1.0 if x.cosine_alone is None else x.cosine_alone, x.position))


# -- the build --------------------------------------------------------------------------------------------
def _session(p, spec, algorithm: str, method: str):
    """A configured RKNN session (inside ``toolkit``)."""
    from rknn.api import RKNN

    from stages.common.native_output import reroute_logger

    mean, std = spec.rknn_mean_std()
    rknn = RKNN(verbose=True if p.verbose_log else False)
    reroute_logger("rknnLogger")  # its handler may hold an import-time sys.stderr
    try:
        ok("config", rknn.config(
            mean_values=[mean], std_values=[std], target_platform=p.target,
            quantized_dtype=p.dtype, quantized_algorithm=algorithm, quantized_method=method,
            optimization_level=p.optimization_level, quant_img_RGB2BGR=spec.channel_order == "BGR",
        ))
    except BaseException:
        rknn.release()
        raise
    return rknn


def _build(p, spec, io: dict, shape: list[int], onnx_dir: Path, calib_list: Path | None, out: Path, info: dict,
           algorithm: str, method: str, auto_hybrid: bool = False):
    """config, load_onnx, build, export_rknn; returns the RKNN session (the simulator runs in it)."""
    rknn = None
    try:
        with toolkit(out / LOG_NAME, "== config, load_onnx, build, export_rknn"):
            rknn = _session(p, spec, algorithm, method)
            t0 = time.perf_counter()
            ok("load_onnx", rknn.load_onnx(
                model=str(onnx_dir / "model.onnx"), inputs=[io["input"]], input_size_list=[shape],
                outputs=[io["output"]],
            ))
            t1 = time.perf_counter()
            ok("build", rknn.build(do_quantization=p.do_quantization,
                                    dataset=str(calib_list) if calib_list else None, auto_hybrid=auto_hybrid))
            t2 = time.perf_counter()
            ok("export_rknn", rknn.export_rknn(str(out / "model.rknn")))
    except BaseException:
        _release(rknn, out / LOG_NAME)
        raise
    info.update(load_s=round(t1 - t0, 3), build_s=round(t2 - t1, 3))
    return rknn


def _hybrid_config(step1_cfg: Path, float_layers: tuple[str, ...], dtype: str, dest: Path) -> None:
    """step1's quantization config with ``float_layers`` under custom_quantize_layers (float16, or int16
    where the chip has no float16); a name the config does not hold fails the candidate."""
    text = step1_cfg.read_text()
    known = set(re.findall(r"^    (\S.*?):\s*$", text, re.M))
    unknown = [x for x in float_layers if x not in known and json.dumps(x) not in known]
    if unknown:
        raise CandidateFailed(f"layer {unknown[0]!r} is not in the toolkit's quantization config")
    marker = "custom_quantize_layers: {}"
    if marker not in text:
        raise CandidateFailed(f"{step1_cfg.name} has no empty custom_quantize_layers to fill")
    block = "custom_quantize_layers:\n" + "".join(f"    {json.dumps(x)}: {dtype}\n" for x in float_layers)
    dest.write_text(text.replace(marker, block.rstrip("\n"), 1))


# -- accuracy analysis ----------------------------------------------------------------------------------
def _analyse(rknn, images: list[str], out: Path, ctx) -> str:
    """Per-layer cosine/euclidean error (golden fp32 vs simulator) for a few images into error_analysis.txt
    and layers.json; the ~90 MB of per-tensor dumps each call writes are deleted."""
    target = out / "error_analysis.txt"
    if not images:
        target.write_text("# accuracy analysis skipped "
                          "(quantize.accuracy_analysis_samples=0 or no calibration set)\n")
        _write_layers(out)
        return "skipped"
    parts = []
    status = "ok"
    for i, image in enumerate(images):
        ctx.progress(i, len(images), "accuracy analysis" if i == 0 else None)
        snap = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=out))
        try:
            try:
                with toolkit(out / LOG_NAME, f"== accuracy_analysis {image}"):
                    ok("accuracy_analysis", rknn.accuracy_analysis(inputs=[image], output_dir=str(snap)))
            except ToolkitFailure as e:
                why = reason(e, out / LOG_NAME)
                ctx.log.warning("rknn accuracy_analysis failed (%s); the model itself was built", why)
                parts.append(f"# sample {i}: {Path(image).name}: accuracy_analysis failed: {why}\n")
                status = f"failed: {why}"
                break
            report = snap / "error_analysis.txt"
            text = report.read_text(errors="replace") if report.is_file() else "(no error_analysis.txt written)\n"
            parts.append(f"# sample {i}: {Path(image).name}\n{text.rstrip()}\n")
        finally:
            shutil.rmtree(snap, ignore_errors=True)
    target.write_text("\n".join(parts))
    _write_layers(out)
    return status


_ESCAPES = re.compile(r"\x1b?\[[0-9;]*m")
_ANALYSIS_ROW = re.compile(r"^\[(\w+)\]\s+(\S+)\s+([\d.]+)\s*\|\s*([\d.]+)\s+([\d.]+)\s*\|\s*([\d.]+)")
NOT_LAYERS = ("Input", "exDataConvert")  # the input and the dtype conversions around the model


def parse_error_analysis(text: str) -> list[LayerScore]:
    """The layers of error_analysis.txt (one or more samples) in network order, each with its cosine
    alone ("single") and accumulated ("entire") averaged over the samples."""
    rows: dict[str, list] = {}
    for line in _ESCAPES.sub("", text).splitlines():
        m = _ANALYSIS_ROW.match(line.strip())
        if not m or m.group(1) in NOT_LAYERS:
            continue
        op, name, entire, single = m.group(1), m.group(2), float(m.group(3)), float(m.group(5))
        row = rows.setdefault(name, [op, len(rows), 0.0, 0.0, 0])
        row[2] += entire
        row[3] += single
        row[4] += 1
    return [LayerScore(name, op, round(single / k, 6), round(entire / k, 6), pos)
            for name, (op, pos, entire, single, k) in rows.items()]


def _write_layers(out: Path) -> list[LayerScore]:
    """layers.json: error_analysis.txt's layers in network order (the report's table and picture)."""
    from dataclasses import asdict

    path = out / "error_analysis.txt"
    layers = parse_error_analysis(path.read_text(errors="replace")) if path.is_file() else []
    (out / "layers.json").write_text(json.dumps({"layers": [asdict(x) for x in layers]}, indent=1) + "\n")
    return layers


# -- the test split: simulator and board ------------------------------------------------------------
def _simulate(rknn, data_dir: Path, spec, p, out: Path, ctx, init: bool = True) -> dict[str, Any]:
    """The x86 simulator on the test split (test_logits.npy) and, with evaluate.multicrop enabled, on the
    crops of its original files (test_crop_logits.npy): it only runs in this build session."""
    t0 = time.perf_counter()
    if init:
        with toolkit(out / LOG_NAME, "== init_runtime (simulator)"):
            ok("init_runtime", rknn.init_runtime())
    result = _run_split(rknn, data_dir, spec, p.data_limit, out / "test_logits.npy", out, ctx, "simulator")
    if p.multicrop.enabled:
        result["crops"] = _simulate_crops(rknn, data_dir, spec, p, result["samples"], out, ctx)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _on_board(rknn, data_dir: Path, spec, p, out: Path, ctx) -> dict[str, Any]:
    """The same model on the connected board's NPU (adb + rknn_server) on the test split:
    board_test_logits.npy, which evaluate scores as ``<input>_board`` beside the simulator."""
    serial = p.board_eval.device_id
    t0 = time.perf_counter()
    ctx.progress(None, None, f"board {serial}: init_runtime")
    try:
        with toolkit(out / LOG_NAME, f"== init_runtime (target={p.target}, device_id={serial})"):
            ok("init_runtime", rknn.init_runtime(target=p.target, device_id=serial))
        result = _run_split(rknn, data_dir, spec, p.data_limit, out / "board_test_logits.npy", out, ctx,
                            f"board {serial}")
    except ToolkitFailure as e:
        e.board = True
        raise
    result.update(device_id=serial, seconds=round(time.perf_counter() - t0, 3))
    return result


def _run_split(rknn, data_dir: Path, spec, limit: int | None, dest: Path, out: Path, ctx, where: str,
               split: str = "test") -> dict[str, Any]:
    """The initialised runtime on the images of a split that ``limit`` keeps (None: all; else the seeded
    class-stratified sample ``sampling.limited``, the one evaluate.limit takes), a chunk at a time;
    N x C logits saved to ``dest`` in row order; what they were computed on (evaluate checks the digests
    and finds the rows again from N)."""
    import numpy as np

    from stages.common.preprocess import to_channel_order
    from stages.common.sampling import limited
    from stages.common.splits import load_split, read_rows, split_files

    images, labels = load_split(data_dir, split, size=(spec.height, spec.width))
    rows = limited(labels, limit)
    n = len(rows)
    logits = []
    for start in range(0, n, CHUNK):
        ctx.progress(start, n, f"{where} on {n} {split} images" if start == 0 else None)
        logits.append(_infer(rknn, to_channel_order(read_rows(images, rows[start:start + CHUNK]), spec), out))
    ctx.progress(n, n, None)
    arr = np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)
    np.save(dest, arr)
    img_path, lab_path = split_files(data_dir, split)
    return {
        "samples": n, "of": int(len(images)),
        "top1": round(float((arr.argmax(1) == labels[rows]).mean()) if n else float("nan"), 6),
        # evaluate checks these: the logits belong to this exact test split
        f"images_{split}_sha256": sha256_file(img_path), f"labels_{split}_sha256": sha256_file(lab_path),
    }


def _simulate_crops(rknn, data_dir: Path, spec, p, n: int, out: Path, ctx) -> dict[str, Any]:
    """N x K x C simulator logits of evaluate.multicrop's K crops of each original test file."""
    import numpy as np

    from stages.common.multicrop import crop_batches, original_files
    from stages.common.preprocess import to_channel_order
    from stages.common.sampling import limited
    from stages.common.splits import load_split

    k = p.multicrop.crops
    rows = limited(load_split(data_dir, "test")[1], p.data_limit)  # the rows test_logits.npy holds
    listed = original_files(data_dir, "test", int(rows[-1]) + 1 if len(rows) else 0, p.multicrop.root)
    files = [listed[r] for r in rows]
    parts = []
    for start, crops in crop_batches(files, k, spec, (spec.height, spec.width)):
        ctx.progress(start, n, f"simulator on {k} crops of {n} original images" if start == 0 else None)
        flat = to_channel_order(crops.reshape(-1, *crops.shape[2:]), spec)
        parts.append(_infer(rknn, flat, out).reshape(len(crops), k, -1))
    arr = np.concatenate(parts) if parts else np.zeros((0, k, 0), np.float32)
    np.save(out / "test_crop_logits.npy", arr)
    return {"crops": k, "samples": int(len(arr))}


def _infer(rknn, batch, out: Path):
    """N x C float32 outputs of uint8 N x H x W x C images in the model's channel order, one at a time."""
    import numpy as np

    rows = []
    with toolkit(out / LOG_NAME, None):
        for x in batch:
            res = rknn.inference(inputs=[np.ascontiguousarray(x[None])], data_format="nhwc")
            if not res:
                raise ToolkitFailure("inference", None)
            rows.append(np.asarray(res[0], dtype=np.float32).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


# -- helpers ----------------------------------------------------------------------------------------------
def _read_onnx_bundle(onnx_dir: Path) -> tuple[Any, dict, list[int]]:
    """(Preprocess, io.json, batch-1 input shape) of the export_onnx folder, checked."""
    from stages.common.bundle import FORWARD, IO, check_bundle, read_io
    from stages.common.preprocess import Preprocess

    check_bundle(onnx_dir, ("model.onnx", IO, *FORWARD), input="onnx", hint="expected an export_onnx folder")
    spec = Preprocess.load(onnx_dir)
    io = read_io(onnx_dir)
    shape = [int(v) for v in io.get("input_shape", spec.input_shape)]
    if shape[2:] != [spec.height, spec.width]:
        raise StageError(f"input onnx: io.json input_shape {shape} does not match preprocess.json input_size "
                         f"{list(spec.input_size)}")
    shape[0] = 1
    return spec, io, shape


def _calibration_list(p, inputs, out: Path, spec) -> tuple[Path | None, list[str], int]:
    """(the calibration list with absolute paths, the images analysed layer by layer, the image count);
    (None, [], 0) for a float16 build."""
    if not p.do_quantization:
        return None, [], 0
    if "calib" not in inputs:
        raise StageError("rknn_quantize needs a `calib` input (a calibration stage) when do_quantization=true; "
                         "add `calib: <calibration stage>` to its `needs:`")
    entries = _calibration_entries(inputs["calib"], spec)
    calib_list = out / ".dataset_abs.txt"  # rknn reads list paths relative to the CWD: absolute copy
    calib_list.write_text("".join(" ".join(e) + "\n" for e in entries))
    return calib_list, [e[0] for e in entries[: p.accuracy_analysis_samples]], len(entries)


def _build_info(p, spec, io: dict, shape: list[int], n_calib: int) -> dict[str, Any]:
    """build.json's description of the build (timings and memory are added as they are measured)."""
    mean, std = spec.rknn_mean_std()
    return {
        "toolkit": f"rknn-toolkit2 {toolkit_version()}", "target": p.target,
        "do_quantization": p.do_quantization,
        "algorithm": p.algorithm if p.do_quantization else None,
        "method": p.method if p.do_quantization else None,
        "dtype": p.dtype if p.do_quantization else "float16",
        "optimization_level": p.optimization_level, "mean_values": mean, "std_values": std,
        "channel_order": spec.channel_order, "input": io.get("input"), "output": io.get("output"),
        "input_shape": shape, "calibration_images": n_calib,
    }


def _failure_message(e: ToolkitFailure, log_path: Path, p) -> str:
    """One line for a toolkit failure; on the board, what `adb devices` sees."""
    if e.board:
        return (f"rknn on board {p.board_eval.device_id} failed: {e.what}: {reason(e, log_path)}; `adb devices` "
                f"lists {adb.seen()}; is rknn_server running on the board, with the toolkit's librknnrt version? "
                f"see {log_path}")
    what = "rknn simulator failed" if e.what in ("init_runtime", "inference") else "rknn build failed"
    return f"{what}: {e.what}: {reason(e, log_path)}; see {log_path}"


def _release(rknn, log_path: Path) -> None:
    if rknn is None:
        return
    with toolkit(log_path, "== release"):
        try:
            rknn.release()
        except Exception:  # noqa: BLE001 - nothing useful to do
            pass


def _calibration_entries(calib: Path, spec) -> list[list[str]]:
    lst = calib / "dataset.txt"
    if not lst.is_file():
        raise StageError(f"input calib: {lst} is missing (expected a calibration folder with dataset.txt)")
    entries = []
    folder = calib.resolve()
    for n, line in enumerate(lst.read_text().splitlines(), 1):
        if not line.strip():
            continue
        paths = []
        for token in line.split():
            path = (calib / token).resolve()
            # the calibration stage lists files of its own folder; a list from cache.remote naming any
            # other file would have the toolkit read it (README "Trust model")
            if not path.is_relative_to(folder):
                raise StageError(f"input calib: {lst} line {n} names {token}, outside the calibration folder; "
                                 f"a calibration list names files of its own folder (make it again: calibration)")
            if not path.is_file():
                raise StageError(f"input calib: {lst} line {n} names {token}, which does not exist")
            paths.append(str(path))
        entries.append(paths)
    if not entries:
        raise StageError(f"input calib: {lst} lists no images")
    first = entries[0][0]
    if not first.endswith(".npy"):
        from PIL import Image

        with Image.open(first) as im:
            w, h = im.size
        if (h, w) != (spec.height, spec.width):
            raise StageError(f"input calib: {first} is {w}x{h}, the model takes {spec.width}x{spec.height}: "
                             f"the calibration set was made with a different preprocess.input_size")
    return entries


def _calibration_labels(calib: Path, n: int) -> list[int]:
    """The class of each dataset.txt entry from calibration.json (what the calibration stage picked), so
    that subsets stay class-balanced; all 0 (a plain seeded draw) when it does not say."""
    try:
        files = json.loads((calib / "calibration.json").read_text())["files"]
        labels = [int(f["label"]) for f in files]
    except (OSError, ValueError, KeyError, TypeError):
        return [0] * n
    return labels if len(labels) == n else [0] * n
