"""Choose what to quantize: the layers, and the ops that stay float (with why).

Requires: a canonicalized float model (passes/canonicalize.py).
Guarantees: returns a :class:`~compiler.plan.QuantPlan` whose ``layers`` are
the quantizable compute layers, each with the default ``w_bits``/``a_bits``,
and whose ``float_nodes`` lists every other compute op with the reason it
stays float. The model itself is not changed.

A layer's ``a_bits`` is the width of the activations it *reads*; a tensor
read by several quantized layers is stored at the widest of their ``a_bits``.

What is quantized:
  * Conv, ConvTranspose, Gemm, and MatMul with a constant weight: weights per
    channel (symmetric), inputs per tensor;
  * Add / Mul of two activations on a residual path, Concat, average pooling;
  * MatMul of two activations (attention), Softmax and elementwise functions
    such as Sigmoid, HardSwish, Tanh (compiler.intgraph.TABLE_OPS) only for
    integer-only targets (they cannot run float; elsewhere float keeps them exact).
What stays float, by default: online rotations inserted by a transform
(they exist to spread outliers before the next layer's quantizer), Softmax, LayerNormalization, GELU/Erf, the
attention-mask addition (a path from an integer model input such as
``attention_mask``, or a constant with sentinel values like -3.4e38 that would
wreck any min/max range), bias additions after a MatMul, and any op edgeq has
no quantized form for. Data-movement ops (Reshape, Transpose, MaxPool, ...)
are never layers: they pass their input's quantizer through.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from compiler.graph import (
    FLOAT_TYPES,
    attribute,
    graph_input_names,
    initializer_array,
    producers,
    tensor_elem_types,
)
from compiler.intgraph import TABLE_OPS
from compiler.linear_layers import online_ops
from compiler.plan import LayerPlan, QuantPlan

log = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ELTWISE_OPS = ("Add", "Mul")
POOL_OPS = ("AveragePool", "GlobalAveragePool")
# Ops that only move or select data: they share their input's quantizer.
PASS_THROUGH_OPS = frozenset({
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity",
    "Slice", "Gather", "Pad", "Split", "Resize", "DepthToSpace", "SpaceToDepth",
})
# Activations folded into the quantizer of the layer they follow.
FUSIBLE_ACTIVATIONS = ("Relu", "Clip")
SENTINEL_MAGNITUDE = 1e4
# Tensors of unknown type are assumed float (shape inference may not reach them).
FLOAT_TYPES_DEFAULT = onnx.TensorProto.FLOAT


def select_layers(
    model: onnx.ModelProto,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    activation_signed: bool = False,
    integer_only: bool = False,
) -> QuantPlan:
    """Decide which nodes of ``model`` are quantized layers (see module docstring)."""
    plan = QuantPlan(w_bits=w_bits, a_bits=a_bits, activation_signed=activation_signed)
    mask_tensors = _mask_derived_tensors(model)
    types = tensor_elem_types(model)
    online = {entry["node"]: entry for entry in online_ops(model)}
    for node in model.graph.node:
        if node.name in online:  # a rotation a transform inserted: float, or it undoes its own purpose
            plan.keep_float(node.name, node.op_type, online[node.name]["reason"])
            continue
        if any(types.get(name, FLOAT_TYPES_DEFAULT) not in FLOAT_TYPES for name in node.output if name):
            continue  # shape arithmetic, indices, masks: nothing to quantize
        reason = _float_reason(model, node, mask_tensors, integer_only)
        if reason is None and node.op_type in ELTWISE_OPS and not integer_only:
            reason = _float_operand_reason(model, node, plan)
        if reason is None:
            plan.layers[node.name] = _layer_for(model, node, w_bits, a_bits)
        elif reason:  # "" means: not a compute op, nothing to report
            plan.keep_float(node.name, node.op_type, reason)
            log.debug("%s (%s) stays float: %s", node.name, node.op_type, reason)
    plan.update_totals()
    return plan


def _layer_for(model: onnx.ModelProto, node: onnx.NodeProto, w_bits: int, a_bits: int) -> LayerPlan:
    if node.op_type in WEIGHTED_OPS and _constant_weight(model, node):
        weight = initializer_array(model, node.input[1])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return LayerPlan(
            node=node.name, op_type=node.op_type, w_bits=w_bits, a_bits=a_bits,
            inputs=[node.input[0]], outputs=[node.output[0]], weight=node.input[1], bias=bias,
            weight_params=int(weight.size),
        )
    activations = [name for name in node.input if name and initializer_array(model, name) is None]
    return LayerPlan(node=node.name, op_type=node.op_type, w_bits=None, a_bits=a_bits,
                     inputs=activations, outputs=[node.output[0]])


def _constant_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    return len(node.input) > 1 and initializer_array(model, node.input[1]) is not None


def _float_reason(model, node, mask_tensors: set[str], integer_only: bool) -> str | None:
    """None: quantize as a layer. '': not a compute op. Otherwise why it stays float."""
    op = node.op_type
    if op in PASS_THROUGH_OPS or op in FUSIBLE_ACTIVATIONS:
        return ""
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}.{op}"
    if op in WEIGHTED_OPS:
        if _constant_weight(model, node):
            if op == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                 or attribute(node, "beta", 1.0) != 1.0):
                return "Gemm with transA or alpha/beta != 1"
            if op == "ConvTranspose" and attribute(node, "group", 1) != 1:
                return "grouped ConvTranspose (per-channel axis is ambiguous)"
            if initializer_array(model, node.input[0]) is not None:
                return "both operands are constant"
            return None
        if op == "MatMul":
            if any(name in mask_tensors for name in node.input):
                return "reads the attention mask"
            return None if integer_only else "activation x activation MatMul (attention) stays float"
        return "weight is not a constant"
    if op in ELTWISE_OPS:
        constants = [initializer_array(model, name) for name in node.input]
        if any(name in mask_tensors for name in node.input):
            return "attention-mask arithmetic (sentinel values would wreck the range)"
        for value in constants:
            if value is not None and value.size and np.max(np.abs(value)) > SENTINEL_MAGNITUDE:
                return f"constant with sentinel magnitude {float(np.max(np.abs(value))):.3g}"
        if any(value is not None for value in constants):
            if op == "Add" and _follows(model, node, ("MatMul", "Conv", "Gemm")):
                return "bias addition after a MatMul stays float"
            return None if integer_only else f"{op} with a constant stays float"
        return None  # residual Add / Mul of two activations
    if op == "Concat":
        return None
    if op in POOL_OPS:
        return None
    if op == "Softmax" or op in TABLE_OPS:  # integer-only code needs them quantized; elsewhere float is exact
        return None if integer_only else f"{op} stays float (quantized only for integer-only targets)"
    return "no quantized form in edgeq"


def _float_operand_reason(model: onnx.ModelProto, node: onnx.NodeProto, plan: QuantPlan) -> str | None:
    """Why a two-activation Add/Mul stays float: an operand made by a float op.

    In a CNN both operands of a residual Add come from quantized layers; in a
    transformer one comes from LayerNorm, and quantizing the residual stream
    per tensor costs much more accuracy than the integer Add saves.
    """
    made_by = producers(model)
    for name in node.input:
        source = made_by.get(name)
        while source is not None and source.op_type in PASS_THROUGH_OPS | set(FUSIBLE_ACTIVATIONS):
            source = made_by.get(source.input[0])
        if source is not None and source.name not in plan.layers:
            return f"operand '{name}' comes from float op {source.op_type} (residual stream stays float)"
    return None


def _follows(model: onnx.ModelProto, node: onnx.NodeProto, ops: tuple[str, ...]) -> bool:
    made_by = producers(model)
    return any(name in made_by and made_by[name].op_type in ops for name in node.input)


def _mask_derived_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from integer-typed graph inputs that end up as float (attention masks).

    Token ids feed a Gather into embeddings (a legitimate float path), so only
    inputs named like a mask start a mask path, and Gather ends one.
    """
    int_types = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}
    real_inputs = set(graph_input_names(model))
    seeds = {
        value.name for value in model.graph.input
        if value.name in real_inputs and value.type.tensor_type.elem_type in int_types
        and "mask" in value.name.lower()
    }
    tainted = set(seeds)
    for node in model.graph.node:  # nodes are topologically sorted
        variable = [name for name in node.input if name and initializer_array(model, name) is None]
        # Still a mask only while every non-constant input is one: the Add that
        # applies the mask to the attention scores produces scores, not a mask.
        if variable and all(name in tainted for name in variable) and node.op_type != "Gather":
            tainted.update(node.output)
    return tainted - seeds
