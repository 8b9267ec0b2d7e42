"""The model backends as a registry: one small class per kind of model folder.

A backend class recognises a model folder by its files (``recognises(folder)``), loads it
(``Backend(folder, io, threads=, batch=)``) and gives logits for a batch of normalised float32
N x C x H x W inputs (``logits(x)``). ``evaluate`` picks the first registered class that recognises
each backend input; ``package`` maps a board's model format to the file and producing stage named
here. Adding a backend is one class plus ``register(cls)``.

| kind          | folder holds                          | runs with                                    |
|---------------|---------------------------------------|----------------------------------------------|
| ``rknn``      | ``model.rknn`` (+ ``test_logits.npy``) | nothing: stored logits from rknn_quantize's x86 simulator |
| ``torchscript`` | ``model.torchscript.pt``            | ``torch.jit.load``                           |
| ``torch``     | ``model.pt``                          | ``stages.common.models.load_model`` (fp32)   |
| ``onnx``      | ``model.onnx``                        | onnxruntime (CPU)                            |
| ``ncnn``      | ``*.ncnn.param`` + ``.bin`` (ncnn stage: ``model.ncnn.*``) | the ncnn Python package                      |

Order matters: the first class that recognises a folder wins (an rknn_quantize folder may hold other
model files beside ``model.rknn``). Heavy libraries are imported when a backend is loaded, never here.
The runners themselves live in ``stages.common.parity`` (shared with the converting stages' checks).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from stages.common import parity


class BackendError(ValueError):
    """A model folder a backend recognised but cannot load; the message names the file."""


class Backend:
    """One kind of model folder. Subclasses set the class attributes and ``_load``/``logits``."""

    kind: ClassVar[str]
    # the model file the producing stage writes (what package looks for)
    model_file: ClassVar[str]
    # the stage that writes such a folder (None: not produced by a built-in stage)
    producer: ClassVar[str | None] = None
    # evaluate's quality target: "float" reproduces the fp32 logits, "quantized" may lose a little
    target: ClassVar[Literal["float", "quantized"] | None] = None
    # True: logits were computed elsewhere and stored (stored_logits()); logits() cannot run
    precomputed: ClassVar[bool] = False

    def __init__(self, folder: Path, io: dict, *, threads: int = 1, batch: int = 32) -> None:
        self.folder, self.io, self.threads, self.batch = Path(folder), io, threads, batch
        self.detail: str | None = None
        self._load()

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (Path(folder) / cls.model_file).is_file()

    def _load(self) -> None:
        raise NotImplementedError

    def logits(self, x: np.ndarray) -> np.ndarray:
        """N x K float32 logits for normalised float32 N x C x H x W inputs."""
        raise NotImplementedError

    def check_data(self, data: Path, split: str, classes: list[str]) -> None:
        """Refuse a dataset the backend cannot score (precomputed backends: another split)."""

    def stored_logits(self) -> np.ndarray:
        raise BackendError(f"{self.folder}: a {self.kind} backend computes its logits (logits(x))")


class TorchBackend(Backend):
    kind, model_file, producer = "torch", "model.pt", "train"

    def _load(self) -> None:
        from stages.common.models import load_model

        self.module = load_model(self.folder / self.model_file)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return parity.torch_logits(self.module, x, batch=self.batch)


class TorchScriptBackend(TorchBackend):
    kind, model_file, producer, target = "torchscript", "model.torchscript.pt", "export_torchscript", "float"

    def _load(self) -> None:
        import torch

        with warnings.catch_warnings():  # torch 2.14: "torch.jit.load is deprecated"
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(self.folder / self.model_file), map_location="cpu").eval()


class OnnxBackend(Backend):
    kind, model_file, producer, target = "onnx", "model.onnx", "export_onnx", "float"

    def _load(self) -> None:
        self.session = parity.onnx_session(self.folder / self.model_file, threads=self.threads)
        inp = self.session.get_inputs()[0]
        self.input_name = self.io.get("input") or inp.name
        self.dynamic = not isinstance(inp.shape[0], int)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return parity.onnx_logits(self.session, x, self.input_name, batch=self.batch if self.dynamic else None)


class NcnnBackend(Backend):
    kind, model_file, producer, target = "ncnn", "model.ncnn.param", "ncnn", "float"

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
        self.net = parity.ncnn_net(param, weights, threads=self.threads)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return parity.ncnn_logits(self.net, x, self.io["input"], self.io["output"])


class RknnSimulatorBackend(Backend):
    """rknn_quantize's folder: the x86 simulator only runs in the build session, which stores the
    test split's logits (``test_logits.npy``) and what they were computed on (``build.json``)."""

    kind, model_file, producer, target, precomputed = "rknn", "model.rknn", "rknn_quantize", "quantized", True

    def _load(self) -> None:
        path = self.folder / "build.json"
        self.build = json.loads(path.read_text()) if path.is_file() else {}
        self.detail = " ".join(str(self.build[k]) for k in ("target", "algorithm", "dtype") if self.build.get(k))

    def check_data(self, data: Path, split: str, classes: list[str]) -> None:
        from engine.hashing import sha256_file

        if split != "test":
            raise BackendError(f"RKNN results exist for the test split only (evaluate.split={split})")
        path = self.folder / "test_logits.npy"
        if not path.is_file():
            raise BackendError(f"{path} is missing: the rknn simulator only runs in the build session, so wire the "
                               f"dataset into the rknn_quantize stage (needs: {{data: ...}})")
        self._logits = np.load(path).astype(np.float32)
        want = (self.build.get("simulator") or {}).get("images_test_sha256")
        if want and want != sha256_file(data / "images_test.npy"):
            raise BackendError("its test_logits.npy were computed on another test split (images_test.npy differs); "
                               "wire the same dataset stage into rknn_quantize and evaluate")
        if self._logits.ndim != 2 or self._logits.shape[1] != len(classes):
            raise BackendError(f"test_logits.npy has shape {list(self._logits.shape)}, expected N x {len(classes)}")

    def stored_logits(self) -> np.ndarray:
        return self._logits


# first match wins: see the module docstring
BACKENDS: list[type[Backend]] = [RknnSimulatorBackend, TorchScriptBackend, TorchBackend, OnnxBackend, NcnnBackend]


def register(cls: type[Backend], before: type[Backend] | None = None) -> type[Backend]:
    """Add a backend class (before ``before`` when its folders could also match that one's files)."""
    if cls not in BACKENDS:
        BACKENDS.insert(BACKENDS.index(before) if before else len(BACKENDS), cls)
    return cls


def recognise(folder: Path) -> type[Backend] | None:
    """The first registered backend class that recognises ``folder``, or None."""
    return next((cls for cls in BACKENDS if cls.recognises(folder)), None)


def by_kind(kind: str) -> type[Backend]:
    for cls in BACKENDS:
        if cls.kind == kind:
            return cls
    raise KeyError(f"no backend of kind {kind!r}; known: {[c.kind for c in BACKENDS]}")


def model_files() -> str:
    """The registered model files, for messages ("model.pt, model.onnx, ...")."""
    return ", ".join(cls.model_file for cls in BACKENDS)
