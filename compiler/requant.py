"""Dyadic requantization: the ONE integer rounding rule of the integer graph.

A real rescale factor ``r > 0`` (e.g. ``s_x * s_w / s_y``) is approximated by
``M * 2**-s`` with an integer multiplier ``M`` in ``[2**30, 2**31)`` (31
significant bits, HAWQ-V3 style) and a right shift ``s`` in ``[1, 62]``.
Applying it to an integer accumulator is

    requant(acc, M, s) = round_half_even(acc * M / 2**s)

computed exactly in int64 as

    p    = acc * M
    q    = (p + (1 << (s - 1))) >> s            # arithmetic shift: half up
    tie  = (p & ((1 << s) - 1)) == (1 << (s - 1))
    q    = q - (tie & q & 1)                     # exact ties go to the even neighbour

Ties to even (not half up) because that is ONNX QuantizeLinear's rule: where
the rescale is exact (2x2 average pooling, equal-scale adds, 8x8 global
pooling) the integer graph then gives exactly the QDQ model's values.
``acc * M`` fits int64 whenever ``|acc| < 2**32`` because ``M < 2**31`` --
int32 accumulators always do.  Every target implements exactly this expression.

Edge cases of :func:`dyadic`:

* ``r`` so small that ``s`` would exceed 62: ``s`` is capped at 62 and ``M``
  becomes ``round(r * 2**62)`` (below ``2**30``, possibly 0) -- the result is
  then 0 or +-1 for any int32 accumulator anyway.
* ``r >= 2**30``: cannot be represented with ``s >= 1``; ``ValueError``
  (no quantized network has such ratios; it signals a broken scale).
* ``r == 0``: ``M = 0, s = 1`` (the result is always 0).
"""

from __future__ import annotations

import numpy as np

MULTIPLIER_BITS = 31  # M in [2**30, 2**31)
MAX_SHIFT = 62  # keeps 1 << (s - 1) and acc * M + (1 << (s - 1)) inside int64
IDENTITY_MULTIPLIER = 1 << 30
IDENTITY_SHIFT = 30  # requant(v, 2**30, 30) == v exactly for every int32 v (no ties)


def dyadic(real: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Integer multiplier and right shift with ``M * 2**-s ~= real`` (elementwise).

    Returns two int64 arrays with the shape of ``real`` (0-d for a scalar).
    """
    values = np.asarray(real, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"requantization scale must be finite and >= 0, got {values.ravel()[:4]}")
    mantissa, exponent = np.frexp(values)  # values = mantissa * 2**exponent, mantissa in [0.5, 1)
    multiplier = np.round(mantissa * float(1 << MULTIPLIER_BITS)).astype(np.int64)
    shift = (MULTIPLIER_BITS - exponent).astype(np.int64)
    # Rounding the mantissa up to 2**31 leaves the range: renormalise.
    overflow = multiplier == (1 << MULTIPLIER_BITS)
    multiplier = np.where(overflow, multiplier >> 1, multiplier)
    shift = np.where(overflow, shift - 1, shift)
    if np.any((shift < 1) & (values > 0)):
        raise ValueError(f"requantization scale too large for a dyadic number: {values.max()}")
    tiny = shift > MAX_SHIFT
    if np.any(tiny):
        # Only the tiny values: the large ones would overflow int64 in the cast.
        capped = np.round(np.where(tiny, values, 0.0) * 2.0**MAX_SHIFT).astype(np.int64)
        multiplier = np.where(tiny, capped, multiplier)
        shift = np.where(tiny, MAX_SHIFT, shift)
    zero = values == 0
    multiplier = np.where(zero, 0, multiplier).astype(np.int64)
    shift = np.where(zero, 1, shift).astype(np.int64)
    return multiplier, shift


def channel_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def requantize(
    acc: np.ndarray,
    multiplier: np.ndarray | int,
    shift: np.ndarray | int,
    axis: int | None = None,
) -> np.ndarray:
    """``round_half_even(acc * M / 2**s)`` in int64 (see the module docstring).

    ``multiplier``/``shift`` are scalars or one entry per slice of ``acc`` along
    ``axis``. Returns int64; callers add the zero point and :func:`saturate`.
    """
    acc = np.asarray(acc, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if multiplier.size > 1 or shift.size > 1:
        if axis is None:
            raise ValueError("per-channel multiplier needs an axis")
        multiplier = multiplier.reshape(channel_shape(acc.ndim, axis))
        shift = shift.reshape(channel_shape(acc.ndim, axis))
    else:
        multiplier = multiplier.reshape(())
        shift = shift.reshape(())
    if np.any(shift < 1) or np.any(shift > MAX_SHIFT):
        raise ValueError("shift must be in [1, 62]")
    half = np.left_shift(np.int64(1), shift - 1)
    mask = 2 * half - 1
    total = acc * multiplier
    total += half
    # acc * M is an exact tie iff (acc * M + half) is a multiple of 2**s
    tie = np.bitwise_and(total, mask) == 0
    total >>= shift
    total -= tie & (np.bitwise_and(total, 1) == 1)
    return total


def saturate(values: np.ndarray, lo: int, hi: int, dtype: str | np.dtype) -> np.ndarray:
    """Clamp to ``[lo, hi]`` and cast to ``dtype``."""
    return np.clip(values, lo, hi).astype(dtype)


def dtype_range(dtype: str | np.dtype) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def quantize_linear(
    x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int, dtype: str | np.dtype
) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)`` in float32."""
    scaled = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale))
    return np.clip(scaled.astype(np.float64) + zero_point, qmin, qmax).astype(dtype)


def dequantize_linear(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """ONNX DequantizeLinear: ``(x - zero_point) * scale`` in float32."""
    centred = np.asarray(x, dtype=np.int64) - zero_point
    return centred.astype(np.float32) * np.float32(scale)
