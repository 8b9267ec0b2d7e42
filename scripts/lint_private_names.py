"""Fails when a module of ours uses another module's `_private` name: `from engine.x import _helper` or
`x._helper` where `x` is a module of ours it imported. import-linter checks which modules import which;
this checks what they take from them. Run by `make lint` (so by `make test`).

    python scripts/lint_private_names.py [ROOT]     (ROOT: the folder holding engine/, stages/, boards/)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("engine", "stages", "boards", "backends")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def problems(root: Path, path: Path, ours: set[str]) -> list[str]:
    module = module_name(root, path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> a module of ours
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ours:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, path.name == "__init__.py", node)
            for a in node.names:
                if f"{source}.{a.name}" in ours:
                    aliases[a.asname or a.name] = f"{source}.{a.name}"
                elif source in ours and source != module and is_private(a.name):
                    found.append(f"{path}:{node.lineno}: imports {source}.{a.name}, a private name of another module")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
                and aliases.get(node.value.id, module) != module):
            found.append(f"{path}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}, a private name of "
                         f"another module")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else ".").resolve()
    files = sorted(f for p in PACKAGES if (root / p).is_dir() for f in (root / p).rglob("*.py"))
    ours = {module_name(root, f) for f in files}
    found = [line for f in files for line in problems(root, f, ours)]
    for line in found:
        print(line)
    print(f"private names: {len(found)} uses of another module's private name in {len(files)} files")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
