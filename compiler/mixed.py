"""Mixed precision from the driver's side: sensitivity + cost model + ILP -> bits in the plan.

``allocate_bits`` is what ``edgeq compile --budget`` and ``edgeq allocate``
run: measure each layer's sensitivity at each candidate (w_bits, a_bits) the
target's cost model declares (``CostModel.bit_pairs``), cost every candidate,
solve the ILP (passes/allocate.py) for its best few plans, export and measure
those on held-out calibration samples, and write the most faithful one's bits
into the plan (:class:`AllocatorOptions` says how; plan.json records it under
``totals.allocation.allocator`` and ``totals.allocation.candidates``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from compiler.budget import FRACTION, base_metric, format_metric, metric_names, parse_budget
from compiler.console import note, warn
from compiler.errors import EdgeqError
from compiler.export import export_plan
from compiler.pareto_plot import pareto_svg
from compiler.plan import QuantPlan
from compiler.recipe import Recipe, gptq_rounding
from passes.allocate import (
    PEAK_METRICS,
    Allocation,
    AllocationProblem,
    allocate,
    allocate_refined,
    allocate_reranked,
    apply_allocation,
    choice_label,
    drop_dominated_choices,
    eight_bit_choices,
    evaluate,
    frontier,
    greedy,
    layer_metric,
    minimum,
    pareto,
    problem_from_model,
    resolve_budget,
)
from passes.gptq import gptq_candidates
from passes.sensitivity import (
    Context,
    PlanDistance,
    activation_ranges,
    cross_fit_folds,
    cross_fitted_sensitivity,
    measured_sensitivity,
    proxy_sensitivity,
    with_opset_for,
)
from targets.base import LayerShape

if TYPE_CHECKING:  # the pipeline imports this module
    from compiler.pipeline import CompileOptions

PARETO_POINTS = 8
# A re-planned build aims this far under the budget: repeated timings of one build on this project's
# shared host spread by 0.5-1.3 % (sd), and aiming at the budget itself lands over it about half the time
# (benchmarks/cpu.md: 1.448 ms planned, 1.507 ms measured against 1.5 ms).
REPLAN_MARGIN = 0.02
# GPTQ-rounded candidates are measured on the samples of one fold with weights rounded on the others
ROUNDING_FOLDS = 2


@dataclass
class AllocatorOptions:
    """How sensitivities are measured and how the final plan is picked.

    ``sensitivity``: "in-context" (each layer changed inside the base plan
    ``context``, all other layers quantized), "single-layer" (that layer alone,
    all else float) or "proxy" (second-moment estimate, nothing run).
    ``rerank``: the ILP's best ``rerank`` plans, and greedy's plan on the same
    table, are each compiled as the compiler would compile them (calibration and
    the recipe's rounding on the sensitivity samples, compiler/export.py) and
    the one whose outputs stay closest to float (KL / relative MSE) on held-out
    calibration samples is taken; 0 or 1 takes the ILP optimum as is.
    ``refine``: then up to ``refine`` trust-region steps, each re-measuring the
    sensitivities around the current plan and re-solving the ILP, a new plan
    kept only if measured closer to float on the held-out samples
    (passes/allocate.allocate_refined). benchmarks/mixed.md measures the
    combinations on three models: with 32 samples per measurement neither the
    in-context table nor the measured re-selection (which picks the lowest KL on
    32 held-out samples) is more faithful on the disjoint evaluation photos than
    the plain ILP on single-layer sensitivities -- the held-out differences
    between near-optimal plans are smaller than the sampling noise -- so that
    is the default; the others stay available as options.
    ``sensitivity_samples``: calibration samples the sensitivities are measured
    on (the first ones; all when fewer). 128, not 32: bootstrapping the
    calibration sources (benchmarks/mixed.md), a layer's entry varies by ~20-30 %
    of its value with 32 samples and ~13-17 % with 128 (less gained where the
    samples are crops of few photos); the table's time grows about linearly
    (MobileNetV2 with --budget compiles in about 4 min on 2 busy cores). On the
    three benchmark models the ILP picks the same plans with either, and it
    still is not ahead of greedy at every budget on the evaluation photos --
    there the calibration data itself rates the ILP plan at least as faithful
    at every point it loses (benchmarks/mixed.md).
    ``solver``: "ilp" (default) or "greedy", the baseline the ILP is compared
    with (passes/allocate.greedy), for side-by-side runs on the same table.
    ``latency_rounds``: under a latency budget, ``edgeq compile`` times what it
    built on this machine; while that measures over the budget it re-plans, up
    to this many times, and builds again (:func:`next_latency_plan`: the budget
    scaled by the measured/predicted ratio, the last time the fastest plan). The
    cost model is a fit that misses whole models by 7-17 % (benchmarks/cpu.md);
    a round costs one export and lowering (~20 s for MobileNetV2 on the CPU
    target), and re-solves as configured (``rerank`` / ``refine`` included) on
    the same sensitivity table.
    """

    sensitivity: str = "single-layer"
    rerank: int = 0
    refine: int = 0
    context: tuple[int, int] = (8, 8)
    sensitivity_samples: int = 128
    rerank_samples: int = 32
    pairs: tuple[tuple[int, int], ...] | None = None  # None: the target cost model's bit_pairs
    solver: str = "ilp"
    latency_rounds: int = 2

    def __post_init__(self) -> None:
        if self.sensitivity not in SENSITIVITY_MODES:
            raise EdgeqError(f"unknown sensitivity mode '{self.sensitivity}' "
                             f"(choose from {', '.join(SENSITIVITY_MODES)})")
        if self.solver not in SOLVERS:
            raise EdgeqError(f"unknown solver '{self.solver}' (choose from {', '.join(SOLVERS)})")
        if self.solver == "greedy" and (self.rerank > 1 or self.refine):
            raise EdgeqError("--rerank and --refine re-solve the ILP; they do not apply to --solver greedy")
        if self.rerank < 0 or self.refine < 0:
            raise EdgeqError(f"rerank and refine must be >= 0, not {self.rerank} / {self.refine}")
        if self.latency_rounds < 0:
            raise EdgeqError(f"latency rounds must be >= 0, not {self.latency_rounds}")
        for option, samples in (("sensitivity", self.sensitivity_samples), ("rerank", self.rerank_samples)):
            if samples < 1:
                raise EdgeqError(f"{option} samples must be >= 1, not {samples}")


SENSITIVITY_MODES = ("in-context", "single-layer", "proxy")
SOLVERS = ("ilp", "greedy")


def allocator_options(args: argparse.Namespace) -> AllocatorOptions:
    """The allocator options of ``edgeq compile`` / ``edgeq allocate`` (--sensitivity, --rerank, --refine,
    --solver, and --sensitivity-samples / --rerank-samples / --latency-rounds where the CLI defines them)."""
    extra = {option: getattr(args, option) for option in ("sensitivity_samples", "rerank_samples", "latency_rounds")
             if getattr(args, option, None) is not None}
    return AllocatorOptions(sensitivity=args.sensitivity, rerank=args.rerank, refine=args.refine,
                            solver=getattr(args, "solver", "ilp"), **extra)


@dataclass
class MixedPrecision:
    problem: AllocationProblem
    allocation: Allocation | None = None  # None until solved
    pareto_svg: str | None = None  # the frontier along the budget's first metric, chosen point marked
    distance: PlanDistance | None = None  # measures whole plans; None without re-ranking or refinement
    sensitivity_around: Callable[[dict], dict] | None = None  # re-measures the table around a plan
    record: dict = field(default_factory=dict)  # what was done: plan.totals["allocation"]["allocator"]
    device: str = ""  # the cost model's device, e.g. "mcu:cortex-m4"
    device_limits: dict[str, float] = field(default_factory=dict)  # what the device has (CostModel.resources)
    budget: dict[str, float] = field(default_factory=dict)  # the user's
    fastest_latency_s: float | None = None  # the cost model's fastest plan within the other budgets
    pareto_metric: str = "weight_bytes"  # what the frontier is drawn along
    pareto_points: list[Allocation] = field(default_factory=list)  # the frontier, within the other budgets
    latency_rounds: list[dict] = field(default_factory=list)  # each build timed under a latency budget
    base_plan: QuantPlan | None = None  # the plan before allocation, kept for re-planning under a latency budget
    options: AllocatorOptions = field(default_factory=AllocatorOptions)


def parse_pins(texts: list[str] | None, plan: QuantPlan) -> dict[str, tuple[int | None, int | None]]:
    """``["conv1=w8a8", "fc=w8"]`` -> {layer: (w_bits, a_bits)}; a missing part stays free."""
    pins: dict[str, tuple[int | None, int | None]] = {}
    for text in texts or []:
        name, _, bits = text.rpartition("=")
        match = re.fullmatch(r"(?:w(\d+))?(?:a(\d+))?", bits.strip().lower())
        if not name or not match or not bits.strip():
            raise EdgeqError(f"bad --pin '{text}': expected LAYER=w8a8, LAYER=w8 or LAYER=a8")
        if name not in plan.layers:
            raise EdgeqError(f"--pin names '{name}', which is not a quantized layer "
                             f"(layers: {', '.join(list(plan.layers)[:5])}, ...)")
        w_bits, a_bits = (int(group) if group else None for group in match.groups())
        if name in pins:
            raise EdgeqError(f"--pin names '{name}' twice ({_pin_text(pins[name])} and {_pin_text((w_bits, a_bits))})")
        if w_bits is not None and plan.layers[name].w_bits is None:
            raise EdgeqError(f"--pin '{text}': '{name}' has no weights; pin its activations only ({name}=a{a_bits or 8})")
        pins[name] = (w_bits, a_bits)
    return pins


def _pin_text(pin: tuple[int | None, int | None]) -> str:
    return "".join(f"{part}{bits}" for part, bits in zip("wa", pin, strict=True) if bits is not None)


def build_problem(model: onnx.ModelProto, plan: QuantPlan, calib: dict[str, np.ndarray], target,
                  device: str | None, *, integer_only: bool, pins: list[str] | None = None,
                  options: AllocatorOptions | None = None, metrics: list[str] | None = None,
                  recipe: Recipe | None = None) -> MixedPrecision:
    """Sensitivities and costs of every candidate of every layer in ``plan``, and the plan measurer.

    Candidates are the target cost model's ``bit_pairs`` (or ``options.pairs``),
    less wider activations when none of ``metrics`` (the budgeted ones) charges
    for activation width: then a wider activation would be free and always
    chosen, so the user's budget would silently double every activation tensor
    (and, on the CPU target, cost 7-60x the time). Per layer, a choice that one
    with more weight bits costs no more of on every budgeted metric is dropped
    before measuring (:func:`passes.allocate.drop_dominated_choices`).

    The first ``sensitivity_samples`` calibration samples measure the
    sensitivities; the next ``rerank_samples`` (held out from them) measure
    whole candidate plans, each compiled on the first ones as the compiler
    would (``recipe``'s rounding; without a recipe, nearest rounding). With
    too few samples to hold any out, both use the same ones (recorded as
    ``held_out: false``).

    When ``recipe`` GPTQ-rounds narrow weights, candidates at those widths are
    measured with the weights GPTQ gives them (:func:`passes.gptq.gptq_candidates`),
    not nearest-rounded: the table then prices what will be exported.
    """
    options = options or AllocatorOptions()
    pinned = parse_pins(pins, plan)
    cost_model = target.cost_model(device)
    pairs = list(options.pairs or cost_model.bit_pairs)
    dropped = []
    if options.pairs is None and metrics is not None:
        pairs, dropped = priced_pairs(cost_model, pairs, metrics)
    # Costs first: choices a budgeted metric cannot tell from one with more bits are not measured.
    problem = problem_from_model(model, plan, cost_model, pairs=pairs, integer_only=integer_only, pins=pinned)
    dominated = drop_dominated_choices(problem, metrics) if metrics else {}
    choices = {layer.name: list(layer.choices) for layer in problem.layers}
    total = len(next(iter(calib.values())))
    n_sens = min(options.sensitivity_samples, total)
    held_out = total > n_sens
    used = {name: value[:n_sens + options.rerank_samples] for name, value in calib.items()}
    a_bits = sorted({a for _, a in pairs} | {options.context[1]})
    ranges = activation_ranges(with_opset_for(model, [4, *a_bits]), plan, used, a_bits)
    sens_data = {name: value[:n_sens] for name, value in calib.items()}
    context = options.context if options.context in pairs else max(pairs, key=lambda pair: (pair[0], pair[1]))
    gptq_widths, gptq_options = gptq_rounding(recipe, [w for w, _ in pairs]) if recipe else ([], {})
    rounds = bool(gptq_widths) and options.sensitivity != "proxy"

    fold_weights = []
    if rounds:  # GPTQ fits its samples: each is measured on weights rounded without it (once per fold)
        for held in cross_fit_folds(n_sens, ROUNDING_FOLDS):
            fit = ~held if (~held).any() else held  # a single sample: nothing else to fit on
            fold_weights.append(gptq_candidates(model, plan, {name: value[fit] for name, value in sens_data.items()},
                                                gptq_widths, **gptq_options))

    def measure(around: Context | None) -> dict:
        if rounds:
            return cross_fitted_sensitivity(model, plan, sens_data, choices, fold_weights,
                                            ranges=ranges, context=around, integer_only=integer_only)
        return measured_sensitivity(model, plan, sens_data, choices, ranges=ranges, max_samples=n_sens,
                                    context=around, integer_only=integer_only)

    if options.sensitivity == "proxy":
        sensitivity = proxy_sensitivity(model, plan, sens_data, choices, ranges=ranges, max_samples=n_sens)
    else:
        sensitivity = measure(context if options.sensitivity == "in-context" else None)
    for layer in problem.layers:
        layer.sensitivity = {choice: sensitivity[layer.name][choice] for choice in layer.choices}
    distance = around = None
    if options.refine and options.sensitivity != "proxy":
        around = measure
    if options.rerank > 1 or around is not None:
        rerank_data = ({name: value[n_sens:n_sens + options.rerank_samples] for name, value in calib.items()}
                       if held_out else sens_data)
        distance = PlanDistance(model, plan, rerank_data, ranges, integer_only=integer_only,
                                export=_compiled_by(model, recipe, sens_data, integer_only) if recipe else None)
    record = {"solver": options.solver, "sensitivity": options.sensitivity,
              "candidates": [list(pair) for pair in pairs],
              "sensitivity_samples": n_sens, "rerank": options.rerank,
              "refine": options.refine if around is not None else 0,
              "rounding": {"gptq": gptq_widths, "folds": ROUNDING_FOLDS} if rounds else "nearest"}
    if dropped:
        record["not_offered"] = {"pairs": [list(pair) for pair in dropped],
                                 "reason": f"no budgeted metric ({', '.join(metrics)}) depends on activation bits"}
    if dominated:
        record["not_measured"] = {"choices": sum(len(lost) for lost in dominated.values()),
                                  "layers": len(dominated),
                                  "reason": "another choice of the layer with more weight bits costs no more "
                                            f"({', '.join(metrics)})"}
    if options.sensitivity == "in-context":
        record["context"] = list(context)
    if distance is not None:
        record["rerank_samples"] = len(next(iter(distance.data.values())))
        record["held_out"] = held_out
    if problem.online_ops:
        record["online_ops"] = problem.online_ops
        record["fixed_costs"] = dict(problem.fixed)
    return MixedPrecision(problem, distance=distance, sensitivity_around=around, record=record,
                          device=cost_model.name, device_limits=cost_model.resources(), options=options)


def _compiled_by(model: onnx.ModelProto, recipe: Recipe, data: dict[str, np.ndarray],
                 integer_only: bool) -> Callable[[QuantPlan], onnx.ModelProto]:
    """A candidate plan's QDQ model as the compiler exports it (calibrated and rounded on ``data``)."""
    def export(plan: QuantPlan) -> onnx.ModelProto:
        return export_plan(model, plan, data, recipe, integer_only=integer_only)[0]
    return export


def absolute_budget(mixed: MixedPrecision, budget: dict[str, float]) -> dict[str, float]:
    """``budget`` with each relative limit (``latency=80%`` parses to ``latency_s_fraction``) made
    absolute: that fraction of the all-8-bit plan's total on this target's cost model. Recorded in
    ``mixed.record["relative_budget"]``. ``size_fraction`` stays: the allocator takes it as it is."""
    relative = {key: value for key, value in budget.items() if key.endswith(FRACTION) and key != "size_fraction"}
    if not relative:
        return budget
    reference = evaluate(mixed.problem, eight_bit_choices(mixed.problem))
    absolute = {key: value for key, value in budget.items() if key not in relative}
    mixed.record["relative_budget"] = {}
    for key, fraction in relative.items():
        metric = base_metric(key)
        if reference.get(metric) is None:
            raise EdgeqError(f"the target's cost model has no '{metric}' estimate, so it cannot be budgeted")
        absolute[metric] = fraction * reference[metric]
        mixed.record["relative_budget"][metric] = {"fraction": fraction, "all_8bit": reference[metric],
                                                   "limit": absolute[metric]}
    return absolute


# A mid-sized 3x3 convolution: what "does this metric change with the activation bits" is asked of.
_PROBE = LayerShape("probe", "Conv", "conv", macs=64 * 64 * 9 * 16 * 16, weight_params=64 * 64 * 9,
                    input_elems=64 * 16 * 16, output_elems=64 * 16 * 16, output_channels=64)


def priced_pairs(cost_model, pairs: list[tuple[int, int]], metrics: list[str]
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(pairs offered, pairs dropped): wider activations only where a budgeted metric charges for them."""
    narrowest = min(a for _, a in pairs)

    def charges(metric: str) -> bool:
        if metric in PEAK_METRICS:  # live activation bytes
            return True
        for w_bits in {w for w, _ in pairs}:
            values = {layer_metric(cost_model.layer_cost(_PROBE, w, a), metric) for w, a in pairs if w == w_bits}
            if len(values) > 1:
                return True
        return False

    if any(charges(metric) for metric in metrics):
        return pairs, []
    return [pair for pair in pairs if pair[1] == narrowest], [pair for pair in pairs if pair[1] != narrowest]


def solve(mixed: MixedPrecision, budget: dict[str, float], options: AllocatorOptions | None = None) -> Allocation:
    """The ILP optimum, or the best measured of its ``rerank`` best plans and greedy's, refined around it;
    or, with ``--solver greedy``, greedy's plan alone."""
    options = options or AllocatorOptions()
    if options.solver == "greedy":
        return greedy(mixed.problem, budget)
    if mixed.distance is not None and options.rerank > 1:
        allocation = allocate_reranked(mixed.problem, budget, mixed.distance, k=options.rerank,
                                       also=_greedy_plan(mixed.problem, budget))
    else:
        allocation = allocate(mixed.problem, budget)
    if mixed.sensitivity_around is not None and mixed.distance is not None and options.refine:
        allocation = allocate_refined(mixed.problem, budget, mixed.sensitivity_around, mixed.distance,
                                      steps=options.refine, start=allocation)
    return allocation


def _greedy_plan(problem: AllocationProblem, budget: dict[str, float]) -> list[Allocation]:
    """Greedy's plan, for the re-ranking to measure beside the ILP's (none where its demotions get stuck)."""
    try:
        return [greedy(problem, budget)]
    except EdgeqError:
        return []


def solve_into_plan(mixed: MixedPrecision, plan: QuantPlan, budget: dict[str, float],
                    options: AllocatorOptions) -> Allocation:
    """:func:`solve`, then the chosen bits and how they were chosen written into ``plan``."""
    with percent_explained(mixed):
        allocation = solve(mixed, budget, options)
    apply_allocation(plan, mixed.problem, allocation)
    plan.totals["allocation"]["allocator"] = mixed.record
    for message in device_overruns(mixed.device, mixed.device_limits, budget, allocation.totals):
        warn(message)
    return allocation


def device_overruns(device: str, limits: dict[str, float], budget: dict[str, float],
                    totals: dict[str, float]) -> list[str]:
    """What does not fit the device: budget limits above its resources, and the plan's totals over them.

    The budget is the user's to set (a preset may be smaller than their part), so
    these are warnings, not errors; unbudgeted resources are checked too, since the
    allocator does not limit what it is not asked to.
    """
    messages = []
    for metric, available in limits.items():
        if metric in budget and budget[metric] > available:
            messages.append(f"budget {metric} {format_metric(metric, budget[metric])} is more than {device} has "
                            f"({format_metric(metric, available)})")
        elif totals.get(metric, 0.0) > available:
            messages.append(f"the plan needs {metric} {format_metric(metric, totals[metric])}, more than {device} "
                            f"has ({format_metric(metric, available)}); budget it to plan within the device")
    return messages


def check_latency(plan: QuantPlan, target, out_dir: Path, inputs: dict[str, np.ndarray]) -> dict | None:
    """The compiled artifact timed on this machine against the plan's latency budget.

    Only when the plan was allocated under a latency budget and the target can time
    its artifact here (``Target.measure_latency``). The cost model's estimate is a
    fit, so the measurement is what the user can hold the budget to: it goes into
    plan.json (``totals.allocation.measured``) and the report. A failed timing is a
    warning, not a failed compile; a plan over its budget is re-planned
    (:func:`next_latency_plan`) and, if still over, warned of (:func:`record_latency_rounds`).
    """
    allocation = plan.totals.get("allocation") or {}
    limit = (allocation.get("budget") or {}).get("latency_s")
    if limit is None:
        return None
    try:
        timing = target.measure_latency(out_dir, inputs)
    except EdgeqError as error:
        warn(f"latency budget not checked: {error}")
        return None
    if timing is None:
        return None
    # a target timing in blocks reports the lowest block median (``settled_ms``: steadier on a shared host)
    blocks = len(timing.get("block_medians_ms", ())) or 1
    measured = timing.get("settled_ms", timing["median_ms"]) / 1e3
    predicted = (allocation.get("totals") or {}).get("latency_s")
    # a target that does not time the artifact here (an emulator) says where and how it measured
    how = timing.get("how") or ((f"the lowest of {blocks} block medians of {timing.get('runs')} runs" if blocks > 1
                                 else f"median of {timing.get('runs')} runs") + f", {timing.get('threads')} thread")
    record = {"latency_s": measured, "median_latency_s": timing["median_ms"] / 1e3, "runs": timing.get("runs"),
              "blocks": blocks, "threads": timing.get("threads"), "predicted_latency_s": predicted,
              "within_budget": measured <= limit, "where": timing.get("where", "on this machine"), "how": how}
    if "instructions" in timing:
        record["instructions"] = timing["instructions"]
    allocation["measured"] = record
    line = (f"Measured {record['where']}: {format_metric('latency_s', measured)} per sample ({how}) "
            f"against the budget {format_metric('latency_s', limit)}"
            + (f"; the cost model predicted {format_metric('latency_s', predicted)}" if predicted else "") + ".")
    sections = plan.totals.setdefault("report_sections", {})
    sections["Bit allocation"] = sections.get("Bit allocation", "") + "\n\n" + line
    return record


def next_latency_plan(mixed: MixedPrecision, built: QuantPlan) -> QuantPlan | None:
    """The plan to build next after ``built`` was timed against the latency budget; None to keep ``built``.

    The cost model's error is taken as the largest ratio of measured to predicted
    latency seen so far, so the next plan is held to a predicted ``budget /
    ratio`` less :data:`REPLAN_MARGIN` (the timing's own noise); the last
    re-plan (``AllocatorOptions.latency_rounds``) takes the fastest plan within
    the other budgets, so that a budget that plan meets is met. (On MobileNetV2
    the ratio grows toward the all-8-bit plan, so the last ratio alone closed in
    by ~1% a build: benchmarks/cpu.md.)
    None when ``built`` was not timed, measured within the budget, is already
    the fastest plan, or the re-plans are spent. Each timed build is recorded
    in ``mixed.latency_rounds``.
    """
    allocation = built.totals.get("allocation") or {}
    measured = allocation.get("measured")
    if measured is None or mixed.base_plan is None:
        return None
    limit = mixed.budget["latency_s"]
    predicted = measured["predicted_latency_s"]
    mixed.latency_rounds.append({"planned_latency_s": allocation["planned_latency_s"],
                                 "predicted_latency_s": predicted, "measured_latency_s": measured["latency_s"],
                                 "within_budget": measured["within_budget"],
                                 "objective": allocation["objective"]})
    fastest = mixed.fastest_latency_s
    replans = len(mixed.latency_rounds) - 1
    if (measured["within_budget"] or replans >= mixed.options.latency_rounds or not predicted
            or fastest is None or predicted <= fastest * (1 + 1e-6)):
        return None
    ratio = max(item["measured_latency_s"] / item["predicted_latency_s"] for item in mixed.latency_rounds)
    last = replans + 1 == mixed.options.latency_rounds
    planned = fastest if last else max(limit / ratio * (1 - REPLAN_MARGIN), fastest)
    note(f"measured {format_metric('latency_s', measured['latency_s'])} per sample, over the latency budget "
         f"{format_metric('latency_s', limit)}: re-planning to a predicted {format_metric('latency_s', planned)}"
         + (" (the fastest plan)" if planned == fastest else "")
         + f", build {replans + 2} of at most {mixed.options.latency_rounds + 1}")
    plan = copy.deepcopy(mixed.base_plan)
    try:
        plan_bits(mixed, plan, latency_limit=planned * (1 + 1e-9))  # the fastest plan exactly, not a rounding under
    except EdgeqError as error:  # e.g. greedy's demotions stuck: the build at hand is still a valid answer
        warn(f"re-planning for the latency budget stopped: {error}")
        return None
    return plan


def record_latency_rounds(mixed: MixedPrecision, plan: QuantPlan) -> None:
    """The timed builds into ``plan`` (plan.json and the report) when there was more than one, and a
    warning when the kept one is still over the latency budget, with a budget to try."""
    allocation = plan.totals.get("allocation") or {}
    measured = allocation.get("measured")
    if measured is None:
        return
    if len(mixed.latency_rounds) > 1:
        allocation["latency_rounds"] = mixed.latency_rounds
        rows = ["", "", "Each build was timed and, while over the budget, re-planned to the budget divided by the "
                f"largest measured/predicted ratio so far, less {REPLAN_MARGIN:.0%} (the last re-plan: the fastest "
                "plan):", "",
                "| build | planned to | predicted | measured | total sensitivity |", "|---|---|---|---|---|"]
        rows += [f"| {index} | {format_metric('latency_s', item['planned_latency_s'])} | "
                 f"{format_metric('latency_s', item['predicted_latency_s'])} | "
                 f"{format_metric('latency_s', item['measured_latency_s'])} | {item['objective']:.4g} |"
                 for index, item in enumerate(mixed.latency_rounds, 1)]
        sections = plan.totals.setdefault("report_sections", {})
        sections["Bit allocation"] = sections.get("Bit allocation", "") + "\n".join(rows)
    if not measured["within_budget"]:
        limit, predicted = mixed.budget["latency_s"], measured["predicted_latency_s"]
        warn(f"the compiled model runs in {format_metric('latency_s', measured['latency_s'])} per sample on this "
             f"machine, over the latency budget {format_metric('latency_s', limit)}"
             + (f" (predicted {format_metric('latency_s', predicted)})" if predicted else "")
             + _latency_hint(limit, measured["latency_s"], predicted, mixed.fastest_latency_s))


def _latency_hint(limit: float, measured: float, predicted: float | None, fastest: float | None) -> str:
    """What to try after a plan measured over its latency budget: the budget whose plan should measure
    within the limit (the prediction's error taken as a ratio), floored at the fastest plan."""
    if not predicted:
        return "; a tighter --budget latency gives a faster plan"
    if fastest is None:
        return f"; try --budget latency={format_metric('latency_s', limit * predicted / measured)}"
    if predicted <= fastest * (1 + 1e-6):
        return "; it is the cost model's fastest plan within the other budgets, so no plan meets it here"
    if limit * predicted / measured < fastest:
        return (f"; the cost model's fastest plan within the other budgets is predicted at "
                f"{format_metric('latency_s', fastest)}: try --budget latency={format_metric('latency_s', fastest)}")
    return f"; try --budget latency={format_metric('latency_s', limit * predicted / measured)}"


def allocate_bits(model: onnx.ModelProto, plan: QuantPlan, calib: dict[str, np.ndarray], target,
                  device: str | None, budget_text: str, *, integer_only: bool,
                  pins: list[str] | None = None, options: AllocatorOptions | None = None,
                  recipe: Recipe | None = None) -> MixedPrecision:
    """Solve the ILP for ``budget_text`` and write the chosen bits into ``plan``."""
    budget = parse_budget(budget_text)
    mixed = build_problem(model, plan, calib, target, device, integer_only=integer_only,
                          pins=pins, options=options, metrics=metric_names(budget), recipe=recipe)
    problem = mixed.problem
    budget = absolute_budget(mixed, budget)
    mixed.budget = budget
    with percent_explained(mixed):
        if "latency_s" in budget:  # the floor of re-planning and of the hint, and the plan re-planning starts from
            others = resolve_budget(problem, {metric: value for metric, value in budget.items()
                                              if metric != "latency_s"})
            mixed.fastest_latency_s = minimum(problem, "latency_s", limits=others)
            mixed.base_plan = copy.deepcopy(plan)
        mixed.pareto_metric = _pareto_metric(budget, target.name)
        mixed.pareto_points = pareto(problem, mixed.pareto_metric, PARETO_POINTS, limits=budget)  # within the others
    plan_bits(mixed, plan)
    return mixed


def plan_bits(mixed: MixedPrecision, plan: QuantPlan, latency_limit: float | None = None) -> None:
    """Solve for the user's budget -- the latency held to ``latency_limit`` where given -- and write the
    bits, the report's "Bit allocation" section and the Pareto plot with the chosen point into ``plan``."""
    budget = dict(mixed.budget)
    if latency_limit is not None:
        budget["latency_s"] = latency_limit
    allocation = solve_into_plan(mixed, plan, budget, mixed.options)
    record = plan.totals["allocation"]
    if "latency_s" in budget:
        record["planned_latency_s"] = budget["latency_s"]
        record["fastest_latency_s"] = mixed.fastest_latency_s
        record["budget"]["latency_s"] = plan.budget["latency_s"] = mixed.budget["latency_s"]  # the user's
    metric = mixed.pareto_metric
    points = frontier([*mixed.pareto_points, allocation], metric)  # the sweep's budgets step over the user's
    svg = frontier_plot(mixed.problem, metric, [(point.totals[metric], point.objective) for point in points],
                        (allocation.totals[metric], allocation.objective), mixed.budget)
    summary = allocation_summary(mixed.problem, allocation, mixed.record)
    summary += f"\n\n![Pareto frontier along {metric}, chosen plan in red](pareto.svg)"
    plan.totals.setdefault("report_sections", {})["Bit allocation"] = summary
    mixed.allocation, mixed.pareto_svg = allocation, svg


def frontier_plot(problem: AllocationProblem, metric: str, points: list[tuple[float, float]],
                  chosen: tuple[float, float] | None, budget: dict[str, float]) -> str:
    """The Pareto SVG along ``metric`` with the chosen plan and the user's limit on that metric."""
    limit = resolve_budget(problem, budget).get(metric)
    return pareto_svg(points, metric, chosen=chosen, title=f"Pareto frontier: {metric}", budget=limit)


@contextmanager
def percent_explained(mixed: MixedPrecision) -> Iterator[None]:
    """An infeasible budget the user gave in percent: its error also says what the percent was of."""
    try:
        yield
    except EdgeqError as error:
        relative = mixed.record.get("relative_budget")
        if not relative:
            raise
        raise EdgeqError(f"{error} ({_relative_text(relative)})") from None


def _relative_text(relative: dict[str, dict]) -> str:
    """``latency_s 1.2ms is 80% of the all-8-bit plan's 1.5ms; ...``: the budgets given in percent."""
    return "; ".join(f"{metric} {format_metric(metric, entry['limit'])} is {entry['fraction'] * 100:.4g}% of the "
                     f"all-8-bit plan's {format_metric(metric, entry['all_8bit'])}" for metric, entry in relative.items())


def allocation_summary(problem: AllocationProblem, allocation: Allocation, record: dict | None = None) -> str:
    """Markdown explaining the ILP's answer: how it was chosen, budget vs totals, each layer's choice."""
    lines = [f"Solved by {allocation.method} ({allocation.status}) in {allocation.solve_time_s * 1e3:.1f} ms; "
             f"total sensitivity {allocation.objective:.4g}.", ""]
    if record:
        how = f"Sensitivities: {record['sensitivity']}"
        if "context" in record:
            how += f" (each layer changed inside the all-{choice_label(tuple(record['context']))} plan)"
        rounding = record.get("rounding")
        if isinstance(rounding, dict) and rounding.get("gptq"):
            how += (", weights of " + " and ".join(f"{bits}" for bits in rounding["gptq"]) +
                    f" bits GPTQ-rounded as the recipe exports them (each of {rounding['folds']} interleaved "
                    "folds of the samples measured on weights rounded on the others)")
        how += f", {record['sensitivity_samples']} calibration samples; candidates " + \
            ", ".join(choice_label(tuple(pair)) for pair in record["candidates"]) + "."
        if "not_measured" in record:
            skipped = record["not_measured"]
            how += (f" Not measured: {skipped['choices']} choices of {skipped['layers']} layers, for which "
                    f"{skipped['reason']}.")
        lines += [how, ""]
        if record.get("relative_budget"):
            lines += [f"Budget given in percent: {_relative_text(record['relative_budget'])}.", ""]
        if problem.online_ops:
            lines += [f"Float ops inserted by transforms and run online ({', '.join(problem.online_ops)}) are "
                      "charged as fixed costs: " + ", ".join(
                          f"{metric} {format_metric(metric, value)}" for metric, value in sorted(problem.fixed.items())
                          if metric in allocation.totals) + ".", ""]
    if allocation.candidates:
        source = "held-out calibration samples" if (record or {}).get("held_out", True) else "calibration samples"
        lines += [f"Plans measured before choosing (output distance from float of each exported plan on {source}; "
                  "the lowest is taken): the ILP's best plans by total sensitivity (*ILP rank*), greedy's plan when "
                  "it is not among them (*baseline*), then plans "
                  "from sensitivities re-measured around the current one (*refine step*, layers changed).", "",
                  "| plan | total sensitivity | measured distance | chosen |", "|---|---|---|---|"]
        for candidate in allocation.candidates:
            lines.append(f"| {_candidate_label(candidate)} | {candidate['objective']:.4g} | {candidate['measured']:.4g} | "
                         f"{'yes' if candidate['chosen'] else ''} |")
        lines.append("")
    lines += ["| metric | total | budget |", "|---|---|---|"]
    for metric, value in allocation.totals.items():
        if metric == "sensitivity":
            continue
        limit = allocation.budget.get(metric)
        if metric == "weight_bytes" and "size_fraction" in allocation.budget:
            limit = allocation.budget["size_fraction"] * problem.int8_weight_bytes()
        lines.append(f"| {metric} | {format_metric(metric, value)} | "
                     f"{format_metric(metric, limit) if limit is not None else '-'} |")
    lines += ["", "| layer | chosen | sensitivity at each choice |", "|---|---|---|"]
    for layer in problem.layers:
        chosen = allocation.choices[layer.name]
        options = ", ".join(f"{choice_label(choice)}: {value:.3g}" for choice, value in sorted(
            layer.sensitivity.items(), key=lambda item: (item[0][0] or 0, item[0][1])))
        pinned = f" (pinned {_pin_text(problem.pins[layer.name])})" if layer.name in problem.pins else ""
        lines.append(f"| `{layer.name}` | {choice_label(chosen)}{pinned} | {options} |")
    return "\n".join(lines)


def _candidate_label(candidate: dict) -> str:
    """Where a measured plan came from: the ILP's ranking, another solver, or a refine step."""
    if "rank" in candidate:
        return f"ILP rank {candidate['rank'] + 1}"
    if "source" in candidate:
        return f"{candidate['source']} baseline"
    changed = f" ({candidate['changed']} changed)" if "changed" in candidate else " (start)"
    return f"refine step {candidate['step']}{changed}"


def allocation_problem(options: CompileOptions, metrics: list[str] | None = None) -> tuple[QuantPlan, MixedPrecision]:
    """The plan and allocation problem of ``options`` (a ``compiler.pipeline.CompileOptions``): model and
    data loaded, transformed and layer-selected as ``edgeq compile`` does, every layer priced for
    ``metrics`` (default: those ``options.budget`` names). Nothing is solved or written."""
    from compiler.pipeline import (
        check_default_bits,
        load_model_and_data,
        normalize_options,
        plan_before_allocation,
    )
    from targets.base import get_target

    normalize_options(options)
    target = get_target(options.target)
    bits = check_default_bits(options, target)  # a bad --bits fails before any work
    # Model, data, transforms and plan exactly as `edgeq compile` makes them (the bundled model with
    # its data by default).
    model_path, float_model, calib, _ = load_model_and_data(options)
    recipe, model, plan = plan_before_allocation(options, target, bits, model_path, float_model, calib)
    integer_only = target.needs_integer_graph
    if metrics is None:
        metrics = metric_names(parse_budget(options.budget) if options.budget else {})
    mixed = build_problem(model, plan, calib, target, options.device, integer_only=integer_only,
                          pins=options.pins, options=options.allocator, metrics=metrics, recipe=recipe)
    return plan, mixed


def allocate_model(options: CompileOptions) -> QuantPlan:
    """``edgeq allocate --budget`` from Python: the plan that ``options.budget`` gets on
    ``options.target`` (a ``compiler.pipeline.CompileOptions``; its model, data, device, pins,
    recipe and ``allocator`` are used as compile uses them). Each layer's bits, its sensitivity at
    every candidate and its cost are in ``plan.layers``, the totals against the budget in
    ``plan.totals["allocation"]``; nothing is compiled or written. An infeasible budget raises an
    EdgeqError naming the smallest achievable value."""
    if not options.budget:
        raise EdgeqError("allocate_model needs a budget, e.g. CompileOptions(budget='size=0.5')")
    plan, mixed = allocation_problem(options)
    solve_into_plan(mixed, plan, absolute_budget(mixed, parse_budget(options.budget)), mixed.options)
    plan.update_totals()
    return plan


def allocate_command(args: argparse.Namespace) -> int:
    """``edgeq allocate``: the plan (or the Pareto frontier) without compiling."""
    from compiler.atomic import atomic_dir, check_output_dir
    from compiler.pipeline import check_no_allocator_options, options_from_args

    if not args.budget and not args.pareto:
        raise EdgeqError("edgeq allocate needs --budget (e.g. size=0.5) or --pareto")
    check_output_dir(args.output)  # a bad -o fails before any work
    options = allocator_options(args)
    if not args.budget:  # --pareto alone sweeps the table: nothing is solved, re-ranked or refined
        check_no_allocator_options(options, "--budget", ("solver", "rerank", "rerank_samples", "refine"))
    budget = parse_budget(args.budget) if args.budget else {}
    metrics = metric_names(budget)
    pareto_metric = _pareto_metric(budget, args.target)
    if args.pareto and pareto_metric not in metrics:  # each metric named once (in the record and report)
        metrics.append(pareto_metric)
    plan, mixed = allocation_problem(options_from_args(args, allocator=options), metrics)
    problem = mixed.problem
    budget = absolute_budget(mixed, budget)
    out = Path(args.output)
    messages = []  # printed only once everything is in place: a failed run reports nothing as written
    with atomic_dir(out, replaces_outputs=True) as tmp:  # the folder holds this run's outputs only
        if args.budget:  # first: an infeasible budget fails before the sweep
            allocation = solve_into_plan(mixed, plan, budget, options)
            plan.update_totals()
            plan.save(str(tmp / "plan.json"))
            summary = allocation_summary(problem, allocation, mixed.record)
        if args.pareto:
            metric = pareto_metric
            points = pareto(problem, metric, limits=budget)  # the frontier within the other budgets
            if args.budget:  # the sweep's evenly spaced budgets step over the user's
                points = frontier([*points, allocation], metric)
            rows = [{"budget": point.totals[metric], "sensitivity": point.objective,
                     "totals": {name: point.totals[name] for name in metrics if name in point.totals},
                     "choices": {name: list(choice) for name, choice in point.choices.items()}}
                    for point in points]
            chosen = (allocation.totals[metric], allocation.objective) if args.budget else None
            (tmp / "pareto.json").write_text(json.dumps({"metric": metric, "points": rows}, indent=1) + "\n")
            (tmp / "pareto.svg").write_text(frontier_plot(problem, metric, [(row["budget"], row["sensitivity"])
                                                                            for row in rows], chosen, budget))
            messages.append(f"{len(points)} Pareto-optimal plans over {metric} written to {out}/pareto.json "
                            "and pareto.svg")
        if args.budget:
            messages.append(summary)
    print("\n".join(messages))
    return 0


def _pareto_metric(budget: dict[str, float], target: str) -> str:
    """The metric the frontier is drawn over: the budget's first metric, else a target default."""
    for metric in budget:
        return base_metric(metric)
    # FPGA: block RAM holds the weights, so it is what weight bits trade against
    # (with 8-bit activations only, the LUT/DSP counts barely move).
    return {"mcu": "flash_bytes", "cpu": "latency_s", "gpu": "latency_s", "fpga": "bram"}.get(target, "weight_bytes")
