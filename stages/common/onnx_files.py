"""What an ONNX file may make the runtime that loads it read, checked before any runtime sees it.

An ONNX file is data to ONNX Runtime, pnnx, rknn-toolkit2 and the boards' runtimes, with two ways
past that: an initializer may keep its bytes in another file (``external_data``'s ``location``: the
runtime opens that path), and a node may name an operator domain that a custom-op library serves.
ONNX Runtime 1.26 and onnx 1.18 here refuse absolute and ``..`` locations themselves, each in its own
words and as a traceback; the onnxruntime 1.18 a board package runs on (``edgepipe selftest
--emulate``, where qemu-user lets the guest open any host file) and rknn-toolkit2's loader need not
be, and the check should not rest on each loader's version. So every loader of a model.onnx from
a cache entry calls ``check_onnx`` first: the file's protobuf alone is read (no external data), and
a location that is absolute, climbs with ``..`` or resolves (symlinks followed) outside the model's
folder, or a domain outside ONNX's own and ONNX Runtime's built-in ones, is one line naming the file
(README "Trust model").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.contract.stage import StageError

# ONNX's operator sets and ONNX Runtime's built-in contrib ops: none reads or writes files, and none
# needs a library registered (an operator of any other domain would need one: a custom-op .so)
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


class UnsafeOnnx(StageError):
    """An ONNX file that would make its runtime read another file or load a custom-op library."""


def check_onnx(path: Path, what: str = "") -> None:
    """UnsafeOnnx (one line, `what` first: e.g. "input onnx") unless every tensor of the file keeps its
    data in the file or in a file of its folder, and every domain is a built-in one or a function the
    file defines itself."""
    import onnx

    path = Path(path)
    prefix = f"{what}: " if what else ""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a protobuf: every runtime parses it with protobuf too and refuses
        return  # it in its own words (a converting stage's failure names its log)
    folder = path.resolve().parent
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        why = _outside(folder, location)
        if why:
            raise UnsafeOnnx(f"{prefix}{path}: tensor {tensor.name!r} keeps its data in {location!r}, {why}; "
                             f"edgepipe loads an ONNX model only with its data inside its folder (export it again)")
    local = {f.domain for f in model.functions}
    used = [op.domain for op in model.opset_import] + [n.domain for n in _nodes(model)]
    custom = sorted({d for d in used if d not in BUILTIN_DOMAINS and d not in local})
    if custom:
        raise UnsafeOnnx(f"{prefix}{path}: operator domain {custom[0]!r} needs a custom-op library; edgepipe loads "
                         f"ONNX models of the built-in domains only ({', '.join(sorted(BUILTIN_DOMAINS - {''}))} "
                         f"and the default one)")


def _outside(folder: Path, location: str) -> str | None:
    """Why an external-data location is not a file of `folder`, or None."""
    if not location:
        return "a location that is empty"
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        return "an absolute path"
    if ".." in Path(location).parts or ".." in location.replace("\\", "/").split("/"):
        return "outside the model's folder"
    if not (folder / location).resolve().is_relative_to(folder):  # a symlink out of the folder
        return "outside the model's folder (through a symlink)"
    return None


def _graphs(model: Any) -> Iterator[Any]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and every function's nodes' subgraphs."""
    pending = [model.graph]
    pending += [a.g for f in model.functions for n in f.node for a in n.attribute if a.HasField("g")]
    pending += [g for f in model.functions for n in f.node for a in n.attribute for g in a.graphs]
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    pending.append(attr.g)
                pending.extend(attr.graphs)


def _nodes(model: Any) -> Iterator[Any]:
    for graph in _graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _tensors(model: Any) -> Iterator[Any]:
    """Every tensor the file holds: initializers (sparse ones' values and indices), and the tensors of
    node attributes (Constant's value...), in every graph and function."""
    for graph in _graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
