"""ONNX models (``model.onnx``) run by ONNX Runtime on the CPU: export_onnx's output and the
onnxruntime board's package."""

from __future__ import annotations

from pathlib import Path

from .base import Backend


class OnnxBackend(Backend):
    kind, model_file, producer, runtime, target = "onnx", "model.onnx", "export_onnx", "onnxruntime", "float"
    report_name, order, reference_rank = "ONNX", 40, 2
    packaged_as, any_batch = "model.onnx", True
    # float32 runtimes differ by ~1e-5 between CPUs
    golden_tolerance = (1e-3, 1e-3)
    golden_measured_with = "onnxruntime {version} (CPUExecutionProvider) on {machine}"
    golden_input_layout = "float32 N x 3 x H x W, normalised"

    def _load(self) -> None:
        self.session = onnx_session(self.folder / self.model_file, threads=self.threads)
        inp = self.session.get_inputs()[0]
        self.input_name = self.io.get("input") or inp.name
        self.dynamic = not isinstance(inp.shape[0], int)

    def logits(self, x):
        import numpy as np

        step = (self.batch or 1) if self.dynamic else 1
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + step])})[0]
                for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32).reshape(len(x), -1)


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session with its native warnings silenced (severity >= error only), for a
    file that reads no other file outside its folder and needs no custom-op library (check_onnx)."""
    import onnxruntime as ort

    from stages.common.onnx_files import check_onnx

    check_onnx(Path(path))

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
