"""`rknn_quantize`: ONNX model bundle -> ``model.rknn`` for a Rockchip NPU, with rknn-toolkit2.

Inputs
- ``onnx`` (required): an ``export_onnx`` folder (model.onnx, io.json, preprocess.json, labels.txt).
- ``calib`` (required when quantizing): a ``calibration`` folder (dataset.txt + images/).
- ``data`` (optional): a ``dataset`` folder. When wired, the quantized model runs in the toolkit's x86
  simulator on the test split and ``test_logits.npy`` is written; ``evaluate`` reads it. This has to
  happen here: the simulator only runs a model built in the same session (``load_rknn`` followed by
  ``init_runtime()`` without a target is refused by rknn-toolkit2 2.5.0).

Config section ``quantize`` (conf/quantize/*.yaml). mean/std are never typed: they come from
``preprocess.json`` (``Preprocess.rknn_mean_std()``: mean*255, std*255 in the model's channel order).

Outputs: model.rknn, build.json, error_analysis.txt, rknn.log, test_logits.npy (with ``data``),
io.json, preprocess.json, labels.txt.

Every toolkit call runs inside ``stages.common.quiet.quiet(out / "rknn.log")``: the toolkit prints
from native code, so only redirecting the process's file descriptors keeps the terminal clean.
"""

from __future__ import annotations

import contextlib
import json
import re
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import Field, model_validator

from engine.hashing import sha256_file
from engine.stage import NOT_IN_KEY, Input, Params, Stage, StageError

TARGETS = ("rv1103", "rv1106", "rv1103b", "rv1106b", "rk3562", "rk3566", "rk3568", "rk3576", "rk3588")
DTYPES = ("w8a8", "w8a16", "w16a16i_dfp", "w4a16")

# Measured with rknn-toolkit2 2.5.0 (RKNN.config raises for every other pair).
DTYPES_BY_TARGET: dict[str, tuple[str, ...]] = {
    **{t: ("w8a8", "w16a16i_dfp") for t in ("rv1103", "rv1106", "rv1103b", "rv1106b", "rk3566", "rk3568", "rk3588")},
    "rk3562": ("w8a8", "w8a16", "w16a16i_dfp"),
    "rk3576": ("w8a8", "w16a16i_dfp", "w4a16"),
}
# build(do_quantization=False) fails on these: their NPU has no float16 path.
INT_ONLY_TARGETS = ("rv1103", "rv1106", "rv1103b", "rv1106b")

LOG_NAME = "rknn.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RknnQuantize(Stage):
    name = "rknn_quantize"
    tools = ("rknn-toolkit2", "onnx")  # their versions are in the cache key
    config_section = "quantize"
    version = 1
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
        target: Literal["rv1103", "rv1106", "rv1103b", "rv1106b", "rk3562", "rk3566", "rk3568", "rk3576", "rk3588"] = "rv1103"
        # quantized_algorithm: normal (seconds), mmse (minutes, usually the most accurate), kl_divergence
        algorithm: Literal["normal", "mmse", "kl_divergence"] = "normal"
        # quantized_method: per-channel or per-layer weight scales
        method: Literal["channel", "layer"] = "channel"
        # quantized_dtype: w8a8 everywhere; w16a16i_dfp everywhere; w8a16 rk3562 only; w4a16 rk3576 only
        dtype: Literal["w8a8", "w8a16", "w16a16i_dfp", "w4a16"] = "w8a8"
        optimization_level: int = Field(3, ge=0, le=3)
        # false: a float16 model (not on rv1103/rv1106/rv1103b/rv1106b, whose NPU is integer-only)
        do_quantization: bool = True
        # calibration images analysed layer by layer (error_analysis.txt); 0 skips the analysis
        accuracy_analysis_samples: int = Field(2, ge=0)
        # simulate at most this many test images (null: the whole test split)
        data_limit: int | None = Field(None, ge=1)
        # the toolkit's debug-level log in rknn.log (~2.5x bigger): it holds the compiler's layer table
        # (which layers run on the CPU) and memory totals that board checks read; never changes the model
        verbose_log: Annotated[bool, NOT_IN_KEY] = True

        @model_validator(mode="after")
        def _check(self) -> "RknnQuantize.Params":
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

    def run(self, p: "RknnQuantize.Params", inputs, out: Path, ctx) -> dict[str, Any]:
        from stages.common.bundle import FORWARD, IO, check_bundle, copy_forward, read_io
        from stages.common.preprocess import Preprocess

        onnx_dir = inputs["onnx"]
        check_bundle(onnx_dir, ("model.onnx", IO, *FORWARD), input="onnx", hint="expected an export_onnx folder")
        spec = Preprocess.load(onnx_dir)
        io = read_io(onnx_dir)
        shape = [int(v) for v in io.get("input_shape", spec.input_shape)]
        if shape[2:] != [spec.height, spec.width]:
            raise StageError(f"input onnx: io.json input_shape {shape} does not match preprocess.json input_size "
                             f"{list(spec.input_size)}")
        shape[0] = 1
        mean, std = spec.rknn_mean_std()
        log_path = out / LOG_NAME

        calib_list = None
        n_calib = 0
        analysis_inputs: list[str] = []
        if p.do_quantization:
            if "calib" not in inputs:
                raise StageError("rknn_quantize needs a `calib` input (a calibration stage) when do_quantization=true; "
                                 "add `calib: <calibration stage>` to its `needs:`")
            entries = _calibration_entries(inputs["calib"], spec)
            n_calib = len(entries)
            calib_list = out / ".dataset_abs.txt"  # rknn reads list paths relative to the CWD: absolute copy
            calib_list.write_text("".join(" ".join(e) + "\n" for e in entries))
            analysis_inputs = [e[0] for e in entries[: p.accuracy_analysis_samples]]

        toolkit = _toolkit_version()
        info: dict[str, Any] = {
            "toolkit": f"rknn-toolkit2 {toolkit}", "target": p.target,
            "do_quantization": p.do_quantization,
            "algorithm": p.algorithm if p.do_quantization else None,
            "method": p.method if p.do_quantization else None,
            "dtype": p.dtype if p.do_quantization else "float16",
            "optimization_level": p.optimization_level, "mean_values": mean, "std_values": std,
            "channel_order": spec.channel_order, "input": io.get("input"), "output": io.get("output"),
            "input_shape": shape, "calibration_images": n_calib,
        }
        rknn = None
        sampler = _PeakRss()
        try:
            if p.do_quantization and p.algorithm == "mmse":
                ctx.note(f"mmse quantization takes minutes ({n_calib} calibration images at {spec.height}x{spec.width}; "
                         f"resnet18 at 224 px took ~6 min here, normal ~6 s)")
            else:
                ctx.progress(None, None, "building" + (f" ({p.algorithm})" if p.do_quantization else " (float16)"))
            with sampler, _toolkit(log_path, "== config, load_onnx, build, export_rknn"):
                from rknn.api import RKNN

                from stages.common.quiet import reroute_logger

                rknn = RKNN(verbose=True if p.verbose_log else False)
                reroute_logger("rknnLogger")  # its handler may hold an import-time sys.stderr
                _ok("config", rknn.config(
                    mean_values=[mean], std_values=[std], target_platform=p.target,
                    quantized_dtype=p.dtype, quantized_algorithm=p.algorithm, quantized_method=p.method,
                    optimization_level=p.optimization_level, quant_img_RGB2BGR=spec.channel_order == "BGR",
                ))
                t0 = time.perf_counter()
                _ok("load_onnx", rknn.load_onnx(
                    model=str(onnx_dir / "model.onnx"), inputs=[io["input"]], input_size_list=[shape],
                    outputs=[io["output"]],
                ))
                t1 = time.perf_counter()
                _ok("build", rknn.build(do_quantization=p.do_quantization,
                                        dataset=str(calib_list) if calib_list else None))
                t2 = time.perf_counter()
                _ok("export_rknn", rknn.export_rknn(str(out / "model.rknn")))
            info.update(load_s=round(t1 - t0, 3), build_s=round(t2 - t1, 3), rss_peak_mb=sampler.peak_mb,
                        process_maxrss_mb=_maxrss_mb(), model_bytes=(out / "model.rknn").stat().st_size)
            if calib_list is not None:
                calib_list.unlink()

            info["accuracy_analysis"] = self._analyse(rknn, analysis_inputs, out, ctx)

            metrics: dict[str, Any] = {"build_s": info["build_s"], "rss_peak_mb": info["rss_peak_mb"]}
            if "data" in inputs:
                sim = self._simulate(rknn, inputs["data"], spec, p, out, ctx)
                info["simulator"] = sim
                metrics["sim_top1"] = sim["top1"]
        except _ToolkitFailure as e:
            what = "rknn simulator failed" if e.what in ("init_runtime", "inference") else "rknn build failed"
            raise StageError(f"{what}: {e.what}: {_reason(e, log_path)}; see {log_path}") from None
        finally:
            if rknn is not None:
                with _toolkit(log_path, "== release"):
                    try:
                        rknn.release()
                    except Exception:  # noqa: BLE001 - nothing useful to do
                        pass
            if calib_list is not None and calib_list.exists():
                calib_list.unlink()

        copy_forward(onnx_dir, out, io=True)
        (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        return metrics

    # -- accuracy analysis ----------------------------------------------------------------------------
    def _analyse(self, rknn, images: list[str], out: Path, ctx) -> str:
        """Per-layer cosine/euclidean error (golden fp32 vs simulator) for a few calibration images into
        error_analysis.txt; the ~90 MB of per-tensor dumps each call writes are deleted."""
        target = out / "error_analysis.txt"
        if not images:
            target.write_text("# accuracy analysis skipped (quantize.accuracy_analysis_samples=0 or no calibration set)\n")
            return "skipped"
        parts = []
        status = "ok"
        for i, image in enumerate(images):
            ctx.progress(i, len(images), "accuracy analysis" if i == 0 else None)
            snap = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=out))
            try:
                try:
                    with _toolkit(out / LOG_NAME, f"== accuracy_analysis {image}"):
                        _ok("accuracy_analysis", rknn.accuracy_analysis(inputs=[image], output_dir=str(snap)))
                except _ToolkitFailure as e:
                    reason = _reason(e, out / LOG_NAME)
                    ctx.log.warning("rknn accuracy_analysis failed (%s); the model itself was built", reason)
                    parts.append(f"# sample {i}: {Path(image).name}: accuracy_analysis failed: {reason}\n")
                    status = f"failed: {reason}"
                    break
                report = snap / "error_analysis.txt"
                text = report.read_text(errors="replace") if report.is_file() else "(no error_analysis.txt written)\n"
                parts.append(f"# sample {i}: {Path(image).name}\n{text.rstrip()}\n")
            finally:
                shutil.rmtree(snap, ignore_errors=True)
        target.write_text("\n".join(parts))
        return status

    # -- simulator on the test split -----------------------------------------------------------------
    def _simulate(self, rknn, data_dir: Path, spec, p, out: Path, ctx) -> dict[str, Any]:
        import numpy as np

        from stages.common.preprocess import to_channel_order

        from stages.common.splits import load_split, split_files

        images, labels = load_split(data_dir, "test", size=(spec.height, spec.width))
        img_path, lab_path = split_files(data_dir, "test")
        n = len(images) if p.data_limit is None else min(len(images), p.data_limit)
        t0 = time.perf_counter()
        with _toolkit(out / LOG_NAME, "== init_runtime (simulator)"):
            _ok("init_runtime", rknn.init_runtime())
        logits = []
        chunk = 64
        for start in range(0, n, chunk):
            ctx.progress(start, n, f"simulator on {n} test images" if start == 0 else None)
            batch = to_channel_order(np.asarray(images[start:min(n, start + chunk)]), spec)
            with _toolkit(out / LOG_NAME, None):
                for x in batch:
                    res = rknn.inference(inputs=[np.ascontiguousarray(x[None])], data_format="nhwc")
                    if not res:
                        raise _ToolkitFailure("inference", None)
                    logits.append(np.asarray(res[0], dtype=np.float32).reshape(-1))
        ctx.progress(n, n, None)
        arr = np.stack(logits) if logits else np.zeros((0, 0), np.float32)
        np.save(out / "test_logits.npy", arr)
        top1 = float((arr.argmax(1) == labels[:n]).mean()) if n else float("nan")
        return {
            "samples": n, "of": int(len(images)), "top1": round(top1, 6), "seconds": round(time.perf_counter() - t0, 3),
            # evaluate checks these: the logits belong to this exact test split
            "images_test_sha256": sha256_file(img_path), "labels_test_sha256": sha256_file(lab_path),
        }


# -- helpers ------------------------------------------------------------------------------------------
class _ToolkitFailure(Exception):
    def __init__(self, what: str, exc: BaseException | None) -> None:
        super().__init__(what)
        self.what = what
        self.exc = exc


def _ok(what: str, ret: Any) -> Any:
    if isinstance(ret, int) and not isinstance(ret, bool) and ret != 0:
        raise _ToolkitFailure(what, None)
    return ret


@contextlib.contextmanager
def _toolkit(log_path: Path, header: str | None) -> Iterator[None]:
    """``quiet`` around toolkit calls; an exception the toolkit raises becomes ``_ToolkitFailure``."""
    from stages.common.quiet import quiet

    # The toolkit writes check*.onnx (and more) into the working folder: give it a scratch one.
    cwd = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="edgepipe-rknn-")
    try:
        with quiet(log_path, header=header), warnings.catch_warnings():
            # the toolkit's Python warnings (pkg_resources deprecation, ...) belong in its log too
            warnings.simplefilter("default")
            warnings.showwarning = _warning_to_stderr
            os.chdir(scratch)
            yield
    except (_ToolkitFailure, StageError):
        raise
    except Exception as e:  # noqa: BLE001 - the toolkit raises ValueError/RuntimeError/... with tracebacks
        what = "rknn-toolkit2"
        for frame in reversed(_frames(e.__traceback__)):
            if frame.f_code.co_name in _CALLS:
                what = frame.f_code.co_name
                break
        raise _ToolkitFailure(what, e) from e
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


_CALLS = ("config", "load_onnx", "build", "export_rknn", "accuracy_analysis", "init_runtime", "inference")


def _frames(tb) -> list:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _reason(failure: _ToolkitFailure, log_path: Path) -> str:
    """One line: the exception's last 'XxxError: message' line, else the log's last error line."""
    if failure.exc is not None:
        text = _ANSI.sub("", str(failure.exc))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        for ln in reversed(lines):
            m = re.match(r"^(?:[\w]+\.)*(\w*(?:Error|Exception)): (.+)$", ln)
            if m:  # "google.protobuf.message.DecodeError: Error parsing message" -> "DecodeError: ..."
                generic = m.group(1) in ("ValueError", "RuntimeError", "Exception", "AssertionError")
                return _short(m.group(2) if generic else f"{m.group(1)}: {m.group(2)}")
        if lines:
            return _short(lines[-1])
        return type(failure.exc).__name__
    try:
        log = _ANSI.sub("", log_path.read_text(errors="replace"))
    except OSError:
        return "the toolkit returned an error"
    for ln in reversed(log.splitlines()):
        m = re.match(r"^E (.+)$", ln.strip())
        if m and not m.group(1).startswith("rknn-toolkit2 version"):
            return _short(m.group(1))
    return "the toolkit returned an error"


def _short(s: str, limit: int = 240) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _calibration_entries(calib: Path, spec) -> list[list[str]]:
    lst = calib / "dataset.txt"
    if not lst.is_file():
        raise StageError(f"input calib: {lst} is missing (expected a calibration folder with dataset.txt)")
    entries = []
    for n, line in enumerate(lst.read_text().splitlines(), 1):
        if not line.strip():
            continue
        paths = []
        for token in line.split():
            path = Path(token) if Path(token).is_absolute() else calib / token
            if not path.is_file():
                raise StageError(f"input calib: {lst} line {n} names {token}, which does not exist")
            paths.append(str(path.resolve()))
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


def _toolkit_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("rknn-toolkit2")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"



def _maxrss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class _PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def _sample(self, proc) -> None:
        while True:
            try:
                self.peak = max(self.peak, proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        import psutil

        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, args=(proc,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False
