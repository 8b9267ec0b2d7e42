"""int8 ONNX models in QDQ format (``model.onnx`` + ``int8.json``) run by ONNX Runtime on the CPU: the
``onnx_quantize`` stage's output when a candidate held its target, and what the onnxruntime board's
package then ships.

The folder holds ``model.onnx`` like a float ONNX folder; ``int8.json`` (what the stage quantized and
how) is what tells them apart, so this class is asked before ``OnnxBackend`` (a lower ``order``) and
never takes a folder without it: export_onnx's folders, and onnx_quantize's when the float model
ships because no int8 candidate held, stay ``onnx``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from .base import BackendError
from .onnx_models import OnnxBackend


class OnnxInt8Backend(OnnxBackend):
    kind, producer, target, int8 = "onnx_int8", "onnx_quantize", "quantized", True
    report_name, order, reference_rank = "ONNX int8", 35, None
    # the float ONNX folder's file name: an onnxruntime board runs either (boards/onnxruntime.py)
    packaged_as = "model.onnx"
    # ONNX Runtime fuses each DequantizeLinear -> op -> QuantizeLinear into an integer kernel of the CPU;
    # the products and sums are exact integers everywhere (onnx_quantize keeps weights to 7 bits so x86
    # AVX2 does not saturate: stages/common/ort_quant.py), the requantizing float multiply may round an
    # intermediate value one step differently on another CPU, and a step near the output moves a logit by
    # ~range / 255. 3% of the expected logits' range allows ~8 such steps. Measured here: the fused x86
    # kernels and the same graph run unfused in float give identical logits (0 difference; with 8-bit
    # weights 12% of the range: tests/stage_tests/test_onnx_quantize.py).
    golden_tolerance = (0.0, 0.03)
    golden_measured_with = "onnxruntime {version} (CPUExecutionProvider, int8 QDQ kernels) on {machine}"
    record: ClassVar[str] = "int8.json"

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (Path(folder) / cls.model_file).is_file() and (Path(folder) / cls.record).is_file()

    def _load(self) -> None:
        path = self.folder / self.record
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BackendError(f"{path} is not readable JSON ({e}); rebuild the onnx_quantize stage") from None
        if not isinstance(facts, dict):
            raise BackendError(f"{path} is not an object; rebuild the onnx_quantize stage")
        floats = facts.get("float_nodes") or []
        self.detail = " ".join(str(v) for v in (
            facts.get("calibrator"), "per-channel" if facts.get("per_channel") else "per-tensor",
            f"{len(floats)} float node(s)" if floats else None) if v)
        super()._load()
