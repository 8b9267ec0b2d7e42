"""The model bundle: the files that travel with a model from stage to stage (model file,
``preprocess.json``, ``labels.txt``, ``io.json``). For now: the one reader and writer of ``labels.txt``.

``labels.txt`` holds one class name a line, in output order, UTF-8, each line ending in ``\\n``. Names
are kept verbatim (spaces, unicode and leading/trailing blanks are part of a name); the dataset stage
refuses names that ``str.splitlines`` would break, so a name always comes back as one line. A blank line
(an editor's trailing newline) names no class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

LABELS = "labels.txt"


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
