"""What board checks need to know about an exported ONNX graph, read with the ``onnx`` package only.

    info = analyze("model.onnx")
    info.op_types()             # {"Conv": 20, ...}
    info.shape("input0")        # (1, 3, 224, 224) after onnx shape inference; None dims when symbolic
    info.n_params               # float weights (initializers) in elements
    info.peak_activation_elems  # the largest set of activations alive at once (liveness over node order)

``onnx`` is imported inside ``analyze`` so that importing a board profile stays cheap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ops that are no-ops in any converter (they disappear before the board sees the graph)
NO_OPS = frozenset({"Identity", "Dropout"})
# ops that move data without computing: a converter turns them into reshape/permute layers
RESHAPE_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"})

Shape = tuple  # of int | None


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]

    def label(self) -> str:
        return f"{self.op} '{self.name}'" if self.name else self.op


@dataclass
class GraphInfo:
    path: Path
    opset: int
    nodes: list[Node]
    shapes: dict[str, Shape | None]
    constants: dict[str, Any]  # initializer / Constant outputs -> numpy arrays
    input_name: str
    input_shape: Shape | None
    output_name: str
    output_shape: Shape | None
    n_inputs: int
    n_outputs: int
    n_params: int  # elements of float initializers (the weights)
    peak_activation_elems: int
    unknown_shapes: int  # activations whose shape inference failed (left out of the estimate)
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    producer: dict[str, Node] = field(default_factory=dict)

    def op_types(self) -> Counter:
        return Counter(n.op for n in self.nodes)

    def nodes_of(self, *ops: str) -> list[Node]:
        return [n for n in self.nodes if n.op in ops]

    def shape(self, tensor: str) -> Shape | None:
        return self.shapes.get(tensor)

    def constant(self, tensor: str):
        """The value of a constant tensor (initializer or Constant node output), else None."""
        return self.constants.get(tensor)

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def _elems(shape: Shape | None) -> int | None:
    if shape is None or any(d is None or d < 0 for d in shape):
        return None
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        try:
            out[a.name] = helper.get_attribute_value(a)
        except Exception:  # noqa: BLE001 - an attribute we cannot decode is simply not reported
            continue
    return out


def _shape_of(value_info) -> Shape | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in t.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else None)
    return tuple(dims)


def analyze(path: str | Path) -> GraphInfo:
    """Load ``path`` (weights inside the file), run shape inference and summarise the graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    path = Path(path)
    model = onnx.load(str(path))
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - fall back to the declared shapes
        inferred = model
    g = inferred.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)

    constants: dict[str, Any] = {}
    n_params = 0
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        constants[init.name] = arr
        if np.issubdtype(arr.dtype, np.floating):
            n_params += int(arr.size)
    nodes: list[Node] = []
    for n in g.node:
        node = Node(n.name, n.op_type, list(n.input), list(n.output), _attrs(n))
        if n.op_type == "Constant" and "value" in node.attrs:
            try:
                constants[n.output[0]] = numpy_helper.to_array(node.attrs["value"])
            except Exception:  # noqa: BLE001
                pass
        nodes.append(node)

    shapes: dict[str, Shape | None] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        shapes[vi.name] = _shape_of(vi)
    for name, arr in constants.items():
        shapes[name] = tuple(int(d) for d in arr.shape)

    real_inputs = [i for i in g.input if i.name not in constants]
    consumers: dict[str, list[Node]] = {}
    producer: dict[str, Node] = {}
    for node in nodes:
        for t in node.inputs:
            if t:
                consumers.setdefault(t, []).append(node)
        for t in node.outputs:
            producer[t] = node

    peak, unknown = _peak_activations(nodes, shapes, constants, [i.name for i in real_inputs],
                                      {o.name for o in g.output})
    inp = real_inputs[0] if real_inputs else None
    out = g.output[0] if len(g.output) else None
    return GraphInfo(
        path=path, opset=opset, nodes=nodes, shapes=shapes, constants=constants,
        input_name=inp.name if inp else "", input_shape=shapes.get(inp.name) if inp else None,
        output_name=out.name if out else "", output_shape=shapes.get(out.name) if out else None,
        n_inputs=len(real_inputs), n_outputs=len(g.output), n_params=n_params,
        peak_activation_elems=peak, unknown_shapes=unknown, consumers=consumers, producer=producer,
    )


def _peak_activations(nodes: list[Node], shapes, constants, inputs: Iterable[str],
                      outputs: set[str]) -> tuple[int, int]:
    """Peak of the summed sizes of live activations while the nodes run in file (topological) order.

    A tensor lives from the node that makes it until its last consumer has run (graph outputs until
    the end). Constants are weights, not activations. This is what a simple memory planner reaches;
    NPU compilers fuse layers and usually need less, never much more."""
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for t in node.inputs:
            last_use[t] = i
    for t in outputs:
        last_use[t] = len(nodes)
    unknown = 0

    def size(t: str) -> int:
        nonlocal unknown
        n = _elems(shapes.get(t))
        if n is None:
            unknown += 1
            return 0
        return n

    live: dict[str, int] = {t: size(t) for t in inputs}
    peak = sum(live.values())
    for i, node in enumerate(nodes):
        if node.op in NO_OPS or node.op == "Constant":
            for t in node.outputs:  # aliases: cost nothing extra
                if t:
                    live.setdefault(t, 0)
        else:
            for t in node.outputs:
                if t and t not in constants:
                    live[t] = size(t)
        peak = max(peak, sum(live.values()))
        for t in [t for t in live if last_use.get(t, -1) <= i and t not in outputs]:
            del live[t]
    return peak, unknown
