"""Measure the CPU target's generated code, then fit the CPU cost model.

Four kinds of float model go through the real pipeline
(``compiler.pipeline.compile_model`` with ``--target cpu``: QDQ, integer graph,
TVM build, bit-exact verification -- a build that is not bit-exact is left out
of the fit) at each activation width the CPU lowering handles:

* ``GRID``: single layers of realistic sizes (3x3 convs, 1x1 convs from 16 to 960
  input channels, a first layer on 3 channels, depthwise convs on large and
  small maps, fully connected layers)
  -- they price the MACs and bytes of each layer kind;
* ``CHAINS``: chains of N identical small layers (N in ``CHAIN_LENGTHS``) --
  with them the time that comes once per call of the model (the library call,
  the Relax VM entry, the Python runner around it) separates from the time that
  comes once per layer (one more kernel call). Timing single layers alone, as
  this tool once did, charged the whole call's overhead to the one layer, and
  the cost model then charged it to every layer of a model (36 us x 8 layers
  predicted 0.31 ms for the bundled CNN, which runs in 0.035 ms);
* ``STACKS``: MobileNet-style block stacks (1x1 expand, 3x3 depthwise, 1x1
  project; random weights), each build's layers priced one by one
  (``per_layer``) -- a layer inside a model runs slower than built alone, and
  with these the per-layer terms take that in (the tables fitted without them
  under-predicted the stacks by 7-11% at 8-bit and up to 21% at 16-bit
  activations, whole models by 8-19%);
* ``WEIGHTLESS``: a pointwise conv followed by a residual Add, a max pool, a global
  average pool, a HardSwish table or a Softmax -- each weightless kind priced per
  MAC alone (its MACs are its output elements or its pooling windows' inputs;
  without them those layers took conv's terms, 4-8x under for a wide Softmax or
  a big global average pool);
* ``CONTEXT_MODELS``: whole zoo models (MobileNetV2), compiled at each width
  -- with the terms fitted on the builds above they still ran 7-17% slower
  than predicted, more at 16-bit activations, so the table also gets a
  ``context_factor`` per activation width: NNLS of each whole model's time as
  compile's latency check measures it (``time_context_models``), less its
  per-call cost, on the sums of its layers' predicted times by width; and,
  from the same models' kernels timed in place (tools/profile_cpu.py), a
  ``context_group_factor`` per width and ``targets.cpu.cost.context_group``
  (a layer kind, 1x1 projections apart): how much more or less than the
  model as a whole each group slows down, normalised so that the model's
  total stays as fitted. EfficientNet-Lite0 stays out: tools/validate_cpu_cost.py
  and tools/profile_cpu.py check both on it.

Timing: every build is loaded into this process and the builds take turns
(``--runs`` runs each, in bursts of 10 after 3 untimed runs, the order reversed
every round), so the host's short slow spells fall on every
build alike. Each build is timed three ways: the whole per-sample path
``targets.cpu.runner.benchmark`` (and ``edgeq run --repeat``) times -- float
input copied in, the library (which quantizes its input itself), output
copied out and dequantized in numpy --, the library call alone on an input
already in a TVM tensor (the "core"), and the runner's input step alone.

The fit is non-negative least squares, rows weighted by 1/t (times span three
orders of magnitude), of

1. the runner around the library: input step = ``i0 + e_in * input_elems``,
   whole - core - input step = ``o0 + e_out * output_elems``;
2. the core = ``c_call + overhead_s * layers + seconds_per_byte * bytes +
   q * input_elems + seconds_per_mac[kind][w,a] * macs +
   seconds_per_layer_output_elem[kind][w,a] * output elements +
   seconds_per_channel[kind][w,a] * output channels``.

The table targets/cpu/cost_table.json (read by targets/cpu/cost.py) gets
``call_overhead_s = i0 + o0 + c_call`` and the per-element terms ``e_in + q``,
``e_out`` (charged once per model, through ``CpuCostModel.fixed_costs``),
``overhead_s`` (per layer), ``seconds_per_byte`` and the per-(kind, bit pair)
tables, with the host, the measurements
and the fit's relative errors (whole path and core). Single-thread latencies
(``TVM_NUM_THREADS=1`` unless set): with 2 threads on this 2-vCPU VM some
single-layer libraries stall ~4 ms per run waking TVM's worker, which no linear
model of the code can fit. 4-bit weights are stored as int8 in the integer
graph (passes/integerize.py), so the CPU kernels -- and their times -- are
those of 8-bit weights: the table says so rather than measuring them twice.

    python tools/fit_cpu_cost.py                  # minutes: one TVM build per point
    python tools/fit_cpu_cost.py --context-models ""   # no whole models: no context factor
    python tools/fit_cpu_cost.py --refit          # refit the measurements already in the table
    python tools/validate_cpu_cost.py             # the fitted model against whole models
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM's pool starts: see the docstring

from compiler.layers import layer_shapes  # noqa: E402
from targets.cost_common import traffic_bytes  # noqa: E402
from targets.cpu.cost import cost_kind  # noqa: E402

TABLE = Path(__file__).resolve().parent.parent / "targets/cpu/cost_table.json"

# (kind, in channels, out channels, spatial size, kernel[, stride]) ; gemm: (kind, K, N, 1, 1)
GRID = [
    ("conv", 16, 32, 32, 3), ("conv", 32, 64, 16, 3), ("conv", 64, 64, 8, 3),
    ("conv", 32, 64, 32, 1), ("conv", 128, 128, 8, 1), ("conv", 3, 16, 128, 3),
    ("depthwise", 32, 32, 32, 3), ("depthwise", 128, 128, 16, 3),
    ("depthwise", 96, 96, 56, 3), ("depthwise", 576, 576, 7, 3),
    # strided, as in MobileNetV2: a large input for few MACs (the library quantizes its float
    # input, a cost per input element that stride-1 layers cannot tell from their MACs)
    ("conv", 3, 32, 224, 3, 2), ("depthwise", 96, 96, 112, 3, 2), ("depthwise", 144, 144, 56, 3, 2),
    ("depthwise", 576, 576, 14, 3, 2),
    # 5x5 depthwise (EfficientNet-Lite0): MACs per output element other than 9, so the depthwise MAC
    # and output-element terms can be told apart
    ("depthwise", 240, 240, 14, 5), ("depthwise", 144, 144, 28, 5, 2),
    # 1x1 convs at both ends of MACs per output element, as in MobileNetV2's blocks: an expansion of
    # few channels on a large map (16 MACs per output) and projections of 576 / 960 channels on
    # 14x14 / 7x7 maps -- with only the 32- and 128-channel 1x1 points above, the fit priced
    # output elements too high and MACs too low (MobileNetV2's 960->320 projection: 39 us
    # predicted, 60 us in the compiled model)
    ("conv", 16, 96, 112, 1), ("conv", 576, 96, 14, 1), ("conv", 960, 320, 7, 1), ("conv", 160, 960, 7, 1),
    ("gemm", 512, 256, 1, 1), ("gemm", 1280, 1000, 1, 1),
]
# Small layers (little MAC time) chained N times: the slope over N is the per-layer overhead,
# the intercept the per-call one.
CHAINS = [("conv", 8, 8, 8, 3), ("gemm", 64, 64, 1, 1)]
CHAIN_LENGTHS = (1, 4, 8)
# Stacks of MobileNet-style blocks (1x1 expand x6, 3x3 depthwise, 1x1 project), random weights:
# (channels, map size, blocks). A layer inside a model runs slower than the same layer built
# alone (MobileNetV2's library 3-6% over the sum of its layers alone; the single-layer fit
# under-predicted these stacks by 7-11%); with these in the fit the per-layer terms absorb that.
STACKS = [("stack", 24, 56, 2), ("stack", 32, 28, 3), ("stack", 64, 14, 4), ("stack", 160, 7, 3)]
# Whole zoo models, compiled at each width: what the fitted terms still miss inside a model.
CONTEXT_MODELS = ("mobilenetv2",)
# A pointwise conv followed by a weightless layer: ("after", op, channels, map size), beside the
# same conv alone (WEIGHTLESS_BASE), so that the layer's time is what the two differ by. Each kind
# (targets.cpu.cost.cost_kind: "eltwise", "maxpool", "pool", "lookup", "softmax") is priced per MAC
# alone -- its MACs are its output elements, or its pooling windows' inputs. Before these, every
# weightless layer took conv's terms: in place in a MobileNetV3-style model a 1000-class Softmax
# ran 3.3 us against 0.4 us predicted, a global average pool over 64 x 56 x 56 39 us against
# 7.8 us. Global average pools as networks have them: many channels, small maps.
WEIGHTLESS = [("after", op, channels, size) for op in ("Add", "MaxPool", "HardSwish", "Softmax")
              for channels, size in ((16, 112), (64, 28))] + [
    ("after", "GlobalAveragePool", channels, size) for channels, size in ((64, 28), (320, 7))]
WEIGHTLESS_BASE = [("conv", channels, channels, size, 1) for channels, size in ((16, 112), (64, 28), (320, 7))]
WEIGHTLESS_KINDS = ("eltwise", "pool", "maxpool", "lookup", "softmax")  # targets.cpu.cost.cost_kind
BURST = 10


def conv_relu(rng: np.random.Generator, source: str, suffix: str, out: str, cin: int, cout: int, kernel: int,
               group: int = 1, stride: int = 1) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Conv ``layer{suffix}`` (random weights, "same" padding) + Relu, from ``source`` to ``out``."""
    weight = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32)
    weight /= np.sqrt(cin // group * kernel * kernel)
    nodes = [helper.make_node("Conv", [source, f"w{suffix}", f"b{suffix}"], [f"c{suffix}"], name=f"layer{suffix}",
                              group=group, pads=[kernel // 2] * 4, strides=[stride] * 2),
             helper.make_node("Relu", [f"c{suffix}"], [out], name=f"relu{suffix}")]
    return nodes, [numpy_helper.from_array(weight, f"w{suffix}"),
                   numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"b{suffix}")]


def float_model(nodes: list, inits: list, x_shape: list, y_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def layer_model(kind: str, cin: int, cout: int, size: int, kernel: int, stride: int = 1, seed: int = 0,
                layers: int = 1) -> onnx.ModelProto:
    """``layers`` layers of one shape in a chain (``cin == cout`` and stride 1 when more than one);
    node ``layer`` when alone, else ``layer0`` ... ``layer{N-1}``, each with its own random weights."""
    if layers > 1 and (cin != cout or stride != 1):
        raise ValueError("a chain needs cin == cout and stride 1")
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for index in range(layers):
        suffix = "" if layers == 1 else str(index)
        out = "y" if index == layers - 1 else f"t{index}"
        if kind == "gemm":
            weight = (rng.standard_normal((cout, cin)).astype(np.float32) / np.sqrt(cin)).astype(np.float32)
            nodes.append(helper.make_node("Gemm", [current, f"w{suffix}", f"b{suffix}"], [out], name=f"layer{suffix}",
                                          transB=1))
            inits += [numpy_helper.from_array(weight, f"w{suffix}"),
                      numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"b{suffix}")]
        else:
            conv_nodes, conv_inits = conv_relu(rng, current, suffix, out, cin, cout, kernel,
                                                cin if kind == "depthwise" else 1, stride)
            nodes, inits = nodes + conv_nodes, inits + conv_inits
        current = out
    if kind == "gemm":
        return float_model(nodes, inits, ["N", cin], ["N", cout])
    out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return float_model(nodes, inits, ["N", cin, size, size], ["N", cout, out_size, out_size])


def weightless_model(op: str, channels: int, size: int, seed: int = 0) -> onnx.ModelProto:
    """x -> pointwise conv + Relu -> ``op`` (Add with x itself, a 2x2 MaxPool, a global average pool,
    a HardSwish table, a Softmax over the last axis)."""
    rng = np.random.default_rng(seed)
    nodes, inits = conv_relu(rng, "x", "", "r", channels, channels, 1)
    out_size = {"MaxPool": size // 2, "GlobalAveragePool": 1}.get(op, size)
    if op == "Add":
        nodes.append(helper.make_node("Add", ["r", "x"], ["y"], name="after"))
    elif op in ("HardSwish", "Softmax"):
        nodes.append(helper.make_node(op, ["r"], ["y"], name="after"))
    elif op == "MaxPool":
        nodes.append(helper.make_node("MaxPool", ["r"], ["y"], name="after", kernel_shape=[2, 2], strides=[2, 2]))
    else:
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], ["y"], name="after"))
    return float_model(nodes, inits, ["N", channels, size, size], ["N", channels, out_size, out_size])


def stack_model(kind: str, channels: int, size: int, blocks: int, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` blocks of 1x1 expand (x6), 3x3 depthwise, 1x1 project, each conv + Relu; nodes
    ``layer0`` ... in order (``kind`` is "stack", for the point's tuple)."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    wide = 6 * channels
    layers = [(channels, wide, 1, 1), (wide, wide, 3, wide), (wide, channels, 1, 1)] * blocks
    for index, (cin, cout, kernel, group) in enumerate(layers):
        out = "y" if index == len(layers) - 1 else f"t{index}"
        conv_nodes, conv_inits = conv_relu(rng, current, str(index), out, cin, cout, kernel, group)
        nodes, inits, current = nodes + conv_nodes, inits + conv_inits, out
    shape = ["N", channels, size, size]
    return float_model(nodes, inits, shape, shape)


def _compile(path: Path, bits: str, out: Path) -> tuple[float, bool]:
    """Compile ``path`` for the CPU at ``bits`` into ``out``: (seconds taken, bit-exact)."""
    from compiler.pipeline import CompileOptions, compile_model

    start = time.perf_counter()
    compile_model(CompileOptions(model=str(path), random_calib=16, target="cpu", bits=bits,
                                 out_dir=str(out), progress=False))
    build_s = time.perf_counter() - start
    return round(build_s, 1), json.loads((out / "verify.json").read_text())["bit_exact"]


def _input(model: onnx.ModelProto) -> tuple[str, list[int]]:
    """The model's (first) input: its name and shape at batch 1."""
    value = model.graph.input[0]
    return value.name, [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]


def build(point, bits: str, layers: int, work: Path) -> dict:
    """Compile (and verify) one model; its shapes and where the artifact is."""
    if point[0] == "stack":
        model = stack_model(*point)
    elif point[0] == "after":
        model = weightless_model(*point[1:])
    else:
        model = layer_model(*point, layers=layers)
    stem = f"{'_'.join(map(str, point))}_x{layers}"
    path = work / f"{stem}.onnx"
    onnx.save(model, str(path))
    out = work / f"out_{stem}_{bits}"
    build_s, bit_exact = _compile(path, bits, out)
    priced = [n.name for n in model.graph.node if n.name.startswith("layer") or n.name == "after"]
    shapes = list(layer_shapes(model, priced).values())
    w_bits, a_bits = (int(part) for part in bits[1:].split("a"))
    input_name, x_shape = _input(model)
    return {"kind": shapes[0].kind, "point": list(point), "layers": len(shapes), "bits": [w_bits, a_bits],
            "macs": sum(s.macs for s in shapes), "bytes": sum(traffic_bytes(s, w_bits, a_bits) for s in shapes),
            "input_elems": shapes[0].input_elems, "output_elems": shapes[-1].output_elems,
            "per_layer": [[cost_kind(s), s.macs, s.output_elems, s.output_channels] for s in shapes],
            "bit_exact": bit_exact, "build_s": build_s, "out": str(out), "x_shape": x_shape,
            "input_name": input_name}


def build_context_model(name: str, bits: str, work: Path) -> dict:
    """Compile (and verify) zoo model ``name`` whole; each layer's shape and bits as planned."""
    from compiler.loader import load_model
    from compiler.plan import QuantPlan
    from models import zoo
    from passes.canonicalize import canonicalize

    path = Path(zoo.build(name))
    out = work / f"out_{name}_{bits}"
    build_s, bit_exact = _compile(path, bits, out)
    plan = QuantPlan.load(str(out / "plan.json"))
    model = canonicalize(load_model(path))
    shapes = layer_shapes(model, list(plan.layers))  # in execution order, as the allocator sums them
    input_name, x_shape = _input(model)
    return {"context_model": name, "bits": [int(part) for part in bits[1:].split("a")], "layers": len(shapes),
            "plan_layers": [{"shape": asdict(shapes[layer]),
                             "bits": [plan.layers[layer].w_bits, plan.layers[layer].a_bits]} for layer in plan.layers],
            "bit_exact": bit_exact, "build_s": build_s, "out": str(out), "x_shape": x_shape,
            "input_name": input_name}


def time_builds(builds: list[dict], runs: int) -> None:
    """Median seconds of each build: the whole per-sample path (``median_s``), the library call
    alone (``core_median_s``) and the runner's input step alone (``input_median_s``: the float
    input copied into the library's tensor); the builds take turns in bursts so that slow phases
    of the host fall on all of them."""
    from targets.cpu import runner

    runner.configure_threads()
    timers = []
    for entry in builds:
        module = runner.load(Path(entry["out"]))
        feed = {entry.get("input_name", "x"): np.random.default_rng(1).standard_normal(entry["x_shape"]
                                                                                      ).astype(np.float32)}
        module.samples(feed)
        quantized = module.quantize(feed, 0)
        functions = {"median_s": (lambda m=module, f=feed: m.run_sample(f, 0)),
                     "core_median_s": (lambda m=module, q=quantized: m.main(*q)),
                     "input_median_s": (lambda m=module, f=feed: m.quantize(f, 0))}
        for _ in range(20):
            for function in functions.values():
                function()
        timers.append((entry, functions, {key: [] for key in functions}))
    rounds = max(1, -(-runs // BURST))
    for round_index in range(rounds):
        order = timers if round_index % 2 == 0 else list(reversed(timers))
        for _, functions, seconds in order:
            for key, function in functions.items():
                for _ in range(3):
                    function()
                for _ in range(BURST):
                    start = time.perf_counter()
                    function()
                    seconds[key].append(time.perf_counter() - start)
    for entry, _, seconds in timers:
        entry.update({key: float(np.median(values)) for key, values in seconds.items()})
        entry["runs"] = len(seconds["median_s"])


def time_context_models(builds: list[dict], rounds: int) -> None:
    """Each whole model timed as compile's latency check times it (``CpuTarget.measure_latency``: a
    fresh process, one thread, the lowest of its block medians), ``rounds`` times, the models taking
    turns; ``settled_s`` is the median. Not the bursts of :func:`time_builds`: a model whose weights
    outgrow the caches starts every burst cold after the other builds (MobileNetV2 at w8a8, two fits:
    1.52 and 1.86 ms in bursts, 1.42-1.46 ms timed as compile does)."""
    from targets.cpu import TARGET

    wholes = [m for m in builds if m.get("context_model")]
    for m in wholes:
        m["settled_rounds_s"] = []
    for round_index in range(rounds):
        for m in wholes if round_index % 2 == 0 else list(reversed(wholes)):
            feed = {m["input_name"]: np.random.default_rng(1).standard_normal(m["x_shape"]).astype(np.float32)}
            m["settled_rounds_s"].append(TARGET.measure_latency(Path(m["out"]), feed)["settled_ms"] / 1e3)
    for m in wholes:
        m["settled_s"] = float(np.median(m["settled_rounds_s"]))


def profile_context_models(builds: list[dict], runs: int = 50) -> None:
    """Each whole model's layers timed in place (tools/profile_cpu.py: the Relax VM's instrument hook,
    its cost taken off): ``in_place_s``, plan layer -> seconds per model call."""
    from tools.profile_cpu import profile

    for m in builds:
        if m.get("context_model"):
            in_place: dict[str, float] = {}
            for row in profile(Path(m["out"]), runs)["rows"]:
                if row["layer"]:
                    in_place[row["layer"]] = in_place.get(row["layer"], 0.0) + row["measured_s"]
            m["in_place_s"] = in_place


def relative_nnls(matrix: np.ndarray, target: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Non-negative least squares of the error ratio, symmetric in over- and under-prediction.

    Times span three orders of magnitude, so errors are relative. Weighting rows by 1/t alone
    (relative to the measurement) lets one point the model over-predicts 4x outweigh several it
    under-predicts 2x; reweighting by 1/sqrt(t * predicted) a few times approximates the least
    squares of log(predicted / t), which treats both directions alike."""
    from scipy.optimize import nnls

    target = np.maximum(target, 1e-7)
    predicted = target
    solution = np.zeros(matrix.shape[1])
    for _ in range(iterations):
        weights = 1.0 / np.sqrt(target * predicted)
        solution, _ = nnls(matrix * weights[:, None], target * weights)
        predicted = np.maximum(matrix @ solution, 1e-3 * target)
    return solution


def _errors(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    relative = np.abs(predicted - target) / target
    return {"median": float(np.median(relative)), "max": float(np.max(relative))}


# Per (layer kind, bit pair), the tables of the terms beside the shared ones: each MAC, each output
# element (the epilogue: requantize and store) and each output channel (a depthwise channel's plane
# packed, a tile's constants loaded) cost time of their own.
PER_KEY_TERMS = ("seconds_per_mac", "seconds_per_layer_output_elem", "seconds_per_channel")


def _per_key_quantities(m: dict) -> dict[tuple[str, str], list[float]]:
    """What each of PER_KEY_TERMS multiplies in measurement ``m``, by (layer kind, bit pair): the
    MACs, output elements and output channels of its layers of that kind (``per_layer``; older
    measurements lack it: a chain repeats one layer, whose output channels are the point's third
    entry)."""
    pair = f"{m['bits'][0]},{m['bits'][1]}"
    layers = m.get("per_layer") or [[m["kind"], m["macs"] / m["layers"], m["output_elems"], m["point"][2]]
                                    ] * m["layers"]
    sums: dict[tuple[str, str], list[float]] = {}
    for kind, macs, output_elems, channels in layers:
        if kind in WEIGHTLESS_KINDS:  # priced per MAC alone (WEIGHTLESS)
            output_elems = channels = 0
        total = sums.setdefault((kind, pair), [0.0, 0.0, 0.0])
        for index, value in enumerate((macs, output_elems, channels)):
            total[index] += value
    return sums


def _by_kind(keys: list[tuple[str, str]], values: np.ndarray) -> dict[str, dict[str, float]]:
    """kind -> "w,a" -> coefficient; 4-bit weights take the 8-bit value (they run the int8 kernels,
    stored as int8 in the integer graph), "default" (kinds not measured) takes conv's."""
    table: dict[str, dict[str, float]] = {}
    for (kind, pair), value in zip(keys, values, strict=True):
        table.setdefault(kind, {})[pair] = float(value)
        w, a = pair.split(",")
        if w == "8":
            table[kind].setdefault(f"4,{a}", float(value))
    table["default"] = dict(table.get("conv", next(iter(table.values()))))
    return table


def fit(measurements: list[dict]) -> dict:
    """The two NNLS fits of the module docstring on the layer, chain and stack builds, then the
    context factor on the whole models; the table's coefficients and fit errors."""
    context = [m for m in measurements if m.get("context_model")]
    measurements = [m for m in measurements if not m.get("context_model")]
    whole = np.asarray([m["median_s"] for m in measurements])
    core = np.asarray([m["core_median_s"] for m in measurements])
    # 1. the runner around the library call: its input step, and the rest (output copied out, dequantized)
    input_step = np.asarray([m["input_median_s"] for m in measurements])
    output_step = np.maximum(whole - core - input_step, 1e-7)
    ones = np.ones(len(measurements))
    input_rows = np.column_stack([ones, [m["input_elems"] for m in measurements]])
    output_rows = np.column_stack([ones, [m["output_elems"] for m in measurements]])
    i0, e_in = relative_nnls(input_rows, input_step)
    o0, e_out = relative_nnls(output_rows, output_step)
    e0 = i0 + o0
    # 2. the library call: shared terms, then per (kind, bit pair) ones
    quantities = [_per_key_quantities(m) for m in measurements]
    keys = sorted({key for per_key in quantities for key in per_key})
    rows = []
    for m, per_key in zip(measurements, quantities, strict=True):
        rows.append([1.0, m["layers"], m["bytes"], m["input_elems"]]
                    + [per_key.get(k, [0.0] * len(PER_KEY_TERMS))[term] for term in range(len(PER_KEY_TERMS))
                       for k in keys])
    matrix = np.asarray(rows, dtype=float)
    solution = relative_nnls(matrix, core)
    c_call, per_layer, per_byte, quantize_per_elem = solution[:4]
    core_predicted = matrix @ solution
    whole_predicted = core_predicted + input_rows @ np.asarray([i0, e_in]) + output_rows @ np.asarray([o0, e_out])
    per_key_tables = {}
    for index, table_name in enumerate(PER_KEY_TERMS):
        values = solution[4 + index * len(keys): 4 + (index + 1) * len(keys)]
        per_key_tables[table_name] = _by_kind(keys, values)
    chains = np.asarray([bool(m.get("chain")) for m in measurements])
    a_bits = np.asarray([m["bits"][1] for m in measurements])
    table = {
        **per_key_tables,
        "seconds_per_byte": float(per_byte),
        "overhead_s": float(per_layer),  # per layer (before 2026-11-23 it also held the per-call overhead)
        "call_overhead_s": float(e0 + c_call),  # once per model call
        # once per model: its float input, copied in by the runner and quantized by the library
        "seconds_per_input_elem": float(e_in + quantize_per_elem),
        "seconds_per_output_elem": float(e_out),  # once per model: its output, copied out, dequantized
        "fit_relative_error": _errors(whole_predicted, whole),
        "fit_relative_error_core": _errors(core_predicted, core),
        "fit_relative_error_chains": _errors(whole_predicted[chains], whole[chains]) if chains.any() else None,
        "fit_relative_error_by_a_bits": {str(a): _errors(whole_predicted[a_bits == a], whole[a_bits == a])
                                         for a in sorted(set(a_bits.tolist()))},
        "fit_terms": {"library_call_s": float(c_call), "runner_input_s": float(i0), "runner_output_s": float(o0),
                      "runner_input_per_elem_s": float(e_in), "library_quantize_per_elem_s": float(quantize_per_elem)},
    }
    if context:
        table.update(context_fit(context, table))
    return table


def context_fit(models: list[dict], table: dict) -> dict:
    """``context_factor`` (a_bits -> factor): NNLS of each whole model's measured time less its
    per-call cost on its layers' times as ``table``'s terms price them, summed by activation width;
    ``context_group_factor`` (a_bits -> group -> factor) from the layers timed in place, where the
    models have them; and, per model, the prediction without and with the factors."""
    from scipy.optimize import nnls

    from targets.base import LayerShape
    from targets.cpu.cost import CpuCostModel, coefficients_from_table, context_group

    cost_model = CpuCostModel(coefficients_from_table(table))  # the terms alone: no factors yet
    widths = sorted({layer["bits"][1] for m in models for layer in m["plan_layers"]})
    rows, targets, calls = [], [], []
    in_place_by_group: dict[tuple[int, str], list[float]] = {}  # (a_bits, group) -> [in place, predicted]
    for m in models:
        shapes = [LayerShape(**layer["shape"]) for layer in m["plan_layers"]]
        by_width = dict.fromkeys(widths, 0.0)
        for shape, layer in zip(shapes, m["plan_layers"], strict=True):
            w_bits, a_bits = layer["bits"]
            predicted = cost_model.layer_cost(shape, w_bits, a_bits).latency_s
            by_width[a_bits] += predicted
            seconds = m.get("in_place_s", {}).get(shape.node)
            if seconds is not None and predicted > 0:
                sums = in_place_by_group.setdefault((a_bits, context_group(shape)), [0.0, 0.0])
                sums[0] += seconds
                sums[1] += predicted
        calls.append(cost_model.call_latency_s(shapes))
        rows.append([by_width[a] for a in widths])
        targets.append(m["settled_s"] - calls[-1])
    factors, _ = nnls(np.asarray(rows), np.asarray(targets))
    group_factor: dict[str, dict[str, float]] = {}
    for a_bits in widths:  # each group's in-place/predicted ratio over the whole width's ratio
        groups = {group: sums for (a, group), sums in in_place_by_group.items() if a == a_bits}
        if groups:
            overall = sum(sums[0] for sums in groups.values()) / sum(sums[1] for sums in groups.values())
            group_factor[str(a_bits)] = {group: sums[0] / sums[1] / overall for group, sums in sorted(groups.items())}
    context_factor = {str(a): float(f) for a, f in zip(widths, factors, strict=True) if f > 0}
    fitted = CpuCostModel(coefficients_from_table(
        {**table, "context_factor": context_factor, "context_group_factor": group_factor}))
    return {
        "context_factor": context_factor,
        "context_group_factor": group_factor,
        "context_fit": [{"model": m["context_model"], "bits": m["bits"], "measured_s": m["settled_s"],
                         "predicted_without_factor_s": call + sum(row),
                         "predicted_s": call + sum(fitted.layer_cost(LayerShape(**layer["shape"]), *layer["bits"]
                                                                     ).latency_s for layer in m["plan_layers"])}
                        for m, row, call in zip(models, rows, calls, strict=True)],
    }


def refit(path: Path) -> dict:
    """Fit again from the measurements an existing table holds (no build, no timing)."""
    data = json.loads(path.read_text())
    measurements = data["info"]["measurements"]
    if any("input_median_s" not in m for m in measurements):
        raise SystemExit(f"{path} holds single-layer measurements without core times: measure again")
    table = fit(measurements)
    table.update({"source": data["source"], "info": data["info"]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="w8a8,w8a16")
    parser.add_argument("--only", type=int, help="measure only GRID[ONLY] (a quick check)")
    parser.add_argument("--runs", "--repeat", type=int, default=200, dest="runs",
                        help="timed runs per build (whole path and core each)")
    parser.add_argument("--no-chains", action="store_true", help="single layers only (no per-call term)")
    parser.add_argument("--no-stacks", action="store_true", help="no block stacks (layers priced as built alone)")
    parser.add_argument("--no-weightless", action="store_true",
                        help="no weightless layers (Add, pooling, tables, Softmax take conv's terms)")
    parser.add_argument("--context-models", default=",".join(CONTEXT_MODELS), metavar="NAMES",
                        help="zoo models built whole for the context factor (comma-separated; '' for none)")
    parser.add_argument("--context-rounds", type=int, default=5, help="timings of each whole model")
    parser.add_argument("--refit", nargs="?", const="", metavar="TABLE",
                        help="no measuring: refit the measurements in TABLE (default: --out) and write --out")
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args()
    if args.refit is not None:
        table = refit(Path(args.refit) if args.refit else args.out)
    else:
        points = [(point, 1, False) for point in (GRID if args.only is None else [GRID[args.only]])]
        if not args.no_chains:
            points += [(point, n, True) for point in CHAINS for n in CHAIN_LENGTHS]
        if not args.no_stacks and args.only is None:
            points += [(point, 1, False) for point in STACKS]
        if not args.no_weightless and args.only is None:
            points += [(point, 1, False) for point in WEIGHTLESS_BASE + WEIGHTLESS]
        if args.only is None:
            points += [(name, 0, False) for name in args.context_models.split(",") if name]
        builds = []
        with tempfile.TemporaryDirectory() as tmp:
            for point, layers, chain in points:
                for bits in args.bits.split(","):
                    try:
                        result = (build_context_model(point, bits, Path(tmp)) if isinstance(point, str)
                                  else build(point, bits, layers, Path(tmp)))
                    except Exception as error:  # noqa: BLE001 - a width the lowering lacks is reported, not fatal
                        print(f"{point} x{layers} {bits}: not built ({type(error).__name__}: {str(error)[:120]})",
                              flush=True)
                        continue
                    result["chain"] = chain
                    print(f"built {point} x{layers} {bits}: bit-exact {result['bit_exact']}, {result['build_s']} s",
                          flush=True)
                    if result["bit_exact"]:
                        builds.append(result)
            print(f"timing {len(builds)} builds, {args.runs} runs each ...", flush=True)
            started, load_before = time.perf_counter(), os.getloadavg()[0]
            time_builds(builds, args.runs)
            time_context_models(builds, args.context_rounds)
            profile_context_models(builds)
            load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            print(f"timed in {time.perf_counter() - started:.0f} s, load average {load}", flush=True)
        for entry in builds:
            entry.pop("out")
            entry.pop("x_shape")
            print({k: entry.get(k) for k in ("point", "context_model", "layers", "bits", "median_s", "core_median_s",
                                             "input_median_s")}, flush=True)
        table = fit(builds)
        chains = sum(1 for m in builds if m["chain"])
        wholes = sum(1 for m in builds if m.get("context_model"))
        stacks = sum(1 for m in builds if m.get("point", [""])[0] == "stack")
        weightless = sum(1 for m in builds if m.get("point", [""])[0] == "after")
        table.update({
            "source": f"measured by tools/fit_cpu_cost.py on {platform.processor() or platform.machine()} "
                      f"({time.strftime('%Y-%m-%d')}), {len(builds) - chains - stacks - wholes - weightless} single-layer, "
                      f"{chains} chain, {stacks} block-stack, {weightless} conv + weightless-layer and {wholes} "
                      f"whole-model builds, {args.runs} runs "
                      "each, NNLS fit",
            "info": {"measurements": builds, "host": platform.platform(),
                     "threads": int(os.environ["TVM_NUM_THREADS"]), "load_average": load},
        })
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({k: v for k, v in table.items() if k != "info"}, indent=1))


if __name__ == "__main__":
    main()
