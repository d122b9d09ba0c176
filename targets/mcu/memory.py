"""Static activation-memory plan for the MCU target.

Every integer activation of the graph lives in one byte arena, at an offset
fixed at compile time.  The plan is made in three steps:

1. Buffers.  Each activation tensor gets a buffer.  Pure reshapes
   (Reshape/Flatten/Squeeze/Unsqueeze/Identity) *alias* their input: same bytes,
   no kernel.  Elementwise ops (QAdd, QMul, Requantize) may write *in place* over
   an input that dies at that node, when the element count matches and the
   output element is not wider than the input element (the kernels walk both
   tensors in the same order, so each input element is read before the bytes
   over it are written).
2. Execution order.  The live bytes at each step depend on the order the
   nodes run in.  ``best_order`` searches topological orders exactly by dynamic
   programming over the sets of executed nodes (the live set is a function of
   the executed set), minimising the peak live bytes; when a graph has too many
   such sets it falls back to the best of a few DFS orders.
3. Offsets.  Buffers with overlapping lifetimes must not overlap in the arena.
   ``pack_best_fit`` places buffers one at a time into the smallest free gap
   that fits (best fit), trying several placement orders (size, lifetime
   length, size x length, start) and keeping the smallest arena.  The naive
   baseline ``pack_greedy_by_size`` is TFLite Micro's GreedyMemoryPlanner idea:
   largest first, lowest offset that fits.  ``peak_live_bytes`` (the most bytes
   live at once) is a lower bound for any packing; when arena == peak the
   packing is optimal.

``plan_memory(int_model)`` returns a :class:`MemoryPlan`.  The mixed-precision
allocator's SRAM constraint is meant to be the same ``peak_live_bytes``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from compiler.data import input_sample_dims
from compiler.errors import EdgeqError
from compiler.graph import graph_input_names, graph_output_names, value_shapes
from compiler.intgraph import INT_DOMAIN

log = logging.getLogger(__name__)

ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
INPLACE_OPS = frozenset({"QAdd", "QMul", "Requantize"})
BOUNDARY_OPS = frozenset({"Quantize", "Dequantize"})
ALIGN = 4
MAX_DP_STATES = 200_000

_ONNX_DTYPE = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.FLOAT: "float32",
}


@dataclass
class Buffer:
    """One arena region; ``tensors`` are the activations that share its bytes."""

    name: str
    size: int  # bytes, rounded up to ALIGN
    tensors: list[str]
    first: int = 0  # step that writes it (graph input: 0)
    last: int = 0  # last step that reads it (graph output: the final step)
    offset: int = -1


@dataclass
class MemoryPlan:
    """Where each integer activation lives in the static arena."""

    order: list[str]  # node names in execution order (boundary Quantize/Dequantize excluded)
    offsets: dict[str, int]  # tensor -> byte offset in the arena
    tensor_bytes: dict[str, int]  # tensor -> its own byte size (unrounded)
    arena_bytes: int
    peak_live_bytes: int  # lower bound for any packing of this order
    greedy_arena_bytes: int  # naive greedy-by-size packing of the same order, for comparison
    input_tensor: str
    output_tensor: str
    buffers: list[Buffer] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "arena_bytes": self.arena_bytes,
            "peak_live_bytes": self.peak_live_bytes,
            "greedy_by_size_arena_bytes": self.greedy_arena_bytes,
            "packing": "best-fit over several placement orders (lower bound: peak live bytes)",
            "order": self.order,
            "offsets": self.offsets,
        }


# --------------------------------------------------------------------------- tensors


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape (symbolic batch -> 1) and dtype of every typed value in ``model``."""
    shapes = value_shapes(model)
    result: dict[str, tuple[tuple[int, ...], str]] = {}
    graph = model.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        elem = value.type.tensor_type.elem_type
        if value.name not in shapes or elem not in _ONNX_DTYPE:
            continue
        dims = tuple(d if isinstance(d, int) and d > 0 else 1 for d in shapes[value.name])
        result[value.name] = (dims, _ONNX_DTYPE[elem])
    return result


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _round(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Graph:
    nodes: list[onnx.NodeProto]  # compute + alias nodes, boundary ops removed
    input_tensor: str
    output_tensor: str
    sizes: dict[str, int]  # activation tensor -> bytes


def _mcu_graph(model: onnx.ModelProto, types: dict | None = None) -> _Graph:
    """The part of the integer graph that runs on the MCU: between Quantize and Dequantize."""
    types = types if types is not None else activation_types(model)
    inits = {init.name for init in model.graph.initializer}
    inits.update(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    inputs, outputs = graph_input_names(model), graph_output_names(model)
    if len(inputs) != 1 or len(outputs) != 1:
        raise EdgeqError(
            f"the mcu target supports one input and one output (model has {len(inputs)} and {len(outputs)})"
        )
    nodes, in_tensor, out_tensor = [], inputs[0], outputs[0]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        if node.domain == INT_DOMAIN and node.op_type == "Quantize":
            in_tensor = node.output[0]
        elif node.domain == INT_DOMAIN and node.op_type == "Dequantize":
            out_tensor = node.input[0]
        else:
            nodes.append(node)
    keys = [_node_key(node, i) for i, node in enumerate(nodes)]
    if len(set(keys)) != len(keys):
        raise EdgeqError("integer graph has duplicate node names; the mcu plan needs unique ones")
    sizes = {}
    for tensor in [in_tensor] + [o for n in nodes for o in n.output]:
        if tensor not in types:
            raise EdgeqError(f"integer graph has no shape/dtype for tensor '{tensor}' (value_info missing)")
        sizes[tensor] = nbytes(*types[tensor])
    for node in nodes:
        for name in node.input:
            if name and name not in inits and name not in sizes:
                raise EdgeqError(f"node '{node.name}' reads '{name}', which nothing on the MCU produces")
    return _Graph(nodes, in_tensor, out_tensor, sizes)


def activation_types(int_model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape (batch 1) and dtype of every tensor, from value_info or, where that has no
    shapes, from one run of the reference interpreter on a zero input."""
    sample_dims = input_sample_dims(int_model)  # value_info's symbolic dims would read as 1 below
    types = tensor_types(int_model)
    produced = [o for n in int_model.graph.node for o in n.output if o]
    if all(name in types for name in produced):
        return types
    from compiler.interpreter import run_all

    inputs = {name: np.zeros([1, *dims], np.float32) for name, dims in sample_dims.items()}
    for name, value in run_all(int_model, inputs).items():
        if name in produced or name in inputs:
            types.setdefault(name, (tuple(int(d) for d in np.shape(value)), str(np.asarray(value).dtype)))
    return types


# --------------------------------------------------------------------------- buffers


def _node_key(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _buffers(graph: _Graph, order: list[int], types: dict, inits: set[str]) -> list[Buffer]:
    """Buffers with lifetimes for one execution order (aliases and in-place merged)."""
    owner: dict[str, Buffer] = {}
    root = Buffer(graph.input_tensor, graph.sizes[graph.input_tensor], [graph.input_tensor], 0, 0)
    owner[graph.input_tensor] = root
    buffers = [root]
    for step, index in enumerate(order):
        node = graph.nodes[index]
        acts = [n for n in node.input if n and n not in inits]
        for name in acts:
            owner[name].last = max(owner[name].last, step)
        out = node.output[0]
        if node.op_type in ALIAS_OPS:
            buf = owner[acts[0]]
            buf.tensors.append(out)
            owner[out] = buf
            continue
        reuse = _inplace_candidate(node, acts, owner, graph, order, step, types)
        if reuse is not None:
            reuse.tensors.append(out)
            owner[out] = reuse
            continue
        for extra in node.output[1:]:
            if extra:
                raise EdgeqError(f"node '{node.name}' ({node.op_type}) has several outputs; mcu needs one")
        buf = Buffer(out, _round(graph.sizes[out]), [out], step, step)
        owner[out] = buf
        buffers.append(buf)
    owner[graph.output_tensor].last = max(len(order) - 1, 0)
    return buffers


def _readers_after(graph: _Graph, order: list[int], step: int, buf: Buffer) -> bool:
    names = set(buf.tensors)
    return any(
        name in names for later in order[step + 1 :] for name in graph.nodes[later].input
    ) or graph.output_tensor in names


def _inplace_candidate(node, acts, owner, graph, order, step, types) -> Buffer | None:
    if node.op_type not in INPLACE_OPS:
        return None
    out = node.output[0]
    out_shape, out_dtype = types[out]
    for name in acts:
        shape, dtype = types[name]
        if int(np.prod(shape)) != int(np.prod(out_shape)):
            continue
        if np.dtype(out_dtype).itemsize > np.dtype(dtype).itemsize:
            continue
        if acts.count(name) > 1 or _readers_after(graph, order, step, owner[name]):
            continue
        return owner[name]
    return None


def _live_profile(buffers: list[Buffer], steps: int) -> list[int]:
    live = [0] * max(steps, 1)
    for buf in buffers:
        for step in range(buf.first, buf.last + 1):
            live[step] += buf.size
    return live


def peak_live(buffers: list[Buffer], steps: int) -> int:
    return max(_live_profile(buffers, steps))


# --------------------------------------------------------------------------- order


def _dependencies(graph: _Graph) -> list[set[int]]:
    produced = {out: i for i, node in enumerate(graph.nodes) for out in node.output}
    return [{produced[n] for n in node.input if n in produced} for node in graph.nodes]


def _order_peak(graph, order, types, inits) -> int:
    return peak_live(_buffers(graph, order, types, inits), len(order))


def _dfs_orders(graph: _Graph, deps: list[set[int]]) -> list[list[int]]:
    """A few topological orders: the file's order and DFS from the output with
    children visited heaviest-first and lightest-first."""
    users: list[list[int]] = [[] for _ in graph.nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    orders = [list(range(len(graph.nodes)))]
    for heaviest_first in (True, False):
        orders.append(_dfs_postorder(graph, deps, users, heaviest_first))
    return orders


def _dfs_postorder(graph: _Graph, deps, users, heaviest_first: bool) -> list[int]:
    """Post-order DFS from the sinks: each node's producers run right before it."""
    seen: set[int] = set()
    order: list[int] = []
    for sink in (i for i in range(len(graph.nodes)) if not users[i]):
        stack = [(sink, False)]
        while stack:
            i, expanded = stack.pop()
            if expanded:
                order.append(i)
                continue
            if i in seen:
                continue
            seen.add(i)
            stack.append((i, True))
            producers = sorted(
                deps[i], key=lambda d: graph.sizes[graph.nodes[d].output[0]], reverse=heaviest_first
            )
            # the stack is LIFO: push in reverse so the first producer is visited first
            stack.extend((d, False) for d in reversed(producers) if d not in seen)
    return order


def best_order(graph: _Graph, types: dict, inits: set[str]) -> list[int]:
    """Topological order with the lowest peak of live bytes (exact DP when small)."""
    deps = _dependencies(graph)
    n = len(graph.nodes)
    candidates = _dfs_orders(graph, deps)
    best = min(candidates, key=lambda o: _order_peak(graph, o, types, inits))
    exact = _dp_order(graph, deps, inits)
    if exact is not None and _order_peak(graph, exact, types, inits) < _order_peak(graph, best, types, inits):
        best = exact
    assert sorted(best) == list(range(n))
    return best


def _dp_order(graph: _Graph, deps: list[set[int]], inits: set[str]) -> list[int] | None:
    """Exact min-peak order by DP over executed-node sets; None when too many sets.

    Live bytes are counted per tensor with aliases resolved to their source
    (in-place reuse is ignored here, so the DP bound is conservative); the
    caller re-evaluates the order with the real buffer model.
    """
    n = len(graph.nodes)
    source = {graph.input_tensor: graph.input_tensor}
    for node in graph.nodes:
        acts = [x for x in node.input if x and x not in inits]
        source[node.output[0]] = source[acts[0]] if node.op_type in ALIAS_OPS else node.output[0]
    size = {t: (graph.sizes[t] if source[t] == t else 0) for t in source}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.nodes):
        for x in node.input:
            if x in source:
                readers.setdefault(source[x], set()).add(i)
    out_src = source[graph.output_tensor]

    def live_after(done: frozenset[int]) -> int:
        total = size[graph.input_tensor] if readers.get(graph.input_tensor, set()) - done else 0
        for i in done:
            t = source[graph.nodes[i].output[0]]
            if t == graph.nodes[i].output[0] and (readers.get(t, set()) - done or t == out_src):
                total += size[t]
        return total

    # best[done] = (peak so far, predecessor set, node)
    start: frozenset[int] = frozenset()
    best: dict[frozenset[int], tuple[int, frozenset[int] | None, int]] = {start: (0, None, -1)}
    frontier = [start]
    for _ in range(n):
        nxt: dict[frozenset[int], tuple[int, frozenset[int] | None, int]] = {}
        for done in frontier:
            base = live_after(done)
            peak_so_far = best[done][0]
            for i in range(n):
                if i in done or not deps[i] <= done:
                    continue
                out = graph.nodes[i].output[0]
                during = base + (size[out] if source[out] == out else 0)
                if graph.input_tensor == out:
                    during = base
                cand = max(peak_so_far, during)
                key = done | {i}
                if key not in nxt or cand < nxt[key][0]:
                    nxt[key] = (cand, done, i)
        if len(best) + len(nxt) > MAX_DP_STATES:
            log.debug("order DP gave up after %d states; using DFS orders", len(best))
            return None
        best.update(nxt)
        frontier = list(nxt)
    order: list[int] = []
    state: frozenset[int] | None = frozenset(range(n))
    while state:
        _, prev, node = best[state]
        order.append(node)
        state = prev
    return order[::-1]


# --------------------------------------------------------------------------- packing


def _overlaps(a: Buffer, b: Buffer) -> bool:
    return not (a.last < b.first or b.last < a.first)


def _place(buffers: list[Buffer], placed: list[Buffer], buf: Buffer, best_fit: bool) -> int:
    """Offset for ``buf``: lowest (first fit) or tightest (best fit) gap among live neighbours."""
    busy = sorted((p.offset, p.offset + p.size) for p in placed if _overlaps(p, buf))
    gaps, cursor = [], 0
    for lo, hi in busy:
        if lo - cursor >= buf.size:
            gaps.append((lo - cursor, cursor))
        cursor = max(cursor, hi)
    if not best_fit or not gaps:
        return gaps[0][1] if gaps else cursor
    return min(gaps)[1]


def _pack(buffers: list[Buffer], key, best_fit: bool) -> int:
    placed: list[Buffer] = []
    for buf in sorted(buffers, key=key):
        buf.offset = _place(buffers, placed, buf, best_fit)
        placed.append(buf)
    return max((b.offset + b.size for b in buffers), default=0)


def pack_greedy_by_size(buffers: list[Buffer]) -> int:
    """Baseline: largest buffer first, lowest offset that fits (TFLM's greedy planner)."""
    return _pack(buffers, key=lambda b: (-b.size, b.first), best_fit=False)


def pack_best_fit(buffers: list[Buffer]) -> int:
    """Best-fit placement under several orderings; keeps the smallest arena."""
    orderings = [
        lambda b: (-b.size, b.first),
        lambda b: (-(b.last - b.first), -b.size),
        lambda b: (-b.size * (b.last - b.first + 1), b.first),
        lambda b: (b.first, -b.size),
    ]
    best_arena, best_offsets = None, None
    for key in orderings:
        for fit in (True, False):
            arena = _pack(buffers, key, fit)
            if best_arena is None or arena < best_arena:
                best_arena, best_offsets = arena, [b.offset for b in buffers]
    for buf, offset in zip(buffers, best_offsets, strict=True):
        buf.offset = offset
    return best_arena or 0


# --------------------------------------------------------------------------- entry point


def plan_memory(int_model: onnx.ModelProto, types: dict | None = None) -> MemoryPlan:
    """Execution order, arena offsets and arena size for ``int_model`` (batch 1)."""
    types = types if types is not None else activation_types(int_model)
    graph = _mcu_graph(int_model, types)
    inits = {init.name for init in int_model.graph.initializer}
    inits.update(n.output[0] for n in int_model.graph.node if n.op_type == "Constant")
    order = best_order(graph, types, inits)
    buffers = _buffers(graph, order, types, inits)
    steps = len(order)
    peak = peak_live(buffers, steps)
    greedy = pack_greedy_by_size(buffers)
    arena = pack_best_fit(buffers)
    offsets = {t: b.offset for b in buffers for t in b.tensors}
    return MemoryPlan(
        order=[_node_key(graph.nodes[i], i) for i in order],
        offsets=offsets,
        tensor_bytes=dict(graph.sizes),
        arena_bytes=arena,
        peak_live_bytes=peak,
        greedy_arena_bytes=greedy,
        input_tensor=graph.input_tensor,
        output_tensor=graph.output_tensor,
        buffers=buffers,
    )


def ordered_nodes(int_model: onnx.ModelProto, plan: MemoryPlan, types: dict | None = None) -> list[onnx.NodeProto]:
    """The MCU nodes of ``int_model`` in the plan's execution order."""
    graph = _mcu_graph(int_model, types)
    by_key = {_node_key(node, i): node for i, node in enumerate(graph.nodes)}
    return [by_key[key] for key in plan.order]
