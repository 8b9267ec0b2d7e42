"""The pictures of report.html, drawn from arrays the stages wrote (no torch): training curves, image
grids (misclassified test images, int8-vs-fp32 disagreements), a seeded t-SNE of the features and the
per-layer weight ranges before/after clipping, and evaluate's confusion matrices. Matplotlib's Agg
canvas only (no display, no fonts fetched); image grids are plain Pillow. Each PNG is memoised under
the cache's scratch folder by a digest of what it shows, so a cached run's report draws nothing again.

Class names may be Chinese (有鸟 / 无鸟): text is drawn with DejaVu Sans and, glyph by glyph, the first
installed font of CJK_FAMILIES (matplotlib >= 3.6 falls back per glyph through a family list; Pillow
draws the grids' captions with that same font file). Which fonts are installed is part of every memo
key (fonts_shown: the font folders' listing, read without matplotlib), so a picture drawn before a
CJK font was installed is never served again; with none installed the log says so once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy loads where a picture is drawn: a cached run's report may need none
    import numpy as np

# bump when a drawing changes: memoised PNGs are keyed by it
CURVES_VERSION = 1
GRID_VERSION = 2  # 2: captions in the CJK font
TSNE_VERSION = 2  # 2: the legend's class names in the CJK font
RANGES_VERSION = 2
CONFUSION_VERSION = 1

# Fonts with Chinese glyphs, first found first (matplotlib family names): the Noto/Source Han
# families Linux distributions ship (fonts-noto-cjk, adobe-source-han-sans), WenQuanYi, and the ones
# Windows and macOS carry
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
                "Noto Sans CJK JP", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                "Microsoft YaHei", "PingFang SC", "Heiti SC", "SimHei")
LATIN_FAMILY = "DejaVu Sans"  # matplotlib's own default: Latin text looks as it always did
# where fonts are installed (those matplotlib's font_manager searches): their listing keys the memos
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts", "/Library/Fonts",
             "/System/Library/Fonts", "~/Library/Fonts", "%WINDIR%/Fonts", "%LOCALAPPDATA%/Microsoft/Windows/Fonts")
FONT_SUFFIXES = (".ttf", ".ttc", ".otf", ".otc")
NO_CJK_FONT = ("no font with Chinese/Japanese/Korean glyphs is installed (Noto Sans CJK, Source Han Sans, "
               "WenQuanYi, Microsoft YaHei, PingFang): class names show as empty boxes in the pictures; install "
               "one (Debian/Ubuntu: apt-get install fonts-noto-cjk)")
log = logging.getLogger("edgepipe.report")

GRID_MAX = 40  # images shown per grid; the caption says how many there are
TSNE_MAX = 2000  # t-SNE points (a seeded subsample above this: the figure stays a few seconds)


def memo_png(scratch: Path | None, shown: Any, render: Callable[[], bytes]) -> bytes:
    """``render()``'s PNG, kept under the cache's scratch folder by a digest of what it shows, the
    installed fonts included: a fully cached run writes its report without importing matplotlib
    again (~0.9 s of a 1.3 s run)."""
    return memo_bytes(scratch, (shown, fonts_shown()), ".png", render)


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


# -- fonts --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def fonts_shown() -> str:
    """A digest of the font files installed (path, size, mtime under FONT_DIRS): what decides the fonts a
    picture is drawn with, read without importing matplotlib (a stat per font file)."""
    files = []
    for folder in FONT_DIRS:
        root = Path(os.path.expandvars(os.path.expanduser(folder)))
        if "%" in str(root) or not root.is_dir():
            continue
        for dirpath, _, names in os.walk(root, followlinks=True):
            for name in names:
                if name.lower().endswith(FONT_SUFFIXES):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    files.append((os.path.join(dirpath, name), st.st_size, st.st_mtime_ns))
    return digest(sorted(files))


@functools.lru_cache(maxsize=1)
def cjk_font():
    """matplotlib's FontEntry (family name, file, index in a .ttc) of the first installed CJK_FAMILIES
    font, or None. Fonts installed after matplotlib built its font cache are added from the system's
    font folders first (matplotlib reads that cache as it is)."""
    from matplotlib import font_manager

    def first() -> Any:
        by_name = {f.name: f for f in font_manager.fontManager.ttflist if f.style == "normal" and f.weight == 400}
        return next((by_name[name] for name in CJK_FAMILIES if name in by_name), None)

    if first() is None:
        known = {f.fname for f in font_manager.fontManager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # a file FreeType cannot read
                    pass
    return first()


def note_missing_glyphs(texts: Sequence[str]) -> None:
    """The log's note (once per process) when texts hold CJK characters and no CJK font is installed."""
    if _has_cjk(texts) and cjk_font() is None and not _noted:
        _noted.append(True)
        log.warning(NO_CJK_FONT)


_noted: list[bool] = []


def _has_cjk(texts: Sequence[str]) -> bool:
    return any(ord(ch) >= 0x2E80 for t in texts for ch in str(t))  # CJK radicals onwards (Han, kana, Hangul)


def font_families() -> list[str]:
    """matplotlib's font.family: Latin first, then the CJK font its missing glyphs fall back to."""
    font = cjk_font()
    return [LATIN_FAMILY] + ([font.name] if font is not None else [])


def pillow_font(size: int):
    """Pillow's font for captions: the CJK font's own file (Latin included), else Pillow's default."""
    from PIL import ImageFont

    font = cjk_font()
    if font is not None:
        try:
            return ImageFont.truetype(font.fname, size, index=getattr(font, "index", 0))
        except OSError:
            pass
    return ImageFont.load_default()


def _with_fonts(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw inside a matplotlib rc_context whose font.family is font_families()."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        import matplotlib

        with matplotlib.rc_context({"font.family": font_families()}):
            return draw(*args, **kwargs)
    return wrapper


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
@_with_fonts
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
    from PIL import Image, ImageDraw

    n = len(images)
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    text_h = 30
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    note_missing_glyphs(captions)
    font = pillow_font(11)
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
@_with_fonts
def tsne_png(features: np.ndarray, labels: np.ndarray, classes: Sequence[str], seed: int = 0) -> bytes:
    """A 2-D t-SNE (scikit-learn, PCA start, fixed random_state) coloured by class."""
    from sklearn.manifold import TSNE

    note_missing_glyphs(classes)
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
@_with_fonts
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


# -- evaluate's confusion matrices --------------------------------------------------------------------
@_with_fonts
def confusion_png(cm: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts in the cells; the
    evaluate stage's confusion_<backend>.png and the report's picture of it."""
    import numpy as np

    note_missing_glyphs(classes)
    cm = np.asarray(cm)
    c = len(classes)
    size = min(12.0, max(4.0, 0.45 * c + 2.5))
    fig = _figure(size, size)
    ax = fig.add_subplot(1, 1, 1)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(c)
    short = [s if len(s) <= 14 else s[:13] + "…" for s in classes]
    ax.set_xticks(ticks, short, rotation=90 if c > 6 else 0, fontsize=8)
    ax.set_yticks(ticks, short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    return _png(fig)
