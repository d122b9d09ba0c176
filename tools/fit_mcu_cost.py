"""Fit the MCU cost model to the firmware edgeq itself generates: instructions executed in qemu.

The Cortex-M cycle tables edgeq started with priced CMSIS-NN-class kernels (~1.2 cycles
per MAC). The firmware ``edgeq compile --target mcu`` ships is TVM's C for the Cortex-M4
instead, which executes 3.5-8 instructions per MAC at w8a8 (-O3 -funroll-loops): the
allocator was pricing code it does not emit, 3.3-4.1x under.

This tool compiles small float models (one conv, pointwise conv, depthwise conv or Gemm;
two-layer chains; a conv followed by a residual Add, a max pool, a global average pool, a
HardSwish table or a Softmax)
at w8a8 and w4a8 with ``--target mcu``, checks each build bit-exact in qemu, and counts the
guest instructions one ``model_run`` executes (qemu ``-icount``: targets.mcu.qemu). It then
fits, by non-negative least squares of the relative error,

    instructions = sum over layers of  per_mac[kind][bits] * MACs
                                      + per_output_elem * output elements (weighted layers)
                                      + per_layer
                   + per_call

(a weightless kind -- Add, pooling, a lookup table, Softmax -- is priced per MAC alone: its
MACs are its output elements, or the pooling windows' inputs, and an elementwise table costs
under a tenth of a convolution's requantizing epilogue per output)

and writes targets/mcu/cost_table.json, which targets/mcu/cost.py reads. ``--validate``
then compares the fitted model (and the CMSIS-NN-class estimate before it) with whole
models it did not see: the bundled Fashion-MNIST CNN at w8a8 and w4a8 and the MLPerf Tiny
models (models/mlperf_tiny.py). Instruction counts are deterministic, so one sample per
build is enough; cycles on a real core are a separate question (targets/mcu/cost.py).

    python tools/fit_mcu_cost.py [--validate] [--out targets/mcu/cost_table.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from compiler.layers import layer_shapes  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from targets.base import LayerShape  # noqa: E402
from targets.mcu import PROJECT_DIR, input_bytes, qemu  # noqa: E402
from targets.mcu.cost import TABLE, cost_model  # noqa: E402
from tools.fit_cpu_cost import layer_model, relative_nnls, weightless_model  # noqa: E402

BITS = ("w8a8", "w4a8")
# (kind, cin, cout, map size, kernel): the kinds of targets/base.LayerShape the MCU lowering runs
GRID = [
    ("conv", 8, 16, 16, 3), ("conv", 16, 32, 16, 3), ("conv", 32, 32, 8, 3), ("conv", 64, 64, 4, 3),
    ("pointwise", 16, 32, 16, 1), ("pointwise", 32, 64, 16, 1), ("pointwise", 64, 64, 8, 1),
    ("pointwise", 128, 32, 8, 1),
    ("depthwise", 16, 16, 32, 3), ("depthwise", 32, 32, 16, 3), ("depthwise", 64, 64, 8, 3),
    ("depthwise", 128, 128, 4, 3),
    ("gemm", 64, 10, 1, 1), ("gemm", 256, 128, 1, 1), ("gemm", 512, 256, 1, 1), ("gemm", 1024, 64, 1, 1),
]
# two layers of one shape: separates the per-layer cost from the per-call one
CHAINS = [("pointwise", 32, 32, 8, 1), ("depthwise", 32, 32, 8, 3)]
# a pointwise conv followed by a weightless layer the MCU runs: ("after", op, channels, map size)
WEIGHTLESS = [("after", "Add", 32, 16), ("after", "Add", 64, 8), ("after", "MaxPool", 32, 16),
              ("after", "MaxPool", 64, 8), ("after", "GlobalAveragePool", 32, 16),
              ("after", "GlobalAveragePool", 64, 8), ("after", "HardSwish", 32, 16), ("after", "HardSwish", 64, 8),
              ("after", "Softmax", 32, 16), ("after", "Softmax", 64, 8)]


def measure(model: onnx.ModelProto, bits: str, work: Path, stem: str,
            calib: dict[str, np.ndarray] | None = None) -> dict:
    """Compile ``model`` for the MCU at ``bits``, run it in qemu: instructions of one model_run, the
    layers' shapes and bits as compiled, and whether the firmware matched the reference bit for bit."""
    path = work / f"{stem}.onnx"
    onnx.save(model, str(path))
    out = work / f"out_{stem}_{bits}"
    data = {"calib_data": calib} if calib is not None else {"random_calib": 8}
    result = compile_model(CompileOptions(model=str(path), target="mcu", bits=bits, out_dir=str(out), progress=False,
                                          **data))
    plan = result.plan
    shapes = layer_shapes(result.float_model, list(plan.layers))
    layers = [{"node": name, "kind": shapes[name].kind, "macs": shapes[name].macs,
               "output_elems": shapes[name].output_elems, "w_bits": layer.w_bits, "a_bits": layer.a_bits}
              for name, layer in plan.layers.items()]
    value = model.graph.input[0]
    sample_shape = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
    samples = (calib[value.name][:1] if calib is not None
               else np.random.default_rng(1).standard_normal((1, *sample_shape)).astype(np.float32))
    instructions = qemu.instructions_per_sample(out / PROJECT_DIR, input_bytes(out, {value.name: samples}))[0]
    verify = json.loads((out / "verify.json").read_text())
    return {"model": stem, "bits": bits, "instructions": int(instructions), "layers": layers,
            "bit_exact": bool(verify.get("bit_exact"))}


def _columns(measurements: list[dict]) -> list[tuple[str, ...]]:
    """The fit's unknowns: MACs per (kind, bits) of weighted kinds, per kind of weightless ones."""
    keys = set()
    for m in measurements:
        for layer in m["layers"]:
            keys.add(_mac_key(layer))
    return [*sorted(keys), ("output_elem",), ("layer",), ("call",)]


def _mac_key(layer: dict) -> tuple[str, ...]:
    return (layer["kind"], f"w{layer['w_bits']}a{layer['a_bits']}") if layer["w_bits"] else (layer["kind"],)


def fit(measurements: list[dict]) -> dict:
    """NNLS of the relative error over every build; the table targets/mcu/cost.py reads."""
    columns = _columns(measurements)
    index = {key: i for i, key in enumerate(columns)}
    matrix = np.zeros((len(measurements), len(columns)))
    for row, m in enumerate(measurements):
        for layer in m["layers"]:
            matrix[row, index[_mac_key(layer)]] += layer["macs"]
            if layer["w_bits"]:  # a weighted layer's epilogue; a weightless kind's own price covers its outputs
                # (targets/mcu/cost.py prices them the same way)
                matrix[row, index[("output_elem",)]] += layer["output_elems"]
            matrix[row, index[("layer",)]] += 1
        matrix[row, index[("call",)]] = 1
    target = np.array([m["instructions"] for m in measurements], dtype=np.float64)
    solution = relative_nnls(matrix, target)
    predicted = matrix @ solution
    errors = np.abs(predicted / target - 1)
    per_mac: dict[str, dict[str, float] | float] = {}
    for key, value in zip(columns, solution, strict=False):
        if len(key) == 2:
            per_mac.setdefault(key[0], {})[key[1]] = round(float(value), 4)  # type: ignore[index]
        elif key[0] not in ("output_elem", "layer", "call"):
            per_mac[key[0]] = round(float(value), 4)
    return {
        "instructions_per_mac": per_mac,
        "instructions_per_output_elem": round(float(solution[index[("output_elem",)]]), 4),
        "instructions_per_layer": round(float(solution[index[("layer",)]]), 1),
        "instructions_per_call": round(float(solution[index[("call",)]]), 1),
        "fit_error": {"median": round(float(np.median(errors)), 4), "max": round(float(errors.max()), 4)},
    }


def predicted_instructions(entry: dict, table: dict) -> float:
    """A build's instructions by ``table`` (the Cortex-M4 model: one instruction per cycle)."""
    model = cost_model("cortex-m4", table=table)
    total = 0.0
    for layer in entry["layers"]:
        shape = LayerShape(layer["node"], "", layer["kind"], layer["macs"], 1 if layer["w_bits"] else 0, 0,
                           layer["output_elems"])
        total += model.instructions(shape, layer["w_bits"], layer["a_bits"])
    return total + table["instructions_per_call"]


def single_layer_builds(work: Path) -> list[dict]:
    builds = []
    points = [(point, 1) for point in GRID] + [(point, 2) for point in CHAINS] + [(point, 1) for point in WEIGHTLESS]
    for point, layers in points:
        for bits in BITS:
            stem = "_".join(map(str, point)) + f"_x{layers}"
            if point[0] == "after":
                model = weightless_model(point[1], point[2], point[3])
            else:
                kind, cin, cout, size, kernel = point
                model = layer_model("dense" if kind in ("conv", "pointwise") else kind, cin, cout, size, kernel,
                                    layers=layers)
            started = time.perf_counter()
            entry = measure(model, bits, work, stem)
            print(f"{stem} {bits}: {entry['instructions']:,} instructions, bit-exact {entry['bit_exact']}, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            if entry["bit_exact"]:
                builds.append(entry)
    return builds


def validation_builds(work: Path) -> list[dict]:
    """Whole models the fit did not see: the bundled CNN (w8a8, w4a8) and the MLPerf Tiny models (w8a8)."""
    from models import bundled, mlperf_tiny

    calib = bundled.calibration_data()
    entries = [measure(onnx.load(str(bundled.model_path())), bits, work, "fashion_cnn",
                       {name: value[:64] for name, value in calib.items()}) for bits in BITS]
    for name in mlperf_tiny.MODELS:
        model = onnx.load(str(mlperf_tiny.build(name)))  # as shipped: the classifiers end in their Softmax
        entries.append(measure(model, "w8a8", work, name, mlperf_tiny.sample_inputs(name)))
    return entries


def validation_rows(entries: list[dict], table: dict) -> list[dict]:
    """Each whole model's measured and predicted instructions, and its layers (to price them otherwise)."""
    return [{**entry, "predicted": round(predicted := predicted_instructions(entry, table)),
             "error": round(predicted / entry["instructions"] - 1, 3)} for entry in entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true", help="then compare with whole models it did not see")
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        builds = single_layer_builds(Path(tmp))
        table = fit(builds)
        table["source"] = (f"tools/fit_mcu_cost.py ({time.strftime('%Y-%m-%d')}): {len(builds)} bit-exact builds "
                           "of one or two layers, instructions per model_run in qemu-system-arm mps2-an386 "
                           "(-icount), NNLS of the relative error")
        table["measurements"] = builds
        if args.validate:
            table["validation"] = validation_rows(validation_builds(Path(tmp)), table)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({k: v for k, v in table.items() if k != "measurements"}, indent=1))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
