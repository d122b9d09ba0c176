"""Shapes of the quantizable layers of a float ONNX model, for the cost models.

:func:`layer_shapes` returns a :class:`targets.base.LayerShape` (MACs, weight
elements, activation elements in/out, kind) for every node a bit-width can be
chosen for. Counts are per sample: symbolic dimensions (the batch) are set to 1
before ONNX shape inference, unless ``input_shapes`` says otherwise. Where
shape inference leaves a needed tensor without a shape, the model is run once
in onnxruntime on zeros to read it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from compiler.errors import EdgeqError
from compiler.graph import attribute, graph_input_names, initializer_array, value_shapes
from compiler.intgraph import TABLE_OPS
from targets.base import LayerShape

log = logging.getLogger(__name__)

QUANTIZABLE_OPS = {
    "Conv": "conv",
    "ConvTranspose": "conv",
    "Gemm": "gemm",
    "MatMul": "matmul",
    "Add": "eltwise",
    "Sub": "eltwise",
    "Mul": "eltwise",
    "AveragePool": "pool",
    "GlobalAveragePool": "pool",
    "MaxPool": "pool",
    "Concat": "other",
    "Softmax": "softmax",  # integer-only targets: QSoftmax
    **{op: "lookup" for op in TABLE_OPS},  # integer-only targets: a QLookup table per op
}


def fix_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose real inputs have fixed shapes (symbolic dims -> 1)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    real_inputs = set(graph_input_names(fixed))
    for value in fixed.graph.input:
        if value.name not in real_inputs:
            continue
        dims = value.type.tensor_type.shape.dim
        wanted = (input_shapes or {}).get(value.name)
        if wanted is not None and len(wanted) != len(dims):
            raise EdgeqError(f"input '{value.name}' has rank {len(dims)}, shape {wanted} given")
        for index, dim in enumerate(dims):
            size = wanted[index] if wanted is not None else (dim.dim_value if dim.HasField("dim_value") else 1)
            dim.Clear()
            dim.dim_value = int(size)
    del fixed.graph.value_info[:]
    return fixed


def shapes_by_running(model: onnx.ModelProto, names: set[str]) -> dict[str, list[int]]:
    """Shapes of ``names`` from one onnxruntime run of ``model`` on zeros."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known_outputs = {value.name for value in probe.graph.output}
    for name in sorted(names - known_outputs):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for arg in session.get_inputs():
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64}.get(arg.type, np.float32)
        feeds[arg.name] = np.zeros([d if isinstance(d, int) else 1 for d in arg.shape], dtype)
    outputs = session.run(None, feeds)
    return {arg.name: list(value.shape) for arg, value in zip(session.get_outputs(), outputs, strict=True)}


def layer_shapes(
    model: onnx.ModelProto,
    nodes: list[str] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
) -> dict[str, LayerShape]:
    """LayerShape of every quantizable node (or of the nodes named in ``nodes``), by node name."""
    fixed = fix_input_shapes(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as error:  # noqa: BLE001 - onnx raises several types; fall back to running
        log.debug("shape inference failed (%s); shapes come from onnxruntime", error)
        inferred = fixed
    shapes = value_shapes(inferred)
    selected = [
        node
        for node in fixed.graph.node
        if (node.name in nodes if nodes is not None else node.op_type in QUANTIZABLE_OPS)
    ]
    if nodes is not None:
        missing = set(nodes) - {node.name for node in selected}
        if missing:
            raise EdgeqError(f"layers not in the model: {', '.join(sorted(missing)[:5])}")
    needed = {name for node in selected for name in [*node.input, *node.output] if name}
    unknown = {name for name in needed if not _concrete(shapes.get(name))}
    if unknown:
        shapes.update(shapes_by_running(fixed, unknown))
    return {node.name: _layer_shape(fixed, node, shapes) for node in selected}


def _concrete(shape) -> bool:
    return shape is not None and all(isinstance(dim, int) and dim >= 0 for dim in shape)


def _elems(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _layer_shape(model: onnx.ModelProto, node: onnx.NodeProto, shapes: dict) -> LayerShape:
    op = node.op_type
    kind = QUANTIZABLE_OPS.get(op, "other")
    weight = initializer_array(model, node.input[1]) if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1 else None
    activation_inputs = [name for name in node.input if name and initializer_array(model, name) is None]
    input_elems = sum(_elems(shapes.get(name)) for name in activation_inputs)
    output_shape = shapes.get(node.output[0])
    output_elems = _elems(output_shape)
    weight_params = int(weight.size) if weight is not None else 0
    output_channels = 1
    macs = output_elems
    if op == "Conv":
        group = attribute(node, "group", 1)
        out_ch, in_per_group = weight.shape[0], weight.shape[1]
        macs = output_elems * in_per_group * _elems(weight.shape[2:])
        output_channels = out_ch
        if group > 1 and in_per_group == 1:
            kind = "depthwise"
        elif group == 1 and _elems(weight.shape[2:]) == 1:
            kind = "pointwise"  # a matrix product per pixel: priced apart from KxK convs (targets/cpu)
    elif op == "ConvTranspose":
        group = attribute(node, "group", 1)
        output_channels = weight.shape[1] * group
        macs = _elems(shapes.get(node.input[0])) * weight.shape[1] * _elems(weight.shape[2:])
    elif op in ("Gemm", "MatMul"):
        a_shape = shapes.get(node.input[0])
        trans_a = op == "Gemm" and attribute(node, "transA", 0)
        reduce_dim = a_shape[-2] if trans_a else a_shape[-1]
        macs = output_elems * reduce_dim
        output_channels = output_shape[-1] if output_shape else 1
    elif op in ("AveragePool", "MaxPool"):
        macs = output_elems * _elems(attribute(node, "kernel_shape", []))
    elif op == "GlobalAveragePool":
        macs = input_elems
    return LayerShape(
        node=node.name,
        op_type=op,
        kind=kind,
        macs=int(macs),
        weight_params=weight_params,
        input_elems=int(input_elems),
        output_elems=int(output_elems),
        output_channels=int(output_channels),
    )
