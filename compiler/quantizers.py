"""The weight quantization grid shared by every pass that touches weights.

One definition, used by ``passes/insert_qdq`` (nearest rounding), by
``passes/gptq`` (which rounds differently but onto the *same* grid) and by
``passes/bias_correction``:

* symmetric, zero point 0;
* per channel along ``axis`` (or per tensor when ``axis`` is None);
* ``scale = max|w_channel| / qmax`` with ``qmax = 2**(bits-1) - 1``, so the
  grid is ``[-qmax, qmax]`` (the asymmetric extra value ``-2**(bits-1)`` is
  never produced by nearest rounding, but is allowed by the clip so a
  rounding pass may use it);
* round half to even (``np.round``), as ONNX QuantizeLinear does;
* a channel that is all zeros gets scale 1.0 (any positive value represents
  it exactly; 1.0 keeps later requantization multipliers finite).

Arithmetic is float32 (``w / scale``), which is what QuantizeLinear computes.
"""

from __future__ import annotations

import numpy as np

from compiler.plan import TensorQuant, int_range


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
    """Reshape a per-channel ``scale`` so it broadcasts along ``axis`` of an ndim tensor."""
    scale = np.asarray(scale, dtype=np.float32)
    if axis is None or scale.ndim == 0 or scale.size == 1:
        return scale.reshape(()) if scale.size == 1 else scale
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


def weight_scale(weight: np.ndarray, axis: int | None, bits: int) -> np.ndarray:
    """Symmetric scale ``max|w| / qmax`` per channel on ``axis`` (1-D), or per tensor (shape [1])."""
    weight = np.asarray(weight, dtype=np.float32)
    absmax = np.max(np.abs(weight), axis=_reduce_axes(weight.ndim, axis)).reshape(-1)
    scale = (absmax / np.float32(qmax_for(bits))).astype(np.float32)
    scale[~(scale > 0)] = np.float32(1.0)  # all-zero channel: any scale is exact
    return scale


def quantize_weight(
    weight: np.ndarray, scale: np.ndarray, axis: int | None, bits: int
) -> np.ndarray:
    """Integer weights ``clip(round_half_even(w / scale))``; int8 for bits <= 8, else int32."""
    weight = np.asarray(weight, dtype=np.float32)
    lo, hi = int_range(bits, signed=True)
    q = np.round(weight / _broadcast(scale, weight.ndim, axis))
    return np.clip(q, lo, hi).astype(np.int8 if bits <= 8 else np.int32)


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """Float32 value of integer weights ``q * scale``."""
    return (q.astype(np.float32) * _broadcast(scale, q.ndim, axis)).astype(np.float32)


def fake_quantize_weight(
    weight: np.ndarray, axis: int | None, bits: int, scale: np.ndarray | None = None
) -> np.ndarray:
    """The float32 value the quantized weight will have (``scale`` defaults to :func:`weight_scale`)."""
    if scale is None:
        scale = weight_scale(weight, axis, bits)
    return dequantize_weight(quantize_weight(weight, scale, axis, bits), scale, axis)


def weight_tensor_quant(
    name: str, weight: np.ndarray, axis: int | None, bits: int, scale: np.ndarray | None = None
) -> TensorQuant:
    """The plan entry for a weight quantized on this grid (``scale`` defaults to :func:`weight_scale`)."""
    if scale is None:
        scale = weight_scale(weight, axis, bits)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    absmax = float(np.max(np.abs(weight))) if np.size(weight) else 0.0
    return TensorQuant(
        name=name,
        role="weight",
        bits=bits,
        signed=True,
        scale=[float(s) for s in scale],
        zero_point=[0] * scale.size,
        axis=None if axis is None else int(axis) % np.ndim(weight),
        range_min=-absmax,
        range_max=absmax,
    )


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

    ``tensors`` is ``QuantPlan.tensors``. An entry with other bits or axis is a
    stale decision and an error (the caller must drop it before re-rounding).
    """
    entry = tensors.get(name)
    if entry is None:
        return weight_scale(weight, axis, bits)
    entry_axis = None if entry.axis is None else entry.axis % np.ndim(weight)
    wanted_axis = None if axis is None else axis % np.ndim(weight)
    if entry.bits != bits or entry_axis != wanted_axis:
        raise ValueError(
            f"plan entry for weight {name} has bits={entry.bits} axis={entry.axis}, layer wants bits={bits} axis={axis}"
        )
    return entry.scale_array()


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
