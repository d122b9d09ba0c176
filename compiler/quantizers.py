"""The weight quantization grid shared by every pass that touches weights.

One definition, used by ``passes/insert_qdq`` (nearest rounding), by
``passes/gptq`` (which rounds differently but onto the *same* grid) and by
``passes/bias_correction``:

* symmetric, zero point 0;
* per channel along ``axis`` (or per tensor when ``axis`` is None), or
  block-wise: ``block_size`` given, ``axis`` is then the *blocked* axis (the
  reduction axis of a MatMul/Gemm weight) and every block of ``block_size``
  consecutive elements along it gets its own scale, separately for every
  index of the other axes -- the ONNX DequantizeLinear ``axis``/``block_size``
  convention (opset 21), GPTQ's "group size", onnxruntime's MatMulNBits
  ``block_size``.  A block scale array has the weight's rank, with
  ``ceil(dim / block_size)`` on ``axis`` (the last block may be shorter);
* block-wise grids are asymmetric: each block also gets a zero point (in the
  signed storage range), so its ``2**bits`` levels span ``[min, max]`` of the
  block rather than ``[-max|w|, max|w|]`` (as onnxruntime's MatMulNBits and
  GPTQ do); ``search_weight_grid`` fits them by a clipping-ratio search;
* per channel: ``scale = max|w_channel| / qmax`` with ``qmax = 2**(bits-1) - 1``, so the
  grid is ``[-qmax, qmax]`` (the asymmetric extra value ``-2**(bits-1)`` is
  never produced by nearest rounding, but is allowed by the clip so a
  rounding pass may use it);
* 2-bit weights use the same code paths as int4 -- per channel symmetric (zero
  point 0, so the int32 bias at ``sx * sw`` and onnxruntime's integer kernels
  need no weight zero point), block-wise asymmetric (the block's 4 levels
  span its range) -- but their per-channel grid ``{-2, -1, 0, 1} * scale`` is
  too coarse for a min-max scale: ``max|w| / 1`` rounds most of a channel to
  zero. Their scales are always fitted by :func:`search_weight_grid` over the
  usual clipping ratios [0.5, 1]. Measured on MobileNetV2 (12 layers, one at a
  time at 2 bits, weights only, output KL against float on 64 photos): median
  KL 1.72 with min-max scales, 0.75 searched in [0.5, 1], 1.83 searched down to
  0.1 -- the weight-MSE optimum (about 0.3 of ``max|w|`` for Gaussian weights)
  clips the large weights the output depends on;
* round half to even (``np.round``), as ONNX QuantizeLinear does;
* a tensor or block that is all zeros gets scale 1.0 (any positive value
  represents it exactly; 1.0 keeps later requantization multipliers finite),
  a channel that is all zeros the floor below;
* per channel, no scale is below ``2**-12`` of the tensor's largest
  (:data:`MIN_CHANNEL_SCALE_RATIO`): such a channel (a dead one after
  BatchNorm folding: EfficientNet-Lite0 has them in 28 layers, down to 1e-10
  of the largest) has all its weights within 1/4096 of the largest channel's
  rounding step, so the floor changes the layer's error by nothing measurable,
  while its own tiny scale would put its int32 bias ``b / (sx * sw)`` near
  2**30, which keeps integer kernels off their short (tie-free) epilogue for
  the whole layer (targets/cpu: EfficientNet-Lite0's first depthwise layer
  84 us instead of 42 us in its compiled library).

Arithmetic is float32 (``w / scale``), which is what QuantizeLinear computes.
"""

from __future__ import annotations

import numpy as np

from compiler.plan import TensorQuant, int_range

# Weight widths the grid and the QDQ export produce (2-bit: see passes/insert_qdq for its storage).
WEIGHT_BITS = (2, 4, 8)
# Widths whose symmetric scales are always fitted by search_weight_grid rather than min-max.
SEARCHED_SCALE_MAX_BITS = 2
# The smallest per-channel scale, as a fraction of the tensor's largest (see the module docstring).
MIN_CHANNEL_SCALE_RATIO = 2.0**-12


def qmax_for(bits: int) -> int:
    """The largest positive value of a signed ``bits``-wide integer."""
    if bits < 2:
        raise ValueError(f"signed symmetric weights need at least 2 bits, got {bits}")
    return (1 << (bits - 1)) - 1


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axis = axis % ndim
    return tuple(a for a in range(ndim) if a != axis)


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel ``scale`` so it broadcasts along ``axis`` of an ndim tensor.

    A scale that already has the tensor's rank (an expanded block scale,
    :func:`expand_block_scale`) is used as it is.
    """
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == ndim and ndim > 1:
        return scale
    if axis is None or scale.ndim == 0 or scale.size == 1:
        return scale.reshape(()) if scale.size == 1 else scale
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


def block_view(weight: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``weight`` with ``axis`` split into (blocks, block_size), the last block zero-padded."""
    weight = np.asarray(weight)
    axis = axis % weight.ndim
    blocks = -(-weight.shape[axis] // block_size)
    pad = blocks * block_size - weight.shape[axis]
    if pad:
        widths = [(0, 0)] * weight.ndim
        widths[axis] = (0, pad)
        weight = np.pad(weight, widths)
    return weight.reshape(weight.shape[:axis] + (blocks, block_size) + weight.shape[axis + 1:])


def expand_block_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A block scale repeated to one scale per element of a tensor of ``shape``."""
    axis = axis % len(shape)
    scale = np.asarray(scale, dtype=np.float32)
    return np.repeat(scale, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


def weight_scale(weight: np.ndarray, axis: int | None, bits: int, block_size: int | None = None) -> np.ndarray:
    """Symmetric scale ``max|w| / qmax``: per channel on ``axis`` (1-D), per tensor (shape [1]),
    or, with ``block_size``, per block along ``axis`` (the weight's rank, see the module docstring).
    At 2 bits the clipped ``r * max|w| / qmax``, ``r`` in [0.5, 1], with the least squared error instead."""
    weight = np.asarray(weight, dtype=np.float32)
    if bits <= SEARCHED_SCALE_MAX_BITS and weight.size:
        scale = _searched_scale(weight, axis, bits, block_size)
    else:
        if block_size:
            absmax = np.max(np.abs(block_view(weight, axis, block_size)), axis=axis % weight.ndim + 1)
        else:
            absmax = np.max(np.abs(weight), axis=_reduce_axes(weight.ndim, axis)).reshape(-1)
        scale = (absmax / np.float32(qmax_for(bits))).astype(np.float32)
    if axis is not None and not block_size and scale.size > 1:
        scale = np.maximum(scale, np.float32(scale.max() * MIN_CHANNEL_SCALE_RATIO))
    scale[~(scale > 0)] = np.float32(1.0)  # all-zero tensor or block: any scale is exact
    return scale


def _searched_scale(weight: np.ndarray, axis: int | None, bits: int, block_size: int | None) -> np.ndarray:
    """:func:`weight_scale`'s shapes, each scale fitted by :func:`search_weight_grid` (symmetric)."""
    if block_size:  # blocks along ``axis``: search along the last axis, then put it back
        scale, _ = search_weight_grid(np.moveaxis(weight, axis, -1), None, bits, block_size)
        return np.moveaxis(scale, -1, axis % weight.ndim)
    rows = (weight.reshape(1, -1) if axis is None
            else np.moveaxis(weight, axis % weight.ndim, 0).reshape(weight.shape[axis % weight.ndim], -1))
    return search_weight_grid(rows, None, bits)[0].reshape(-1)


def _element_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    if block_size:
        return expand_block_scale(scale, shape, axis, block_size)
    return _broadcast(scale, len(shape), axis)


def quantize_weight(
    weight: np.ndarray, scale: np.ndarray, axis: int | None, bits: int, block_size: int | None = None,
    zero_point: np.ndarray | None = None,
) -> np.ndarray:
    """Integer weights ``clip(round_half_even(w / scale) + zero_point)``; int8 for bits <= 8, else int32."""
    weight = np.asarray(weight, dtype=np.float32)
    lo, hi = int_range(bits, signed=True)
    q = np.round(weight / _element_scale(scale, weight.shape, axis, block_size))
    if zero_point is not None:
        q = q + _element_scale(zero_point, weight.shape, axis, block_size)
    return np.clip(q, lo, hi).astype(np.int8 if bits <= 8 else np.int32)


def dequantize_weight(
    q: np.ndarray, scale: np.ndarray, axis: int | None, block_size: int | None = None,
    zero_point: np.ndarray | None = None,
) -> np.ndarray:
    """Float32 value of integer weights ``(q - zero_point) * scale``."""
    values = q.astype(np.float32)
    if zero_point is not None:
        values = values - _element_scale(zero_point, q.shape, axis, block_size)
    return (values * _element_scale(scale, q.shape, axis, block_size)).astype(np.float32)


def fake_quantize_weight(
    weight: np.ndarray, axis: int | None, bits: int, scale: np.ndarray | None = None,
    block_size: int | None = None, zero_point: np.ndarray | None = None,
) -> np.ndarray:
    """The float32 value the quantized weight will have (``scale`` defaults to :func:`weight_scale`)."""
    if scale is None:
        scale = weight_scale(weight, axis, bits, block_size)
    q = quantize_weight(weight, scale, axis, bits, block_size, zero_point)
    return dequantize_weight(q, scale, axis, block_size, zero_point)


def search_weight_grid(
    weight: np.ndarray, importance: np.ndarray | None, bits: int, block_size: int | None = None, *,
    asymmetric: bool = False, grid: int = 20, lowest: float = 0.5,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) of rows of ``weight`` [..., K], per row or per block of ``block_size``
    along K, clipping the range by the ratio in ``[lowest, 1]`` that minimises the squared error
    weighted by ``importance`` [..., K] (e.g. the layer Hessian's diagonal; None: plain MSE).

    Symmetric: ``r * max|w| / qmax``; asymmetric: ``r * (max - min) / (2**bits - 1)`` with the
    zero point that puts ``r * min`` on the lowest level. Returns (scale, zero point or None),
    shaped [...] per row or [..., ceil(K / block_size)] per block; float32 / int32.
    """
    lo, hi = int_range(bits, signed=True)
    size = block_size or weight.shape[-1]
    blocks = block_view(np.asarray(weight, dtype=np.float64), -1, size)  # [..., nb, B], zero-padded
    weights = (np.ones(blocks.shape[-2:]) if importance is None
               else block_view(np.asarray(importance, dtype=np.float64), -1, size)[..., None, :, :])
    if asymmetric:
        low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    else:
        high = np.max(np.abs(blocks), axis=-1)
        low = -high
    best_scale = np.ones(blocks.shape[:-1])
    best_zero = np.zeros(blocks.shape[:-1])
    best_error = np.full(blocks.shape[:-1], np.inf)
    for ratio in np.linspace(1.0, lowest, grid):
        if asymmetric:
            scale = ((high - low) * ratio / (hi - lo)).astype(np.float32).astype(np.float64)
            scale[~(scale > 0)] = 1.0
            zero = np.clip(np.round(lo - low * ratio / scale), lo, hi)
        else:
            scale = (high * ratio / hi).astype(np.float32).astype(np.float64)
            scale[~(scale > 0)] = 1.0
            zero = np.zeros_like(scale)
        q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], lo, hi)
        error = np.sum(((q - zero[..., None]) * scale[..., None] - blocks) ** 2 * weights, axis=-1)
        better = error < best_error
        best_scale[better], best_zero[better], best_error[better] = scale[better], zero[better], error[better]
    best_scale, best_zero = best_scale.astype(np.float32), best_zero.astype(np.int32)
    if not block_size:
        best_scale, best_zero = best_scale[..., 0], best_zero[..., 0]
    return best_scale, (best_zero if asymmetric else None)


def weight_tensor_quant(
    name: str, weight: np.ndarray, axis: int | None, bits: int, scale: np.ndarray | None = None,
    block_size: int | None = None, zero_point: np.ndarray | None = None,
) -> TensorQuant:
    """The plan entry for a weight quantized on this grid (``scale`` defaults to :func:`weight_scale`;
    ``zero_point`` to zeros, the symmetric grid)."""
    if scale is None:
        scale = weight_scale(weight, axis, bits, block_size)
    scale = np.asarray(scale, dtype=np.float32)
    scale_shape = [int(d) for d in scale.shape] if block_size else None
    zeros = (np.zeros(scale.size, dtype=np.int64) if zero_point is None
             else np.asarray(zero_point, dtype=np.int64).reshape(scale.shape).reshape(-1))
    scale = scale.reshape(-1)
    absmax = float(np.max(np.abs(weight))) if np.size(weight) else 0.0
    return TensorQuant(
        name=name,
        role="weight",
        bits=bits,
        signed=True,
        scale=[float(s) for s in scale],
        zero_point=[int(z) for z in zeros],
        axis=None if axis is None else int(axis) % np.ndim(weight),
        block_size=int(block_size) if block_size else None,
        scale_shape=scale_shape,
        range_min=-absmax,
        range_max=absmax,
    )


BLOCK_OPS = ("MatMul", "Gemm")


def weight_block_size(
    block_size: int | None, op_type: str, weight_shape: tuple[int, ...], bits: int, out_axis: int
) -> int | None:
    """The block size a layer's weight gets under the plan's ``weight_block_size`` (None: per channel).

    Block-wise scales apply to 2-D MatMul/Gemm weights below 8 bits whose
    reduction axis is longer than one block; convolutions, int8 weights (which
    keep onnxruntime's integer QLinearMatMul/QGemm kernels) and short
    reductions stay per output channel.
    """
    if not block_size or op_type not in BLOCK_OPS or len(weight_shape) != 2 or bits >= 8:
        return None
    reduction = weight_shape[1 - out_axis % 2]
    return block_size if reduction > block_size else None


def layer_weight_grid(
    block_size: int | None, op_type: str, weight_shape: tuple[int, ...], bits: int, out_axis: int
) -> tuple[int, int | None]:
    """(axis, block_size) of a layer's weight quantizer: the output axis and None (per channel), or
    the reduction axis and the block size (block-wise) -- see :func:`weight_block_size`."""
    block = weight_block_size(block_size, op_type, weight_shape, bits, out_axis)
    if block is None:
        return out_axis % len(weight_shape), None
    return 1 - out_axis % 2, block


def weight_output_axis(op_type: str, weight_ndim: int, trans_b: int = 0) -> int:
    """The output-channel axis of a layer's weight: the per-channel quantization axis.

    Conv: 0 (OIHW). ConvTranspose: 1 (IOHW, group 1). Gemm: 0 if transB else 1.
    MatMul: the last axis (``[..., K, N]``).
    """
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    if op_type == "MatMul":
        return weight_ndim - 1
    raise ValueError(f"no weight axis rule for op {op_type}")


def planned_weight_scale(
    tensors: dict[str, TensorQuant], name: str, weight: np.ndarray, axis: int | None, bits: int
) -> np.ndarray:
    """The scale QDQ insertion will use for weight ``name``: the plan's entry verbatim, else the grid.

    ``tensors`` is ``QuantPlan.tensors``; ``axis`` the weight's output axis. A
    block-wise entry comes back expanded to one scale per weight element (it
    broadcasts like a per-channel scale in :func:`quantize_weight` and friends).
    An entry with other bits or axis is a stale decision and an error (the
    caller must drop it before re-rounding).
    """
    entry = tensors.get(name)
    if entry is None:
        return weight_scale(weight, axis, bits)
    if entry.block_wise:
        if entry.bits != bits:
            raise ValueError(f"plan entry for weight {name} has bits={entry.bits}, layer wants bits={bits}")
        if any(entry.zero_point):
            raise ValueError(f"plan entry for weight {name} has zero points: use planned_fake_quantize")
        return expand_block_scale(entry.scale_array(), np.shape(weight), entry.axis, entry.block_size)
    entry_axis = None if entry.axis is None else entry.axis % np.ndim(weight)
    wanted_axis = None if axis is None else axis % np.ndim(weight)
    if entry.bits != bits or entry_axis != wanted_axis:
        raise ValueError(
            f"plan entry for weight {name} has bits={entry.bits} axis={entry.axis}, layer wants bits={bits} axis={axis}"
        )
    return entry.scale_array()


def planned_fake_quantize(
    tensors: dict[str, TensorQuant], name: str, weight: np.ndarray, axis: int | None, bits: int
) -> np.ndarray:
    """The float32 value QDQ insertion will give weight ``name``: its plan entry (any granularity,
    zero points included), else the shared per-channel grid on ``axis`` (the output axis)."""
    entry = tensors.get(name)
    if entry is None or not entry.block_wise:
        return fake_quantize_weight(weight, axis, bits, planned_weight_scale(tensors, name, weight, axis, bits))
    if entry.bits != bits:
        raise ValueError(f"plan entry for weight {name} has bits={entry.bits}, layer wants bits={bits}")
    return fake_quantize_weight(weight, entry.axis, bits, entry.scale_array(), entry.block_size,
                                entry.zero_point_array())


def block_weight_quant(name: str, weight: np.ndarray, axis: int, bits: int, block_size: int) -> TensorQuant:
    """The plan entry of a block-wise weight fitted without data: asymmetric blocks, MSE-searched clipping."""
    moved = np.moveaxis(np.asarray(weight, dtype=np.float32), axis, -1)  # blocks along the last axis
    scale, zero = search_weight_grid(moved, None, bits, block_size, asymmetric=True)
    return weight_tensor_quant(name, weight, axis, bits, np.moveaxis(scale, -1, axis), block_size,
                               np.moveaxis(zero, -1, axis))


def planned_weight_quant(name: str, weight: np.ndarray, op_type: str, out_axis: int, bits: int,
                         plan_block_size: int | None) -> TensorQuant:
    """The weight quantizer QDQ export gives a layer at ``bits`` when nothing (GPTQ) fitted one: per
    channel, or block-wise where the plan's block size applies (:func:`layer_weight_grid`)."""
    axis, block_size = layer_weight_grid(plan_block_size, op_type, weight.shape, bits, out_axis)
    if block_size:
        return block_weight_quant(name, weight, axis, bits, block_size)
    return weight_tensor_quant(name, weight, axis, bits)


def dequantized(weight: np.ndarray, tq: TensorQuant) -> np.ndarray:
    """``weight`` rounded onto ``tq``'s grid, as float32."""
    return fake_quantize_weight(weight, tq.axis, tq.bits, tq.scale_array(), tq.block_size, tq.zero_point_array())


def fake_quantize_activation(
    x: np.ndarray, bits: int, low: float | None = None, high: float | None = None, *, mse_clip: bool = False
) -> np.ndarray:
    """Per-tensor asymmetric fake quantization to ``bits`` over ``[low, high]`` (default: x's min/max).

    ``mse_clip``: shrink the range by the factor (1, 0.95, ..., 0.3) that gives
    the least squared error on ``x`` -- what an MSE-calibrated quantizer does.
    For the passes that *estimate* quantization error (smoothing strength
    search); the activation quantizers of the real model are fitted by calibration.
    """
    low = min(float(np.min(x)) if low is None else low, 0.0)
    high = max(float(np.max(x)) if high is None else high, 0.0)
    if not mse_clip:
        return _fake_quantize_range(x, bits, low, high)
    best, best_error = x, np.inf
    for ratio in np.linspace(1.0, 0.3, 15):
        candidate = _fake_quantize_range(x, bits, low * ratio, high * ratio)
        error = float(np.sum((candidate - x) ** 2))
        if error < best_error:
            best, best_error = candidate, error
    return best


def _fake_quantize_range(x: np.ndarray, bits: int, low: float, high: float) -> np.ndarray:
    levels = (1 << bits) - 1
    scale = (high - low) / levels if high > low else 1.0
    zero_point = np.round(-low / scale)
    q = np.clip(np.round(x / scale) + zero_point, 0, levels)
    return ((q - zero_point) * scale).astype(x.dtype)
