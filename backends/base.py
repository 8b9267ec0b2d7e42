"""The backend contract and its registry: one class per kind of model folder owns every fact about it.

A backend class recognises a model folder by its files (``recognises(folder)``), loads it
(``Backend(folder, io, threads=, batch=)``) and gives logits for a batch of normalised float32
N x C x H x W inputs (``logits(x)``). Its class attributes are what the rest of edgepipe asks about a
kind instead of keeping lists of its own: ``evaluate`` (which class recognises an input, the
reference, the quality target), the converting stages' parity checks (``runtime``), ``package`` (a
board's ``model_format`` is a kind: its model file, producing stage, name in the package), the
packages' golden samples (``boards.golden``: tolerance, rule, where the outputs were measured) and
the report (its name, its files on disk, int8).

Classes are registered as entry points, like stages and boards::

    [project.entry-points."edgepipe.backends"]
    onnx = "backends.onnx_models:OnnxBackend"

The built-in kinds (what each folder holds; what runs it):
- ``rknn``: ``model.rknn`` + ``test_logits.npy`` (+ ``test_crop_logits.npy``, ``val_logits.npy``);
  nothing runs: stored logits from rknn_quantize's x86 simulator.
- ``rknn_board``: ``board_test_logits.npy`` beside them; stored logits from the board's NPU
  (``quantize.board_eval``).
- ``torchscript``: ``model.torchscript.pt``; ``torch.jit.load``.
- ``torch``: ``model.pt``; ``stages.common.models.load_model`` (fp32).
- ``onnx``: ``model.onnx``; onnxruntime (CPU).
- ``ncnn``: ``*.ncnn.param`` + ``.bin`` (the ncnn stage's ``model.ncnn.*``); the ncnn Python package.

Order matters: the class with the lowest ``order`` that recognises a folder wins (an rknn_quantize
folder may hold other model files beside ``model.rknn``); a class with ``companion_of`` is never
recognised alone but scored beside that kind when the same folder holds its files (the board's
logits beside the simulator's). Loading the classes imports no runtime and no numpy (the report
reads their facts): torch, onnxruntime, ncnn and numpy are imported inside the methods that use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from engine.contract.plugins import BACKEND_GROUP as BACKEND_GROUP  # re-exported
from engine.contract.plugins import backend_classes as registered  # every backend, in recognition order

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# what the manifest's self-test asks of a float runtime (boards/golden.py)
TENSOR_RULE = "PASS when max |output - expected| <= tolerance on the tensor path and the image path"
UINT8_INPUT = "uint8 N x H x W x 3 in the model's channel order (the model normalises)"


class BackendError(ValueError):
    """A model folder a backend recognised but cannot load; the message names the file."""


class Backend:
    """One kind of model folder. Subclasses set the class attributes and ``_load``/``logits``."""

    kind: ClassVar[str]
    # the model file the producing stage writes (what package looks for)
    model_file: ClassVar[str]
    # every file of the model on disk (the report's size column); () means (model_file,)
    files: ClassVar[tuple[str, ...]] = ()
    # the stage that writes such a folder (None: not produced by a built-in stage)
    producer: ClassVar[str | None] = None
    # the runtime's name in parity.json (reference/candidate)
    runtime: ClassVar[str | None] = None
    # the report's name for the format (its summary and model sizes); None: not a model file format
    report_name: ClassVar[str | None] = None
    # recognition order: lower is asked first (see the module docstring)
    order: ClassVar[int] = 100
    # scored beside the backend of this kind when the same folder holds this one's files
    companion_of: ClassVar[str | None] = None
    # evaluate's row name for a companion: the input's name + this suffix
    suffix: ClassVar[str] = ""

    # -- evaluate --------------------------------------------------------------------------------
    # quality target: "float" reproduces the fp32 logits, "quantized" may lose a little
    target: ClassVar[Literal["float", "quantized"] | None] = None
    # an int8 model (the report marks it and picks the best int8 row)
    int8: ClassVar[bool] = False
    # the reference when evaluate.reference is null: the first backend with the lowest rank (None: never)
    reference_rank: ClassVar[int | None] = None
    # True: logits were computed elsewhere and stored (stored_logits()); logits() cannot run
    precomputed: ClassVar[bool] = False
    # features(x) gives penultimate-layer features (evaluate's features.npz, the report's t-SNE)
    gives_features: ClassVar[bool] = False
    # precomputed backends: whether their stage can store multi-crop logits (stored_crop_logits())
    stores_crops: ClassVar[bool] = False

    # -- board packages (a board's model_format is one of these kinds) -----------------------------
    # the model file's name inside a board package; None: no board takes this kind
    packaged_as: ClassVar[str | None] = None
    # why the package needs io.json beside the model (None: it does not)
    needs_io: ClassVar[str | None] = None
    # the runtime also runs a dynamic batch dimension (preflight warns instead of failing)
    any_batch: ClassVar[bool] = False
    # golden samples (boards/golden.py): (atol, rtol of the expected logits' range); None: no golden samples
    golden_tolerance: ClassVar[tuple[float, float] | None] = None
    # where the expected outputs were measured ({version}: onnxruntime's, {machine}: this machine's)
    golden_measured_with: ClassVar[str] = ""
    golden_input_layout: ClassVar[str] = UINT8_INPUT
    golden_rule: ClassVar[str] = TENSOR_RULE
    # top-1 disagreements the self-test allows (top1_min = samples - this, at least 1)
    golden_top1_slack: ClassVar[int] = 0

    def __init__(self, folder: Path, io: dict | None = None, *, threads: int = 1, batch: int | None = 32) -> None:
        """``batch`` None: one sample at a time (the shape an exported batch-1 model sees)."""
        self.folder, self.io, self.threads, self.batch = Path(folder), dict(io or {}), threads, batch
        self.detail: str | None = None
        self._load()

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (Path(folder) / cls.model_file).is_file()

    @classmethod
    def model_files(cls) -> tuple[str, ...]:
        return cls.files or (cls.model_file,)

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

    def stored_split_logits(self, data: Path, split: str, classes: list[str]) -> np.ndarray | None:
        """Precomputed backends: the N x C logits their stage stored for another split of the dataset
        ``data`` (the first N images of it; evaluate's label-free figures on val), checked to belong to
        that split (BackendError when they do not); None when the stage stored none."""
        return None

    def close(self) -> None:
        """Free native resources now rather than at garbage collection."""


# -- the registry ------------------------------------------------------------------------------------
def by_kind(kind: str) -> type[Backend]:
    for cls in registered():
        if cls.kind == kind:
            return cls
    raise KeyError(f"no backend of kind {kind!r}; known: {kinds()}")


def kinds() -> list[str]:
    return [cls.kind for cls in registered()]


def packaged_kinds() -> list[str]:
    """The kinds a board package can take (a board profile's ``model_format``)."""
    return [cls.kind for cls in registered() if cls.packaged_as]


def load(kind: str, folder: Path, io: dict | None = None, **kw) -> Backend:
    """The backend of ``kind`` loaded from ``folder`` (the converting stages' parity checks)."""
    return by_kind(kind)(folder, io, **kw)


def recognise(folder: Path) -> type[Backend] | None:
    """The first registered backend class that recognises ``folder`` (companions never), or None."""
    return next((cls for cls in registered() if cls.companion_of is None and cls.recognises(folder)), None)


def shipped(folder: Path, kind: str) -> type[Backend]:
    """The backend of the model a board taking ``kind`` ships from ``folder``: the class that recognises
    the folder when it has ``kind``'s model file and packaged name (an int8 ONNX folder for a board that
    takes ONNX: its golden tolerance, not the float one), else ``kind``'s own class."""
    fmt = by_kind(kind)
    found = recognise(folder)
    same = found is not None and (found.model_file, found.packaged_as) == (fmt.model_file, fmt.packaged_as)
    return found if same else fmt


def recognise_all(folder: Path) -> list[type[Backend]]:
    """The backend recognising ``folder`` and those of its companions the folder holds."""
    cls = recognise(folder)
    if cls is None:
        return []
    return [cls, *(c for c in registered() if c.companion_of == cls.kind and c.recognises(folder))]


def model_files() -> str:
    """The model files evaluate recognises, for messages ("model.rknn, model.pt, ...")."""
    return ", ".join(cls.model_file for cls in registered() if cls.companion_of is None)
