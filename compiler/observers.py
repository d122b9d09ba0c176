"""Streaming range observers: the float range each quantized tensor is fitted to.

An observer sees a tensor batch by batch (``update``) and, at the end, answers
which float range ``(min, max)`` to quantize it to for a given integer type
(``compute(bits, signed, symmetric)``). Memory never depends on how much data
was seen: min-max keeps two numbers (per channel), the other observers keep a
fixed-size histogram whose range grows with the data.

Methods (``make_observer``):

* ``minmax``     -- the observed range.
* ``percentile`` -- clip at the given percentile (of |x| when symmetric).
* ``entropy``    -- TensorRT's entropy calibration: the |x| threshold whose
  clipped-and-quantized histogram has the smallest KL divergence to the
  observed one.
* ``mse``        -- the range that minimises the expected quantization error
  (rounding + clipping) of the observed histogram at the given bits.

Conventions shared by every observer (and by :func:`quant_params`):

* The returned range always contains 0 (zero must be exactly representable:
  padding, ReLU, and the zero point mean it). A tensor that was always 0 gives
  ``(0.0, 0.0)``; the caller picks a scale for it.
* ``symmetric`` returns ``(-a, a)``; signed symmetric uses ``scale = a / qmax``
  and zero point 0, unsigned symmetric uses the mid-point zero point.
* Per-channel observers (``axis`` given) return two arrays of shape ``[C]``.
* Exact zeros are counted apart from the histogram: they cost nothing to
  quantize, and left in the first bin they would dominate the entropy and MSE
  searches on post-ReLU tensors.
* Non-finite values (inf/NaN) are dropped and counted (``nonfinite``).

The histogram lives on a grid anchored at 0 (bin ``k`` covers
``[k*w, (k+1)*w)``). When a batch falls outside the current window the bin
width doubles (pairs of bins merge exactly) until the whole observed range fits
into ``bins`` bins, so after any number of updates the histogram equals the
one-shot histogram of all data on the final grid, and the observed range always
spans between ``bins/2`` and ``bins`` bins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from compiler.errors import EdgeqError
from compiler.plan import int_range

Range = tuple[float, float] | tuple[np.ndarray, np.ndarray]

METHODS = ("minmax", "percentile", "entropy", "mse")

# Coarse clip fractions of the observed range tried by the MSE search (1.0 = min-max);
# the search then refines around the best one in steps of 0.005.
MSE_GRID = np.linspace(0.04, 1.0, 25)


def quant_params(
    lo: np.ndarray | float, hi: np.ndarray | float, bits: int, signed: bool, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that map float range ``[lo, hi]`` onto the integer type.

    Vectorised over ``lo``/``hi``; the range is widened to contain 0 first.
    """
    qmin, qmax = int_range(bits, signed)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    tiny = np.finfo(np.float32).tiny
    if symmetric:
        amax = np.maximum(-lo, hi)
        if signed:
            scale = np.maximum(amax / qmax, tiny)
            zero_point = np.zeros_like(scale)
        else:
            scale = np.maximum(2.0 * amax / (qmax - qmin), tiny)
            zero_point = np.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        scale = np.maximum((hi - lo) / (qmax - qmin), tiny)
        zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def fake_quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, signed: bool
) -> np.ndarray:
    """Quantize then dequantize (round half to even, like ONNX QuantizeLinear)."""
    qmin, qmax = int_range(bits, signed)
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _finish(lo, hi, symmetric: bool, per_channel: bool) -> Range:
    """Widen to contain 0, make symmetric if asked, return floats or arrays."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        lo, hi = -amax, amax
    if per_channel:
        return lo.astype(np.float32), hi.astype(np.float32)
    return float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])


def _channels_first(array: np.ndarray, axis: int | None) -> np.ndarray:
    """``[C, N]`` view/copy of ``array`` (``C = 1`` when per tensor)."""
    if axis is None:
        return array.reshape(1, -1)
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)


class Observer(ABC):
    """Sees a tensor batch by batch; answers the range to quantize it to."""

    method = ""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.channels: int | None = None
        self.min: np.ndarray | None = None  # [C] observed, finite values only
        self.max: np.ndarray | None = None
        self.nonfinite = 0  # inf/NaN values dropped
        self.count = 0  # values seen (finite)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype.kind != "f":
            array = array.astype(np.float32)
        if array.size == 0:
            return
        if self.axis is not None:
            if self.axis < 0:
                self.axis += array.ndim
            if not 0 <= self.axis < array.ndim:
                raise ValueError(f"axis {self.axis} out of range for shape {array.shape}")
        rows = _channels_first(array, self.axis)
        if self.channels is None:
            self.channels = rows.shape[0]
        elif rows.shape[0] != self.channels:
            raise ValueError(f"channel count changed from {self.channels} to {rows.shape[0]}")
        lo = rows.min(axis=1)
        hi = rows.max(axis=1)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            finite = np.isfinite(rows)
            self.nonfinite += int(rows.size - finite.sum())
            if self.axis is None:
                rows = rows[finite].reshape(1, -1)
                if rows.size == 0:
                    return
                lo, hi = rows.min(axis=1), rows.max(axis=1)
            else:  # keep the [C, N] layout: bad values become their channel's finite minimum
                fill = np.where(finite, rows, np.nan)
                lo, hi = np.nanmin(fill, axis=1), np.nanmax(fill, axis=1)
                lo = np.where(np.isfinite(lo), lo, 0.0)
                hi = np.where(np.isfinite(hi), hi, 0.0)
                rows = np.where(finite, rows, lo[:, None])
        self.count += rows.shape[1] * rows.shape[0]
        self.min = lo.astype(np.float64) if self.min is None else np.minimum(self.min, lo)
        self.max = hi.astype(np.float64) if self.max is None else np.maximum(self.max, hi)
        self._update_rows(rows, lo, hi, array.shape)

    def _update_rows(
        self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]
    ) -> None:
        """Hook for observers that keep more than the min/max."""
        return None

    def compute(self, bits: int, signed: bool, symmetric: bool) -> Range:
        """The clipped float range ``(min, max)`` to quantize to (see module doc)."""
        if self.min is None:
            raise ValueError(f"{type(self).__name__}.compute() called before any finite data")
        lo, hi = self._clip(bits, signed, symmetric)
        lo = np.maximum(lo, np.minimum(self.min, 0.0))  # never wider than observed
        hi = np.minimum(hi, np.maximum(self.max, 0.0))
        return _finish(lo, hi, symmetric, self.per_channel)

    @abstractmethod
    def _clip(self, bits: int, signed: bool, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``[C]`` range before widening to 0 / symmetrising."""


class MinMaxObserver(Observer):
    method = "minmax"

    def _clip(self, bits, signed, symmetric):
        return self.min, self.max


class StreamingHistogram:
    """``[C, bins]`` histogram on a 0-anchored grid whose width doubles as needed."""

    def __init__(self, bins: int, max_values: int | None = None) -> None:
        if bins < 8 or bins % 2:
            raise ValueError("bins must be an even number >= 8")
        self.bins = bins
        self.max_values = max_values  # per channel and update; None: bin every value
        self.counts: np.ndarray | None = None  # [C, bins] float64 (scaled when subsampled)
        self.width: np.ndarray | None = None  # [C] float64, bin width
        self.offset: np.ndarray | None = None  # [C] int64, grid index of bin 0
        self.zeros: np.ndarray | None = None  # [C] exact zeros (kept out of counts)
        self.lo: np.ndarray | None = None  # [C] range seen so far
        self.hi: np.ndarray | None = None

    def bin_indices(self, rows: np.ndarray) -> np.ndarray:
        """Window-relative bin of every value of ``rows`` ``[C, N]`` (clipped into the window)."""
        far = np.abs(self.offset).max() + self.bins > 1 << 22  # float32 loses whole bins there
        work_type = np.float64 if far else np.float32
        scaled = np.multiply(rows, (1.0 / self.width)[:, None].astype(work_type), dtype=work_type)
        scaled -= self.offset[:, None].astype(work_type)  # floor(a) - k == floor(a - k), k integer
        np.clip(scaled, 0, self.bins - 1, out=scaled)  # >= 0 now, so truncation is floor
        return scaled.astype(np.intp)

    def update(
        self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...] = ()
    ) -> None:
        """Add ``rows`` ``[C, N]`` whose per-channel range is ``[lo, hi]``.

        With ``max_values`` set and more values than that per channel, a strided
        subset is binned and its counts are scaled up; the stride is a prime that
        divides none of ``shape`` (the tensor's dims) so it walks through every
        row/column instead of aliasing onto a few. ``lo``/``hi`` stay exact.
        """
        channels = rows.shape[0]
        if self.counts is None:
            span = np.maximum(hi - lo, np.maximum(np.abs(lo), np.abs(hi)))
            span = np.where(span > 0, span, 1e-30)
            # the first batch fills half the window: room to grow before re-binning
            self.width = span.astype(np.float64) / (self.bins // 2)
            self.offset = np.zeros(channels, dtype=np.int64)
            self.counts = np.zeros((channels, self.bins), dtype=np.float64)
            self.zeros = np.zeros(channels, dtype=np.float64)
            self.lo, self.hi = lo.astype(np.float64), hi.astype(np.float64)
            for channel in range(channels):
                self._place(channel, force=True)
        else:
            self.lo = np.minimum(self.lo, lo)
            self.hi = np.maximum(self.hi, hi)
            for channel in range(channels):
                self._place(channel)
        weight = 1.0
        if self.max_values and rows.shape[1] > self.max_values:
            stride = _coprime_stride(-(-rows.shape[1] // self.max_values), shape)
            total = rows.shape[1]
            rows = rows[:, ::stride]
            weight = total / rows.shape[1]
        zeros = np.count_nonzero(rows == 0, axis=1)
        index = self.bin_indices(rows)
        if channels > 1:
            index += (np.arange(channels, dtype=np.intp) * self.bins)[:, None]
        flat = np.bincount(index.ravel(), minlength=channels * self.bins).reshape(channels, -1)
        # zeros were binned too; take them out of the bin that holds 0
        zero_bin = np.clip(-self.offset, 0, self.bins - 1)
        flat[np.arange(channels), zero_bin] -= zeros
        self.counts += flat * weight
        self.zeros += zeros * weight

    def _place(self, channel: int, force: bool = False) -> None:
        """Grow/shift channel's window so that ``[lo, hi]`` fits, merging bins exactly."""
        width = self.width[channel]
        lo, hi = self.lo[channel], self.hi[channel]
        doublings = 0
        while np.floor(hi / width) - np.floor(lo / width) + 1 > self.bins:
            width *= 2.0
            doublings += 1
        first, last = int(np.floor(lo / width)), int(np.floor(hi / width))
        old_offset = int(self.offset[channel])
        if not force and doublings == 0 and old_offset <= first and last < old_offset + self.bins:
            return
        new_offset = first - (self.bins - (last - first + 1)) // 2  # centre the headroom
        grid = (old_offset + np.arange(self.bins, dtype=np.int64)) >> doublings
        target = np.clip(grid - new_offset, 0, self.bins - 1)
        self.counts[channel] = np.bincount(
            target, weights=self.counts[channel], minlength=self.bins
        )
        self.width[channel] = width
        self.offset[channel] = new_offset

    # -- views used by the clipping searches ------------------------------------
    def left_edges(self, channel: int) -> np.ndarray:
        return (self.offset[channel] + np.arange(self.bins)) * self.width[channel]

    def abs_counts(self, channel: int) -> np.ndarray:
        """Histogram of |x| on the same grid (bin k covers [k*w, (k+1)*w)), zeros excluded."""
        grid = self.offset[channel] + np.arange(self.bins, dtype=np.int64)
        folded = np.where(grid >= 0, grid, -grid - 1)
        return np.bincount(folded, weights=self.counts[channel])


class HistogramObserver(Observer):
    """Base of the observers that clip using a streaming histogram.

    ``max_values``: at most this many values per channel and batch are binned
    (a strided subset, see :meth:`StreamingHistogram.update`); min/max stay
    exact. 2**18 keeps a MobileNetV2 batch of 32 cheap while every tail bin
    with more than a few millionths of the mass is still seen.
    """

    default_bins = 4096
    default_max_values = 1 << 18

    def __init__(
        self, axis: int | None = None, bins: int | None = None, max_values: int | None = -1
    ) -> None:
        super().__init__(axis)
        if bins is None:
            bins = self.default_bins if axis is None else 512
        if max_values == -1:
            max_values = self.default_max_values
        self.histogram = StreamingHistogram(bins, max_values)

    def _update_rows(self, rows, lo, hi, shape):
        self.histogram.update(rows, lo, hi, shape)

    def _clip(self, bits, signed, symmetric):
        los, his = np.empty(self.channels), np.empty(self.channels)
        for channel in range(self.channels):
            lo = min(float(self.min[channel]), 0.0)
            hi = max(float(self.max[channel]), 0.0)
            if lo == hi:
                los[channel], his[channel] = lo, hi
                continue
            los[channel], his[channel] = self._clip_channel(channel, lo, hi, bits, signed, symmetric)
        return los, his

    @abstractmethod
    def _clip_channel(self, channel, lo, hi, bits, signed, symmetric) -> tuple[float, float]:
        """Clipped range of one channel whose observed (0-widened) range is ``[lo, hi]``."""


def _coprime_stride(at_least: int, shape: tuple[int, ...]) -> int:
    """The smallest prime >= ``at_least`` (and >= 3) that divides none of ``shape``."""
    candidate = max(at_least, 3)
    while True:
        is_prime = all(candidate % d for d in range(2, int(candidate**0.5) + 1))
        if is_prime and all(dim % candidate for dim in shape if dim > 0):
            return candidate
        candidate += 1


def _quantile(counts: np.ndarray, first_edge: float, width: float, fraction: float) -> float:
    """Value below which ``fraction`` of the histogram lies (linear inside a bin)."""
    cdf = np.cumsum(counts)
    target = fraction * cdf[-1]
    index = int(np.searchsorted(cdf, target))
    index = min(index, len(counts) - 1)
    before = cdf[index - 1] if index else 0.0
    inside = (target - before) / counts[index] if counts[index] else 1.0
    return first_edge + (index + inside) * width


class PercentileObserver(HistogramObserver):
    method = "percentile"

    def __init__(
        self,
        percentile: float = 99.99,
        axis: int | None = None,
        bins: int | None = None,
        max_values: int | None = -1,
    ) -> None:
        super().__init__(axis, bins, max_values)
        if not 50.0 < percentile <= 100.0:
            raise EdgeqError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _clip_channel(self, channel, lo, hi, bits, signed, symmetric):
        histogram = self.histogram
        zeros = float(histogram.zeros[channel])
        fraction = self.percentile / 100.0
        width = histogram.width[channel]
        if symmetric:
            counts = histogram.abs_counts(channel)
            counts[0] += zeros
            amax = _quantile(counts, 0.0, width, fraction)
            return -amax, amax
        counts = histogram.counts[channel].copy()
        counts[np.clip(-histogram.offset[channel], 0, histogram.bins - 1)] += zeros
        first = float(histogram.left_edges(channel)[0])
        return (
            _quantile(counts, first, width, 1.0 - fraction),
            _quantile(counts, first, width, fraction),
        )


def _kl_divergence_of_threshold(counts: np.ndarray, tail: np.ndarray, kept: int, levels: int) -> float:
    """KL(P || Q) of keeping the first ``kept`` bins of ``counts`` with ``levels`` levels."""
    reference = counts[:kept]
    p = reference.copy()
    p[-1] += tail[kept]  # clipped values land on the threshold
    chunk = (np.arange(kept) * levels) // kept
    nonzero = reference > 0
    chunk_sum = np.bincount(chunk, weights=reference, minlength=levels)
    chunk_nonzero = np.bincount(chunk, weights=nonzero, minlength=levels)
    q = np.where(nonzero, chunk_sum[chunk] / np.maximum(chunk_nonzero[chunk], 1), 0.0)
    q_sum = q.sum()
    if q_sum == 0:
        return np.inf
    p = p / p.sum()
    q = q / q_sum
    mask = p > 0
    q_masked = np.maximum(q[mask], 1e-12)  # outliers landing on an empty bin
    return float(np.sum(p[mask] * np.log(p[mask] / q_masked)))


def _kl_threshold_bins(counts: np.ndarray, levels: int, candidates: int = 96) -> int:
    """TensorRT's entropy calibration on an |x| histogram: the bin count to keep.

    For each candidate threshold ``i`` (bins kept), P is the kept histogram with
    the clipped outliers added to its last bin, Q is the kept histogram merged
    into ``levels`` quantization bins and spread back over the bins that were
    non-empty; the threshold with the smallest KL(P || Q) wins. TensorRT tries
    every bin; here ``candidates`` evenly spaced thresholds, then every bin
    between the neighbours of the best one.
    """
    last = int(np.flatnonzero(counts).max()) + 1 if counts.any() else 0
    counts = counts[:last]
    if last <= levels:
        return last
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])

    def best_of(kept_values) -> int:
        divergences = [_kl_divergence_of_threshold(counts, tail, kept, levels) for kept in kept_values]
        return int(kept_values[int(np.argmin(divergences))])

    coarse = np.unique(np.linspace(levels, last, candidates).round().astype(int))
    best = best_of(coarse)
    step = int(np.ceil((last - levels) / max(candidates - 1, 1)))
    fine = np.arange(max(levels, best - step), min(last, best + step) + 1)
    return best_of(fine)


class EntropyObserver(HistogramObserver):
    """KL-divergence threshold on |x| (TensorRT); asymmetric ranges are clipped by it.

    Levels: ``2**(bits-1)`` per side, or ``2**bits`` for one-sided data (e.g.
    after ReLU) quantized unsigned and asymmetric.
    """

    method = "entropy"

    def _clip_channel(self, channel, lo, hi, bits, signed, symmetric):
        one_sided = lo >= 0.0 and not signed and not symmetric
        levels = 1 << bits if one_sided else 1 << (bits - 1)
        counts = self.histogram.abs_counts(channel)
        kept = _kl_threshold_bins(counts, levels)
        threshold = kept * float(self.histogram.width[channel])
        if symmetric:
            return -threshold, threshold
        return max(lo, -threshold), min(hi, threshold)


def _best_fraction(error_at: Callable[[np.ndarray], np.ndarray], channels: int) -> np.ndarray:
    """Per channel, the fraction in (0, 1] minimising ``error_at(fractions [M, C]) -> [M, C]``.

    Coarse grid (:data:`MSE_GRID`, which contains 1.0 = no clipping), then a
    fine grid around each channel's best coarse point.
    """
    columns = np.arange(channels)
    coarse = np.broadcast_to(MSE_GRID[:, None], (len(MSE_GRID), channels))
    best = coarse[np.argmin(error_at(coarse), axis=0), columns]
    step = MSE_GRID[1] - MSE_GRID[0]
    fine = np.clip(best + np.linspace(-step, step, 17)[:, None], MSE_GRID[0] / 4, 1.0)
    return fine[np.argmin(error_at(fine), axis=0), columns]


def _search_mse(
    error: Callable[[np.ndarray, np.ndarray], np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The range ``[lo', hi']`` (fractions of ``[lo, hi]``, per channel) with least error.

    ``error(lo [M, C], hi [M, C]) -> [M, C]``. Symmetric: one scale factor.
    Asymmetric: a joint factor, then each end refined with the other fixed.
    """
    channels = lo.shape[0]
    if symmetric:
        amax = np.maximum(-lo, hi)
        fraction = _best_fraction(lambda f: error(-f * amax, f * amax), channels)
        return -fraction * amax, fraction * amax
    fraction = _best_fraction(lambda f: error(f * lo, f * hi), channels)
    best_lo, best_hi = fraction * lo, fraction * hi
    best_hi = _best_fraction(lambda f: error(np.broadcast_to(best_lo, f.shape), f * hi), channels) * hi
    best_lo = _best_fraction(lambda f: error(f * lo, np.broadcast_to(best_hi, f.shape)), channels) * lo
    return best_lo, best_hi


class MSEObserver(HistogramObserver):
    """Range minimising the expected fake-quantization MSE over the histogram.

    Each bin is represented by ``sub_points`` evenly spaced values carrying
    its count; exact zeros cost nothing and are left out.
    """

    method = "mse"
    sub_points = 2

    def _clip_channel(self, channel, lo, hi, bits, signed, symmetric):
        histogram = self.histogram
        counts = histogram.counts[channel]
        used = counts > 0
        if not used.any():
            return lo, hi
        width = histogram.width[channel]
        offsets = (np.arange(self.sub_points) + 0.5) / self.sub_points * width
        points = (histogram.left_edges(channel)[used][:, None] + offsets).ravel().astype(np.float32)
        weights = np.repeat(counts[used] / self.sub_points, self.sub_points)

        def error(los: np.ndarray, his: np.ndarray) -> np.ndarray:
            scale, zero_point = quant_params(los, his, bits, signed, symmetric)  # [M, 1]
            scale, zero_point = scale.astype(np.float32), zero_point.astype(np.float32)
            restored = fake_quantize(points, scale, zero_point, bits, signed)  # [M, P] float32
            restored -= points
            np.square(restored, out=restored)
            return (restored @ weights)[:, None]

        best_lo, best_hi = _search_mse(error, np.array([lo]), np.array([hi]), symmetric)
        return float(best_lo[0]), float(best_hi[0])


_OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(method: str, axis: int | None = None, **options) -> Observer:
    """A fresh observer for ``method`` (one of :data:`METHODS`), per channel on ``axis``.

    ``options`` go to the observer (``percentile=`` for percentile, ``bins=``).
    """
    cls = _OBSERVERS.get(method)
    if cls is None:
        raise EdgeqError(
            f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}"
        )
    return cls(axis=axis, **options)


def fit_weight_range(
    weight: np.ndarray,
    axis: int | None,
    bits: int,
    method: str = "minmax",
    *,
    signed: bool = True,
    symmetric: bool = True,
) -> Range:
    """Range of a static tensor (a weight), per channel on ``axis`` or per tensor.

    ``mse`` searches on the weight's actual values (no histogram): the weight is
    all there is, so the error is exact.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if method != "mse":
        observer = make_observer(method, axis)
        observer.update(weight)
        return observer.compute(bits, signed, symmetric)
    rows = _channels_first(weight, axis if axis is None or axis >= 0 else axis + weight.ndim)
    lo = np.minimum(rows.min(axis=1), 0.0).astype(np.float64)
    hi = np.maximum(rows.max(axis=1), 0.0).astype(np.float64)
    values = rows.astype(np.float64)

    def error(los: np.ndarray, his: np.ndarray) -> np.ndarray:
        result = np.empty(los.shape)
        for candidate in range(los.shape[0]):  # one candidate at a time: memory of one weight
            scale, zero_point = quant_params(los[candidate], his[candidate], bits, signed, symmetric)
            restored = fake_quantize(values, scale[:, None], zero_point[:, None], bits, signed)
            result[candidate] = ((restored - values) ** 2).sum(axis=1)
        return result

    best_lo, best_hi = _search_mse(error, lo, hi, symmetric)
    return _finish(best_lo, best_hi, symmetric, axis is not None)
