"""``export_torchscript``: a ``model.pt`` bundle -> ``model.torchscript.pt`` by tracing, verified
against the eager model.

Input ``model``: a folder with ``model.pt``, ``preprocess.json``, ``labels.txt``.
Output: ``model.torchscript.pt``, ``io.json``, ``parity.json``, ``preprocess.json``, ``labels.txt``.

Config section ``torchscript`` (conf/torchscript/default.yaml). It is its own section, not
``export``: most ``export`` keys (opset, I/O names, dynamic batch, onnxslim) mean nothing for
TorchScript, and stage params reject unknown keys. A traced classifier takes any batch size.

TorchScript has no named blobs (inputs are positional); ``io.json`` records the conventional names
``input0``/``output0`` so every model bundle has the same ``io.json`` shape.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from engine.contract.stage import Context, Input, Params, Stage, StageError


class ExportTorchScript(Stage):
    """Trace a trained model to TorchScript and check the saved file against the eager model."""

    name = "export_torchscript"
    peak_memory_mb = 1000  # MB, for run --jobs: torch, the model traced twice
    tools = ("torch",)  # their versions are in the cache key
    config_section = "torchscript"
    version = 1
    inputs = {"model": Input(required=True, doc="model bundle folder: model.pt, preprocess.json, labels.txt")}
    # torch.jit.load runs a TorchScript file's ops (torch.from_file, torch.save...: files read and
    # written): an entry of this stage from cache.remote is taken only when signed (README "Trust model")
    outputs_execute = True

    class Params(Params):
        # max abs logit difference allowed between the saved TorchScript file and the eager model
        tolerance: float = Field(1e-3, gt=0)
        # sample inputs for the parity check: half random, half synthetic image-like pictures
        parity_samples: int = Field(8, ge=1, le=1024)
        seed: int = 0

    def run(self, params: ExportTorchScript.Params, inputs: Mapping[str, Path], out: Path,
            ctx: Context) -> dict[str, Any]:
        import torch

        from backends.base import load as load_backend
        from stages.common import parity
        from stages.common.bundle import copy_forward
        from stages.common.export import check_channels, load_bundle_folder, write_io

        src = inputs["model"]
        module, spec, info = load_bundle_folder(src)
        shape = spec.input_shape
        check_channels(info, shape, "torchscript")

        ctx.progress(0, 2, "tracing")
        path = out / "model.torchscript.pt"
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("always")
            try:
                # check_trace=False: our own parity check below compares the *saved* file instead
                traced = torch.jit.trace(module, torch.zeros(*shape), check_trace=False)
                torch.jit.save(traced, str(path))
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise StageError(f"torch.jit.trace failed: {first}") from e
        for w in caught:
            ctx.log.debug("torch.jit.trace: %s", w.message)
        trace_s = time.perf_counter() - t0

        ctx.progress(1, 2, "parity check vs PyTorch")
        # the saved file runs the whole batch at once: a traced classifier must take any batch size
        result = parity.check_backends(
            load_backend("torch", src, batch=None), load_backend("torchscript", out, batch=params.parity_samples),
            spec, params, out, what="TorchScript vs PyTorch", extra={"batch": params.parity_samples},
            channels=shape[1], hint="Raise torchscript.tolerance only if you accept that difference")

        write_io(out, "input0", "output0", shape)
        copy_forward(src, out)
        ctx.progress(2, 2, "done")
        return {"trace_seconds": round(trace_s, 3), "torchscript_bytes": path.stat().st_size, **parity.metrics(result)}
