"""The evaluate section's pictures that read arrays (numpy): grids of misclassified test images and
of int8-vs-fp32 disagreements from predictions.npz and the dataset's pixels, and the t-SNE of the
PyTorch model's features. Imported only when report_sections.evaluate_section is not memoised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.contract import figures as figs
from engine.report.run_view import FEATURES, TSNE_SEED, RunView


class ImagePictures:
    """Grids of test images (the dataset's pixels) chosen from predictions.npz."""

    def __init__(self, view: RunView, folder: Path, data_stage: str | None, report: dict, classes: list[str]) -> None:
        self.view, self.classes, self.problem = view, classes, None
        self.labels, self.preds, self.images, self.rows = None, {}, None, None
        try:
            with np.load(folder / "predictions.npz") as z:
                self.labels = z["labels"]
                # the split's row of each scored image (evaluate.limit samples them); older files: in order
                self.rows = z["rows"] if "rows" in z.files else np.arange(len(self.labels))
                self.preds = {k[: -len(".pred")]: z[k] for k in z.files if k.endswith(".pred")}
        except (OSError, KeyError, ValueError) as e:
            self.problem = f"no readable {view.shown(folder / 'predictions.npz')} ({e})"
            return
        data = view.folder(data_stage) if data_stage else None
        path = data / f"images_{report.get('split')}.npy" if data else None
        try:
            self.images = np.load(path, mmap_mode="r") if path else None
        except (OSError, ValueError):
            self.images = None
        if self.images is None or len(self.images) <= (int(self.rows.max()) if len(self.rows) else -1):
            self.problem = (f"the test images are not readable ({view.shown(path) if path else 'no data input'}): "
                            f"no image grids")
            self.images = None

    def _grid(self, idx: np.ndarray, captions: list[str], what: str) -> dict[str, Any]:
        shown = idx[: figs.GRID_MAX]
        title = f"{len(idx)} {what}" + (f" (the first {len(shown)} shown)" if len(idx) > len(shown) else "")
        if not len(shown) or self.images is None:
            return {"title": title, "uri": None}
        pixels = np.asarray(self.images[self.rows[shown]])
        caps = captions[: len(shown)]
        uri = figs.png_uri(figs.memo_png(self.view.scratch, ("grid", figs.GRID_VERSION, pixels, caps),
                                         lambda: figs.grid_png(pixels, caps)))
        return {"title": title, "uri": uri}

    def _name(self, i: int) -> str:
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)

    def misclassified(self, backend: str) -> dict[str, Any] | None:
        pred = self.preds.get(backend)
        if pred is None or self.labels is None:
            return None
        y = self.labels[: len(pred)]
        idx = np.flatnonzero(pred != y)
        caps = [f"true {self._name(int(y[i]))}\npred {self._name(int(pred[i]))}" for i in idx]
        return {"name": backend, **self._grid(idx, caps, f"of {len(pred)} test images misclassified by {backend}")}

    def disagreement(self, int8: str, ref: str) -> dict[str, Any] | None:
        a, b = self.preds.get(ref), self.preds.get(int8)
        if a is None or b is None or self.labels is None:
            return None
        n = min(len(a), len(b))
        idx = np.flatnonzero(a[:n] != b[:n])
        caps = [f"{ref} {self._name(int(a[i]))} / {self._name(int(b[i]))}\ntrue {self._name(int(self.labels[i]))}"
                for i in idx]
        return {"name": int8, "reference": ref,
                **self._grid(idx, caps, f"test images where {int8} and {ref} disagree")}


def tsne(view: RunView, folder: Path, classes: list[str]) -> dict[str, Any]:
    path = folder / FEATURES
    if not path.is_file():
        return {"uri": None, "backend": None,
                "problem": f"no {FEATURES} in the evaluate output: t-SNE needs a PyTorch backend's features"}
    try:
        with np.load(path) as z:
            features, labels = z["features"], z["labels"]
            backend = str(z["backend"]) if "backend" in z.files else None
    except (OSError, KeyError, ValueError) as e:
        return {"uri": None, "backend": None, "problem": f"{view.shown(path)} is not readable ({e})"}
    if len(features) < 5 or len(features) != len(labels):
        return {"uri": None, "backend": None,
                "problem": f"{view.shown(path)}: {len(features)} feature rows, {len(labels)} labels: "
                           f"too few for a t-SNE"}
    data = figs.memo_png(view.scratch, ("tsne", figs.TSNE_VERSION, TSNE_SEED, features, labels, classes),
                         lambda: figs.tsne_png(features, labels, classes, TSNE_SEED))
    return {"uri": figs.png_uri(data), "problem": None, "backend": backend}
