"""Insert QuantizeLinear/DequantizeLinear pairs: the QDQ interchange model.

Requires: a canonicalized float model, a plan from ``passes/select_layers``
and float ranges for the tensors :func:`tensors_to_calibrate` names.
Guarantees: the returned model computes the quantized function the plan
describes and loads in onnxruntime, which fuses the pairs into its integer
kernels (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...):
  * weights are stored as integers (int8, or int4 with opset 21) feeding a
    per-channel DequantizeLinear; biases as int32 with scale ``sx * sw``;
  * 2-bit weights are stored as INT2 (opset 25) where onnxruntime runs an INT2
    DequantizeLinear feeding that layer (:func:`int2_weight_form`): as the
    grid's own DequantizeLinear, or, for a per-channel Gemm weight between
    8-bit activations, as a block-wise one with one block per output channel
    (same scales; onnxruntime fuses only the per-axis form, into a kernel that
    refuses INT2); otherwise as an INT4 tensor holding the same 2-bit values
    with the same scales ("int4 container"); ``layer.info["weight_storage"]``
    says which;
  * with ``plan.weight_block_size``, sub-8-bit MatMul/Gemm weights feed a
    block-wise DequantizeLinear instead (``axis`` = the reduction axis,
    ``block_size``, opset 21; ``compiler.quantizers.layer_weight_grid`` says
    which layers), with a zero point per block (asymmetric, MSE-fitted unless a
    rounding pass already recorded the grid); their bias stays float, since no single ``sx * sw`` exists
    (onnxruntime runs such a layer as DequantizeLinear + float MatMul);
  * each quantized activation gets one Q -> DQ pair; tensors that must share a
    quantizer (Concat inputs and output, data-movement ops, max pooling) get
    the same scale and zero point;
  * a Relu or Clip(0, hi) right after a quantized layer is folded into that
    layer's output quantizer (the quantized range already clamps there);
  * a quantized layer's output is quantized when a quantized op reads it (or
    always, for integer-only targets); otherwise it stays float, which lets
    onnxruntime use its integer-in/float-out kernels.
Float function: not preserved (this is where quantization error enters).
The plan's ``tensors`` are filled in; the caller's model is not modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.graph import (
    DisjointSets,
    NameAllocator,
    attribute,
    clamp_bounds,
    consumers,
    graph_output_names,
    initializer_array,
    opset_version,
    producers,
    set_initializer,
    topological_sort,
)
from compiler.plan import LayerPlan, QuantPlan, TensorQuant, int_range
from compiler.quantizers import (
    dequantize_weight,
    planned_weight_quant,
    quantize_weight,
    weight_output_axis,
)
from passes.canonicalize import infer_shapes
from passes.select_layers import FUSIBLE_ACTIVATIONS, PASS_THROUGH_OPS

log = logging.getLogger(__name__)

# ONNX element types by (bits, signed).
_ONNX_INT_TYPES = {
    (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16,
    (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
    (2, True): TensorProto.INT2, (2, False): TensorProto.UINT2,
    (32, True): TensorProto.INT32,
}
# Sub-byte element types, stored packed (raw_data) through ml_dtypes arrays.
_SUB_BYTE_DTYPES = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4,
                    (2, True): ml_dtypes.int2, (2, False): ml_dtypes.uint2}
# Opset that introduced the element types QuantizeLinear/DequantizeLinear need.
_OPSET_FOR_BITS = {8: 13, 32: 13, 16: 21, 4: 21, 2: 25}
_OPSET_FOR_BLOCKS = 21  # DequantizeLinear's block_size attribute
# The element type 2-bit weights are stored in where INT2 cannot be.
INT2_CONTAINER_BITS = 4

# onnxruntime 1.31 (CPU) fuses DequantizeLinear -> op (-> QuantizeLinear) into an integer kernel
# (QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat) when the op's input comes out of an
# 8-bit DequantizeLinear and its output is float or goes into an 8-bit QuantizeLinear (Conv: only
# the latter). The fusion accepts an INT2 weight and the fused kernel then refuses it: the session
# does not load. (INT4 weights are not fused: they run as DequantizeLinear + the float op.) Key:
# (op type, block-wise weight); value: the output quantizer widths (None: float output) that, with
# an 8-bit input, trigger the fusion. Ops missing here (ConvTranspose, block-wise Gemm) are never
# fused. tests/passes/test_insert_qdq_int2.py probes onnxruntime for every op, granularity and
# activation context and fails when this table stops being exactly what onnxruntime does.
_ORT_INT8_FUSION_OUTPUTS: dict[tuple[str, bool], frozenset[int | None]] = {
    ("Conv", False): frozenset({8}),
    ("Gemm", False): frozenset({8, None}),
    ("MatMul", False): frozenset({8, None}),
    ("MatMul", True): frozenset({8, None}),
}


def int2_runs_in_onnxruntime(op_type: str, block_wise: bool, input_bits: int | None,
                             output_bits: int | None) -> bool:
    """Whether onnxruntime runs a model where an INT2 DequantizeLinear feeds this layer's weight.

    ``input_bits`` / ``output_bits``: width of the quantizer on the layer's
    input / (post-activation) output, None where that tensor stays float.
    """
    fused_outputs = _ORT_INT8_FUSION_OUTPUTS.get((op_type, bool(block_wise)), frozenset())
    return not (input_bits == 8 and output_bits in fused_outputs)


# Ops whose weight is always a matrix, so a per-channel grid is also a block-wise one with a
# single block spanning the reduction axis (scale shape [N, 1] or [1, N]: the same scales).
# Not Conv: onnxruntime fuses a Conv whose weight DequantizeLinear is block-wise as readily as a
# per-axis one (tests/passes/test_insert_qdq_int2.py probes both).
ONE_BLOCK_OPS = frozenset({"Gemm"})
INT2 = "int2"
INT2_ONE_BLOCK = "int2 one block"
INT2_CONTAINER = "container"


def int2_weight_form(op_type: str, block_wise: bool, input_bits: int | None, output_bits: int | None) -> str:
    """How the QDQ export stores a 2-bit weight of this layer so that onnxruntime runs it.

    :data:`INT2` (the grid's own DequantizeLinear), :data:`INT2_ONE_BLOCK` (a
    per-channel grid written as a block-wise DequantizeLinear with one block
    per output channel: onnxruntime fuses the per-axis form into a kernel that
    refuses INT2 but runs the block-wise form as DequantizeLinear + the float
    op) or :data:`INT2_CONTAINER` (the 2-bit values in an INT4 tensor).
    """
    if int2_runs_in_onnxruntime(op_type, block_wise, input_bits, output_bits):
        return INT2
    if not block_wise and op_type in ONE_BLOCK_OPS and int2_runs_in_onnxruntime(op_type, True, input_bits,
                                                                                output_bits):
        return INT2_ONE_BLOCK
    return INT2_CONTAINER


@dataclass
class ActivationGroup:
    """Tensors that share one activation quantizer, and its width."""

    tensors: list[str]
    bits: int


def fused_activation(model: onnx.ModelProto, layer: LayerPlan) -> onnx.NodeProto | None:
    """The Relu/Clip(0, hi) directly after ``layer`` that its quantizer can absorb."""
    readers = consumers(model).get(layer.outputs[0], [])
    if len(readers) != 1 or layer.outputs[0] in graph_output_names(model):
        return None
    node = readers[0]
    if node.op_type not in FUSIBLE_ACTIVATIONS:
        return None
    low, high = clamp_bounds(model, node)
    if low != 0.0 or high is None:  # a Clip from 0 to a constant (or open) top
        return None
    return node


def _layer_output(model: onnx.ModelProto, layer: LayerPlan) -> str:
    """The tensor holding the layer's (post-activation) result."""
    fused = fused_activation(model, layer)
    return fused.output[0] if fused is not None else layer.outputs[0]


def _concat_inputs_to_share(model: onnx.ModelProto, layer: LayerPlan) -> list[str]:
    """The Concat inputs that take the output's quantizer: those nothing else reads, and whose
    activation clamp (if any) every input has.

    The output's range covers every input's, so an input read only by the
    Concat loses nothing by sharing it (and needs no requantization). An input
    that another op or a graph output also reads keeps its own quantizer and is
    requantized into the Concat: tied, a small-range input would reach its other
    readers at the whole Concat's coarse scale (a Relu map concatenated with a
    100x larger branch: -0.4 dB SQNR where its own range gives 40 dB). So does a
    Relu/Clip output (directly or through data movement) beside an input without
    that clamp: the clamp is folded into its quantizer's range, which the
    Concat's wider range would drop (a Relu map beside a signed conv output: its
    negatives came back, 0 dB SQNR on it, 6 dB on the model's output).
    """
    readers = consumers(model)
    outputs = set(graph_output_names(model))
    clamps = {name: _folded_clamp(model, name) for name in layer.inputs}
    common = clamps[layer.inputs[0]] if len(set(clamps.values())) == 1 else None
    return [name for name in layer.inputs
            if len(readers.get(name, [])) == 1 and name not in outputs and clamps[name] in (None, common)]


def _folded_clamp(model: onnx.ModelProto, name: str) -> tuple | None:
    """The bounds of the Relu/Clip whose output ``name`` is (through data movement); None if none."""
    made_by = producers(model)
    node = made_by.get(name)
    while node is not None and node.op_type in PASS_THROUGH_OPS and node.input:
        node = made_by.get(node.input[0])
    if node is None or node.op_type not in FUSIBLE_ACTIVATIONS:
        return None
    return clamp_bounds(model, node)


def activation_groups(model: onnx.ModelProto, plan: QuantPlan, *, integer_only: bool = False) -> list[ActivationGroup]:
    """Which activation tensors get a quantizer, grouped by shared quantizer."""
    sets = DisjointSets()
    find, union = sets.find, sets.union

    bits: dict[str, int] = {}
    quantized_readers: set[str] = set()  # tensors read by a quantized layer
    for layer in plan.layers.values():
        for name in layer.inputs:
            find(name)
            bits[name] = max(bits.get(name, 0), layer.a_bits)
            quantized_readers.add(name)
        if layer.op_type == "Concat":
            for name in _concat_inputs_to_share(model, layer):
                union(name, _layer_output(model, layer))

    # Data movement passes a quantized tensor's quantizer on to its output,
    # backwards from quantized readers and forwards from quantized producers.
    produced_quantized = {_layer_output(model, layer) for layer in plan.layers.values()}
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type not in PASS_THROUGH_OPS or not node.input:
                continue
            source, result = node.input[0], node.output[0]
            forward = integer_only and (source in produced_quantized or source in quantized_readers)
            if (result in quantized_readers or forward) and initializer_array(model, source) is None:
                if find(source) != find(result):
                    union(source, result)
                    changed = True
                for name in (source, result):
                    if name not in quantized_readers:
                        quantized_readers.add(name)
                        changed = True

    # A layer's output is quantized when something quantized reads it.
    for layer in plan.layers.values():
        output = _layer_output(model, layer)
        if integer_only:
            find(output)

    result = []
    for members in sets.groups():
        width = max([bits.get(name, 0) for name in members] + [0]) or plan.a_bits
        result.append(ActivationGroup(sorted(members), width))
    result.sort(key=lambda group: group.tensors[0])
    return result


def tensors_to_calibrate(model: onnx.ModelProto, plan: QuantPlan, *, integer_only: bool = False) -> list[str]:
    """Activation tensors whose float ranges :func:`fit_activation_quantizers` needs."""
    return sorted(name for group in activation_groups(model, plan, integer_only=integer_only)
                  for name in group.tensors)


def fit_activation_quantizers(
    model: onnx.ModelProto,
    plan: QuantPlan,
    ranges: dict[str, tuple[float, float]],
    *,
    integer_only: bool = False,
) -> None:
    """Fill ``plan.tensors`` with per-tensor activation quantizers from ``ranges``."""
    for group in activation_groups(model, plan, integer_only=integer_only):
        known = [ranges[name] for name in group.tensors if name in ranges]
        if not known:
            raise KeyError(f"no calibration range for {group.tensors[0]}")
        low = min(0.0, min(r[0] for r in known))
        high = max(0.0, max(r[1] for r in known))
        for name in group.tensors:
            plan.tensors[name] = activation_quant(name, low, high, group.bits, plan.activation_signed)


def activation_quant(name: str, low: float, high: float, bits: int, signed: bool) -> TensorQuant:
    """Asymmetric per-tensor quantizer covering ``[low, high]`` (which must contain 0)."""
    qmin, qmax = int_range(bits, signed)
    span = float(high) - float(low)
    scale = np.float32(span / (qmax - qmin)) if span > 0 else np.float32(1.0)
    zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
    return TensorQuant(name=name, role="activation", bits=bits, signed=signed,
                       scale=[float(scale)], zero_point=[zero_point],
                       range_min=float(low), range_max=float(high))


def quantize_model(
    model: onnx.ModelProto,
    plan: QuantPlan,
    ranges: dict[str, tuple[float, float]] | None = None,
    *,
    integer_only: bool = False,
) -> onnx.ModelProto:
    """The QDQ model for ``plan`` (see the module docstring)."""
    if ranges is not None:
        fit_activation_quantizers(model, plan, ranges, integer_only=integer_only)
    plan_weight_grids(model, plan)  # which weights are block-wise decides the opset
    storage = {name: weight_storage_bits(model, plan, layer) for name, layer in plan.layers.items() if layer.w_bits}
    qdq = _with_opset(model, plan, storage)
    new_name = NameAllocator(qdq)
    for layer in plan.layers.values():
        _fuse_activation(qdq, plan, layer)
    for name, layer in plan.layers.items():
        if layer.w_bits:
            _quantize_weight_and_bias(qdq, plan, layer, new_name, storage[name])
    for tq in list(plan.tensors.values()):
        if tq.role == "activation":
            _insert_activation_pair(qdq, tq, new_name)
    _drop_unused_initializers(qdq)
    topological_sort(qdq)
    del qdq.graph.value_info[:]
    return infer_shapes(qdq)


def _fuse_activation(model: onnx.ModelProto, plan: QuantPlan, layer: LayerPlan) -> None:
    fused = fused_activation(model, layer)
    if fused is None or fused.output[0] not in plan.tensors:
        return  # only an output quantizer can clamp in the activation's place
    producer = producers(model)[layer.outputs[0]]
    producer.output[0] = fused.output[0]
    model.graph.node.remove(fused)
    layer.info["fused_activation"] = fused.op_type
    layer.info["output"] = fused.output[0]


def _layer_node(model: onnx.ModelProto, layer: LayerPlan) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == layer.node)


def _weight_quant(model: onnx.ModelProto, plan: QuantPlan, layer: LayerPlan) -> TensorQuant:
    """The plan's entry for the layer's weight, or a new one on the shared grid (minmax scales)."""
    tq = plan.tensors.get(layer.weight)
    if tq is not None and tq.bits == layer.w_bits:
        return tq
    weight = initializer_array(model, layer.weight)
    out_axis = weight_output_axis(layer.op_type, weight.ndim, attribute(_layer_node(model, layer), "transB", 0))
    tq = planned_weight_quant(layer.weight, weight, layer.op_type, out_axis, layer.w_bits, plan.weight_block_size)
    plan.tensors[layer.weight] = tq
    return tq


def _quantizer_bits(plan: QuantPlan, name: str | None) -> int | None:
    tq = plan.tensors.get(name) if name else None
    return tq.bits if tq is not None and tq.role == "activation" else None


def weight_storage_bits(model: onnx.ModelProto, plan: QuantPlan, layer: LayerPlan) -> int:
    """Width of the element type the layer's weight is exported as: ``w_bits``, except for 2-bit
    weights onnxruntime cannot run as INT2 in this layer's context, which go into an INT4 container.

    Needs the plan's activation quantizers (they decide onnxruntime's fusions).
    For 2-bit weights records the choice in ``layer.info``: ``weight_storage``
    (what and why) and ``weight_storage_bits`` (what the stored bytes count).
    """
    if layer.w_bits != 2:
        return layer.w_bits
    block_wise = _weight_quant(model, plan, layer).block_wise
    input_bits = _quantizer_bits(plan, layer.inputs[0] if layer.inputs else None)
    output_bits = _quantizer_bits(plan, _layer_output(model, layer))
    form = int2_weight_form(layer.op_type, block_wise, input_bits, output_bits)
    if form == INT2:
        layer.info.update(weight_storage="int2", weight_storage_bits=2)
        return 2
    if form == INT2_ONE_BLOCK:
        layer.info.update(weight_storage=f"int2, one DequantizeLinear block per output channel (onnxruntime fuses "
                                         f"{layer.op_type} with a per-axis weight and 8-bit activations into a "
                                         f"kernel that refuses int2, not with a block-wise one)",
                          weight_storage_bits=2, weight_one_block=True)
        return 2
    layer.info.update(weight_storage=f"int{INT2_CONTAINER_BITS} container (onnxruntime fuses {layer.op_type} with "
                                     f"8-bit activations into a kernel that refuses int2)",
                      weight_storage_bits=INT2_CONTAINER_BITS)
    return INT2_CONTAINER_BITS


def plan_weight_grids(model: onnx.ModelProto, plan: QuantPlan) -> int:
    """Record a block-wise quantizer for every layer that gets one; returns how many.

    Run before the rounding passes, so that GPTQ and bias correction (which
    follow a weight's plan entry) round onto the blocks QDQ insertion exports.
    Per-channel weights need no entry in advance: the passes derive the same
    grid themselves.
    """
    count = 0
    for layer in plan.layers.values():
        if not layer.w_bits or not layer.weight or not plan.weight_block_size:
            continue
        existing = plan.tensors.get(layer.weight)
        tq = _weight_quant(model, plan, layer)
        if not tq.block_wise:
            if existing is None:
                del plan.tensors[layer.weight]
            continue
        layer.info["weight_block_size"] = tq.block_size
        count += 1
    return count


def _quantize_weight_and_bias(model: onnx.ModelProto, plan: QuantPlan, layer: LayerPlan, new_name,
                              storage_bits: int) -> None:
    node = _layer_node(model, layer)
    weight = initializer_array(model, layer.weight)
    tq = _weight_quant(model, plan, layer)
    input_quant = plan.tensors.get(layer.inputs[0])
    bias = initializer_array(model, layer.bias) if layer.bias else None
    if tq.block_wise:
        layer.info["weight_block_size"] = tq.block_size
        input_quant = None  # one scale per output channel is needed for an int32 bias: it stays float
    if input_quant is not None and bias is not None:
        _widen_scales_for_int32_bias(tq, bias, float(input_quant.scale[0]))
    q_weight = quantize_weight(weight, tq.scale_array(), tq.axis, tq.bits, tq.block_size,
                               tq.zero_point_array() if tq.block_wise else None)
    one_block_axis = 1 - tq.axis if layer.info.get("weight_one_block") else None
    node.input[1] = _dequantized_initializer(model, layer.weight, q_weight, tq, new_name, storage_bits,
                                             one_block_axis)

    if input_quant is None or bias is None:
        return  # no bias, the input stays float, or block-wise weights: the bias stays float too
    bias_scale = (np.float32(input_quant.scale[0]) * tq.scale_array()).astype(np.float32)
    bias_scale = np.broadcast_to(bias_scale, bias.shape).astype(np.float32)
    lo, hi = int_range(32, True)
    q_bias = np.clip(np.round(bias.astype(np.float64) / bias_scale), lo, hi).astype(np.int32)
    bias_quant = TensorQuant(name=layer.bias, role="bias", bits=32, signed=True,
                             scale=[float(s) for s in bias_scale], zero_point=[0] * bias.size,
                             axis=0, range_min=float(bias.min()), range_max=float(bias.max()))
    plan.tensors[layer.bias] = bias_quant
    node.input[2] = _dequantized_initializer(model, layer.bias, q_bias, bias_quant, new_name)


def _widen_scales_for_int32_bias(weight_quant: TensorQuant, bias: np.ndarray, input_scale: float) -> None:
    """Raise the weight scale of channels whose bias would overflow int32 at ``sx * sw``.

    A channel whose weights are (almost) all zero, e.g. a dead channel after
    BatchNorm folding, gets a scale near 1e-18 and its bias ``b / (sx * sw)``
    saturates int32. Any scale large enough represents such weights as well, so
    the scale is raised until the bias fits with a margin of 2x.
    """
    scale = weight_quant.scale_array().astype(np.float64)
    limit = (2**31 - 1) / 2
    needed = np.abs(bias.astype(np.float64).reshape(-1)) / (input_scale * limit)
    if scale.size == 1 and needed.size > 1:
        needed = np.array([needed.max()])
    widened = np.maximum(scale, needed.astype(np.float32))
    if np.any(widened > scale):
        weight_quant.scale = [float(np.float32(value)) for value in widened]


def _integer_initializer(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """``values`` as an ONNX tensor of the ``bits``-wide integer type (sub-byte types packed in raw_data)."""
    sub_byte = _SUB_BYTE_DTYPES.get((bits, signed))
    if sub_byte is not None:
        return numpy_helper.from_array(np.asarray(values).astype(sub_byte), name)
    return helper.make_tensor(name, _ONNX_INT_TYPES[(bits, signed)], np.shape(values),
                              np.asarray(values).flatten().tolist())


def _dequantized_initializer(model, name: str, q_value: np.ndarray, tq: TensorQuant, new_name,
                             storage_bits: int | None = None, one_block_axis: int | None = None) -> str:
    """Store ``q_value`` as an integer initializer behind a DequantizeLinear; return its output.

    ``storage_bits``: width of the stored element type (default ``tq.bits``;
    wider for 2-bit values in an int4 container). ``one_block_axis``: write the
    per-channel grid of a matrix as block-wise along this (reduction) axis, one
    block spanning it (:data:`INT2_ONE_BLOCK`).
    """
    storage_bits = storage_bits or tq.bits
    q_name = new_name(f"{name}_quantized")
    scale_name, zp_name, out_name = new_name(f"{name}_scale"), new_name(f"{name}_zero_point"), new_name(f"{name}_dequantized")
    if (storage_bits, tq.signed) in _SUB_BYTE_DTYPES:
        model.graph.initializer.append(_integer_initializer(q_name, q_value, storage_bits, tq.signed))
    else:
        set_initializer(model, q_name, q_value)
    per_channel = tq.axis is not None and (len(tq.scale) > 1 or tq.block_wise)
    scale = tq.scale_array() if per_channel else np.float32(tq.scale[0])
    attrs = {"axis": tq.axis} if per_channel else {}
    if tq.block_wise:
        attrs["block_size"] = tq.block_size
    elif one_block_axis is not None:  # the per-channel scales along tq.axis, size 1 on the blocked axis
        scale = scale.reshape([-1 if axis == tq.axis else 1 for axis in range(q_value.ndim)])
        attrs = {"axis": one_block_axis, "block_size": q_value.shape[one_block_axis]}
    set_initializer(model, scale_name, scale)
    zero = tq.zero_point_array() if tq.block_wise else np.zeros(scale.shape, dtype=np.int64)
    model.graph.initializer.append(_integer_initializer(zp_name, zero.reshape(scale.shape), storage_bits, tq.signed))
    model.graph.node.append(helper.make_node(
        "DequantizeLinear", [q_name, scale_name, zp_name], [out_name], name=new_name(f"{name}_DequantizeLinear"), **attrs))
    return out_name


def _insert_activation_pair(model: onnx.ModelProto, tq: TensorQuant, new_name) -> None:
    """Route every reader of tensor ``tq.name`` through Q -> DQ."""
    graph = model.graph
    name = tq.name
    elem_type = _ONNX_INT_TYPES[(tq.bits, tq.signed)]
    scale_name, zp_name = new_name(f"{name}_scale"), new_name(f"{name}_zero_point")
    set_initializer(model, scale_name, np.float32(tq.scale[0]))
    graph.initializer.append(helper.make_tensor(zp_name, elem_type, (), [tq.zero_point[0]]))
    quantized, dequantized = new_name(f"{name}_quantized"), new_name(f"{name}_dequantized")
    source = name
    if name in graph_output_names(model):
        # Keep the graph output's name: the producer writes a new name instead.
        source = new_name(f"{name}_float")
        for node in graph.node:
            for index, output in enumerate(node.output):
                if output == name:
                    node.output[index] = source
        dequantized = name
    else:
        for node in graph.node:
            for index, input_name in enumerate(node.input):
                if input_name == name:
                    node.input[index] = dequantized
    graph.node.append(helper.make_node("QuantizeLinear", [source, scale_name, zp_name], [quantized],
                                       name=new_name(f"{name}_QuantizeLinear")))
    graph.node.append(helper.make_node("DequantizeLinear", [quantized, scale_name, zp_name], [dequantized],
                                       name=new_name(f"{name}_DequantizeLinear")))


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Float weights replaced by their quantized copies are no longer read."""
    used = {name for node in model.graph.node for name in node.input}
    used.update(graph_output_names(model))
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _with_opset(model: onnx.ModelProto, plan: QuantPlan, weight_storage: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` at an opset whose Q/DQ ops accept every element type the plan uses
    (``weight_storage``: the stored width of each layer's weight, by layer name)."""
    widths = list(weight_storage.values()) + [layer.a_bits for layer in plan.layers.values()]
    needed = max([_OPSET_FOR_BITS.get(bits, 21) for bits in widths] + [13])
    if any(tq.block_wise for tq in plan.tensors.values()):
        needed = max(needed, _OPSET_FOR_BLOCKS)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if opset_version(copy) < needed:
        copy = onnx.version_converter.convert_version(copy, needed)
    copy.ir_version = min(copy.ir_version, 10)
    return copy


def dequantized_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """Float value of a DequantizeLinear'd initializer (for reports and tests)."""
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == name:
            q = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[0]))
            scale = initializer_array(model, node.input[1])
            axis = attribute(node, "axis", 1)
            block_size = attribute(node, "block_size", 0)
            if block_size:
                zero = initializer_array(model, node.input[2]) if len(node.input) > 2 else None
                return dequantize_weight(q, scale, axis, block_size, zero)
            if scale.ndim == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
            return q.astype(np.float32) * scale
    return None
