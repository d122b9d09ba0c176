"""Hand-written TIR kernels for the integer ops on x86 with AVX-512 VNNI.

Each generator returns a ``tvm.tirx.PrimFunc`` for one fixed shape. The
activation layout stays NCHW (the integer graph's layout); every kernel
re-packs its input into a scratch buffer that suits the instructions:

* **dense conv** (``group == 1``, any kernel size/stride/dilation/padding):
  the padded input is split into ``stride_h * stride_w`` *phase planes* so that
  for every tap ``(kh, kw)`` the 16 output pixels of a vector read 16
  consecutive plane positions, and each position holds 4 consecutive input
  channels (``[C/4, phase, plane, 4]`` uint8). One ``vpdpbusd`` then multiplies
  16 pixels x 4 channels (u8, the activation) by 4 broadcast weight bytes (s8)
  and accumulates into 16 int32 lanes: no im2col. The output is computed on the
  plane grid ``H_out x W_plane`` (columns past ``W_out`` are garbage lanes and
  are not stored), which keeps every vector load contiguous.
* **depthwise conv**: same phase planes without the channel interleave, int32
  multiply-accumulate over 16 pixels per tap.
* **gemm** (``QGemm``): lanes are output features; weights are pre-packed as
  ``[M/16, K/4, 16, 4]`` and 4 activation bytes are broadcast.

Padding and plane slack hold the input zero point, so the spec's "padding
reads x_zero_point" holds and the folded bias stays exact. int8 activations are
shifted to uint8 (``x ^ 0x80``, zero point + 128) and the weight sum times 128
is moved into the bias by :mod:`targets.cpu.schedules`.

Every kernel ends with the fused epilogue of :mod:`compiler.intgraph`:
``y = clip(requant(acc, M, s) + y_zp)`` in int64 with
:mod:`compiler.requant`'s rounding (half to even), per channel.
Threads come from TVM's runtime pool (``TVM_NUM_THREADS``): the outer tile loop
is ``parallel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # int32 lanes of one zmm register
VNNI = "llvm.x86.avx512.vpdpbusd.512"
MAX_ACCUMULATORS = 24  # zmm registers given to accumulators (32 in all)


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one 2-D convolution, in the ONNX attribute meaning."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right

    @property
    def out_height(self) -> int:
        kh = (self.kernel[0] - 1) * self.dilations[0] + 1
        return (self.height + self.pads[0] + self.pads[2] - kh) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        kw = (self.kernel[1] - 1) * self.dilations[1] + 1
        return (self.width + self.pads[1] + self.pads[3] - kw) // self.strides[1] + 1


@dataclass(frozen=True)
class Requant:
    """Epilogue constants that are not per channel (per-channel ones are buffers)."""

    y_zero_point: int
    y_min: int
    y_max: int
    y_dtype: str  # "uint8" or "int8"


@dataclass(frozen=True)
class PhasePlanes:
    """Where each tap of a strided/dilated conv reads in the phase-split input."""

    phases: int  # stride_h * stride_w planes (unused ones are never packed)
    used: tuple[tuple[int, int], ...]  # (row phase, column phase) of planes some tap reads
    plane_h: int
    plane_w: int
    plane_len: int  # elements per plane, incl. slack read by the last tile's garbage lanes
    grid: int  # out_height * plane_w: outputs computed per channel (incl. garbage columns)


def phase_planes(g: ConvGeometry, tile_pixels: int) -> PhasePlanes:
    (sh, sw), (dh, dw) = g.strides, g.dilations
    kh_off = [kh * dh for kh in range(g.kernel[0])]
    kw_off = [kw * dw for kw in range(g.kernel[1])]
    plane_h = g.out_height + max(o // sh for o in kh_off)
    plane_w = g.out_width + max(o // sw for o in kw_off)
    grid = g.out_height * plane_w
    tiles = math.ceil(grid / tile_pixels)
    max_offset = max(o // sh for o in kh_off) * plane_w + max(o // sw for o in kw_off)
    plane_len = max(plane_h * plane_w, tiles * tile_pixels + max_offset)
    plane_len = math.ceil(plane_len / 64) * 64
    used = tuple(sorted({(a % sh, b % sw) for a in kh_off for b in kw_off}))
    return PhasePlanes(sh * sw, used, plane_h, plane_w, plane_len, grid)


def _in_set(value: tirx.PrimExpr, allowed: list[int]) -> tirx.PrimExpr:
    """``value`` equals one of ``allowed`` (a small static set)."""
    cond = value == allowed[0]
    for other in allowed[1:]:
        cond = tirx.Or(cond, value == other)
    return cond


def _lanes(value: tirx.PrimExpr) -> int:
    """Vector width of an expression's type ("uint8x16" -> 16, "int32" -> 1)."""
    name = str(value.ty)
    return int(name.split("x")[1]) if "x" in name else 1


def _as_u8(value: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    """Activation value(s) as uint8; int8 is shifted by 128 (bit flip of the sign)."""
    lanes = _lanes(value)
    u8 = "uint8" if lanes == 1 else f"uint8x{lanes}"
    if not signed:
        return value
    flipped = tirx.reinterpret(u8, value)
    mask = tirx.const(128, "uint8") if lanes == 1 else tirx.Broadcast(tirx.const(128, "uint8"), lanes)
    return tirx.bitwise_xor(flipped, mask)


def _interleave4(x, n, c0, h, w0, signed: bool) -> tirx.PrimExpr:
    """16 pixels of channels c0..c0+3 of NCHW ``x`` -> 64 bytes ``[pixel][channel]`` (uint8)."""
    ramp = tirx.Ramp(w0, 1, LANES)
    rows = [_as_u8(tirx.BufferLoad(x, [n, c0 + j, h, ramp]), signed) for j in range(4)]
    return tirx.Shuffle(rows, [j * LANES + lane for lane in range(LANES) for j in range(4)])


def requant_vector(acc: tirx.PrimExpr, bias, mult, rnd, shift, rq: Requant) -> tirx.PrimExpr:
    """``clip(requant(acc + bias, M, s) + y_zp)`` on 16 int32 lanes, cast to the y dtype.

    ``rnd`` is ``1 << (s - 1)``; requant rounds half to even (see :mod:`compiler.requant`).

    ``bias, mult, rnd, shift`` are scalars (one output channel: broadcast) or 16-lane
    vectors (one value per lane).
    """

    def b64(v):
        if _lanes(v) == 1:
            return tirx.Broadcast(tirx.Cast("int64", v), LANES)
        return tirx.Cast(f"int64x{LANES}", v)

    product = (tirx.Cast(f"int64x{LANES}", acc) + b64(bias)) * b64(mult)
    half = b64(rnd)
    value = tirx.shift_right(product + half, b64(shift))
    # Exact ties go to the even neighbour (compiler.requant's rule).
    one = tirx.Broadcast(tirx.const(1, "int64"), LANES)
    tie = tirx.Cast(f"int64x{LANES}", tirx.bitwise_and(product, half + half - one) == half)
    value = value - tirx.bitwise_and(tie, tirx.bitwise_and(value, one))
    value = value + tirx.Broadcast(tirx.const(rq.y_zero_point, "int64"), LANES)
    value = tirx.max(value, tirx.Broadcast(tirx.const(rq.y_min, "int64"), LANES))
    value = tirx.min(value, tirx.Broadcast(tirx.const(rq.y_max, "int64"), LANES))
    return tirx.Cast(f"{rq.y_dtype}x{LANES}", value)


def choose_tile(rows: int, vectors: int, max_acc: int = MAX_ACCUMULATORS) -> tuple[int, int]:
    """Register tile (output rows, 16-pixel vectors) that minimises padded work per load.

    Cost = padded MACs x (1 + loads per vpdpbusd); a tile count below 4 is penalised so
    that two threads both get work.
    """
    best = None
    for ob in range(1, 9):
        for pv in range(1, 9):
            if ob * pv > max_acc:
                continue
            tiles = math.ceil(rows / ob) * math.ceil(vectors / pv)
            work = tiles * ob * pv * (1.0 + 0.5 * (ob + pv) / (ob * pv))
            if tiles < 4:
                work *= 1.0 + (4 - tiles) * 0.25
            key = (work, -ob * pv)
            if best is None or key < best[0]:
                best = (key, (ob, pv))
    return best[1]


def conv_kernel(
    g: ConvGeometry,
    x_dtype: str,
    x_zero_point: int,
    rq: Requant,
    depthwise: bool,
    tile: tuple[int, int] | None = None,
) -> tuple[tvm.tirx.PrimFunc, tuple[int, int]]:
    """NCHW integer conv (dense via VNNI, or depthwise) with the fused requant epilogue.

    Parameters of the PrimFunc: ``x [N,C,H,W] x_dtype``, ``w`` (packed by
    :func:`targets.cpu.schedules.pack_conv_weights`), ``bias/mult/rnd/shift [OC]``
    (int32, int64, int64, int64), ``y [N,OC,Ho,Wo] y_dtype``. Returns the function
    and the (rows, vectors) register tile, which fixes the weight packing.
    """
    signed = x_dtype == "int8"
    zp = x_zero_point + (128 if signed else 0)  # the zero point after the shift to uint8
    N, C, H, W, OC = g.batch, g.in_channels, g.height, g.width, g.out_channels
    KH, KW = g.kernel
    (sh, sw), (dh, dw) = g.strides, g.dilations
    pt, pl = g.pads[0], g.pads[1]
    Ho, Wo = g.out_height, g.out_width
    if depthwise:
        OB, PV = tile or (1, min(8, math.ceil(Ho * (Wo + KW) / LANES)))
    else:
        # Approximate plane width for the tile choice; exact geometry follows.
        OB, PV = tile or choose_tile(OC, math.ceil(Ho * (Wo + (KW - 1) * dw // sw) / LANES))
    TP = PV * LANES  # pixels per tile
    pp = phase_planes(g, TP)
    NPH, L, PW, GRID = pp.phases, pp.plane_len, pp.plane_w, pp.grid
    NQT = math.ceil(GRID / TP)  # pixel tiles per channel
    CG = C if depthwise else math.ceil(C / 4)  # packed channel groups
    CL = 1 if depthwise else 4  # channels per packed position
    NOT = math.ceil(OC / OB)
    O_pad = NOT * OB
    C4 = CG
    C4_full = C // 4
    rows_used = sorted({a for a, _ in pp.used})
    cols_used = sorted({b for _, b in pp.used})

    # Plane rows/columns [lo, hi) that hold real input (the rest keeps the zero point).
    def h_lo(a):
        return tirx.max(0, tirx.floordiv(pt - a + sh - 1, sh))

    def h_hi(a):
        return tirx.max(h_lo(a), tirx.min(pp.plane_h, tirx.floordiv(H - 1 + pt - a, sh) + 1))

    def w_lo(b):
        return tirx.max(0, tirx.floordiv(pl - b + sw - 1, sw))

    def w_hi(b):
        return tirx.max(w_lo(b), tirx.min(PW, tirx.floordiv(W - 1 + pl - b, sw) + 1))
    taps = KH * KW
    zp_u8 = tirx.const(zp, "uint8")
    y_flat = Wo == PW  # no garbage columns: vector stores straight into y
    x_signed = signed

    def plane_base(c, a, b):
        return ((c * NPH + a * sw + b) * L) * CL

    @T.prim_func
    def dense(
        x: T.Buffer((N, C, H, W), x_dtype),
        w: T.Buffer((NOT, taps, C4, OB), "int32"),
        bias: T.Buffer((O_pad,), "int32"),
        mult: T.Buffer((O_pad,), "int64"),
        rnd: T.Buffer((O_pad,), "int64"),
        shift: T.Buffer((O_pad,), "int64"),
        y: T.Buffer((N, OC, Ho, Wo), rq.y_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((C4 * NPH * L * 4,), "uint8")
        yf = T.decl_buffer((N * OC * Ho * Wo,), rq.y_dtype, data=y.data)
        for n in range(N):
            for c4 in T.parallel(C4):
                for a, b in T.grid(sh, sw):
                    if _in_set(a, rows_used) and _in_set(b, cols_used):
                        for i in range(L * 4 // 64):
                            for lane in T.vectorized(64):
                                xq[plane_base(c4, a, b) + i * 64 + lane] = zp_u8
                        if c4 < C4_full:
                            for hq in range(h_lo(a), h_hi(a)):
                                if sw == 1:
                                    for wv in range((w_hi(b) - w_lo(b)) // LANES):
                                        xq[T.ramp(plane_base(c4, a, b) + (hq * PW + w_lo(b) + wv * LANES) * 4, 1, 64)] = _interleave4(
                                            x, n, c4 * 4, hq * sh + a - pt, w_lo(b) + wv * LANES + b - pl, x_signed
                                        )
                                    for wq, j in T.grid((w_hi(b) - w_lo(b)) % LANES, 4):
                                        xq[plane_base(c4, a, b) + (hq * PW + w_hi(b) - (w_hi(b) - w_lo(b)) % LANES + wq) * 4 + j] = _as_u8(
                                            x[n, c4 * 4 + j, hq * sh + a - pt, w_hi(b) - (w_hi(b) - w_lo(b)) % LANES + wq + b - pl], x_signed)
                                else:
                                    for wq, j in T.grid(w_hi(b) - w_lo(b), 4):
                                        xq[plane_base(c4, a, b) + (hq * PW + w_lo(b) + wq) * 4 + j] = _as_u8(
                                            x[n, c4 * 4 + j, hq * sh + a - pt, (w_lo(b) + wq) * sw + b - pl], x_signed)
                        else:
                            for hq, wq, j in T.grid(h_hi(a) - h_lo(a), w_hi(b) - w_lo(b), C - C4_full * 4):
                                xq[plane_base(c4, a, b) + ((h_lo(a) + hq) * PW + w_lo(b) + wq) * 4 + j] = _as_u8(
                                    x[n, c4 * 4 + j, (h_lo(a) + hq) * sh + a - pt, (w_lo(b) + wq) * sw + b - pl], x_signed)
            for t in T.parallel(NOT * NQT):
                acc = T.alloc_buffer((OB * TP,), "int32", scope="local")
                res = T.alloc_buffer((LANES,), rq.y_dtype, scope="local")
                for i in T.unroll(OB * PV):
                    acc[T.ramp(i * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                for kh, kw, c4 in T.grid(KH, KW, C4):
                    for i, v in T.grid(OB, PV):
                        acc[T.ramp((i * PV + v) * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16",
                            VNNI,
                            acc[T.ramp((i * PV + v) * LANES, 1, LANES)],
                            xq[T.ramp(
                                ((c4 * NPH + (kh * dh) % sh * sw + (kw * dw) % sw) * L
                                 + (t % NQT) * TP + v * LANES
                                 + (kh * dh) // sh * PW + (kw * dw) // sw) * 4, 1, 64)],
                            T.reinterpret("int8x64", T.broadcast(w[t // NQT, kh * KW + kw, c4, i], LANES)),
                        )
                for i, v in T.grid(OB, PV):
                    if (t // NQT) * OB + i < OC:
                        res[T.ramp(0, 1, LANES)] = requant_vector(
                            acc[T.ramp((i * PV + v) * LANES, 1, LANES)],
                            bias[(t // NQT) * OB + i], mult[(t // NQT) * OB + i],
                            rnd[(t // NQT) * OB + i], shift[(t // NQT) * OB + i], rq)
                        if y_flat:
                            if (t % NQT) * TP + v * LANES + LANES <= GRID:
                                yf[T.ramp(((n * OC + (t // NQT) * OB + i) * Ho * Wo) + (t % NQT) * TP + v * LANES, 1, LANES)] = res[T.ramp(0, 1, LANES)]
                            else:
                                for lane in range(LANES):
                                    if (t % NQT) * TP + v * LANES + lane < GRID:
                                        yf[((n * OC + (t // NQT) * OB + i) * Ho * Wo) + (t % NQT) * TP + v * LANES + lane] = res[lane]
                        else:
                            for lane in range(LANES):
                                if ((t % NQT) * TP + v * LANES + lane) % PW < Wo and (t % NQT) * TP + v * LANES + lane < GRID:
                                    y[n, (t // NQT) * OB + i, ((t % NQT) * TP + v * LANES + lane) // PW,
                                      ((t % NQT) * TP + v * LANES + lane) % PW] = res[lane]

    @T.prim_func
    def dw_conv(
        x: T.Buffer((N, C, H, W), x_dtype),
        w: T.Buffer((C, taps), "int32"),
        bias: T.Buffer((C,), "int32"),
        mult: T.Buffer((C,), "int64"),
        rnd: T.Buffer((C,), "int64"),
        shift: T.Buffer((C,), "int64"),
        y: T.Buffer((N, C, Ho, Wo), rq.y_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((C * NPH * L,), "uint8")
        yf = T.decl_buffer((N * C * Ho * Wo,), rq.y_dtype, data=y.data)
        for n in range(N):
            for c in T.parallel(C):
                for a, b in T.grid(sh, sw):
                    if _in_set(a, rows_used) and _in_set(b, cols_used):
                        for i in range(L // 64):
                            for lane in T.vectorized(64):
                                xq[plane_base(c, a, b) + i * 64 + lane] = zp_u8
                        for hq in range(h_lo(a), h_hi(a)):
                            for wq in range(w_hi(b) - w_lo(b)):
                                xq[plane_base(c, a, b) + hq * PW + w_lo(b) + wq] = _as_u8(
                                    x[n, c, hq * sh + a - pt, (w_lo(b) + wq) * sw + b - pl], x_signed)
                for qt in range(NQT):
                    acc = T.alloc_buffer((TP,), "int32", scope="local")
                    res = T.alloc_buffer((LANES,), rq.y_dtype, scope="local")
                    for v in T.unroll(PV):
                        acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                    for kh, kw in T.grid(KH, KW):
                        for v in T.unroll(PV):
                            acc[T.ramp(v * LANES, 1, LANES)] = acc[T.ramp(v * LANES, 1, LANES)] + T.Cast(
                                "int32x16",
                                xq[T.ramp(
                                    (c * NPH + (kh * dh) % sh * sw + (kw * dw) % sw) * L
                                    + qt * TP + v * LANES
                                    + (kh * dh) // sh * PW + (kw * dw) // sw, 1, LANES)],
                            ) * T.broadcast(w[c, kh * KW + kw], LANES)
                    for v in range(PV):
                        res[T.ramp(0, 1, LANES)] = requant_vector(
                            acc[T.ramp(v * LANES, 1, LANES)], bias[c], mult[c], rnd[c], shift[c], rq)
                        if y_flat:
                            if qt * TP + v * LANES + LANES <= GRID:
                                yf[T.ramp((n * C + c) * Ho * Wo + qt * TP + v * LANES, 1, LANES)] = res[T.ramp(0, 1, LANES)]
                            else:
                                for lane in range(LANES):
                                    if qt * TP + v * LANES + lane < GRID:
                                        yf[(n * C + c) * Ho * Wo + qt * TP + v * LANES + lane] = res[lane]
                        else:
                            for lane in range(LANES):
                                if (qt * TP + v * LANES + lane) % PW < Wo and qt * TP + v * LANES + lane < GRID:
                                    y[n, c, (qt * TP + v * LANES + lane) // PW, (qt * TP + v * LANES + lane) % PW] = res[lane]

    return (dw_conv if depthwise else dense), (OB, PV)


def gemm_kernel(
    batch: int, k: int, m: int, x_dtype: str, rq: Requant, vectors: int | None = None
) -> tuple[tvm.tirx.PrimFunc, int]:
    """``y[N, M] = requant(x[N, K] @ w[K, M] + bias)`` with VNNI; lanes = output features.

    PrimFunc parameters: ``x [N,K]``, ``w`` packed ``[M/16, K/4, 64]`` int8 (see
    :func:`targets.cpu.schedules.pack_gemm_weights`), ``bias/mult/rnd/shift [M_pad]``,
    ``y [N, M]``. Returns the function and the vectors (of 16 features) per tile.
    """
    signed = x_dtype == "int8"
    K4 = math.ceil(k / 4)
    MV16 = math.ceil(m / LANES)
    MV = vectors or max(1, min(8, MV16 // 2))
    NMT = math.ceil(MV16 / MV)
    M_pad = NMT * MV * LANES
    N = batch
    x_signed = signed

    @T.prim_func
    def gemm(
        x: T.Buffer((N, k), x_dtype),
        w: T.Buffer((NMT * MV, K4, 64), "int8"),
        bias: T.Buffer((M_pad,), "int32"),
        mult: T.Buffer((M_pad,), "int64"),
        rnd: T.Buffer((M_pad,), "int64"),
        shift: T.Buffer((M_pad,), "int64"),
        y: T.Buffer((N, m), rq.y_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        xs = T.alloc_buffer((N, K4 * 4), "uint8")
        for n, kk in T.grid(N, K4 * 4):
            xs[n, kk] = T.if_then_else(kk < k, _as_u8(x[n, T.min(kk, k - 1)], x_signed), T.uint8(0))
        for n in range(N):
            for t in T.parallel(NMT):
                acc = T.alloc_buffer((MV * LANES,), "int32", scope="local")
                res = T.alloc_buffer((LANES,), rq.y_dtype, scope="local")
                for v in T.unroll(MV):
                    acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                for k4 in range(K4):
                    for v in T.unroll(MV):
                        acc[T.ramp(v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16",
                            VNNI,
                            acc[T.ramp(v * LANES, 1, LANES)],
                            T.reinterpret("uint8x64", T.broadcast(T.reinterpret("int32", xs[n, T.ramp(k4 * 4, 1, 4)]), LANES)),
                            w[t * MV + v, k4, T.ramp(0, 1, 64)],
                        )
                for v in range(MV):
                    res[T.ramp(0, 1, LANES)] = requant_vector(
                        acc[T.ramp(v * LANES, 1, LANES)],
                        bias[T.ramp((t * MV + v) * LANES, 1, LANES)],
                        mult[T.ramp((t * MV + v) * LANES, 1, LANES)],
                        rnd[T.ramp((t * MV + v) * LANES, 1, LANES)],
                        shift[T.ramp((t * MV + v) * LANES, 1, LANES)], rq)
                    for lane in range(LANES):
                        if (t * MV + v) * LANES + lane < m:
                            y[n, (t * MV + v) * LANES + lane] = res[lane]

    return gemm, MV

