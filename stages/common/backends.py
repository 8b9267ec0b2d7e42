"""The model backends as a registry: one small class per kind of model folder.

A backend class recognises a model folder by its files (``recognises(folder)``), loads it
(``Backend(folder, io, threads=, batch=)``) and gives logits for a batch of normalised float32
N x C x H x W inputs (``logits(x)``). ``evaluate`` picks the first registered class that recognises
each backend input; the converting stages' parity checks (``stages.common.parity.check_backends``),
``package`` (a board's model format -> file and producing stage) and the packages' golden samples
(``boards.golden``) use the same classes. Adding a backend is one class plus ``register(cls)``.

| kind          | folder holds                          | runs with                                    |
|---------------|---------------------------------------|----------------------------------------------|
| ``rknn``      | ``model.rknn`` + ``test_logits.npy`` (+ ``test_crop_logits.npy``) | nothing: stored logits from rknn_quantize's x86 simulator |
| ``rknn_board``| ``board_test_logits.npy`` beside them | nothing: stored logits from the board's NPU (``quantize.board_eval``) |
| ``torchscript`` | ``model.torchscript.pt``            | ``torch.jit.load``                           |
| ``torch``     | ``model.pt``                          | ``stages.common.models.load_model`` (fp32)   |
| ``onnx``      | ``model.onnx``                        | onnxruntime (CPU)                            |
| ``ncnn``      | ``*.ncnn.param`` + ``.bin`` (ncnn stage: ``model.ncnn.*``) | the ncnn Python package                      |

Order matters: the first class that recognises a folder wins (an rknn_quantize folder may hold other
model files beside ``model.rknn``); a class's ``companions`` are further backends the same folder
holds (the board's logits beside the simulator's). Heavy libraries are imported when a backend is
loaded, never here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import ClassVar, Literal, Union

import numpy as np

from engine.contract.stage import StageError


class BackendError(ValueError):
    """A model folder a backend recognised but cannot load; the message names the file."""


class Backend:
    """One kind of model folder. Subclasses set the class attributes and ``_load``/``logits``."""

    kind: ClassVar[str]
    # the model file the producing stage writes (what package looks for)
    model_file: ClassVar[str]
    # the stage that writes such a folder (None: not produced by a built-in stage)
    producer: ClassVar[str | None] = None
    # the runtime's name in parity.json (reference/candidate)
    runtime: ClassVar[str | None] = None
    # evaluate's quality target: "float" reproduces the fp32 logits, "quantized" may lose a little
    target: ClassVar[Literal["float", "quantized"] | None] = None
    # True: logits were computed elsewhere and stored (stored_logits()); logits() cannot run
    precomputed: ClassVar[bool] = False
    # precomputed backends: whether their stage can store multi-crop logits (stored_crop_logits())
    stores_crops: ClassVar[bool] = False
    # further backends a folder of this kind may hold (evaluate scores each one it recognises)
    companions: ClassVar[tuple[type["Backend"], ...]] = ()
    # evaluate's row name for a companion: the input's name + this suffix
    suffix: ClassVar[str] = ""

    def __init__(self, folder: Path, io: dict | None = None, *, threads: int = 1, batch: int | None = 32) -> None:
        """``batch`` None: one sample at a time (the shape an exported batch-1 model sees)."""
        self.folder, self.io, self.threads, self.batch = Path(folder), dict(io or {}), threads, batch
        self.detail: str | None = None
        self._load()

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (Path(folder) / cls.model_file).is_file()

    @property
    def name(self) -> str:
        return self.runtime or self.kind

    def _load(self) -> None:
        raise NotImplementedError

    def logits(self, x: np.ndarray) -> np.ndarray:
        """N x K float32 logits for normalised float32 N x C x H x W inputs."""
        raise NotImplementedError

    def check_data(self, data: Path, split: str, classes: list[str]) -> None:
        """Refuse a dataset the backend cannot score (precomputed backends: another split)."""

    def stored_logits(self) -> np.ndarray:
        raise BackendError(f"{self.folder}: a {self.kind} backend computes its logits (logits(x))")

    def stored_crop_logits(self) -> np.ndarray | None:
        """Precomputed backends: N x K x C logits of evaluate.multicrop's K crops, or None."""
        return None

    def close(self) -> None:
        """Free native resources now rather than at garbage collection."""


def load(kind: str, folder: Path, io: dict | None = None, **kw) -> Backend:
    """The backend of ``kind`` loaded from ``folder`` (the converting stages' parity checks)."""
    return by_kind(kind)(folder, io, **kw)


# -- the backends -----------------------------------------------------------------------------------
class TorchBackend(Backend):
    kind, model_file, producer, runtime = "torch", "model.pt", "train", "pytorch"

    def _load(self) -> None:
        from stages.common.models import load_model

        self.module = load_model(self.folder / self.model_file)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return torch_logits(self.module, x, self.batch)

    def features(self, x: np.ndarray) -> np.ndarray:
        """N x D penultimate-layer features: the input of the model's last Linear/Conv2d (the classifier),
        averaged over space when it is a feature map (a conv head)."""
        import torch

        last = [m for m in self.module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
        seen: list[np.ndarray] = []

        def grab(_module, args):
            t = args[0]
            seen.append((t.mean(dim=(2, 3)) if t.ndim == 4 else t.flatten(1)).detach().cpu().numpy())

        handle = last.register_forward_pre_hook(grab)
        try:
            self.logits(x)
        finally:
            handle.remove()
        return np.concatenate(seen).astype(np.float32)


class TorchScriptBackend(TorchBackend):
    kind, model_file, producer, runtime, target = "torchscript", "model.torchscript.pt", "export_torchscript", \
        "torchscript", "float"

    def _load(self) -> None:
        import torch

        with warnings.catch_warnings():  # torch 2.14: "torch.jit.load is deprecated"
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(self.folder / self.model_file), map_location="cpu").eval()


class OnnxBackend(Backend):
    kind, model_file, producer, runtime, target = "onnx", "model.onnx", "export_onnx", "onnxruntime", "float"

    def _load(self) -> None:
        self.session = onnx_session(self.folder / self.model_file, threads=self.threads)
        inp = self.session.get_inputs()[0]
        self.input_name = self.io.get("input") or inp.name
        self.dynamic = not isinstance(inp.shape[0], int)

    def logits(self, x: np.ndarray) -> np.ndarray:
        step = (self.batch or 1) if self.dynamic else 1
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + step])})[0]
                for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32).reshape(len(x), -1)


class NcnnBackend(Backend):
    kind, model_file, producer, runtime, target = "ncnn", "model.ncnn.param", "ncnn", "ncnn", "float"

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

    def logits(self, x: np.ndarray) -> np.ndarray:
        """One sample at a time (ncnn has no batch dimension); N x K."""
        import ncnn

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


class RknnSimulatorBackend(Backend):
    """rknn_quantize's folder: the x86 simulator only runs in the build session, which stores the
    test split's logits (``test_logits.npy``; ``test_crop_logits.npy`` with evaluate.multicrop) and
    what they were computed on (``build.json``)."""

    kind, model_file, producer, target, precomputed = "rknn", "model.rknn", "rknn_quantize", "quantized", True
    stores_crops = True
    logits_file: ClassVar[str] = "test_logits.npy"
    build_section: ClassVar[str] = "simulator"
    missing_hint: ClassVar[str] = ("the rknn simulator only runs in the build session, so wire the dataset into "
                                   "the rknn_quantize stage (needs: {data: ...})")

    def _load(self) -> None:
        path = self.folder / "build.json"
        self.build = json.loads(path.read_text()) if path.is_file() else {}
        self.detail = " ".join(str(self.build[k]) for k in ("target", "algorithm", "dtype") if self.build.get(k))

    def check_data(self, data: Path, split: str, classes: list[str]) -> None:
        from engine.contract.hashing import sha256_file

        if split != "test":
            raise BackendError(f"RKNN results exist for the test split only (evaluate.split={split})")
        path = self.folder / self.logits_file
        if not path.is_file():
            raise BackendError(f"{path} is missing: {self.missing_hint}")
        self._logits = np.load(path).astype(np.float32)
        want = (self.build.get(self.build_section) or {}).get("images_test_sha256")
        if want and want != sha256_file(data / "images_test.npy"):
            raise BackendError(f"its {self.logits_file} were computed on another test split (images_test.npy "
                               f"differs); wire the same dataset stage into rknn_quantize and evaluate")
        if self._logits.ndim != 2 or self._logits.shape[1] != len(classes):
            raise BackendError(f"{self.logits_file} has shape {list(self._logits.shape)}, expected N x {len(classes)}")

    def stored_logits(self) -> np.ndarray:
        return self._logits

    def stored_crop_logits(self) -> np.ndarray | None:
        path = self.folder / "test_crop_logits.npy"
        return np.load(path).astype(np.float32) if path.is_file() else None


class RknnBoardBackend(RknnSimulatorBackend):
    """The same model run on a connected board's NPU by rknn_quantize (``quantize.board_eval``)."""

    kind, model_file, suffix, stores_crops = "rknn_board", "board_test_logits.npy", "_board", False
    logits_file, build_section = "board_test_logits.npy", "board"
    missing_hint = "set quantize.board_eval.device_id to a connected board's adb serial"

    def _load(self) -> None:
        super()._load()
        board = self.build.get("board") or {}
        self.detail = " ".join(str(v) for v in (self.build.get("target"), board.get("device_id")) if v)

    def stored_crop_logits(self) -> np.ndarray | None:
        return None


RknnSimulatorBackend.companions = (RknnBoardBackend,)

# first match wins: see the module docstring (RknnBoardBackend is reached as a companion only)
BACKENDS: list[type[Backend]] = [RknnSimulatorBackend, TorchScriptBackend, TorchBackend, OnnxBackend, NcnnBackend]
_COMPANIONS: list[type[Backend]] = [RknnBoardBackend]


def register(cls: type[Backend], before: type[Backend] | None = None) -> type[Backend]:
    """Add a backend class (before ``before`` when its folders could also match that one's files)."""
    if cls not in BACKENDS:
        BACKENDS.insert(BACKENDS.index(before) if before else len(BACKENDS), cls)
    return cls


def recognise(folder: Path) -> type[Backend] | None:
    """The first registered backend class that recognises ``folder``, or None."""
    return next((cls for cls in BACKENDS if cls.recognises(folder)), None)


def recognise_all(folder: Path) -> list[type[Backend]]:
    """The backend recognising ``folder`` and those of its companions the folder holds."""
    cls = recognise(folder)
    return [] if cls is None else [cls, *(c for c in cls.companions if c.recognises(folder))]


def by_kind(kind: str) -> type[Backend]:
    for cls in [*BACKENDS, *_COMPANIONS]:
        if cls.kind == kind:
            return cls
    raise KeyError(f"no backend of kind {kind!r}; known: {[c.kind for c in BACKENDS]}")


def model_files() -> str:
    """The registered model files, for messages ("model.pt, model.onnx, ...")."""
    return ", ".join(cls.model_file for cls in BACKENDS)


# -- runtimes (loaded once per backend) ----------------------------------------------------------------
def torch_logits(module, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    """Run a torch module (eager or TorchScript) on float32 N x C x H x W; one sample at a time when
    ``batch`` is None (the shape an exported batch-1 model sees)."""
    import torch

    step = batch or 1
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), step):
            outs.append(module(torch.from_numpy(np.ascontiguousarray(x[i:i + step]))).detach().cpu().numpy())
    return np.concatenate(outs).astype(np.float32)


def onnx_session(path: Union[str, Path], threads: int = 1):
    """An onnxruntime CPU session with its native warnings silenced (severity >= error only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ncnn_net(param: Union[str, Path], bin: Union[str, Path], threads: int = 1):
    """Load an ncnn model on the CPU, fp32 arithmetic and storage (so a check measures the converted
    weights and graph, not a runtime's fp16/bf16 choice). Raises StageError if it does not load."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage", "use_int8_inference"):
        if hasattr(net.opt, flag):
            setattr(net.opt, flag, False)
    if net.load_param(str(param)) != 0:
        raise StageError(f"ncnn cannot load {param}")
    if net.load_model(str(bin)) != 0:
        raise StageError(f"ncnn cannot load the weights {bin} (does it match {Path(param).name}?)")
    return net
