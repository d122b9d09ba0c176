"""Observers on synthetic distributions: clipping where it should, streaming == one-shot."""

import numpy as np
import pytest

from compiler.errors import EdgeqError
from compiler.observers import (
    METHODS,
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    fake_quantize,
    fit_weight_range,
    make_observer,
    quant_params,
)


def quant_mse(x: np.ndarray, lo, hi, bits: int, signed: bool, symmetric: bool) -> float:
    scale, zero_point = quant_params(lo, hi, bits, signed, symmetric)
    x = x.astype(np.float64)
    return float(np.mean((fake_quantize(x, scale, zero_point, bits, signed) - x) ** 2))


def feed(observer, x: np.ndarray, parts: int = 5):
    for part in np.array_split(x, parts):
        observer.update(part)
    return observer


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> np.ndarray:
    """Gaussian bulk plus a few far outliers: min-max wastes most levels on them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=100_000).astype(np.float32)
    x[rng.choice(x.size, 5, replace=False)] = 60.0
    x[rng.choice(x.size, 5, replace=False)] = -45.0
    return x


@pytest.fixture(scope="module")
def laplace() -> np.ndarray:
    return np.random.default_rng(1).laplace(size=100_000).astype(np.float32)


# MSE clips outliers only where rounding noise costs more than clipping them: with 10
# outliers in 100k values that is at 4 bits, not at 8 (5e-5 * 50**2 > (105/255)**2 / 12).
@pytest.mark.parametrize("method,bits", [("percentile", 8), ("entropy", 8), ("mse", 4)])
@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, False)])
def test_clipping_methods_clip_below_max(gaussian_with_outliers, method, bits, signed, symmetric):
    x = gaussian_with_outliers
    lo, hi = feed(make_observer(method), x).compute(bits, signed, symmetric)
    assert 0 < hi < 0.2 * x.max()
    if symmetric:
        assert lo == -hi
    else:
        assert -0.2 * x.max() < lo < 0


@pytest.mark.parametrize("data,bits,gain", [("gaussian_with_outliers", 4, 0.35), ("laplace", 8, 0.9)])
@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, False), (False, True)])
def test_mse_range_lowers_quantization_error(request, data, bits, gain, signed, symmetric):
    x = request.getfixturevalue(data)
    minmax = feed(MinMaxObserver(), x).compute(bits, signed, symmetric)
    mse = feed(MSEObserver(), x).compute(bits, signed, symmetric)
    error_minmax = quant_mse(x, *minmax, bits, signed, symmetric)
    error_mse = quant_mse(x, *mse, bits, signed, symmetric)
    assert error_mse < gain * error_minmax


def test_mse_at_8_bits_never_worse_than_minmax(gaussian_with_outliers):
    x = gaussian_with_outliers
    minmax = feed(MinMaxObserver(), x).compute(8, True, True)
    mse = feed(MSEObserver(), x).compute(8, True, True)
    assert quant_mse(x, *mse, 8, True, True) <= quant_mse(x, *minmax, 8, True, True)


def test_mse_keeps_range_when_there_is_nothing_to_clip():
    """Uniform data: any clipping costs more than it saves."""
    x = np.random.default_rng(1).uniform(-1, 1, 50_000).astype(np.float32)
    lo, hi = feed(MSEObserver(), x).compute(8, True, True)
    assert hi > 0.95 * np.abs(x).max()


def test_minmax_streaming_equals_one_shot_and_contains_zero():
    x = np.random.default_rng(2).uniform(1.0, 3.0, (64, 8)).astype(np.float32)
    streamed = feed(MinMaxObserver(), x, parts=7).compute(8, False, False)
    one_shot = feed(MinMaxObserver(), x, parts=1).compute(8, False, False)
    assert streamed == one_shot == (0.0, float(x.max()))
    assert feed(MinMaxObserver(), x).compute(8, True, True) == (-float(x.max()), float(x.max()))


def test_per_channel_minmax_and_streaming():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6, 5, 5)).astype(np.float32) * np.arange(1, 7)[None, :, None, None]
    lo, hi = feed(make_observer("minmax", axis=1), x, parts=4).compute(8, False, False)
    np.testing.assert_allclose(hi, np.maximum(x.max(axis=(0, 2, 3)), 0))
    np.testing.assert_allclose(lo, np.minimum(x.min(axis=(0, 2, 3)), 0))


def test_histogram_rebinning_matches_one_shot_histogram():
    """Growing the range batch by batch merges bins exactly: the final histogram is the
    histogram of all data on the final grid, and nothing is lost."""
    rng = np.random.default_rng(4)
    batches = [rng.normal(scale=s, size=3000).astype(np.float32) for s in (0.1, 1.0, 5.0, 40.0)]
    batches.append(np.zeros(100, np.float32))
    observer = PercentileObserver()
    for batch in batches:
        observer.update(batch)
    histogram = observer.histogram
    everything = np.concatenate(batches)
    assert histogram.counts.sum() + histogram.zeros.sum() == everything.size
    assert histogram.zeros[0] == np.count_nonzero(everything == 0)
    assert histogram.width[0] > batches[0].std() / 1000  # grew from the first batch's grid
    index = histogram.bin_indices(everything[None])[0]
    expected = np.bincount(index[everything != 0], minlength=histogram.bins)
    np.testing.assert_array_equal(histogram.counts[0], expected)
    left = histogram.left_edges(0)
    assert left[0] <= everything.min() and everything.max() < left[-1] + histogram.width[0]
    # the observed range spans at least half of the window (resolution does not collapse)
    assert (everything.max() - everything.min()) / histogram.width[0] > histogram.bins / 2 - 2


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_agree_streamed_and_one_shot(laplace, method):
    """Streaming only changes the grid the histogram ends on, not the answer (to a few bins).

    The streamed run sees the values sorted by magnitude: its range grows every batch."""
    by_magnitude = laplace[np.argsort(np.abs(laplace))]
    streamed = feed(make_observer(method), by_magnitude, parts=10)
    one_shot = feed(make_observer(method), laplace, parts=1)
    assert streamed.histogram.width[0] != one_shot.histogram.width[0]
    # entropy at 8 bits: KL(threshold) is flat within +-15% on 100k Laplace values (TensorRT's
    # criterion, not the histogram), so its threshold is compared where the minimum is sharp
    for bits in (4,) if method == "entropy" else (4, 8):
        a = streamed.compute(bits, True, True)[1]
        b = one_shot.compute(bits, True, True)[1]
        assert a == pytest.approx(b, rel=0.1)


def test_percentile_matches_numpy_percentile():
    x = np.random.default_rng(6).normal(size=100_000).astype(np.float32)
    lo, hi = feed(PercentileObserver(percentile=99.0), x).compute(8, False, False)
    assert hi == pytest.approx(np.percentile(x, 99.0), rel=0.01)
    assert lo == pytest.approx(np.percentile(x, 1.0), rel=0.01)
    _, amax = feed(PercentileObserver(percentile=99.0), x).compute(8, True, True)
    assert amax == pytest.approx(np.percentile(np.abs(x), 99.0), rel=0.01)


def test_entropy_ignores_relu_zeros():
    """Half the values exactly 0 (post-ReLU) must not drag the threshold to zero."""
    rng = np.random.default_rng(7)
    x = np.maximum(rng.normal(size=100_000), 0).astype(np.float32)
    lo, hi = feed(EntropyObserver(), x).compute(8, False, False)
    assert lo == 0.0
    assert 2.5 < hi <= x.max()


def test_constant_zero_tensor_and_nonfinite_values():
    observer = feed(make_observer("entropy"), np.zeros(1000, np.float32))
    assert observer.compute(8, False, False) == (0.0, 0.0)
    observer = MinMaxObserver()
    observer.update(np.array([1.0, np.inf, -2.0, np.nan], np.float32))
    assert observer.compute(8, True, False) == (-2.0, 1.0)
    assert observer.nonfinite == 2


def test_per_channel_mse_observer_clips_each_channel():
    rng = np.random.default_rng(8)
    x = rng.laplace(size=(2000, 3)).astype(np.float32) * np.array([1.0, 2.0, 4.0])
    x[0] = [50.0, 100.0, 200.0]
    lo, hi = feed(make_observer("mse", axis=-1), x).compute(4, True, True)
    assert lo.shape == hi.shape == (3,)
    assert np.all(hi < 0.5 * x.max(axis=0))
    assert hi[0] < hi[1] < hi[2]


@pytest.mark.parametrize("signed,symmetric", [(True, True), (True, False), (False, False)])
def test_fit_weight_range_mse_beats_minmax_per_channel(signed, symmetric):
    rng = np.random.default_rng(9)
    scales = np.arange(1, 9)[:, None, None, None]  # heavy tails (Student t), one scale per channel
    weight = (rng.standard_t(3, size=(8, 32, 3, 3)) * scales).astype(np.float32)
    lo_m, hi_m = fit_weight_range(weight, 0, 4, "minmax", signed=signed, symmetric=symmetric)
    lo, hi = fit_weight_range(weight, 0, 4, "mse", signed=signed, symmetric=symmetric)
    assert lo.shape == (8,)
    rows = weight.reshape(8, -1)
    better = [quant_mse(rows[c], lo[c], hi[c], 4, signed, symmetric) for c in range(8)]
    worse = [quant_mse(rows[c], lo_m[c], hi_m[c], 4, signed, symmetric) for c in range(8)]
    assert np.all(np.array(better) < 0.95 * np.array(worse))


def test_fit_weight_range_per_tensor_and_other_methods():
    weight = np.random.default_rng(10).normal(size=(16, 16)).astype(np.float32)
    lo, hi = fit_weight_range(weight, None, 8, "minmax")
    assert hi == pytest.approx(np.abs(weight).max()) and lo == -hi
    for method in METHODS:
        lo, hi = fit_weight_range(weight, 1, 8, method)
        assert hi.shape == (16,) and np.all(hi <= np.abs(weight).max(axis=0) + 1e-6)


def test_unknown_method_is_a_user_error():
    with pytest.raises(EdgeqError, match="unknown calibration method 'kl'.*minmax"):
        make_observer("kl")
    with pytest.raises(EdgeqError, match="percentile must be"):
        make_observer("percentile", percentile=20)


def test_compute_before_update_is_an_internal_error():
    with pytest.raises(ValueError):
        MinMaxObserver().compute(8, False, False)


def test_subsampled_histogram_does_not_alias_and_keeps_the_answer():
    """Large batches are binned on a strided subset: a stride sharing a factor with a dim
    would see only some columns (here column 0 holds every large value)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(600, 30)).astype(np.float32)
    x[:, 0] = 10.0
    full = PercentileObserver(percentile=99.0, max_values=None)
    sampled = PercentileObserver(percentile=99.0, max_values=2000)
    full.update(x)
    sampled.update(x)
    large = sampled.histogram.left_edges(0) > 6.0
    share = sampled.histogram.counts[0][large].sum() / sampled.histogram.counts.sum()
    assert share == pytest.approx(1 / 30, rel=0.1)
    assert sampled.histogram.counts.sum() + sampled.histogram.zeros.sum() == pytest.approx(x.size)
    assert sampled.compute(8, True, True)[1] == pytest.approx(full.compute(8, True, True)[1], rel=0.02)
    assert sampled.compute(8, True, True)[1] <= 10.0
