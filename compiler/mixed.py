"""Mixed precision from the driver's side: sensitivity + cost model + ILP -> bits in the plan.

``allocate_bits`` is what ``edgeq compile --budget`` and ``edgeq allocate``
run: measure each layer's sensitivity at each candidate (w_bits, a_bits),
cost every candidate with the target's cost model, solve the ILP
(passes/allocate.py) and write the chosen bits into the plan.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from compiler.budget import format_metric, parse_budget
from compiler.errors import EdgeqError
from compiler.pareto_plot import pareto_svg
from compiler.plan import QuantPlan
from passes.allocate import (
    Allocation,
    AllocationProblem,
    allocate,
    apply_allocation,
    pareto,
    problem_from_model,
)
from passes.sensitivity import candidate_choices, measured_sensitivity, proxy_sensitivity

# Candidate (weight bits, activation bits) per target. 4-bit activations are not
# offered: onnxruntime (which measures sensitivity) fuses DQ -> MaxPool -> Q into a
# uint4 MaxPool it then refuses. Targets may override once their lowering can do more.
CANDIDATES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
DEFAULT_CANDIDATES = ((4, 8), (8,))
PARETO_POINTS = 8


@dataclass
class MixedPrecision:
    problem: AllocationProblem
    allocation: Allocation
    pareto_svg: str | None = None  # the frontier along the budget's first metric, chosen point marked


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
        pins[name] = (w_bits, a_bits)
    return pins


def build_problem(model: onnx.ModelProto, plan: QuantPlan, calib: dict[str, np.ndarray], target,
                  device: str | None, *, integer_only: bool, estimate: str = "measured",
                  max_samples: int = 32, pins: list[str] | None = None) -> AllocationProblem:
    """Sensitivities (measured or proxy) and costs of every candidate of every layer in ``plan``."""
    pinned = parse_pins(pins, plan)
    w_bits, a_bits = CANDIDATES.get(target.name, DEFAULT_CANDIDATES)
    choices = candidate_choices(plan, w_bits, a_bits)
    measure = measured_sensitivity if estimate == "measured" else proxy_sensitivity
    sensitivity = measure(model, plan, calib, choices, max_samples=max_samples)
    return problem_from_model(model, plan, target.cost_model(device), sensitivity=sensitivity,
                              w_bits=w_bits, a_bits=a_bits, integer_only=integer_only, pins=pinned)


def allocate_bits(model: onnx.ModelProto, plan: QuantPlan, calib: dict[str, np.ndarray], target,
                  device: str | None, budget_text: str, *, integer_only: bool,
                  estimate: str = "measured", pins: list[str] | None = None) -> MixedPrecision:
    """Solve the ILP for ``budget_text`` and write the chosen bits into ``plan``."""
    budget = parse_budget(budget_text)
    problem = build_problem(model, plan, calib, target, device, integer_only=integer_only, estimate=estimate,
                            pins=pins)
    allocation = allocate(problem, budget)
    apply_allocation(plan, problem, allocation)
    metric = _pareto_metric(budget, target.name)
    points = pareto(problem, metric, PARETO_POINTS)
    svg = pareto_svg([(point.totals[metric], point.objective) for point in points], metric,
                     chosen=(allocation.totals[metric], allocation.objective), title=f"Pareto frontier: {metric}")
    summary = allocation_summary(problem, allocation)
    summary += f"\n\n![Pareto frontier along {metric}, chosen plan in red](pareto.svg)"
    plan.totals.setdefault("report_sections", {})["Bit allocation"] = summary
    return MixedPrecision(problem, allocation, svg)


def allocation_summary(problem: AllocationProblem, allocation: Allocation) -> str:
    """Markdown explaining the ILP's answer: budget vs totals, and each layer's choice."""
    lines = [f"Solved by {allocation.method} ({allocation.status}) in {allocation.solve_time_s * 1e3:.1f} ms; "
             f"total sensitivity {allocation.objective:.4g}.", ""]
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
        options = ", ".join(f"{_key(choice)}: {value:.3g}" for choice, value in sorted(
            layer.sensitivity.items(), key=lambda item: (item[0][0] or 0, item[0][1])))
        lines.append(f"| `{layer.name}` | {_key(chosen)} | {options} |")
    return "\n".join(lines)


def _key(choice) -> str:
    return f"w{choice[0]}a{choice[1]}" if choice[0] else f"a{choice[1]}"


def allocate_command(args: argparse.Namespace) -> int:
    """``edgeq allocate``: the plan (or the Pareto frontier) without compiling."""
    from compiler.atomic import atomic_dir
    from compiler.data import load_calibration
    from compiler.loader import load_model
    from passes.canonicalize import canonicalize
    from passes.select_layers import select_layers
    from targets.base import get_target

    if not args.budget and not args.pareto:
        raise EdgeqError("edgeq allocate needs --budget (e.g. size=0.5) or --pareto")
    target = get_target(args.target)
    model = canonicalize(load_model(args.model))
    if args.calib is None and not args.random_calib:
        raise EdgeqError("no calibration data: pass --calib DIR or --random-calib N")
    calib = load_calibration(args.calib, model, preprocess=args.preprocess,
                             random_samples=args.random_calib, max_samples=args.max_calib_samples)
    integer_only = target.needs_integer_graph
    plan = select_layers(model, integer_only=integer_only)
    plan.model, plan.target = args.model, args.target
    problem = build_problem(model, plan, calib, target, args.device, integer_only=integer_only, pins=args.pin)
    out = Path(args.output)
    with atomic_dir(out) as tmp:
        if args.pareto:
            metric = _pareto_metric(parse_budget(args.budget) if args.budget else {}, target.name)
            points = pareto(problem, metric)
            rows = [{"budget": point.totals[metric], "sensitivity": point.objective,
                     "choices": {name: list(choice) for name, choice in point.choices.items()}}
                    for point in points]
            (tmp / "pareto.json").write_text(json.dumps({"metric": metric, "points": rows}, indent=1) + "\n")
            (tmp / "pareto.svg").write_text(pareto_svg([(row["budget"], row["sensitivity"]) for row in rows],
                                                       metric, title=f"Pareto frontier: {metric}"))
            print(f"{len(points)} Pareto-optimal plans over {metric} written to {out}/pareto.json and pareto.svg")
        if args.budget:
            allocation = allocate(problem, parse_budget(args.budget))
            apply_allocation(plan, problem, allocation)
            plan.update_totals()
            plan.save(str(tmp / "plan.json"))
            print(allocation_summary(problem, allocation))
    return 0


def _pareto_metric(budget: dict[str, float], target: str) -> str:
    """The metric the frontier is drawn over: the budget's first metric, else a target default."""
    for metric in budget:
        return "weight_bytes" if metric == "size_fraction" else metric
    # FPGA: block RAM holds the weights, so it is what weight bits trade against
    # (with 8-bit activations only, the LUT/DSP counts barely move).
    return {"mcu": "flash_bytes", "cpu": "latency_s", "gpu": "latency_s", "fpga": "bram"}.get(target, "weight_bytes")
