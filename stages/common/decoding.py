"""What a decoding worker of the dataset stage runs (stages/dataset.py starts the workers, gathers
their results and writes the arrays; the workers write the pixels into packs, packs.py). It imports
numpy, Pillow, preprocess_numpy.py, packs.py and engine.contract.hashing only,
not pydantic or the engine's stage machinery: a spawned worker imports the module of the function it
runs, and this one takes ~0.1 s where stages.dataset takes ~0.25 s, start-up paid by every worker of
every run. The resize settings come as preprocess_numpy.PreprocessSpec (plain) for the same reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from engine.contract.hashing import sha256_file, sha256_json
from stages.common.packs import PackStore
from stages.common.preprocess_numpy import PreprocessSpec, load_image, resize

RESIZE_SETTINGS = ("input_size", "resize", "interpolation", "pad_value")  # what resize() reads of a spec


def resize_spec(preprocess) -> PreprocessSpec:
    """The plain spec of the settings resize() reads, for a worker: unpickling the host's pydantic
    ``Preprocess`` would import pydantic there."""
    return PreprocessSpec(**{k: getattr(preprocess, k) for k in RESIZE_SETTINGS})


def one_thread() -> None:
    """Decoding workers run one thread each: the workers are the parallelism."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_heap_kept = False


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next image (allocations under 16 MB from the
    heap, up to 32 MB free kept at its top). By default a fresh process maps every buffer of 128 kB
    and more (the file's bytes, libjpeg's work memory, the resized rows) anew and hands it back:
    ~190 page faults a 448-px photo, 2.6 s of kernel time in 3,000 of them, 7,500 faults in all once
    kept. Once per process; nothing where the C library has no mallopt (macOS, musl: a stub)."""
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    mallopt(_M_TRIM_THRESHOLD, 32 << 20)


def kept_store(scratch: Path, spec) -> PackStore:
    """The store of decoded rows kept between runs (``Context.scratch``), in a folder named by
    everything that makes the pixels besides the file's bytes (the resize settings,
    preprocess_numpy.py's code, Pillow's version), so a row found there is right for any run that
    finds it. The code's entry keeps the module's earlier name: renamed, every kept row would be
    decoded again."""
    import PIL

    from stages.common import preprocess_numpy

    code = sha256_file(Path(preprocess_numpy.__file__))
    made_by = {"format": 2, "pillow": PIL.__version__, "pixels.py": code,
               **{k: getattr(spec, k) for k in RESIZE_SETTINGS}}
    h, w = spec.input_size
    return PackStore.kept(os.path.join(scratch, "decoded", sha256_json(made_by)[:32]), (h, w, 3))


def decode_one(file: str | None, array: np.ndarray | None, spec) -> tuple:
    """(uint8 H x W x 3 pixels, digest, None) or (None, digest or None, why it was skipped). The
    digest is the sha256 of a file's bytes (sha1 of an in-memory array's)."""
    from PIL import Image

    if array is not None:
        img = Image.fromarray(np.ascontiguousarray(array), "L" if array.ndim == 2 else "RGB").convert("RGB")
        return resize(img, spec), hashlib.sha1(array.tobytes()).hexdigest(), None
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        return None, None, f"unreadable: {e.strerror or e}"
    if not data:
        return None, None, "empty file (0 bytes)"
    # sha256, not sha1: crafted sha1 collisions exist, and two files must never share kept pixels
    digest = hashlib.sha256(data).hexdigest()
    try:
        return resize(load_image(io.BytesIO(data)), spec), digest, None
    except Exception as e:  # noqa: BLE001 - every decoder failure is a skip reason
        if type(e).__name__ == "UnidentifiedImageError":
            return None, digest, "not an image (Pillow cannot identify the format)"
        return None, digest, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'decode failed'}"


def decode_chunk(jobs: list[tuple[str | None, np.ndarray | None]], spec, store: PackStore) -> tuple:
    """Decode ``jobs`` (file, array) and write the pixels into one pack of ``store`` here, in the
    worker: only (pack name or None, [(digest, why skipped, slot in the pack)]) go back to the main
    process, not the pixels (150 KB per 224-px image, which the main process would unpickle and
    write, on the cores the workers decode on)."""
    keep_freed_memory()
    rows, digests, results = [], [], []
    for file, array in jobs:
        arr, digest, why = decode_one(file, array, spec)
        if why is None:
            if arr.shape != store.shape or arr.dtype != np.uint8:  # resize() always gives this; a guard, not a path
                from engine.contract.stage import StageError

                raise StageError(f"decoded {file} has shape {arr.shape} {arr.dtype}, expected {store.shape} uint8")
            results.append((digest, None, len(rows)))
            rows.append(arr)
            digests.append(digest)
        else:
            results.append((digest, why, None))
    return (store.write(digests, rows) if rows else None), results
