"""Calibration engine: run the float graph on calibration data, feed statistics.

:func:`run_batches` is the one loop: onnxruntime (CPU, basic graph
optimisations only, so intermediate tensor names survive) runs a *copy* of the
model whose requested intermediate tensors are extra graph outputs, one batch
at a time, and hands each batch's tensors to a callback. Nothing is kept
between batches, so memory depends on the batch size, not on the dataset.

On top of it:

* :func:`collect_observers` / :func:`collect_ranges` -- one streaming observer
  per tensor (``compiler.observers``), the ranges to quantize to.
* :func:`collect_channel_stats` -- per-channel abs-max / min / max / mean
  (SmoothQuant, equalization, bias correction).
* :func:`collect_second_moment` -- ``E[x x^T]`` over the feature dimension
  (GPTQ, Hessian-based sensitivity); see its docstring for convolutions.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from compiler.data import fixed_batch, iterate_batches
from compiler.errors import EdgeqError
from compiler.graph import graph_input_names, initializer_array, producers
from compiler.observers import Observer, Range, make_observer

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def _known_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    return {
        value.name: value.type
        for value in list(graph.value_info) + list(graph.input) + list(graph.output)
        if value.type.WhichOneof("value") is not None
    }


def expose_tensors(model: onnx.ModelProto, tensor_names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs include every tensor in ``tensor_names``.

    Names that are graph inputs or initializers are not added (the caller has
    their values). Types come from the model's value_info, else from shape
    inference; a tensor whose type stays unknown is declared untyped, which
    onnxruntime accepts (it infers the type itself).
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph = exposed.graph
    produced = producers(exposed)
    present = {value.name for value in graph.output}
    wanted = [name for name in dict.fromkeys(tensor_names) if name in produced and name not in present]
    types = _known_types(exposed)
    if any(name not in types for name in wanted):
        try:
            types.update(_known_types(onnx.shape_inference.infer_shapes(exposed)))
        except Exception as error:  # noqa: BLE001 -- inference is only a helper here
            log.debug("shape inference failed while exposing tensors: %s", error)
    for name in wanted:
        value = onnx.ValueInfoProto(name=name)
        if name in types and types[name].HasField("tensor_type"):
            # element type only: a stale static shape would make onnxruntime warn per run
            value.type.tensor_type.elem_type = types[name].tensor_type.elem_type
        graph.output.append(value)
    return exposed


def _ort_first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def make_session(model: onnx.ModelProto, threads: int | None = None, *, optimize: bool = False) -> ort.InferenceSession:
    """CPU session with basic optimisations only (names of intermediates survive).

    ``optimize=True`` enables every onnxruntime optimisation, so a QDQ model runs
    on the integer kernels a deployment would use (intermediates may vanish).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # noqa: BLE001 -- onnxruntime raises several unrelated types
        raise EdgeqError(f"onnxruntime cannot load the model: {_ort_first_line(error)}") from error


def _sample_count(data: Batch) -> int:
    counts = {len(array) for array in data.values()}
    if len(counts) != 1:
        raise EdgeqError(
            f"calibration inputs have different sample counts {sorted(counts)}; give every input the same first axis"
        )
    return counts.pop()


def run_batches(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    tensor_names: list[str],
    callback: Callable[[dict[str, np.ndarray]], None],
    *,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "calibrating",
    threads: int | None = None,
) -> None:
    """Run the float model on ``data`` batch by batch; ``callback({name: array})`` per batch.

    ``tensor_names`` may name graph inputs, initializers, graph outputs and any
    tensor a node of the main graph produces. A model whose inputs have a static
    first dimension runs at that batch size (samples that do not fill the last
    batch are skipped, with a warning). The caller's model is never modified.
    """
    inputs = graph_input_names(model)
    missing = [name for name in inputs if name not in data]
    if missing:
        raise EdgeqError(
            f"calibration data has no values for model input(s) {missing}; it has {sorted(data)}"
        )
    feed_data = {name: data[name] for name in inputs}
    total = _sample_count(feed_data)
    if total == 0:
        raise EdgeqError("calibration data is empty (0 samples)")

    produced = producers(model)
    constants: Batch = {}
    for name in dict.fromkeys(tensor_names):
        if name in feed_data or name in produced:
            continue
        value = initializer_array(model, name)
        if value is None:
            raise ValueError(f"tensor '{name}' is neither an input nor produced in the main graph")
        constants[name] = value
    fetch = [name for name in dict.fromkeys(tensor_names) if name in produced]

    fixed = fixed_batch(model)
    if fixed is not None:
        if total < fixed:
            raise EdgeqError(
                f"the model's batch dimension is fixed at {fixed} but only {total} calibration samples were given"
            )
        if total % fixed:
            warnings.warn(
                f"model batch size is fixed at {fixed}: the last {total % fixed} calibration samples are skipped",
                stacklevel=2,
            )
            total -= total % fixed
            feed_data = {name: array[:total] for name, array in feed_data.items()}
        batch_size = fixed

    session = make_session(expose_tensors(model, fetch), threads)
    show = progress and sys.stderr.isatty()
    with tqdm(total=total, desc=desc, unit="sample", disable=not show, file=sys.stderr) as bar:
        for feed in iterate_batches(feed_data, batch_size):
            try:
                values = session.run(fetch, feed) if fetch else []
            except Exception as error:  # noqa: BLE001
                raise EdgeqError(
                    f"onnxruntime failed on the calibration data: {_ort_first_line(error)}"
                ) from error
            batch: Batch = dict(zip(fetch, values, strict=True))
            for name in tensor_names:
                if name in feed:
                    batch[name] = feed[name]
            batch.update(constants)
            callback(batch)
            bar.update(len(next(iter(feed.values()))))
            # drop this batch's tensors before the next run: kept alive, they would make
            # onnxruntime allocate a second set of outputs (peak memory x2)
            del values, batch


# -- ranges -------------------------------------------------------------------------
def resolve_method(method: str, model: onnx.ModelProto, tensor_names: list[str]) -> tuple[str, dict[str, str]]:
    """(method, per-tensor overrides) of a ``--calibrate-method``: "auto" is MSE-optimal clipping
    inside the network and min-max at graph outputs, so the largest logit is never clipped."""
    if method != "auto":
        return method, {}
    from compiler.graph import graph_output_names

    return "mse", {name: "minmax" for name in graph_output_names(model) if name in tensor_names}


def collect_observers(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    tensor_names: list[str],
    *,
    method: str = "minmax",
    axis: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    method_overrides: dict[str, str] | None = None,
    observer_options: dict[str, dict] | None = None,
    threads: int | None = None,
) -> dict[str, Observer]:
    """One fed observer per tensor: call ``compute(bits, signed, symmetric)`` as often as needed.

    Useful when ranges are wanted at several bit-widths (mixed precision): the
    data runs through the model once. ``observer_options`` maps a method to
    its keyword options (e.g. ``{"percentile": {"percentile": 99.9}}``).
    """
    method_overrides = method_overrides or {}
    observer_options = observer_options or {}
    observers: dict[str, Observer] = {}
    for name in dict.fromkeys(tensor_names):
        chosen = method_overrides.get(name, method)
        observers[name] = make_observer(chosen, axis, **observer_options.get(chosen, {}))

    def update(batch: Batch) -> None:
        for name, observer in observers.items():
            observer.update(batch[name])

    run_batches(
        model, data, list(observers), update, batch_size=batch_size, progress=progress,
        threads=threads,
    )
    return observers


def collect_ranges(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    tensor_names: list[str],
    *,
    method: str = "minmax",
    bits: int | dict[str, int] = 8,
    signed: bool = False,
    symmetric: bool = False,
    batch_size: int = 32,
    progress: bool = True,
    method_overrides: dict[str, str] | None = None,
    observer_options: dict[str, dict] | None = None,
    threads: int | None = None,
) -> dict[str, tuple[float, float]]:
    """The float range ``(min, max)`` to quantize each tensor to (contains 0).

    ``bits`` is one width for all tensors or a width per tensor name: a clipping
    observer (MSE, percentile) clips less for a wider quantizer.
    A tensor that never held a finite value gets ``(0.0, 0.0)``.
    """
    observers = collect_observers(
        model, data, tensor_names, method=method, batch_size=batch_size, progress=progress,
        method_overrides=method_overrides, observer_options=observer_options, threads=threads,
    )
    def width(name: str) -> int:
        return bits[name] if isinstance(bits, dict) else bits

    return {name: observer_range(observer, width(name), signed, symmetric) for name, observer in observers.items()}


def observer_range(observer: Observer, bits: int, signed: bool, symmetric: bool) -> Range:
    """``observer.compute`` that answers (0, 0) for a tensor with no finite data."""
    if observer.min is None:
        return (0.0, 0.0)
    return observer.compute(bits, signed, symmetric)


# -- per-channel statistics -------------------------------------------------------------
@dataclass
class ChannelStats:
    """Per-channel statistics of one tensor over the calibration data (arrays ``[C]``)."""

    absmax: np.ndarray
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    count: int  # values per channel


def _axis_for(axis: int | dict[str, int], name: str, ndim: int) -> int:
    chosen = axis[name] if isinstance(axis, dict) else axis
    if not -ndim <= chosen < ndim:
        raise ValueError(f"axis {chosen} out of range for tensor '{name}' of rank {ndim}")
    return chosen % ndim


def collect_channel_stats(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    tensor_names: list[str],
    *,
    axis: int | dict[str, int] = 1,
    batch_size: int = 32,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel abs-max, min, max, mean along ``axis`` (int, or per tensor name).

    Use ``axis=1`` for NCHW activations, ``-1`` for the feature axis of
    Gemm/MatMul inputs.
    """
    sums: dict[str, list] = {}  # name -> [min, max, sum, count]

    def update(batch: Batch) -> None:
        for name in tensor_names:
            array = np.asarray(batch[name], dtype=np.float32)
            channel_axis = _axis_for(axis, name, array.ndim)
            rows = np.moveaxis(array, channel_axis, 0).reshape(array.shape[channel_axis], -1)
            lo, hi = rows.min(axis=1), rows.max(axis=1)
            total = rows.sum(axis=1, dtype=np.float64)
            if name not in sums:
                sums[name] = [lo, hi, total, rows.shape[1]]
            else:
                entry = sums[name]
                entry[0] = np.minimum(entry[0], lo)
                entry[1] = np.maximum(entry[1], hi)
                entry[2] = entry[2] + total
                entry[3] += rows.shape[1]

    run_batches(
        model, data, tensor_names, update, batch_size=batch_size, progress=progress,
        desc="channel statistics", threads=threads,
    )
    return {
        name: ChannelStats(
            absmax=np.maximum(-lo, hi),
            min=lo,
            max=hi,
            mean=(total / count).astype(np.float32),
            count=count,
        )
        for name, (lo, hi, total, count) in sums.items()
    }


@dataclass
class ConvPatches:
    """How a Conv reads its input: second moments are taken over its im2col patches."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1


def im2col(x: np.ndarray, patches: ConvPatches) -> np.ndarray:
    """NCHW ``x`` -> ``[group, N*OH*OW, C/group*KH*KW]`` rows (channel-major like ONNX weights)."""
    batch, channels = x.shape[:2]
    top, left, bottom, right = patches.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = patches.kernel, patches.strides, patches.dilations
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3)
    )[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, KH, KW]
    per_group = channels // patches.group
    out_h, out_w = windows.shape[2:4]
    windows = windows.reshape(batch, patches.group, per_group, out_h, out_w, kh, kw)
    rows = windows.transpose(1, 0, 3, 4, 2, 5, 6)  # [G, N, OH, OW, C/G, KH, KW]
    return rows.reshape(patches.group, batch * out_h * out_w, per_group * kh * kw)


def collect_second_moment(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    tensor_names: list[str],
    *,
    axis: int | dict[str, int] = -1,
    conv_patches: dict[str, ConvPatches] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """``E[x x^T]`` (float64) of each tensor's feature vectors over the calibration data.

    * Default: the feature axis is ``axis`` (``-1``: the ``K`` of a Gemm/MatMul
      input, giving ``[K, K]``); every other axis indexes samples. For a Conv
      input with ``axis=1`` this is the per-pixel channel covariance ``[C, C]``
      -- the im2col-free approximation (it ignores correlations between
      neighbouring pixels of a kernel window).
    * Tensors named in ``conv_patches``: the exact GPTQ Hessian of that Conv,
      over its im2col patches, ``[group, C/group*KH*KW, C/group*KH*KW]`` (the
      column order of the Conv weight reshaped to ``[M, C/group*KH*KW]``).
      Built sample by sample to bound memory.
    """
    conv_patches = conv_patches or {}
    moments: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str, rows: np.ndarray) -> None:
        rows64 = rows.astype(np.float64)
        product = np.matmul(np.swapaxes(rows64, -1, -2), rows64)
        moments[name] = moments[name] + product if name in moments else product
        counts[name] = counts.get(name, 0) + rows.shape[-2]

    def update(batch: Batch) -> None:
        for name in tensor_names:
            array = np.asarray(batch[name], dtype=np.float32)
            if name in conv_patches:
                for sample in array:
                    accumulate(name, im2col(sample[None], conv_patches[name]))
                continue
            feature_axis = _axis_for(axis, name, array.ndim)
            accumulate(name, np.moveaxis(array, feature_axis, -1).reshape(-1, array.shape[feature_axis]))

    run_batches(
        model, data, tensor_names, update, batch_size=batch_size, progress=progress,
        desc="second moments", threads=threads,
    )
    return {name: moment / counts[name] for name, moment in moments.items()}
