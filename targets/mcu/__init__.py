"""The ``mcu`` target: a standalone C project for Cortex-M microcontrollers.

Lowering (``lower``): the integer graph gets a static memory plan
(:mod:`targets.mcu.memory`), one TVM PrimFunc per computing node (from
:mod:`targets.tvm_ops`, built with TVM's C codegen), and a generated runner
(:mod:`targets.mcu.codegen`) -- written to ``out/mcu/`` and built with
arm-none-eabi-gcc into ``firmware.elf`` plus a native ``host_runner``.
``out/mcu/memory.json`` reports flash (arm-none-eabi-size), the arena and a
stack estimate; ``out/mcu/io.json`` the I/O quantization the runner needs.

Running (``run``): inputs are quantized like the graph's ``Quantize``, fed to
the firmware in qemu-system-arm (``on="qemu"``, default) or to the host build
(``on="host"``), and the integer outputs are dequantized like its
``Dequantize``.  ``run_raw`` gives the integer outputs for bit-exact checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler.atomic import atomic_dir, atomic_write_text
from compiler.console import warn
from compiler.errors import EdgeqError
from compiler.graph import attribute, graph_input_names, graph_output_names, initializer_array
from compiler.intgraph import INT_DOMAIN
from compiler.requant import dequantize_linear, dtype_range, quantize_linear
from targets.base import CompileContext, Target, compare_integer_outputs, latency_summary
from targets.mcu import codegen, qemu
from targets.mcu.cost import DEFAULT_DEVICE, McuPreset, cost_model
from targets.mcu.memory import ALIAS_OPS, MemoryPlan, activation_types, ordered_nodes, plan_memory

PROJECT_DIR = "mcu"
IO_FILE = "io.json"
MEMORY_FILE = "memory.json"
INT_MODEL_FILE = "model.int.onnx"
VERIFY_FILE = "verify.json"
VERIFY_SAMPLES = 8  # calibration samples run in qemu at compile time


# --------------------------------------------------------------------------- I/O quantization


def _boundary(int_model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    found = [n for n in int_model.graph.node if n.domain == INT_DOMAIN and n.op_type == op]
    if len(found) != 1:
        raise EdgeqError(f"the mcu target needs exactly one {op} in the integer graph (found {len(found)})")
    return found[0]


def _input_quant(node: onnx.NodeProto, dtype: str) -> dict:
    """The Quantize node's parameters (compiler.interpreter's attribute names)."""
    lo, hi = dtype_range(dtype)
    return {
        "scale": float(attribute(node, "scale")),
        "zero_point": int(attribute(node, "y_zero_point", 0)),
        "qmin": int(attribute(node, "y_min", lo)),
        "qmax": int(attribute(node, "y_max", hi)),
        "dtype": dtype,
    }


def quantize(x: np.ndarray, q: dict) -> np.ndarray:
    """The graph's input Quantize (ONNX QuantizeLinear, as the reference interpreter does it)."""
    return quantize_linear(x, q["scale"], q["zero_point"], q["qmin"], q["qmax"], q["dtype"])


def dequantize(values: np.ndarray, q: dict) -> np.ndarray:
    return dequantize_linear(values, q["scale"], q["zero_point"])


# --------------------------------------------------------------------------- kernels


def graph_kernels(int_model: onnx.ModelProto, nodes: list[onnx.NodeProto], types: dict,
                  packed: frozenset[str] = frozenset()) -> list[codegen.Kernel]:
    """One :class:`codegen.Kernel` per computing node, in ``nodes`` order, from targets.tvm_ops;
    the weights named in ``packed`` are read as packed int4 (targets.mcu.packing)."""
    from targets.mcu import packing

    kernels = []
    for index, node in enumerate(nodes):
        if node.op_type in ALIAS_OPS:
            continue
        func, args, *extra = packing.node_primfunc(int_model, node, types, packed)
        symbol = f"k{index}_{codegen.c_name(node.op_type.lower())}"
        kernels.append(codegen.Kernel(symbol, func, list(args), dict(extra[0]) if extra else {}))
    return kernels


# --------------------------------------------------------------------------- target


class McuTarget(Target):
    name = "mcu"
    run_options = frozenset({"on"})  # qemu (the firmware) or host (the same C, built natively)
    needs_integer_graph = True

    def lower(self, ctx: CompileContext) -> list[Path]:
        int_model = ctx.int_model
        if int_model is None:
            from passes.integerize import integerize

            int_model = integerize(onnx.load(str(ctx.qdq_model_path)))
        build = ctx.options.get("build_firmware", True)
        written = lower_int_model(int_model, Path(ctx.out_dir) / PROJECT_DIR, build=build,
                                  device=ctx.options.get("device"))
        samples = ctx.options.get("verify_samples") or VERIFY_SAMPLES
        if build and ctx.calib_inputs:
            # Like the cpu target: the firmware itself, in qemu, against the interpreter.
            first = {name: np.asarray(value)[:samples] for name, value in ctx.calib_inputs.items()}
            report = self.verify(Path(ctx.out_dir), first, int_model, on="qemu")
            if not report["bit_exact"]:
                warn(f"mcu build differs from the reference interpreter on {report['mismatched_values']} "
                     f"values (see verify.json)")
            written.append(Path(ctx.out_dir) / VERIFY_FILE)
        return written

    def measure_latency(self, out_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """The firmware's instructions for the first sample, counted in qemu (``-icount``), at the
        clock of the device it was compiled for: qemu has no timing model, and on a Cortex-M cycles
        are at least the instructions (targets/mcu/cost.py), so this is a lower bound of the
        latency, priced the way the cost model prices it."""
        project = Path(out_dir) / PROJECT_DIR
        if not (project / "firmware.elf").exists():
            return None
        preset = _device_preset(project)
        sample = {name: np.asarray(value)[:1] for name, value in inputs.items()}
        instructions = qemu.instructions_per_sample(project, input_bytes(out_dir, sample))[0]
        return {"median_ms": preset.seconds(instructions) * 1e3, "runs": 1, "instructions": int(instructions), "where": "in qemu",
                "how": f"{instructions:,} instructions of the firmware for one sample at the {preset.name} preset's "
                       f"{preset.clock_hz / 1e6:g} MHz; a lower bound: cycles >= instructions"}

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        inputs = self.check_inputs(out_dir, inputs)
        io = _load_io(Path(out_dir) / PROJECT_DIR)
        raw = self.run_raw(out_dir, inputs, **options)
        return {io["output"]["name"]: dequantize(raw, io["output"])}

    def run_raw(self, out_dir: Path, inputs: dict[str, np.ndarray], on: str = "qemu",
                timeout_s: float = 600.0, **_: Any) -> np.ndarray:
        """Integer outputs (sample axis first) of the built project on ``inputs``."""
        project = Path(out_dir) / PROJECT_DIR
        io = _load_io(project)
        payload = input_bytes(out_dir, inputs)
        samples = len(payload) // max(int(np.prod(io["input"]["shape"][1:])) * np.dtype(io["input"]["dtype"]).itemsize, 1)
        if on == "qemu":
            out_bytes = qemu.run_qemu(project, payload, timeout_s)
        elif on == "host":
            out_bytes = qemu.run_host(project, payload, timeout_s)
        else:
            raise EdgeqError(f"unknown place to run the mcu build: '{on}' (qemu or host)")
        out = np.frombuffer(out_bytes, dtype=io["output"]["dtype"])
        return out.reshape((samples, *io["output"]["shape"][1:]))

    def benchmark(self, out_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 5,
                  **options: Any) -> dict[str, Any]:
        """Executed guest instructions per inference (the cycle proxy; qemu has no timing model)
        and qemu's wall time per sample, labelled as emulator time."""
        import time

        project = Path(out_dir) / PROJECT_DIR
        inputs = self.check_inputs(out_dir, inputs)
        one = input_bytes(out_dir, {k: np.asarray(v)[:1] for k, v in inputs.items()})
        instructions = qemu.instructions_per_sample(project, one)[0]
        times = []
        for _ in range(max(repeat, 1)):
            start = time.perf_counter()
            qemu.run_qemu(project, one)
            times.append(time.perf_counter() - start)
        preset = _device_preset(project)
        return latency_summary(times, instructions_per_inference=instructions,
                               runtime="qemu-system-arm mps2-an386: wall time of the emulator "
                                       "(includes its start-up), not of a Cortex-M4",
                               device=preset.name,
                               device_ms_at_least=preset.seconds(instructions) * 1e3)

    def verify(self, out_dir: Path, inputs: dict[str, np.ndarray], int_model: onnx.ModelProto | None = None,
               on: str = "qemu", **options: Any) -> dict:
        """Compare the build's integer outputs with the reference interpreter, bit for bit;
        writes ``out_dir/verify.json``."""
        from compiler.interpreter import run_integer_graph_raw

        project = Path(out_dir) / PROJECT_DIR
        if int_model is None:
            int_model = onnx.load(str(project / INT_MODEL_FILE))
        io = _load_io(project)
        name = io["output"]["name"]
        got = self.run_raw(out_dir, inputs, on=on, **options)
        expected = np.asarray(run_integer_graph_raw(int_model, inputs)[name]).reshape(got.shape)
        comparison = compare_integer_outputs({name: got}, {name: expected.astype(got.dtype)})
        report = {"target": "mcu", "on": on, "samples": int(got.shape[0]), **comparison["outputs"][name]}
        atomic_write_text(Path(out_dir) / VERIFY_FILE, json.dumps(report, indent=2) + "\n")
        return report


def lower_int_model(int_model: onnx.ModelProto, project: Path, build: bool = True,
                    device: str | None = None) -> list[Path]:
    """Plan, generate and (optionally) build the C project of ``int_model`` in ``project`` (for the
    ``device`` preset, recorded in io.json: the latency check prices its instructions at that clock)."""
    from targets.mcu.packing import packed_weight_names

    types = activation_types(int_model)
    plan = plan_memory(int_model, types)
    packed = packed_weight_names(int_model)
    kernels = graph_kernels(int_model, ordered_nodes(int_model, plan, types), types, packed)
    paths = write_and_build(project, int_model, plan, types, kernels, build=build, packed=packed, device=device)
    onnx.save(int_model, str(project / INT_MODEL_FILE))
    return [*paths, project / INT_MODEL_FILE]


def input_bytes(out_dir: Path, inputs: dict[str, np.ndarray]) -> bytes:
    """The quantized input samples as the firmware reads them (concatenated, row-major)."""
    io = _load_io(Path(out_dir) / PROJECT_DIR)
    name = io["input"]["name"]
    if name not in inputs:
        raise EdgeqError(f"inputs lack '{name}' (the model's input)")
    x = np.asarray(inputs[name])
    per_sample = tuple(io["input"]["shape"][1:])
    if tuple(x.shape[1:]) != per_sample:
        raise EdgeqError(f"input '{name}' has shape {list(x.shape)}; expected [N, {', '.join(map(str, per_sample))}]")
    return quantize(x, io["input"]).tobytes()


def _device_preset(project: Path) -> McuPreset:
    """The cost-model preset of the device the project was compiled for (io.json; older builds: the default)."""
    return cost_model(_load_io(project).get("device")).preset


def _load_io(project: Path) -> dict:
    path = project / IO_FILE
    if not path.exists():
        raise EdgeqError(f"{project} has no {IO_FILE}: compile with '--target mcu' first")
    return json.loads(path.read_text())


def write_and_build(project_dir: Path, int_model: onnx.ModelProto, plan: MemoryPlan, types: dict,
                    kernels: list[codegen.Kernel], build: bool = True,
                    packed: frozenset[str] = frozenset(), device: str | None = None) -> list[Path]:
    """Write the C project (atomically), build it and write memory.json / io.json. The
    weights named in ``packed`` are stored two int4 values per byte (the kernels must
    come from :func:`graph_kernels` with the same names)."""
    from targets.mcu.packing import pack_int4

    weight_op = {node.input[1]: node.op_type for node in int_model.graph.node if len(node.input) > 1}
    weights = {}
    for kernel in kernels:
        for name in kernel.args:
            value = initializer_array(int_model, name)
            if value is not None:
                weights[name] = pack_int4(value, weight_op[name]) if name in packed else value
    in_node, out_node = _boundary(int_model, "Quantize"), _boundary(int_model, "Dequantize")
    in_shape, in_dtype = types[plan.input_tensor]
    out_shape, out_dtype = types[plan.output_tensor]
    io = {
        "input": {"name": graph_input_names(int_model)[0], "shape": list(in_shape),
                  **_input_quant(in_node, in_dtype)},
        "output": {"name": graph_output_names(int_model)[0], "shape": list(out_shape),
                   "dtype": out_dtype,
                   "scale": float(attribute(out_node, "scale")),
                   "zero_point": int(attribute(out_node, "zero_point", 0))},
        "device": (device or DEFAULT_DEVICE).lower(),
    }
    spec = codegen.ProjectSpec(plan, types, weights, io["input"], io["output"])
    with atomic_dir(project_dir) as tmp:
        written = codegen.write_project(tmp, spec, kernels)
        (tmp / IO_FILE).write_text(json.dumps(io, indent=2) + "\n")
        (tmp / "memory_plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    paths = [project_dir / p.relative_to(tmp) for p in written]
    paths += [project_dir / IO_FILE, project_dir / "memory_plan.json"]
    if build:
        qemu.build(project_dir)
        report = memory_report(project_dir, plan, weights, int_model, kernels, packed)
        atomic_write_text(project_dir / MEMORY_FILE, json.dumps(report, indent=2) + "\n")
        paths.append(project_dir / MEMORY_FILE)
    return paths


def memory_report(project_dir: Path, plan: MemoryPlan, weights: dict[str, np.ndarray],
                  int_model: onnx.ModelProto, kernels: list[codegen.Kernel],
                  packed: frozenset[str] = frozenset()) -> dict:
    """memory.json: flash and RAM of the ARM build, the arena plan, a stack estimate."""
    firmware = qemu.arm_size([project_dir / "firmware.elf"])
    model_objects = [project_dir / "build" / "arm" / name for name in qemu.MODEL_OBJECTS]
    model = qemu.arm_size(model_objects)
    stack = qemu.stack_usage(project_dir)
    kernel_stack = max((stack.get(f"__tvm_ffi_{k.symbol}", 0) for k in kernels), default=0)
    run_stack = stack.get("model_run", 0) + kernel_stack
    w_bits = {}
    for node in int_model.graph.node:
        bits = attribute(node, "w_bits")
        if bits is not None and len(node.input) > 1:
            w_bits[node.input[1]] = int(bits)
    stored = sum(int(v.nbytes) for v in weights.values())  # packed int4 arrays at their packed size
    if_packed = sum(
        int(v.nbytes) if name in packed or name not in w_bits else (int(v.size) * w_bits[name] + 7) // 8
        for name, v in weights.items()
    )
    return {
        "flash_bytes": firmware["text"] + firmware["data"],
        "flash_bytes_model_only": model["text"] + model["data"],
        "flash_counted_by": "arm-none-eabi-size text+data; flash_bytes is firmware.elf (model + qemu test harness), "
                            "flash_bytes_model_only the model's objects (model.o weights.o kernels.o edgeq_runtime.o)",
        "arena_bytes": plan.arena_bytes,
        "peak_live_bytes": plan.peak_live_bytes,
        "greedy_by_size_arena_bytes": plan.greedy_arena_bytes,
        "sram_static_bytes_model": model["data"] + model["bss"],
        "stack_bytes_model_run": run_stack,
        "stack_estimate": "gcc -fstack-usage: model_run frame + the largest kernel frame (kernels call nothing)",
        "weight_bytes": stored,
        "weight_bytes_if_packed": if_packed,
        "int4_packed": bool(packed),
        "int4_weight_tensors": len(packed),
        "int4_note": "weights with w_bits=4 are stored two per byte (low nibble first, one byte-aligned row "
                     "per output channel) and unpacked in the kernels' MAC loops; weight_bytes_if_packed is "
                     "what packing every sub-8-bit weight would store",
        "kernels": len(kernels),
    }


TARGET = McuTarget()
