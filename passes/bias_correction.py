"""Empirical per-channel bias correction (Nagel et al. 2019; Banner et al. 2019).

Quantizing weights shifts the mean of each layer's output channels. The
default *analytic* mode adds ``(W - Wq) E[x]`` with ``E[x]`` (the mean im2col
patch for a convolution, the mean feature row for Gemm/MatMul) measured on
the float model: the layer's own rounding only, one calibration run. The
*empirical* mode measures, on calibration data, each layer's
per-channel mean output in the float model and in the model whose planned
weights are all quantized (so upstream rounding errors count too), and adds
the difference to the bias -- layer by layer in topological order, each
correction seen by the layers after it (one calibration run per layer). On
MobileNetV2 W4A8 after GPTQ both gave the same top-1 agreement (62.1%) and
analytic a lower KL, at 1/20 of the time (BENCHMARKS.transforms.md).

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

from compiler.calibrate import collect_channel_stats, run_batches
from compiler.graph import attribute, initializer_array, set_initializer
from compiler.linear_layers import (
    LinearLayer,
    add_to_bias,
    copy_model,
    find_linear_layers,
    is_applied,
    mark_applied,
    planned_layers,
)
from compiler.plan import QuantPlan
from compiler.quantizers import planned_fake_quantize

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


def _output_means(model: onnx.ModelProto, layers: list[LinearLayer], data, batch_size: int) -> dict[str, np.ndarray]:
    """Tensor name -> per-channel mean of each layer's output (``x W + b``) over ``data``."""
    axes = {layer.output: 1 if layer.op_type == "Conv" else -1 for layer in layers}
    stats = collect_channel_stats(model, data, list(axes), axis=axes, batch_size=batch_size, progress=False)
    return {name: entry.mean.astype(np.float64) for name, entry in stats.items()}


def _quantized_weights(model: onnx.ModelProto, plan: QuantPlan, layers) -> dict[str, np.ndarray]:
    """Weight name -> the float value QDQ insertion will give it (plan entry or shared grid)."""
    quantized = {}
    for layer, bits in layers:
        weight = layer.weight_array(model).astype(np.float32)
        quantized[layer.weight] = planned_fake_quantize(plan.tensors, layer.weight, weight, layer.out_axis, bits)
    return quantized


def _correct_analytic(result, plan, layers, data, float_model, batch_size) -> None:
    means = mean_inputs(result, [layer for layer, _ in layers], data, batch_size)
    quantized = _quantized_weights(result, plan, layers)
    for layer, _ in layers:
        weight = layer.weight_array(result)
        reference = initializer_array(float_model, layer.weight) if float_model is not None else None
        if reference is None or reference.shape != weight.shape:
            reference = weight
        shift = bias_shift(reference.astype(np.float64), quantized[layer.weight], means[layer.name], layer)
        _apply_shift(result, plan, layer, shift)


def _correct_empirical(result, plan, layers, data, float_model, batch_size, layers_per_pass) -> None:
    reference = float_model if float_model is not None else result
    reference_layers = {layer.node.output[0]: layer for layer in find_linear_layers(reference).values()}
    wanted = [reference_layers[layer.node.output[0]] for layer, _ in layers if layer.node.output[0] in reference_layers]
    float_means = _output_means(reference, wanted, data, batch_size)
    shadow = copy_model(result)  # the model as QDQ will see its weights, biases corrected as we go
    for name, value in _quantized_weights(result, plan, layers).items():
        set_initializer(shadow, name, value)
    shadow_layers = {layer.node.output[0]: layer for layer in find_linear_layers(shadow).values()}
    for first in range(0, len(layers), layers_per_pass):
        chunk = [layer for layer, _ in layers[first:first + layers_per_pass]]
        shadow_chunk = [shadow_layers[layer.node.output[0]] for layer in chunk]
        quant_means = _output_means(shadow, shadow_chunk, data, batch_size)
        for layer, twin in zip(chunk, shadow_chunk, strict=True):
            if layer.output not in float_means:
                log.debug("bias_correction: %s: not in the float model; skipped", layer.name)
                continue
            shift = float_means[layer.output] - quant_means[twin.output]
            add_to_bias(shadow, twin, shift.astype(np.float32), "bias_corrected")
            _apply_shift(result, plan, layer, shift)


def _apply_shift(result, plan, layer, shift) -> None:
    add_to_bias(result, layer, np.asarray(shift, dtype=np.float32), "bias_corrected")
    entry = plan.layers.get(layer.name)
    if entry is not None:
        entry.info["bias_correction_max"] = float(np.max(np.abs(shift))) if np.size(shift) else 0.0


def bias_correction(
    model: onnx.ModelProto,
    plan: QuantPlan,
    data: dict[str, np.ndarray],
    *,
    float_model: onnx.ModelProto | None = None,
    mode: str = "analytic",
    layers_per_pass: int = 1,
    max_bits: int = 8,
    batch_size: int = 32,
) -> tuple[onnx.ModelProto, QuantPlan]:
    """Correct the biases of planned layers with ``w_bits <= max_bits``; returns (copy of model, plan).

    ``mode="empirical"``: each layer's mean output in the model with *all*
    planned weights quantized (upstream errors included, layers corrected in
    topological order) is matched to the float model's. With
    ``layers_per_pass`` > 1 several layers share a calibration run (faster),
    but a layer then also "corrects" upstream errors that the corrections in
    its own pass already remove: keep 1 unless the layers are independent. ``mode="analytic"``: ``(W - Wq) E[x]`` with ``E[x]``
    from the float model (one run; the layer's own rounding only).
    """
    if mode not in ("empirical", "analytic"):
        raise ValueError(f"bias_correction mode must be 'empirical' or 'analytic', not {mode!r}")
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
    if mode == "analytic":
        _correct_analytic(result, plan, layers, data, float_model, batch_size)
    else:
        _correct_empirical(result, plan, layers, data, float_model, batch_size, layers_per_pass)
    log.info("bias_correction (%s): %d layers corrected", mode, len(layers))
    mark_applied(result, PASS_NAME, layers=len(layers), mode=mode)
    return result, plan
