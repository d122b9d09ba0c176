"""Budgets on several hardware resources at once: the ILP against greedy where the budgets pull apart.

Under a weight-size budget alone, a ratio greedy is within a few percent of
the ILP's optimum (benchmarks/size_budget.md). Real targets budget several
resources whose costs disagree about which layer to shrink:

* ``fpga`` (ZCU104 preset): BRAM (weight bits) and DSP slices. A 2-bit
  weight times an 8-bit activation is built from LUTs (no DSP, 2 bits of
  BRAM), 4- and 8-bit weights cost the same half DSP per multiplier, 16-bit
  activations a whole one: BRAM is saved on the big layers, DSPs on any layer
  (every layer has its own engine of 32 multipliers), LUTs spent by 2-bit ones.
* ``mcu`` (Cortex-M55 preset): flash and latency. 4-bit weights halve flash
  but cost edgeq's firmware 20-50% more cycles (unpacked in the MAC loop:
  targets/mcu/cost_table.json), so layers with many weights and few MACs are
  the ones to shrink. (MobileNetV2's 224x224 activations do not fit the preset's
  SRAM: this is the planning problem only, not a build.)

For each model (MobileNetV2, EfficientNet-Lite0):

1. canonicalize, select layers, fit 8- and 16-bit activation ranges (MSE
   observers) on the ``--calib-samples`` calibration crops;
2. measure every layer's single-layer sensitivity (that layer quantized alone,
   softmax KL against float) at every bit pair either target offers, once
   (cached under ``--work``);
3. per case, the candidates and the dominated-choice filter the CLI uses
   (compiler.mixed.priced_pairs, passes.allocate.drop_dominated_choices); per
   budget (fractions of the uniform w8a8 plan's totals), the ILP and greedy
   (passes/allocate.py) on that same table; the most faithful uniform plan
   that fits, if any;
4. every plan exported with passes/insert_qdq (nearest rounding, per-channel
   weights) and run in onnxruntime on the evaluation photos (disjoint from the
   calibration photos): top-1 agreement and softmax KL against float, and the
   images only one of ILP / greedy keeps at float's top-1 with a sign-flip
   test over the source photos.

    python tools/bench_resources.py --write benchmarks/resources.md
    python tools/bench_resources.py --pipeline --rerank 0 --write benchmarks/resources_pipeline.md

``--pipeline`` plans and exports as ``edgeq compile`` does instead of steps 1-4's
cheaper path (see :func:`bench_model_pipeline`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.errors import EdgeqError  # noqa: E402
from compiler.mixed import AllocatorOptions, MixedPrecision, priced_pairs  # noqa: E402
from compiler.mixed import solve as solve_mixed  # noqa: E402
from passes import allocate as al  # noqa: E402
from passes import sensitivity as sn  # noqa: E402
from targets.base import get_target  # noqa: E402
from tools.bench_mixed import (  # noqa: E402
    Scorer,
    _cached_samples,
    discordant,
    evaluation_groups,
    load_case,
    pooled_by_evaluation_set,
    score,
    top1_hits,
)

METHODS = ("ilp", "reranked", "greedy")
# case -> (target, device, budgets as fractions of the uniform w8a8 plan's totals)
CASES: dict[str, tuple[str, str, list[dict[str, float]]]] = {
    "fpga": ("fpga", "zcu104", [
        {"bram": 0.7, "dsp": 0.97},
        {"bram": 0.6, "dsp": 0.95},
        {"bram": 0.55, "dsp": 0.95, "lut": 1.3},
        {"bram": 0.6, "dsp": 0.9},
        {"bram": 0.5, "dsp": 0.8},
    ]),
    "mcu": ("mcu", "cortex-m55", [
        {"flash_bytes": 0.75, "latency_s": 1.05},
        {"flash_bytes": 0.7, "latency_s": 1.08},
        {"flash_bytes": 0.65, "latency_s": 1.1},
        {"flash_bytes": 0.6, "latency_s": 1.15},
    ]),
}


def measured_pairs(cases: list[str]) -> list[tuple[int, int]]:
    """Every bit pair one of ``cases``' targets offers (the table is measured once for all)."""
    pairs: set[tuple[int, int]] = set()
    for case in cases:
        target, device, _ = CASES[case]
        pairs |= set(get_target(target).cost_model(device).bit_pairs)
    return sorted(pairs)


def absolute(fractions: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    return {metric: fraction * reference[metric] for metric, fraction in fractions.items()}


def bits_used(allocation: al.Allocation, problem: al.AllocationProblem) -> str:
    """'w2a8: 3, w8a8: 50': how many weighted layers at each pair."""
    weighted = {layer.name for layer in problem.layers if any(w for w, _ in layer.choices)}
    counts = Counter(f"w{w}a{a}" for name, (w, a) in allocation.choices.items() if name in weighted)
    return ", ".join(f"{key}: {counts[key]}" for key in sorted(counts, key=lambda k: (len(k), k)))


def solve(method: str, mixed: MixedPrecision, budget: dict[str, float], rerank: int) -> al.Allocation | str:
    """The plan ``compiler.mixed.solve`` picks for ``method``, or why there is none."""
    options = AllocatorOptions(solver="greedy") if method == "greedy" else AllocatorOptions(
        rerank=rerank if method == "reranked" else 0)
    try:
        return solve_mixed(mixed, budget, options)
    except EdgeqError:  # the ILP proves infeasibility; greedy's demotions can get stuck between budgets
        return "stuck" if method == "greedy" else "infeasible"


def bench_model(name: str, cases: list[str], args) -> list[dict]:
    from compiler.loader import load_model
    from passes.canonicalize import canonicalize
    from passes.select_layers import select_layers

    model_path, data, evaluation, labels = load_case(name, args.calib_samples + args.rerank_samples)
    # the table's samples, then held-out ones the re-ranking measures whole plans on (as --rerank does)
    calib = {key: value[:args.calib_samples] for key, value in data.items()}
    held_out = {key: value[args.calib_samples:] for key, value in data.items()}
    model = sn.with_opset_for(canonicalize(load_model(model_path)), [4, 16])
    plan = select_layers(model)
    pairs = measured_pairs(cases)
    a_bits = sorted({a for _, a in pairs})
    ranges = sn.activation_ranges(model, plan, calib, a_bits)
    timings: dict = {}
    samples = _cached_samples(
        args.work / f"{name}_resources{args.calib_samples}.json", args.fresh, timings, "sensitivity_s",
        lambda: sn.measured_sample_sensitivity(model, plan, calib, sn.candidate_choices(plan, pairs=pairs),
                                               ranges=ranges, max_samples=None, workers=args.workers))
    table = sn.monotone(sn.mean_table(samples))
    groups = evaluation_groups(name, len(next(iter(evaluation.values()))))
    distance = sn.PlanDistance(model, plan, held_out, ranges)
    scorer = Scorer(model, plan, ranges, {"eval": evaluation}, model.graph.output[0].name)
    rows = []
    for case in cases:
        target, device, fractions_list = CASES[case]
        cost_model = get_target(target).cost_model(device)
        metrics = sorted({metric for fractions in fractions_list for metric in fractions})
        offered, _ = priced_pairs(cost_model, list(cost_model.bit_pairs), metrics)
        problem = al.problem_from_model(model, plan, cost_model, pairs=offered, sensitivity=table)
        al.drop_dominated_choices(problem, metrics)
        rows += bench_case(name, case, MixedPrecision(problem, distance=distance), offered,
                           lambda choices: scorer.outputs(choices, "eval"), scorer.reference["eval"], labels, groups,
                           args)
    for row in rows:
        row["timings"] = timings
    return rows


def bench_case(name: str, case: str, mixed: MixedPrecision, offered: list[tuple[int, int]], outputs_of,
               reference_outputs, labels, groups, args) -> list[dict]:
    """Every budget of ``case`` on one table: ILP, re-ranked, greedy and the best uniform plan of the
    ``offered`` bit pairs that fits, each plan's outputs on the evaluation set from ``outputs_of(choices)``."""
    target, device, fractions_list = CASES[case]
    problem = mixed.problem
    reference = al.uniform(problem, 8, 8).totals
    methods = [method for method in METHODS if method != "reranked" or mixed.distance is not None]
    rows = []
    for fractions in fractions_list:
        budget = absolute(fractions, reference)
        row = {"model": name, "case": f"{target}:{device}", "budget": fractions, "offered": offered,
               "reranked": {"none": "not run"}}
        for method in methods:
            start = time.perf_counter()
            allocation = solve(method, mixed, budget, args.rerank)
            row[f"{method}_s"] = time.perf_counter() - start
            if isinstance(allocation, str):
                row[method] = {"none": allocation}
                continue
            outputs = outputs_of(allocation.choices)
            row[method] = {**score(reference_outputs, outputs, labels),
                           "objective": allocation.objective, "bits": bits_used(allocation, problem),
                           "top1_hits": top1_hits(reference_outputs, outputs),
                           "totals": {m: allocation.totals[m] / reference[m] for m in fractions},
                           "took": _taken(allocation)}
        fitting = []
        for w_bits, a_bits in offered:
            try:
                uniform = al.uniform(problem, w_bits, a_bits)
            except EdgeqError:
                continue
            if all(uniform.totals[m] <= limit * (1 + 1e-9) for m, limit in budget.items()):
                outputs = outputs_of(uniform.choices)
                fitting.append({**score(reference_outputs, outputs, labels), "pair": f"w{w_bits}a{a_bits}"})
        row["uniform"] = max(fitting, key=lambda u: u["top1_agreement"]) if fitting else None
        for method in ("ilp", "reranked"):
            if "top1_hits" in row[method] and "top1_hits" in row["greedy"]:
                row[f"{method}_discordant"] = discordant(row[method], row["greedy"], groups)
        rows.append(row)
        print(json.dumps(row, default=str)[:600], flush=True)
    return rows


def bench_model_pipeline(name: str, cases: list[str], args) -> list[dict]:
    """``--pipeline``: what `edgeq compile --target T --device D --budget ...` does, per case and budget.

    The recipe's transforms, the table ``compiler.mixed.build_problem`` measures
    for the case (GPTQ-aware, cross-fitted, the case's priced pairs only), the
    CLI's solver paths (``compiler.mixed.solve``; ``--rerank`` compiles each
    candidate), and every plan exported by ``compiler.export.export_plan`` on
    all the calibration samples (calibration, GPTQ, bias correction; the
    target's integer-only graph), as the compiler writes it.
    """
    from compiler.export import export_plan
    from compiler.fidelity import run_model
    from compiler.loader import load_model
    from compiler.mixed import build_problem
    from compiler.recipe import apply_transforms, resolve_recipe
    from passes.canonicalize import canonicalize
    from passes.select_layers import select_layers

    model_path, data, evaluation, labels = load_case(name, args.calib_samples + args.rerank_samples)
    model = canonicalize(load_model(model_path))
    recipe = resolve_recipe(None, model)
    model = apply_transforms(recipe, model, data)
    output = model.graph.output[0].name
    reference_outputs = run_model(model, evaluation)[output]
    groups = evaluation_groups(name, len(reference_outputs))
    options = AllocatorOptions(rerank=args.rerank, sensitivity_samples=args.calib_samples,
                               rerank_samples=args.rerank_samples)
    rows, tables_s = [], 0.0
    for case in cases:
        target_name, device, fractions_list = CASES[case]
        target = get_target(target_name)
        integer_only = target.needs_integer_graph
        plan = select_layers(model, integer_only=integer_only)
        metrics = sorted({metric for fractions in fractions_list for metric in fractions})
        start = time.perf_counter()
        mixed = build_problem(model, plan, data, target, device, integer_only=integer_only, options=options,
                              metrics=metrics, recipe=recipe)
        tables_s += time.perf_counter() - start
        exported: dict[tuple, np.ndarray] = {}

        def outputs_of(choices: dict, plan=plan, integer_only=integer_only, exported=exported) -> np.ndarray:
            key = tuple(sorted(choices.items()))
            if key not in exported:
                qdq, _ = export_plan(model, sn.plan_with_choices(plan, choices), data, recipe,
                                     integer_only=integer_only)
                exported[key] = run_model(qdq, evaluation)[output]
            return exported[key]

        offered = [tuple(pair) for pair in mixed.record["candidates"]]
        rows += bench_case(name, case, mixed, offered, outputs_of, reference_outputs, labels, groups, args)
    for row in rows:
        row["timings"] = {"sensitivity_s": tables_s}  # the tables of all cases
    return rows


def _taken(allocation: al.Allocation) -> str | None:
    """Which measured candidate a re-ranking kept: 'ILP rank N' or the other solver's name."""
    for candidate in allocation.candidates:
        if candidate["chosen"]:
            return f"ILP rank {candidate['rank'] + 1}" if "rank" in candidate else candidate["source"]
    return None


def _budget(row: dict) -> str:
    return ", ".join(f"{metric.removesuffix('_bytes').removesuffix('_s')} {fraction:g}"
                     for metric, fraction in row["budget"].items())


def _fidelity(result: dict) -> str:
    if result.get("none") == "not run":
        return "-"
    if "none" in result:
        return f"no plan ({result['none']})"
    took = result.get("took") or ""
    return f"{result['top1_agreement']:.3f} / {result['kl']:.3f}" + (" (greedy's)" if took.startswith("greedy") else "")


def tally(rows: list[dict]) -> str:
    """How the ILP's plans compare with greedy's on the evaluation set, over the points both planned."""
    counts = Counter()
    for row in rows:
        ilp, greedy = row["ilp"], row["greedy"]
        if "none" in ilp:
            continue
        if "none" in greedy:
            counts["greedy found no plan"] += 1
        elif ilp["bits"] == greedy["bits"] and ilp["top1_hits"] == greedy["top1_hits"]:
            counts["same plan"] += 1
        else:
            top1 = ilp["top1_agreement"] >= greedy["top1_agreement"]
            kl = ilp["kl"] <= greedy["kl"]
            counts["ILP >= greedy on both metrics" if top1 and kl else "below on both" if not (top1 or kl)
                   else "one metric each way"] += 1
    both = [(row["model"], row["ilp"], row["greedy"]) for row in rows
            if "top1_hits" in row["ilp"] and "top1_hits" in row["greedy"]]
    return "\n".join([f"Of {sum(counts.values())} feasible points: "
                      + ", ".join(f"{label} {counts[label]}" for label in ("same plan", "ILP >= greedy on both metrics",
                                                                            "one metric each way", "below on both",
                                                                            "greedy found no plan")) + ".",
                      "", "All points both planned, pooled: images only the ILP's / only greedy's plans keep at "
                      "float's top-1 (p: the sign-flip test with each source's differences summed over the points, "
                      "which reuse the images).", "", *pooled_by_evaluation_set(both)])


def markdown(rows: list[dict], command: str, pipeline: bool = False) -> str:
    title = "as the compiler plans and exports" if pipeline else "ILP against greedy"
    lines = [f"## Several resources at once: {title}", "",
             " and ".join(f"`{run}`" for run in dict.fromkeys(row.get("command", command) for row in rows))
             + f" ({time.strftime('%Y-%m-%d')}). Budgets are fractions of the uniform w8a8 plan's "
             "totals on the same cost model. *objective*: summed single-layer KL on the calibration crops (the "
             "table both solvers see; greedy's as a ratio to the ILP's optimum). *ILP reranked*: the ILP's best "
             "plans and greedy's measured whole on held-out calibration crops, the closest to float kept "
             "(`--rerank`; *(greedy's)* where that was greedy's plan). "
             "Fidelity: top-1 agreement / softmax KL against float on the evaluation set, "
             + ("plans planned and exported as `edgeq compile` does (`--pipeline`: the recipe's transforms, the "
                "GPTQ-aware table of the case's priced pairs, GPTQ + bias correction at export, the target's "
                "integer-only graph; `--rerank` compiles each candidate). " if pipeline else
                "plans exported with nearest rounding (no GPTQ, no transforms). ")
             + "*only X / only greedy*: images only that plan keeps at "
             "float's top-1 (p: sign-flip test over the source photos; independent images for the Fashion-MNIST "
             "CNN). *uniform*: the most faithful uniform plan within the budget.", ""]
    header = ["model", "target", "budget (x w8a8)", "ILP top-1 / KL", "ILP reranked", "greedy top-1 / KL",
              "greedy objective / ILP", "only ILP / only greedy", "only reranked / only greedy",
              "uniform that fits", "ILP bits", "greedy bits"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    infeasible = [row for row in rows if "none" in row["ilp"]]
    for row in rows:
        if row in infeasible:
            continue
        ilp, greedy = row["ilp"], row["greedy"]
        ratio = (f"{greedy['objective'] / ilp['objective']:.3f}" if "objective" in ilp and "objective" in greedy
                 else "-")
        uniform = row["uniform"]
        cells = [row["model"], row["case"], _budget(row), _fidelity(ilp), _fidelity(row["reranked"]), _fidelity(greedy),
                 ratio, row.get("ilp_discordant", "-"), row.get("reranked_discordant", "-"),
                 f"{uniform['pair']} {uniform['top1_agreement']:.3f} / {uniform['kl']:.3f}" if uniform else "none",
                 ilp.get("bits", "-"), greedy.get("bits", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    timings = {row["model"]: row["timings"] for row in rows}
    took = Counter("greedy's plan" if (row["reranked"].get("took") or "").startswith("greedy") else "one of the ILP's"
                   for row in rows if row not in infeasible and "none" not in row["reranked"])
    lines += ["", tally(rows)]
    if took:
        lines += ["", "The re-ranking kept " + ", ".join(f"{source} at {count}" for source, count in sorted(took.items()))
                  + f" of {sum(took.values())} points."]
    if infeasible:
        lines += ["", "Infeasible (the ILP proves no plan fits; greedy stops too): "
                  + "; ".join(f"{row['model']} {row['case']} {_budget(row)}" for row in infeasible) + "."]
    lines += ["", "Sensitivity tables (s; a cached table shows the run that measured it): "
              + ", ".join(f"{model} {t.get('sensitivity_s', 0):.1f}" for model, t in timings.items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion_cnn,mobilenetv2,efficientnet_lite0")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--calib-samples", type=int, default=96, help="calibration samples the table is measured on")
    parser.add_argument("--rerank", type=int, default=8, help="ILP plans the re-ranking measures whole")
    parser.add_argument("--rerank-samples", type=int, default=32,
                        help="held-out calibration samples (after the table's) the re-ranking measures on")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeq_bench_resources"))
    parser.add_argument("--fresh", action="store_true", help="re-measure sensitivities even if cached")
    parser.add_argument("--pipeline", action="store_true",
                        help="plan and export as the CLI does (transforms, GPTQ-aware table per case, GPTQ + bias "
                             "correction at export); --rerank 0 skips the re-ranked column")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--write", type=Path, help="write the markdown here (benchmarks/resources.md)")
    parser.add_argument("--render", type=lambda text: [Path(p) for p in text.split(",")],
                        help="no runs: the markdown of rows saved by earlier --json runs (comma-separated files)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} (choose from {', '.join(CASES)})")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for saved in args.render or []:
        rows += json.loads(saved.read_text())
    command = "python tools/bench_resources.py " + " ".join(sys.argv[1:])
    for name in [] if args.render else args.models.split(","):
        print(f"== {name}", flush=True)
        rows += [{**row, "command": command}
                 for row in (bench_model_pipeline if args.pipeline else bench_model)(name, cases, args)]
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    text = markdown(rows, command, pipeline=args.pipeline)
    if args.write:
        from compiler.atomic import atomic_write_text

        heading = "# Multi-resource budgets, as compiled" if args.pipeline else "# Multi-resource budgets"
        atomic_write_text(args.write, f"{heading}\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
