"""Small helpers over ``onnx.ModelProto`` shared by every pass.

Passes work on plain ONNX protos; these helpers answer the questions they all
ask (who produces / consumes a tensor, what is an initializer, make a fresh
name) so no pass re-implements them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of initializer (or Constant node output) ``name``, else None."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Create or overwrite initializer ``name`` with ``value``."""
    tensor = numpy_helper.from_array(np.asarray(value), name)
    for index, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[index].CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that produces it."""
    return {out: node for node in model.graph.node for out in node.output if out}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (graph outputs are not nodes)."""
    result: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                result[name].append(node)
    return result


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """Real inputs: graph inputs that are not initializers."""
    inits = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in inits]


def graph_output_names(model: onnx.ModelProto) -> list[str]:
    return [value.name for value in model.graph.output]


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def clamp_bounds(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float | None, float | None]:
    """The (low, high) a Relu or Clip clamps to (+-inf where open; Clip's bounds from attributes before
    opset 11, inputs after); None for a bound given by a tensor that is not a constant."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    bounds: list[float | None] = [attribute(node, "min", -np.inf), attribute(node, "max", np.inf)]
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            value = initializer_array(model, node.input[index])
            bounds[index - 1] = None if value is None else float(value)
    return bounds[0], bounds[1]


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for opset in model.opset_import:
        if opset.domain in (domain, "ai.onnx" if domain == "" else domain):
            return opset.version
    return 0


class NameAllocator:
    """Hands out tensor/node names that do not clash with the model's."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        graph = model.graph
        for node in graph.node:
            self.used.update(node.output)
            self.used.update(node.input)
            self.used.add(node.name)
        self.used.update(init.name for init in graph.initializer)
        self.used.update(value.name for value in graph.input)
        self.used.update(value.name for value in graph.output)

    def __call__(self, base: str) -> str:
        name = base
        index = 1
        while name in self.used:
            name = f"{base}_{index}"
            index += 1
        self.used.add(name)
        return name


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes in place so every node comes after its producers (stable)."""
    graph = model.graph
    available = {init.name for init in graph.initializer}
    available.update(value.name for value in graph.input)
    available.add("")
    remaining = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while remaining:
        progressed = False
        still: list[onnx.NodeProto] = []
        for node in remaining:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                still.append(node)
        if not progressed:
            missing = sorted({n for node in still for n in node.input if n not in available})
            raise ValueError(f"graph has a cycle or undefined inputs: {missing[:5]}")
        remaining = still
    del graph.node[:]
    graph.node.extend(ordered)


def value_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Shapes known from shape inference (value_info, inputs, outputs, initializers)."""
    shapes: dict[str, list[int | str | None]] = {}
    graph = model.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = []
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(dim.dim_value)
                elif dim.HasField("dim_param"):
                    dims.append(dim.dim_param)
                else:
                    dims.append(None)
            shapes[value.name] = dims
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, for every tensor whose type is known."""
    types: dict[str, int] = {}
    graph = model.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})


class DisjointSets:
    """Union-find over names, remembering first-seen order (for deterministic groups)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        while self.parent.setdefault(name, name) != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def __contains__(self, name: str) -> bool:
        return name in self.parent

    def groups(self) -> list[list[str]]:
        """Every set, members in first-seen order, sets in order of their first member."""
        merged: dict[str, list[str]] = {}
        for name in list(self.parent):
            merged.setdefault(self.find(name), []).append(name)
        return list(merged.values())
