"""Generic Linux boards with Python (Raspberry Pi, UNIHIKER, any SBC): an ONNX model run by ONNX Runtime
on the CPU, preprocessed by the shared ``preprocess.py`` copied verbatim into the package.

The package ships whatever ONNX model the ``model`` input holds: wired to ``onnx_quantize`` (the
built-in onnx_catsdogs pipeline), that is the int8 QDQ model when an int8 candidate held evaluate's
target on the selection split, else the float model the stage passed on (its ``search.json`` says
why); wired to ``export_onnx``, the float model. ``manifest.json`` ``quantization`` and the notes (also in
the package README) record which ships and why; evaluate's row of that very model (same
``model_digest``) is what ``package.enforce_targets`` judges on the test split."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from backends.base import shipped

from . import BoardProfile, ModelFormat, PackageContext
from .emulation import Emulation


class OnnxRuntimeBoard(BoardProfile):
    name: str = "onnxruntime"
    title: str = "ONNX Runtime (generic Linux board)"
    soc: str = "any CPU with a Python 3 + onnxruntime wheel (aarch64, armv7l, x86_64)"
    runtime: str = "onnxruntime (CPUExecutionProvider)"
    model_format: ModelFormat = "onnx"
    input_layout: str = "NCHW float32, normalised by preprocess.py (mean/std from preprocess.json)"
    weight_bytes: float = 4.0  # float32
    activation_bytes: float = 4.0
    quantizer: str | None = None
    package_files: tuple[str, ...] = ("model.onnx", "labels.txt", "preprocess.json", "preprocess.py", "infer.py",
                                      "selftest.py", "README.md", "manifest.json")
    deploy_script: str = "infer.py (numpy + Pillow + onnxruntime): an image or a folder -> label and confidence"
    # a Raspberry Pi's Python stack: Debian 12's Python 3.11 on aarch64 with PyPI's wheels. onnxruntime
    # 1.18.1 because a later release (1.32, measured) crashes at import under qemu-user 7.2 (Debian 12's)
    emulation: ClassVar[Emulation | None] = Emulation(
        "arm64", wheels=("numpy==1.26.4", "pillow==13.0.0", "onnxruntime==1.18.1"),
        command=("python3", "infer.py", "--selftest"),
        checks="the whole self-test, on aarch64 (ONNX Runtime's ARM kernels, numpy, Pillow, preprocess.py)")
    sources: Mapping[str, Any] = Field(default_factory=lambda: {
        "limits": "none by default: set board.ram_mb / board.flash_mb for a small board (e.g. 512 for a Pi Zero 2)",
    })

    def write_package(self, pkg: PackageContext) -> None:
        quantization = shipped_model(pkg.model_dir, self.model_format)
        pkg.extra_manifest["quantization"] = quantization
        pkg.notes.append(quantization["note"])
        pkg.copy(pkg.model_file, "model.onnx")
        pkg.write_labels()
        pkg.copy_preprocess()
        pkg.render("onnxruntime/infer.py.tmpl", "infer.py", top_k=pkg.top_k)
        pkg.copy_template("selftest.py", "selftest.py")
        pkg.render("onnxruntime/README.md.tmpl", "README.md", board_title=self.title, top_k=pkg.top_k,
                   height=pkg.spec.height, width=pkg.spec.width, quantization=quantization["note"],
                   model_what="int8 QDQ: int8 weights, uint8 activations" if quantization["shipped"] == "int8"
                   else "float32",
                   notes="".join(f"- {n}\n" for n in pkg.notes) or "- none\n")


def shipped_model(model_dir: Path, model_format: str) -> dict[str, Any]:
    """Which model ships (int8 or float), its backend kind and why, with a one-line note: from the
    folder's backend (int8.json marks the int8 one) and onnx_quantize's search.json when there is one."""
    kind = shipped(model_dir, model_format)
    search = _read_json(model_dir / "search.json")
    int8 = kind.int8
    if int8:
        # onnx_int8's record of what was quantized and how (another int8 kind may have none)
        facts = _read_json(model_dir / getattr(kind, "record", "int8.json"))
        why = (search.get("chosen") or {}).get("reason") or f"the model input is a {kind.kind} model"
        how = (f" ({facts.get('calibrator')}, {'per-channel' if facts.get('per_channel') else 'per-tensor'} "
               f"weights, {len(facts.get('float_nodes') or [])} node(s) kept in float)" if facts else "")
        note = f"int8 ships{how}: {why}"
    elif search:
        why = search.get("reason") or "no int8 candidate held"
        best = (search.get("best") or {}).get("label")
        note = (f"the float ONNX model ships: no int8 candidate held the target on the selection split "
                f"({why}{'; best ' + best if best else ''}; onnx_quantize's search.json lists them)")
    else:
        why = "the model input is a float ONNX model; no int8 search ran"
        note = f"the float ONNX model ships: {why} (wire package's `model` to an onnx_quantize stage for int8)"
    return {"shipped": "int8" if int8 else "float", "kind": kind.kind, "reason": why, "note": note,
            "search": "search.json of the model input" if search else None}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
