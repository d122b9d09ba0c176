"""Cross-layer equalization and bias absorption (Nagel et al. 2019, data-free quantization).

Requires: a canonical float graph (BN folded into Conv, Gemm alpha/beta folded,
explicit pads).
Guarantees: for every pair of linear layers ``L1 -> [act] -> L2`` where the
tensor between them feeds only L2 and ``act`` is positively homogeneous per
channel (Relu, LeakyRelu, PRelu with a per-tensor slope, MaxPool, AveragePool,
Identity), output channel ``c`` of L1 is divided by ``s_c`` and input channel
``c`` of L2 multiplied by it, with ``s_c = sqrt(r1_c / r2_c)`` (``r`` the
channel's max |weight|), so both ranges become ``sqrt(r1_c * r2_c)``.  Chains
of pairs (conv -> depthwise -> conv) are iterated to a fixed point.
Bias absorption (needs calibration data): for pairs with *no* activation in
between, each channel of the intermediate tensor is shifted to be centred
on zero (``b1 -= c``, ``b2 += W2 c``) which narrows a per-tensor activation
range; L2 must not pad (padding would read the shifted zero).
Float function: preserved exactly (to float rounding).  ReLU6 (``Clip(0, 6)``)
is not homogeneous and blocks a pair, unless ``relu6="relu"`` is asked for:
then the Clip becomes a Relu, which changes the function (recorded).
Idempotency: the model is marked; a second run is skipped with a log line.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from compiler.calibrate import collect_channel_stats
from compiler.graph import attribute, initializer_array
from compiler.linear_layers import (
    LinearLayer,
    add_to_bias,
    copy_model,
    find_linear_layers,
    in_channels,
    input_axis,
    is_applied,
    mark_applied,
    out_channels,
    scale_input_channels,
    scale_output_channels,
    single_consumer_chain,
)

log = logging.getLogger(__name__)

PASS_NAME = "equalize"
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "Identity")


def _is_relu6(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    if node.op_type != "Clip":
        return False
    if len(node.input) >= 3 and node.input[1] and node.input[2]:
        low, high = initializer_array(model, node.input[1]), initializer_array(model, node.input[2])
        return low is not None and high is not None and float(low) == 0.0 and float(high) > 0.0
    return float(attribute(node, "min", -np.inf)) == 0.0 and float(attribute(node, "max", np.inf)) > 0.0


def find_pairs(model: onnx.ModelProto, relu6: str = "keep") -> list[tuple[LinearLayer, list[onnx.NodeProto], LinearLayer]]:
    """Every (L1, ops between, L2) that may be equalized; each miss is logged with its reason."""
    layers = find_linear_layers(model)
    by_node = {id(layer.node): layer for layer in layers.values()}
    through = HOMOGENEOUS_OPS + (("Clip",) if relu6 == "relu" else ())
    pairs = []
    for layer in layers.values():
        chain, nxt, reason = single_consumer_chain(model, layer.output, through)
        if nxt is None:
            log.debug("equalize: %s: no pair: %s", layer.name, reason)
            continue
        bad = [n for n in chain if n.op_type == "Clip" and not _is_relu6(model, n)]
        bad += [n for n in chain if n.op_type == "PRelu" and np.size(initializer_array(model, n.input[1])) != 1]
        if bad:
            log.debug("equalize: %s: no pair: %s %s is not homogeneous", layer.name, bad[0].op_type, bad[0].name)
            continue
        partner = by_node.get(id(nxt))
        if partner is None or nxt.input[0] != (chain[-1].output[0] if chain else layer.output):
            log.debug("equalize: %s: no pair: next op %s %s is not a linear layer reading it", layer.name, nxt.op_type, nxt.name)
            continue
        if layer.is_depthwise and partner.is_depthwise:
            log.debug("equalize: %s: no pair: two depthwise convs in a row", layer.name)
            continue
        if out_channels(model, layer) != in_channels(model, partner):
            log.debug("equalize: %s -> %s: channel counts differ", layer.name, partner.name)
            continue
        pairs.append((layer, chain, partner))
    return pairs


def _channel_range(weight: np.ndarray, axis: int) -> np.ndarray:
    axes = tuple(a for a in range(weight.ndim) if a != axis % weight.ndim)
    return np.max(np.abs(weight), axis=axes)


DEAD_CHANNEL_FRACTION = 1e-4


def equalize_pair(model: onnx.ModelProto, first: LinearLayer, second: LinearLayer) -> float:
    """Equalize one pair in place; returns the largest |log s| applied (0 when converged)."""
    r1 = _channel_range(first.weight_array(model), first.out_axis)
    second_axis = second.out_axis if second.is_depthwise else second.in_axis
    r2 = _channel_range(second.weight_array(model), second_axis)
    # A dead channel (weights ~0, e.g. after BN folding, its bias alone sets the
    # output) would be scaled by up to 1e6 and blow up the next layer's input
    # range: channels below DEAD_CHANNEL_FRACTION of their layer's widest keep scale 1.
    valid = (r1 > DEAD_CHANNEL_FRACTION * r1.max(initial=0.0)) & (r2 > DEAD_CHANNEL_FRACTION * r2.max(initial=0.0))
    scale = np.ones_like(r1, dtype=np.float64)
    scale[valid] = np.sqrt(r1[valid].astype(np.float64) / r2[valid])
    scale = np.clip(scale, 1e-6, 1e6)
    scale_output_channels(model, first, (1.0 / scale).astype(np.float32))
    scale_input_channels(model, second, scale.astype(np.float32))
    return float(np.max(np.abs(np.log(scale)))) if scale.size else 0.0


def _pads_nothing(layer: LinearLayer) -> bool:
    return layer.op_type != "Conv" or not any(attribute(layer.node, "pads", [0]))


def absorb_biases(model: onnx.ModelProto, pairs, data, batch_size: int = 32) -> int:
    """Shift linear (no activation) intermediates to zero-centred channels; returns pairs shifted."""
    eligible = []
    for first, chain, second in pairs:
        if chain:
            log.debug("equalize: bias absorption %s -> %s: an activation lies between", first.name, second.name)
            continue  # through a Relu the shift is exact only on the data seen
        if not _pads_nothing(second) or second.is_depthwise:
            log.debug("equalize: bias absorption %s -> %s: L2 pads or is depthwise", first.name, second.name)
            continue
        if second.bias is None and second.op_type == "MatMul":
            log.debug("equalize: bias absorption %s -> %s: L2 has no bias to absorb into", first.name, second.name)
            continue
        if first.bias is None and first.op_type == "MatMul":
            log.debug("equalize: bias absorption %s -> %s: L1 has no bias to shift", first.name, second.name)
            continue
        eligible.append((first, second))
    if not eligible:
        return 0
    axes = {first.output: 1 if first.op_type == "Conv" else -1 for first, _ in eligible}
    stats = collect_channel_stats(model, data, list(axes), axis=axes, batch_size=batch_size,
                                  progress=False)
    for first, second in eligible:
        shift = ((stats[first.output].min + stats[first.output].max) / 2).astype(np.float32)
        add_to_bias(model, first, -shift, "bias_absorbed")
        weight2 = second.weight_array(model)
        shape = [1] * weight2.ndim
        shape[input_axis(second)] = -1
        reduce = tuple(a for a in range(weight2.ndim) if a != second.out_axis % weight2.ndim)
        add_to_bias(model, second, np.sum(weight2 * shift.reshape(shape), axis=reduce), "bias_absorbed")
    return len(eligible)


def equalize(
    model: onnx.ModelProto,
    *,
    iterations: int = 20,
    tolerance: float = 1e-3,
    relu6: str = "keep",
    data=None,
    bias_absorption: bool = True,
    batch_size: int = 32,
) -> onnx.ModelProto:
    """Cross-layer equalization (+ bias absorption when ``data`` is given) on a copy of ``model``.

    ``relu6``: "keep" (a ReLU6 blocks equalization; function preserved) or
    "relu" (ReLU6 becomes ReLU so the pair can be equalized; function changes).
    """
    if relu6 not in ("keep", "relu"):
        raise ValueError(f"relu6 must be 'keep' or 'relu', not {relu6!r}")
    result = copy_model(model)
    if is_applied(result, PASS_NAME):
        log.info("equalize: skipped: the model is already equalized")
        return result
    pairs = find_pairs(result, relu6)
    if relu6 == "relu":
        for _, chain, _ in pairs:
            for node in chain:
                if node.op_type == "Clip":
                    node.op_type = "Relu"
                    del node.input[1:]
                    del node.attribute[:]
    steps, change = 0, np.inf
    while steps < iterations and change >= tolerance:
        change = max((equalize_pair(result, first, second) for first, _, second in pairs), default=0.0)
        steps += 1
    absorbed = 0
    if bias_absorption and data is not None:
        absorbed = absorb_biases(result, pairs, data, batch_size)
    log.info("equalize: %d pairs, %d sweeps, %d biases absorbed", len(pairs), steps, absorbed)
    mark_applied(result, PASS_NAME, pairs=len(pairs), sweeps=steps, absorbed=absorbed, relu6=relu6,
                 function_preserved=relu6 == "keep")
    return result
