"""The numpy reference interpreter of the integer graph: it defines what the ops mean.

Every target's output is compared with :func:`run_integer_graph_raw` bit for
bit. Semantics follow :mod:`compiler.intgraph`; integer arithmetic is done in
int64. Matrix products run through float32/float64 BLAS only when every partial
sum is provably below 2**24/2**53 (then the float sum is exact), else in int64.

* :func:`run_integer_graph` -- float outputs (after the output Dequantize).
* :func:`run_integer_graph_raw` -- the integer tensors that feed each output
  Dequantize, keyed by the graph output name (bit-exact comparisons).
* :func:`run_all` -- every tensor of the graph (shapes for lowering, debugging).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from compiler.errors import EdgeqError
from compiler.graph import attribute, graph_input_names, initializer_array
from compiler.intgraph import INT_DOMAIN
from compiler.requant import dequantize_linear, quantize_linear, requantize, saturate

FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53

Env = dict[str, np.ndarray]
OpFn = Callable[[onnx.NodeProto, list[np.ndarray]], np.ndarray]
_OPS: dict[str, OpFn] = {}


def _op(*names: str):
    def register(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def run_all(int_model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> Env:
    """Evaluate every node; returns every tensor (inputs, initializers, results) by name."""
    env: Env = {init.name: initializer_array(int_model, init.name) for init in int_model.graph.initializer}
    for name in graph_input_names(int_model):
        if name not in inputs:
            raise EdgeqError(f"missing input '{name}'")
        env[name] = np.asarray(inputs[name])
    for node in int_model.graph.node:
        fn = _OPS.get(node.op_type)
        if fn is None or (node.domain not in ("", "ai.onnx", INT_DOMAIN)):
            raise EdgeqError(f"integer interpreter has no op {node.domain}.{node.op_type} "
                             f"(node '{node.name}')")
        args = [env[name] if name else None for name in node.input]
        env[node.output[0]] = fn(node, args)
    return env


def run_integer_graph(int_model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float outputs (after the output Dequantize), by graph output name."""
    env = run_all(int_model, inputs)
    return {value.name: env[value.name] for value in int_model.graph.output}


def run_integer_graph_raw(int_model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The integer tensor behind each graph output (the Dequantize input), by output name."""
    env = run_all(int_model, inputs)
    raw_names = output_sources(int_model)
    return {name: env[raw_names[name]] for name in raw_names}


def output_sources(int_model: onnx.ModelProto) -> dict[str, str]:
    """Graph output name -> the integer tensor it dequantizes (itself if already integer)."""
    dequantized = {node.output[0]: node.input[0] for node in int_model.graph.node
                   if node.op_type == "Dequantize"}
    return {value.name: dequantized.get(value.name, value.name) for value in int_model.graph.output}


# -- shared numerics ---------------------------------------------------------------
def _requant_out(node: onnx.NodeProto, acc: np.ndarray, axis: int | None = None,
                 multiplier=None, shift=None) -> np.ndarray:
    """``clip(requant(acc) + y_zero_point)`` cast to ``y_dtype``."""
    multiplier = attribute(node, "multiplier") if multiplier is None else multiplier
    shift = attribute(node, "shift") if shift is None else shift
    scaled = requantize(acc, multiplier, shift, axis if np.size(multiplier) > 1 else None)
    return saturate(scaled + attribute(node, "y_zero_point", 0), attribute(node, "y_min"),
                    attribute(node, "y_max"), attribute(node, "y_dtype"))


def _max_abs(values: np.ndarray) -> int:
    return int(np.abs(values.astype(np.int64)).max(initial=0))


def _exact_float(bound: int) -> type:
    """The cheapest dtype in which sums of magnitude < ``bound`` are exact."""
    if bound < FLOAT32_EXACT:
        return np.float32
    return np.float64 if bound < FLOAT64_EXACT else np.int64


def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer ``a @ b`` as int64 (float BLAS when every partial sum is exact).

    A 2-D operand against a stack is done as one large GEMM: numpy's broadcast
    matmul of that case is about 10x slower.
    """
    compute = _exact_float(a.shape[-1] * _max_abs(a) * _max_abs(b))
    a, b = a.astype(compute), b.astype(compute)
    if a.ndim == 2 and b.ndim > 2:  # [O, K] @ [..., K, M] -> [..., O, M]
        depth, batch = b.shape[-2], b.shape[:-2]
        flat = np.moveaxis(b, -2, 0).reshape(depth, -1)
        out = (a @ flat).reshape(a.shape[0], *batch, b.shape[-1])
        return np.moveaxis(out, 0, -2).astype(np.int64)
    if b.ndim == 2 and a.ndim > 2:  # [..., N, K] @ [K, M]
        return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1]).astype(np.int64)
    return np.matmul(a, b).astype(np.int64)


def spatial_windows(x: np.ndarray, kernel, strides, pads, dilations, pad_value) -> np.ndarray:
    """[N, C, Ho, Wo, kh, kw] view of the (padded) windows of an NCHW tensor."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    if any(pads):
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(x, span, axis=(2, 3))
    return windows[:, :, ::sh, ::sw, ::dh, ::dw]


def _conv_geometry(node: onnx.NodeProto, kernel) -> tuple[list[int], list[int], list[int]]:
    ndim = len(kernel)
    return (list(attribute(node, "strides", [1] * ndim)), list(attribute(node, "pads", [0] * 2 * ndim)),
            list(attribute(node, "dilations", [1] * ndim)))


# -- edgeq ops ----------------------------------------------------------------------
@_op("Quantize")
def _quantize(node, args):
    return quantize_linear(args[0], attribute(node, "scale"), attribute(node, "y_zero_point"),
                           attribute(node, "y_min"), attribute(node, "y_max"), attribute(node, "y_dtype"))


@_op("Dequantize")
def _dequantize(node, args):
    return dequantize_linear(args[0], attribute(node, "scale"), attribute(node, "zero_point"))


@_op("QConv")
def _qconv(node, args):
    x, weight, bias = args
    kernel = list(weight.shape[2:])
    strides, pads, dilations = _conv_geometry(node, kernel)
    group = attribute(node, "group", 1)
    x_zero = attribute(node, "x_zero_point")
    out_channels, per_group = weight.shape[:2]
    if kernel == [1, 1] and strides == [1, 1] and not any(pads) and group == 1:
        n, channels, height, width = x.shape  # pointwise: one matrix product per sample
        acc = int_matmul(weight.reshape(out_channels, channels), x.reshape(n, channels, -1))
        acc = acc.reshape(n, out_channels, height, width)
    elif per_group == 1 and out_channels == group == x.shape[1]:
        acc = _depthwise(x, weight[:, 0], strides, pads, dilations, x_zero)
    else:
        windows = spatial_windows(x, kernel, strides, pads, dilations, x_zero)
        n, _, out_h, out_w = windows.shape[:4]
        cols = windows.reshape(n, group, per_group, out_h, out_w, *kernel)
        cols = cols.transpose(0, 1, 3, 4, 2, 5, 6).reshape(n, group, out_h * out_w, -1)
        wmat = weight.reshape(group, out_channels // group, -1)
        if group == 1:
            acc = int_matmul(wmat[0], cols[:, 0].transpose(0, 2, 1))  # [N, O, Ho*Wo]
        else:
            acc = int_matmul(wmat, cols.transpose(0, 1, 3, 2))  # [N, G, O/G, Ho*Wo]
        acc = acc.reshape(n, out_channels, out_h, out_w)
    acc = acc + bias.astype(np.int64).reshape(1, -1, 1, 1)
    return _requant_out(node, acc, axis=1)


def _depthwise(x: np.ndarray, weight: np.ndarray, strides, pads, dilations, x_zero: int) -> np.ndarray:
    """Depthwise convolution as a sum of shifted, per-channel-scaled copies, exact."""
    compute = _exact_float(weight[0].size * _max_abs(x) * _max_abs(weight))
    top, left, bottom, right = pads
    padded = np.pad(x.astype(compute), ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=x_zero)
    (sh, sw), (dh, dw) = strides, dilations
    out_h = (padded.shape[2] - (weight.shape[1] - 1) * dh - 1) // sh + 1
    out_w = (padded.shape[3] - (weight.shape[2] - 1) * dw - 1) // sw + 1
    taps = weight.astype(compute)
    acc = np.zeros((x.shape[0], x.shape[1], out_h, out_w), dtype=compute)
    for i in range(weight.shape[1]):
        for j in range(weight.shape[2]):
            rows = slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (out_w - 1) * sw + 1, sw)
            acc += padded[:, :, rows, cols] * taps[:, i, j].reshape(1, -1, 1, 1)
    return acc.astype(np.int64)


@_op("QGemm")
def _qgemm(node, args):
    x, weight, bias = args
    acc = int_matmul(x, weight) + bias.astype(np.int64)
    return _requant_out(node, acc, axis=acc.ndim - 1)


@_op("QMatMul")
def _qmatmul(node, args):
    a = args[0].astype(np.int64) - attribute(node, "a_zero_point")
    b = args[1].astype(np.int64) - attribute(node, "b_zero_point")
    return _requant_out(node, int_matmul(a, b))


@_op("QAdd")
def _qadd(node, args):
    a = args[0].astype(np.int64) - attribute(node, "a_zero_point")
    b = args[1].astype(np.int64) - attribute(node, "b_zero_point")
    acc = a * attribute(node, "a_multiplier") + b * attribute(node, "b_multiplier")
    return _requant_out(node, acc, multiplier=1, shift=attribute(node, "shift"))


@_op("QMul")
def _qmul(node, args):
    a = args[0].astype(np.int64) - attribute(node, "a_zero_point")
    b = args[1].astype(np.int64) - attribute(node, "b_zero_point")
    return _requant_out(node, a * b)


@_op("Requantize")
def _requantize(node, args):
    return _requant_out(node, args[0].astype(np.int64) - attribute(node, "x_zero_point"))


@_op("QAveragePool")
def _qaverage_pool(node, args):
    kernel = list(attribute(node, "kernel_shape"))
    strides, pads, _ = _conv_geometry(node, kernel)
    centred = args[0].astype(np.int64) - attribute(node, "x_zero_point")
    windows = spatial_windows(centred, kernel, strides, pads, [1, 1], 0)
    return _requant_out(node, windows.sum(axis=(-2, -1)))


@_op("QGlobalAveragePool")
def _qglobal_average_pool(node, args):
    centred = args[0].astype(np.int64) - attribute(node, "x_zero_point")
    return _requant_out(node, centred.sum(axis=tuple(range(2, centred.ndim)), keepdims=True))


@_op("QSoftmax")
def _qsoftmax(node, args):
    x = args[0].astype(np.int64)
    table = np.asarray(attribute(node, "exp_table"), dtype=np.int64)
    distance = np.minimum(x.max(axis=-1, keepdims=True) - x, len(table) - 1)
    exp = table[distance]
    total = exp.sum(axis=-1, keepdims=True)
    (multiplier,), (shift,) = attribute(node, "multiplier"), attribute(node, "shift")
    denominator = total << (shift + 1)  # 2 * total * 2**shift: round half up in the division below
    probability = (2 * exp * multiplier + (denominator >> 1)) // denominator
    return saturate(probability + attribute(node, "y_zero_point", 0), attribute(node, "y_min"),
                    attribute(node, "y_max"), attribute(node, "y_dtype"))


@_op("QLookup")
def _qlookup(node, args):
    table = np.asarray(attribute(node, "table"), dtype=np.int64)
    return table[args[0].astype(np.int64) - attribute(node, "x_min")].astype(attribute(node, "y_dtype"))


# -- standard data movement ops on integer tensors -------------------------------------
@_op("MaxPool")
def _max_pool(node, args):
    x = args[0]
    kernel = list(attribute(node, "kernel_shape"))
    if attribute(node, "ceil_mode", 0) or len(kernel) != 2:
        raise EdgeqError(f"MaxPool '{node.name}': only 2-D pooling with ceil_mode=0 is supported")
    strides, pads, dilations = _conv_geometry(node, kernel)
    lowest = np.iinfo(x.dtype).min
    return spatial_windows(x, kernel, strides, pads, dilations, lowest).max(axis=(-2, -1))


def reshape_target(shape_in: tuple[int, ...], shape: np.ndarray, allowzero: int = 0) -> list[int]:
    """ONNX Reshape's output shape (0 copies the input dim unless allowzero, -1 is inferred)."""
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [shape_in[i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = int(np.prod(shape_in)) // max(known, 1)
    return dims


@_op("Reshape")
def _reshape(node, args):
    return args[0].reshape(reshape_target(args[0].shape, args[1], attribute(node, "allowzero", 0)))


@_op("Flatten")
def _flatten(node, args):
    x = args[0]
    axis = attribute(node, "axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@_op("Transpose")
def _transpose(node, args):
    perm = attribute(node, "perm")
    return np.transpose(args[0], perm)


def _axes(node: onnx.NodeProto, args: list) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return [int(a) for a in np.ravel(args[1])]
    axes = attribute(node, "axes")
    return list(axes) if axes is not None else None


@_op("Squeeze")
def _squeeze(node, args):
    axes = _axes(node, args)
    return np.squeeze(args[0], axis=tuple(axes) if axes is not None else None)


@_op("Unsqueeze")
def _unsqueeze(node, args):
    x = args[0]
    axes = _axes(node, args)
    for axis in sorted(a % (x.ndim + len(axes)) for a in axes):
        x = np.expand_dims(x, axis)
    return x


@_op("Concat")
def _concat(node, args):
    return np.concatenate(args, axis=attribute(node, "axis"))


def pad_widths(x_ndim: int, pads: np.ndarray, axes: np.ndarray | None) -> list[tuple[int, int]]:
    """ONNX Pad ``pads`` ([begins..., ends...] over ``axes``) as numpy pad widths."""
    pads = [int(p) for p in np.ravel(pads)]
    axes = list(range(x_ndim)) if axes is None else [int(a) % x_ndim for a in np.ravel(axes)]
    widths = [(0, 0)] * x_ndim
    for index, axis in enumerate(axes):
        widths[axis] = (pads[index], pads[index + len(axes)])
    return widths


@_op("Pad")
def _pad(node, args):
    x = args[0]
    mode = attribute(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    axes = args[3] if len(args) > 3 else None
    widths = pad_widths(x.ndim, args[1], axes)
    if any(before < 0 or after < 0 for before, after in widths):
        raise EdgeqError(f"Pad '{node.name}': negative pads are not supported")
    if mode == "constant":
        value = args[2] if len(args) > 2 and args[2] is not None else 0
        return np.pad(x, widths, constant_values=np.asarray(value).reshape(()))
    return np.pad(x, widths, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


def slice_ranges(shape: tuple[int, ...], args: list) -> list[tuple[int, int, int]]:
    """(start, stop, step) per axis of ONNX Slice, normalised like Python slicing."""
    starts, ends = np.ravel(args[1]), np.ravel(args[2])
    axes = np.ravel(args[3]) if len(args) > 3 and args[3] is not None else np.arange(len(starts))
    steps = np.ravel(args[4]) if len(args) > 4 and args[4] is not None else np.ones(len(starts), int)
    ranges = [(0, dim, 1) for dim in shape]
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) % len(shape)
        clamp = lambda v: int(max(min(int(v), 2**62), -(2**62)))  # noqa: E731 -- INT64_MAX ends
        ranges[axis] = slice(clamp(start), clamp(end), int(step)).indices(shape[axis])
    return ranges


@_op("Slice")
def _slice(node, args):
    return args[0][tuple(slice(*r) for r in slice_ranges(args[0].shape, args))]


@_op("Gather")
def _gather(node, args):
    return np.take(args[0], args[1].astype(np.int64), axis=attribute(node, "axis", 0))


@_op("Identity")
def _identity(node, args):
    return args[0]


def compare_with_onnxruntime(qdq_model: onnx.ModelProto, int_model: onnx.ModelProto,
                             inputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """How far the integer graph is from the QDQ model run by onnxruntime, per output.

    ``inputs`` are batched (first axis = samples; run one sample at a time).
    Returns ``{output: {"elements", "differing", "fraction", "max_lsb"}}`` where
    differences are counted in units of the output's quantization step.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(qdq_model.SerializeToString(), providers=["CPUExecutionProvider"])
    scales = {node.output[0]: attribute(node, "scale") for node in int_model.graph.node
              if node.op_type == "Dequantize"}
    samples = len(next(iter(inputs.values())))
    stats: dict[str, dict] = {}
    for index in range(samples):
        sample = {name: value[index:index + 1] for name, value in inputs.items()}
        reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, sample),
                             strict=True))
        ours = run_integer_graph(int_model, sample)
        for name, value in ours.items():
            lsb = np.abs(value.astype(np.float64) - reference[name]) / scales.get(name, 1.0)
            lsb = np.rint(lsb)  # float rounding of the dequantized values
            entry = stats.setdefault(name, {"elements": 0, "differing": 0, "max_lsb": 0})
            entry["elements"] += int(lsb.size)
            entry["differing"] += int(np.count_nonzero(lsb))
            entry["max_lsb"] = max(entry["max_lsb"], int(lsb.max(initial=0)))
    for entry in stats.values():
        entry["fraction"] = entry["differing"] / max(entry["elements"], 1)
    return stats


def compare_layers_with_onnxruntime(qdq_model: onnx.ModelProto, int_model: onnx.ModelProto,
                                    sample: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per integer node: its output on onnxruntime's own integer inputs vs onnxruntime's output.

    This isolates each op's rounding from the amplification of earlier
    differences through the network. Returns ``{node: {"op", "elements",
    "differing", "max_lsb"}}`` for every node whose inputs and output are
    QuantizeLinear outputs of ``qdq_model`` (same tensor names).
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(qdq_model)
    known = {value.name for value in probe.graph.output}
    exposed = []
    for node in probe.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] not in known:
            zero = next((init for init in probe.graph.initializer
                         if len(node.input) > 2 and init.name == node.input[2]), None)
            elem = zero.data_type if zero is not None else onnx.TensorProto.UINT8
            if elem in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                continue
            probe.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], elem, None))
            exposed.append(node.output[0])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, sample), strict=True))
    constants = {init.name: initializer_array(int_model, init.name) for init in int_model.graph.initializer}
    stats: dict[str, dict] = {}
    for node in int_model.graph.node:
        if node.op_type in ("Quantize", "Dequantize") or node.output[0] not in reference:
            continue
        args = [constants.get(name, reference.get(name)) if name else None for name in node.input]
        if any(arg is None for arg, name in zip(args, node.input, strict=True) if name):
            continue
        ours = _OPS[node.op_type](node, args).astype(np.int64)
        diff = np.abs(ours - reference[node.output[0]].astype(np.int64))
        stats[node.name] = {"op": node.op_type, "elements": int(diff.size),
                            "differing": int(np.count_nonzero(diff)), "max_lsb": int(diff.max(initial=0))}
    return stats
