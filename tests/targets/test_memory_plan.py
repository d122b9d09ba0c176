"""The MCU memory planner: liveness, order search and arena packing.

Graphs here only need shapes and dtypes (the planner never looks at values), so
they are built with generic ops whose memory behaviour is known: ``MaxPool`` /
``Concat`` write a fresh buffer, ``Reshape`` aliases, ``QAdd`` may run in place.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets.mcu.memory import plan_memory


def _graph(nodes: list[tuple[str, str, list[str]]], sizes: dict[str, int], output: str) -> onnx.ModelProto:
    """nodes: (op, output, inputs); tensor sizes in bytes (int8, shape [1, size])."""
    onnx_nodes = [
        helper.make_node("Quantize", ["x_float"], ["x"], name="quant", domain="edgeq"),
        *[
            helper.make_node(op, inputs, [out], name=f"n_{out}", domain="edgeq" if op.startswith("Q") else "")
            for op, out, inputs in nodes
        ],
        helper.make_node("Dequantize", [output], ["y_float"], name="dequant", domain="edgeq"),
    ]
    infos = [helper.make_tensor_value_info(t, TensorProto.INT8, [1, s]) for t, s in sizes.items()]
    graph = helper.make_graph(
        onnx_nodes,
        "g",
        [helper.make_tensor_value_info("x_float", TensorProto.FLOAT, [1, sizes["x"]])],
        [helper.make_tensor_value_info("y_float", TensorProto.FLOAT, [1, sizes[output]])],
        value_info=infos,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgeq", 1)])


def _random_dag(rng: random.Random, n: int) -> tuple[list, dict[str, int], str]:
    sizes = {"x": 4 * rng.randint(1, 16)}
    nodes, tensors = [], ["x"]
    for i in range(n):
        k = 1 if len(tensors) == 1 or rng.random() < 0.6 else 2
        inputs = rng.sample(tensors, k)
        out = f"t{i}"
        sizes[out] = 4 * rng.randint(1, 16)
        nodes.append(("MaxPool" if k == 1 else "Concat", out, inputs))
        tensors.append(out)
    # every tensor must reach the output: a final node reads all dangling tensors
    read = {name for _, _, inputs in nodes for name in inputs}
    dangling = [t for t in tensors if t not in read]
    sizes["out"] = 4
    nodes.append(("Concat", "out", dangling))
    return nodes, sizes, "out"


def _brute_force_peak(nodes, sizes, output, order) -> int:
    """Peak bytes live while running ``order``: inputs and output of the running node plus every
    earlier tensor that a later node (or the graph output) still needs."""
    peak = 0
    for step, index in enumerate(order):
        later = {name for i in order[step:] for name in nodes[i][2]}
        produced = {"x"} | {nodes[i][1] for i in order[: step + 1]}
        live = {t for t in produced if t in later or t == output or t == nodes[index][1]}
        peak = max(peak, sum(sizes[t] for t in live))
    return peak


def _topological_orders(nodes):
    produced_by = {out: i for i, (_, out, _) in enumerate(nodes)}
    for perm in itertools.permutations(range(len(nodes))):
        position = {node: p for p, node in enumerate(perm)}
        if all(
            position[produced_by[name]] < position[i]
            for i, (_, _, inputs) in enumerate(nodes)
            for name in inputs
            if name in produced_by
        ):
            yield list(perm)


def _check_no_overlap(plan) -> None:
    for a, b in itertools.combinations(plan.buffers, 2):
        if a.last < b.first or b.last < a.first:
            continue
        assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)


@pytest.mark.parametrize("seed", range(12))
def test_order_search_finds_brute_force_minimum_peak(seed: int) -> None:
    rng = random.Random(seed)
    nodes, sizes, output = _random_dag(rng, rng.randint(3, 6))
    plan = plan_memory(_graph(nodes, sizes, output))
    index_of = {f"n_{out}": i for i, (_, out, _) in enumerate(nodes)}
    order = [index_of[name] for name in plan.order]
    assert plan.peak_live_bytes == _brute_force_peak(nodes, sizes, output, order)
    best = min(_brute_force_peak(nodes, sizes, output, o) for o in _topological_orders(nodes))
    assert plan.peak_live_bytes == best
    assert plan.arena_bytes >= plan.peak_live_bytes
    assert plan.arena_bytes <= plan.greedy_arena_bytes
    _check_no_overlap(plan)


def test_chain_arena_equals_peak() -> None:
    sizes = {"x": 40, "a": 100, "b": 12, "c": 64, "d": 8}
    nodes = [("MaxPool", "a", ["x"]), ("MaxPool", "b", ["a"]), ("MaxPool", "c", ["b"]), ("MaxPool", "d", ["c"])]
    plan = plan_memory(_graph(nodes, sizes, "d"))
    assert plan.peak_live_bytes == max(sizes[p] + sizes[q] for p, q in zip("xabc", "abcd", strict=True))
    assert plan.arena_bytes == plan.peak_live_bytes
    _check_no_overlap(plan)


def test_reshape_aliases_and_add_runs_in_place() -> None:
    sizes = {"x": 64, "a": 64, "r": 64, "s": 64, "y": 16}
    nodes = [
        ("MaxPool", "a", ["x"]),
        ("Reshape", "r", ["a"]),
        ("QAdd", "s", ["r", "x"]),
        ("MaxPool", "y", ["s"]),
    ]
    plan = plan_memory(_graph(nodes, sizes, "y"))
    assert plan.offsets["r"] == plan.offsets["a"]
    assert plan.offsets["s"] in (plan.offsets["a"], plan.offsets["x"])
    # x and a live together (64 + 64), s reuses one of them, y (16) needs s alive
    assert plan.peak_live_bytes == 128
    assert plan.arena_bytes == 128


def test_branch_order_lowers_peak() -> None:
    """Two branches off x, listed breadth first: finishing one branch before starting the other
    keeps only one big intermediate alive."""
    sizes = {"x": 8, "a1": 100, "a2": 4, "b1": 100, "b2": 4, "out": 4}
    nodes = [
        ("MaxPool", "a1", ["x"]),
        ("MaxPool", "b1", ["x"]),
        ("MaxPool", "a2", ["a1"]),
        ("MaxPool", "b2", ["b1"]),
        ("Concat", "out", ["a2", "b2"]),
    ]
    plan = plan_memory(_graph(nodes, sizes, "out"))
    file_order_peak = _brute_force_peak(nodes, sizes, "out", [0, 1, 2, 3, 4])
    assert plan.peak_live_bytes < file_order_peak
    assert plan.peak_live_bytes == min(
        _brute_force_peak(nodes, sizes, "out", o) for o in _topological_orders(nodes)
    )


def _integerized(float_model: onnx.ModelProto, inputs: dict):
    """canonicalize -> layer selection -> calibration -> QDQ -> integer graph, as the pipeline does."""
    from compiler.calibrate import collect_ranges
    from passes.canonicalize import canonicalize
    from passes.insert_qdq import quantize_model, tensors_to_calibrate
    from passes.integerize import integerize
    from passes.select_layers import select_layers

    model = canonicalize(float_model)
    plan = select_layers(model, integer_only=True, activation_signed=True)
    names = tensors_to_calibrate(model, plan, integer_only=True)
    ranges = collect_ranges(model, inputs, names, bits=8, signed=True, progress=False)
    return model, plan, integerize(quantize_model(model, plan, ranges, integer_only=True))


def _allocator_peak(model, plan) -> tuple[int, int]:
    """Peak live bytes the bit allocator's SRAM constraint computes (all layers at a8)."""
    from passes.allocate import buffer_bytes, execution_buffers

    steps, buffers, _ = execution_buffers(model, plan, integer_only=True)
    choices = {name: (8, 8) for name in plan.layers}
    live = [0] * len(steps)
    for buffer in buffers:
        for step in range(buffer.first_step, buffer.last_step + 1):
            live[step] += buffer_bytes(buffer, choices)
    return max(live), len(steps)


def _chain_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["out"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [w("w1", (8, 3, 3, 3)), w("b1", (8,)), w("w2", (16, 8, 3, 3)), w("b2", (16,)), w("w3", (4, 16, 1, 1)),
         w("b3", (4,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_allocator_sram_liveness_agrees_on_a_chain() -> None:
    """No alias, no in-place, one order: the allocator's peak and the plan's must be equal."""
    model, plan, int_model = _integerized(_chain_model(), {"input": np.random.default_rng(1).normal(
        0, 1, (8, 3, 12, 12)).astype(np.float32)})
    allocator_peak, _ = _allocator_peak(model, plan)
    assert plan_memory(int_model).peak_live_bytes == allocator_peak == 8 * 12 * 12 + 16 * 6 * 6


def test_allocator_sram_liveness_bounds_the_plan() -> None:
    """With a residual Add (in place here) and a Flatten (an alias here) the plan needs at most
    what the allocator budgets."""
    from tests.tiny_models import random_inputs, tiny_cnn

    model, plan, int_model = _integerized(tiny_cnn(), {"input": random_inputs((3, 16, 16), 8)})
    allocator_peak, _ = _allocator_peak(model, plan)
    memory = plan_memory(int_model)
    assert memory.peak_live_bytes <= allocator_peak
    assert memory.arena_bytes == memory.peak_live_bytes
