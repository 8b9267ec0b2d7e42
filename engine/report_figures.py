"""The pictures of report.html, drawn from arrays the stages wrote (no torch): training curves, image
grids (misclassified test images, int8-vs-fp32 disagreements), a seeded t-SNE of the features and the
per-layer weight ranges before/after clipping. Matplotlib's Agg canvas only (no display, no fonts
fetched); image grids are plain Pillow. Each PNG is memoised under the cache's scratch folder by a
digest of what it shows, so a cached run's report draws nothing again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # numpy loads where a picture is drawn: a cached run's report may need none
    import numpy as np

# bump when a drawing changes: memoised PNGs are keyed by it
CURVES_VERSION = 1
GRID_VERSION = 1
TSNE_VERSION = 1
RANGES_VERSION = 2

GRID_MAX = 40  # images shown per grid; the caption says how many there are
TSNE_MAX = 2000  # t-SNE points (a seeded subsample above this: the figure stays a few seconds)


def memo_png(scratch: Path | None, shown: Any, render: Callable[[], bytes]) -> bytes:
    """``render()``'s PNG, kept under the cache's scratch folder by a digest of what it shows: a fully
    cached run writes its report without importing matplotlib again (~0.9 s of a 1.3 s run)."""
    return memo_bytes(scratch, shown, ".png", render)


def memo_bytes(scratch: Path | None, shown: Any, suffix: str, render: Callable[[], bytes],
               keep: Callable[[bytes], bool] = lambda data: True) -> bytes:
    """``render()``'s bytes, kept as scratch/<digest of shown><suffix> when ``keep(bytes)``; no
    scratch: rendered each time."""
    if scratch is None:
        return render()
    path = scratch / (digest(shown) + suffix)
    if path.is_file():
        return path.read_bytes()
    data = render()
    if not keep(data):
        return data
    try:  # temp + rename: a reader never sees half a file
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:  # a read-only cache still gets its report
        pass
    return data


def memo_json(scratch: Path | None, shown: Any, compute: Callable[[], Any],
              keep: Callable[[bytes], bool] = lambda data: True) -> Any:
    """``compute()``'s JSON value, kept as memo_bytes keeps bytes; a kept file that is not JSON (a
    damaged one) is removed and computed again."""
    def render() -> bytes:
        return json.dumps(compute()).encode()

    try:
        return json.loads(memo_bytes(scratch, shown, ".json", render, keep))
    except ValueError:
        if scratch is not None:
            (scratch / (digest(shown) + ".json")).unlink(missing_ok=True)
        return json.loads(memo_bytes(scratch, shown, ".json", render, keep))


def digest(shown: Any) -> str:
    """sha256 of JSON-able values and numpy arrays (by dtype, shape and bytes)."""
    h = hashlib.sha256()

    numpy = sys.modules.get("numpy")  # not loaded: nothing shown is an array

    def feed(v: Any) -> None:
        if numpy is not None and isinstance(v, numpy.ndarray):
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(numpy.ascontiguousarray(v).tobytes())
        elif isinstance(v, (list, tuple)):
            for x in v:
                feed(x)
                h.update(b"\x00")
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())

    feed(shown)
    return h.hexdigest()[:32]


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- training -----------------------------------------------------------------------------------------
def curves_png(epochs: list[dict[str, Any]], best: int | None) -> bytes:
    """Loss and accuracy per epoch, train and validation, the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 4)
    for i, metric in enumerate(("loss", "acc")):
        ax = fig.add_subplot(1, 2, i + 1)
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(e["epoch"], e[f"{split}_{metric}"]) for e in epochs if e.get(f"{split}_{metric}") is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{split} {metric}", markersize=4)
        if best is not None:
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch {best}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


# -- image grids --------------------------------------------------------------------------------------
def grid_png(images: np.ndarray, captions: Sequence[str], cell: int = 96, columns: int = 8) -> bytes:
    """uint8 N x H x W x 3 images, each scaled (nearest) to a cell with its caption underneath."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    text_h = 30
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (img, caption) in enumerate(zip(images, captions)):
        x, y = 8 + (i % cols) * (cell + 8), 8 + (i // cols) * (cell + text_h + 8)
        h, w = img.shape[:2]
        scale = cell / max(h, w)
        tile = Image.fromarray(np.ascontiguousarray(img[..., :3])).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for j, line in enumerate(caption.split("\n")[:2]):
            draw.text((x, y + cell + 2 + 13 * j), _fit(line, draw, font, cell), fill=(20, 20, 20), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _fit(text: str, draw, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


# -- t-SNE --------------------------------------------------------------------------------------------
def tsne_png(features: np.ndarray, labels: np.ndarray, classes: Sequence[str], seed: int = 0) -> bytes:
    """A 2-D t-SNE (scikit-learn, PCA start, fixed random_state) coloured by class."""
    from sklearn.manifold import TSNE

    x, y = tsne_points(features, labels, seed)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig = _figure(7, 6)
    ax = fig.add_subplot(1, 1, 1)
    cmap = _colours(len(classes))
    for c, name in enumerate(classes):
        m = y == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=10, color=cmap[c], label=name)
    ax.set_title(f"t-SNE of the penultimate-layer features ({len(x)} test images)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _png(fig)


def tsne_points(features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    x = np.asarray(features, np.float32).reshape(len(features), -1)
    y = np.asarray(labels).astype(np.int64)
    if len(x) > TSNE_MAX:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), TSNE_MAX, replace=False))
        x, y = x[keep], y[keep]
    return x, y


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# -- clipping -----------------------------------------------------------------------------------------
def weight_ranges_png(layers: list[dict[str, Any]]) -> bytes:
    """Per layer, the weight range (min..max) before and after clipping, as bars around zero."""
    import numpy as np

    n = len(layers)
    fig = _figure(max(6.0, min(0.28 * n + 2, 20)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(n)
    for offset, when, colour in ((-0.2, "before", "tab:gray"), (0.2, "after", "tab:blue")):
        lo = np.array([r[f"min_{when}"] for r in layers], float)
        hi = np.array([r[f"max_{when}"] for r in layers], float)
        ax.bar(xs + offset, hi - lo, bottom=lo, width=0.4, color=colour, label=when)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(xs, [r["layer"] for r in layers], rotation=90, fontsize=6)
    ax.set_ylabel("weight value")
    ax.set_title("weight range per layer, before and after clipping")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
