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
  but cost cycles to unpack, so layers with many weights and few MACs are the
  ones to shrink. (MobileNetV2's 224x224 activations do not fit the preset's
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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

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
        reference = al.uniform(problem, 8, 8).totals
        mixed = MixedPrecision(problem, distance=distance)
        for fractions in fractions_list:
            budget = absolute(fractions, reference)
            row = {"model": name, "case": f"{target}:{device}", "budget": fractions, "offered": offered}
            for method in METHODS:
                start = time.perf_counter()
                allocation = solve(method, mixed, budget, args.rerank)
                row[f"{method}_s"] = time.perf_counter() - start
                if isinstance(allocation, str):
                    row[method] = {"none": allocation}
                    continue
                outputs = scorer.outputs(allocation.choices, "eval")
                row[method] = {**score(scorer.reference["eval"], outputs, labels),
                               "objective": allocation.objective, "bits": bits_used(allocation, problem),
                               "top1_hits": top1_hits(scorer.reference["eval"], outputs),
                               "totals": {m: allocation.totals[m] / reference[m] for m in fractions},
                               "took": _taken(allocation)}
            fitting = []
            for w_bits, a_bits_ in offered:
                try:
                    uniform = al.uniform(problem, w_bits, a_bits_)
                except EdgeqError:
                    continue
                if all(uniform.totals[m] <= limit * (1 + 1e-9) for m, limit in budget.items()):
                    outputs = scorer.outputs(uniform.choices, "eval")
                    fitting.append({**score(scorer.reference["eval"], outputs, labels), "pair": f"w{w_bits}a{a_bits_}"})
            row["uniform"] = max(fitting, key=lambda u: u["top1_agreement"]) if fitting else None
            for method in ("ilp", "reranked"):
                if "top1_hits" in row[method] and "top1_hits" in row["greedy"]:
                    row[f"{method}_discordant"] = discordant(row[method], row["greedy"], groups)
            rows.append(row)
            print(json.dumps(row, default=str)[:600], flush=True)
    for row in rows:
        row["timings"] = timings
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
    if "none" in result:
        return f"no plan ({result['none']})"
    took = result.get("took") or ""
    return f"{result['top1_agreement']:.3f} / {result['kl']:.3f}" + (" (greedy's)" if took.startswith("greedy") else "")


def markdown(rows: list[dict], command: str) -> str:
    lines = ["## Several resources at once: ILP against greedy", "",
             f"`{command}` ({time.strftime('%Y-%m-%d')}). Budgets are fractions of the uniform w8a8 plan's "
             "totals on the same cost model. *objective*: summed single-layer KL on the calibration crops (the "
             "table both solvers see; greedy's as a ratio to the ILP's optimum). *ILP reranked*: the ILP's best "
             "plans and greedy's measured whole on held-out calibration crops, the closest to float kept "
             "(`--rerank`; *(greedy's)* where that was greedy's plan). "
             "Fidelity: top-1 agreement / softmax KL against float on the evaluation set, plans exported with "
             "nearest rounding (no GPTQ, no transforms). *only X / only greedy*: images only that plan keeps at "
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
                   for row in rows if row not in infeasible)
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
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--write", type=Path, help="write the markdown here (benchmarks/resources.md)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} (choose from {', '.join(CASES)})")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        rows += bench_model(name, cases, args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    text = markdown(rows, "python tools/bench_resources.py " + " ".join(sys.argv[1:]))
    if args.write:
        from compiler.atomic import atomic_write_text

        atomic_write_text(args.write, "# Multi-resource budgets\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
