"""The MCU memory planner: liveness, order search and arena packing.

Graphs here only need shapes and dtypes (the planner never looks at values), so
they are built with generic ops whose memory behaviour is known: ``MaxPool`` /
``Concat`` write a fresh buffer, ``Reshape`` aliases, ``QAdd`` may run in place.
"""

from __future__ import annotations

import itertools
import random

import onnx
import pytest
from onnx import TensorProto, helper

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
