"""Generic Linux boards with Python (Raspberry Pi, UNIHIKER, any SBC): the float ONNX model run by
ONNX Runtime on the CPU, preprocessed by the shared ``preprocess.py`` copied verbatim into the package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

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
        pkg.copy(pkg.model_file, "model.onnx")
        pkg.write_labels()
        pkg.copy_preprocess()
        pkg.render("onnxruntime/infer.py.tmpl", "infer.py", top_k=pkg.top_k)
        pkg.copy_template("selftest.py", "selftest.py")
        pkg.render("onnxruntime/README.md.tmpl", "README.md", board_title=self.title, top_k=pkg.top_k,
                   height=pkg.spec.height, width=pkg.spec.width,
                   notes="".join(f"- {n}\n" for n in pkg.notes) or "- none\n")
