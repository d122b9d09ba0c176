"""Per-layer, per-bit-width sensitivity: how much quantizing one layer moves the model.

Requires: a canonicalized float model, a plan from ``passes/select_layers``
(its ``layers`` are the candidates), calibration inputs.
Guarantees: for every layer and candidate ``(w_bits, a_bits)`` a number,
larger = the model output moves more, non-increasing in the bits
(:func:`monotone`); non-negative, except measured around a mixed plan (where
it is relative to that plan's choice); the graph is not changed.

Two estimates:

* :func:`measured_sensitivity` -- quantize that layer alone (every other op
  float) with ``passes.insert_qdq.quantize_model`` and compare the model's
  outputs with float on the calibration data: the mean KL divergence of the
  softmax outputs for classifier outputs ([N, C]), otherwise the output MSE
  divided by the float output's mean square (so outputs of different scale add
  up). Runs the (layer, bits) jobs in parallel processes. With ``context``
  (e.g. w8a8) the layer is changed *inside* the fully quantized base plan
  instead, and the value is the growth of the distance over the base plan's:
  errors of several layers do not add up, and measuring each one among the
  others' makes the ILP's sum a closer estimate of a mixed plan.
  With ``rounded`` (:func:`passes.gptq.gptq_candidates`) a layer at a width
  gets the weights the rounding pass would give it there instead of nearest
  rounding (:func:`rounded_weights`): a 4-bit layer GPTQ can repair is then
  priced as exported, not as nearest rounding leaves it.
* :func:`proxy_sensitivity` -- no quantized model is run: for a linear layer
  ``y = W x`` with input second moment ``H = E[x x^T]`` (the layer Hessian of
  GPTQ / HAWQ-V2), weight rounding adds ``sum_o dW_o^T H dW_o`` to the output
  error and activation rounding (uniform noise of variance step^2/12) adds
  ``step^2/12 * ||W||_F^2``; the sum is divided by the output power
  ``sum_o W_o^T H W_o`` (a noise-to-signal ratio, comparable across layers).
  Conv inputs use the per-pixel channel covariance (neighbouring pixels of a
  kernel window taken as uncorrelated). Weightless layers (Add, pooling,
  Concat) get the input quantization noise-to-signal ratio.

:func:`measured_sample_sensitivity` keeps the measured distances per
calibration sample: :func:`mean_table` averages any subset of them and
:func:`bootstrap_tables` resamples them (by source, e.g. photo), which gives
the sampling noise of every entry and of a plan's total without re-running.
:func:`spearman` compares the two rankings (reported in benchmarks/mixed.md).
:class:`PlanDistance` measures whole plans (the allocator's re-ranking of
its best candidates), exported as the driver compiles them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from compiler.graph import attribute, initializer_array, set_initializer
from compiler.plan import QuantPlan
from compiler.quantizers import (
    dequantized,
    planned_weight_quant,
    weight_output_axis,
)

if TYPE_CHECKING:
    from passes.gptq import RoundedWeights

log = logging.getLogger(__name__)

Choice = tuple[int | None, int]
Sensitivity = dict[str, dict[Choice, float]]
SampleSensitivity = dict[str, dict[Choice, np.ndarray]]  # per calibration sample, [N] each


def layer_choices(weighted: bool, pairs: Sequence[tuple[int, int]]) -> list[Choice]:
    """A layer's candidates: the (w_bits, a_bits) ``pairs``, or for a weightless layer their a_bits."""
    if weighted:
        return [(w, a) for w, a in pairs]
    return [(None, a) for a in sorted({a for _, a in pairs})]


def candidate_choices(plan: QuantPlan, w_bits: Sequence[int] = (), a_bits: Sequence[int] = (), *,
                      pairs: Sequence[tuple[int, int]] | None = None) -> dict[str, list[Choice]]:
    """Per layer: every pair of ``pairs`` (default: ``w_bits`` x ``a_bits``); weightless layers only vary a_bits."""
    pairs = list(pairs) if pairs is not None else [(w, a) for w in w_bits for a in a_bits]
    return {name: layer_choices(bool(layer.w_bits), pairs) for name, layer in plan.layers.items()}


def with_opset_for(model: onnx.ModelProto, bits: Sequence[int]) -> onnx.ModelProto:
    """``model`` at opset 21 when sub-byte or 16-bit types are needed (converted once, not per job)."""
    needs_21 = any(b not in (8, 32) for b in bits if b)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if needs_21 and current < 21:
        return onnx.version_converter.convert_version(model, 21)
    return model


def activation_ranges(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: dict[str, np.ndarray],
    a_bits: Sequence[int],
    *,
    method: str | None = None,
    batch_size: int = 32,
) -> dict[int, dict[str, tuple[float, float]]]:
    """Activation ranges fitted for each candidate width and OUTPUT_BITS (one calibration pass).

    Every tensor an integer-only export quantizes is covered (layer outputs too).
    ``method`` defaults to the plan's calibration method (``plan.recipe["calibrate_method"]``,
    "auto" when unset), so candidates are measured on the ranges the export will use.
    """
    from compiler.calibrate import collect_observers, observer_range, resolve_method
    from passes.insert_qdq import tensors_to_calibrate

    names = tensors_to_calibrate(model, plan, integer_only=True)
    method, overrides = resolve_method(method or plan.recipe.get("calibrate_method", "auto"), model, names)
    observers = collect_observers(model, calib, names, method=method, method_overrides=overrides,
                                  batch_size=batch_size, progress=False)
    return {
        bits: {name: observer_range(obs, bits, plan.activation_signed, False) for name, obs in observers.items()}
        for bits in sorted({*a_bits, OUTPUT_BITS})
    }


# The single-layer models are exported with every layer output quantized (integer_only), so a
# Relu/Clip that insert_qdq folds into the layer is applied by the output quantizer's range;
# the output quantizer is this wide, so its own rounding adds next to nothing.
OUTPUT_BITS = 16


def single_layer_plan(plan: QuantPlan, name: str, choice: Choice) -> QuantPlan:
    """A plan that quantizes only layer ``name``, at ``choice`` (its output at OUTPUT_BITS)."""
    layer = replace(plan.layers[name], w_bits=choice[0], a_bits=choice[1], info={})
    return _plan_like(plan, {name: layer}, a_bits=OUTPUT_BITS)


def _plan_like(plan: QuantPlan, layers: dict, *, a_bits: int | None = None) -> QuantPlan:
    """A fresh plan over ``layers`` with ``plan``'s settings -- weight blocks included, so that a
    measured candidate is quantized on the grid it will be exported on."""
    return QuantPlan(model=plan.model, target=plan.target, w_bits=plan.w_bits,
                     a_bits=plan.a_bits if a_bits is None else a_bits, activation_signed=plan.activation_signed,
                     weight_block_size=plan.weight_block_size, layers=layers, recipe=dict(plan.recipe))


Context = Choice | dict[str, Choice]  # one choice for every layer, or a whole mixed plan


@contextmanager
def rounded_weights(model: onnx.ModelProto, quantized: QuantPlan, rounded: RoundedWeights | None):
    """``model`` with each layer of ``quantized`` holding its weight as rounded at its width, restored after.

    The rounded weight's grid goes into ``quantized.tensors``, so QDQ insertion
    exports exactly those integers. Layers or widths ``rounded`` lacks keep the
    float weight (nearest rounding at export).
    """
    originals = {}
    for name, layer in quantized.layers.items():
        weight = (rounded or {}).get(layer.w_bits, {}).get(name) if layer.w_bits and layer.weight else None
        if weight is None:
            continue
        original = next(init for init in model.graph.initializer if init.name == layer.weight)
        originals[layer.weight] = onnx.TensorProto()
        originals[layer.weight].CopyFrom(original)
        set_initializer(model, layer.weight, weight[0])
        quantized.tensors[layer.weight] = weight[1]
    try:
        yield model
    finally:
        for init in model.graph.initializer:
            if init.name in originals:
                init.CopyFrom(originals[init.name])


def _context_choices(context: Context | None) -> list[Choice]:
    """The base plan's choices (none for single-layer measurements)."""
    if isinstance(context, dict):
        return list(context.values())
    return [context] if context else []


def measurement_bits(plan: QuantPlan, choices: dict[str, list[Choice]], context: Context | None) -> list[int]:
    """Every width a measurement model quantizes at, so that :func:`with_opset_for` converts for all of them.

    Not only the candidates: a single-layer model also quantizes every output at
    OUTPUT_BITS, and a base plan's layers and defaults have widths of their own
    -- with only 8-bit candidates left the 16-bit output quantizers need opset 21 too.
    """
    bits = {b for options in [*choices.values(), _context_choices(context)] for c in options for b in c if b}
    bits |= {plan.w_bits, plan.a_bits} if context is not None else {OUTPUT_BITS}
    return sorted(bits)


def base_choice(plan: QuantPlan, name: str, context: Context) -> Choice:
    """Layer ``name``'s choice in the base plan ``context`` (weightless layers: only its a_bits)."""
    if isinstance(context, dict):
        return context[name]
    return (context[0] if plan.layers[name].w_bits else None, context[1])


def plan_with_choices(plan: QuantPlan, choices: dict[str, Choice]) -> QuantPlan:
    """A copy of ``plan`` with each named layer at its (w_bits, a_bits); quantizers refitted later."""
    layers = {name: replace(layer, w_bits=choices[name][0], a_bits=choices[name][1], info={})
              if name in choices else replace(layer, info={}) for name, layer in plan.layers.items()}
    return _plan_like(plan, layers)


def context_plan(plan: QuantPlan, context: Context, name: str | None = None, choice: Choice | None = None) -> QuantPlan:
    """Every layer at the base choice ``context``, except ``name`` at ``choice``."""
    choices = {other: base_choice(plan, other, context) for other in plan.layers}
    if name is not None and choice is not None:
        choices[name] = choice
    return plan_with_choices(plan, choices)


def ranges_for_plan(
    model: onnx.ModelProto,
    plan: QuantPlan,
    ranges: dict[int, dict[str, tuple[float, float]]],
    *,
    integer_only: bool = False,
) -> dict[str, tuple[float, float]]:
    """Each quantized tensor's range fitted for the width its quantizer will have in ``plan``.

    ``ranges`` holds ranges per candidate width (:func:`activation_ranges`); a
    quantizer's width is its widest reader's a_bits (passes/insert_qdq), and an
    MSE-clipped 8-bit range would throw away what a 16-bit quantizer can keep.
    """
    from passes.insert_qdq import activation_groups

    widths = sorted(ranges)
    result: dict[str, tuple[float, float]] = {}
    for group in activation_groups(model, plan, integer_only=integer_only):
        bits = min((b for b in widths if b >= group.bits), default=widths[-1])
        for name in group.tensors:
            if name in ranges[bits]:
                result[name] = ranges[bits][name]
    return result


def output_distance(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray]) -> float:
    """Sum over outputs: mean softmax KL for [N, C] classifier outputs, else relative MSE."""
    return max(float(np.mean(sample_distances(reference, quantized))), 0.0)


def sample_distances(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`output_distance` per sample ([N]): its mean over the samples is the distance.

    Classifier outputs: each sample's softmax KL; others: each sample's squared
    error over the float output's mean square (over all samples, so that the
    per-sample values average to the relative MSE).
    """
    from compiler.fidelity import softmax

    total = None
    for name, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        q64 = np.asarray(quantized[name], dtype=np.float64)
        if ref64.ndim == 2 and ref64.shape[1] >= 2:
            p, q = softmax(ref64), softmax(q64)
            per_sample = np.sum(p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12))), axis=1)
        else:
            power = float(np.mean(ref64**2)) or 1.0
            per_sample = np.mean(((ref64 - q64) ** 2).reshape(len(ref64), -1), axis=1) / power
        total = per_sample if total is None else total + per_sample
    return total if total is not None else np.zeros(0)


# -- measured: one quantized layer at a time, in worker processes -------------------------------

_WORKER: dict = {}


def _worker_init(model_bytes: bytes, plan_dict: dict, calib: dict, reference: dict,
                 ranges: dict, batch_size: int, context: Context | None = None, integer_only: bool = False,
                 rounded: RoundedWeights | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.update(model=onnx.load_from_string(model_bytes), plan=QuantPlan.from_dict(plan_dict),
                   calib=calib, reference=reference, ranges=ranges, batch_size=batch_size,
                   context=context, integer_only=integer_only, rounded=rounded)


def _worker_measure(job: tuple[str, Choice]) -> tuple[str, Choice, np.ndarray]:
    from compiler.fidelity import run_model
    from passes.insert_qdq import quantize_model

    name, choice = job
    state = _WORKER
    if state["context"] is not None:  # the whole base plan, this layer changed
        quantized = context_plan(state["plan"], state["context"], name, choice)
        integer_only = state["integer_only"]
        ranges = ranges_for_plan(state["model"], quantized, state["ranges"], integer_only=integer_only)
    else:  # this layer alone, its output kept near-float at OUTPUT_BITS
        quantized = single_layer_plan(state["plan"], name, choice)
        integer_only = True
        ranges = {**state["ranges"][OUTPUT_BITS], **{
            tensor: state["ranges"][choice[1]][tensor]
            for tensor in quantized.layers[name].inputs if tensor in state["ranges"][choice[1]]}}
    with rounded_weights(state["model"], quantized, state["rounded"]) as model:
        qdq = quantize_model(model, quantized, ranges, integer_only=integer_only)
    outputs = run_model(qdq, state["calib"], batch_size=state["batch_size"])
    return name, choice, sample_distances(state["reference"], outputs)


def measured_sensitivity(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: dict[str, np.ndarray],
    choices: dict[str, list[Choice]],
    *,
    ranges: dict[int, dict[str, tuple[float, float]]] | None = None,
    max_samples: int | None = 64,
    workers: int = 2,
    batch_size: int = 32,
    context: Context | None = None,
    integer_only: bool = False,
    rounded: RoundedWeights | None = None,
) -> Sensitivity:
    """Output distance per layer and choice (see module docstring).

    ``context=None``: that layer quantized alone, everything else float.
    ``context=(w, a)``: every layer at the base plan ``(w, a)`` and that layer at
    the choice; the value is how much the output distance grows over the base
    plan's own (the base choice itself is 0 and not run). ``context={layer:
    choice}``: the same around a whole mixed plan (a local linearisation of the
    distance there; values may be negative where a choice beats the plan's).
    Quantizing the rest changes what a layer's error does downstream, so these
    values add up to the distance of a mixed plan more closely than the
    single-layer ones (measured in benchmarks/mixed.md). ``integer_only`` is the
    export used in context mode (single-layer runs always quantize the layer's
    output, near-float, at OUTPUT_BITS). ``max_samples=None`` measures on every
    calibration sample. ``rounded`` (:func:`passes.gptq.gptq_candidates`): the
    weights each layer gets at each width, in place of nearest rounding.
    """
    return monotone(mean_table(measured_sample_sensitivity(
        model, plan, calib, choices, ranges=ranges, max_samples=max_samples, workers=workers,
        batch_size=batch_size, context=context, integer_only=integer_only, rounded=rounded)))


def measured_sample_sensitivity(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: dict[str, np.ndarray],
    choices: dict[str, list[Choice]],
    *,
    ranges: dict[int, dict[str, tuple[float, float]]] | None = None,
    max_samples: int | None = 64,
    workers: int = 2,
    batch_size: int = 32,
    context: Context | None = None,
    integer_only: bool = False,
    rounded: RoundedWeights | None = None,
) -> SampleSensitivity:
    """:func:`measured_sensitivity` per calibration sample, before :func:`monotone`.

    Each entry is the [N] vector of per-sample distances (:func:`sample_distances`;
    in context mode each sample's growth over the base plan's); its mean is the
    table entry. Kept per sample so that the sampling noise of the table and of a
    plan's total can be bootstrapped (:func:`bootstrap_tables`) without
    re-running anything.
    """
    from compiler.fidelity import run_model

    context_choices = _context_choices(context)
    model = with_opset_for(model, measurement_bits(plan, choices, context))
    calib = {name: value[:max_samples] for name, value in calib.items()}  # None: all
    if ranges is None:
        a_bits = {c[1] for o in [*choices.values(), context_choices] for c in o}
        ranges = activation_ranges(model, plan, calib, sorted(a_bits))
    reference = run_model(model, calib, batch_size=batch_size)
    jobs = [(name, choice) for name, options in choices.items() for choice in options
            if context is None or choice != base_choice(plan, name, context)]
    init_args = (model.SerializeToString(), plan.to_dict(), calib, reference, ranges, batch_size,
                 context, integer_only, rounded)
    result: SampleSensitivity = {name: {} for name in choices}
    base_distance: np.ndarray | float = 0.0
    if context is not None:
        _worker_init(*init_args)
        base_distance = _worker_measure_plan(context_plan(plan, context))
        for name, options in choices.items():
            if base_choice(plan, name, context) in options:
                result[name][base_choice(plan, name, context)] = np.zeros(len(base_distance))
    with ExitStack() as stack:
        if workers <= 1:
            _worker_init(*init_args)
            outcomes = map(_worker_measure, jobs)
        else:
            import multiprocessing

            # fork: spawn would re-import the caller's __main__ (scripts without a main guard loop).
            # The parent holds no onnxruntime session at this point (run_model's is released).
            fork = multiprocessing.get_context("fork")
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=fork, initializer=_worker_init, initargs=init_args))
            outcomes = pool.map(_worker_measure, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
        for name, choice, value in outcomes:
            result[name][choice] = value - base_distance if context is not None else value
    return result



def cross_fit_folds(count: int, folds: int) -> list[np.ndarray]:
    """The samples each fold holds out (boolean masks): sample ``i`` is in fold ``i % folds``.

    Interleaved, so that a calibration set sorted by class or source still
    splits evenly; fewer folds when there are fewer samples.
    """
    fold_of = np.arange(count) % max(1, min(folds, count))
    return [fold_of == fold for fold in np.unique(fold_of)]


def cross_fitted_sensitivity(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: dict[str, np.ndarray],
    choices: dict[str, list[Choice]],
    fold_weights: Sequence[RoundedWeights],
    **options,
) -> Sensitivity:
    """:func:`measured_sensitivity` with each sample measured on weights rounded without it.

    Rounding fitted to the calibration samples (GPTQ's Hessians: MobileNetV2's
    classifier sees its 1280 inputs through 64 samples) looks better on those
    samples than on new inputs, so measured on them it would price a 2-bit
    layer far too low. ``fold_weights[k]`` are the weights rounded on the
    samples fold ``k`` of :func:`cross_fit_folds` does not hold; each fold is
    measured with its own, and the per-sample values are put back together.
    ``options``: those of :func:`measured_sample_sensitivity`.
    """
    count = len(next(iter(calib.values())))
    combined: SampleSensitivity = {name: {} for name in choices}
    for held, rounded in zip(cross_fit_folds(count, len(fold_weights)), fold_weights, strict=True):
        measured = measured_sample_sensitivity(
            model, plan, {name: value[held] for name, value in calib.items()}, choices,
            rounded=rounded, max_samples=None, **options)
        for name, table in measured.items():
            for choice, values in table.items():
                combined[name].setdefault(choice, np.zeros(count))[held] = values
    return monotone(mean_table(combined))


def mean_table(samples: SampleSensitivity, rows: np.ndarray | slice | None = None) -> Sensitivity:
    """The sensitivity table of per-sample values: each entry's mean over ``rows`` (default all samples)."""
    pick = slice(None) if rows is None else rows
    return {name: {choice: float(np.mean(values[pick])) for choice, values in table.items()}
            for name, table in samples.items()}


def bootstrap_tables(samples: SampleSensitivity, replicates: int, *, seed: int = 0,
                     groups: Sequence[int] | np.ndarray | None = None) -> list[Sensitivity]:
    """``replicates`` tables, each the mean over one resampling (with replacement) of the samples.

    The same resampled rows for every entry of one replicate, so that the
    correlation between layers (an image hard for one layer is often hard for
    the others) stays in the spread of a plan's total. ``groups`` (one label
    per sample, e.g. the source photo of each crop) resamples whole groups:
    crops of one photo are not independent draws.
    """
    count = len(next(iter(next(iter(samples.values())).values())))
    labels = np.arange(count) if groups is None else np.asarray(groups)
    if len(labels) != count:
        raise ValueError(f"{len(labels)} group labels for {count} samples")
    members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(replicates):
        picked = rng.integers(0, len(members), len(members))
        tables.append(mean_table(samples, np.concatenate([members[index] for index in picked])))
    return tables


def sample_rows(samples: SampleSensitivity, rows: np.ndarray | slice) -> SampleSensitivity:
    """The per-sample table restricted to ``rows`` (e.g. one fold of the calibration data)."""
    return {name: {choice: values[rows] for choice, values in table.items()} for name, table in samples.items()}


def _worker_measure_plan(quantized: QuantPlan) -> np.ndarray:
    """Per-sample output distances of the whole ``quantized`` plan, in this process (the context's base)."""
    from compiler.fidelity import run_model
    from passes.insert_qdq import quantize_model

    state = _WORKER
    ranges = ranges_for_plan(state["model"], quantized, state["ranges"], integer_only=state["integer_only"])
    with rounded_weights(state["model"], quantized, state["rounded"]) as model:
        qdq = quantize_model(model, quantized, ranges, integer_only=state["integer_only"])
    return sample_distances(state["reference"], run_model(qdq, state["calib"], batch_size=state["batch_size"]))


def covers(wide: Choice, narrow: Choice) -> bool:
    """``wide`` has at least the bits of ``narrow`` in weights and activations, and is not it."""
    return (wide[0] or 0) >= (narrow[0] or 0) and wide[1] >= narrow[1] and wide != narrow


def tie_step(table: Sensitivity) -> float:
    """The step :func:`monotone` puts between choices measured (nearly) equal: 1e-6 of the largest value."""
    largest = max((abs(v) for values in table.values() for v in values.values()), default=0.0)
    return 1e-6 * largest if largest > 0 else 1e-12


def monotone(table: Sensitivity) -> Sensitivity:
    """Each layer's sensitivities made non-increasing in the bits, strictly.

    More bits never lose fidelity in expectation, but single-layer measurements
    on a few samples can invert two tiny values; left alone, an inversion makes
    the allocator keep a layer at fewer bits although the budget has room. A
    choice gets at least the value of every choice with as many or more bits
    (weights and activations), plus a step of one millionth of the table's largest
    value (:func:`tie_step`), so that the table never ranks a narrower choice above a
    wider one -- far above the ILP solver's tolerances, far below any difference
    that matters. Choices so close are ties: where the wider one costs more on a
    budgeted metric, the allocator takes the narrower one
    (passes/allocate.dominated_choices).
    """
    step = tie_step(table)
    result: Sensitivity = {}
    for name, values in table.items():
        # widest first, so every wider choice is final before a narrower one reads it
        order = sorted(values, key=lambda c: ((c[0] or 0) + c[1], c[0] or 0), reverse=True)
        fixed: dict[Choice, float] = {}
        for choice in order:
            wider = [fixed[c] for c in fixed if covers(c, choice)]
            fixed[choice] = max([values[choice], *(v + step for v in wider)])
        result[name] = {choice: fixed[choice] for choice in values}
    return result


# -- proxy: second moment x weight error ---------------------------------------------------------


def _feature_axis(model: onnx.ModelProto, layer) -> int:
    return 1 if layer.op_type in ("Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "MaxPool") else -1


def _weight_rows(model: onnx.ModelProto, layer, weight: np.ndarray) -> list[tuple[np.ndarray, slice]]:
    """The weight as rows over input features, grouped by the input-channel slice they read.

    Each entry is (rows [R, F], slice of the F input features in the layer's
    input feature axis) so that ``rows[r] . x[slice]`` is one output term.
    """
    node = next(n for n in model.graph.node if n.name == layer.node)
    op = layer.op_type
    if op == "Conv":
        group = attribute(node, "group", 1)
        out_per_group, in_per_group = weight.shape[0] // group, weight.shape[1]
        parts = []
        for g in range(group):
            block = weight[g * out_per_group:(g + 1) * out_per_group]  # [Og, Cg, kh, kw]
            rows = np.moveaxis(block, 1, -1).reshape(-1, in_per_group)
            parts.append((rows, slice(g * in_per_group, (g + 1) * in_per_group)))
        return parts
    if op == "ConvTranspose":  # [C_in, C_out, kh, kw], group 1
        return [(np.moveaxis(weight, 0, -1).reshape(-1, weight.shape[0]), slice(None))]
    if op == "Gemm":
        rows = weight if attribute(node, "transB", 0) else weight.T
        return [(rows, slice(None))]
    if op == "MatMul":
        return [(np.moveaxis(weight, -1, -2).reshape(-1, weight.shape[-2]), slice(None))]
    raise ValueError(f"no weight layout rule for {op}")


def _quadratic(parts: list[tuple[np.ndarray, slice]], moment: np.ndarray) -> float:
    """sum over rows r of rows[r]^T H[slice, slice] rows[r]."""
    total = 0.0
    for rows, part in parts:
        block = moment[part, part]
        total += float(np.sum((rows.astype(np.float64) @ block) * rows))
    return total


def _noise_power(low: float, high: float, bits: int) -> float:
    """Variance of uniform rounding noise of a ``bits``-wide quantizer over [low, high]."""
    step = (high - low) / ((1 << bits) - 1)
    return step * step / 12.0


def proxy_sensitivity(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: dict[str, np.ndarray],
    choices: dict[str, list[Choice]],
    *,
    ranges: dict[int, dict[str, tuple[float, float]]] | None = None,
    max_samples: int = 64,
    batch_size: int = 32,
) -> Sensitivity:
    """Noise-to-signal ratio of each layer's output from its own quantization (module docstring)."""
    from compiler.calibrate import collect_second_moment

    calib = {name: value[:max_samples] for name, value in calib.items()}
    if ranges is None:
        ranges = activation_ranges(model, plan, calib, sorted({c[1] for o in choices.values() for c in o}))
    inputs = sorted({name for layer in plan.layers.values() for name in layer.inputs})
    axes: dict[str, int] = {}
    for layer in plan.layers.values():  # channels-first once any reader is a conv or a pool
        for name in layer.inputs:
            axes[name] = max(axes.get(name, -1), _feature_axis(model, layer))
    moments = collect_second_moment(model, calib, inputs, axis=axes, batch_size=batch_size, progress=False)
    result: Sensitivity = {}
    for name, options in choices.items():
        layer = plan.layers[name]
        result[name] = {}
        if layer.w_bits and layer.weight:
            weight = initializer_array(model, layer.weight).astype(np.float32)
            node = next(n for n in model.graph.node if n.name == layer.node)
            axis = weight_output_axis(layer.op_type, weight.ndim, attribute(node, "transB", 0))
            moment = moments[layer.inputs[0]]
            parts = _weight_rows(model, layer, weight)
            signal = max(_quadratic(parts, moment), 1e-30)
            weight_norm = sum(float(np.sum(rows.astype(np.float64) ** 2)) for rows, _ in parts)
            for choice in options:
                w_bits, a_bits = choice
                # the grid the export will use: per channel, or the plan's weight blocks
                grid = planned_weight_quant(layer.weight, weight, layer.op_type, axis, w_bits,
                                            plan.weight_block_size)
                error = weight - dequantized(weight, grid)
                weight_term = _quadratic(_weight_rows(model, layer, error), moment)
                low, high = ranges[a_bits].get(layer.inputs[0], (0.0, 0.0))
                activation_term = _noise_power(low, high, a_bits) * weight_norm
                result[name][choice] = (weight_term + activation_term) / signal
        else:
            for choice in options:
                ratio = 0.0
                for tensor in layer.inputs:
                    moment = moments[tensor]
                    power = max(float(np.trace(moment)) / moment.shape[0], 1e-30)
                    low, high = ranges[choice[1]].get(tensor, (0.0, 0.0))
                    ratio += _noise_power(low, high, choice[1]) / power
                result[name][choice] = ratio
    return result


# -- agreement between the two --------------------------------------------------------------------


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = np.asarray(values)[order]
    index = 0
    while index < len(values):  # average ranks over ties
        end = index
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[index]:
            end += 1
        ranks[order[index:end + 1]] = (index + end) / 2.0
        index = end + 1
    return ranks


def spearman(first: Sensitivity, second: Sensitivity, choice: Choice | None = None) -> float:
    """Spearman rank correlation of two sensitivity tables over shared (layer, choice) entries.

    With ``choice``, only that choice of each layer (how well layers are ranked
    at one bit-width); without, every shared entry.
    """
    pairs = [
        (first[name][c], second[name][c])
        for name in first if name in second
        for c in first[name] if c in second[name] and (choice is None or c == choice)
    ]
    if len(pairs) < 3:
        return math.nan
    a = _ranks([p[0] for p in pairs])
    b = _ranks([p[1] for p in pairs])
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


# -- whole plans: the measured last word on a few candidates ------------------------------------


class PlanDistance:
    """``distance(choices)``: output distance from float of ``plan`` with those bits, on ``data``.

    Used to re-rank the ILP's best few plans (passes/allocate.allocate_reranked)
    and to accept refinement steps, on calibration samples the sensitivities
    were not measured on. ``export(plan)``, when given, turns each candidate
    into its QDQ model -- the driver passes the compiler's own export
    (compiler/export.export_plan: calibration, the recipe's sequential GPTQ and
    bias correction), so the model measured is the model that would be
    compiled. Without it, the plan is exported here with passes/insert_qdq on
    ``ranges`` (fitted per width), weights nearest-rounded.
    """

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, data: dict[str, np.ndarray],
                 ranges: dict[int, dict[str, tuple[float, float]]], *, integer_only: bool = False,
                 batch_size: int = 32, export: Callable[[QuantPlan], onnx.ModelProto] | None = None) -> None:
        from compiler.fidelity import run_model

        # converted once to the opset every candidate (int4 weights, 16-bit activations) needs
        self.model = with_opset_for(model, sorted({4, *ranges}))
        self.plan, self.data, self.ranges, self.integer_only = plan, data, ranges, integer_only
        self.export = export
        self.batch_size = batch_size
        self.reference = run_model(self.model, data, batch_size=self.batch_size)
        self.calls = 0

    def __call__(self, choices: dict[str, Choice]) -> float:
        from compiler.fidelity import run_model
        from passes.insert_qdq import quantize_model

        self.calls += 1
        quantized = plan_with_choices(self.plan, choices)
        if self.export is not None:
            qdq = self.export(quantized)
        else:
            ranges = ranges_for_plan(self.model, quantized, self.ranges, integer_only=self.integer_only)
            qdq = quantize_model(self.model, quantized, ranges, integer_only=self.integer_only)
        return output_distance(self.reference, run_model(qdq, self.data, batch_size=self.batch_size))
