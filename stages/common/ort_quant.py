"""ONNX Runtime static int8: the pieces of ``onnxruntime.quantization`` the ``onnx_quantize`` stage uses.

- ``calibration_inputs``: a class-stratified, seeded subset (``stages.common.sampling.select``) of a
  ``calibration`` folder's images, read as the dataset wrote them and normalised with the shared
  ``stages.common.preprocess.normalize``;
  ``ArrayReader`` hands them to ``quantize_static`` as its ``CalibrationDataReader``.
- ``quantize``: ``quantize_static`` in QDQ format (QuantizeLinear/DequantizeLinear pairs around float
  operators, which ONNX Runtime fuses into integer kernels), uint8 activations, int8 weights (7-bit range:
  see ``quantize``), per-channel
  or per-tensor weight scales, MinMax / Entropy / Percentile calibration, ``nodes_to_exclude`` kept in float.
- No ``quant_pre_process``: measured on the toy MobileNetV3 exported by export_onnx, it left the graph
  as it was (142 nodes before and after: the exporter already folds BatchNorm into Conv) and every
  calibrator's top-1 the same, so it would only cost time.
- ``rank_nodes``: which nodes int8 hurts, on the images where float and int8 disagree most: each node
  with weights reverted to float alone, and (for the report) ``qdq_loss_debug``'s activations of both
  models compared.
- ``float_nodes`` / ``graph_facts``: what a QDQ model's graph holds (the tests and int8.json read them).

Imports onnx, onnxruntime and numpy at the top: import it inside a stage's ``run``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

CALIBRATORS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
# onnxruntime 1.18.1 (the aarch64 boards' runtime, boards/onnxruntime.py) reads IR version 10 and opset 21
# at most; a model saved by a newer onnx is written down to these when it uses nothing newer
MAX_IR_VERSION = 10
MAX_OPSET = 21


class ArrayReader(CalibrationDataReader):
    """``quantize_static``'s data reader over an N x C x H x W float32 array, one image per call."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self.input_name, self.x, self.i = input_name, np.asarray(x, np.float32), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.input_name: self.x[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


def calibration_files(calib: Path) -> tuple[list[Path], list[int]]:
    """The image files of a ``calibration`` folder and their labels (calibration.json; -1 when unknown)."""
    meta = calib / "calibration.json"
    if meta.is_file():
        files = json.loads(meta.read_text(encoding="utf-8")).get("files", [])
        return [calib / f["file"] for f in files], [int(f.get("label", -1)) for f in files]
    listed = calib / "dataset.txt"
    lines = listed.read_text(encoding="utf-8").splitlines() if listed.is_file() else []
    names = [ln.strip() for ln in lines if ln.strip()]
    return [calib / n for n in names], [-1] * len(names)


def calibration_inputs(calib: Path, spec, count: int, seed: int) -> np.ndarray:
    """float32 N x C x H x W: ``count`` images drawn by ``stages.common.sampling.select`` (class-stratified,
    seeded: the same rule as rknn_quantize's calibration subsets), normalised as the model expects. The
    images are the dataset's pixels at the input size (the calibration stage)."""
    from PIL import Image

    from stages.common.preprocess import normalize
    from stages.common.sampling import select

    files, labels = calibration_files(calib)
    picked = [files[i] for i in select(np.asarray(labels), count, seed)]
    pixels = []
    for f in picked:
        with Image.open(f) as im:
            pixels.append(np.asarray(im.convert("RGB")))
    return normalize(np.stack(pixels), spec)


def quantize(src: Path, dest: Path, x: np.ndarray, input_name: str, calibrator: str, per_channel: bool,
             exclude: Sequence[str] = (), log: Path | None = None) -> None:
    """``quantize_static`` of ``src`` into ``dest``: QDQ, uint8 activations, int8 weights on 7 bits
    (``reduce_range``); ``exclude`` names float nodes kept in float.

    ``reduce_range``: ONNX Runtime's own advice for uint8 x int8 on x86 CPUs without VNNI, whose AVX2
    kernels add pairs of products in saturating int16. Measured on this machine (AVX2, no VNNI) on the toy
    MobileNetV3: with 8-bit weights the fused x86 kernels differed from the same QDQ graph run unfused by
    12% of the logits' range and lost 3 of 64 test images the unfused graph kept; with 7-bit weights
    both gave identical logits. So the accuracy measured here is what an ARM board's exact integer
    kernels compute, and the package's golden outputs hold there."""
    with _quiet(log):
        quantize_static(
            str(src), str(dest), ArrayReader(input_name, x), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            reduce_range=True,
            calibrate_method=CALIBRATORS[calibrator], nodes_to_exclude=list(exclude),
            calibration_providers=["CPUExecutionProvider"],
        )
    fit_for_older_runtimes(dest)


def fit_for_older_runtimes(path: Path) -> None:
    """Write the model's IR version down to what onnxruntime 1.18.1 reads when its opsets allow it
    (onnx 1.18 saves IR 11, which that runtime refuses although nothing in the graph needs it)."""
    model = onnx.load(str(path))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if model.ir_version > MAX_IR_VERSION and opsets.get("ai.onnx", 0) <= MAX_OPSET:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))


def session(model: Path | bytes, threads: int = 1):
    """An onnxruntime CPU session of a model file (or its bytes), native warnings silenced."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])


def logits_in_chunks(sess, input_name: str, x: np.ndarray, chunk: int = 16) -> Iterator[np.ndarray]:
    """N x K logits, ``chunk`` images at a time (one at a time for a batch-1 model)."""
    batch = sess.get_inputs()[0].shape[0]
    step = chunk if not isinstance(batch, int) else 1
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        yield np.concatenate([sess.run(None, {input_name: np.ascontiguousarray(part[i:i + step])})[0]
                              for i in range(0, len(part), step)]).reshape(len(part), -1).astype(np.float32)


@dataclass(frozen=True)
class NodeScore:
    """A float node with weights and what int8 does to it on the ranked images."""

    name: str
    op_type: str
    # the int8 model's logits with this node's weights (and bias) back in float, against float's: mean
    # cosine; the ranking (the higher, the more this node's quantization costs)
    cosine_reverted: float
    # its output in the int8 model just before vs after its QuantizeLinear/DequantizeLinear pair
    cosine_alone: float | None
    # its output in the int8 model vs the float model (every node before it int8 too)
    cosine_accumulated: float | None
    # its place in the float graph's node list (0: nearest the input)
    position: int = -1


def rank_nodes(float_model: Path, qdq_model: Path, input_name: str, x: np.ndarray, work: Path) -> list[NodeScore]:
    """Every node with weights (Conv, Gemm, MatMul: what ``quantize(exclude=...)`` keeps in float), worst
    first, on ``x`` (the images where float and int8 disagree most).

    The ranking reverts one node at a time, as NNCF's accuracy control does: the int8 model with that
    node's weight and bias in float again, run on ``x``, its logits' cosine with float's; the node
    whose revert brings the most back is the worst. The activations of both models (``qdq_loss_debug``)
    are compared as well (cosine alone and accumulated, for the report): measured on the toy
    MobileNetV3, ranking by those picked nodes whose exclusion changed nothing, while the revert
    ranking's first two brought top-1 agreement from 95% to 100%."""
    float_proto, qdq_proto = onnx.load(str(float_model)), onnx.load(str(qdq_model))
    weights = {i.name: i for i in float_proto.graph.initializer}
    weighted = {n.name: n for n in float_proto.graph.node if _weighted(n, set(weights))}
    position = {n.name: i for i, n in enumerate(float_proto.graph.node)}
    want = np.concatenate(list(logits_in_chunks(session(float_model), input_name, x)))
    reverted = {}
    for node in qdq_proto.graph.node:
        if node.name not in weighted:
            continue
        trial = onnx.ModelProto()
        trial.CopyFrom(qdq_proto)
        target = next(n for n in trial.graph.node if n.name == node.name)
        for k, name in enumerate(weighted[node.name].input[1:3], start=1):
            if name in weights and k < len(target.input):
                copy = onnx.TensorProto()
                copy.CopyFrom(weights[name])
                copy.name = f"{name}_float_reverted"
                trial.graph.initializer.append(copy)
                target.input[k] = copy.name
        got = np.concatenate(list(logits_in_chunks(session(trial.SerializeToString()), input_name, x)))
        reverted[node.name] = _mean_row_cosine(want, got)
    alone, accumulated = _activation_cosines(float_model, qdq_model, input_name, x, work)
    consumers: dict[str, list] = {}
    for n in float_proto.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    scores = []
    for name, cos in reverted.items():
        out = _quantized_after(weighted[name].output[0], accumulated, consumers)
        scores.append(NodeScore(name, weighted[name].op_type, round(cos, 6),
                                None if out is None else round(alone[out], 6),
                                None if out is None else round(accumulated[out], 6), position[name]))
    return sorted(scores, key=lambda s: (-s.cosine_reverted, s.name))


def _activation_cosines(float_model: Path, qdq_model: Path, input_name: str, x: np.ndarray,
                        work: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per quantized activation: (cosine before vs after its QDQ pair, cosine with the float model's)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    work.mkdir(parents=True, exist_ok=True)
    acts = {}
    with _quiet(work / "rank.log"):
        for name, src in (("float", float_model), ("qdq", qdq_model)):
            augmented = work / f"{name}.augmented.onnx"
            modify_model_output_intermediate_tensors(str(src), str(augmented))
            acts[name] = collect_activations(str(augmented), ArrayReader(input_name, x))
    alone, accumulated = {}, {}
    for tensor, m in create_activation_matching(acts["qdq"], acts["float"]).items():
        post = np.concatenate([a.ravel() for a in m["post_qdq"]])
        alone[tensor] = _cosine(np.concatenate([a.ravel() for a in m["pre_qdq"]]), post)
        if "float" in m:
            accumulated[tensor] = _cosine(np.concatenate([a.ravel() for a in m["float"]]), post)
    return alone, accumulated


def _mean_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([_cosine(x, y) for x, y in zip(a, b)]))


def _quantized_after(tensor: str, quantized: dict, consumers: dict, hops: int = 3) -> str | None:
    """The first quantized tensor at or after ``tensor`` along single consumers (a Conv's output is
    quantized after the Relu that ONNX Runtime fuses into it)."""
    for _ in range(hops):
        if tensor in quantized:
            return tensor
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1 or not nxt[0].output:
            return None
        tensor = nxt[0].output[0]
    return tensor if tensor in quantized else None


def float_nodes(path: Path) -> set[str]:
    """Names of the nodes of a QDQ model that compute on float weights: their weight input is a float
    initializer, not a DequantizeLinear's output (what ``quantize(exclude=...)`` keeps of a Conv or Gemm)."""
    graph = onnx.load(str(path)).graph
    return {n.name for n in graph.node if _weighted(n, {i.name for i in graph.initializer})}


def _weighted(node, initializers: set[str]) -> bool:
    """A Conv / Gemm / MatMul whose weight (second input) is an initializer."""
    return node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers


def graph_facts(path: Path) -> dict:
    """What int8.json records of a QDQ model: its IR version, opsets and operator counts."""
    model = onnx.load(str(path))
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"ir_version": model.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "ops": dict(sorted(ops.items()))}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 1.0


@contextlib.contextmanager
def _quiet(log: Path | None):
    """What onnxruntime.quantization prints (tqdm bars, notices) into ``log`` (or nowhere), not the terminal."""
    stream = io.StringIO()
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        if log is not None:
            with open(log, "a", encoding="utf-8") as f:
                f.write(stream.getvalue())
