"""The one integer rounding rule: dyadic approximation and round-half-even requantization."""

from fractions import Fraction

import numpy as np
import pytest

from compiler.requant import (
    IDENTITY_MULTIPLIER,
    IDENTITY_SHIFT,
    MAX_SHIFT,
    dequantize_linear,
    dyadic,
    quantize_linear,
    requantize,
    saturate,
)


def exact_round_half_even(acc: int, multiplier: int, shift: int) -> int:
    """Reference with Python's unbounded integers and rationals."""
    value = Fraction(acc * multiplier, 1 << shift)
    return round(value)  # Python rounds Fractions half to even


def test_dyadic_is_accurate_and_normalised_over_a_wide_range():
    reals = np.geomspace(1e-9, 1e8, 2000)
    multiplier, shift = dyadic(reals)
    normal = shift < MAX_SHIFT
    assert np.all((multiplier[normal] >= 2**30) & (multiplier[normal] < 2**31))
    assert np.all((shift >= 1) & (shift <= MAX_SHIFT))
    approx = multiplier.astype(np.float64) * np.exp2(-shift.astype(np.float64))
    assert np.all(np.abs(approx - reals)[normal] <= reals[normal] * 2.0**-30)


def test_dyadic_mantissa_rounding_up_to_two_pow_31_renormalises():
    real = (2**31 - 0.25) / 2**40  # mantissa rounds to 2**31
    multiplier, shift = dyadic(real)
    assert multiplier == 2**30 and shift == 39


def test_dyadic_tiny_scale_caps_shift_and_keeps_value():
    multiplier, shift = dyadic(3e-15)
    assert shift == MAX_SHIFT
    assert multiplier == round(3e-15 * 2**62)
    assert multiplier < 2**30


def test_dyadic_zero_and_errors():
    assert dyadic(0.0) == (0, 1)
    with pytest.raises(ValueError):
        dyadic(2.0**31)
    with pytest.raises(ValueError):
        dyadic(-0.5)
    with pytest.raises(ValueError):
        dyadic(float("nan"))


def test_requantize_matches_exact_rational_rounding():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**31), 2**31, 5000, dtype=np.int64)
    multiplier, shift = dyadic(rng.uniform(1e-6, 4.0, 5000))
    got = [int(requantize(a, m, s)) for a, m, s in zip(acc, multiplier, shift, strict=True)]
    want = [exact_round_half_even(int(a), int(m), int(s))
            for a, m, s in zip(acc, multiplier, shift, strict=True)]
    assert got == want


def test_requantize_ties_go_to_even_for_negative_and_positive():
    # acc / 4 with acc = 4k + 2: exact ties at k + 0.5
    acc = np.arange(-22, 23, 4, dtype=np.int64)
    got = requantize(acc, 1 << 30, 32)
    want = [round(Fraction(int(a), 4)) for a in acc]
    assert got.tolist() == want
    assert requantize(np.array([-6, -2, 2, 6]), 1 << 30, 32).tolist() == [-2, 0, 0, 2]


def test_requantize_huge_shift_extreme_accumulators_do_not_overflow():
    acc = np.array([2**31 - 1, -(2**31), -1, 1, 0], dtype=np.int64)
    multiplier, shift = 2**31 - 1, MAX_SHIFT
    got = requantize(acc, multiplier, shift)
    assert got.tolist() == [exact_round_half_even(int(a), multiplier, shift) for a in acc]


def test_identity_requantization_is_exact():
    values = np.arange(-(2**15), 2**15, 7, dtype=np.int64)
    assert np.array_equal(requantize(values, IDENTITY_MULTIPLIER, IDENTITY_SHIFT), values)


def test_per_channel_requantize_broadcasts_along_axis():
    acc = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4) * 1000 - 5000
    multiplier, shift = dyadic(np.array([0.1, 0.01, 0.5]))
    got = requantize(acc, multiplier, shift, axis=1)
    for channel in range(3):
        want = requantize(acc[:, channel], multiplier[channel], shift[channel])
        assert np.array_equal(got[:, channel], want)
    with pytest.raises(ValueError):
        requantize(acc, multiplier, shift)  # per-channel without an axis


def test_saturate_and_onnx_quantize_dequantize():
    assert saturate(np.array([-300, -5, 300]), -128, 127, np.int8).tolist() == [-128, -5, 127]
    scale = 0.5
    x = np.array([0.25, 0.75, -0.25, -0.75, 100.0], np.float32)  # x / scale ties at 0.5, 1.5 ...
    q = quantize_linear(x, scale, 10, 0, 255, np.uint8)
    assert q.tolist() == [10, 12, 10, 8, 210]
    assert dequantize_linear(q, scale, 10).tolist() == [0.0, 1.0, 0.0, -1.0, 100.0]
