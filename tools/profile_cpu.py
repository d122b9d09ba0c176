"""Time each kernel of a compiled CPU library in place, beside the cost model's per-layer prediction.

The CPU cost model is fitted on layers built alone (tools/fit_cpu_cost.py) and
checked on whole models (tools/validate_cpu_cost.py); this tool says which
layers of *your* model it gets wrong. It loads ``OUT/cpu`` (``edgeq compile
--target cpu``), runs the library on one random sample at ``--threads``
threads, and times every call the Relax VM makes through its instrument hook
(``VirtualMachine.set_instrument``): median over ``--runs`` calls of the
model. The hook itself costs microseconds per call (Python is called before and
after each): the library's call is also timed without it, and the difference,
spread evenly over the calls, is taken off each kernel's time (an estimate: the
hook's cost is not the same for every call).

Each kernel is matched to its plan layer (the integer graph names a node after
its float layer) and priced with ``targets.cpu.cost`` at the layer's planned bits.

    python tools/profile_cpu.py out/                  # the 15 costliest kernels
    python tools/profile_cpu.py out/ --all --json profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kernel_layers(out_dir: Path) -> dict[str, str]:
    """Kernel symbol (``k{index}_{op}``, as targets/cpu/lower names them) -> integer-graph node name."""
    import onnx

    from targets.cpu.lower import kernel_symbol
    from targets.tvm_ops import node_kernels, tensor_types

    int_model = onnx.load(str(out_dir / "model.int.onnx"))
    return {kernel_symbol(index, kernel.node): kernel.node.name
            for index, kernel in enumerate(node_kernels(int_model, tensor_types(int_model)))}


def time_in_place(out_dir: Path, runs: int) -> tuple[dict[str, tuple[float, float]], float]:
    """Each VM call's symbol -> (median seconds per model call, calls per model call: the runtime's
    alloc_tensor is called once per intermediate tensor), and the whole call's seconds without the hook."""
    import tvm

    from targets.cpu import runner

    module = runner.load(out_dir)
    rng = np.random.default_rng(0)
    feed = {entry["name"]: rng.standard_normal([1, *entry["shape"][1:]]).astype(np.float32)
            for entry in module.manifest["inputs"]}
    args = module.quantize(feed, 0)
    for _ in range(10):
        module.main(*args)
    plain = []
    for _ in range(runs):
        start = time.perf_counter()
        module.main(*args)
        plain.append(time.perf_counter() - start)
    started: list[float] = [0.0]
    calls: dict[str, list[float]] = defaultdict(list)

    def hook(func, symbol, before_run, ret_value, *call_args) -> int:
        if before_run:
            started[0] = time.perf_counter()
        else:
            calls[symbol].append(time.perf_counter() - started[0])
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    module.vm.set_instrument(tvm.runtime.convert(hook))
    for _ in range(runs):
        module.main(*args)
    return ({symbol: (float(np.median(times)) * len(times) / runs, len(times) / runs)
             for symbol, times in calls.items()}, float(np.median(plain)))


def predictions(out_dir: Path, model_path: Path | None) -> dict[str, tuple[str, float]]:
    """Plan layer name -> (its bits, as "w8a16", and its predicted seconds under the CPU cost model)."""
    from compiler.layers import layer_shapes
    from compiler.loader import load_model
    from compiler.plan import QuantPlan
    from passes.allocate import choice_label
    from passes.canonicalize import canonicalize
    from targets.cpu.cost import CpuCostModel

    plan = QuantPlan.load(str(out_dir / "plan.json"))
    path = model_path or Path(plan.model)
    if not path.exists():
        raise SystemExit(f"the float model {path} is not there: pass --model")
    shapes = layer_shapes(canonicalize(load_model(path)), list(plan.layers))
    cost_model = CpuCostModel()
    result = {}
    for name, layer in plan.layers.items():
        w_bits = layer.w_bits if shapes[name].weight_params else None
        result[name] = (choice_label((w_bits, layer.a_bits)),
                        cost_model.layer_cost(shapes[name], w_bits, layer.a_bits).latency_s)
    return result


def layer_of(node_name: str, layers: list[str]) -> str | None:
    """The plan layer an integer-graph node comes from: the longest layer name it starts with."""
    found = [name for name in layers if node_name == name or node_name.startswith(name + "_")]
    return max(found, key=len) if found else None


def profile(out_dir: Path, runs: int = 50, model_path: Path | None = None) -> dict:
    measured, plain_s = time_in_place(out_dir, runs)
    nodes = kernel_layers(out_dir)
    predicted = predictions(out_dir, model_path)
    layers = list(predicted)
    rows = []
    for symbol, (seconds, calls) in measured.items():
        node = nodes.get(symbol)
        layer = layer_of(node, layers) if node else None
        bits, predicted_s = predicted.get(layer, (None, None)) if layer else (None, None)
        rows.append({"kernel": symbol, "node": node, "layer": layer, "bits": bits, "calls": calls,
                     "measured_s": seconds, "predicted_s": predicted_s})
    hooked_sum_s = sum(row["measured_s"] for row in rows)
    hook_s = max(0.0, (hooked_sum_s - plain_s) / max(sum(row["calls"] for row in rows), 1))
    for row in rows:
        row["measured_s"] = max(row["measured_s"] - hook_s * row["calls"], 0.0)
    rows.sort(key=lambda row: -row["measured_s"])
    return {"runs": runs, "threads": int(os.environ.get("TVM_NUM_THREADS", "0")), "library_call_s": plain_s,
            "hooked_sum_s": hooked_sum_s, "hook_per_call_s": hook_s, "rows": rows}


def table(result: dict, limit: int | None) -> str:
    lines = ["| kernel | layer | bits | in place | predicted | error |", "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"][:limit]:
        predicted = row["predicted_s"]
        error = f"{predicted / row['measured_s'] - 1:+.0%}" if predicted and row["measured_s"] > 0 else ""
        lines.append(f"| {row['kernel']} | {row['layer'] or row['node'] or '(runtime)'} | {row['bits'] or ''} | "
                     f"{row['measured_s'] * 1e6:.1f} us | {'' if predicted is None else f'{predicted * 1e6:.1f} us'}"
                     f" | {error} |")
    priced = [row for row in result["rows"] if row["predicted_s"] is not None]
    lines += ["", f"Library call {result['library_call_s'] * 1e6:.0f} us without the hook, "
              f"{result['hooked_sum_s'] * 1e6:.0f} us summed over its "
              f"{sum(row['calls'] for row in result['rows']):.0f} VM calls with it "
              f"(median of {result['runs']} calls, {result['threads']} thread(s)); "
              f"{result['hook_per_call_s'] * 1e6:.1f} us taken off each call. The {len(priced)} priced layers: "
              f"{sum(r['measured_s'] for r in priced) * 1e6:.0f} us in place, "
              f"{sum(r['predicted_s'] for r in priced) * 1e6:.0f} us predicted."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="an edgeq compile --target cpu output folder")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="TVM threads (default 1, as the cost model prices)")
    parser.add_argument("--model", type=Path, help="the float model (default: the path plan.json records)")
    parser.add_argument("--all", action="store_true", help="every kernel, not the 15 costliest")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from targets.cpu import runner

    runner.configure_threads(args.threads)
    result = profile(args.out, args.runs, args.model)
    print(table(result, None if args.all else 15))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
