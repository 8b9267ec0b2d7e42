"""The model bundle: the files that travel with a model from stage to stage (model file,
``preprocess.json``, ``labels.txt``, ``io.json``): the one reader and writer of ``labels.txt``, the
check that a bundle folder holds what a stage needs (``check_bundle``), the copy of the files that travel
unchanged (``copy_forward``) and the reader of ``io.json`` (``read_io``).

``labels.txt`` holds one class name a line, in output order, UTF-8, each line ending in ``\\n``. Names
are kept verbatim (spaces, unicode and leading/trailing blanks are part of a name); the dataset stage
refuses names that ``str.splitlines`` would break, so a name always comes back as one line. A blank line
(an editor's trailing newline) names no class.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from engine.contract.stage import StageError

LABELS = "labels.txt"
PREPROCESS = "preprocess.json"
IO = "io.json"
# the files every model bundle carries forward unchanged from the stage before it
FORWARD = (PREPROCESS, LABELS)


def labels_file(folder_or_file: Path) -> Path:
    """``folder/labels.txt`` for a folder, the path itself otherwise."""
    path = Path(folder_or_file)
    return path / LABELS if path.is_dir() else path


def read_labels(folder_or_file: Path) -> list[str]:
    """The class names of a bundle folder's labels.txt (or of that file), in output order."""
    text = labels_file(folder_or_file).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def write_labels(path: Path, names: Iterable[str]) -> Path:
    """Write ``names`` one a line to ``path`` (a file, or a folder that gets a labels.txt)."""
    names = list(names)
    broken = [name for name in names if name.splitlines() != [name]]
    if broken:  # the dataset stage refuses these first; this keeps any other writer honest
        raise ValueError(f"class name {broken[0]!r} is empty or holds a line break; {LABELS} keeps one name a line")
    path = labels_file(path)
    path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return path


def check_bundle(folder: Path, needs: Iterable[str] = FORWARD, *, input: str, hint: str) -> None:
    """StageError naming the input and the first file of ``needs`` that ``folder`` lacks, e.g.
    ``input onnx: /x/io.json is missing (expected an export_onnx output)``; ``hint`` goes in the brackets.
    A ``model.onnx`` among ``needs`` is checked too, before the stage hands it to any runtime: its data
    inside its folder, no custom-op domain (stages.common.onnx_files; the file may come from cache.remote)."""
    folder = Path(folder)
    for name in needs:
        if not (folder / name).is_file():
            raise StageError(f"input {input}: {folder / name} is missing ({hint})")
    if "model.onnx" in needs:
        from stages.common.onnx_files import check_onnx

        check_onnx(folder / "model.onnx", f"input {input}")


def copy_forward(src_folder: Path, out: Path, *, io: bool = False, missing_ok: bool = False) -> list[str]:
    """Copy ``preprocess.json`` and ``labels.txt`` (and ``io.json`` with ``io=True``) from a bundle
    folder into ``out``, byte for byte; ``missing_ok``: copy those present. Returns the names copied."""
    copied = []
    for name in (*FORWARD, IO) if io else FORWARD:
        src = Path(src_folder) / name
        if missing_ok and not src.is_file():
            continue
        shutil.copyfile(src, Path(out) / name)
        copied.append(name)
    return copied


def read_io(folder: Path) -> dict:
    """A bundle folder's ``io.json`` (blob names, input shape), or {} when it has none."""
    path = Path(folder) / IO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): "
                         "re-run the stage that wrote it") from None
