"""SmoothQuant + Outlier Suppression+ for the inputs of MatMul/Gemm layers.

For an activation ``X`` (the input of one or more linear layers ``X W_l + b_l``)
with outlier channels, the per-channel shift ``z`` and scale ``s`` are moved
out of the activation and into the weights:

    X W + b  =  ((X - z) / s) (diag(s) W)  +  (b + z W)

``z_j = (max_j + min_j) / 2`` centres each channel (OS+, with ``shift=True``), and
``s_j = max|X_j - z_j|^a / max_l max|W_l[j, :]|^(1-a)`` (SmoothQuant) evens the
channel ranges so a per-tensor activation quantizer loses less.  The strength
``a`` is searched per activation on calibration rows: each candidate (and "no
smoothing") is scored by the error of the fake-quantized product
``Qa(X') Qw(W')`` against the float one, and the best is kept.

Where ``(X - z) / s`` goes:
* the producer is a LayerNormalization whose output feeds only these layers:
  folded into its gamma and beta (no runtime cost);
* a LayerNormalization whose output also feeds something else (the residual
  Add of a post-LN transformer): the LN is cloned for the layers with folded
  gamma/beta (runtime cost: one more LN, recorded as an online op);
* a linear layer whose output feeds only these layers: folded into its output
  channels (no runtime cost);
* anything else (GELU, Reshape, graph input): an explicit ``Mul`` (and
  ``Add`` for the shift) is inserted, recorded as online ops with their cost.
A layer without bias (MatMul with no following Add) cannot absorb ``z W``:
then the shift is off for that activation.

Requires: a float graph, calibration data.  Guarantees: same float function
(to float rounding).  Idempotency: the model is marked; a second run is
skipped with a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from compiler.calibrate import run_batches
from compiler.graph import (
    NameAllocator,
    consumers,
    initializer_array,
    producers,
    set_initializer,
    topological_sort,
)
from compiler.linear_layers import (
    LinearLayer,
    add_online_op,
    add_to_bias,
    copy_model,
    find_linear_layers,
    is_applied,
    mark_applied,
    scale_input_channels,
    scale_output_channels,
)
from compiler.quantizers import fake_quantize_activation, fake_quantize_weight

log = logging.getLogger(__name__)

PASS_NAME = "smooth"
DEFAULT_ALPHAS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


@dataclass
class SmoothGroup:
    """One activation and the linear layers that read it (as their first input)."""

    tensor: str
    layers: list[LinearLayer]
    alpha: float | None = None  # chosen strength; None: left alone
    error_before: float = 0.0
    error_after: float = 0.0


def find_groups(model: onnx.ModelProto, op_types=("MatMul", "Gemm")) -> list[SmoothGroup]:
    """Activations read by MatMul/Gemm layers with constant weights; misses are logged."""
    by_input: dict[str, list[LinearLayer]] = {}
    inits = {init.name for init in model.graph.initializer}
    for layer in find_linear_layers(model).values():
        if layer.op_type not in op_types:
            continue
        if layer.input in inits:
            log.debug("smooth: %s: input is a constant", layer.name)
            continue
        by_input.setdefault(layer.input, []).append(layer)
    return [SmoothGroup(tensor, layers) for tensor, layers in by_input.items()]


class _RowSampler:
    """Per-channel min/max of each tensor, and up to ``max_rows`` evenly spread rows."""

    def __init__(self, names: list[str], max_rows: int, seed: int = 0) -> None:
        self.low: dict[str, np.ndarray] = {}
        self.high: dict[str, np.ndarray] = {}
        self.rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> None:
        for name, rows in self.rows.items():
            value = np.asarray(batch[name], dtype=np.float32)
            flat = value.reshape(-1, value.shape[-1])
            self.low[name] = np.minimum(self.low.get(name, np.inf), flat.min(axis=0))
            self.high[name] = np.maximum(self.high.get(name, -np.inf), flat.max(axis=0))
            take = min(len(flat), max(1, self.max_rows // 8))
            rows.append(flat[self.rng.choice(len(flat), size=take, replace=False)])

    def sample(self, name: str) -> np.ndarray:
        rows = np.concatenate(self.rows[name])
        if len(rows) > self.max_rows:
            rows = rows[self.rng.choice(len(rows), size=self.max_rows, replace=False)]
        return rows


def _kn_weight(model: onnx.ModelProto, layer: LinearLayer) -> np.ndarray:
    """The weight as [K, N] (input channel first)."""
    return layer.matrix(model).T


def _quant_error(x: np.ndarray, weights: list[np.ndarray], a_bits: int, w_bits: int) -> float:
    """Relative error of ``Qa(x) Qw(W)`` against ``x W`` summed over the layers."""
    xq = fake_quantize_activation(x, a_bits, mse_clip=True)  # as the pipeline's MSE calibration
    num = den = 0.0
    for weight in weights:
        reference = x @ weight
        approx = xq @ fake_quantize_weight(weight, 1, w_bits)
        num += float(np.sum((approx - reference) ** 2))
        den += float(np.sum(reference**2))
    return num / max(den, 1e-30)


def smoothing_factors(absmax_x: np.ndarray, absmax_w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant ``s = max|X|^a / max|W|^(1-a)``; channels with a zero range keep s = 1."""
    scale = np.ones_like(absmax_x, dtype=np.float64)
    valid = (absmax_x > 0) & (absmax_w > 0)
    scale[valid] = absmax_x[valid] ** alpha / absmax_w[valid] ** (1 - alpha)
    return scale


def choose_strength(
    rows: np.ndarray, low: np.ndarray, high: np.ndarray, weights: list[np.ndarray], *,
    alphas, shift: bool, a_bits: int, w_bits: int,
) -> tuple[float | None, np.ndarray, np.ndarray, float, float]:
    """Best (alpha or None for "leave alone", s, z, error without, error with)."""
    centre = ((low + high) / 2).astype(np.float64) if shift else np.zeros_like(low, dtype=np.float64)
    absmax_x = np.maximum(high - centre, centre - low)
    absmax_w = np.max(np.abs(np.concatenate(weights, axis=1)), axis=1)
    baseline = _quant_error(rows, weights, a_bits, w_bits)
    best = (None, np.ones_like(centre), np.zeros_like(centre), baseline, baseline)
    for alpha in alphas:
        factor = smoothing_factors(absmax_x, absmax_w, alpha)
        moved = ((rows - centre) / factor).astype(np.float32)
        error = _quant_error(moved, [(w * factor[:, None]).astype(np.float32) for w in weights], a_bits, w_bits)
        if error < best[4]:
            best = (float(alpha), factor, centre, baseline, error)
    return best


def _fold_into_layernorm(model, node, factor, centre, gamma_name, beta_name) -> None:
    gamma = initializer_array(model, node.input[1]).astype(np.float64)
    beta = initializer_array(model, node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros_like(gamma)
    set_initializer(model, gamma_name, (gamma / factor).astype(np.float32))
    set_initializer(model, beta_name, ((beta - centre) / factor).astype(np.float32))
    while len(node.input) < 3:
        node.input.append("")
    node.input[1], node.input[2] = gamma_name, beta_name


def _apply(model: onnx.ModelProto, group: SmoothGroup, factor: np.ndarray, centre: np.ndarray,
           names: NameAllocator) -> str:
    """Rewrite the graph for one group; returns how ``(X - z) / s`` was placed."""
    tensor = group.tensor
    readers = consumers(model).get(tensor, [])
    group_nodes = {id(layer.node) for layer in group.layers}
    exclusive = all(id(node) in group_nodes for node in readers) and tensor not in {o.name for o in model.graph.output}
    producer = producers(model).get(tensor)
    source = {layer.output: layer for layer in find_linear_layers(model).values()}.get(tensor)
    source_can_shift = source is not None and (source.bias is not None or source.op_type in ("Conv", "Gemm"))
    inits = {init.name for init in model.graph.initializer}
    row = int(factor.size)
    is_ln = (producer is not None and producer.op_type == "LayerNormalization"
             and producer.input[1] in inits and (len(producer.input) < 3 or not producer.input[2] or producer.input[2] in inits)
             and int(next((a.i for a in producer.attribute if a.name == "axis"), -1)) == -1)
    if is_ln and exclusive:
        _fold_into_layernorm(model, producer, factor, centre, names(f"{producer.input[1]}_smooth"), names(f"{tensor}_beta_smooth"))
        placement = "folded into LayerNorm"
    elif is_ln:
        clone = onnx.NodeProto()
        clone.CopyFrom(producer)
        clone.name = names(f"{producer.name or tensor}_smooth")
        new_tensor = names(f"{tensor}_smooth")
        del clone.output[:]
        clone.output.append(new_tensor)
        del clone.input[3:]
        _fold_into_layernorm(model, clone, factor, centre, names(f"{producer.input[1]}_smooth"), names(f"{tensor}_beta_smooth"))
        model.graph.node.append(clone)
        for layer in group.layers:
            layer.node.input[0] = new_tensor
        add_online_op(model, clone.name, "LayerNormalization", 8 * row,
                      f"smoothing of {tensor}: LayerNorm shared with a non-linear consumer is duplicated")
        placement = "LayerNorm duplicated"
    elif exclusive and source is not None and (source_can_shift or not centre.any()):
        if centre.any():
            add_to_bias(model, source, -centre, "shift")
        scale_output_channels(model, source, (1.0 / factor).astype(np.float32))
        placement = f"folded into {source.name}"
    else:
        current = tensor
        new_nodes = []
        if centre.any():
            shift_name = names(f"{tensor}_os_shift")
            set_initializer(model, shift_name, (-centre).astype(np.float32))
            shifted = names(f"{tensor}_shifted")
            new_nodes.append(helper.make_node("Add", [current, shift_name], [shifted], name=names(f"{tensor}_os_shift_add")))
            current = shifted
        scale_name = names(f"{tensor}_smooth_scale")
        set_initializer(model, scale_name, (1.0 / factor).astype(np.float32))
        scaled = names(f"{tensor}_smooth")
        new_nodes.append(helper.make_node("Mul", [current, scale_name], [scaled], name=names(f"{tensor}_smooth_mul")))
        model.graph.node.extend(new_nodes)
        for node in new_nodes:
            add_online_op(model, node.name, node.op_type, row, f"smoothing of {tensor}: its producer cannot absorb the scale")
        for layer in group.layers:
            layer.node.input[0] = scaled
        placement = "explicit Mul" + ("+Add" if centre.any() else "")
    for layer in group.layers:
        scale_input_channels(model, layer, factor.astype(np.float32))
        if centre.any():
            add_to_bias(model, layer, layer.matrix(model).astype(np.float64) @ (centre / factor), "shift")
    return placement


def _can_shift(model: onnx.ModelProto, group: SmoothGroup) -> bool:
    return all(layer.bias is not None or layer.op_type == "Gemm" for layer in group.layers)


def smooth(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    *,
    alpha: float | None = None,
    alphas=DEFAULT_ALPHAS,
    shift: bool = False,
    w_bits: int = 8,
    a_bits: int = 8,
    max_rows: int = 2048,
    batch_size: int = 32,
) -> onnx.ModelProto:
    """Smooth (and, with ``shift``, OS+-shift) every MatMul/Gemm input where it lowers the estimated error.

    ``shift`` is off by default: on MiniLM W8A8 through the pipeline, smoothing
    alone gave embedding cosine 0.9952 and smoothing + shift 0.9879 (the
    range-midpoint shift moves the bulk of skewed channels, e.g. GELU outputs,
    away from each other, which a per-tensor MSE-clipped quantizer handles worse).

    ``alpha``: a fixed strength for every activation (no search); default: searched
    per activation over ``alphas`` (and "leave alone") at ``w_bits``/``a_bits``.
    """
    result = copy_model(model)
    if is_applied(result, PASS_NAME):
        log.info("smooth: skipped: the model is already smoothed")
        return result
    groups = find_groups(result)
    if not groups:
        log.info("smooth: no MatMul/Gemm reads an activation")
        mark_applied(result, PASS_NAME, groups=[])
        return result
    sampler = _RowSampler([group.tensor for group in groups], max_rows)
    run_batches(result, data, [group.tensor for group in groups], sampler, batch_size=batch_size,
                progress=False, desc="smoothing statistics")
    names = NameAllocator(result)
    report = []
    for group in groups:
        weights = [_kn_weight(result, layer) for layer in group.layers]
        group_shift = shift and _can_shift(result, group)
        if shift and not group_shift:
            log.debug("smooth: %s: no shift: a reader has no bias to absorb it", group.tensor)
        chosen, factor, centre, before, after = choose_strength(
            sampler.sample(group.tensor), sampler.low[group.tensor], sampler.high[group.tensor], weights,
            alphas=(alpha,) if alpha is not None else alphas, shift=group_shift, a_bits=a_bits, w_bits=w_bits,
        )
        group.alpha, group.error_before, group.error_after = chosen, before, after
        if chosen is None:
            log.debug("smooth: %s: left alone (no strength lowers the error %.3g)", group.tensor, before)
            continue
        placement = _apply(result, group, factor, centre, names)
        log.info("smooth: %s (%d layers): alpha %.2f, est. error %.3g -> %.3g, %s", group.tensor,
                 len(group.layers), chosen, before, after, placement)
        report.append({"tensor": group.tensor, "alpha": chosen, "error_before": before,
                       "error_after": after, "placement": placement})
    topological_sort(result)
    mark_applied(result, PASS_NAME, groups=report, w_bits=w_bits, a_bits=a_bits)
    return result
