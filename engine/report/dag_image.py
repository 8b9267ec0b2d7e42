"""`edgepipe dag --format png|svg`: the DOT text drawn by Graphviz's `dot` (Debian package graphviz)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from engine.errors import DotMissing as DotMissing  # re-exported: raised here

INSTALL_HINT = ("Graphviz's `dot` is not on PATH: install it (Debian/Ubuntu: apt-get install graphviz; "
                "macOS: brew install graphviz), or use --format mermaid|dot for text")


def render_dot(dot_text: str, fmt: str, output: Path) -> Path:
    """Write `output` (png or svg) from DOT text; one-line errors for a missing or failing `dot`."""
    exe = shutil.which("dot")
    if exe is None:
        raise DotMissing(INSTALL_HINT)
    r = subprocess.run([exe, f"-T{fmt}", "-o", str(output)], input=dot_text, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["no message"])[0]
        raise OSError(f"dot -T{fmt} failed for {output}: {first}")
    return output
