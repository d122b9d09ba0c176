"""GPTQ: layer-wise reconstruction rounding with the layer Hessian (Frantar et al. 2023).

Requires: a float graph, a QuantPlan (``plan.layers`` after allocation, or an
empty plan: then every Conv/Gemm/MatMul gets ``plan.w_bits``), calibration data.
Guarantees: every planned layer's weight lies exactly on its quantization grid
(symmetric per output channel, or per block of the reduction axis -- GPTQ's
"group size" -- when the weight's plan entry is block-wise or
``plan.weight_block_size`` applies to the layer; zero point 0,
``compiler.quantizers``), and ``plan.tensors[weight]`` holds that grid's
TensorQuant (scale, axis, block size, bits), so QDQ insertion reproduces the
integers exactly.  (Option ``block_size`` is GPTQ's column batch for the
lazy error update, not the quantization block.)  Columns are rounded one at a
time and the rounding error is pushed onto the not-yet-rounded columns
through the inverse Hessian ``H = E[x x^T]`` of the layer's input (im2col
patches for convolutions, one Hessian per channel for depthwise ones), which
minimises ``||(W - Q) X||``.  The per-channel (or per-block) scale is searched
(clipping the range) under the Hessian-diagonal-weighted error when
``scale_search`` is on; block scales are fixed before the error feedback
starts ("static groups"), so activation ordering keeps working with them.
Float function: NOT preserved -- this is the rounding step.
Bounded time: a progress bar per layer; once ``max_seconds`` is spent the
remaining layers get nearest rounding on the same grid (logged).
Idempotency: the model is marked; a second run is skipped with a log line.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from dataclasses import replace

import numpy as np
import onnx
from tqdm import tqdm

from compiler.calibrate import ConvPatches, collect_second_moment
from compiler.graph import initializer_array, set_initializer
from compiler.linear_layers import (
    LinearLayer,
    conv_patches,
    copy_model,
    is_applied,
    mark_applied,
    planned_layers,
)
from compiler.plan import QuantPlan, TensorQuant, int_range
from compiler.quantizers import (
    expand_block_scale,
    search_weight_grid,
    weight_block_size,
    weight_scale,
    weight_tensor_quant,
)

log = logging.getLogger(__name__)

PASS_NAME = "gptq"


def _quantize(values: np.ndarray, scale: np.ndarray, lo: int, hi: int, zero: np.ndarray | None = None) -> np.ndarray:
    if zero is None:
        return np.clip(np.round(values / scale), lo, hi) * scale
    return (np.clip(np.round(values / scale) + zero, lo, hi) - zero) * scale


def search_scale(weight: np.ndarray, hessian_diag: np.ndarray, bits: int, grid: int = 20, lowest: float = 0.5,
                 block_size: int | None = None) -> np.ndarray:
    """Symmetric per-row (or per-block) scale ``r * max|w| / qmax``, ``r`` in ``[lowest, 1]``, minimising
    the H-diagonal-weighted squared error (``compiler.quantizers.search_weight_grid``).

    ``weight`` [G, R, K], ``hessian_diag`` [G, K]; returns [G, R] float32, or
    [G, R, ceil(K / block_size)] with ``block_size`` (blocks along K).
    """
    return search_weight_grid(weight, hessian_diag, bits, block_size, grid=grid, lowest=lowest)[0]


def _inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp*mean(diag H) I)^-1``, batched over the first axis."""
    size = hessian.shape[-1]
    eye = np.eye(size)
    mean_diag = np.mean(np.diagonal(hessian, axis1=-2, axis2=-1), axis=-1)[:, None, None]
    for attempt in range(6):
        damped = hessian + (damp * 10**attempt) * mean_diag * eye
        try:
            lower = np.linalg.cholesky(np.linalg.inv(damped))
            return np.swapaxes(lower, -1, -2)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian stays singular after damping")


def gptq_round(
    weight: np.ndarray,
    hessian: np.ndarray,
    scale: np.ndarray,
    bits: int,
    *,
    zero: np.ndarray | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> np.ndarray:
    """Round ``weight`` [G, R, K] onto ``scale`` with GPTQ error feedback; returns float64 on grid.

    ``scale`` is [G, R] (one per row) or [G, R, K] (one per element: block
    scales expanded), ``zero`` (asymmetric grids) the zero points shaped like
    ``scale``; ``hessian`` [G, K, K] is ``E[x x^T]`` of each group's input.
    """
    lo, hi = int_range(bits, signed=True)
    weight = weight.astype(np.float64).copy()
    hessian = hessian.astype(np.float64).copy()
    groups, _, size = weight.shape
    diag = np.diagonal(hessian, axis1=-2, axis2=-1).copy()
    dead = diag <= 0
    if dead.any():  # inputs that never fire: their weights do not matter; pin H so it inverts
        g, k = np.nonzero(dead)
        hessian[g, k, k] = 1.0
        diag[dead] = 1.0
    order = np.argsort(-diag, axis=-1, kind="stable") if act_order else np.tile(np.arange(size), (groups, 1))
    weight = np.take_along_axis(weight, order[:, None, :], axis=-1)
    hessian = np.take_along_axis(np.take_along_axis(hessian, order[:, :, None], axis=1), order[:, None, :], axis=2)
    upper = _inverse_hessian_factor(hessian, damp)
    scale = scale.astype(np.float64)
    column_scales = scale.ndim == 3
    if column_scales:  # the scales travel with their columns
        scale = np.take_along_axis(scale, order[:, None, :], axis=-1)
        if zero is not None:
            zero = np.take_along_axis(zero.astype(np.float64), order[:, None, :], axis=-1)
    rounded = np.zeros_like(weight)
    for start in range(0, size, block_size):
        stop = min(start + block_size, size)
        block = weight[:, :, start:stop].copy()
        errors = np.zeros_like(block)
        factor = upper[:, start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, :, i]
            if column_scales:
                q = _quantize(column, scale[:, :, start + i], lo, hi, None if zero is None else zero[:, :, start + i])
            else:
                q = _quantize(column, scale, lo, hi, zero)
            rounded[:, :, start + i] = q
            error = (column - q) / factor[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * factor[:, None, i, i:]
            errors[:, :, i] = error
        weight[:, :, stop:] -= np.matmul(errors, upper[:, start:stop, stop:])
    inverse = np.argsort(order, axis=-1)
    return np.take_along_axis(rounded, inverse[:, None, :], axis=-1)


def _grouped(layer: LinearLayer, model: onnx.ModelProto) -> np.ndarray:
    """The weight as [G, R, K]: one group per depthwise channel, else a single group."""
    matrix = layer.matrix(model)
    if layer.is_depthwise:
        return matrix[:, None, :]
    return matrix[None]


def _reconstruction_error(weight: np.ndarray, rounded: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the relative output error the rounding leaves."""
    delta = rounded - weight
    num = np.einsum("grk,gkl,grl->", delta, hessian, delta)
    den = np.einsum("grk,gkl,grl->", weight, hessian, weight)
    return float(num / den) if den > 0 else 0.0


def _round_layer(result: onnx.ModelProto, plan: QuantPlan, layer: LinearLayer, bits: int,
                 hessian: np.ndarray | None, options: dict) -> None:
    """Round one layer (GPTQ when ``hessian`` is given, else nearest) and record its grid."""
    weight = _grouped(layer, result).astype(np.float64)
    block_size = _block_size(plan, layer, result, bits)
    if hessian is not None:
        hessian = hessian if hessian.ndim == 3 else hessian[None]
        if hessian.shape[-1] != weight.shape[-1]:
            hessian = None
    zero = None
    if block_size:  # asymmetric blocks (a zero point each), searched or min-max
        diag = np.diagonal(hessian, axis1=-2, axis2=-1) if hessian is not None and options["scale_search"] else None
        block_scale, block_zero = search_weight_grid(weight, diag, bits, block_size, asymmetric=True,
                                                     grid=20 if options["scale_search"] else 1)
        scale = expand_block_scale(block_scale, weight.shape, -1, block_size)
        zero = expand_block_scale(block_zero, weight.shape, -1, block_size).astype(np.float64)
    elif options["scale_search"]:
        diag = (np.diagonal(hessian, axis1=-2, axis2=-1) if hessian is not None
                else np.ones(weight.shape[::2]))
        scale = search_scale(weight, diag, bits)
    else:
        scale = weight_scale(weight.reshape(-1, weight.shape[-1]), 0, bits).reshape(weight.shape[:2])
    if hessian is not None:
        rounded = gptq_round(weight, hessian, scale, bits, zero=zero, block_size=options["block_size"],
                             damp=options["damp"], act_order=options["act_order"])
        method = "gptq"
    else:
        lo, hi = int_range(bits, signed=True)
        rounded = _quantize(weight, (scale if block_size else scale[..., None]).astype(np.float64), lo, hi, zero)
        method = options.get("fallback", "nearest")
        log.info("gptq: %s: %s", layer.name, method)
    # [R, K] matrices of each element's scale and zero point (rows: output channels of every group)
    columns = weight.shape[-1]
    element_scale = (scale.reshape(-1, columns) if block_size
                     else np.repeat(scale.reshape(-1, 1), columns, axis=1)).astype(np.float32)
    element_zero = zero.reshape(-1, columns) if zero is not None else 0.0
    lo, hi = int_range(bits, signed=True)
    # (q - z) * scale in float32 is the grid value QuantizeLinear maps back to q exactly.
    integers = np.clip(np.round(rounded.reshape(-1, columns) / element_scale.astype(np.float64)) + element_zero,
                       lo, hi)
    on_grid = ((integers - element_zero).astype(np.float32) * element_scale).astype(np.float32)
    new_weight = layer.from_matrix(result, on_grid)
    set_initializer(result, layer.weight, new_weight)
    if block_size:  # [R, blocks] in the weight's layout: blocks along its reduction axis
        block_scale = block_scale.reshape(-1, block_scale.shape[-1])
        block_zero = block_zero.reshape(-1, block_zero.shape[-1])
        axis = 1 - layer.out_axis % 2
        layout = (lambda array: array) if axis == 1 else np.transpose
        plan.tensors[layer.weight] = weight_tensor_quant(
            layer.weight, new_weight, axis, bits, layout(block_scale), block_size, layout(block_zero))
    else:
        plan.tensors[layer.weight] = weight_tensor_quant(layer.weight, new_weight, layer.out_axis, bits,
                                                         element_scale[:, 0])
    entry = plan.layers.get(layer.name)
    error = _reconstruction_error(weight, rounded, hessian) if hessian is not None else None
    if entry is not None:
        entry.info.update(rounding=method, gptq_error=error)
    log.debug("gptq: %s: %d-bit, relative error %s (%s)", layer.name, bits, error, method)


def _block_size(plan: QuantPlan, layer: LinearLayer, model: onnx.ModelProto, bits: int) -> int | None:
    """The weight's quantization block: its plan entry's, else the plan's rule for the layer."""
    entry = plan.tensors.get(layer.weight)
    if entry is not None and entry.bits == bits and entry.block_wise:
        return entry.block_size
    if layer.is_depthwise:
        return None
    shape = layer.weight_array(model).shape
    return weight_block_size(plan.weight_block_size, layer.op_type, shape, bits, layer.out_axis)


def _hessians(model: onnx.ModelProto, chunk: list[tuple[LinearLayer, int]], data, batch_size: int,
              progress: bool) -> dict[str, np.ndarray | None]:
    """Layer name -> ``E[x x^T]`` of its input on ``model`` (None: a tensor read two ways)."""
    patches: dict[str, object] = {}
    clashes = set()
    for layer, _ in chunk:
        if layer.op_type != "Conv":
            continue
        wanted = conv_patches(layer, model)
        if patches.setdefault(layer.input, wanted) != wanted:
            clashes.add(layer.name)
    if clashes:  # two layers reading one tensor differently: the later ones round nearest
        log.info("gptq: %s read a tensor another conv reads with other patches: nearest rounding", sorted(clashes))
    pointwise = ConvPatches(kernel=(1, 1))
    # A 1x1 / stride 1 / unpadded conv's patches are its pixels: the per-pixel channel moment
    # is exact and much cheaper than im2col sample by sample.
    pixel_inputs = {name for name, wanted in patches.items() if wanted == pointwise}
    conv_inputs = set(patches)
    plain = {layer.input for layer, _ in chunk if layer.op_type != "Conv"}
    moments = collect_second_moment(
        model, data, list(dict.fromkeys(layer.input for layer, _ in chunk)),
        axis={layer.input: 1 if layer.input in pixel_inputs else -1 for layer, _ in chunk},
        conv_patches={name: wanted for name, wanted in patches.items() if name not in pixel_inputs},
        batch_size=batch_size, progress=progress,
    )
    if plain & conv_inputs:
        log.info("gptq: a tensor read by both a Conv and a Gemm/MatMul: the latter rounds nearest")
    result = {}
    for layer, _ in chunk:
        bad = layer.name in clashes or (layer.op_type != "Conv" and layer.input in conv_inputs)
        result[layer.name] = None if bad else moments[layer.input]
    return result


def gptq(
    model: onnx.ModelProto,
    plan: QuantPlan,
    data: dict[str, np.ndarray],
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    scale_search: bool = True,
    sequential: bool = True,
    layers_per_pass: int = 8,
    max_bits: int = 8,
    max_seconds: float = 600.0,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[onnx.ModelProto, QuantPlan]:
    """GPTQ-round every planned layer with ``w_bits <= max_bits``; returns (copy of model, plan).

    ``sequential``: Hessians are measured on the model whose earlier layers are
    already rounded (``layers_per_pass`` layers per calibration run), so each
    layer compensates the error arriving from upstream; otherwise all Hessians
    come from one run of the float model.  The plan is updated in place (and
    returned): weight TensorQuants and, per layer, ``info["rounding"]`` and
    ``info["gptq_error"]`` (relative reconstruction error on the Hessian).
    """
    result = copy_model(model)
    if is_applied(result, PASS_NAME):
        log.info("gptq: skipped: the model's weights are already GPTQ-rounded")
        return result, plan
    targets = [(layer, bits) for layer, bits in planned_layers(result, plan) if bits <= max_bits]
    if not targets:
        log.info("gptq: no layer with weights of at most %d bits", max_bits)
        return result, plan
    options = {"block_size": block_size, "damp": damp, "act_order": act_order, "scale_search": scale_search}
    chunk_size = layers_per_pass if sequential else len(targets)
    started = time.monotonic()
    show = progress and sys.stderr.isatty()
    with tqdm(total=len(targets), desc="gptq", unit="layer", disable=not show, file=sys.stderr) as bar:
        for first in range(0, len(targets), chunk_size):
            chunk = targets[first:first + chunk_size]
            in_budget = time.monotonic() - started < max_seconds
            hessians = _hessians(result, chunk, data, batch_size, False) if in_budget else {}
            for layer, bits in chunk:
                in_budget = time.monotonic() - started < max_seconds
                hessian = hessians.get(layer.name) if in_budget else None
                options["fallback"] = "nearest (no Hessian)" if in_budget else "nearest (gptq time budget spent)"
                _round_layer(result, plan, layer, bits, hessian, options)
                bar.update(1)
    mark_applied(result, PASS_NAME, layers=len(targets), sequential=sequential)
    return result, plan


RoundedWeights = dict[int, dict[str, tuple[np.ndarray, TensorQuant]]]
ROUNDING_OPTIONS = ("block_size", "damp", "act_order", "scale_search")  # gptq's options that shape one layer


def gptq_candidates(
    model: onnx.ModelProto,
    plan: QuantPlan,
    data: dict[str, np.ndarray],
    widths: list[int],
    *,
    batch_size: int = 32,
    **options,
) -> RoundedWeights:
    """Each weighted layer of ``plan`` GPTQ-rounded at each of ``widths``: {bits: {layer: (weight, grid)}}.

    What the allocator measures candidates with, so that a layer's sensitivity at
    4 bits is that of the weights the rounding pass will really export, not of
    nearest rounding (GPTQ roughly halves the output error of a 4-bit layer, and
    more for some layers than others). The Hessians come from one run of the
    float model (not sequential: which upstream layers will be rounded is what
    is being decided); ``options`` are :func:`gptq`'s rounding options
    (``damp``, ``act_order``, ``scale_search``, ``block_size``).  ``weight`` is
    the on-grid array to put in place of the layer's initializer, ``grid`` its
    TensorQuant for ``plan.tensors``; the model and plan are not changed.
    """
    defaults = inspect.signature(gptq).parameters  # one place for the rounding defaults: gptq's signature
    settings = {key: options.get(key, defaults[key].default) for key in ROUNDING_OPTIONS}
    layers = [layer for layer, _ in planned_layers(model, plan)]
    if not layers:
        return {bits: {} for bits in widths}
    hessians = _hessians(model, [(layer, 0) for layer in layers], data, batch_size, False)
    result: RoundedWeights = {}
    for bits in widths:
        # _round_layer writes the weight and its grid: into copies (the plan's own grids only guide block sizes)
        scratch_model = copy_model(model)
        scratch_plan = replace(plan, layers={}, tensors=dict(plan.tensors))
        rounded = {}
        for layer in layers:
            _round_layer(scratch_model, scratch_plan, layer, bits, hessians.get(layer.name),
                         {**settings, "fallback": "nearest (no Hessian)"})
            rounded[layer.name] = (initializer_array(scratch_model, layer.weight),
                                   scratch_plan.tensors[layer.weight])
        result[bits] = rounded
    return result
