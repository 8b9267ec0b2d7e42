"""ncnn models (``<name>.ncnn.param`` + ``.bin``, as pnnx names them) run by the ncnn Python package:
the ncnn stage's output and the MaixII-Dock package (MaixHub converts it to awnn int8)."""

from __future__ import annotations

from pathlib import Path

from .base import Backend, BackendError


class NcnnBackend(Backend):
    kind, model_file, producer, runtime, target = "ncnn", "model.ncnn.param", "ncnn", "ncnn", "float"
    files = ("model.ncnn.param", "model.ncnn.bin")
    report_name, order = "ncnn", 50
    packaged_as, needs_io = "model.param", "the param's blob names"
    golden_tolerance = (1e-3, 1e-3)
    golden_measured_with = "ncnn (float32, the model uploaded to MaixHub) on {machine}"
    # MaixHub turns the uploaded model into awnn int8, which is not measured here: the board compares top-1
    golden_rule = "MaixPy3 (awnn int8): PASS when at least top1_min of the top-1 agree"
    golden_top1_slack = 1

    @classmethod
    def recognises(cls, folder: Path) -> bool:  # any <name>.ncnn.param, as pnnx names them
        return any(p.is_file() for p in Path(folder).glob("*.ncnn.param"))

    def _load(self) -> None:
        param = sorted(self.folder.glob("*.ncnn.param"))[0]
        weights = param.with_suffix(".bin")
        if not weights.is_file():
            raise BackendError(f"{weights} is missing next to {param.name}")
        if not self.io.get("input") or not self.io.get("output"):
            raise BackendError(f"{self.folder / 'io.json'} must name the ncnn input/output blobs")
        self.net = ncnn_net(param, weights, threads=self.threads)

    def logits(self, x):
        """One sample at a time (ncnn has no batch dimension); N x K."""
        import ncnn
        import numpy as np

        from engine.contract.stage import StageError

        outs = []
        for i in range(len(x)):
            # ncnn.Mat(array) wraps the array's memory without copying: ``arr`` must stay referenced
            # until extract() has returned, or ncnn reads freed memory and the output is garbage.
            arr = np.ascontiguousarray(x[i], dtype=np.float32)
            mat_in = ncnn.Mat(arr)
            with self.net.create_extractor() as ex:
                ex.input(self.io["input"], mat_in)
                rc, mat_out = ex.extract(self.io["output"])
                if rc != 0:
                    raise StageError(f"ncnn failed to compute blob {self.io['output']!r} from {self.io['input']!r} "
                                     f"(code {rc})")
                outs.append(np.array(mat_out, dtype=np.float32).reshape(-1).copy())
            del mat_in, arr
        return np.stack(outs)

    def close(self) -> None:
        self.net.clear()


def ncnn_net(param: str | Path, bin: str | Path, threads: int = 1):
    """Load an ncnn model on the CPU, fp32 arithmetic and storage (so a check measures the converted
    weights and graph, not a runtime's fp16/bf16 choice). Raises StageError if it does not load."""
    import ncnn

    from engine.contract.stage import StageError

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                 "use_int8_inference"):
        if hasattr(net.opt, flag):
            setattr(net.opt, flag, False)
    if net.load_param(str(param)) != 0:
        raise StageError(f"ncnn cannot load {param}")
    if net.load_model(str(bin)) != 0:
        raise StageError(f"ncnn cannot load the weights {bin} (does it match {Path(param).name}?)")
    return net
