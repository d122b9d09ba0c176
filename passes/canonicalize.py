"""Canonicalize a float model so every later pass sees the same shapes of graph.

Requires: a valid ONNX model (any opset >= 7 the version converter can lift).
Guarantees:
  * default-domain opset >= 13 and IR version <= 10 (onnxruntime loads it);
  * Constant nodes become initializers; nodes whose inputs are all constant are
    folded into initializers (the reference evaluator computes them);
  * BatchNormalization directly after a Conv or Gemm (sole consumer) is folded
    into that layer's weight and bias;
  * Identity and inference-mode Dropout are removed; a zero Pad feeding only a
    Conv becomes that Conv's padding;
  * a Reshape whose target shape is computed from tensor shapes (PyTorch's
    ``x.view(x.size(0), -1)`` exports as Shape -> Gather -> Unsqueeze ->
    Concat) gets a constant target where every entry is known: a static
    dimension, or 0 ("keep this dimension") for a dynamic one read from the
    same position of a tensor whose dimension there is the data's own -- so
    integer-only targets are not left with a float Shape computation;
  * unused nodes and initializers are dropped, nodes are topologically sorted
    and every node has a unique, stable name (existing names are kept);
  * shapes are inferred (value_info filled in).
Float function: preserved (to float rounding of the BN fold).
The caller's model is never modified: a copy is returned.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import shape_inference, version_converter

from compiler.errors import EdgeqError
from compiler.graph import (
    attribute,
    consumers,
    graph_output_names,
    initializer_array,
    opset_version,
    producers,
    set_attribute,
    set_initializer,
    topological_sort,
)

log = logging.getLogger(__name__)

MIN_OPSET = 13
MAX_IR_VERSION = 10  # onnxruntime refuses IR versions it does not know
# Folding these would only duplicate data or lose dynamic behaviour.
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}
_MAX_FOLDED_ELEMENTS = 16 * 1024 * 1024


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a canonical copy of ``model`` (see the module docstring)."""
    model = _copy(model)
    model = _upgrade_opset(model)
    _constants_to_initializers(model)
    _remove_passthrough_nodes(model)
    _fold_constants(model)
    _fold_batchnorm(model)
    _fold_zero_pad_into_conv(model)
    _fold_reshape_shapes(model)
    _remove_dead_code(model)
    topological_sort(model)
    _name_nodes(model)
    model = infer_shapes(model)
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that tolerates graphs onnx cannot fully infer."""
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001 - inference is best effort
        log.debug("shape inference failed: %s", error)
        return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    version = opset_version(model)
    if version == 0:
        raise EdgeqError("model imports no default-domain (ai.onnx) opset")
    if version < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:  # noqa: BLE001
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EdgeqError(
                f"cannot upgrade opset {version} to {MIN_OPSET}: {first_line}"
            ) from None
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = initializer_array(model, node.output[0])
            if value is not None:
                set_initializer(model, node.output[0], value)
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` read ``new`` instead."""
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _remove_passthrough_nodes(model: onnx.ModelProto) -> None:
    """Drop Identity and Dropout (inference mode: output 0 == input 0)."""
    graph = model.graph
    outputs = set(graph_output_names(model))
    for node in list(graph.node):
        if node.op_type not in ("Identity", "Dropout"):
            continue
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            if consumers(model).get(node.output[1]) or node.output[1] in outputs:
                log.debug("keep %s: its mask output is used", node.name)
                continue
        source, result = node.input[0], node.output[0]
        if result in outputs:
            if source in outputs or any(v.name == source for v in graph.input):
                log.debug("keep %s: it connects a graph input/output to an output", node.name)
                continue
            # Keep the output name: let the producer write it directly.
            for producer in graph.node:
                for index, name in enumerate(producer.output):
                    if name == source:
                        producer.output[index] = result
            _rename_input(model, source, result)
            if any(init.name == source for init in graph.initializer):
                log.debug("keep %s: output is a constant", node.name)
                continue
        else:
            _rename_input(model, result, source)
        graph.node.remove(node)


def _fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate nodes whose inputs are all initializers with the reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    constant = {init.name for init in graph.initializer}
    folded_any = True
    while folded_any:
        folded_any = False
        for node in list(graph.node):
            if node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx"):
                continue
            inputs = [name for name in node.input if name]
            if not inputs or not all(name in constant for name in inputs):
                continue
            if any(out in graph_output_names(model) for out in node.output):
                continue
            values = {name: initializer_array(model, name) for name in inputs}
            if any(v.size > _MAX_FOLDED_ELEMENTS for v in values.values()):
                continue
            single = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(
                        name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype),
                        values[name].shape) for name in inputs],
                    [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.UNDEFINED, None)
                     for out in node.output if out],
                ),
                opset_imports=list(model.opset_import),
            )
            try:
                results = ReferenceEvaluator(single).run(None, values)
            except Exception as error:  # noqa: BLE001 - leave the node as it is
                log.debug("cannot fold %s (%s): %s", node.name, node.op_type, error)
                continue
            for name, value in zip([o for o in node.output if o], results, strict=True):
                set_initializer(model, name, np.asarray(value))
                constant.add(name)
            graph.node.remove(node)
            folded_any = True


def _fold_batchnorm(model: onnx.ModelProto) -> None:
    graph = model.graph
    readers = consumers(model)
    outputs = set(graph_output_names(model))
    by_output = {out: node for node in graph.node for out in node.output}
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        layer = by_output.get(bn.input[0])
        reason = _bn_fold_blocker(model, bn, layer, readers, outputs)
        if reason:
            log.debug("BatchNormalization %s not folded: %s", bn.name, reason)
            continue
        gamma, beta, mean, var = (initializer_array(model, name) for name in bn.input[1:5])
        epsilon = attribute(bn, "epsilon", 1e-5)
        factor = gamma / np.sqrt(var + epsilon)
        weight = initializer_array(model, layer.input[1]).astype(np.float64)
        out_channels = factor.shape[0]
        bias = (initializer_array(model, layer.input[2]).astype(np.float64)
                if len(layer.input) > 2 and layer.input[2] else np.zeros(out_channels))
        if layer.op_type == "Conv":
            weight = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        elif attribute(layer, "transB", 0):  # Gemm, B is [N, K]
            weight = weight * factor.reshape(-1, 1)
        else:  # Gemm, B is [K, N]
            weight = weight * factor.reshape(1, -1)
        bias = (bias - mean) * factor + beta
        dtype = initializer_array(model, layer.input[1]).dtype
        weight_name = f"{layer.name or layer.output[0]}.weight_bnfolded"
        bias_name = f"{layer.name or layer.output[0]}.bias_bnfolded"
        set_initializer(model, weight_name, weight.astype(dtype))
        set_initializer(model, bias_name, bias.astype(dtype))
        layer.input[1] = weight_name
        if len(layer.input) > 2:
            layer.input[2] = bias_name
        else:
            layer.input.append(bias_name)
        layer.output[0] = bn.output[0]
        graph.node.remove(bn)


def _fold_zero_pad_into_conv(model: onnx.ModelProto) -> None:
    """Pad(constant 0) on the spatial axes feeding only a Conv becomes the Conv's own pads.

    TensorFlow-style "SAME" padding exports as an explicit Pad (EfficientNet-
    Lite has 17); in a QDQ model onnxruntime runs each one as dequantize, float
    Pad, quantize. Conv pads with zeros too, so the fold is exact.
    """
    graph = model.graph
    readers = consumers(model)
    outputs = set(graph_output_names(model))
    for pad in list(graph.node):
        if pad.op_type != "Pad":
            continue
        reason = _pad_fold_blocker(model, pad, readers, outputs)
        if reason:
            log.debug("Pad %s not folded: %s", pad.name, reason)
            continue
        conv = readers[pad.output[0]][0]
        pads = [int(v) for v in initializer_array(model, pad.input[1])]
        rank = len(pads) // 2
        spatial_begin, spatial_end = pads[2:rank], pads[rank + 2:]
        conv_pads = list(attribute(conv, "pads", [0] * (2 * (rank - 2))))
        half = len(conv_pads) // 2
        merged = ([a + b for a, b in zip(conv_pads[:half], spatial_begin, strict=True)]
                  + [a + b for a, b in zip(conv_pads[half:], spatial_end, strict=True)])
        set_attribute(conv, "pads", merged)
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)


# A Reshape target entry, as far as it is known: an int, or (tensor, axis) -- that tensor's
# dimension there, not known statically.
_ShapeEntry = int | tuple[str, int]


def _fold_reshape_shapes(model: onnx.ModelProto) -> None:
    """A Reshape's computed target shape becomes an initializer where every entry is known (see the
    module docstring); anything not understood leaves the Reshape as it is."""
    inferred = infer_shapes(model)
    dims = {value.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in value.type.tensor_type.shape.dim]
            for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
            if value.type.tensor_type.HasField("shape")}
    made = producers(model)
    for node in model.graph.node:
        if node.op_type != "Reshape" or initializer_array(model, node.input[1]) is not None:
            continue
        entries = _shape_entries(model, made, dims, node.input[1])
        if entries is None:
            log.debug("Reshape %s keeps its computed shape: not a known shape expression", node.name)
            continue
        data_dims = dims.get(node.input[0], [])
        target = []
        for position, entry in enumerate(entries):
            if isinstance(entry, int):
                target.append(entry)
                continue
            tensor, axis = entry
            own = data_dims[position] if position < len(data_dims) else None
            if attribute(node, "allowzero", 0) or axis != position or own is None or own != dims[tensor][axis]:
                log.debug("Reshape %s keeps its computed shape: entry %d is %s's dim %d", node.name, position,
                          tensor, axis)
                break
            target.append(0)
        else:
            name = f"{node.name or node.output[0]}_shape"
            set_initializer(model, name, np.asarray(target, dtype=np.int64))
            node.input[1] = name


def _shape_entries(model: onnx.ModelProto, made: dict, dims: dict, name: str) -> list[_ShapeEntry] | None:
    """The 1-D int64 tensor ``name`` as a list of entries, or None where it is not a Shape / Gather /
    Unsqueeze / Concat / Squeeze expression over tensors whose ranks are known."""
    value = initializer_array(model, name)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)] if value.dtype.kind in "iu" else None
    node = made.get(name)
    if node is None:
        return None
    if node.op_type == "Shape":
        shape = dims.get(node.input[0])
        if shape is None or attribute(node, "start", 0) or attribute(node, "end", None) is not None:
            return None
        return [d if isinstance(d, int) and d > 0 else (node.input[0], axis) for axis, d in enumerate(shape)]
    if node.op_type == "Gather" and not attribute(node, "axis", 0):
        source, index = _shape_entries(model, made, dims, node.input[0]), initializer_array(model, node.input[1])
        if source is None or index is None:
            return None
        return [source[int(i)] for i in np.asarray(index).reshape(-1)]
    if node.op_type in ("Unsqueeze", "Squeeze"):  # of a scalar / one-element shape value: same entry
        source = _shape_entries(model, made, dims, node.input[0])
        return source if source is not None and len(source) == 1 else None
    if node.op_type == "Concat" and attribute(node, "axis", 0) == 0:
        parts = [_shape_entries(model, made, dims, part) for part in node.input]
        return None if any(part is None for part in parts) else [entry for part in parts for entry in part]
    return None


def _pad_fold_blocker(model, pad, readers, outputs) -> str | None:
    """Why ``pad`` cannot become its Conv's padding (None when it can)."""
    if attribute(pad, "mode", b"constant") not in (b"constant", "constant"):
        return "not constant mode"
    if len(pad.input) < 2 or initializer_array(model, pad.input[1]) is None:
        return "pads are not constant"
    if len(pad.input) > 3 and pad.input[3]:
        return "has an axes input"
    if len(pad.input) > 2 and pad.input[2]:
        value = initializer_array(model, pad.input[2])
        if value is None or np.any(value != 0):
            return "pads with a non-zero value"
    pads = [int(v) for v in initializer_array(model, pad.input[1])]
    rank = len(pads) // 2
    if rank < 3 or any(pads[i] for i in (0, 1, rank, rank + 1)) or any(v < 0 for v in pads):
        return "pads the batch or channel axis, or crops"
    conv_readers = readers.get(pad.output[0], [])
    if len(conv_readers) != 1 or pad.output[0] in outputs:
        return "its output has other readers"
    conv = conv_readers[0]
    if conv.op_type != "Conv" or conv.input[0] != pad.output[0]:
        return "not read as a Conv's data input"
    if attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "Conv uses auto_pad"
    return None


def _bn_fold_blocker(model, bn, layer, readers, outputs) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None when it can)."""
    if layer is None or layer.op_type not in ("Conv", "Gemm"):
        return "its input is not produced by a Conv or Gemm"
    if len(readers.get(bn.input[0], [])) != 1 or bn.input[0] in outputs:
        return f"{layer.name}'s output has other readers"
    if len([o for o in bn.output if o]) > 1:
        return "training-mode outputs are used"
    if any(initializer_array(model, name) is None for name in bn.input[1:5]):
        return "its statistics are not constant"
    if initializer_array(model, layer.input[1]) is None:
        return f"{layer.name}'s weight is not constant"
    if len(layer.input) > 2 and layer.input[2] and initializer_array(model, layer.input[2]) is None:
        return f"{layer.name}'s bias is not constant"
    if layer.op_type == "Gemm" and attribute(layer, "alpha", 1.0) != 1.0:
        return "Gemm alpha != 1"
    return None


def _remove_dead_code(model: onnx.ModelProto) -> None:
    graph = model.graph
    needed = set(graph_output_names(model))
    kept = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    live_inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live_inits)
    # Drop stale value_info; shape inference rebuilds it.
    del graph.value_info[:]


def _name_nodes(model: onnx.ModelProto) -> None:
    used = {node.name for node in model.graph.node if node.name}
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in used or name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)
