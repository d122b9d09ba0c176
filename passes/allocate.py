"""Bit allocation: pick (w_bits, a_bits) per layer under the user's budget.

Requires: an :class:`AllocationProblem` -- per layer its candidate choices, the
sensitivity of each (passes/sensitivity.py) and its cost under the target's
cost model (targets/<name>/cost.py); tie groups, pins, and for the SRAM metric
the execution order with the activation buffers and their live ranges.
:func:`problem_from_model` builds one from a float model and its QuantPlan.
Guarantees: :func:`allocate` returns the choice per layer that minimises the
total sensitivity subject to every budget given, solved exactly as an integer
linear program (PuLP; CBC, or HiGHS when installed); infeasible budgets raise
EdgeqError naming the smallest achievable value. Ties go to the cheaper
choice: one that another choice of the layer matches on sensitivity (within
the table's tie step) at no more cost on every budgeted metric is never
picked (:func:`undominated`), unless pinned. The graph is not touched
(this is an analysis; :func:`apply_allocation` writes the choice into a plan).

The ILP: a binary ``x[l, c]`` per layer ``l`` and choice ``c``, exactly one per
layer. Linear metrics (weight bytes, bit-operations, latency, energy, flash,
LUT/DSP/BRAM, ...) are sums of per-choice costs. Peak SRAM is a max over the
execution order of the live activation bytes: one constraint per step, where a
buffer's bytes are the packed size at the a_bits of the layers that read it
(a tensor read by several layers is stored at the widest; readers of one
quantizer are tied anyway). Tie groups share a_bits through one binary per
(group, a_bits).

:func:`allocate_k_best` returns the ILP's ``k`` best distinct plans (no-good
cuts); :func:`allocate_reranked` takes the one of them a measurement of the
whole exported plan finds most faithful (the summed sensitivities are only
approximately additive). With ``scenarios`` (bootstrap draws of the table,
passes/sensitivity.bootstrap_tables) :func:`allocate` minimises the mean of
the plan's worst ``tail`` totals over them instead (CVaR, still one ILP).
Online float ops a transform inserted are charged as fixed costs
(``CostModel.fixed_costs``).

:func:`greedy` is the baseline edgeq is compared with (HAWQ-style: start at
the highest bits, demote the layer that loses least sensitivity per unit of
budget saved until every budget is met, then spend what is left; or the
reverse). :func:`pareto`
sweeps one metric's budget, within the others, and returns the frontier.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import pulp
from tqdm import tqdm

from compiler.budget import format_metric
from compiler.errors import EdgeqError
from passes.sensitivity import covers, tie_step
from targets.base import LayerCost, packed_bytes

log = logging.getLogger(__name__)

Choice = tuple[int | None, int]  # (w_bits or None for weightless layers, a_bits)

SUM_METRICS = ("weight_bytes", "bitops", "latency_s", "energy_j")
REPORTED_METRICS = ("macs",)  # totalled for the record, not budgeted (bits do not change them)
PEAK_METRICS = ("sram_bytes",)
FLOAT_BITS = 32
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


@dataclass
class LayerOptions:
    """One quantizable layer: what it may be set to, what each choice costs and loses."""

    name: str
    choices: list[Choice]
    sensitivity: dict[Choice, float]
    costs: dict[Choice, LayerCost]
    weight_params: int = 0  # for the int8 reference size

    def a_bits_options(self) -> set[int]:
        return {a for _, a in self.choices}


@dataclass
class ActivationBuffer:
    """An activation tensor the executed model keeps in memory from ``first_step`` to ``last_step``.

    Its width is the widest a_bits among ``readers`` (layers whose input
    quantizer it is), or ``fixed_bits`` when no allocated layer decides it.
    """

    name: str
    elems: int
    first_step: int
    last_step: int
    readers: list[str] = field(default_factory=list)
    fixed_bits: int = FLOAT_BITS


@dataclass
class AllocationProblem:
    layers: list[LayerOptions]
    tie_groups: list[list[str]] = field(default_factory=list)  # layers sharing a_bits
    pins: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # None = free
    steps: list[str] = field(default_factory=list)  # execution order (node names)
    buffers: list[ActivationBuffer] = field(default_factory=list)
    fixed: dict[str, float] = field(default_factory=dict)  # bit-independent costs (code flash, online ops)
    name: str = ""
    online_ops: list[str] = field(default_factory=list)  # float runtime ops charged in ``fixed``

    def layer(self, name: str) -> LayerOptions:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, LayerOptions]:
        return {layer.name: layer for layer in self.layers}

    def int8_weight_bytes(self) -> int:
        return sum(packed_bytes(layer.weight_params, 8) for layer in self.layers)


@dataclass
class Allocation:
    choices: dict[str, Choice]
    totals: dict[str, float]
    objective: float
    solve_time_s: float
    status: str  # "optimal", "greedy", ...
    method: str
    budget: dict[str, float] = field(default_factory=dict)
    # Re-ranked allocations: every candidate plan with its objective and measured distance.
    candidates: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        result = {
            "method": self.method, "status": self.status, "objective": self.objective,
            "solve_time_s": self.solve_time_s, "budget": self.budget, "totals": self.totals,
            "choices": {name: list(choice) for name, choice in self.choices.items()},
        }
        if self.candidates:
            result["candidates"] = self.candidates
        return result


# -- metrics -----------------------------------------------------------------------


def layer_metric(cost: LayerCost, metric: str) -> float | None:
    """The value of ``metric`` for one layer choice; None if the cost model lacks it."""
    if metric in SUM_METRICS or metric in REPORTED_METRICS:
        return getattr(cost, metric)
    if metric == "flash_bytes":
        return cost.resources.get("flash_bytes", cost.weight_bytes)
    return cost.resources.get(metric)


def _cost_order(layer: LayerOptions, better: Choice, worse: Choice, metrics: Sequence[str]) -> tuple[bool, bool]:
    """(``better`` costs no more than ``worse`` on every metric, and strictly less on at least one).

    A peak metric (SRAM) compares the activation widths: a layer's a_bits is the
    width of the buffers it reads, so fewer never make any buffer larger.
    Unknown costs compare as neither.
    """
    no_more, less = True, False
    for metric in metrics:
        if metric in PEAK_METRICS:
            values = [better[1], worse[1]]
        else:
            values = [layer_metric(layer.costs[choice], metric) for choice in (better, worse)]
        if values[0] is None or values[1] is None:
            return False, False
        no_more, less = no_more and values[0] <= values[1], less or values[0] < values[1]
    return no_more, less


def _dominates(layer: LayerOptions, better: Choice, worse: Choice, metrics: Sequence[str],
               tolerance: float | None, tied: bool) -> bool:
    """Whether ``worse`` need never be picked because ``better`` costs no more and loses no more.

    Unmeasured (``tolerance`` None): ``better`` has more weight bits and the same
    activation bits, so it loses no more (monotone sensitivities). Measured:
    ``better`` is no more sensitive up to ``tolerance``, and ahead somewhere:
    less sensitive by more than the tolerance, cheaper on a metric, or narrower
    (a tie goes to fewer bits). A tied layer only compares choices of one
    activation width (the group shares it).
    """
    if better == worse or ((tied or tolerance is None) and better[1] != worse[1]):
        return False
    no_more, less = _cost_order(layer, better, worse, metrics)
    if not no_more:
        return False
    if tolerance is None:
        return better[0] is not None and worse[0] is not None and better[0] > worse[0]
    if better not in layer.sensitivity or worse not in layer.sensitivity:
        return False
    gap = layer.sensitivity[worse] - layer.sensitivity[better]
    return gap >= -tolerance and (less or gap > tolerance or covers(worse, better))


def tie_tolerances(problem: AllocationProblem) -> dict[str, float]:
    """Per layer, how far apart two of its sensitivities may be and still be a tie.

    passes/sensitivity.monotone puts choices measured (nearly) equal one
    :func:`~passes.sensitivity.tie_step` apart, ordered by width: values measured
    equal span at most one step per link of the layer's longest chain of nested
    choices (half a step more for rounding) -- far below any difference that
    matters, and no measured preference for the wider choice.
    """
    step = tie_step({layer.name: layer.sensitivity for layer in problem.layers})
    return {layer.name: step * (_longest_chain(layer.choices) + 0.5) for layer in problem.layers}


def _longest_chain(choices: Sequence[Choice]) -> int:
    """Links of the longest chain of ``choices``, each covering the next (passes/sensitivity.covers)."""
    links: dict[Choice, int] = {}
    for choice in sorted(choices, key=lambda c: (c[0] or 0) + c[1]):  # a covered choice sorts first
        links[choice] = max((links[other] + 1 for other in links if covers(choice, other)), default=0)
    return max(links.values(), default=0)


def dominated_choices(problem: AllocationProblem, metrics: Sequence[str], *,
                      measured: bool = False) -> dict[str, list[Choice]]:
    """Per layer, the choices an undominated choice of the layer dominates on ``metrics`` (:func:`_dominates`).

    ``measured``: compare the sensitivities too, values within the layer's
    :func:`tie_tolerances` of each other taken as equal. Each dropped choice has
    a kept one within that tolerance, so the solvers' optimum loses at most one
    tolerance per layer. Pinned layers keep every choice.
    """
    tolerances = tie_tolerances(problem) if measured else {}
    tied = {name for group in problem.tie_groups for name in group}
    dominated: dict[str, list[Choice]] = {}
    for layer in problem.layers:
        if layer.name in problem.pins:
            continue

        def beats(better: Choice, worse: Choice, layer: LayerOptions = layer) -> bool:
            return _dominates(layer, better, worse, metrics, tolerances.get(layer.name), layer.name in tied)

        undominated = [c for c in layer.choices if not any(beats(other, c) for other in layer.choices)]
        losers = [c for c in layer.choices if any(beats(other, c) for other in undominated)]
        if losers:
            dominated[layer.name] = losers
    return dominated


def drop_dominated_choices(problem: AllocationProblem, metrics: Sequence[str]) -> dict[str, list[Choice]]:
    """Remove, per layer, each choice that another choice with more weight bits (same activation bits)
    costs no more of on every one of ``metrics``; returns what was removed, by layer.

    Fewer bits are never more faithful (sensitivities are monotone in the bits),
    so such a choice could only win a tie, yet measuring its sensitivity costs as
    much as any other: e.g. 2-bit weights stored in int4 containers (the onnx
    target, where onnxruntime refuses INT2) under a size budget. Choices stay
    where a metric is unknown for them or the layer is pinned; activation bits
    are never dropped, so tie groups keep their common widths.
    """
    dropped = dominated_choices(problem, metrics)
    for layer in problem.layers:
        if layer.name in dropped:
            layer.choices = [choice for choice in layer.choices if choice not in dropped[layer.name]]
            layer.costs = {choice: cost for choice, cost in layer.costs.items() if choice in layer.choices}
            layer.sensitivity = {choice: v for choice, v in layer.sensitivity.items() if choice in layer.choices}
    return dropped


def undominated(problem: AllocationProblem, metrics: Sequence[str]) -> AllocationProblem:
    """``problem`` without the choices its measured sensitivities and costs on ``metrics`` dominate.

    What the solvers choose from: a choice that another of the layer matches or
    beats on sensitivity at no more cost on every budgeted metric (e.g. 16-bit
    activations measured as faithful as 8-bit ones on an 8-bit image, under an
    SRAM budget) could only be picked on the table's tie-break, and would cost
    memory and onnxruntime's integer kernels for nothing. A view: the problem
    itself (and its record of every choice's sensitivity) is left as it is.
    """
    dropped = dominated_choices(problem, metrics, measured=True)
    if not dropped:
        return problem
    layers = [replace(layer, choices=[c for c in layer.choices if c not in dropped[layer.name]])
              if layer.name in dropped else layer for layer in problem.layers]
    return replace(problem, layers=layers)


def buffer_bytes(buffer: ActivationBuffer, choices: dict[str, Choice]) -> int:
    bits = [choices[reader][1] for reader in buffer.readers if reader in choices]
    return packed_bytes(buffer.elems, max(bits) if bits else buffer.fixed_bits)


def live_bytes_per_step(problem: AllocationProblem, choices: dict[str, Choice]) -> list[int]:
    """Bytes of the activation buffers live at each step of the execution order."""
    live = [0] * max(len(problem.steps), 1)
    for buffer in problem.buffers:
        size = buffer_bytes(buffer, choices)
        for step in range(buffer.first_step, buffer.last_step + 1):
            live[step] += size
    return live


def evaluate(problem: AllocationProblem, choices: dict[str, Choice]) -> dict[str, float]:
    """Every metric the problem can measure, for one complete choice."""
    totals: dict[str, float] = {}
    metrics = set(SUM_METRICS) | set(REPORTED_METRICS) | {"flash_bytes"}
    for layer in problem.layers:
        metrics.update(layer.costs[layer.choices[0]].resources)
    for metric in sorted(metrics):
        values = [layer_metric(layer.costs[choices[layer.name]], metric) for layer in problem.layers]
        if problem.layers and all(value is not None for value in values):
            totals[metric] = float(sum(values)) + problem.fixed.get(metric, 0.0)
    int8 = problem.int8_weight_bytes()
    if int8 and "weight_bytes" in totals:
        totals["size_fraction"] = totals["weight_bytes"] / int8
    if problem.buffers:
        totals["sram_bytes"] = float(max(live_bytes_per_step(problem, choices))) + problem.fixed.get("sram_bytes", 0.0)
    totals["sensitivity"] = float(sum(problem.layer(name).sensitivity.get(choice, 0.0) for name, choice in choices.items()))
    return totals


def resolve_budget(problem: AllocationProblem, budget: dict[str, float]) -> dict[str, float]:
    """Budget in the problem's metrics: ``size_fraction`` becomes ``weight_bytes``."""
    resolved = dict(budget)
    if "size_fraction" in resolved:
        limit = resolved.pop("size_fraction") * problem.int8_weight_bytes()
        resolved["weight_bytes"] = min(limit, resolved.get("weight_bytes", math.inf))
    for metric in resolved:
        if metric in PEAK_METRICS:
            if not problem.buffers:
                raise EdgeqError(f"budget '{metric}' needs the execution order and activation buffers (an MCU-style target)")
            continue
        for layer in problem.layers:
            if any(layer_metric(layer.costs[c], metric) is None for c in layer.choices):
                raise EdgeqError(f"the target's cost model has no '{metric}' estimate, so it cannot be budgeted")
    return resolved


# -- the integer program ---------------------------------------------------------------


class _Program:
    """The PuLP model of one problem: choice binaries, ties, pins, metric expressions."""

    def __init__(self, problem: AllocationProblem, sense: int = pulp.LpMinimize) -> None:
        self.problem = problem
        self.lp = pulp.LpProblem("edgeq_bits", sense)
        self.x: dict[tuple[str, Choice], pulp.LpVariable] = {}
        self.allowed: dict[str, list[Choice]] = {}
        for index, layer in enumerate(problem.layers):
            allowed = _allowed_choices(problem, layer)
            self.allowed[layer.name] = allowed
            variables = []
            for c_index, choice in enumerate(allowed):
                var = _variable(self.lp, f"x_{index}_{c_index}", binary=True)
                self.x[(layer.name, choice)] = var
                variables.append(var)
            self.lp += pulp.lpSum(variables) == 1, f"one_{index}"
        self._add_ties()
        self._buffer_expr: dict[int, pulp.LpAffineExpression] = {}
        self._cuts = 0  # no-good cuts added (allocate_k_best)

    def _add_ties(self) -> None:
        problem = self.problem
        for g_index, group in enumerate(problem.tie_groups):
            common = set.intersection(*(set(a for _, a in self.allowed[name]) for name in group))
            if not common:
                raise EdgeqError(f"layers {', '.join(group[:3])} must share activation bits but have no common choice")
            shared = {a: _variable(self.lp, f"tie_{g_index}_{a}", binary=True) for a in sorted(common)}
            self.lp += pulp.lpSum(shared.values()) == 1, f"tie_{g_index}"
            for l_index, name in enumerate(group):
                for a in sorted({a for _, a in self.allowed[name]}):
                    picked = pulp.lpSum(self.x[(name, c)] for c in self.allowed[name] if c[1] == a)
                    self.lp += picked == shared.get(a, 0), f"tie_{g_index}_{l_index}_{a}"

    def metric_expr(self, metric: str) -> pulp.LpAffineExpression:
        terms = []
        for layer in self.problem.layers:
            for choice in self.allowed[layer.name]:
                value = layer_metric(layer.costs[choice], metric)
                if value:
                    terms.append((self.x[(layer.name, choice)], float(value)))
        return pulp.LpAffineExpression(terms) + self.problem.fixed.get(metric, 0.0)

    def objective_expr(self, table: dict[str, dict[Choice, float]] | None = None) -> pulp.LpAffineExpression:
        """Total sensitivity of the chosen plan, from the problem's table or from ``table``."""
        def value(layer: LayerOptions, choice: Choice) -> float:
            source = layer.sensitivity if table is None else table.get(layer.name, {})
            return float(source.get(choice, 0.0))

        return pulp.LpAffineExpression(
            [(self.x[(layer.name, c)], value(layer, c))
             for layer in self.problem.layers for c in self.allowed[layer.name]]
        )

    def tail_mean_expr(self, scenarios: Sequence[dict[str, dict[Choice, float]]], tail: float
                       ) -> pulp.LpAffineExpression:
        """The mean of the worst ``tail`` fraction of the plan's totals over ``scenarios`` (CVaR, linear).

        Rockafellar-Uryasev: minimising ``t + sum_r max(total_r - t, 0) / (tail R)``
        over ``t`` gives the mean of the largest ``tail * R`` scenario totals.
        """
        threshold = _variable(self.lp, "cvar_t")
        excess = []
        for index, table in enumerate(scenarios):
            above = _variable(self.lp, f"cvar_u_{index}")
            self.lp += above >= self.objective_expr(table) - threshold, f"cvar_{index}"
            self.lp += above >= 0, f"cvar_pos_{index}"
            excess.append(above)
        return threshold + pulp.lpSum(excess) * (1.0 / (tail * len(scenarios)))

    def buffer_expr(self, index: int) -> pulp.LpAffineExpression | float:
        """Bytes of buffer ``index``: linear in the reader's choice, or an upper-bounding variable."""
        if index in self._buffer_expr:
            return self._buffer_expr[index]
        buffer = self.problem.buffers[index]
        readers = [name for name in buffer.readers if name in self.allowed]
        if not readers:
            expr = float(packed_bytes(buffer.elems, buffer.fixed_bits))
        elif len(readers) == 1 or self._tied(readers):
            name = readers[0]
            expr = pulp.lpSum(packed_bytes(buffer.elems, c[1]) * self.x[(name, c)] for c in self.allowed[name])
        else:  # width = widest reader: a variable bounded below by each reader's bytes
            var = _variable(self.lp, f"buf_{index}")
            for r_index, name in enumerate(readers):
                self.lp += var >= pulp.lpSum(
                    packed_bytes(buffer.elems, c[1]) * self.x[(name, c)] for c in self.allowed[name]
                ), f"buf_{index}_{r_index}"
            expr = var
        self._buffer_expr[index] = expr
        return expr

    def _tied(self, names: list[str]) -> bool:
        return any(set(names) <= set(group) for group in self.problem.tie_groups)

    def live_exprs(self) -> list[pulp.LpAffineExpression]:
        """Live activation bytes at each step (only steps where the live set changes matter)."""
        problem = self.problem
        starts: dict[int, list[int]] = {}
        for index, buffer in enumerate(problem.buffers):
            starts.setdefault(buffer.first_step, []).append(index)
        exprs, seen = [], set()
        # The live set only grows at a buffer's first step; checking those steps suffices.
        for step in sorted(starts):
            live = tuple(i for i, b in enumerate(problem.buffers) if b.first_step <= step <= b.last_step)
            if live in seen:
                continue
            seen.add(live)
            exprs.append(pulp.lpSum(self.buffer_expr(i) for i in live) + problem.fixed.get("sram_bytes", 0.0))
        return exprs

    def constrain(self, metric: str, limit: float) -> None:
        """``metric <= limit``, rows scaled so the right-hand side is 1 (keeps CBC's tolerances meaningful)."""
        scale = 1.0 / limit if limit > 0 else 1.0
        if metric in PEAK_METRICS:
            for s_index, expr in enumerate(self.live_exprs()):
                self.lp += scale * expr <= scale * limit, f"{metric}_{s_index}"
        else:
            self.lp += scale * self.metric_expr(metric) <= scale * limit, f"budget_{metric}"

    def solve(self, solver: str, time_limit: float | None = None) -> str:
        self.lp.solve(_solver(solver, time_limit))
        return pulp.LpStatus[self.lp.status]

    def chosen(self) -> dict[str, Choice]:
        result = {}
        for layer in self.problem.layers:
            best = max(self.allowed[layer.name], key=lambda c: self.x[(layer.name, c)].value() or 0.0)
            result[layer.name] = best
        return result

    def limit_changes(self, center: dict[str, Choice], changes: int) -> None:
        """At most ``changes`` layers may differ from ``center`` (a trust region)."""
        kept = [self.x[(name, choice)] for name, choice in center.items() if (name, choice) in self.x]
        self.lp += pulp.lpSum(kept) >= len(kept) - changes, "near"

    def exclude(self, choices: dict[str, Choice]) -> None:
        """A no-good cut: at least one layer must differ from ``choices`` in every later solution."""
        self._cuts += 1
        picked = [self.x[(name, choice)] for name, choice in choices.items() if len(self.allowed[name]) > 1]
        self.lp += pulp.lpSum(picked) <= len(picked) - 1, f"nogood_{self._cuts}"


def _variable(lp: pulp.LpProblem, name: str, *, binary: bool = False) -> pulp.LpVariable:
    """A binary, or a non-negative continuous variable (PuLP >= 3.3 attaches it to the model)."""
    cat = pulp.LpBinary if binary else pulp.LpContinuous
    if hasattr(lp, "add_variable"):
        return lp.add_variable(name, lowBound=0, upBound=1 if binary else None, cat=cat)
    return pulp.LpVariable(name, lowBound=0, upBound=1 if binary else None, cat=cat)


def _allowed_choices(problem: AllocationProblem, layer: LayerOptions) -> list[Choice]:
    pin = problem.pins.get(layer.name)
    if pin is None:
        return list(layer.choices)
    w_pin, a_pin = pin
    allowed = [c for c in layer.choices if (w_pin is None or c[0] in (w_pin, None)) and (a_pin is None or c[1] == a_pin)]
    if not allowed:
        raise EdgeqError(f"layer '{layer.name}' is pinned to w{w_pin}/a{a_pin}, which is not among its choices {layer.choices}")
    return allowed


def eight_bit_choices(problem: AllocationProblem) -> dict[str, Choice]:
    """The all-8-bit plan: each layer at w8a8 (a8 if weightless), a pinned layer as pinned. What a
    relative budget (``bitops=50%``) is a fraction of; it need not meet any budget."""
    def closeness(choice: Choice) -> tuple[bool, bool, int]:
        return choice[1] == 8, choice[0] in (8, None), choice[0] or 0

    return {layer.name: max(_allowed_choices(problem, layer), key=closeness) for layer in problem.layers}


def solver_names() -> list[str]:
    available = pulp.listSolvers(onlyAvailable=True)
    names = []
    if "PULP_CBC_CMD" in available:
        names.append("cbc")
    if "HiGHS" in available:
        names.append("highs")
    return names


def _solver(name: str, time_limit: float | None):
    if name == "cbc":
        # PuLP bundles CBC 2.10.3, whose default preprocessing reads the one-choice-per-layer rows as SOS sets
        # and can fix variables wrongly, returning a worse plan as "optimal" (coin-or/Cbc#449, fixed in 2.10.7;
        # tests/passes/test_allocate.py has a real case). Without it, size-only solves take up to 2x longer
        # (1000 layers: 1.3 -> 2.0 s) and those with peak-SRAM rows less than half as long (27 -> 11 s).
        # Sensitivities are small numbers (KL ~1e-5..1), so CBC's default cutoff increment (a new plan must
        # beat the incumbent by ~1e-5) also stopped short of the optimum on MobileNetV2 (by 8e-6).
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0.0, gapAbs=0.0,
                                 options=["preprocess off", "increment 1e-12"])
    if name == "highs":
        if "HiGHS" not in pulp.listSolvers(onlyAvailable=True):
            raise EdgeqError("solver 'highs' is not installed (pip install highspy), use 'cbc'")
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=0.0)
    raise EdgeqError(f"unknown ILP solver '{name}' (choose from cbc, highs)")


def minimum(problem: AllocationProblem, metric: str, *, solver: str = "cbc",
            limits: dict[str, float] | None = None) -> float:
    """The smallest value of ``metric`` any allowed choice reaches (pins and ties respected), within
    ``limits`` (resolved budgets of other metrics) when given."""
    program = _budgeted(problem, limits or {})
    if metric in PEAK_METRICS:
        peak = _variable(program.lp, "peak")
        for s_index, expr in enumerate(program.live_exprs()):
            program.lp += peak >= expr, f"peak_{s_index}"
        program.lp += peak
    else:
        program.lp += program.metric_expr(metric)
    status = program.solve(solver)
    if status == "Infeasible" and limits:
        raise _infeasible_error(problem, limits, solver)
    if status != "Optimal":
        raise RuntimeError(f"minimising {metric} ended {status}")
    return evaluate(problem, program.chosen())[metric]


def _budgeted(problem: AllocationProblem, limits: dict[str, float]) -> _Program:
    """The program of ``problem`` with every limit (resolved) a constraint."""
    program = _Program(problem)
    for metric, limit in limits.items():
        program.constrain(metric, limit)
    return program


def allocate(
    problem: AllocationProblem,
    budget: dict[str, float],
    *,
    solver: str = "cbc",
    time_limit: float | None = None,
    near: tuple[dict[str, Choice], int] | None = None,
    scenarios: Sequence[dict[str, dict[Choice, float]]] | None = None,
    tail: float = 0.2,
) -> Allocation:
    """The least-sensitive choice per layer within ``budget`` (an exact ILP solution).

    ``near=(plan, n)``: only plans that differ from ``plan`` in at most ``n`` layers.
    ``scenarios``: other draws of the sensitivity table (e.g. bootstrap resamples
    of the calibration data, passes/sensitivity.bootstrap_tables): the plan
    minimises the mean of its ``tail`` worst totals over them (CVaR) instead of
    its total on the problem's table -- a plan that is good on most draws of
    the data rather than one that only the draw at hand favours.
    """
    return allocate_k_best(problem, budget, 1, solver=solver, time_limit=time_limit, near=near,
                           scenarios=scenarios, tail=tail)[0]


def allocate_k_best(
    problem: AllocationProblem,
    budget: dict[str, float],
    k: int,
    *,
    solver: str = "cbc",
    time_limit: float | None = None,
    near: tuple[dict[str, Choice], int] | None = None,
    scenarios: Sequence[dict[str, dict[Choice, float]]] | None = None,
    tail: float = 0.2,
) -> list[Allocation]:
    """The ``k`` best distinct allocations within ``budget``, best first (fewer when fewer exist).

    Each one is an exact optimum of the ILP with the earlier answers cut off
    (no-good cuts), so the list is the true top ``k`` by total sensitivity
    (with ``scenarios``, by the tail mean of :func:`allocate`).
    """
    if scenarios is not None and not (scenarios and 0 < tail <= 1):
        raise ValueError(f"scenarios need at least one table and 0 < tail <= 1 (got {len(scenarios)}, {tail})")
    limits = resolve_budget(problem, budget)
    program = _budgeted(undominated(problem, list(limits)), limits)
    program.lp += program.objective_expr() if scenarios is None else program.tail_mean_expr(scenarios, tail)
    if near is not None:
        program.limit_changes(*near)
    found: list[Allocation] = []
    for _ in range(k):
        start = time.perf_counter()
        status = program.solve(solver, time_limit)
        elapsed = time.perf_counter() - start
        if status == "Infeasible":
            if found:  # every feasible plan is already listed
                break
            raise _infeasible_error(problem, limits, solver)
        if status != "Optimal":
            raise RuntimeError(f"ILP solver {solver} ended with status {status}")
        choices = program.chosen()
        totals = evaluate(problem, choices)
        _check_within(totals, limits)
        method = f"ilp-{solver}" if scenarios is None else f"ilp-{solver}-cvar{tail:g}x{len(scenarios)}"
        found.append(Allocation(choices, totals, totals["sensitivity"], elapsed, "optimal", method, dict(budget)))
        program.exclude(choices)
    return found


def allocate_reranked(
    problem: AllocationProblem,
    budget: dict[str, float],
    measure: Callable[[dict[str, Choice]], float],
    *,
    k: int = 8,
    solver: str = "cbc",
    also: Sequence[Allocation] = (),
) -> Allocation:
    """Of the ILP's ``k`` best plans (and the plans in ``also``), the one ``measure`` finds closest to float.

    The summed single-layer sensitivities are only an approximation of what a
    mixed plan loses (errors of several layers do not add up exactly), so the
    last word goes to a measurement of each whole candidate plan: ``measure``
    maps a choice per layer to a distance (lower is better), e.g. the output KL
    of the exported plan on calibration samples the sensitivities did not see.
    ``also``: plans found another way within the same budget (e.g. greedy's),
    which near a tie on the table can be the better plan yet rank below the
    ILP's ``k`` best; measured too unless already among them. Every candidate
    keeps the budget; the record lists them all, each with where it came from.
    """
    candidates = allocate_k_best(problem, budget, k, solver=solver)
    sources = [{"rank": index} for index in range(len(candidates))]
    for other in also:
        if all(other.choices != candidate.choices for candidate in candidates):
            candidates.append(other)
            sources.append({"source": other.method})
    shown = tqdm(candidates, desc="measuring plans", unit="plan", disable=not sys.stderr.isatty(), file=sys.stderr)
    measured = [measure(candidate.choices) for candidate in shown]
    best = min(range(len(candidates)), key=lambda index: (measured[index], index))
    taken = f"-took-{sources[best]['source']}" if "source" in sources[best] else ""
    chosen = replace(candidates[best], method=f"ilp-{solver}-rerank{k}{taken}", status="optimal-reranked",
                     solve_time_s=sum(candidate.solve_time_s for candidate in candidates))
    chosen.candidates = [
        {**source, "objective": candidate.objective, "measured": value, "chosen": index == best,
         **{metric: candidate.totals[metric] for metric in budget_metrics(problem, budget)}}
        for index, (source, candidate, value) in enumerate(zip(sources, candidates, measured, strict=True))
    ]
    return chosen


def allocate_refined(
    problem: AllocationProblem,
    budget: dict[str, float],
    sensitivity_around: Callable[[dict[str, Choice]], dict[str, dict[Choice, float]]],
    measure: Callable[[dict[str, Choice]], float],
    *,
    steps: int = 2,
    start: Allocation | None = None,
    solver: str = "cbc",
) -> Allocation:
    """The ILP optimum, then trust-region ILP steps on sensitivities re-measured around the current plan.

    Errors of quantized layers interact, so a table measured around one plan
    (``sensitivity_around(choices)``: each layer's alternatives changed inside
    ``choices``) describes plans near it better than a table measured around
    float or a uniform plan. Each step (``steps`` of them, one table each)
    solves the ILP on the table measured around the current plan; a proposal
    is kept only if ``measure`` (a distance of the whole exported plan, lower is
    better) finds it closer to float. A rejected proposal is retried with at
    most half as many layers changed (the table stays valid: same centre)
    until a single change is rejected. ``candidates`` records every plan measured.
    """
    current = start or allocate(problem, budget, solver=solver)
    metrics = budget_metrics(problem, budget)
    best, best_distance = current, measure(current.choices)
    visited = [{"step": 0, "objective": current.objective, "measured": best_distance, "chosen": True,
                **{metric: current.totals[metric] for metric in metrics}}]
    for step in range(1, steps + 1):
        table = sensitivity_around(best.choices)
        local = replace(problem, layers=[replace(layer, sensitivity=table[layer.name]) for layer in problem.layers])
        radius: int | None = None  # the first proposal may change any number of layers
        improved = False
        while radius is None or radius >= 1:
            proposal = allocate(local, budget, solver=solver, near=(best.choices, radius) if radius else None)
            changed = sum(proposal.choices[name] != choice for name, choice in best.choices.items())
            if changed == 0:
                break
            distance = measure(proposal.choices)
            totals = evaluate(problem, proposal.choices)
            visited.append({"step": step, "changed": changed, "objective": totals["sensitivity"],
                            "measured": distance, "chosen": False, **{metric: totals[metric] for metric in metrics}})
            if distance < best_distance:
                for entry in visited:
                    entry["chosen"] = entry is visited[-1]
                best = Allocation(proposal.choices, totals, totals["sensitivity"], proposal.solve_time_s,
                                  "optimal", proposal.method, dict(budget))
                best_distance, improved = distance, True
                break
            radius = min(changed, radius or changed) // 2  # shrinks even where dominated choices force changes
        if not improved:
            break
    earlier = [{**entry, "chosen": False} for entry in current.candidates]  # e.g. a re-ranking's candidates
    return replace(best, method=f"{current.method}-refined", status="optimal-refined", candidates=earlier + visited)


def budget_metrics(problem: AllocationProblem, budget: dict[str, float]) -> list[str]:
    """The totals a budget constrains (``size_fraction`` is checked as ``weight_bytes``)."""
    return list(resolve_budget(problem, budget))


def _check_within(totals: dict[str, float], limits: dict[str, float]) -> None:
    """The solver's answer, re-measured exactly, must satisfy the budget (tolerances aside)."""
    for metric, limit in limits.items():
        if totals[metric] > limit * (1 + 1e-6) + 1e-9:
            raise RuntimeError(f"ILP answer exceeds {metric}: {totals[metric]} > {limit}")


def infeasibility(problem: AllocationProblem, limits: dict[str, float], solver: str = "cbc") -> EdgeqError | None:
    """The error :func:`allocate` raises for ``limits`` (resolved) if no plan meets them, else None."""
    try:
        allocate(problem, limits, solver=solver)
    except EdgeqError as error:
        return error
    return None


def _infeasible_error(problem: AllocationProblem, limits: dict[str, float], solver: str) -> EdgeqError:
    """The budget no plan meets, and the smallest value it could have (one budget alone), or that together they cannot."""
    for metric, limit in limits.items():
        smallest = minimum(problem, metric, solver=solver)
        if smallest > limit * (1 + 1e-9):
            relative = ""
            if metric == "weight_bytes" and problem.int8_weight_bytes():
                relative = f" (size={smallest / problem.int8_weight_bytes():.3g} of the int8 weight bytes)"
            return EdgeqError(
                f"budget {metric} <= {format_metric(metric, limit)} is infeasible: the smallest achievable "
                f"{metric} is {format_metric(metric, smallest)}{relative}"
            )
    wanted = ", ".join(f"{m} <= {format_metric(m, v)}" for m, v in limits.items())
    return EdgeqError(f"budgets {wanted} cannot all be met at once (each alone can)")


# -- the frontier ----------------------------------------------------------------------------


def pareto(
    problem: AllocationProblem,
    metric: str,
    points: int | Sequence[float] = 12,
    *,
    solver: str = "cbc",
    limits: dict[str, float] | None = None,
) -> list[Allocation]:
    """Optimal allocations along ``metric``'s budget, dominated and repeated points removed.

    ``points`` is a number of budgets spread evenly from the smallest achievable
    value to the value of the optimum without a limit on ``metric``, or the
    budgets themselves. ``limits``: the other budgets (as :func:`allocate` takes
    them, e.g. ``{"size_fraction": 0.5, "dsp": 100}``), which every point keeps
    -- a frontier over LUTs whose plans need more DSPs than the device has
    shows nothing the user can build. A limit on ``metric`` itself (e.g. the
    whole budget passed along) is left to the sweep; limits no plan meets raise
    :func:`allocate`'s error.
    """
    others = {name: value for name, value in resolve_budget(problem, dict(limits or {})).items() if name != metric}
    if isinstance(points, int):
        high = allocate(problem, others, solver=solver).totals[metric]
        low = minimum(problem, metric, solver=solver, limits=others)
        count = max(points, 2)
        budgets = [low + (high - low) * i / (count - 1) for i in range(count)]
    else:
        budgets = sorted(points)
    found: list[Allocation] = []
    for value in budgets:
        try:
            found.append(allocate(problem, {**others, metric: value}, solver=solver))
        except EdgeqError:
            continue  # below the smallest achievable value
    return frontier(found, metric)


def frontier(allocations: Iterable[Allocation], metric: str) -> list[Allocation]:
    """Allocations not dominated in (metric, objective), sorted by metric."""
    ordered = sorted(allocations, key=lambda a: (a.totals[metric], a.objective))
    kept: list[Allocation] = []
    for allocation in ordered:
        if not kept or allocation.objective < kept[-1].objective - 1e-12:
            kept.append(allocation)
    return kept


# -- greedy baseline -------------------------------------------------------------------------


def greedy(problem: AllocationProblem, budget: dict[str, float], *, direction: str = "demote") -> Allocation:
    """The greedy baseline.

    ``demote`` (HAWQ-style): start every layer at its least sensitive choice and
    repeatedly take the move that costs least sensitivity per unit of budget
    overshoot removed, until every budget is met; then spend what the last
    demotions left over as ``promote`` does (one big layer's demotion can
    undershoot the budget by a fifth). ``promote``: start at the cheapest
    choices and repeatedly take the move that buys most sensitivity per unit of
    budget spent while staying within budget.
    """
    if direction not in ("demote", "promote"):
        raise ValueError(f"direction must be 'demote' or 'promote', not {direction!r}")
    limits = resolve_budget(problem, budget)
    start = time.perf_counter()
    search = _GreedySearch(undominated(problem, list(limits)), limits)
    if direction == "demote":
        search.demote()
    else:
        search.promote()
    elapsed = time.perf_counter() - start
    totals = evaluate(problem, search.state)
    return Allocation(dict(search.state), totals, totals["sensitivity"], elapsed, "greedy", f"greedy-{direction}", dict(budget))


class _GreedySearch:
    """State and incremental bookkeeping of the greedy baseline (linear metrics by deltas)."""

    def __init__(self, problem: AllocationProblem, limits: dict[str, float]) -> None:
        self.problem = problem
        self.limits = limits
        self.layers = {layer.name: layer for layer in problem.layers}
        self.allowed = {layer.name: _allowed_choices(problem, layer) for layer in problem.layers}
        self.group_of: dict[str, list[str]] = {}
        for group in problem.tie_groups:
            for name in group:
                self.group_of[name] = group
        self.linear = [m for m in limits if m not in PEAK_METRICS]
        self.contrib = {
            layer.name: {c: [layer_metric(layer.costs[c], m) or 0.0 for m in self.linear] for c in layer.choices}
            for layer in problem.layers
        }
        self.state: dict[str, Choice] = {}

    def _moves(self) -> Iterable[dict[str, Choice]]:
        """Single-layer changes; tied layers follow a change of a_bits, keeping their w_bits."""
        for name, current in self.state.items():
            for choice in self.allowed[name]:
                if choice == current:
                    continue
                move = {name: choice}
                if choice[1] != current[1]:
                    for other in self.group_of.get(name, []):
                        follow = (self.state[other][0], choice[1])
                        if other != name and follow not in self.allowed[other]:
                            break
                        if other != name:
                            move[other] = follow
                    else:
                        yield move
                    continue
                yield move

    def _usage(self, state: dict[str, Choice]) -> list[float]:
        usage = [self.problem.fixed.get(m, 0.0) for m in self.linear]
        for name, choice in state.items():
            for index, value in enumerate(self.contrib[name][choice]):
                usage[index] += value
        return usage

    def _trial(self, usage: list[float], move: dict[str, Choice]) -> tuple[dict[str, float], float]:
        """Usage of every budgeted metric after ``move``, and the change of sensitivity."""
        new = list(usage)
        delta = 0.0
        for name, choice in move.items():
            old = self.state[name]
            layer = self.layers[name]
            delta += layer.sensitivity.get(choice, 0.0) - layer.sensitivity.get(old, 0.0)
            for index, (after, before) in enumerate(zip(self.contrib[name][choice], self.contrib[name][old], strict=True)):
                new[index] += after - before
        result = dict(zip(self.linear, new, strict=True))
        for metric in self.limits:
            if metric in PEAK_METRICS:
                trial = {**self.state, **move}
                result[metric] = max(live_bytes_per_step(self.problem, trial)) + self.problem.fixed.get(metric, 0.0)
        return result, delta

    def _overshoot(self, usage: dict[str, float]) -> float:
        return sum(max(0.0, usage[m] / limit - 1.0) for m, limit in self.limits.items())

    def _spent(self, usage: dict[str, float]) -> float:
        return sum(usage[m] / limit for m, limit in self.limits.items())

    def _current(self) -> dict[str, float]:
        return self._trial(self._usage(self.state), {})[0]

    def _start(self, pick) -> None:
        for layer in self.problem.layers:
            self.state[layer.name] = pick(self.allowed[layer.name], layer)
        for group in self.problem.tie_groups:  # tied layers agree on one common a_bits
            common = set.intersection(*({a for _, a in self.allowed[name]} for name in group))
            a_bits = max(common) if pick is _least_sensitive else min(common)
            for name in group:
                options = [c for c in self.allowed[name] if c[1] == a_bits]
                self.state[name] = pick(options, self.layers[name])

    def demote(self) -> None:
        self._start(_least_sensitive)
        usage = self._current()
        while self._overshoot(usage) > 0:
            linear = [usage[m] for m in self.linear]
            best, best_score = None, math.inf
            for move in self._moves():
                trial_usage, loss = self._trial(linear, move)
                relief = self._overshoot(usage) - self._overshoot(trial_usage)
                if relief <= 1e-15:
                    continue
                score = loss / relief
                if score < best_score:
                    best, best_score = (move, trial_usage), score
            if best is None:
                raise self._stuck("no move reduces the overshoot")
            self.state.update(best[0])
            usage = best[1]
        self._fill(usage)

    def promote(self) -> None:
        self._start(_cheapest)
        usage = self._current()
        if self._overshoot(usage) > 0:
            raise self._stuck("not even at the lowest bits")
        self._fill(usage)

    def _stuck(self, why: str) -> EdgeqError:
        """Where no plan meets the budget, the ILP's error naming the smallest achievable value;
        else that greedy, not the budget, is at fault (``why``)."""
        error = infeasibility(self.problem, self.limits)
        if error is not None:
            return error
        return EdgeqError(f"greedy allocation cannot meet the budget ({why}), although the budget is achievable: "
                          "the ILP (--solver ilp) finds a plan")

    def _fill(self, usage: dict[str, float]) -> None:
        """Take the move that buys most sensitivity per unit of budget spent, within budget, while one does."""
        while True:
            linear = [usage[m] for m in self.linear]
            best, best_score = None, 0.0
            for move in self._moves():
                trial_usage, delta = self._trial(linear, move)
                if delta >= 0 or self._overshoot(trial_usage) > 0:
                    continue
                spent = self._spent(trial_usage) - self._spent(usage)
                score = -delta / max(spent, 1e-12)
                if score > best_score:
                    best, best_score = (move, trial_usage), score
            if best is None:
                return
            self.state.update(best[0])
            usage = best[1]


def _least_sensitive(options: list[Choice], layer: LayerOptions) -> Choice:
    return min(options, key=lambda c: (layer.sensitivity.get(c, 0.0), -(c[0] or 0), -c[1]))


def _cheapest(options: list[Choice], layer: LayerOptions) -> Choice:
    return min(options, key=lambda c: ((c[0] or 0) * max(layer.weight_params, 1) + c[1], c))


def uniform(problem: AllocationProblem, w_bits: int, a_bits: int) -> Allocation:
    """Every layer at (w_bits, a_bits) (weightless layers at a_bits): the uniform baselines."""
    choices = {}
    for layer in problem.layers:
        wanted = (w_bits if layer.weight_params else None, a_bits)
        if wanted not in layer.choices:
            raise EdgeqError(f"layer '{layer.name}' has no choice w{w_bits}/a{a_bits}")
        choices[layer.name] = wanted
    totals = evaluate(problem, choices)
    return Allocation(choices, totals, totals["sensitivity"], 0.0, "uniform", f"uniform-w{w_bits}a{a_bits}")


# -- problems built from shapes --------------------------------------------------------------


def layer_options(
    shape,
    cost_model,
    w_bits: Sequence[int] = (),
    a_bits: Sequence[int] = (),
    sensitivity: dict[Choice, float] | None = None,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> LayerOptions:
    """The choices of one layer (``shape``: targets.base.LayerShape) costed by ``cost_model``.

    The choices are ``pairs`` (default ``w_bits`` x ``a_bits``); a weightless layer takes their a_bits.
    """
    from passes.sensitivity import layer_choices

    pairs = list(pairs) if pairs is not None else [(w, a) for w in w_bits for a in a_bits]
    choices = layer_choices(bool(shape.weight_params), pairs)
    return LayerOptions(
        name=shape.node,
        choices=choices,
        sensitivity={c: value for c, value in (sensitivity or {}).items() if c in choices},
        costs={c: cost_model.layer_cost(shape, c[0], c[1]) for c in choices},
        weight_params=shape.weight_params,
    )


def synthetic_problem(
    n_layers: int,
    cost_model,
    *,
    w_bits: Sequence[int] = (2, 4, 8),
    a_bits: Sequence[int] = (4, 8, 16),
    seed: int = 0,
    residual_every: int = 3,
) -> AllocationProblem:
    """A CNN-like chain with residual Adds, for benchmarks and tests of the solver.

    Sensitivities follow the noise model of uniform quantization (error power
    ~ 2^(-2 bits)), with random per-layer weights, so cheaper choices always
    lose fidelity. Every ``residual_every``-th layer adds the output of the one
    ``residual_every`` back (its two readers are tied, and the skip buffer
    stays live across the block, as in a real network).
    """
    import numpy as np

    from targets.base import LayerShape

    rng = np.random.default_rng(seed)
    layers, steps, buffers = [], [], []
    producer_step: dict[str, int] = {}
    tie_groups: list[list[str]] = []
    previous = "input"
    producer_step["input"] = 0
    elems = {"input": 3 * 32 * 32}
    readers: dict[str, list[tuple[str, int]]] = {}
    for index in range(n_layers):
        name = f"layer{index}"
        channels = int(rng.choice([16, 32, 64, 128]))
        spatial = int(rng.choice([8, 16, 32]))
        in_channels = int(rng.choice([16, 32, 64, 128]))
        kernel = int(rng.choice([1, 3]))
        out_elems = channels * spatial * spatial
        shape = LayerShape(name, "Conv", "conv", out_elems * in_channels * kernel * kernel,
                           channels * in_channels * kernel * kernel, elems[previous], out_elems, channels)
        alpha, beta = rng.lognormal(0, 1.5), rng.lognormal(-1, 1.5)
        sens = {(w, a): alpha * 4.0 ** (-(w or 8) + 2) + beta * 4.0 ** (-a + 2) for w in w_bits for a in a_bits}
        layers.append(layer_options(shape, cost_model, w_bits, a_bits, sens))
        step = len(steps)
        steps.append(name)
        readers.setdefault(previous, []).append((name, step))
        skip = f"layer{index - residual_every}_out"
        if residual_every and index >= residual_every and index % residual_every == 0 and skip in elems:
            readers.setdefault(skip, []).append((name, step))
            tie_groups.append([name, f"layer{index - residual_every + 1}"])
        output = f"{name}_out"
        elems[output] = out_elems
        producer_step[output] = step
        previous = output
    for tensor, reads in readers.items():
        buffers.append(ActivationBuffer(tensor, elems[tensor], producer_step[tensor],
                                        max(step for _, step in reads), [name for name, _ in reads]))
    buffers.append(ActivationBuffer(previous, elems[previous], producer_step[previous], len(steps) - 1, [], 8))
    merged = _merge_groups(tie_groups)
    return AllocationProblem(layers, merged, {}, steps, buffers, name=f"synthetic-{n_layers}")


def _merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Union overlapping tie groups (a layer tied to two others ties all three)."""
    from compiler.graph import DisjointSets

    sets = DisjointSets()
    for group in groups:
        for name in group:
            sets.find(name)
        for name in group[1:]:
            sets.union(name, group[0])
    return [members for members in sets.groups() if len(members) > 1]


# -- problems built from a model and its plan -----------------------------------------------


def problem_from_model(
    model,
    plan,
    cost_model,
    *,
    sensitivity: dict[str, dict[Choice, float]] | None = None,
    w_bits: Sequence[int] | None = None,
    a_bits: Sequence[int] | None = None,
    pins: dict[str, tuple[int | None, int | None]] | None = None,
    integer_only: bool = False,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> AllocationProblem:
    """The allocation problem of ``plan.layers`` in ``model`` (a canonicalized float model).

    Candidates: ``pairs``, else ``w_bits`` x ``a_bits`` when given, else the
    pairs the cost model says its target runs (``CostModel.bit_pairs``).
    Layer costs come from ``cost_model`` on :func:`compiler.layers.layer_shapes`;
    the float ops a transform inserted to run online (compiler.linear_layers.online_ops)
    are charged as fixed costs (``CostModel.fixed_costs``); tie groups are the
    quantized readers of each shared activation quantizer
    (:func:`passes.insert_qdq.activation_groups`), so a tensor is never stored
    at two widths; the execution order is the model's node order with a Relu /
    Clip that the QDQ export folds into its layer taken as part of that layer;
    for integer-only targets an Add/Mul the MCU writes in place shares its
    input's buffer (:func:`merge_in_place`).
    """
    from compiler.layers import layer_shapes

    if pairs is None:
        pairs = ([(w, a) for w in (w_bits or (4, 8)) for a in (a_bits or (8,))]
                 if w_bits or a_bits else list(cost_model.bit_pairs))
    shapes = layer_shapes(model, list(plan.layers))
    sensitivity = sensitivity or {}
    layers = [layer_options(shapes[name], cost_model, sensitivity=sensitivity.get(name), pairs=pairs)
              for name in plan.layers]
    online = online_op_shapes(model)
    fixed = dict(cost_model.fixed_costs([shapes[name] for name in plan.layers], online))
    steps, buffers, tie_groups = execution_buffers(model, plan, integer_only=integer_only)
    if integer_only:
        buffers = merge_in_place(plan, layers, steps, buffers)
    return AllocationProblem(layers, tie_groups, dict(pins or {}), steps, buffers, fixed, name=plan.model,
                             online_ops=[shape.node for shape in online])


IN_PLACE_OPS = ("Add", "Mul")  # the MCU writes their integer forms (QAdd, QMul) over an input they read last


def merge_in_place(plan, layers: list[LayerOptions], steps: list[str],
                   buffers: list[ActivationBuffer]) -> list[ActivationBuffer]:
    """``buffers`` with each in-place elementwise output stored in its input's buffer, as the MCU arena
    planner does (targets/mcu/memory.py): an Add/Mul whose input has the output's size and no reader
    after it. Only where both tensors' widths are fixed (one a_bits option among their readers), so the
    two take the same bytes whatever the plan; elsewhere they stay apart (a conservative peak)."""
    options = {layer.name: layer.a_bits_options() for layer in layers}

    def fixed_width(buffer: ActivationBuffer) -> int | None:
        widths = set().union(*(options[reader] for reader in buffer.readers)) if buffer.readers else set()
        return widths.pop() if len(widths) == 1 else None

    by_name = {buffer.name: buffer for buffer in buffers}
    merged: set[str] = set()
    for name, layer in plan.layers.items():
        output = by_name.get(layer.outputs[0])
        if layer.op_type not in IN_PLACE_OPS or output is None or name not in steps:
            continue
        step = steps.index(name)
        for source in layer.inputs:
            buffer = by_name.get(source)
            if (buffer is None or source in merged or layer.inputs.count(source) > 1 or buffer.elems != output.elems
                    or buffer.last_step != step or output.first_step != step
                    or fixed_width(buffer) is None or fixed_width(buffer) != fixed_width(output)):
                continue
            buffer.last_step = output.last_step
            buffer.readers = list(dict.fromkeys([*buffer.readers, *output.readers]))
            by_name[output.name] = buffer
            merged.add(output.name)
            break
    return [buffer for buffer in buffers if buffer.name not in merged]


def online_op_shapes(model) -> list:
    """LayerShape of each runtime op a transform inserted (an online rotation), in graph order."""
    from compiler.layers import layer_shapes
    from compiler.linear_layers import online_ops

    present = {node.name for node in model.graph.node}
    names = [entry["node"] for entry in online_ops(model) if entry["node"] in present]
    if not names:
        return []
    shapes = layer_shapes(model, names)
    return [shapes[name] for name in names]


def execution_buffers(model, plan, *, integer_only: bool = False) -> tuple[list[str], list[ActivationBuffer], list[list[str]]]:
    """Execution steps, activation buffers with live ranges and readers, and tie groups."""
    import onnx

    from compiler.graph import graph_input_names, graph_output_names, value_shapes
    from compiler.layers import fix_input_shapes, shapes_by_running
    from passes.insert_qdq import activation_groups, fused_activation

    fused_nodes = {}
    for layer in plan.layers.values():
        fused = fused_activation(model, layer)
        if fused is not None:
            fused_nodes[fused.name] = layer.node
    steps: list[str] = []
    step_of_tensor: dict[str, int] = {name: 0 for name in graph_input_names(model)}
    # Pure reshapes alias their input (no bytes of their own), as the MCU arena planner does.
    alias: dict[str, str] = {}
    last_read: dict[str, int] = {}
    node_step: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        if node.name in fused_nodes:  # computed inside its layer's step
            step = node_step[fused_nodes[node.name]]
        else:
            step = len(steps)
            steps.append(node.name)
        node_step[node.name] = step
        for name in node.input:
            name = alias.get(name, name)
            if name in step_of_tensor:
                last_read[name] = max(last_read.get(name, 0), step)
        if node.op_type in ALIAS_OPS and node.input[0] in step_of_tensor:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            continue
        for name in node.output:
            if name:
                step_of_tensor[name] = step
    # A layer's raw output that its fused activation consumes within the same step is never stored.
    fused_raw = {node.input[0] for node in model.graph.node if node.name in fused_nodes}
    final = len(steps) - 1
    for name in graph_output_names(model):
        last_read[alias.get(name, name)] = final

    groups = activation_groups(model, plan, integer_only=integer_only)
    group_of = {name: index for index, group in enumerate(groups) for name in group.tensors}
    group_readers: dict[int, list[str]] = {}
    for layer in plan.layers.values():
        for name in layer.inputs:
            if name in group_of:
                group_readers.setdefault(group_of[name], [])
                if layer.node not in group_readers[group_of[name]]:
                    group_readers[group_of[name]].append(layer.node)

    fixed_model = fix_input_shapes(model)
    shapes = value_shapes(onnx.shape_inference.infer_shapes(fixed_model, data_prop=True))
    unknown = {name for name in step_of_tensor
               if name not in fused_raw and not all(isinstance(d, int) for d in shapes.get(name) or [None])}
    if unknown:  # shape inference left them open: one onnxruntime run on zeros sizes them
        shapes.update(shapes_by_running(fixed_model, unknown))
    buffers = []
    for name, first in step_of_tensor.items():
        if name in fused_raw:
            continue
        shape = shapes[name]
        group = group_of.get(name)
        readers = group_readers.get(group, []) if group is not None else []
        fixed_bits = groups[group].bits if group is not None else FLOAT_BITS
        buffers.append(ActivationBuffer(name, int(math.prod(shape)), first, last_read.get(name, first), readers, fixed_bits))
    ties = _merge_groups([readers for readers in group_readers.values() if len(readers) > 1])
    return steps, buffers, ties


def apply_allocation(plan, problem: AllocationProblem, allocation: Allocation) -> None:
    """Write the chosen bits, each layer's sensitivities and chosen cost, and the totals into ``plan``."""
    from dataclasses import asdict

    for layer in problem.layers:
        w_bits, a_bits = allocation.choices[layer.name]
        entry = plan.layers[layer.name]
        entry.w_bits, entry.a_bits = w_bits, a_bits
        entry.info["sensitivity"] = {choice_label(c): s for c, s in layer.sensitivity.items()}
        entry.info["cost"] = asdict(layer.costs[(w_bits, a_bits)])
        tied = [group for group in problem.tie_groups if layer.name in group]
        if tied:
            entry.info["tie_group"] = tied[0]
        if layer.name in problem.pins:
            entry.info["pinned"] = list(problem.pins[layer.name])
    plan.budget = dict(allocation.budget)
    plan.totals["allocation"] = {key: value for key, value in allocation.as_dict().items() if key != "choices"}


def choice_label(choice: Choice) -> str:
    """``w4a8``, or ``a8`` for a weightless layer (plan.json's and report.md's spelling)."""
    return f"w{choice[0]}a{choice[1]}" if choice[0] else f"a{choice[1]}"
