"""RKNN int8 models: nothing runs here, rknn_quantize stores the logits. The x86 simulator only runs
in the build session, which stores the test split's logits (``test_logits.npy``;
``test_crop_logits.npy`` with evaluate.multicrop; ``val_logits.npy``, the val split's, for evaluate's
label-free figures) and what they were computed on (``build.json``: ``simulator.images_test_sha256``,
``simulator_val.images_val_sha256``);
with ``quantize.board_eval`` it also stores a connected board NPU's (``board_test_logits.npy``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from .base import Backend, BackendError


class RknnSimulatorBackend(Backend):
    kind, model_file, producer, target, precomputed = "rknn", "model.rknn", "rknn_quantize", "quantized", True
    # first: an rknn_quantize folder may hold other model files beside model.rknn
    report_name, order, int8, stores_crops = "RKNN", 10, True, True
    packaged_as = "model.rknn"
    # an int8 NPU may differ from the simulator by a few output quantization steps
    golden_tolerance = (0.0, 0.05)
    golden_measured_with = ("rknn-toolkit2 simulator on x86_64 (int8 outputs, dequantized; "
                            "rknn_quantize's test_logits.npy)")
    logits_file: ClassVar[str] = "test_logits.npy"
    build_section: ClassVar[str] = "simulator"
    missing_hint: ClassVar[str] = ("the rknn simulator only runs in the build session, so wire the dataset into "
                                   "the rknn_quantize stage (needs: {data: ...})")

    def _load(self) -> None:
        path = self.folder / "build.json"
        self.build = json.loads(path.read_text()) if path.is_file() else {}
        self.detail = " ".join(str(self.build[k]) for k in ("target", "algorithm", "dtype") if self.build.get(k))

    def check_data(self, data: Path, split: str, classes: list[str]) -> None:
        import numpy as np

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
        self._check_shape(self._logits, self.logits_file, classes)

    def stored_logits(self):
        return self._logits

    def stored_split_logits(self, data: Path, split: str, classes: list[str]):
        """``val_logits.npy`` (``board_val_logits.npy``): the same session's outputs on the val split,
        used only when build.json records the digest of the images_val.npy they were computed on
        (``simulator_val.images_val_sha256``)."""
        import numpy as np

        from engine.contract.hashing import sha256_file

        name = self.logits_file.replace("test", split)
        path = self.folder / name
        if not path.is_file():
            return None
        # rknn_quantize records the run on val as its own section (simulator_val) beside the test split's
        sections = (self.build.get(f"{self.build_section}_{split}") or {}, self.build.get(self.build_section) or {})
        want = next((s[f"images_{split}_sha256"] for s in sections if s.get(f"images_{split}_sha256")), None)
        if want is None:  # logits nothing ties to a dataset must not pass for this one's
            raise BackendError(f"its {name} has no images_{split}_sha256 in build.json "
                               f"({self.build_section}_{split}): rebuild it with this edgepipe's rknn_quantize")
        if want != sha256_file(data / f"images_{split}.npy"):
            raise BackendError(f"its {name} were computed on another {split} split (images_{split}.npy differs); "
                               f"wire the same dataset stage into rknn_quantize and evaluate")
        logits = np.load(path).astype(np.float32)
        self._check_shape(logits, name, classes)
        return logits

    @staticmethod
    def _check_shape(logits, name: str, classes: list[str]) -> None:
        if logits.ndim != 2 or logits.shape[1] != len(classes):
            raise BackendError(f"{name} has shape {list(logits.shape)}, expected N x {len(classes)}")

    def stored_crop_logits(self):
        import numpy as np

        path = self.folder / "test_crop_logits.npy"
        return np.load(path).astype(np.float32) if path.is_file() else None


class RknnBoardBackend(RknnSimulatorBackend):
    """The same model run on a connected board's NPU by rknn_quantize (``quantize.board_eval``)."""

    kind, model_file, suffix, stores_crops = "rknn_board", "board_test_logits.npy", "_board", False
    # a row beside the simulator's, never a folder of its own; no model file (not a format in the report)
    companion_of, report_name, packaged_as, golden_tolerance = "rknn", None, None, None
    logits_file, build_section = "board_test_logits.npy", "board"
    missing_hint = "set quantize.board_eval.device_id to a connected board's adb serial"

    def _load(self) -> None:
        super()._load()
        board = self.build.get("board") or {}
        self.detail = " ".join(str(v) for v in (self.build.get("target"), board.get("device_id")) if v)

    def stored_crop_logits(self):
        return None
