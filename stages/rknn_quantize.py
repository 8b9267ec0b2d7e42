"""`rknn_quantize`: ONNX model bundle -> ``model.rknn`` for a Rockchip NPU, with rknn-toolkit2.

Inputs
- ``onnx`` (required): an ``export_onnx`` folder (model.onnx, io.json, preprocess.json, labels.txt).
- ``calib`` (required when quantizing): a ``calibration`` folder (dataset.txt + images/).
- ``data`` (optional): a ``dataset`` folder. When wired, the quantized model runs in the toolkit's x86
  simulator on the test split and ``test_logits.npy`` is written; ``evaluate`` reads it. This has to
  happen here: the simulator only runs a model built in the same session (``load_rknn`` followed by
  ``init_runtime()`` without a target is refused by rknn-toolkit2 2.5.0). For the same reason the
  crops of ``evaluate.multicrop`` (read from that section) run here: ``test_crop_logits.npy``.

Config section ``quantize`` (conf/quantize/*.yaml). mean/std are never typed: they come from
``preprocess.json`` (``Preprocess.rknn_mean_std()``: mean*255, std*255 in the model's channel order).
``quantize.board_eval.device_id=SERIAL`` also runs the test split on that board's NPU
(``init_runtime(target=..., device_id=...)``, adb + rknn_server): ``board_test_logits.npy``; the
connection is checked (``stages.common.adb``) before the build.

Outputs: model.rknn, build.json, error_analysis.txt, rknn.log, test_logits.npy (with ``data``),
test_crop_logits.npy (with multi-crop), board_test_logits.npy (with board_eval), io.json,
preprocess.json, labels.txt.

Every toolkit call runs inside ``stages.common.rknn_toolkit.toolkit(out / "rknn.log")``: the toolkit
prints from native code, so only redirecting the process's file descriptors keeps the terminal clean.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from boards.rockchip import RKNN_CHIPS
from engine.contract.hashing import sha256_file
from engine.contract.stage import NOT_IN_KEY, Input, Params, Stage, StageError
from stages.common import adb
from stages.common.multicrop import MultiCrop
from stages.common.rknn_toolkit import PeakRss, ToolkitFailure, maxrss_mb, ok, reason, toolkit
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


class RknnQuantize(Stage):
    name = "rknn_quantize"
    peak_memory_mb = 1000  # MB, for run --jobs: rknn-toolkit2 with torch and onnxruntime; mmse: see peak_memory
    tools = ("rknn-toolkit2", "onnx")  # their versions are in the cache key
    config_section = "quantize"
    # 2: test_crop_logits.npy (evaluate.multicrop), board_test_logits.npy (quantize.board_eval)
    version = 2
    sections = {"multicrop": "evaluate.multicrop"}
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
        # simulate at most this many test images (null: the whole test split)
        data_limit: int | None = Field(None, ge=1)
        # the toolkit's debug-level log in rknn.log (~2.5x bigger): it holds the compiler's layer table
        # (which layers run on the CPU) and memory totals that board checks read; never changes the model
        verbose_log: Annotated[bool, NOT_IN_KEY] = True
        # evaluate.multicrop (read from that section): with `data` wired and enabled, the simulator also
        # runs the crops of the original test files (test_crop_logits.npy)
        multicrop: CropSource = CropSource()
        # run the test split on a connected board's NPU too (board_test_logits.npy)
        board_eval: BoardEval = BoardEval()

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
            return self

    @classmethod
    def peak_memory(cls, params) -> float:
        """run --jobs: an mmse build holds ~1.7 GB (resnet18 in one process); normal and kl much less."""
        return 1800 if params.do_quantization and params.algorithm == "mmse" else cls.peak_memory_mb

    def run(self, p: RknnQuantize.Params, inputs, out: Path, ctx) -> dict[str, Any]:
        from stages.common.bundle import copy_forward

        onnx_dir = inputs["onnx"]
        spec, io, shape = _read_onnx_bundle(onnx_dir)
        if p.board_eval.device_id is not None:  # before a build of minutes, not after it
            if "data" not in inputs:
                raise StageError("quantize.board_eval.device_id needs the rknn_quantize stage's `data` input (the "
                                 "test split to run on the board): add `data: <dataset stage>` to its `needs:`")
            adb.check_connected(p.board_eval.device_id, "quantize.board_eval.device_id")
        calib_list, analysis_inputs, n_calib = _calibration_list(p, inputs, out, spec)
        info = _build_info(p, spec, io, shape, n_calib)
        metrics: dict[str, Any] = {}
        rknn = None
        sampler = PeakRss()
        log_path = out / LOG_NAME
        try:
            with sampler:
                rknn = self._build(p, spec, io, shape, onnx_dir, calib_list, out, ctx, info)
            info.update(rss_peak_mb=sampler.peak_mb, process_maxrss_mb=maxrss_mb(),
                        model_bytes=(out / "model.rknn").stat().st_size)
            info["accuracy_analysis"] = self._analyse(rknn, analysis_inputs, out, ctx)
            metrics.update(build_s=info["build_s"], rss_peak_mb=info["rss_peak_mb"])
            if "data" in inputs:
                info["simulator"] = _simulate(rknn, inputs["data"], spec, p, out, ctx)
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

    # -- the build ------------------------------------------------------------------------------------
    def _build(self, p, spec, io: dict, shape: list[int], onnx_dir: Path, calib_list: Path | None, out: Path, ctx,
               info: dict):
        """config, load_onnx, build, export_rknn; returns the RKNN session (the simulator runs in it)."""
        mean, std = spec.rknn_mean_std()
        if p.do_quantization and p.algorithm == "mmse":
            ctx.note(f"mmse quantization takes minutes ({info['calibration_images']} calibration images at "
                     f"{spec.height}x{spec.width}; resnet18 at 224 px took ~6 min here, normal ~6 s)")
        else:
            ctx.progress(None, None, "building" + (f" ({p.algorithm})" if p.do_quantization else " (float16)"))
        with toolkit(out / LOG_NAME, "== config, load_onnx, build, export_rknn"):
            from rknn.api import RKNN

            from stages.common.native_output import reroute_logger

            rknn = RKNN(verbose=True if p.verbose_log else False)
            reroute_logger("rknnLogger")  # its handler may hold an import-time sys.stderr
            ok("config", rknn.config(
                mean_values=[mean], std_values=[std], target_platform=p.target,
                quantized_dtype=p.dtype, quantized_algorithm=p.algorithm, quantized_method=p.method,
                optimization_level=p.optimization_level, quant_img_RGB2BGR=spec.channel_order == "BGR",
            ))
            t0 = time.perf_counter()
            ok("load_onnx", rknn.load_onnx(
                model=str(onnx_dir / "model.onnx"), inputs=[io["input"]], input_size_list=[shape],
                outputs=[io["output"]],
            ))
            t1 = time.perf_counter()
            ok("build", rknn.build(do_quantization=p.do_quantization,
                                    dataset=str(calib_list) if calib_list else None))
            t2 = time.perf_counter()
            ok("export_rknn", rknn.export_rknn(str(out / "model.rknn")))
        info.update(load_s=round(t1 - t0, 3), build_s=round(t2 - t1, 3))
        if calib_list is not None:
            calib_list.unlink()
        return rknn

    # -- accuracy analysis ----------------------------------------------------------------------------
    def _analyse(self, rknn, images: list[str], out: Path, ctx) -> str:
        """Per-layer cosine/euclidean error (golden fp32 vs simulator) for a few calibration images into
        error_analysis.txt; the ~90 MB of per-tensor dumps each call writes are deleted."""
        target = out / "error_analysis.txt"
        if not images:
            target.write_text("# accuracy analysis skipped "
                              "(quantize.accuracy_analysis_samples=0 or no calibration set)\n")
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
        return status


# -- the test split: simulator and board ------------------------------------------------------------
def _simulate(rknn, data_dir: Path, spec, p, out: Path, ctx) -> dict[str, Any]:
    """The x86 simulator on the test split (test_logits.npy) and, with evaluate.multicrop enabled, on the
    crops of its original files (test_crop_logits.npy): it only runs in this build session."""
    t0 = time.perf_counter()
    with toolkit(out / LOG_NAME, "== init_runtime (simulator)"):
        ok("init_runtime", rknn.init_runtime())
    result = _run_split(rknn, data_dir, spec, p, out / "test_logits.npy", out, ctx, "simulator")
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
        result = _run_split(rknn, data_dir, spec, p, out / "board_test_logits.npy", out, ctx, f"board {serial}")
    except ToolkitFailure as e:
        e.board = True
        raise
    result.update(device_id=serial, seconds=round(time.perf_counter() - t0, 3))
    return result


def _run_split(rknn, data_dir: Path, spec, p, dest: Path, out: Path, ctx, where: str) -> dict[str, Any]:
    """The initialised runtime on the first data_limit test images, a chunk at a time; N x C logits saved
    to ``dest``; what they were computed on (evaluate checks the digests)."""
    import numpy as np

    from stages.common.preprocess import to_channel_order
    from stages.common.splits import load_split, read_rows, split_files

    images, labels = load_split(data_dir, "test", size=(spec.height, spec.width))
    n = len(images) if p.data_limit is None else min(len(images), p.data_limit)
    logits = []
    for start in range(0, n, CHUNK):
        ctx.progress(start, n, f"{where} on {n} test images" if start == 0 else None)
        logits.append(_infer(rknn, to_channel_order(read_rows(images, slice(start, min(n, start + CHUNK))), spec), out))
    ctx.progress(n, n, None)
    arr = np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)
    np.save(dest, arr)
    img_path, lab_path = split_files(data_dir, "test")
    return {
        "samples": n, "of": int(len(images)),
        "top1": round(float((arr.argmax(1) == labels[:n]).mean()) if n else float("nan"), 6),
        # evaluate checks these: the logits belong to this exact test split
        "images_test_sha256": sha256_file(img_path), "labels_test_sha256": sha256_file(lab_path),
    }


def _simulate_crops(rknn, data_dir: Path, spec, p, n: int, out: Path, ctx) -> dict[str, Any]:
    """N x K x C simulator logits of evaluate.multicrop's K crops of each original test file."""
    import numpy as np

    from stages.common.multicrop import crop_batches, original_files
    from stages.common.preprocess import to_channel_order

    k = p.multicrop.crops
    files = original_files(data_dir, "test", n, p.multicrop.root)
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
