"""`onnx_quantize`: a float ONNX model bundle -> the int8 (QDQ) model ONNX Runtime runs, chosen by the
int8 search (``stages.common.quant_search``, the contract rknn_quantize implements too).

Inputs
- ``onnx`` (required): an ``export_onnx`` folder (model.onnx, io.json, preprocess.json, labels.txt).
- ``calib`` (required): a ``calibration`` folder (images/ + calibration.json): ONNX Runtime's
  calibrators see class-balanced, seeded subsets of its images, normalised with the shared
  ``stages.common.preprocess.normalize`` as the model sees them everywhere else.
- ``data`` (required): a ``dataset`` folder; each candidate is judged on its ``selection_split`` (val:
  never the test split evaluate reports) by ``stages.common.quant_gate``'s rule against
  ``evaluate.quant_max_drop`` (read from that section).

Candidates (``onnx_quantize.search``), cheapest first: calibrator (MinMax, Percentile, Entropy) x weight
scales (per channel, per tensor) x calibration images; the first that holds is shipped. When none
does: hybrid, the worst nodes with weights kept in float (``nodes_to_exclude``), ranked on the
selection images where float and int8 disagree most (``stages.common.ort_quant.rank_nodes``), a few at
a time, stepping back when it gets worse. Every candidate is cached on its own in the stage's scratch
folder (``runs/cache/.scratch/onnx_quantize/candidates``): a second run, a sweep or a wider search
reuses what was built.

Outputs: ``model.onnx`` (the chosen int8 QDQ model, with ``int8.json`` beside it: what it is; when no
candidate holds and ``fallback: float``, the float model as it came and no int8.json, so the folder
reads as the float ``onnx`` backend), ``search.json`` (every candidate, the chosen one and why),
``quantize.log``, io.json, preprocess.json, labels.txt. With ``fallback: fail`` a search where nothing
holds fails with one line naming the best candidate, its drop and the next step.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from engine.contract.hashing import sha256_file, sha256_json
from engine.contract.stage import NOT_IN_KEY, Input, Params, Stage, StageError
from stages.common.bundle import FORWARD, check_bundle, copy_forward, read_io

INT8_RECORD = "int8.json"
SEARCH_RECORD = "search.json"
LOG_NAME = "quantize.log"


class HybridParams(Params):
    """``onnx_quantize.search.hybrid``: nodes kept in float when no all-int8 candidate holds."""

    enabled: bool = True
    # at most this many nodes with weights in float
    max_float_layers: int = Field(4, ge=0)
    # nodes moved to float at a time
    step: int = Field(1, ge=1)
    # selection images the ranking runs on: those where float and int8 disagree most
    rank_images: int = Field(16, ge=1)


class SearchParams(Params):
    """``onnx_quantize.search``: the candidates, in the order they are tried (cheapest first)."""

    calibrators: list[Literal["minmax", "percentile", "entropy"]] = Field(
        default_factory=lambda: ["minmax", "percentile", "entropy"], min_length=1)
    # channel: one weight scale per output channel (per_channel=True); layer: one per tensor
    methods: list[Literal["channel", "layer"]] = Field(default_factory=lambda: ["channel", "layer"], min_length=1)
    # calibration subsets (class-balanced, seeded); capped at what the calibration folder holds
    calib_images: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64, 200], min_length=1)
    seed: int = 0
    # no new candidate is built once this many seconds are spent (cached ones still count); null: no limit
    budget_s: Annotated[float | None, NOT_IN_KEY] = Field(600.0, gt=0)
    hybrid: HybridParams = HybridParams()


class OnnxQuantize(Stage):
    name = "onnx_quantize"
    config_section = "onnx_quantize"
    tools = ("onnxruntime", "onnx")  # their versions are in the cache key
    version = 2  # 2: calibration subsets drawn by stages.common.sampling.select (rknn_quantize's rule)
    peak_memory_mb = 1000
    sections = {"max_drop": "evaluate.quant_max_drop"}
    # seconds and whether each candidate came from the scratch cache
    volatile_outputs = (SEARCH_RECORD, LOG_NAME)
    inputs = {
        "onnx": Input(required=True, doc="export_onnx folder: model.onnx, io.json, preprocess.json, labels.txt"),
        "calib": Input(required=True, doc="calibration folder: images/ + calibration.json"),
        "data": Input(required=True, doc="dataset folder: the selection split judges each candidate"),
    }

    class Params(Params):
        """The ``onnx_quantize`` section."""

        search: SearchParams = SearchParams()
        # the split candidates are judged on; never the test split evaluate reports
        selection_split: Literal["train", "val"] = "val"
        # evaluate.quant_max_drop (read from that section): top-1 points an int8 build may lose
        max_drop: float = Field(1.0, ge=0)
        # when no candidate holds: ship the float model (the folder then reads as plain ONNX), or fail
        fallback: Literal["float", "fail"] = "float"

        @field_validator("search")
        @classmethod
        def _distinct(cls, s: SearchParams) -> SearchParams:
            for key in ("calibrators", "methods", "calib_images"):
                values = getattr(s, key)
                if len(set(values)) != len(values):
                    raise ValueError(f"search.{key} lists a value twice: {values}")
            return s

    def run(self, p: OnnxQuantize.Params, inputs, out: Path, ctx) -> dict[str, Any]:
        import numpy as np

        from stages.common import ort_quant
        from stages.common.preprocess import Preprocess, normalize
        from stages.common.quant_search import HybridSettings, search
        from stages.common.splits import load_split, split_files

        src = inputs["onnx"]
        check_bundle(src, (*FORWARD, "model.onnx"), input="onnx", hint="wire it to an export_onnx stage")
        spec = Preprocess.load(src)
        float_model = src / "model.onnx"
        input_name = read_io(src).get("input") or ort_quant.session(float_model).get_inputs()[0].name

        images, labels = load_split(inputs["data"], p.selection_split, size=(spec.height, spec.width),
                                    split_key="onnx_quantize.selection_split")
        if len(images) == 0:
            raise StageError(f"onnx_quantize.selection_split={p.selection_split!r}: that split of "
                             f"{inputs['data']} is empty; int8 candidates need labelled images to be judged on")
        x = normalize(np.asarray(images), spec)
        float_logits = np.concatenate(list(ort_quant.logits_in_chunks(ort_quant.session(float_model), input_name, x)))
        selection_digest = sha256_json([sha256_file(f) for f in split_files(inputs["data"], p.selection_split)])

        quantizer = OrtQuantizer(float_model, inputs["calib"], spec, input_name, x, p.search, p.max_drop)
        h = p.search.hybrid
        with _candidate_cache(ctx.scratch) as cache_dir:
            result = search(quantizer, labels, float_logits, selection_digest, p.max_drop, p.search.budget_s,
                            cache_dir, hybrid=HybridSettings(h.enabled, h.max_float_layers, h.step),
                            progress=ctx.note)
            chosen = result.chosen
            if chosen is not None:
                shutil.copyfile(chosen.folder / "model.onnx", out / "model.onnx")
                shutil.copyfile(chosen.folder / LOG_NAME, out / LOG_NAME)
                record = _int8_record(chosen, quantizer, p)
                (out / INT8_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if chosen is None and p.fallback == "fail":
            raise StageError(f"{result.line()} (onnx_quantize.fallback=fail; fallback=float ships the float model)")
        if chosen is None:
            shutil.copyfile(float_model, out / "model.onnx")
            (out / LOG_NAME).write_text(f"{result.line()}\nthe float model ships (onnx_quantize.fallback=float)\n",
                                        encoding="utf-8")
            ctx.note(f"no int8 candidate holds the target on {p.selection_split}: the float ONNX model ships")
        copy_forward(src, out, io=True)
        shipped = "int8" if chosen is not None else "float"
        float_top1 = float(np.mean(float_logits.argmax(1) == labels))
        # the fields rknn_quantize's search.json has too: the report shows both with one helper
        summary = {"toolkit": quantizer.identity()["toolkit"], "target_points": p.max_drop,
                   "float_layer_dtype": "float32", "selection": {
                       "split": p.selection_split, "images": int(len(labels)), "max_drop_points": p.max_drop,
                       "float_top1": round(float_top1, 6)},
                   "shipped": shipped, **result.as_dict()}
        (out / SEARCH_RECORD).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        # run.json, and so `edgepipe show`: which candidates were tried and why this one ships
        return {"shipped": shipped, "candidates": len(result.tried),
                "chosen": chosen.candidate.label if chosen else None,
                "selection_top1": chosen.top1 if chosen else None,
                "selection_float_top1": float_top1, "search": result.summary()}


class OrtQuantizer:
    """The search contract's ``Quantizer`` for ONNX Runtime's ``quantize_static`` (QDQ)."""

    name = "onnxruntime"

    def __init__(self, float_model: Path, calib: Path, spec, input_name: str, selection_x, s: SearchParams,
                 max_drop: float) -> None:
        from stages.common.ort_quant import calibration_files

        self.float_model, self.calib, self.spec, self.input_name = float_model, calib, spec, input_name
        self.x, self.s, self.max_drop = selection_x, s, max_drop
        self.available = len(calibration_files(calib)[0])
        if self.available == 0:
            raise StageError(f"input calib: {calib} lists no images (wire it to a calibration stage)")
        self._calibration: dict[int, Any] = {}

    def identity(self) -> dict[str, Any]:
        from importlib.metadata import version

        from stages.common.ort_quant import calibration_files

        return {"toolkit": self.name, "version": version("onnxruntime"), "onnx": version("onnx"),
                "format": "QDQ uint8 activations, int8 weights", "model": sha256_file(self.float_model),
                "calibration": sha256_json([sha256_file(f) for f in calibration_files(self.calib)[0]]),
                "preprocess": self.spec.to_dict(), "input": self.input_name, "seed": self.s.seed,
                "sampling": "stages.common.sampling.select",  # how subsets are drawn (cached candidates)
                "rank_images": self.s.hybrid.rank_images}

    def candidates(self):
        from stages.common.quant_search import Candidate

        sizes = list(dict.fromkeys(min(n, self.available) for n in self.s.calib_images))
        return [Candidate(algorithm, method, n)
                for algorithm in self.s.calibrators for method in self.s.methods for n in sizes]

    def build(self, c, folder: Path, selection):
        from stages.common import ort_quant
        from stages.common.quant_search import Built, CandidateFailed, LayerScore

        model = folder / "model.onnx"
        try:
            ort_quant.quantize(self.float_model, model, self._calibration_inputs(c.calib_images), self.input_name,
                               c.algorithm, c.granularity == "channel", exclude=c.float_layers, log=folder / LOG_NAME)
        except Exception as e:  # any failure of quantize_static fails this candidate only (re-raised as one)
            raise CandidateFailed(f"quantize_static: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        for chunk in ort_quant.logits_in_chunks(ort_quant.session(model), self.input_name, self.x):
            if not selection.feed(chunk):
                break
        facts = {"graph": ort_quant.graph_facts(model), "float_nodes": sorted(ort_quant.float_nodes(model))}
        if not selection.complete or self._holds(selection):
            return Built(facts=facts)  # rejected, or it holds: no ranking needed
        worst = selection.disagreeing(self.s.hybrid.rank_images)
        with tempfile.TemporaryDirectory(prefix="ort-rank-") as work:
            ranked = ort_quant.rank_nodes(self.float_model, model, self.input_name, self.x[worst], Path(work))
        facts["reverted_cosine"] = {r.name: r.cosine_reverted for r in ranked}
        layers = [LayerScore(r.name, r.op_type, r.cosine_alone, r.cosine_accumulated, r.position) for r in ranked]
        return Built(layers=layers, facts=facts)

    def _holds(self, selection) -> bool:
        from stages.common.quant_gate import judge, paired_drop

        drop = paired_drop(selection.labels, selection.float_logits, selection.logits())
        return judge(drop, self.max_drop).holds

    def _calibration_inputs(self, n: int):
        from stages.common.ort_quant import calibration_inputs

        if n not in self._calibration:
            self._calibration[n] = calibration_inputs(self.calib, self.spec, n, self.s.seed)
        return self._calibration[n]


def _int8_record(chosen, quantizer: OrtQuantizer, p: OnnxQuantize.Params) -> dict[str, Any]:
    """int8.json: what the shipped int8 model is (the onnx_int8 backend recognises the folder by it)."""
    c = chosen.candidate
    return {"format": "edgepipe.onnx_int8/1", "toolkit": quantizer.identity()["toolkit"],
            "onnxruntime": quantizer.identity()["version"], "quant_format": "QDQ",
            "activations": "uint8", "weights": "int8", "calibrator": c.algorithm,
            "per_channel": c.granularity == "channel", "calibration_images": c.calib_images,
            "float_nodes": list(c.float_layers), "selection_split": p.selection_split,
            "selection_top1": chosen.top1, "selection_float_top1": chosen.float_top1,
            "graph": chosen.facts.get("graph", {})}


@contextlib.contextmanager
def _candidate_cache(scratch: Path | None) -> Iterator[Path]:
    """Where candidates are cached: the stage's scratch folder; without one (run_stage) a temp folder."""
    if scratch is not None:
        yield Path(scratch) / "candidates"
        return
    tmp = tempfile.mkdtemp(prefix="onnx-quantize-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
