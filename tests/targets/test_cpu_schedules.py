"""Bit-exact tests of every hand-written CPU kernel variant against a numpy reference of the spec.

The reference follows compiler/intgraph.py literally (padding reads the input zero point,
int64 requantization with compiler.requant's rounding rule), independent of the kernels'
packing tricks, so a miscompiled or mis-packed kernel fails here.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
import tvm

from compiler.requant import quantize_linear, requantize
from targets.cpu import schedules

pytestmark = pytest.mark.skipif(not schedules.host_has_vnni(), reason="needs AVX-512 VNNI")


def accumulate_qconv(x: np.ndarray, w: np.ndarray, bias: np.ndarray, attrs: dict) -> np.ndarray:
    """int64 ``sum(x * w) + bias`` of QConv, padding reading x_zero_point."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    group = attrs.get("group", 1)
    sh, sw = attrs.get("strides", (1, 1))
    dh, dw = attrs.get("dilations", (1, 1))
    pt, pl, pb, pr = attrs.get("pads", (0, 0, 0, 0))
    xp = np.full((n, c, h + pt + pb, wd + pl + pr), attrs["x_zero_point"], dtype=np.int64)
    xp[:, :, pt : pt + h, pl : pl + wd] = x
    ho = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    wo = (wd + pl + pr - (kw - 1) * dw - 1) // sw + 1
    acc = np.zeros((n, o, ho, wo), dtype=np.int64)
    per_group = o // group
    for oc in range(o):
        g = oc // per_group
        for i in range(kh):
            for j in range(kw):
                window = xp[:, g * cg : (g + 1) * cg,
                            i * dh : i * dh + (ho - 1) * sh + 1 : sh,
                            j * dw : j * dw + (wo - 1) * sw + 1 : sw]
                acc[:, oc] += np.einsum("nchw,c->nhw", window, w[oc, :, i, j].astype(np.int64))
    return acc + bias.reshape(1, -1, 1, 1)


def accumulate_qgemm(x: np.ndarray, w: np.ndarray, bias: np.ndarray, attrs: dict) -> np.ndarray:
    return x.astype(np.int64) @ w.astype(np.int64) + bias


def _requant_out(acc: np.ndarray, attrs: dict, axis: int) -> np.ndarray:
    mult = np.asarray(attrs["multiplier"], dtype=np.int64)
    shift = np.asarray(attrs["shift"], dtype=np.int64)
    y = requantize(acc, mult, shift, axis=axis if mult.size > 1 else None) + attrs["y_zero_point"]
    return np.clip(y, attrs["y_min"], attrs["y_max"]).astype(attrs["y_dtype"])


def _has_ties(acc: np.ndarray, attrs: dict, axis: int) -> bool:
    mult = np.asarray(attrs["multiplier"], dtype=np.int64)
    shift = np.asarray(attrs["shift"], dtype=np.int64)
    shape = [1] * acc.ndim
    shape[axis] = -1
    if mult.size > 1:
        mult, shift = mult.reshape(shape), shift.reshape(shape)
    product = acc * mult
    half = np.left_shift(np.int64(1), shift - 1)
    return bool(np.any(np.bitwise_and(product, 2 * half - 1) == half))


def _rng(*key) -> np.random.Generator:
    """A generator seeded by the test case (``hash`` of a str changes from run to run)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _case(rng, op, x_shape, w_shape, x_dtype, y_dtype, per_channel, ties=None, **conv_attrs):
    """Random node + tensors; multipliers chosen so outputs span the whole y range.

    ``ties`` (default: ``per_channel``) plants channels whose outputs are exact rounding ties.
    """
    ties = per_channel if ties is None else ties
    out_channels = w_shape[0] if op == "QConv" else w_shape[1]
    x = rng.integers(np.iinfo(x_dtype).min, np.iinfo(x_dtype).max + 1, x_shape).astype(x_dtype)
    w = rng.integers(-128, 128, w_shape).astype(np.int8)
    bias = rng.integers(-20000, 20000, out_channels).astype(np.int32)
    reduction = int(np.prod(w_shape[1:])) if op == "QConv" else w_shape[0]
    count = out_channels if per_channel else 1
    # acc spans about +-128*128*sqrt(K) (16-bit x: 256 times that) and M ~ 2**30.5: this shift
    # maps it to about +-64 steps.
    x_range_bits = 8 * np.dtype(x_dtype).itemsize - 8
    shift = 31 + x_range_bits + int(np.log2(128 * 128 * np.sqrt(reduction) / 64)) + rng.integers(-1, 2, count)
    mult = rng.integers(2**30, 2**31, count)
    if ties:
        # Every third channel is acc = x[first tap] + bias halved exactly (M = 2**30, s = 31):
        # half of its outputs are exact ties, which exercise the round-half-to-even rule that
        # random multipliers almost never hit.
        tie_channels = np.arange(0, out_channels, 3)
        w_by_channel = w.reshape(out_channels, -1) if op == "QConv" else w.T.reshape(out_channels, -1)
        w_by_channel[tie_channels] = 0
        w_by_channel[tie_channels, 0] = 1
        w[...] = w_by_channel.reshape(w.shape) if op == "QConv" else w_by_channel.T.reshape(w.shape)
        # centred (unsigned x), and of both parities: with one x value (a 1-row QGemm) some channel ties
        bias[tie_channels] = (-(np.iinfo(x_dtype).max // 2 + 1) if x_dtype.startswith("u") else 0) + tie_channels % 2
        mult[tie_channels] = 2**30
        shift[tie_channels] = 31
    lo, hi = np.iinfo(y_dtype).min, np.iinfo(y_dtype).max
    attrs = dict(
        x_zero_point=int(rng.integers(np.iinfo(x_dtype).min, np.iinfo(x_dtype).max + 1)),
        multiplier=mult.tolist(), shift=shift.tolist(),
        y_zero_point=int(rng.integers(lo, hi + 1)), y_min=int(lo) + 3, y_max=int(hi), y_dtype=y_dtype,
        **conv_attrs,
    )
    node = onnx.helper.make_node(op, ["x", "w", "b"], ["y"], name=f"{op.lower()}0", domain="edgeq")
    return node, x, w, bias, attrs


def _check(node, x, w, bias, attrs, expected_variant, expected_epilogue="exact", target=None):
    """The kernel ``schedule_for`` picks for ``target`` (``None``: this machine), run here."""
    kernel = schedules.schedule_for(
        node, [x.shape, w.shape, bias.shape], attrs, {"w": w, "b": bias}, [x.dtype.name, "int8", "int32"],
        target=target,
    )
    assert kernel is not None and kernel.variant == expected_variant
    assert kernel.epilogue == expected_epilogue
    built = schedules.build_kernel(kernel, target and tvm.target.Target(target))
    got = schedules.run_kernel(built, kernel, x)
    acc = (accumulate_qconv if node.op_type == "QConv" else accumulate_qgemm)(x, w, bias.astype(np.int64), attrs)
    ref = _requant_out(acc, attrs, axis=1)
    if expected_epilogue == "exact" and len(attrs["multiplier"]) > 1:
        assert _has_ties(acc, attrs, axis=1), "the case never hits a rounding tie"
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # The outputs must not be trivially saturated, or the test proves little.
    assert len(np.unique(ref)) > min(16, ref.size // 2)
    np.testing.assert_array_equal(got, ref)


CONV_CASES = [
    # (x shape, w shape, attrs, variant): MobileNetV2 / ResNet-18 shapes, shrunk spatially.
    ((1, 24, 14, 14), (144, 24, 1, 1), {}, "conv_dense"),  # pointwise expand
    ((1, 32, 7, 9), (20, 32, 1, 1), {}, "conv_dense"),  # O not a multiple of the tile, odd width
    ((1, 40, 7, 7), (24, 40, 1, 1), {}, "conv_dense"),  # 49 outputs per channel: a 1-lane partial vector
    ((2, 12, 5, 5), (8, 12, 1, 1), {}, "conv_dense"),  # 1x1 flat pack, batch 2, overlapping last vector
    ((1, 8, 3, 3), (8, 8, 1, 1), {}, "conv_dense"),  # 9 pixels: row pack, 2 + 1-pixel pieces
    ((1, 3, 17, 17), (32, 3, 3, 3), dict(strides=(2, 2), pads=(1, 1, 1, 1)), "conv_dense"),  # stem, C=3
    ((1, 16, 12, 12), (16, 16, 3, 3), dict(pads=(1, 1, 1, 1)), "conv_dense"),  # ResNet 3x3
    ((1, 8, 15, 15), (24, 8, 7, 7), dict(strides=(2, 2), pads=(3, 3, 3, 3)), "conv_dense"),  # 7x7 stem
    ((1, 16, 10, 10), (32, 16, 1, 1), dict(strides=(2, 2)), "conv_dense"),  # 1x1 downsample
    ((1, 10, 9, 11), (6, 10, 3, 3), dict(dilations=(2, 2), pads=(2, 1, 2, 0)), "conv_dense"),  # dilation, asym pads
    ((2, 8, 6, 6), (8, 8, 3, 3), dict(pads=(1, 1, 1, 1)), "conv_dense"),  # batch 2
    ((1, 8, 14, 13), (8, 8, 3, 5), dict(strides=(3, 2), pads=(1, 2, 0, 1)), "conv_dense"),  # 9 -> 6 phases
    ((1, 32, 20, 20), (32, 1, 3, 3), dict(group=32, pads=(1, 1, 1, 1)), "conv_depthwise"),
    ((1, 24, 21, 21), (24, 1, 3, 3), dict(group=24, strides=(2, 2), pads=(1, 1, 1, 1)), "conv_depthwise"),
    ((1, 16, 9, 9), (16, 1, 5, 5), dict(group=16, pads=(2, 2, 2, 2)), "conv_depthwise"),
    ((1, 8, 7, 7), (8, 1, 3, 3), dict(group=8), "conv_depthwise"),  # no padding
    ((1, 8, 16, 16), (8, 1, 3, 3), dict(group=8, strides=(3, 3), pads=(1, 1, 1, 1)), "conv_depthwise"),
    # narrow rows: several output rows per vector (7 wide: 2 rows), the 14-wide row, 3 wide x 5 rows
    ((1, 16, 7, 7), (16, 1, 3, 3), dict(group=16, pads=(1, 1, 1, 1)), "conv_depthwise"),
    ((1, 16, 14, 14), (16, 1, 3, 3), dict(group=16, strides=(2, 2), pads=(1, 1, 1, 1)), "conv_depthwise"),
    ((1, 8, 5, 3), (8, 1, 3, 3), dict(group=8, pads=(1, 1, 1, 1)), "conv_depthwise"),
    # rows of 37: the last vector overlaps its predecessor; 7 taps wide with dilation: 2 words of taps
    ((1, 8, 30, 37), (8, 1, 3, 3), dict(group=8, pads=(1, 1, 1, 1)), "conv_depthwise"),
    ((1, 8, 11, 11), (8, 1, 3, 7), dict(group=8, pads=(1, 3, 1, 3), dilations=(1, 2)), "conv_depthwise"),
    # Big enough for the parallel loops (pack, tiles, compaction; depthwise channels).
    ((1, 32, 48, 48), (32, 32, 3, 3), dict(pads=(1, 1, 1, 1)), "conv_dense"),
    ((1, 16, 56, 56), (24, 16, 1, 1), {}, "conv_dense"),  # 1x1: the flat pack split by pixel tiles
    ((1, 64, 28, 28), (64, 1, 3, 3), dict(group=64, pads=(1, 1, 1, 1)), "conv_depthwise"),
]
DEPTHWISE_CASES = [case for case in CONV_CASES if case[3] == "conv_depthwise"]
# The depthwise kernel this machine gets: 4 taps per vpdpbusd where AVX-512 VBMI (vpermb) is there.
HOST_DEPTHWISE = "conv_depthwise_vnni" if schedules.target_has_vbmi(None) else "conv_depthwise"
# AVX-512 VNNI without VBMI: the depthwise kernel with one tap per int32 multiply-add.
NO_VBMI = {"kind": "llvm", "mcpu": "cascadelake"}


@pytest.mark.parametrize("x_shape, w_shape, attrs, variant", CONV_CASES)
@pytest.mark.parametrize("x_dtype, y_dtype, per_channel, ties", [
    ("uint8", "uint8", True, True),  # tie channels: the general int64 epilogue
    ("int8", "int8", False, False),  # random multipliers: the tie-free epilogue
    ("uint8", "uint8", True, False),
    # 8-bit in, 16-bit out: an 8-bit layer whose reader takes 16-bit activations
    ("uint8", "uint16", True, True),
    ("int8", "int16", False, False),
    # 16-bit in (two byte planes, 256 * acc_hi + acc_lo), 16- and 8-bit out
    ("uint16", "uint16", True, True),
    ("int16", "int8", False, False),
    ("uint16", "uint8", True, False),
    ("int16", "int16", True, True),
])
def test_qconv_kernels_bit_exact(x_shape, w_shape, attrs, variant, x_dtype, y_dtype, per_channel, ties):
    rng = _rng(x_shape, w_shape, x_dtype, ties)
    node, x, w, bias, full = _case(rng, "QConv", x_shape, w_shape, x_dtype, y_dtype, per_channel, ties, **attrs)
    variant = HOST_DEPTHWISE if variant == "conv_depthwise" else variant
    _check(node, x, w, bias, full, variant, "exact" if ties else "tie_free")


@pytest.mark.parametrize("x_shape, w_shape, attrs, variant, heap_buffers", [
    ((1, 40, 7, 7), (24, 40, 1, 1), {}, "conv_dense", 1),  # the packed input (a flat grid: no y staging)
    ((1, 3, 17, 17), (32, 3, 3, 3), dict(strides=(2, 2), pads=(1, 1, 1, 1)), "conv_dense", 2),  # + the y grid
    # the padded plane of the last channel (its loads from x could run past the end of x)
    ((1, 8, 30, 37), (8, 1, 3, 3), dict(group=8, pads=(1, 1, 1, 1)), "conv_depthwise", 1),
    ((1, 1280), (1280, 40), {}, "gemm", 1),  # the shifted input (1280 bytes: over the stack limit)
])
@pytest.mark.parametrize("x_dtype", ["uint8", "int16"])  # 16-bit: twice the accumulators, still on the stack
def test_tile_scratch_is_not_heap_allocated(x_shape, w_shape, attrs, variant, heap_buffers, x_dtype):
    """Per-tile accumulators and staging are stack allocas (registers, once LLVM promotes them):
    only the kernel-wide buffers call TVMBackendAllocWorkspace. A "local"-scope or 1 KiB tile
    buffer becomes a workspace call per tile with accumulators kept in memory (1.2-2.4x slower)."""
    op = "QGemm" if variant == "gemm" else "QConv"
    node, x, w, bias, full = _case(_rng(x_shape, w_shape), op, x_shape, w_shape, x_dtype, "uint8", False, False,
                                   **attrs)
    kernel = schedules.schedule_for(node, [x.shape, w.shape, bias.shape], full, {"w": w, "b": bias},
                                    [x_dtype, "int8", "int32"])
    assert kernel is not None and kernel.variant == (HOST_DEPTHWISE if variant == "conv_depthwise" else variant)
    llvm_ir = schedules.build_kernel(kernel).inspect_source("ll")
    assert llvm_ir.count("load ptr, ptr @__TVMBackendAllocWorkspace") == heap_buffers


@pytest.mark.parametrize("x_shape, w_shape, attrs, variant", [CONV_CASES[0], DEPTHWISE_CASES[0]])
@pytest.mark.parametrize("shifts", [(32,), (32, 33, 40)])
def test_tie_free_epilogue_at_the_smallest_shift(x_shape, w_shape, attrs, variant, shifts):
    """s == 32 (no right shift left after taking the products' high halves), alone and mixed."""
    rng = _rng(x_shape, w_shape, shifts)
    node, x, w, bias, full = _case(rng, "QConv", x_shape, w_shape, "uint8", "uint8", False, False, **attrs)
    channels = w_shape[0]
    shift = np.resize(np.array(shifts), channels if len(shifts) > 1 else 1)
    reduction = int(np.prod(w_shape[1:]))
    # the same output range as _case's multipliers (about +-64 steps), odd: no ties possible
    scale = 64 / (128 * 128 * np.sqrt(reduction))
    full["multiplier"] = (np.round(scale * 2.0 ** shift) // 2 * 2 + 1).astype(np.int64).tolist()
    full["shift"] = shift.tolist()
    _check(node, x, w, bias, full, HOST_DEPTHWISE if variant == "conv_depthwise" else variant, "tie_free")


@pytest.mark.parametrize("x_shape, w_shape, attrs, variant", DEPTHWISE_CASES)
@pytest.mark.parametrize("x_dtype, y_dtype, per_channel, ties", [("uint8", "uint8", True, True),
                                                                 ("int8", "int8", False, False),
                                                                 ("uint16", "uint16", True, True),  # one uint16 plane
                                                                 ("int16", "int8", False, False)])
def test_depthwise_kernel_without_vbmi_bit_exact(x_shape, w_shape, attrs, variant, x_dtype, y_dtype, per_channel,
                                                 ties):
    """The depthwise kernel for VNNI CPUs without VBMI (e.g. Cascade Lake), run on this one."""
    assert not schedules.target_has_vbmi(NO_VBMI) and schedules.target_has_vnni(NO_VBMI)
    rng = _rng(x_shape, w_shape, x_dtype, ties)
    node, x, w, bias, full = _case(rng, "QConv", x_shape, w_shape, x_dtype, y_dtype, per_channel, ties, **attrs)
    _check(node, x, w, bias, full, "conv_depthwise", "exact" if ties else "tie_free", target=NO_VBMI)


def test_tie_free_epilogue_decision_is_exact():
    """The short epilogue is allowed exactly when no |v| <= bound is a rounding tie of v * M / 2**s
    (brute force over every v), and never for s < 32, M >= 2**31 or a bound that overflows int32."""
    from compiler.requant import requantize

    for multiplier, shift in [(3 << 20, 32), (5 << 27, 40), (0x7FF00000, 33), (1 << 30, 45)]:
        threshold = 1 << (shift - 1 - ((multiplier & -multiplier).bit_length() - 1))
        for bound in (threshold - 1, threshold):
            v = np.arange(-bound, bound + 1, dtype=np.int64)
            half_up = (v * multiplier + (1 << (shift - 1))) >> shift
            same = np.array_equal(half_up, requantize(v, multiplier, shift))
            allowed = schedules.tie_free_epilogue(np.array([multiplier]), np.array([shift]), np.array([bound]))
            assert allowed == (bound < threshold)
            assert same or not allowed  # allowed => exact
            assert bound < threshold or not same  # the first tie is at the threshold itself
    assert not schedules.tie_free_epilogue(np.array([12345]), np.array([31]), np.array([1]))
    assert not schedules.tie_free_epilogue(np.array([2**31]), np.array([40]), np.array([1]))
    assert not schedules.tie_free_epilogue(np.array([12345]), np.array([60]), np.array([2**31]))
    assert schedules.tie_free_epilogue(np.array([0, 12345]), np.array([40, 60]), np.array([2**31 - 1, 2**31 - 1]))


@pytest.mark.parametrize("n, k, m", [(1, 1280, 1000), (1, 27, 10), (3, 64, 40)])
@pytest.mark.parametrize("x_dtype, y_dtype", [("uint8", "uint8"), ("int8", "uint8"), ("uint8", "int16"),
                                              ("uint16", "uint8"), ("int16", "int16")])
def test_qgemm_kernel_bit_exact(n, k, m, x_dtype, y_dtype):
    rng = np.random.default_rng(k * 1000 + m)
    node, x, w, bias, attrs = _case(rng, "QGemm", (n, k), (k, m), x_dtype, y_dtype, True)
    _check(node, x, w, bias, attrs, "gemm")


@pytest.mark.parametrize("op, x_shape, w_shape, attrs", [
    ("QConv", (1, 128, 9, 9), (16, 128, 3, 3), dict(pads=(1, 1, 1, 1))),
    ("QGemm", (2, 1024), (1024, 48), {}),
])
@pytest.mark.parametrize("x_dtype", ["uint16", "int16"])
def test_16_bit_accumulators_beyond_int32_are_exact(op, x_shape, w_shape, attrs, x_dtype):
    """Inputs at the ends of the 16-bit range whose sign matches the weights': sum(x * w) passes
    2**31, so only the int64 combination 256 * acc_hi + acc_lo gives it, while each byte plane's
    sum (and, the weights summing to about 0, the int16 -> uint16 bias) stays in int32."""
    rng = _rng(op, x_shape, x_dtype)
    node, x, w, bias, full = _case(rng, op, x_shape, w_shape, x_dtype, "int16", True, False, **attrs)
    info = np.iinfo(x_dtype)
    reduced = w_shape[1] if op == "QConv" else w_shape[0]  # the input channel / feature axis
    sign = rng.permutation(np.resize([-1, 1], reduced))
    magnitude = rng.integers(100, 128, w.shape)
    w[...] = magnitude * (sign.reshape(1, -1, 1, 1) if op == "QConv" else sign.reshape(-1, 1))
    top = rng.integers(info.max - 3000, info.max + 1, x.shape)
    bottom = rng.integers(info.min, info.min + 3001, x.shape)
    x[...] = np.where((sign.reshape(1, -1, 1, 1) if op == "QConv" else sign.reshape(1, -1)) > 0, top, bottom)
    acc = (accumulate_qconv if op == "QConv" else accumulate_qgemm)(x, w, bias.astype(np.int64), full)
    assert np.abs(acc).max() >= 2**31
    # one multiplier and shift that map the largest |acc| to about 30000: no saturation
    full["shift"] = [31 + int(np.ceil(np.log2(np.abs(acc).max() / 30000)))]
    full["multiplier"], full["y_zero_point"] = [int(rng.integers(2**30, 2**31))], 0
    _check(node, x, w, bias, full, "conv_dense" if op == "QConv" else "gemm", "exact")


def test_uncovered_nodes_fall_back_to_generic():
    rng = np.random.default_rng(0)
    # grouped (not depthwise) conv
    node, x, w, bias, attrs = _case(rng, "QConv", (1, 8, 6, 6), (8, 4, 3, 3), "uint8", "uint8", True, group=2)
    assert schedules.schedule_for(node, [x.shape], attrs, {"w": w, "b": bias}, ["uint8"]) is None
    # weight not a constant
    assert schedules.schedule_for(node, [x.shape], attrs, {}, ["uint8"]) is None
    # strides above 3 (phase planes are not worth it)
    node, x, w, bias, attrs = _case(rng, "QConv", (1, 8, 16, 16), (8, 8, 4, 4), "uint8", "uint8", True, strides=(4, 4))
    assert schedules.schedule_for(node, [x.shape], attrs, {"w": w, "b": bias}, ["uint8"]) is None
    # QMul has no kernel here
    mul = onnx.helper.make_node("QMul", ["a", "b"], ["y"], domain="edgeq")
    assert schedules.schedule_for(mul, [(1, 4), (1, 4)], {}, {}, ["uint8", "uint8"]) is None


@pytest.mark.parametrize("shape", [(1, 3, 20, 21), (1, 3, 64, 67)])  # a tail of 12; 3 chunks + 3 vectors
@pytest.mark.parametrize("dtype, zero_point, qmin, qmax", [("uint8", 117, 0, 255), ("int8", -3, -127, 127)])
def test_quantize_edge_matches_quantize_linear(dtype, zero_point, qmin, qmax, shape):
    scale = 0.0173
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    flat = x.reshape(-1)
    # exact halves (ties: round half to even), extremes, signed zero, tiny values
    flat[:400] = (np.arange(400) - 200).astype(np.float32) * np.float32(scale) * np.float32(0.5)
    flat[400:408] = [1e30, -1e30, 0.0, -0.0, 1e-30, 3e4, -3e4, scale / 2]
    node = onnx.helper.make_node("Quantize", ["x"], ["y"], domain="edgeq", scale=scale, y_zero_point=zero_point,
                                 y_min=qmin, y_max=qmax, y_dtype=dtype)
    kernel = schedules.schedule_for(node, [x.shape], None, {}, ["float32"])
    assert kernel is not None and kernel.variant == "quantize" and kernel.out_shape == x.shape
    got = schedules.run_kernel(schedules.build_kernel(kernel), kernel, x)
    np.testing.assert_array_equal(got, quantize_linear(x, scale, zero_point, qmin, qmax, dtype))


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("shape, attrs", [
    ((1, 8, 23, 23), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),  # ResNet stem pool
    ((1, 4, 12, 17), dict(kernel_shape=[2, 2], strides=[2, 2])),
    ((2, 3, 9, 9), dict(kernel_shape=[3, 2], strides=[1, 1], pads=[1, 0, 1, 1], dilations=[1, 2])),
    ((1, 64, 40, 40), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),  # parallel
])
def test_maxpool_kernel_matches_onnxruntime(dtype, shape, attrs):
    import onnxruntime as ort

    info = np.iinfo(dtype)
    x = np.random.default_rng(3).integers(info.min, info.max + 1, shape).astype(dtype)
    node = onnx.helper.make_node("MaxPool", ["x"], ["y"], **attrs)
    kernel = schedules.schedule_for(node, [x.shape], None, {}, [dtype])
    assert kernel is not None and kernel.variant == "maxpool"
    got = schedules.run_kernel(schedules.build_kernel(kernel), kernel, x)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph([node], "pool", [onnx.helper.make_tensor_value_info("x", elem, shape)],
                                   [onnx.helper.make_tensor_value_info("y", elem, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("a_dtype, b_dtype, y_dtype", [("uint8", "uint8", "uint8"), ("int8", "uint8", "int8"),
                                                    ("uint8", "int8", "uint16"), ("uint16", "uint16", "uint16"),
                                                    ("int16", "uint8", "int16"), ("uint16", "int16", "uint8")])
@pytest.mark.parametrize("shape, ties", [
    ((1, 24, 9, 9), True),  # a_M = b_M = 2**30, s = 31: half the outputs are exact ties
    ((1, 24, 9, 9), False),  # 1944 values: 121 vectors and a 8-value scalar tail
    ((2, 64, 28, 28), False),  # several parallel chunks
])
def test_qadd_kernel_bit_exact(shape, ties, a_dtype, b_dtype, y_dtype):
    rng = _rng(shape, ties, a_dtype)
    a = rng.integers(np.iinfo(a_dtype).min, np.iinfo(a_dtype).max + 1, shape).astype(a_dtype)
    b = rng.integers(np.iinfo(b_dtype).min, np.iinfo(b_dtype).max + 1, shape).astype(b_dtype)
    if ties:
        a_mult, b_mult, shift = 2**30, 2**30, 31
    else:
        a_mult, b_mult, shift = int(rng.integers(2**30, 2**31)), int(rng.integers(2**27, 2**31)), int(rng.integers(31, 34))
    if np.dtype(y_dtype).itemsize < max(np.dtype(a_dtype).itemsize, np.dtype(b_dtype).itemsize):
        shift += 8  # a 16-bit sum into 8 bits: scaled down as a real requantization would, not all clipped
    lo, hi = np.iinfo(y_dtype).min, np.iinfo(y_dtype).max
    attrs = dict(a_zero_point=int(rng.integers(0, 40)), b_zero_point=int(rng.integers(-20, 20)), a_multiplier=a_mult,
                 b_multiplier=b_mult, shift=shift, y_zero_point=int(rng.integers(lo // 2, hi // 2)), y_min=int(lo) + 2,
                 y_max=int(hi), y_dtype=y_dtype)
    node = onnx.helper.make_node("QAdd", ["a", "b"], ["y"], domain="edgeq", **attrs)
    kernel = schedules.schedule_for(node, [shape, shape], None, {}, [a_dtype, b_dtype])
    assert kernel is not None and kernel.variant == "qadd" and kernel.inputs == 2
    got = schedules.run_kernel(schedules.build_kernel(kernel), kernel, a, b)
    acc = ((a.astype(np.int64) - attrs["a_zero_point"]) * a_mult + (b.astype(np.int64) - attrs["b_zero_point"]) * b_mult)
    if ties:
        assert np.any(acc % 2**shift == 2 ** (shift - 1)), "the case never hits a rounding tie"
    ref = np.clip(requantize(acc, np.int64(1), np.int64(shift)) + attrs["y_zero_point"], lo + 2, hi).astype(y_dtype)
    assert len(np.unique(ref)) > 32
    np.testing.assert_array_equal(got, ref)


def test_qadd_broadcast_or_constant_operand_stays_generic():
    node = onnx.helper.make_node("QAdd", ["a", "b"], ["y"], domain="edgeq", a_multiplier=2**30, b_multiplier=2**30,
                                 shift=31, y_min=0, y_max=255, y_dtype="uint8")
    assert schedules.schedule_for(node, [(1, 8, 4, 4), (1, 8, 1, 1)], None, {}, ["uint8", "uint8"]) is None
    constant = {"b": np.zeros((1, 8, 4, 4), np.uint8)}
    assert schedules.schedule_for(node, [(1, 8, 4, 4), (1, 8, 4, 4)], None, constant, ["uint8", "uint8"]) is None


def test_cross_targets_get_only_portable_kernels():
    """The VNNI kernels are x86-only (LLVM aborts on them for aarch64); MaxPool, QAdd and the
    Quantize edge are plain TIR and build for aarch64 too."""
    import tvm

    aarch64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    assert not schedules.target_has_vnni(aarch64)
    assert schedules.target_has_vnni(schedules.host_target())
    rng = np.random.default_rng(0)
    node, x, w, bias, attrs = _case(rng, "QConv", (1, 8, 6, 6), (8, 8, 1, 1), "uint8", "uint8", True)
    constants = {"w": w, "b": bias}
    assert schedules.schedule_for(node, [x.shape], attrs, constants, ["uint8"], target=aarch64) is None
    assert schedules.schedule_for(node, [x.shape], attrs, constants, ["uint8"]) is not None
    pool = onnx.helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    quant = onnx.helper.make_node("Quantize", ["x"], ["y"], domain="edgeq", scale=0.1, y_zero_point=3,
                                  y_min=0, y_max=255, y_dtype="uint8")
    add = onnx.helper.make_node("QAdd", ["a", "b"], ["y"], domain="edgeq", a_multiplier=2**30, b_multiplier=2**29,
                                shift=31, y_min=0, y_max=255, y_dtype="uint8")
    for portable, dtype in ((pool, "int8"), (quant, "float32"), (add, "uint8")):
        kernel = schedules.schedule_for(portable, [(1, 8, 20, 20)] * len(portable.input), None, {},
                                        [dtype] * len(portable.input), target=aarch64)
        assert kernel is not None
        tvm.tirx.build(kernel.func, target=aarch64)  # object code only: it cannot run here


@pytest.mark.skipif(not schedules.target_has_vbmi(None), reason="needs AVX-512 VBMI")
@pytest.mark.parametrize("x_dtype, y_dtype", [("uint8", "uint8"), ("int8", "int8"), ("int8", "uint8"),
                                              ("uint8", "int8")])
@pytest.mark.parametrize("shape, levels", [
    ((1, 6, 5), 256),  # 30 values: the scalar tail alone
    ((1, 16, 57, 57), 256),  # 812 vectors of 64 and a 16-value tail
    ((2, 64, 28, 28), 256),  # several parallel chunks
    ((1, 16, 57, 57), 150),  # a clamped input: its table covers 150 levels from x_min up
])
def test_lookup_kernel_bit_exact(shape, levels, x_dtype, y_dtype):
    rng = np.random.default_rng(zlib.crc32(f"{shape}{levels}{x_dtype}{y_dtype}".encode()))
    x_min = int(np.iinfo(x_dtype).min) + (0 if levels == 256 else 40)
    x = rng.integers(x_min, x_min + levels, shape).astype(x_dtype)
    table = rng.integers(np.iinfo(y_dtype).min, np.iinfo(y_dtype).max + 1, levels)
    node = onnx.helper.make_node("QLookup", ["x"], ["y"], domain="edgeq", table=[int(v) for v in table], x_min=x_min,
                                 y_zero_point=0, y_min=int(np.iinfo(y_dtype).min), y_max=int(np.iinfo(y_dtype).max),
                                 y_dtype=y_dtype)
    kernel = schedules.schedule_for(node, [shape], None, {}, [x_dtype])
    assert kernel is not None and kernel.variant == "lookup_vbmi"
    got = schedules.run_kernel(schedules.build_kernel(kernel), kernel, x)
    np.testing.assert_array_equal(got, table[x.astype(np.int64) - x_min].astype(y_dtype))


def test_lookup_without_vbmi_or_on_16_bits_stays_generic():
    node = onnx.helper.make_node("QLookup", ["x"], ["y"], domain="edgeq", table=list(range(256)), x_min=0,
                                 y_zero_point=0, y_min=0, y_max=255, y_dtype="uint8")
    cascadelake = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})  # VNNI, no VBMI
    assert schedules.schedule_for(node, [(1, 8, 4, 4)], None, {}, ["uint8"], target=cascadelake) is None
    wide = onnx.helper.make_node("QLookup", ["x"], ["y"], domain="edgeq", table=[0] * 65536, x_min=-32768,
                                 y_zero_point=0, y_min=0, y_max=255, y_dtype="uint8")
    assert schedules.schedule_for(wide, [(1, 8, 4, 4)], None, {}, ["int16"]) is None
