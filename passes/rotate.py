"""Hadamard rotation folding (QuaRot / QuIP#-style incoherence processing).

An orthogonal ``Q`` (normalised Hadamard, or a Kronecker product of a
Hadamard and a seeded random orthogonal block when the size is not a power of
two, or fully random with ``kind="random"``) is placed on a tensor ``X`` that
feeds linear layers:  ``X W = (X Q)(Q^T W)``.  ``X Q`` spreads a few outlier
channels over all channels, so a per-tensor activation quantizer and the
per-channel weight quantizer both lose less.  Where ``Q`` goes:

* **linear pairs** ``L1 -> L2`` (the tensor between feeds only L2, no op in
  between; L1 not depthwise, L2 a Gemm/MatMul or a group-1 Conv): ``Q`` is
  folded into L1's output channels (weight and bias) and ``Q^T`` into L2's
  input channels. No runtime cost. (Conv zero padding stays zero: rotation
  is linear.)
* **attention value/output heads**: ``V = X Wv + bv`` is split into heads,
  multiplied by the attention probabilities, merged back and fed to the output
  projection. A block-diagonal rotation with one Hadamard per head commutes
  with all of that, so it is folded into Wv/bv (output side) and Wo (input
  side). No runtime cost.
* **residual stream** (pre-LN transformers whose LayerNorm output feeds only
  linear layers): not rewritten by this version; each LayerNorm is checked
  and the reason is logged (post-LN models such as BERT/MiniLM add the
  LayerNorm output to the residual, so gamma cannot be folded forward).
* **online** (``online=True``): for a MatMul/Gemm input produced by an op
  that cannot absorb ``Q`` (GELU, Softmax-weighted sums, graph inputs), an
  explicit ``MatMul(X, Q)`` is inserted and recorded in the model's online-op
  list with its cost (``K*K`` MACs per row as a dense MatMul; a fast
  Walsh-Hadamard transform would need ``K log2 K``). The pipeline should keep
  it float, otherwise the outliers are quantized before they are spread.

Requires: a float graph.  Guarantees: the same float function (orthogonal Q,
to float rounding).  Idempotency: the model is marked; a second run is
skipped with a log line.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from compiler.graph import (
    NameAllocator,
    consumers,
    initializer_array,
    producers,
    set_initializer,
    topological_sort,
    value_shapes,
)
from compiler.linear_layers import (
    LinearLayer,
    add_online_op,
    copy_model,
    find_linear_layers,
    is_applied,
    mark_applied,
    single_consumer_chain,
)

log = logging.getLogger(__name__)

PASS_NAME = "rotate"


# -- orthogonal matrices ------------------------------------------------------------------
def hadamard(size: int) -> np.ndarray:
    """Normalised Sylvester Hadamard matrix (size a power of two)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, not {size}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.sqrt(size)


def random_orthogonal(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(size, size)))
    return q * np.sign(np.diag(r))


def rotation(size: int, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
    """An orthogonal [size, size] matrix: Hadamard (x random orthogonal block if needed) or random."""
    if kind == "random":
        return random_orthogonal(size, seed)
    if kind != "hadamard":
        raise ValueError(f"rotation kind must be 'hadamard' or 'random', not {kind!r}")
    power = size & -size  # largest power of two dividing size
    if power == size:
        return hadamard(size)
    return np.kron(random_orthogonal(size // power, seed), hadamard(power))


# -- folding helpers ----------------------------------------------------------------------
def rotate_output(model: onnx.ModelProto, layer: LinearLayer, q: np.ndarray) -> None:
    """Output channels of ``layer`` become ``y Q`` (weight and bias)."""
    weight = layer.weight_array(model).astype(np.float64)
    moved = np.moveaxis(weight, layer.out_axis, -1)  # [..., out]
    set_initializer(model, layer.weight, np.moveaxis(moved @ q, -1, layer.out_axis).astype(np.float32))
    if layer.bias is not None:
        bias = initializer_array(model, layer.bias)
        set_initializer(model, layer.bias, (bias.reshape(-1).astype(np.float64) @ q).reshape(bias.shape).astype(np.float32))


def rotate_input(model: onnx.ModelProto, layer: LinearLayer, q: np.ndarray) -> None:
    """``layer`` now reads ``x Q`` and computes what it computed on ``x``: W <- Q^T W on the input axis."""
    weight = layer.weight_array(model).astype(np.float64)
    moved = np.moveaxis(weight, layer.in_axis, -1)  # [..., in]
    set_initializer(model, layer.weight, np.moveaxis(moved @ q, -1, layer.in_axis).astype(np.float32))


def _is_rotatable_reader(layer: LinearLayer) -> str:
    if layer.is_depthwise:
        return "a depthwise conv cannot read rotated channels"
    return ""


def find_pairs(model: onnx.ModelProto) -> list[tuple[LinearLayer, LinearLayer]]:
    """(L1, L2) linear pairs with nothing in between; misses logged."""
    layers = find_linear_layers(model)
    by_node = {id(layer.node): layer for layer in layers.values()}
    pairs = []
    for layer in layers.values():
        _, nxt, reason = single_consumer_chain(model, layer.output, ())
        if nxt is None:
            log.debug("rotate: %s: no pair: %s", layer.name, reason)
            continue
        partner = by_node.get(id(nxt))
        why = (f"next op {nxt.op_type} {nxt.name} is not a linear layer" if partner is None
               else "L1 is depthwise" if layer.is_depthwise
               else _is_rotatable_reader(partner))
        if why:
            log.debug("rotate: %s: no pair: %s", layer.name, why)
            continue
        pairs.append((layer, partner))
    return pairs


def _walk_back(model: onnx.ModelProto, tensor: str, through: tuple[str, ...]) -> tuple[list[onnx.NodeProto], onnx.NodeProto | None]:
    made = producers(model)
    # Shape ops read only a tensor's shape, which a rotation does not change.
    users = {name: [n for n in nodes if n.op_type != "Shape"] for name, nodes in consumers(model).items()}
    passed = []
    node = made.get(tensor)
    while node is not None and node.op_type in through:
        if len(users.get(node.output[0], [])) != 1:
            return passed, None
        passed.append(node)
        node = made.get(node.input[0])
    if node is not None and len(users.get(node.output[0], [])) != 1:
        return passed, None
    return passed, node


def _head_dim(model: onnx.ModelProto, reshapes: list[onnx.NodeProto], channels: int) -> int | None:
    """The per-head size from the split-heads Reshape's shape constant ([..., heads, head_dim])."""
    inferred = value_shapes(model)
    for node in reshapes:
        if node.op_type != "Reshape":
            continue
        shape = initializer_array(model, node.input[1])
        last = int(shape[-1]) if shape is not None and shape.size >= 2 else None
        if last is None or last <= 0:  # a shape computed at run time: ask shape inference
            out_shape = inferred.get(node.output[0]) or []
            last = out_shape[-1] if len(out_shape) >= 4 and isinstance(out_shape[-1], int) else None
        if last and last > 0 and channels % last == 0:
            return last
    return None


def find_value_output_heads(model: onnx.ModelProto) -> list[tuple[LinearLayer, LinearLayer, int]]:
    """(V projection, output projection, head_dim) linked through split/attend/merge; misses logged."""
    layers = find_linear_layers(model)
    by_output = {layer.output: layer for layer in layers.values()}
    found = []
    for out_proj in layers.values():
        if out_proj.op_type not in ("MatMul", "Gemm"):
            continue
        merge, attend = _walk_back(model, out_proj.input, ("Reshape", "Transpose"))
        if attend is None or attend.op_type != "MatMul" or not merge:
            continue
        split, value = _walk_back(model, attend.input[1], ("Reshape", "Transpose"))
        v_proj = by_output.get(value.output[0]) if value is not None else None
        if v_proj is None or v_proj.op_type not in ("MatMul", "Gemm"):
            log.debug("rotate: %s: the attention's value input does not come from a linear layer", out_proj.name)
            continue
        channels = v_proj.weight_array(model).shape[v_proj.out_axis]
        head = _head_dim(model, split, channels)
        if head is None or head & (head - 1):
            log.debug("rotate: %s: head size unknown or not a power of two", out_proj.name)
            continue
        if [n.op_type for n in split].count("Transpose") != 1 or [n.op_type for n in merge].count("Transpose") != 1:
            log.debug("rotate: %s: split/merge is not one Reshape+Transpose each", out_proj.name)
            continue
        found.append((v_proj, out_proj, head))
    return found


def _check_residual_stream(model: onnx.ModelProto) -> None:
    users = consumers(model)
    layers = find_linear_layers(model)
    readers = {id(layer.node) for layer in layers.values()}
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        others = [n.op_type for n in users.get(node.output[0], []) if id(n) not in readers]
        if others:
            log.info("rotate: residual stream at %s not rotated: the LayerNorm output also feeds %s "
                     "(post-LN), so its gamma cannot be folded forward", node.name, sorted(set(others)))
        else:
            log.info("rotate: residual stream at %s not rotated: residual-stream rotation is not "
                     "implemented in this version", node.name)


def rotate(
    model: onnx.ModelProto,
    *,
    kind: str = "hadamard",
    pairs: bool = True,
    heads: bool = True,
    online: bool = False,
    online_ops: tuple[str, ...] = ("MatMul", "Gemm"),
    seed: int = 0,
    data=None,  # accepted for recipe symmetry; rotations need no data
) -> onnx.ModelProto:
    """Fold Hadamard rotations into linear pairs and attention heads; optional online rotations."""
    del data
    result = copy_model(model)
    if is_applied(result, PASS_NAME):
        log.info("rotate: skipped: the model is already rotated")
        return result
    touched: set[int] = set()  # nodes whose input side is already rotated
    counts = {"pairs": 0, "heads": 0, "online": 0}
    if pairs:
        for first, second in find_pairs(result):
            if id(second.node) in touched or id(first.node) in touched:
                continue
            size = first.weight_array(result).shape[first.out_axis]
            q = rotation(size, kind, seed)
            rotate_output(result, first, q)
            rotate_input(result, second, q)
            touched.update((id(second.node), id(first.node)))
            counts["pairs"] += 1
    if heads:
        for v_proj, out_proj, head in find_value_output_heads(result):
            if id(out_proj.node) in touched:
                continue
            channels = v_proj.weight_array(result).shape[v_proj.out_axis]
            q = np.kron(np.eye(channels // head), hadamard(head))
            rotate_output(result, v_proj, q)
            rotate_input(result, out_proj, q)
            touched.add(id(out_proj.node))
            counts["heads"] += 1
    if online:
        names = NameAllocator(result)
        by_input: dict[str, list[LinearLayer]] = {}
        inits = {init.name for init in result.graph.initializer}
        for layer in find_linear_layers(result).values():
            if layer.op_type in online_ops and id(layer.node) not in touched and layer.input not in inits:
                by_input.setdefault(layer.input, []).append(layer)
        for tensor, readers in by_input.items():
            source = producers(result).get(tensor)
            if source is not None and source.op_type in ("LayerNormalization", "MatMul", "Gemm", "Add"):
                log.debug("rotate: %s: no online rotation: produced by %s (fold or smooth it instead)", tensor, source.op_type)
                continue
            size = readers[0].weight_array(result).shape[readers[0].in_axis]
            q = rotation(size, kind, seed)
            q_name, rotated = names(f"{tensor}_rotation"), names(f"{tensor}_rotated")
            set_initializer(result, q_name, q.astype(np.float32))
            node = helper.make_node("MatMul", [tensor, q_name], [rotated], name=names(f"{tensor}_online_rotation"))
            result.graph.node.append(node)
            add_online_op(result, node.name, "MatMul", size * size,
                          f"Hadamard rotation of {tensor} (its producer cannot absorb it); keep float")
            for layer in readers:
                layer.node.input[0] = rotated
                rotate_input(result, layer, q)
            counts["online"] += 1
        topological_sort(result)
    _check_residual_stream(result)
    log.info("rotate: %d linear pairs, %d attention V/O heads, %d online rotations", counts["pairs"], counts["heads"], counts["online"])
    mark_applied(result, PASS_NAME, kind=kind, **counts)
    return result
