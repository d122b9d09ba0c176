"""Measure the CPU target's generated code layer by layer, then fit the CPU cost model.

For a grid of single-layer float models (3x3 / 1x1 convs, depthwise convs, a
fully connected layer) at each activation width the CPU lowering handles, the
model goes through the real pipeline (``compiler.pipeline.compile_model`` with
``--target cpu``: QDQ, integer graph, TVM build, bit-exact verification) and
``targets.cpu`` times the library (median of ``--repeat`` runs of one sample,
including the runner's input quantize / output dequantize, which the fitted
overhead term absorbs).

The fit is non-negative least squares of
``latency = overhead + seconds_per_mac[kind][w,a] * macs + seconds_per_byte * bytes``
over all measurements; the table (with the host, the measurements and the
fit's relative errors) is written to targets/cpu/cost_table.json, which
targets/cpu/cost.py reads. Single-thread latencies (``TVM_NUM_THREADS=1`` unless
set): with 2 threads on this 2-vCPU VM some single-layer libraries stall ~4 ms per
run waking TVM's worker, which no linear model of the code can fit. 4-bit weights are stored as int8 in the integer
graph (passes/integerize.py), so the CPU kernels -- and their times -- are
those of 8-bit weights: the table says so rather than measuring them twice.

    python tools/fit_cpu_cost.py            # minutes: one TVM build per point
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM's pool starts: see the docstring

from compiler.layers import layer_shapes  # noqa: E402
from targets.cost_common import traffic_bytes  # noqa: E402

# (kind, in channels, out channels, spatial size, kernel) ; gemm: (kind, K, N, 1, 1)
GRID = [
    ("conv", 16, 32, 32, 3), ("conv", 32, 64, 16, 3), ("conv", 64, 64, 8, 3),
    ("conv", 32, 64, 32, 1), ("conv", 128, 128, 8, 1),
    ("depthwise", 32, 32, 32, 3), ("depthwise", 128, 128, 16, 3),
    ("gemm", 512, 256, 1, 1), ("gemm", 1280, 1000, 1, 1),
]


def single_layer_model(kind: str, cin: int, cout: int, size: int, kernel: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    if kind == "gemm":
        weight = rng.standard_normal((cout, cin)).astype(np.float32) / np.sqrt(cin)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1)]
        x_shape, y_shape = ["N", cin], ["N", cout]
    else:
        group = cin if kind == "depthwise" else 1
        weight = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32)
        weight /= np.sqrt(cin // group * kernel * kernel)
        pad = kernel // 2
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="layer", group=group,
                                  pads=[pad] * 4),
                 helper.make_node("Relu", ["c"], ["y"], name="relu")]
        x_shape, y_shape = ["N", cin, size, size], ["N", cout, size, size]
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, "b")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def measure(point, bits: str, repeat: int, work: Path) -> dict:
    from compiler.pipeline import CompileOptions, compile_model
    from targets.cpu import TARGET

    model = single_layer_model(*point)
    path = work / f"{'_'.join(map(str, point))}.onnx"
    onnx.save(model, str(path))
    out = work / f"out_{path.stem}_{bits}"
    start = time.perf_counter()
    compile_model(CompileOptions(model=str(path), random_calib=16, target="cpu", bits=bits,
                                 out_dir=str(out), progress=False))
    build_s = time.perf_counter() - start
    verify = json.loads((out / "verify.json").read_text())
    x_shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    timing = TARGET.benchmark(out, {"x": x}, repeat=repeat)
    shape = layer_shapes(model)["layer"]
    w_bits, a_bits = (int(part) for part in bits[1:].split("a"))
    return {"kind": point[0], "point": list(point), "bits": [w_bits, a_bits], "macs": shape.macs,
            "bytes": traffic_bytes(shape, w_bits, a_bits), "median_s": timing["median_ms"] / 1e3,
            "bit_exact": verify["bit_exact"], "build_s": round(build_s, 1)}


def fit(measurements: list[dict]) -> dict:
    from scipy.optimize import nnls

    keys = sorted({(m["kind"], f"{m['bits'][0]},{m['bits'][1]}") for m in measurements})
    rows, targets = [], []
    for m in measurements:
        key = (m["kind"], f"{m['bits'][0]},{m['bits'][1]}")
        rows.append([1.0, m["bytes"]] + [m["macs"] if key == k else 0.0 for k in keys])
        targets.append(m["median_s"])
    matrix, target = np.asarray(rows), np.asarray(targets)
    # Relative error matters (times span three orders of magnitude): weight rows by 1/t.
    weights = 1.0 / target
    solution, _ = nnls(matrix * weights[:, None], target * weights)
    predicted = matrix @ solution
    per_mac: dict[str, dict[str, float]] = {}
    for (kind, pair), value in zip(keys, solution[2:], strict=True):
        per_mac.setdefault(kind, {})[pair] = float(value)
        w, a = pair.split(",")
        if w == "8":  # int4 weights run the int8 kernels (stored as int8 in the integer graph)
            per_mac[kind].setdefault(f"4,{a}", float(value))
    per_mac["default"] = dict(per_mac.get("conv", next(iter(per_mac.values()))))
    relative = np.abs(predicted - target) / target
    return {"seconds_per_mac": per_mac, "seconds_per_byte": float(solution[1]), "overhead_s": float(solution[0]),
            "fit_relative_error": {"median": float(np.median(relative)), "max": float(np.max(relative))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="w8a8,w8a16")
    parser.add_argument("--only", type=int, help="measure only GRID[ONLY] (a quick check)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "targets/cpu/cost_table.json")
    args = parser.parse_args()
    measurements = []
    with tempfile.TemporaryDirectory() as tmp:
        for point in GRID if args.only is None else [GRID[args.only]]:
            for bits in args.bits.split(","):
                try:
                    result = measure(point, bits, args.repeat, Path(tmp))
                except Exception as error:  # noqa: BLE001 - a width the lowering lacks is reported, not fatal
                    print(f"{point} {bits}: not measured ({type(error).__name__}: {str(error)[:120]})", flush=True)
                    continue
                print(result, flush=True)
                if result["bit_exact"]:
                    measurements.append(result)
    table = fit(measurements)
    table.update({
        "source": f"measured by tools/fit_cpu_cost.py on {platform.processor() or platform.machine()} "
                  f"({time.strftime('%Y-%m-%d')}), {len(measurements)} single-layer builds, NNLS fit",
        "info": {"measurements": measurements, "host": platform.platform()},
    })
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({k: v for k, v in table.items() if k != "info"}, indent=1))


if __name__ == "__main__":
    main()
