"""The CPU cost model against whole compiled models: predicted vs measured latency, side by side.

For each case (the bundled Fashion-MNIST CNN at w8a8, at w8a16 and under
latency budgets that mix the two; MobileNetV2 at w8a8 unless ``--no-mobilenet``)
this tool (and each ``--zoo`` model: EfficientNet-Lite0, say, which the fit never saw)

1. compiles the model through the CLI, ``edgeq compile MODEL --target cpu ...``
   (which builds the library and verifies it bit-exact against the reference
   interpreter);
2. predicts the plan's latency the way the allocator adds it up: the sum of
   ``CpuCostModel.layer_cost`` over the plan's layers at their chosen bits plus
   ``CpuCostModel.fixed_costs`` (the per-call term), with the fitted table and
   with every ``--also-table`` (e.g. an older fit, for comparison);
3. measures it with ``edgeq run OUT --inputs ONE_SAMPLE.npz --repeat N --json
   --threads 1``, one process per measurement, the cases taking turns for
   ``--rounds`` rounds (order reversed every round: the host's slow phases last
   seconds); the reported figure is the median of the per-round medians, with
   the range of the round medians.

    git show 4f425d7:targets/cpu/cost_table.json > /tmp/old_table.json   # the per-layer-only fit
    python tools/validate_cpu_cost.py --also-table "old per-layer fit=/tmp/old_table.json" --report /tmp/v.md

What it showed (benchmarks/cpu.md): first, a plan mixing widths -71%, because an
8-bit layer feeding a 16-bit one ran the generic 16-bit kernel; then, with the VNNI
kernels reading and writing 16-bit activations and the refit, MobileNetV2 w8a8 -1%,
its `--budget latency=1.5ms` plan -11%, the bundled CNN -15%..-20%; with the
context factor the fit now takes from whole MobileNetV2 builds (2026-11-23), the
bundled CNN -5%..0%, MobileNetV2 -8%..-3% and EfficientNet-Lite0, which the fit
never saw, -13%/-14% (-18%/-19% without the factor; a slow phase of the host).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FASHION = REPO / "models" / "fashion_cnn.onnx"


def cases(mobilenet: bool, budgets: list[str], mobilenet_budgets: list[str] = (), zoo_cases: list[str] = ()
          ) -> list[dict]:
    """(name, model path, edgeq compile arguments); ``zoo_cases``: "NAME" (w8a8) or "NAME:BUDGET"."""
    found = [
        {"name": "fashion_cnn w8a8", "model": FASHION, "args": ["--bits", "w8a8"]},
        {"name": "fashion_cnn w8a16", "model": FASHION, "args": ["--bits", "w8a16"]},
        *({"name": f"fashion_cnn --budget {budget}", "model": FASHION, "args": ["--budget", budget]}
          for budget in budgets),
    ]
    if mobilenet:
        zoo_cases = ["mobilenetv2", *(f"mobilenetv2:{budget}" for budget in mobilenet_budgets), *zoo_cases]
    from models import zoo

    for case in zoo_cases:
        name, _, budget = case.partition(":")
        args = ["--budget", budget] if budget else ["--bits", "w8a8"]
        found.append({"name": f"{name} {budget and '--budget '}{budget or 'w8a8'}", "model": Path(zoo.build(name)),
                      "args": [*args, "--random-calib", "16"]})
    return found


def one_sample(model_path: Path, path: Path) -> None:
    """A real test image for the Fashion-MNIST CNN, a random normal sample otherwise."""
    import onnx

    if model_path == FASHION:
        from models.bundled import preprocess

        np.savez(path, input=preprocess(np.load(REPO / "models" / "data" / "fashion_test.npz")["pixels"][:1]))
        return
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {init.name for init in model.graph.initializer}
    rng = np.random.default_rng(1)
    feed = {}
    for value in model.graph.input:
        if value.name not in inits:
            dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
            feed[value.name] = rng.standard_normal([1, *dims[1:]]).astype(np.float32)
    np.savez(path, **feed)


def predict(out_dir: Path, model_path: Path, tables: dict[str, Path | None]) -> dict:
    """Predicted seconds of the compiled plan under each table (None: the table in the tree), summed by
    the allocator's own code (``problem_from_model`` and ``evaluate``)."""
    from compiler.loader import load_model
    from compiler.plan import QuantPlan
    from passes.allocate import evaluate, problem_from_model
    from passes.canonicalize import canonicalize
    from targets.cpu.cost import CpuCostModel, load_coefficients

    plan = QuantPlan.load(str(out_dir / "plan.json"))
    model = canonicalize(load_model(model_path))
    pairs = sorted({(layer.w_bits or layer.a_bits, layer.a_bits) for layer in plan.layers.values()})
    result: dict = {"layers": len(plan.layers),
                    "a16_layers": sum(1 for layer in plan.layers.values() if layer.a_bits > 8), "predicted_s": {}}
    for label, path in tables.items():
        cost_model = CpuCostModel(load_coefficients(path) if path else None)
        problem = problem_from_model(model, plan, cost_model, pairs=pairs)
        choices = {layer.name: (plan.layers[layer.name].w_bits if layer.weight_params else None,
                                plan.layers[layer.name].a_bits) for layer in problem.layers}
        totals = evaluate(problem, choices)
        result["predicted_s"][label] = totals["latency_s"]
        result["macs"] = totals["macs"]
        if path is None:
            result["fixed_s"] = problem.fixed.get("latency_s", 0.0)
    allocation = plan.totals.get("allocation")
    if allocation:  # what the allocator itself estimated at compile time (the same sum)
        result["allocator_estimate_s"] = allocation["totals"].get("latency_s")
    return result


def measure(out_dir: Path, inputs: Path, repeat: int) -> tuple[float, float]:
    """(median, 10th percentile) seconds of one ``edgeq run --repeat`` process."""
    done = subprocess.run(["edgeq", "run", str(out_dir), "--inputs", str(inputs), "--repeat", str(repeat),
                           "--json", "--threads", "1"], capture_output=True, text=True, check=True)
    timing = json.loads(done.stdout)
    return timing["median_ms"] / 1e3, timing["p10_ms"] / 1e3


def table_lines(results: list[dict], labels: list[str]) -> list[str]:
    head = ["case", "layers (a16)", "MMACs"] + [f"predicted, {label}" for label in labels] + \
           ["measured median (round range)", "measured p10", "error, " + labels[0]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        measured = r["measured_s"]
        cells = [r["name"], f"{r['layers']} ({r['a16_layers']})", f"{r['macs'] / 1e6:.1f}"]
        cells += [f"{r['predicted_s'][label] * 1e3:.4f} ms" for label in labels]
        cells.append(f"{measured * 1e3:.4f} ms ({min(r['round_s']) * 1e3:.4f}-{max(r['round_s']) * 1e3:.4f})")
        cells.append(f"{r['p10_s'] * 1e3:.4f} ms")
        cells.append(f"{(r['predicted_s'][labels[0]] - measured) / measured:+.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--also-table", action="append", default=[], metavar="LABEL=PATH",
                        help="predict with this cost table too (repeatable)")
    parser.add_argument("--budget", action="append", metavar="BUDGET",
                        help="a Fashion-MNIST case under this budget (repeatable; default: latency=1ms, the "
                             "budget the audit used, and latency=0.2ms, which mixes widths more)")
    parser.add_argument("--repeat", type=int, default=200, help="runs per edgeq run (its --repeat)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-mobilenet", action="store_true")
    parser.add_argument("--mobilenet-budget", action="append", metavar="BUDGET",
                        help="a MobileNetV2 case under this budget (repeatable; default: latency=110%%, 10%% "
                             "over the all-8-bit plan as predicted -- the issue's example, latency=1.5ms, was that "
                             "on the host of the first fits; an absolute budget follows the host's speed)")
    parser.add_argument("--zoo", action="append", default=[], metavar="NAME[:BUDGET]",
                        help="also a zoo model, at w8a8 or under BUDGET (repeatable; e.g. efficientnet_lite0, "
                             "whose layers the fit's grid only resembles)")
    parser.add_argument("--work", type=Path, help="folder for the artifacts (default: a temp dir)")
    parser.add_argument("--report", type=Path, help="write the markdown section here")
    args = parser.parse_args(argv)
    tables: dict[str, Path | None] = {"this fit": None}
    for item in args.also_table:
        label, _, path = item.partition("=")
        tables[label] = Path(path)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeq_validate_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    budgets = args.budget or ["latency=1ms", "latency=0.2ms"]
    mobilenet_budgets = args.mobilenet_budget or ["latency=110%"]
    for index, case in enumerate(cases(not args.no_mobilenet, budgets, mobilenet_budgets, args.zoo)):
        out = work / f"case{index}"
        started = time.perf_counter()
        subprocess.run(["edgeq", "compile", str(case["model"]), "--target", "cpu", *case["args"], "-o", str(out),
                        "-q"], check=True, stdout=subprocess.DEVNULL)
        verify = json.loads((out / "verify.json").read_text())
        inputs = work / f"case{index}.npz"
        one_sample(case["model"], inputs)
        entry = {"name": case["name"], "command": " ".join(["edgeq compile", str(case["model"].name), "--target cpu",
                                                            *case["args"]]),
                 "compile_s": round(time.perf_counter() - started, 1), "bit_exact": verify["bit_exact"],
                 "out": out, "inputs": inputs, **predict(out, case["model"], tables), "round_s": [], "round_p10_s": []}
        print(f"[{entry['name']}] compiled in {entry['compile_s']} s, bit-exact {entry['bit_exact']}, predicted "
              + ", ".join(f"{k} {v * 1e3:.4f} ms" for k, v in entry["predicted_s"].items()), flush=True)
        results.append(entry)
    loads = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for entry in results if round_index % 2 == 0 else list(reversed(results)):
            median, p10 = measure(entry["out"], entry["inputs"], args.repeat)
            entry["round_s"].append(median)
            entry["round_p10_s"].append(p10)
            print(f"[{entry['name']}] round {round_index}: {entry['round_s'][-1] * 1e3:.4f} ms", flush=True)
    for entry in results:
        entry["measured_s"] = float(np.median(entry["round_s"]))
        entry["p10_s"] = float(np.median(entry["round_p10_s"]))
    labels = list(tables)
    import tvm

    lines = [
        "## CPU cost model vs whole models (tools/validate_cpu_cost.py)",
        "",
        f"`python tools/validate_cpu_cost.py {shlex.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} vCPUs, LLVM mcpu "
        f"`{tvm.target.codegen.llvm_get_system_cpu()}`), {time.strftime('%Y-%m-%d')}, load average "
        f"{min(loads):.1f}-{max(loads):.1f}. Predicted: the plan's per-layer costs plus the per-call cost, as the "
        f"allocator sums them. Measured: `edgeq run OUT --inputs <one sample> --repeat {args.repeat} --json "
        f"--threads 1` (float in, float out), median of {args.rounds} rounds' medians (and of their 10th "
        "percentiles), the cases taking turns; error = predicted / measured median - 1.",
        "",
        *table_lines(results, labels),
        "",
    ]
    for r in results:
        estimate = r.get("allocator_estimate_s")
        lines.append(f"- {r['name']}: `{r['command']} -o OUT -q`, compiled in {r['compile_s']} s, bit-exact "
                     f"{r['bit_exact']}; per-call part of the prediction {r['fixed_s'] * 1e3:.4f} ms"
                     + (f"; allocator's own estimate {estimate * 1e3:.4f} ms" if estimate else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)
    summary = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in results]
    (work / "validate.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
