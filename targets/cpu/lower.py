"""Lower the integer graph to one TVM Relax module and a shared library for a CPU.

The module's ``main`` is the *integer core*: it takes the quantized inputs
(the outputs of the graph's ``Quantize`` nodes) and returns, as a tuple, the
integer tensors that the graph's ``Dequantize`` nodes read. The output edge is
done by the runner with the reference interpreter's own numpy function
(:mod:`compiler.requant`). The input edge is compiled in when the hand-written
kernels are used (:func:`targets.cpu.schedules.quantize_edge`, bit-exact with
:func:`compiler.requant.quantize_linear`; a numpy quantize of a 224x224 image
cost as much as a tenth of MobileNetV2): ``main`` then takes the float input,
and the manifest's input entry says so with ``library_dtype``.

Each integer node becomes one ``call_tir`` of one PrimFunc:

* QConv/QGemm/MaxPool ask :func:`targets.cpu.schedules.schedule_for` first
  (the hand-written kernels; ``None`` means not covered) -- the seam for fast
  kernels. ``use_schedules=False`` skips them; a cross build asks with its own
  target and gets only the portable ones (the VNNI kernels are x86-only).
  They enter the Relax module through :func:`as_opaque_callee`.
* everything else, and uncovered nodes, use :func:`targets.tvm_ops.node_kernels`'
  generic TE compute, whose outer loop is made parallel (:func:`parallelize`).

Weights, biases and requantization constants are Relax constants: they are
stored inside the exported library.

Artifacts (``out_dir/cpu/``): ``lib.so`` for the host CPU (``-mcpu`` asked
from LLVM: ``tvm.target.codegen.llvm_get_system_cpu``) and
``manifest.json``; with ``target_triple`` (e.g. ``aarch64-linux-gnu``) also
``<triple>/lib.so`` built with ``<triple>-gcc`` (Debian package
``gcc-aarch64-linux-gnu``) or, when that compiler is missing,
``<triple>/lib.tar`` (the object files, link them on the board).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax, s_tir, tirx

from compiler.atomic import atomic_write_text
from compiler.errors import EdgeqError
from compiler.graph import attribute, graph_input_names, initializer_array
from compiler.interpreter import output_sources
from targets.tvm_ops import (
    EDGE_OPS,
    NodeKernel,
    Types,
    fold_into_output,
    node_kernels,
    tensor_types,
)

log = logging.getLogger(__name__)

LIBRARY = "lib.so"
MANIFEST = "manifest.json"
CROSS_CPUS = {"aarch64": "cortex-a72", "arm": "cortex-a7", "riscv64": "generic-rv64"}


@dataclass
class CoreSignature:
    """The integer core's inputs/outputs and how they map to the float graph's."""

    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, core, shape, dtype, quant
    outputs: list[dict[str, Any]] = field(default_factory=list)


def host_target(num_cores: int | None = None) -> dict[str, Any]:
    """Dict target for this machine's CPU ("-mcpu=native" would silently mean generic x86-64)."""
    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": int(num_cores or os.cpu_count() or 1)}


def cross_target(triple: str, mcpu: str | None = None) -> dict[str, Any]:
    """Dict target for another CPU, e.g. ``aarch64-linux-gnu`` (Cortex-A72 unless ``mcpu``)."""
    arch = triple.split("-")[0]
    cpu = mcpu or CROSS_CPUS.get(arch)
    target: dict[str, Any] = {"kind": "llvm", "mtriple": triple}
    if cpu:
        target["mcpu"] = cpu
    return target


def signature(int_model: onnx.ModelProto, types: Types) -> CoreSignature:
    """Which Quantize outputs feed the core and which integer tensors leave it."""
    from passes.integerize import tensor_quant

    quant = tensor_quant(int_model)
    sig = CoreSignature()
    inputs = set(graph_input_names(int_model))
    for node in int_model.graph.node:
        if node.op_type == "Quantize":
            if node.input[0] not in inputs:
                raise EdgeqError(f"Quantize '{node.name}' does not read a graph input")
            core = node.output[0]
            sig.inputs.append({
                "name": node.input[0], "core": core, "shape": list(types[core][0]),
                "dtype": types[core][1], "quant": _edge_quant(node, quant.get(core)),
            })
    sources = output_sources(int_model)
    dequantizers = {node.output[0]: node for node in int_model.graph.node if node.op_type == "Dequantize"}
    for name, core in sources.items():
        entry = {"name": name, "core": core, "shape": list(types[core][0]), "dtype": types[core][1]}
        if name in dequantizers:
            node = dequantizers[name]
            entry["quant"] = {"scale": float(attribute(node, "scale")),
                              "zero_point": int(attribute(node, "zero_point"))}
        sig.outputs.append(entry)
    return sig


def _edge_quant(node: onnx.NodeProto, recorded: dict | None) -> dict[str, Any]:
    dtype = attribute(node, "y_dtype")
    return {"scale": float(attribute(node, "scale")), "zero_point": int(attribute(node, "y_zero_point")),
            "qmin": int(attribute(node, "y_min")), "qmax": int(attribute(node, "y_max")),
            "dtype": dtype.decode() if isinstance(dtype, bytes) else str(dtype)}


def parallelize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Cheap, always-correct schedule for a generic kernel.

    Producers (padding, casts) are inlined, reductions computed under the
    output's loops (:func:`targets.tvm_ops.fold_into_output`: one scalar
    accumulator per output element, or per row, instead of a whole accumulator
    tensor), and the output's outer loops (fused up to the first loop with real
    work) run in parallel.
    """
    sch = s_tir.Schedule(func)
    if not sch.get_child_blocks(sch.get_sblock("root")):
        return func
    # TE puts reduction loops innermost, and a per-row reduction sits under its row loop:
    # only the leading loops that hold nothing else may be fused and run in parallel
    output, free = fold_into_output(sch)
    loops = sch.get_loops(output)[:free]
    outer = []
    for loop in loops:
        outer.append(loop)
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm) or extent.value > 1:
            break
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return sch.mod["main"]


# OpPatternKind::kOpaque of Relax: FuseOps leaves a function with this op_pattern alone.
OPAQUE_PATTERN = 8
SCHEDULED_OPS = ("QConv", "QGemm", "MaxPool", "QAdd", "QLookup")


def as_opaque_callee(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """A hand-written PrimFunc in the form Relax's passes expect of a ``call_tir`` callee.

    The kernels are plain loop nests (no blocks); Relax's ``RewriteDataflowReshape``
    asks every single-input callee whether it is a reshape and that analysis requires
    the body to be one root ``SBlockRealize`` (it aborted on the bare MaxPool kernel).
    The body is wrapped in an empty root block (no iteration, lowered away), and the
    function is marked opaque so that ``AnnotateTIROpPattern`` / ``FuseOps`` never
    try to fuse it with its neighbours.
    """
    if not isinstance(func.body, s_tir.SBlockRealize):
        root = s_tir.SBlock(iter_vars=[], reads=[], writes=[], name_hint="root", body=func.body)
        func = func.with_body(s_tir.SBlockRealize(iter_values=[], predicate=True, block=root))
    return func.with_attr("op_pattern", OPAQUE_PATTERN)


def scheduled_kernel(node: onnx.NodeProto, types: Types, int_model: onnx.ModelProto,
                     target: dict[str, Any] | None = None):
    """The hand-written kernel (:mod:`targets.cpu.schedules`) for ``node`` -- an op of
    ``SCHEDULED_OPS`` or the float input edge (``Quantize``) -- on ``target`` (``None``: this
    machine), or None."""
    from targets.cpu import schedules

    x_shape, x_dtype = types[node.input[0]]
    if node.op_type not in SCHEDULED_OPS and not (node.op_type == "Quantize" and x_dtype == "float32"):
        return None
    constants = {name: initializer_array(int_model, name) for name in node.input if name}
    initializers = {name: value for name, value in constants.items() if value is not None}
    operands = [name for name in node.input if name in types]
    return schedules.schedule_for(node, [types[name][0] for name in operands], None, initializers,
                                  [types[name][1] for name in operands], target=target)


def build_relax_module(int_model: onnx.ModelProto, types: Types | None = None, use_schedules: bool = True,
                       target: dict[str, Any] | None = None
                       ) -> tuple[tvm.IRModule, CoreSignature, dict[str, int]]:
    """The Relax module of the integer core for ``target`` (``None``: this machine), its
    signature and how many kernels of each kind."""
    types = types or tensor_types(int_model)
    sig = signature(int_model, types)
    inits = {init.name for init in int_model.graph.initializer}
    # The input edge (Quantize) as a kernel of the library: main then takes the float input.
    edges = {}
    if use_schedules:
        for node in int_model.graph.node:
            if node.op_type == "Quantize":
                scheduled = scheduled_kernel(node, types, int_model, target)
                if scheduled is not None:
                    edges[node.output[0]] = scheduled
    for entry in sig.inputs:
        if entry["core"] in edges:
            entry["library_dtype"] = types[entry["name"]][1]
    bb = relax.BlockBuilder()
    params = [relax.Var(_var_name(entry["core"]),
                        relax.TensorType(entry["shape"], entry.get("library_dtype", entry["dtype"])))
              for entry in sig.inputs]
    env: dict[str, relax.Expr] = {}
    counts: dict[str, int] = {}
    with bb.function("main", params):
        with bb.dataflow():
            for entry, param in zip(sig.inputs, params, strict=True):
                edge = edges.get(entry["core"])
                if edge is None:
                    env[entry["core"]] = param
                    continue
                gvar = bb.add_func(as_opaque_callee(edge.func).with_attr("global_symbol", "quantize_edge"),
                                   "quantize_edge")
                env[entry["core"]] = bb.emit(
                    relax.call_tir(gvar, [param], relax.TensorType(list(edge.out_shape), edge.out_dtype)))
                counts[edge.variant] = counts.get(edge.variant, 0) + 1
            for index, kernel in enumerate(node_kernels(int_model, types)):
                node = kernel.node
                out_shape, out_dtype = types[node.output[0]]
                scheduled = scheduled_kernel(kernel.node, types, int_model, target) if use_schedules else None
                if scheduled is not None:
                    func = as_opaque_callee(scheduled.func)
                    args = [*(env[name] for name in node.input[:scheduled.inputs]),
                            *[relax.const(c, str(c.dtype)) for c in scheduled.constants]]
                    counts[scheduled.variant] = counts.get(scheduled.variant, 0) + 1
                else:
                    func = parallelize(kernel.func)
                    args = [_arg(name, env, kernel, int_model, inits) for name in kernel.args[:-1]]
                    counts[f"generic_{node.op_type}"] = counts.get(f"generic_{node.op_type}", 0) + 1
                symbol = kernel_symbol(index, node)
                gvar = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
                env[node.output[0]] = bb.emit(
                    relax.call_tir(gvar, args, relax.TensorType(list(out_shape), out_dtype)))
            missing = [entry["core"] for entry in sig.outputs if entry["core"] not in env]
            if missing:
                raise EdgeqError(f"outputs {missing} are not computed by the integer core")
            result = bb.emit_output(relax.Tuple([env[entry["core"]] for entry in sig.outputs]))
        bb.emit_func_output(result)
    return bb.get(), sig, counts


def kernel_symbol(index: int, node: onnx.NodeProto) -> str:
    """The library's name for the kernel of the ``index``-th node kernel (tools/profile_cpu.py reads it)."""
    return f"k{index}_{_var_name(node.op_type.lower())}"


def _arg(name: str, env: dict, kernel: NodeKernel, int_model: onnx.ModelProto, inits: set[str]) -> relax.Expr:
    if name in env:
        return env[name]
    value = kernel.constants.get(name)
    if value is None and name in inits:
        value = initializer_array(int_model, name)
    if value is None:
        raise EdgeqError(f"{kernel.node.op_type} '{kernel.node.name}': input '{name}' is not computed")
    return relax.const(np.ascontiguousarray(value), value.dtype.name)


def _var_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"t_{cleaned}"


def compile_library(mod: tvm.IRModule, target: dict[str, Any], path: Path) -> Path:
    """Build ``mod`` for ``target`` and export it to ``path`` (.so, or .tar of objects)."""
    executable = relax.build(mod, target=tvm.target.Target(target))
    triple = target.get("mtriple")
    if triple is None:
        executable.export_library(str(path))
        return path
    compiler = shutil.which(f"{triple}-gcc")
    if compiler is None:
        path = path.with_suffix(".tar")
        log.warning("%s-gcc not found: exporting object files to %s", triple, path)
        executable.export_library(str(path))
        return path
    from tvm.support import cc

    executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    return path


def lower_to_dir(int_model: onnx.ModelProto, cpu_dir: Path, target_triple: str | None = None,
                 use_schedules: bool = True, mcpu: str | None = None) -> dict[str, Any]:
    """Build the host library (and a cross-compiled one) and the manifest into ``cpu_dir``."""
    started = time.perf_counter()
    cpu_dir.mkdir(parents=True, exist_ok=True)
    types = tensor_types(int_model)
    mod, sig, counts = build_relax_module(int_model, types, use_schedules=use_schedules)
    host = host_target()
    compile_library(mod, host, cpu_dir / LIBRARY)
    manifest: dict[str, Any] = {
        "target": "cpu", "format": 1, "library": LIBRARY, "tvm_target": host,
        "inputs": sig.inputs, "outputs": sig.outputs, "kernels": counts, "cross": [],
    }
    if target_triple:
        # The VNNI kernels are x86-only (LLVM aborts on their intrinsics for another
        # architecture): the cross build asks for the kernels of its own target.
        cross = cross_target(target_triple, mcpu)
        mod, _, cross_counts = build_relax_module(int_model, types, use_schedules=use_schedules, target=cross)
        (cpu_dir / target_triple).mkdir(parents=True, exist_ok=True)
        path = compile_library(mod, cross, cpu_dir / target_triple / LIBRARY)
        manifest["cross"].append({"triple": target_triple, "tvm_target": cross, "kernels": cross_counts,
                                  "library": str(path.relative_to(cpu_dir))})
    manifest["compile_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_text(cpu_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def core_nodes(int_model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes the library runs (everything but the float edges)."""
    return [node for node in int_model.graph.node if node.op_type not in EDGE_OPS]
