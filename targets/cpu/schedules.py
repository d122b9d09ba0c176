"""Fast x86 kernels for the integer graph's heavy ops: the seam the CPU lowering calls.

:func:`schedule_for` looks at one node of the integer graph (``QConv`` /
``QGemm`` of :mod:`compiler.intgraph`) and, when a hand-written kernel of
:mod:`targets.cpu.kernels` covers it on this CPU, returns a
:class:`ScheduledKernel`: the PrimFunc plus the constant arguments it wants in
place of the node's weight/bias inputs (weights re-packed for ``vpdpbusd``,
per-channel requantization constants). ``None`` means "not covered": the
lowering then uses its generic TE compute.

Call convention of the returned PrimFunc::

    func(x, *kernel.constants, y)        # QAdd: func(a, b, y) (kernel.inputs == 2)

with ``x`` the node's activation input in its graph layout/dtype and ``y`` the
node's output (``kernel.out_shape``, ``kernel.out_dtype``). The kernels need
AVX-512 VNNI (``vpdpbusd``); :func:`host_has_vnni` tells whether this machine
has it, and the target must be built with an ``mcpu`` that has it.

Also, without VNNI: :func:`quantize_edge` for the float input edge
(``Quantize``), ONNX ``MaxPool`` on 8-bit tensors (the generic TE max pool
took 3 ms of ResNet-18's 9 ms) and ``QAdd`` of two same-shape activations.
With AVX-512 VBMI: ``QLookup`` of 8-bit to 8-bit activations (a 256-byte table
as four ``vpermi2b`` sources, 64 elements per step).

Covered: QConv 2-D with ``group == 1`` (any kernel, stride, dilation, padding)
or depthwise (``group == C == O``; variant ``conv_depthwise_vnni`` where the target
has AVX-512 VBMI, else ``conv_depthwise``), QGemm; uint8, int8, uint16 or int16
activations (16-bit ones as a low- and a high-byte plane, each through ``vpdpbusd`` into
its own int32 accumulator, combined as ``256 * hi + lo`` before the epilogue; int16 is read
as x + 32768 with the weight sums moved into the bias, as int8 is read as x + 128); int8
weights (any ``w_bits <= 8``); uint8/int8 outputs, or uint16/int16 (QAdd too, for 8-bit
inputs); per-tensor or per-channel requantization (``ScheduledKernel.epilogue``: ``exact``
or ``tie_free``). Not covered (generic compute): a shifted bias or a byte plane's partial
sums that would not fit int32 (int16 input with a weight sum beyond about 65000, or
``255 * sum|w| >= 2**31``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import tvm

from targets.cpu import kernels
from targets.cpu.kernels import ConvGeometry, Requant

log = logging.getLogger(__name__)

# MaxPool reads 8-bit activations. The VNNI conv/gemm kernels read 8- or 16-bit ones (16-bit:
# as a low- and a high-byte plane, kernels.XPlanes) and write 8- or 16-bit ones (an 8-bit layer
# feeding a 16-bit one writes 16-bit output: the epilogue clamps in int32/int64 either way).
# QAdd reads either: its int64 sum holds 16-bit operands times 32-bit multipliers.
X_DTYPES = ("uint8", "int8")
MAC_X_DTYPES = (*X_DTYPES, "uint16", "int16")
Y_DTYPES = ("uint8", "int8", "uint16", "int16")


@dataclass
class ScheduledKernel:
    """A hand-written kernel for one node and the constant arguments it takes."""

    func: tvm.tirx.PrimFunc
    constants: list[np.ndarray]
    out_shape: tuple[int, ...]
    out_dtype: str
    variant: str  # "conv_dense" / "conv_depthwise" / "gemm": names the kernel family
    tile: tuple[int, ...] = field(default=())
    epilogue: str = "exact"  # or "tie_free": the short requantization (kernels.Requant.tie_free)
    inputs: int = 1  # leading node inputs passed as activations (QAdd: 2), before the constants


@functools.cache
def host_has_vnni() -> bool:
    """Whether this machine's CPU has AVX-512 VNNI (vpdpbusd on zmm registers)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags and " avx512bw" in flags


def node_attrs(node: onnx.NodeProto) -> dict:
    """The node's attributes as plain Python values (strings decoded)."""
    out = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _dtype_name(value) -> str:
    """y_dtype as a numpy name, given a name or an onnx TensorProto enum."""
    if isinstance(value, str):
        return np.dtype(value).name
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(value))).name


def _per_channel(values, channels: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    if array.size == 1:
        array = np.full(channels, array[0], dtype=np.int64)
    if array.size != channels:
        raise ValueError(f"expected 1 or {channels} requantization entries, got {array.size}")
    return array


def tie_free_epilogue(multiplier: np.ndarray, shift: np.ndarray, acc_bound: np.ndarray) -> bool:
    """Whether the short epilogue (:class:`targets.cpu.kernels.Requant` ``tie_free``) is exact.

    Per channel, with ``|acc + bias| <= acc_bound`` at every step of the accumulation:
    ``acc_bound < 2**31`` (int32 accumulation starting at the bias never overflows),
    ``M < 2**31``, ``s >= 32``, and no rounding tie: ``v * M`` is a tie only when ``v``
    is an odd multiple of ``2**(s - 1 - ctz(M))``, impossible when ``acc_bound`` is
    below that.
    """
    multiplier, shift = np.asarray(multiplier, np.int64), np.asarray(shift, np.int64)
    acc_bound = np.asarray(acc_bound, np.int64)
    if np.any(acc_bound >= 2**31) or np.any(multiplier < 0) or np.any(multiplier >= 2**31) or np.any(shift < 32):
        return False
    for m, s, bound in zip(multiplier.tolist(), shift.tolist(), acc_bound.tolist(), strict=True):
        trailing_zeros = (m & -m).bit_length() - 1
        if m and bound >= 1 << max(s - 1 - trailing_zeros, 0):
            return False
    return True


def requant_constants(
    attrs: dict, bias: np.ndarray, channels: int, padded: int, acc_bound: np.ndarray | None = None
) -> tuple[list[np.ndarray], Requant]:
    """bias (int32), multiplier, rounding term ``1 << (s - 1)`` and shift (int64), padded.

    ``acc_bound``: per channel, a bound on ``|acc + bias|`` during the kernel's
    accumulation; with it the epilogue is ``tie_free`` where :func:`tie_free_epilogue` allows.
    """
    mult = _per_channel(attrs["multiplier"], channels)
    shift = _per_channel(attrs["shift"], channels)
    if np.any(shift < 1) or np.any(shift > 62):
        raise ValueError("shift must be in [1, 62]")
    tie_free = acc_bound is not None and tie_free_epilogue(mult, shift, acc_bound)
    pad = padded - channels
    arrays = [
        np.pad(np.asarray(bias, dtype=np.int64), (0, pad)).astype(np.int32),
        np.pad(mult, (0, pad)),
        np.pad(np.left_shift(np.int64(1), shift - 1), (0, pad), constant_values=1),
        np.pad(shift, (0, pad), constant_values=32 if tie_free else 1),
    ]
    y_dtype = _dtype_name(attrs.get("y_dtype", "uint8"))
    rq = Requant(int(attrs.get("y_zero_point", 0)), int(attrs["y_min"]), int(attrs["y_max"]), y_dtype, tie_free)
    return arrays, rq


def _unsigned_bias(node: onnx.NodeProto, bias: np.ndarray, weight_rows: np.ndarray, x_dtype: str,
                   plane_max: int) -> np.ndarray | None:
    """Bias for the kernels' unsigned view of the input (``weight_rows``: one row per output channel):
    int8 x is read as x + 128, int16 x as x + 32768 (``sum((x + d) * w) = sum(x * w) + d * sum(w)``, so
    the bias takes ``-d * sum(w)``). ``None`` (logged) where the kernel's int32 arithmetic could
    overflow: the shifted bias (int16 input, huge weight sums), or a plane's partial sums -- products
    of plane values in [0, ``plane_max``] (255 for a byte plane) with the weights, from 0 (the tie-free
    epilogue's start at the bias is covered by :func:`tie_free_epilogue`'s bound)."""
    shifted = np.asarray(bias, dtype=np.int64)
    if x_dtype.startswith("int"):
        shifted = shifted - (1 << (8 * np.dtype(x_dtype).itemsize - 1)) * weight_rows.sum(axis=1)
    if np.any(np.abs(shifted) >= 2**31):
        log.debug("%s: bias does not fit int32 after the shift of %s x to unsigned", node.name, x_dtype)
        return None
    if np.any(np.abs(weight_rows).sum(axis=1) * plane_max >= 2**31):
        log.debug("%s: partial sums could overflow the int32 accumulators", node.name)
        return None
    return shifted


def pack_conv_weights(w: np.ndarray, tile_rows: int, depthwise: bool, taps_per_word: int = 1) -> np.ndarray:
    """OIHW int8 -> the layout :func:`targets.cpu.kernels.conv_kernel` reads (int32 words).

    dense: ``[O/OB, KH*KW, C/4, OB]``, each int32 holding 4 consecutive input
    channels (little-endian bytes), zero-padded. depthwise: ``[C, KH*KW]`` int32;
    with ``taps_per_word=4`` (:func:`targets.cpu.kernels.depthwise_vnni_kernel`)
    ``[C, KH * ceil(KW/4)]``, each int32 holding 4 horizontally adjacent taps as
    bytes, zero past the kernel's width.
    """
    o, c, kh, kw = w.shape
    if depthwise and taps_per_word == 4:
        words = math.ceil(kw / 4)
        padded = np.zeros((o, kh, words * 4), dtype=np.int8)
        padded[:, :, :kw] = w[:, 0]
        return np.ascontiguousarray(padded).view(np.int32).reshape(o, kh * words)
    if depthwise:
        return w.reshape(o, kh * kw).astype(np.int32)
    o_pad = math.ceil(o / tile_rows) * tile_rows
    c_pad = math.ceil(c / 4) * 4
    padded = np.zeros((o_pad, c_pad, kh, kw), dtype=np.int8)
    padded[:o, :c] = w
    blocked = padded.reshape(o_pad // tile_rows, tile_rows, c_pad // 4, 4, kh * kw)
    blocked = np.ascontiguousarray(blocked.transpose(0, 4, 2, 1, 3))  # [OT, taps, C4, OB, 4]
    return blocked.view(np.int32).reshape(o_pad // tile_rows, kh * kw, c_pad // 4, tile_rows)


def pack_gemm_weights(w: np.ndarray, vectors_per_tile: int) -> np.ndarray:
    """[K, M] int8 -> ``[M/16, K/4, 64]`` (16 outputs x 4 reduction bytes per row), zero-padded."""
    k, m = w.shape
    k_pad = math.ceil(k / 4) * 4
    step = vectors_per_tile * kernels.LANES
    m_pad = math.ceil(m / step) * step
    padded = np.zeros((k_pad, m_pad), dtype=np.int8)
    padded[:k, :m] = w
    blocked = padded.reshape(k_pad // 4, 4, m_pad // kernels.LANES, kernels.LANES)
    return np.ascontiguousarray(blocked.transpose(2, 0, 3, 1)).reshape(
        m_pad // kernels.LANES, k_pad // 4, 4 * kernels.LANES
    )


def _conv_kernel(
    node: onnx.NodeProto, x_shape, x_dtype: str, attrs: dict, w: np.ndarray, bias: np.ndarray, target=None
) -> ScheduledKernel | None:
    if len(x_shape) != 4 or w.ndim != 4:
        log.debug("%s: only 2-D convolutions have a kernel (x %s)", node.name, x_shape)
        return None
    n, c, h, wd = (int(v) for v in x_shape)
    o = w.shape[0]
    group = int(attrs.get("group", 1))
    depthwise = group > 1
    if depthwise and not (group == c == o and w.shape[1] == 1):
        log.debug("%s: grouped conv (group %d, C %d, O %d) is not depthwise", node.name, group, c, o)
        return None
    kernel = tuple(attrs.get("kernel_shape", w.shape[2:]))
    geometry = ConvGeometry(
        batch=n, in_channels=c, height=h, width=wd, out_channels=o,
        kernel=(int(kernel[0]), int(kernel[1])),
        strides=tuple(int(v) for v in attrs.get("strides", (1, 1))),
        dilations=tuple(int(v) for v in attrs.get("dilations", (1, 1))),
        pads=tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),
    )
    if geometry.out_height < 1 or geometry.out_width < 1:
        return None
    weights = w.reshape(o, -1).astype(np.int64)
    x_zero_point = int(attrs.get("x_zero_point", 0))
    vnni_depthwise = depthwise and target_has_vbmi(target) and kernels.depthwise_vnni_rows(geometry)
    # one int32 accumulator per byte plane; the depthwise kernel without VBMI keeps 16-bit x whole
    plane_max = kernels.XPlanes(x_dtype, x_zero_point, split=not depthwise or bool(vnni_depthwise)).max_value
    u_bias = _unsigned_bias(node, bias, weights, x_dtype, plane_max)
    if u_bias is None:
        return None
    # the kernel reads unsigned activations (0..255 or 0..65535): every partial sum of acc + bias
    # (for 16-bit x: 256 * acc_hi + acc_lo + bias) is within this
    acc_bound = np.abs(weights).sum(axis=1) * ((1 << (8 * np.dtype(x_dtype).itemsize)) - 1) + np.abs(u_bias)
    _, rq = requant_constants(attrs, u_bias, o, o, acc_bound)
    variant = "conv_depthwise" if depthwise else "conv_dense"
    taps_per_word = 1
    if vnni_depthwise:
        built = kernels.depthwise_vnni_kernel(geometry, x_dtype, x_zero_point, rq), (1, 1)
        variant, taps_per_word = "conv_depthwise_vnni", 4
    else:
        built = kernels.conv_kernel(geometry, x_dtype, x_zero_point, rq, depthwise)
    if built is None:
        log.debug("%s: strides %s have no kernel", node.name, geometry.strides)
        return None
    func, tile = built
    ob = tile[0]
    padded = o if depthwise else math.ceil(o / ob) * ob
    arrays, _ = requant_constants(attrs, u_bias, o, padded, acc_bound)
    packed = pack_conv_weights(w, ob, depthwise, taps_per_word)
    return ScheduledKernel(
        func=func,
        constants=[packed, *arrays],
        out_shape=(n, o, geometry.out_height, geometry.out_width),
        out_dtype=_dtype_name(attrs.get("y_dtype", "uint8")),
        variant=variant,
        tile=tile,
        epilogue="tie_free" if rq.tie_free else "exact",
    )


def _gemm_kernel(
    node: onnx.NodeProto, x_shape, x_dtype: str, attrs: dict, w: np.ndarray, bias: np.ndarray
) -> ScheduledKernel | None:
    if len(x_shape) != 2 or w.ndim != 2 or int(x_shape[1]) != w.shape[0]:
        log.debug("%s: QGemm kernel needs x [N, K] and w [K, M] (x %s)", node.name, x_shape)
        return None
    n, k = (int(v) for v in x_shape)
    m = w.shape[1]
    u_bias = _unsigned_bias(node, bias, w.astype(np.int64).T, x_dtype, 255)  # byte planes
    if u_bias is None:
        return None
    _, rq = requant_constants(attrs, bias, m, m)
    func, vectors = kernels.gemm_kernel(n, k, m, x_dtype, rq)
    padded = math.ceil(m / (vectors * kernels.LANES)) * vectors * kernels.LANES
    arrays, _ = requant_constants(attrs, u_bias, m, padded)
    return ScheduledKernel(
        func=func,
        constants=[pack_gemm_weights(w, vectors), *arrays],
        out_shape=(n, m),
        out_dtype=rq.y_dtype,
        variant="gemm",
        tile=(vectors,),
    )


def _maxpool_kernel(node: onnx.NodeProto, x_shape, x_dtype: str, attrs: dict) -> ScheduledKernel | None:
    """ONNX MaxPool on an 8-bit NCHW tensor (NOTSET padding, floor mode, one output)."""
    x_dtype = np.dtype(x_dtype).name
    kernel = attrs.get("kernel_shape")
    if (len(x_shape) != 4 or x_dtype not in X_DTYPES or kernel is None or len(kernel) != 2
            or int(attrs.get("ceil_mode", 0)) or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")
            or len(node.output) > 1 and node.output[1]):
        log.debug("%s: MaxPool variant without a kernel", node.name)
        return None
    n, c, h, w = (int(v) for v in x_shape)
    geometry = ConvGeometry(
        batch=n, in_channels=c, height=h, width=w, out_channels=c, kernel=(int(kernel[0]), int(kernel[1])),
        strides=tuple(int(v) for v in attrs.get("strides", (1, 1))),
        dilations=tuple(int(v) for v in attrs.get("dilations", (1, 1))),
        pads=tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),
    )
    if max(geometry.strides) > 3 or geometry.out_height < 1 or geometry.out_width < 1:
        return None
    return ScheduledKernel(func=kernels.maxpool_kernel(geometry, x_dtype), constants=[],
                           out_shape=(n, c, geometry.out_height, geometry.out_width), out_dtype=x_dtype,
                           variant="maxpool")


def quantize_edge(node: onnx.NodeProto, shape: tuple[int, ...], attrs: dict) -> ScheduledKernel:
    """The float input edge (``Quantize``) as a vectorized kernel, bit-exact with
    :func:`compiler.requant.quantize_linear` (the runner's numpy version costs about a
    millisecond per 224x224 image, as much as the whole network)."""
    dtype = _dtype_name(attrs.get("y_dtype", attrs.get("dtype", "uint8")))
    info = np.iinfo(dtype)
    zero_point = int(attrs.get("y_zero_point", attrs.get("zero_point", 0)))
    qmin, qmax = int(attrs.get("y_min", info.min)), int(attrs.get("y_max", info.max))
    func = kernels.quantize_kernel(shape, float(attrs["scale"]), zero_point, qmin, qmax, dtype)
    return ScheduledKernel(func=func, constants=[], out_shape=shape, out_dtype=dtype, variant="quantize")


def _qadd_kernel(node: onnx.NodeProto, input_shapes: list[tuple[int, ...]], input_dtypes: list[str],
                 attrs: dict, initializers: dict[str, np.ndarray]) -> ScheduledKernel | None:
    """QAdd of two activations of one shape (a residual add); broadcasting or a constant
    operand stays with the generic compute."""
    if len(node.input) != 2 or any(name in initializers for name in node.input):
        log.debug("%s: an operand is a constant", node.name)
        return None
    if len(input_shapes) != 2 or tuple(input_shapes[0]) != tuple(input_shapes[1]):
        log.debug("%s: operand shapes %s differ (broadcast)", node.name, input_shapes)
        return None
    dtypes = [np.dtype(d).name for d in input_dtypes]
    y_dtype = _dtype_name(attrs.get("y_dtype", "uint8"))
    if any(d not in MAC_X_DTYPES for d in dtypes) or y_dtype not in Y_DTYPES:
        log.debug("%s: dtypes %s -> %s have no kernel", node.name, dtypes, y_dtype)
        return None
    rq = Requant(int(attrs.get("y_zero_point", 0)), int(attrs["y_min"]), int(attrs["y_max"]), y_dtype)
    shape = tuple(input_shapes[0])
    func = kernels.qadd_kernel(shape, dtypes[0], dtypes[1], int(attrs.get("a_zero_point", 0)),
                               int(attrs.get("b_zero_point", 0)), int(attrs["a_multiplier"]),
                               int(attrs["b_multiplier"]), int(attrs["shift"]), rq)
    return ScheduledKernel(func=func, constants=[], out_shape=shape, out_dtype=y_dtype, variant="qadd", inputs=2)


def _lookup_kernel(node: onnx.NodeProto, shape: tuple[int, ...], x_dtype: str, attrs: dict,
                   target: tvm.target.Target | dict | None) -> ScheduledKernel | None:
    """QLookup of 8-bit to 8-bit activations where the target has AVX-512 VBMI; a 16-bit input's
    65,536-entry table stays with the generic compute."""
    x_dtype, y_dtype = np.dtype(x_dtype).name, _dtype_name(attrs.get("y_dtype", "uint8"))
    if x_dtype not in X_DTYPES or y_dtype not in X_DTYPES:
        log.debug("%s: %s -> %s is not an 8-bit table", node.name, x_dtype, y_dtype)
        return None
    if not target_has_vbmi(target):
        log.debug("%s: no AVX-512 VBMI for the table kernel", node.name)
        return None
    table = byte_table(attrs["table"], x_dtype, int(attrs["x_min"]))
    return ScheduledKernel(func=kernels.lookup_kernel(shape, x_dtype, y_dtype), constants=[table],
                           out_shape=shape, out_dtype=y_dtype, variant="lookup_vbmi")


def byte_table(table: list[int] | np.ndarray, x_dtype: str, x_min: int) -> np.ndarray:
    """QLookup's ``table`` (entry ``i`` for input level ``x_min + i``) as 256 bytes indexed by the
    input's raw byte (int8 -1 is byte 255); levels the input never takes read 0."""
    values = np.asarray(table, dtype=np.int64)
    levels = np.arange(x_min, x_min + len(values))
    raw = levels.astype(x_dtype).view(np.uint8)
    out = np.zeros(256, np.uint8)
    out[raw] = values & 0xFF  # the output byte, whatever its signedness
    return out


def target_has_vbmi(target: tvm.target.Target | dict | None) -> bool:
    """Whether code for ``target`` may use ``vpermb`` (AVX-512 VBMI; ``None``: this machine)."""
    if target is None:
        return host_has_vnni() and " avx512vbmi" in Path("/proc/cpuinfo").read_text()
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    return target.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features("avx512vbmi", target))


def target_has_vnni(target: tvm.target.Target | dict | None) -> bool:
    """Whether code for ``target`` may use vpdpbusd (``None``: this machine)."""
    if target is None:
        return host_has_vnni()
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return False
    codegen = tvm.target.codegen
    return bool(codegen.target_has_features("avx512vnni", target)
                and codegen.target_has_features("avx512bw", target))


def schedule_for(
    node: onnx.NodeProto,
    input_shapes: list[tuple[int, ...]],
    attrs: dict | None,
    initializers: dict[str, np.ndarray],
    input_dtypes: list[str] | None = None,
    target: tvm.target.Target | dict | None = None,
) -> ScheduledKernel | None:
    """A hand-written kernel for ``node`` or ``None`` (then the generic compute applies).

    ``input_shapes``/``input_dtypes``: of the node's inputs in order (the
    activation first); ``attrs``: the node's attributes as Python values
    (``None``: read them from the node); ``initializers``: constant tensors by
    name -- the weight and bias must be among them. ``target``: what the kernel
    will be compiled for (``None``: this machine). The VNNI kernels are only
    returned for x86 targets with AVX-512 VNNI: LLVM aborts the whole process
    when it meets the x86 intrinsic while compiling for another architecture
    (e.g. aarch64), so a cross build must ask with its own target.
    """
    attrs = node_attrs(node) if attrs is None else attrs
    if node.op_type == "Quantize":
        return quantize_edge(node, tuple(input_shapes[0]), attrs)
    if node.op_type == "MaxPool":
        return _maxpool_kernel(node, tuple(input_shapes[0]), (input_dtypes or ["uint8"])[0], attrs)
    if node.op_type == "QAdd":
        return _qadd_kernel(node, input_shapes, input_dtypes or ["uint8", "uint8"], attrs, initializers)
    if node.op_type == "QLookup":
        return _lookup_kernel(node, tuple(input_shapes[0]), (input_dtypes or ["uint8"])[0], attrs, target)
    if not target_has_vnni(target):
        return None
    if node.op_type not in ("QConv", "QGemm"):
        return None
    x_dtype = np.dtype((input_dtypes or ["uint8"])[0]).name
    if x_dtype not in MAC_X_DTYPES:
        log.debug("%s: activation dtype %s has no kernel", node.name, x_dtype)
        return None
    if _dtype_name(attrs.get("y_dtype", "uint8")) not in Y_DTYPES:
        log.debug("%s: output dtype %s has no kernel", node.name, attrs.get("y_dtype"))
        return None
    if len(node.input) < 2 or node.input[1] not in initializers:
        log.debug("%s: weight is not a constant", node.name)
        return None
    w = np.asarray(initializers[node.input[1]])
    if w.dtype != np.int8:
        log.debug("%s: weight dtype %s is not int8", node.name, w.dtype)
        return None
    out_channels = w.shape[0] if node.op_type == "QConv" else w.shape[1]
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in initializers:
            log.debug("%s: bias is not a constant", node.name)
            return None
        bias = np.asarray(initializers[node.input[2]], dtype=np.int64).reshape(-1)
    else:
        bias = np.zeros(out_channels, dtype=np.int64)
    if node.op_type == "QConv":
        return _conv_kernel(node, tuple(input_shapes[0]), x_dtype, attrs, w, bias, target)
    return _gemm_kernel(node, tuple(input_shapes[0]), x_dtype, attrs, w, bias)


def host_target() -> tvm.target.Target:
    """LLVM target for this machine's CPU ("-mcpu=native" would silently mean generic x86-64)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def build_kernel(kernel: ScheduledKernel, target: tvm.target.Target | None = None):
    """Compile one kernel on its own (tests and kernel benchmarks): a callable module."""
    return tvm.tirx.build(kernel.func, target=target or host_target())


def run_kernel(module, kernel: ScheduledKernel, *inputs: np.ndarray) -> np.ndarray:
    """Run a module from :func:`build_kernel` on its activation inputs; returns y."""
    device = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in (*inputs, *kernel.constants)]
    y = tvm.runtime.tensor(np.zeros(kernel.out_shape, dtype=kernel.out_dtype), device)
    module(*args, y)
    return y.numpy()
