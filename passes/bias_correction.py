"""Empirical per-channel bias correction (Nagel et al. 2019; Banner et al. 2019).

Quantizing a weight ``W`` to ``Wq`` shifts the mean of each output channel by
``(Wq - W) E[x]``; this pass measures ``E[x]`` (the mean im2col patch for a
convolution, the mean feature row for Gemm/MatMul) on calibration data and
adds ``(W - Wq) E[x]`` to the bias, so the quantized layer's expected output
equals the float one.

Requires: a QuantPlan saying which layers are quantized to how many bits
(``plan.layers``, or an empty plan: every linear layer at ``plan.w_bits``);
``Wq`` is exactly what QDQ insertion will produce (the plan's weight
TensorQuant when present -- e.g. written by GPTQ -- else the shared grid of
``compiler.quantizers``).  ``float_model`` (optional) supplies the reference
weights ``W`` when ``model`` has already been rounded (GPTQ output).
Guarantees: only biases change; a Conv/Gemm without bias gets one; a MatMul
without a following bias Add is skipped (logged).
Float function: NOT preserved (it anticipates the rounding).
Idempotency: the model is marked; a second run is skipped with a log line.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from compiler.calibrate import run_batches
from compiler.graph import attribute, initializer_array
from compiler.linear_layers import (
    LinearLayer,
    add_to_bias,
    copy_model,
    is_applied,
    mark_applied,
    planned_layers,
)
from compiler.plan import QuantPlan
from compiler.quantizers import fake_quantize_weight, planned_weight_scale

log = logging.getLogger(__name__)

PASS_NAME = "bias_correction"


def mean_patch(x: np.ndarray, layer: LinearLayer, weight_shape: tuple[int, ...]) -> np.ndarray:
    """Sum over samples of the layer's input rows (im2col order), and the row count.

    Computed per kernel offset as a strided mean, so no im2col is materialised.
    Returns ([K] or depthwise [C, kh*kw], rows).
    """
    if layer.op_type != "Conv":
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        return rows.sum(axis=0), rows.shape[0]
    kh, kw = weight_shape[2], weight_shape[3]
    sh, sw = attribute(layer.node, "strides", [1, 1])
    dh, dw = attribute(layer.node, "dilations", [1, 1])
    top, left, bottom, right = attribute(layer.node, "pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    sums = np.empty((x.shape[1], kh, kw))
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh : i * dh + sh * out_h : sh, j * dw : j * dw + sw * out_w : sw]
            sums[:, i, j] = window.sum(axis=(0, 2, 3), dtype=np.float64)
    rows = x.shape[0] * out_h * out_w
    return (sums.reshape(x.shape[1], kh * kw) if layer.is_depthwise else sums.reshape(-1)), rows


def mean_inputs(model: onnx.ModelProto, layers: list[LinearLayer], data, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Layer name -> mean input row (see :func:`mean_patch`) over ``data``."""
    totals: dict[str, list] = {}
    shapes = {layer.name: layer.weight_array(model).shape for layer in layers}

    def update(batch: dict[str, np.ndarray]) -> None:
        for layer in layers:
            total, rows = mean_patch(batch[layer.input].astype(np.float32), layer, shapes[layer.name])
            entry = totals.setdefault(layer.name, [0.0, 0])
            entry[0] = entry[0] + total
            entry[1] += rows

    run_batches(model, data, list(dict.fromkeys(layer.input for layer in layers)), update,
                batch_size=batch_size, progress=False, desc="bias correction")
    return {name: total / rows for name, (total, rows) in totals.items()}


def bias_shift(weight: np.ndarray, quantized: np.ndarray, mean: np.ndarray, layer: LinearLayer) -> np.ndarray:
    """``(W - Wq) E[x]`` per output channel."""
    delta = np.moveaxis(weight - quantized, layer.out_axis, 0).reshape(weight.shape[layer.out_axis], -1)
    if layer.is_depthwise:
        return np.sum(delta * mean, axis=1)
    return delta.astype(np.float64) @ mean


def bias_correction(
    model: onnx.ModelProto,
    plan: QuantPlan,
    data: dict[str, np.ndarray],
    *,
    float_model: onnx.ModelProto | None = None,
    max_bits: int = 8,
    batch_size: int = 32,
) -> tuple[onnx.ModelProto, QuantPlan]:
    """Correct the biases of planned layers with ``w_bits <= max_bits``; returns (copy of model, plan)."""
    result = copy_model(model)
    if is_applied(result, PASS_NAME):
        log.info("bias_correction: skipped: the model's biases are already corrected")
        return result, plan
    layers = []
    for layer, bits in planned_layers(result, plan):
        if bits > max_bits:
            continue
        if layer.bias is None and layer.op_type == "MatMul":
            log.debug("bias_correction: %s: MatMul without a bias Add: skipped", layer.name)
            continue
        layers.append((layer, bits))
    means = mean_inputs(result, [layer for layer, _ in layers], data, batch_size)
    corrected = 0
    for layer, bits in layers:
        weight = layer.weight_array(result).astype(np.float32)
        reference = initializer_array(float_model, layer.weight) if float_model is not None else None
        if reference is None or reference.shape != weight.shape:
            reference = weight
        scale = planned_weight_scale(plan.tensors, layer.weight, weight, layer.out_axis, bits)
        quantized = fake_quantize_weight(weight, layer.out_axis, bits, scale)
        shift = bias_shift(reference.astype(np.float64), quantized, means[layer.name], layer)
        add_to_bias(result, layer, shift.astype(np.float32), "bias_corrected")
        corrected += 1
        entry = plan.layers.get(layer.name)
        if entry is not None:
            entry.info["bias_correction_max"] = float(np.max(np.abs(shift))) if shift.size else 0.0
    log.info("bias_correction: %d layers corrected", corrected)
    mark_applied(result, PASS_NAME, layers=corrected)
    return result, plan
