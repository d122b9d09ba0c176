"""Weighted linear layers as one uniform view, plus what the weight passes share.

The equivalence transforms (equalize, smooth, rotate) and the rounding passes
(gptq, bias_correction) all ask the same questions of a Conv / Gemm / MatMul
with a constant weight: which axis of the weight is the output channel, which
the input channel, where is the bias, how to view the weight as an
``[out, K]`` matrix in im2col column order.  :class:`LinearLayer` answers them
once; :func:`find_linear_layers` says (in the debug log), for every candidate
node, why it is not such a layer.

Also here: marking a model as transformed (idempotency) and recording the
runtime ops a transform had to insert (with their cost).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from compiler.graph import attribute, consumers, initializer_array, set_initializer

log = logging.getLogger(__name__)

APPLIED_KEY = "edgeq.applied"  # metadata_props entry: JSON list of applied transforms
ONLINE_OPS_KEY = "edgeq.online_ops"  # metadata_props entry: JSON list of inserted runtime ops


# -- idempotency markers and inserted ops --------------------------------------------
def _metadata(model: onnx.ModelProto, key: str) -> str | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def applied_transforms(model: onnx.ModelProto) -> list[dict]:
    """The transforms already applied to ``model`` (recorded by :func:`mark_applied`)."""
    return json.loads(_metadata(model, APPLIED_KEY) or "[]")


def is_applied(model: onnx.ModelProto, name: str) -> bool:
    return any(entry.get("pass") == name for entry in applied_transforms(model))


def mark_applied(model: onnx.ModelProto, name: str, **facts) -> None:
    """Record in the model that transform ``name`` ran (so it refuses to run twice)."""
    entries = applied_transforms(model)
    entries.append({"pass": name, **facts})
    _set_metadata(model, APPLIED_KEY, json.dumps(entries, sort_keys=True))


def online_ops(model: onnx.ModelProto) -> list[dict]:
    """Runtime ops inserted by transforms: node, op_type, macs_per_row, reason.

    They exist only to make the layers after them quantize well: the pipeline
    should keep them in float (they are cheap next to the layer they serve) and
    the cost model should count ``macs_per_row`` per activation row.
    """
    return json.loads(_metadata(model, ONLINE_OPS_KEY) or "[]")


def add_online_op(model: onnx.ModelProto, node: str, op_type: str, macs_per_row: int, reason: str) -> None:
    entries = online_ops(model)
    entries.append({"node": node, "op_type": op_type, "macs_per_row": int(macs_per_row), "reason": reason})
    _set_metadata(model, ONLINE_OPS_KEY, json.dumps(entries, sort_keys=True))


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


# -- the uniform layer view ----------------------------------------------------------------
@dataclass
class LinearLayer:
    """A Conv / Gemm / MatMul whose weight is an initializer.

    ``weight`` is the initializer name; ``out_axis``/``in_axis`` the weight's
    output- and input-channel axes.  ``bias`` is the initializer holding the
    bias (Conv/Gemm input, or the constant operand of an ``Add`` right after a
    MatMul -- then ``bias_node`` is that Add), or None.  Convolutions are plain
    (group 1) or depthwise with multiplier 1.
    """

    node: onnx.NodeProto
    weight: str
    out_axis: int
    in_axis: int
    group: int = 1
    bias: str | None = None
    bias_node: onnx.NodeProto | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def input(self) -> str:
        return self.node.input[0]

    @property
    def output(self) -> str:
        """The tensor carrying ``x W + b`` (the bias Add's output for MatMul+Add)."""
        return (self.bias_node or self.node).output[0]

    @property
    def is_depthwise(self) -> bool:
        return self.op_type == "Conv" and self.group > 1

    def weight_array(self, model: onnx.ModelProto) -> np.ndarray:
        return initializer_array(model, self.weight)

    def bias_array(self, model: onnx.ModelProto) -> np.ndarray | None:
        return None if self.bias is None else initializer_array(model, self.bias).reshape(-1)

    def matrix(self, model: onnx.ModelProto) -> np.ndarray:
        """The weight as ``[out_channels, K]`` with K in im2col order (in, kh, kw)."""
        weight = self.weight_array(model).astype(np.float32)
        return np.moveaxis(weight, self.out_axis, 0).reshape(weight.shape[self.out_axis], -1)

    def from_matrix(self, model: onnx.ModelProto, matrix: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`: an ``[out, K]`` matrix back in the weight's layout."""
        shape = list(self.weight_array(model).shape)
        moved = [shape[self.out_axis]] + [d for i, d in enumerate(shape) if i != self.out_axis % len(shape)]
        return np.moveaxis(matrix.reshape(moved), 0, self.out_axis).astype(np.float32)


def _match_linear(node: onnx.NodeProto, inits: set[str], users) -> LinearLayer | str:
    """The layer view of ``node``, or the reason it is not one."""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type in ("Conv", "Gemm"):
        if len(node.input) < 2 or node.input[1] not in inits:
            return f"{node.op_type} weight is not an initializer"
        if bias is not None and bias not in inits:
            return f"{node.op_type} bias is not an initializer"
    if node.op_type == "Conv":
        return LinearLayer(node, node.input[1], 0, 1, int(attribute(node, "group", 1)), bias)
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return "Gemm with transA"
        if float(attribute(node, "alpha", 1.0)) != 1.0 or float(attribute(node, "beta", 1.0)) != 1.0:
            return "Gemm with alpha/beta != 1 (canonicalize folds them)"
        trans_b = int(attribute(node, "transB", 0))
        return LinearLayer(node, node.input[1], 0 if trans_b else 1, 1 if trans_b else 0, 1, bias)
    if node.op_type == "MatMul":
        if node.input[1] not in inits:
            return "MatMul right operand is not an initializer (activation x activation)"
        layer = LinearLayer(node, node.input[1], 1, 0)
        next_nodes = users.get(node.output[0], [])
        if len(next_nodes) == 1 and next_nodes[0].op_type == "Add":
            add = next_nodes[0]
            other = [name for name in add.input if name != node.output[0]]
            if len(other) == 1 and other[0] in inits:
                layer.bias, layer.bias_node = other[0], add
        return layer
    return f"{node.op_type} is not a linear layer"


def find_linear_layers(model: onnx.ModelProto) -> dict[str, LinearLayer]:
    """Output tensor of each Conv/Gemm/MatMul node -> its layer view; misses are logged."""
    inits = {init.name for init in model.graph.initializer}
    users = consumers(model)
    layers: dict[str, LinearLayer] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        match = _match_linear(node, inits, users)
        if isinstance(match, str):
            log.debug("%s: not a weighted layer: %s", node.name or node.output[0], match)
            continue
        weight = match.weight_array(model)
        if match.op_type == "MatMul":
            if weight.ndim != 2:
                log.debug("%s: not a weighted layer: MatMul weight is %d-D", match.name, weight.ndim)
                continue
            if match.bias is not None and initializer_array(model, match.bias).size != weight.shape[1]:
                match.bias, match.bias_node = None, None
        if match.op_type == "Conv" and match.group > 1 and (weight.shape[1] != 1 or weight.shape[0] != match.group):
            log.debug("%s: not a weighted layer: grouped conv that is not depthwise", match.name)
            continue
        layers[node.output[0]] = match
    return layers


def _channel_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return shape


def scale_output_channels(model: onnx.ModelProto, layer: LinearLayer, factor: np.ndarray) -> None:
    """Multiply output channel c of ``layer`` (weight and bias) by ``factor[c]``."""
    weight = layer.weight_array(model)
    set_initializer(model, layer.weight, (weight * factor.reshape(_channel_shape(weight.ndim, layer.out_axis))).astype(weight.dtype))
    if layer.bias is not None:
        bias = initializer_array(model, layer.bias)
        set_initializer(model, layer.bias, (bias * factor.reshape(bias.shape)).astype(bias.dtype))


def input_axis(layer: LinearLayer) -> int:
    """The weight axis indexed by the input channel (a depthwise conv: its only channel axis)."""
    return layer.out_axis if layer.is_depthwise else layer.in_axis


def scale_input_channels(model: onnx.ModelProto, layer: LinearLayer, factor: np.ndarray) -> None:
    """Multiply the weight of input channel c by ``factor[c]``."""
    weight = layer.weight_array(model)
    set_initializer(model, layer.weight, (weight * factor.reshape(_channel_shape(weight.ndim, input_axis(layer)))).astype(weight.dtype))


def in_channels(model: onnx.ModelProto, layer: LinearLayer) -> int:
    return layer.weight_array(model).shape[input_axis(layer)]


def out_channels(model: onnx.ModelProto, layer: LinearLayer) -> int:
    return layer.weight_array(model).shape[layer.out_axis]


def add_to_bias(model: onnx.ModelProto, layer: LinearLayer, delta: np.ndarray, suffix: str) -> bool:
    """``bias += delta`` (per output channel); a Conv/Gemm without bias gets one. False: impossible."""
    if layer.bias is None:
        if layer.op_type not in ("Conv", "Gemm"):
            return False
        name = f"{layer.name}_{suffix}"
        set_initializer(model, name, np.zeros(out_channels(model, layer), dtype=np.float32))
        while len(layer.node.input) < 3:
            layer.node.input.append("")
        layer.node.input[2] = name
        layer.bias = name
    bias = initializer_array(model, layer.bias)
    set_initializer(model, layer.bias, (bias + np.asarray(delta).reshape(bias.shape)).astype(bias.dtype))
    return True


def single_consumer_chain(
    model: onnx.ModelProto, tensor: str, through: Iterable[str]
) -> tuple[list[onnx.NodeProto], onnx.NodeProto | None, str]:
    """Follow ``tensor`` through single-consumer ops whose type is in ``through``.

    Returns (the ops passed, the first other consumer or None, the reason when None).
    A tensor that is a graph output or has several consumers stops the walk.
    """
    users = consumers(model)
    outputs = {value.name for value in model.graph.output}
    passed: list[onnx.NodeProto] = []
    through = set(through)
    while True:
        if tensor in outputs:
            return passed, None, f"{tensor} is a graph output"
        next_nodes = users.get(tensor, [])
        if len(next_nodes) != 1:
            return passed, None, f"{tensor} has {len(next_nodes)} consumers"
        node = next_nodes[0]
        if node.op_type in through and node.input[0] == tensor:
            passed.append(node)
            tensor = node.output[0]
            continue
        return passed, node, ""


def conv_patches(layer: LinearLayer, model: onnx.ModelProto):
    """How ``layer`` (a Conv) reads its input, for ``compiler.calibrate``'s im2col statistics."""
    from compiler.calibrate import ConvPatches

    weight_shape = layer.weight_array(model).shape
    if attribute(layer.node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise ValueError(f"{layer.name}: auto_pad is not supported (canonicalize makes pads explicit)")
    return ConvPatches(
        kernel=(weight_shape[2], weight_shape[3]),
        strides=tuple(attribute(layer.node, "strides", [1, 1])),
        pads=tuple(attribute(layer.node, "pads", [0, 0, 0, 0])),
        dilations=tuple(attribute(layer.node, "dilations", [1, 1])),
        group=layer.group,
    )


def planned_layers(model: onnx.ModelProto, plan) -> list[tuple[LinearLayer, int]]:
    """(layer, weight bits) for every linear layer the plan quantizes.

    With layers in ``plan.layers`` (after allocation) their ``w_bits`` are used
    and layers the plan does not list stay float; with an empty plan every
    linear layer gets ``plan.w_bits``.
    """
    layers = list(find_linear_layers(model).values())
    if not plan.layers:
        return [(layer, plan.w_bits) for layer in layers]
    chosen = []
    for layer in layers:
        entry = plan.layers.get(layer.name)
        if entry is None or not entry.w_bits:
            continue
        if entry.weight not in (None, layer.weight):
            log.debug("%s: plan weight %s is not the layer's weight %s", layer.name, entry.weight, layer.weight)
            continue
        chosen.append((layer, entry.w_bits))
    return chosen
