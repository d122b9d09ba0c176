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
* **depthwise conv** with AVX-512 VBMI (:func:`depthwise_vnni_kernel`): a
  64-byte load of the channel and a ``vpermt2b`` with a zero-point vector give
  16 pixels x 4 horizontally adjacent taps (padding lanes take the zero point),
  and one ``vpdpbusd`` does 4 taps; rows narrower than 16 share a vector
  (7-wide: 2 rows). The last channels, whose loads could run past the end of
  the tensor, go through a zero-point padded plane (``vpermb`` on it). Without VBMI
  (:func:`depthwise_kernel`): the phase planes without the channel interleave,
  int32 multiply-accumulate over 16 pixels per tap.
* **gemm** (``QGemm``): lanes are output features; weights are pre-packed as
  ``[M/16, K/4, 16, 4]`` and 4 activation bytes are broadcast.
* **max pool** and the float input edge (**quantize**): plain vector code, no
  VNNI (portable: the cross builds get them too).

Padding and plane slack hold the input zero point, so the spec's "padding
reads x_zero_point" holds and the folded bias stays exact. int8 activations are
shifted to uint8 (``x ^ 0x80``, zero point + 128) and the weight sum times 128
is moved into the bias by :mod:`targets.cpu.schedules`.

16-bit activations (uint16; int16 shifted by 32768 the same way): ``vpdpbusd`` multiplies
bytes only, so the conv and gemm kernels pack a low-byte and a high-byte plane where they
pack the 8-bit input (:class:`XPlanes`; the zero point is split into bytes likewise), run the
same instructions on both into two int32 accumulators and requantize
``256 * acc_hi + acc_lo`` (int64, or int32 where the tie-free epilogue's bound proves it fits:
:func:`_accumulated`). Each plane's sum is at most ``255 * sum|w|``: exact in int32 whatever
the total. The depthwise kernel without VBMI, which multiplies in int32 anyway, keeps the
16-bit input whole (one uint16 plane), and the VBMI depthwise kernel copies every channel
into padded byte planes (no direct 64-byte windows on 16-bit x).

Every kernel ends with the fused epilogue of :mod:`compiler.intgraph`:
``y = clip(requant(acc, M, s) + y_zp)`` in int64 with
:mod:`compiler.requant`'s rounding (half to even), per channel -- or, where
:func:`targets.cpu.schedules.tie_free_epilogue` proves it exact (every layer of
the real models so far), the short form of :class:`Requant` ``tie_free``: the
accumulator starts at the bias, rounding half up, int32 after the products' high
halves (half the instructions; the epilogue was half the time of the small-C
1x1 convs and the depthwise convs).
Threads come from TVM's runtime pool (``TVM_NUM_THREADS``): the outer tile loop
is ``parallel``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import tirx as IB

LANES = 16  # int32 lanes of one zmm register
VNNI = "llvm.x86.avx512.vpdpbusd.512"
# Work below which a loop stays serial: waking TVM's thread pool costs ~0.8 us here (far
# more on a loaded machine), more than small layers take on one core. Packing below 32 KiB
# stays serial: split across threads, the halves of a small packed input then cross cores
# (measured on MobileNetV2: 64 KiB -> 32 KiB sped up the 7x7 1x1 convs 13-20%, 8 KiB slowed
# the 28x28 ones 8%).
MIN_PARALLEL_MACS = 300_000
MIN_PARALLEL_BYTES = 32 * 1024
# Per-tile scratch (accumulators, partial-vector staging) must be "global" scope and under
# TVM's 1 KiB stack limit: only such allocations become stack allocas, which LLVM promotes
# to registers. "local" scope, or 1 KiB and more, becomes a TVMBackendAllocWorkspace call per
# tile and accumulators that live in memory (measured: the 16-accumulator tiles and "local"
# scope had made MobileNetV2's kernels 1.2x slower, its 7x7 depthwise convs 2.4x).
SCRATCH_SCOPE = "global"
# zmm accumulators per register tile: 15 x 64 B is the most under the stack limit above.
MAX_ACCUMULATORS = 15
# Up to this many valid lanes in a partial output vector are requantized one by one; more
# take one vector epilogue and 8/4/2/1-byte stores (measured: 1 lane scalar, 4 lanes vector).
SCALAR_TAIL = 2


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
    """Epilogue constants that are not per channel (per-channel ones are buffers).

    ``tie_free``: :func:`targets.cpu.schedules.tie_free_epilogue` proved for every
    channel that ``acc + bias`` fits int32 at every step (so the accumulator starts at
    the bias), ``M < 2**31``, ``s >= 32`` and that no ``(acc + bias) * M`` is a rounding
    tie; then round-half-even is round-half-up and the short epilogue of
    :func:`requant_expr` is exact.
    """

    y_zero_point: int
    y_min: int
    y_max: int
    y_dtype: str  # "uint8", "int8", "uint16" or "int16"
    tie_free: bool = False


@dataclass(frozen=True)
class PhasePlanes:
    """Where each tap of a strided/dilated conv reads in the phase-split input.

    Plane ``(a, b)`` holds ``xpad[hq * sh + a, wq * sw + b]`` (``xpad``: the input
    padded with the zero point); tap ``(kh, kw)`` reads plane
    ``((kh*dh) % sh, (kw*dw) % sw)`` at offset ``((kh*dh) // sh, (kw*dw) // sw)``.
    """

    phases: int  # stride_h * stride_w plane slots (only ``used`` ones are packed)
    used: tuple[tuple[int, int], ...]  # (row phase, column phase) some tap reads
    plane_h: int
    plane_w: int
    plane_len: int  # elements per plane, incl. slack read by garbage lanes
    valid: dict  # (a, b) -> (h_lo, h_hi, w_lo, w_hi): plane rows/cols holding real input


def phase_planes(g: ConvGeometry, reach: int) -> PhasePlanes:
    """Plane geometry; ``reach``: one past the last grid position a kernel tile reads from."""
    (sh, sw), (dh, dw) = g.strides, g.dilations
    pt, pl = g.pads[0], g.pads[1]
    kh_off = [kh * dh for kh in range(g.kernel[0])]
    kw_off = [kw * dw for kw in range(g.kernel[1])]
    plane_h = g.out_height + max(o // sh for o in kh_off)
    plane_w = g.out_width + max(o // sw for o in kw_off)
    max_offset = max(o // sh for o in kh_off) * plane_w + max(o // sw for o in kw_off)
    plane_len = math.ceil(max(plane_h * plane_w, reach + max_offset) / 64) * 64
    used = tuple(sorted({(a % sh, b % sw) for a in kh_off for b in kw_off}))
    valid = {}
    for a, b in used:
        h_lo, h_hi = _valid_range(a, sh, pt, g.height, plane_h)
        w_lo, w_hi = _valid_range(b, sw, pl, g.width, plane_w)
        valid[(a, b)] = (h_lo, h_hi, w_lo, w_hi)
    return PhasePlanes(sh * sw, used, plane_h, plane_w, plane_len, valid)


def _valid_range(phase: int, stride: int, pad: int, size: int, plane: int) -> tuple[int, int]:
    """Plane indices [lo, hi) whose input index ``q * stride + phase - pad`` lies in [0, size)."""
    lo = max(0, -((phase - pad) // stride))  # ceil((pad - phase) / stride)
    hi = min(plane, (size - 1 + pad - phase) // stride + 1)
    return lo, max(lo, hi)


def _full_vectors(w_lo: int, w_hi: int, col0: int, stride: int, width: int) -> int:
    """16-wide vectors of plane columns from ``w_lo`` whose contiguous input span
    (16 * stride elements from column ``w_lo * stride + col0``) stays inside the row."""
    count = 0
    while (w_lo + (count + 1) * LANES <= w_hi
           and (w_lo + count * LANES) * stride + col0 + LANES * stride <= width):
        count += 1
    return count


def _lanes(value: tirx.PrimExpr) -> int:
    """Vector width of an expression's type ("uint8x16" -> 16, "int32" -> 1)."""
    name = str(value.ty)
    return int(name.split("x")[1]) if "x" in name else 1


def _as_unsigned(value: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    """Activation value(s) in the unsigned view of their width: int8 is shifted by 128, int16 by
    32768 (a flip of the sign bit); unsigned values are returned as they are."""
    if not signed:
        return value
    lanes = _lanes(value)
    bits = 16 if str(value.ty).split("x")[0].endswith("16") else 8
    unsigned = f"uint{bits}" if lanes == 1 else f"uint{bits}x{lanes}"
    return tirx.bitwise_xor(tirx.reinterpret(unsigned, value), _splat(1 << (bits - 1), f"uint{bits}", lanes))


@dataclass(frozen=True)
class XPlanes:
    """How a kernel keeps its activation input in scratch: the unsigned view of ``x``
    (:func:`_as_unsigned`) in ``count`` planes ``stride`` elements apart.

    8-bit ``x``: one uint8 plane. 16-bit ``x`` read by ``vpdpbusd`` (``split``; it multiplies
    bytes only): two uint8 planes, the low and the high byte (``x = 256 * hi + lo``), whose
    products the kernel accumulates separately and combines as ``256 * acc_hi + acc_lo``
    (:func:`_accumulated`). 16-bit ``x`` not split: one uint16 plane. ``zero_point``: the
    input zero point, which padding and slack hold (in the unsigned view, byte by byte).
    """

    x_dtype: str
    zero_point: int
    split: bool = True
    stride: int = 0

    @property
    def signed(self) -> bool:
        return self.x_dtype.startswith("int")

    @property
    def bits(self) -> int:
        return 16 if self.x_dtype.endswith("16") else 8

    @property
    def count(self) -> int:
        return 2 if self.split and self.bits == 16 else 1

    @property
    def dtype(self) -> str:
        """Element type of the planes."""
        return "uint16" if self.bits == 16 and not self.split else "uint8"

    @property
    def max_value(self) -> int:
        """Largest element of a plane: bounds the int32 partial sums of one plane's products."""
        return (1 << (8 if self.dtype == "uint8" else 16)) - 1

    def plane(self, value: tirx.PrimExpr, p) -> tirx.PrimExpr:
        """Plane ``p`` (int or expression) of unsigned-view value(s): a byte, or the value itself."""
        if self.count == 1:
            return value
        lanes = _lanes(value)
        u8 = "uint8" if lanes == 1 else f"uint8x{lanes}"
        if isinstance(p, int) and p == 0:
            return tirx.Cast(u8, value)  # truncation: the low byte
        by = tirx.Cast("uint16", p * 8)
        return tirx.Cast(u8, tirx.shift_right(value, by if lanes == 1 else tirx.Broadcast(by, lanes)))

    def fill(self, p: int) -> tirx.PrimExpr:
        """Plane ``p``'s element for the input zero point (padding, slack)."""
        unsigned = self.zero_point + ((1 << (self.bits - 1)) if self.signed else 0)
        if self.count == 2:
            return tirx.const((unsigned >> (8 * p)) & 0xFF, "uint8")
        return tirx.const(unsigned, self.dtype)


def _emit_store_planes(xq, planes: XPlanes, value: tirx.PrimExpr, start) -> None:
    """Emit the store of unsigned-view ``value`` (scalar or vector) at ``start`` of every plane."""
    lanes = _lanes(value)
    for p in range(planes.count):
        index = start + p * planes.stride
        IB.buffer_store(xq, planes.plane(value, p), [tirx.Ramp(index, 1, lanes) if lanes > 1 else index])


def _emit_fill_planes(xq, planes: XPlanes, start, count: int) -> None:
    """Emit ``xq[start : start + count] = zero point`` in every plane."""
    for p in range(planes.count):
        _emit_fill(xq, start + p * planes.stride, count, planes.fill(p))


def _accumulated(acc, offset, lanes: int, planes: XPlanes, plane_acc: int, tie_free: bool) -> tirx.PrimExpr:
    """The accumulator to requantize at ``acc[offset]`` (``lanes`` lanes) of a kernel that keeps
    one accumulator per plane, ``plane_acc`` elements apart.

    Two byte planes: ``256 * acc_hi + acc_lo``, in int64 for the exact epilogue; in int32 for
    the tie-free one, where :func:`targets.cpu.schedules.tie_free_epilogue` proved
    ``|acc + bias| < 2**31`` with the 16-bit input's bound (``acc_lo`` started at the bias, and
    ``|256 * acc_hi| <= 65280 * sum|w|`` stays below that bound too).
    """
    def load(p):
        index = offset + p * plane_acc
        return tirx.BufferLoad(acc, [tirx.Ramp(index, 1, lanes) if lanes > 1 else index])

    if planes.count == 1:
        return load(0)
    dtype = "int32" if tie_free else "int64"
    wide = dtype if lanes == 1 else f"{dtype}x{lanes}"
    return tirx.Cast(wide, load(1)) * _splat(256, dtype, lanes) + tirx.Cast(wide, load(0))


def _gather_row(x, n, c, h, w0, stride: int, signed: bool, lanes: int = LANES) -> tirx.PrimExpr:
    """``x[n, c, h, w0 + stride * i]`` for ``lanes`` i, unsigned view: one contiguous load + shuffle."""
    row = _as_unsigned(tirx.BufferLoad(x, [n, c, h, tirx.Ramp(w0, 1, lanes * stride)]), signed)
    if stride == 1:
        return row
    return tirx.Shuffle([row], [lane * stride for lane in range(lanes)])


def _interleave4(x, n, c0, channels: int, h, w0, stride: int, signed: bool, lanes: int = LANES) -> tirx.PrimExpr:
    """``lanes`` pixels of channels c0..c0+3 of NCHW ``x`` -> ``4 * lanes`` values ``[pixel][channel]``.

    Channels past the last one repeat it: their weights are zero, any value works.
    """
    rows = [_gather_row(x, n, tirx.min(c0 + j, channels - 1), h, w0, stride, signed, lanes) for j in range(4)]
    return tirx.Shuffle(rows, [j * lanes + lane for lane in range(lanes) for j in range(4)])


def requant_expr(acc: tirx.PrimExpr, bias, mult, rnd, shift, rq: Requant) -> tirx.PrimExpr:
    """``clip(requant(acc + bias, M, s) + y_zp)`` in int64, cast to the y dtype.

    ``acc``: int32 (int64: the combined byte-plane accumulators of 16-bit input, exact epilogue
    only), scalar or 16 lanes. ``rnd`` is ``1 << (s - 1)``; requant rounds
    half to even (see :mod:`compiler.requant`). ``bias, mult, rnd, shift`` are scalars
    (one output channel: broadcast) or vectors of acc's width (one value per lane).
    """
    lanes = _lanes(acc)
    if rq.tie_free:
        return _requant_tie_free(acc, mult, rnd, shift, rq)
    i64 = "int64" if lanes == 1 else f"int64x{lanes}"

    def wide(v):
        if lanes > 1 and _lanes(v) == 1:
            return tirx.Broadcast(tirx.Cast("int64", v), lanes)
        return tirx.Cast(i64, v)

    def const(value):
        c = tirx.const(value, "int64")
        return c if lanes == 1 else tirx.Broadcast(c, lanes)

    product = (tirx.Cast(i64, acc) + wide(bias)) * wide(mult)
    return _shift_clip(product, wide(shift), wide(rnd) - const(1), rq)


def _shift_clip(product: tirx.PrimExpr, shift_by, rnd_minus_one, rq: Requant) -> tirx.PrimExpr:
    """``clip(round_half_even(product / 2**s) + y_zp)`` of int64 ``product``, cast to the y dtype.

    round_half_even(p / 2**s) == (p + half - 1 + bit_s(p)) >> s: the bit of weight 2**s breaks
    exact ties toward the even neighbour (compiler.requant's rule), in 5 ops.
    """
    lanes = _lanes(product)
    odd = tirx.bitwise_and(tirx.shift_right(product, shift_by), _splat(1, "int64", lanes))
    value = tirx.shift_right(product + rnd_minus_one + odd, shift_by)
    value = tirx.min(tirx.max(value + _splat(rq.y_zero_point, "int64", lanes), _splat(rq.y_min, "int64", lanes)),
                     _splat(rq.y_max, "int64", lanes))
    return tirx.Cast(rq.y_dtype if lanes == 1 else f"{rq.y_dtype}x{lanes}", value)


def _requant_tie_free(acc: tirx.PrimExpr, mult, rnd, shift, rq: Requant) -> tirx.PrimExpr:
    """The epilogue when ``rq.tie_free``: ``clip(((acc * M + 2**(s-1)) >> s) + y_zp)``.

    ``acc`` already holds the bias; ``mult, rnd, shift`` are scalars (one channel). For 16
    lanes the int64 products of the even and the odd lanes (two ``vpmuldq``: M and acc
    are known to fit int32) get the rounding term, and their high 32-bit halves are merged
    back into one int32x16 vector; since ``s >= 32``, ``p >> s == (p >> 32) >> (s - 32)``,
    so the rest (shift, zero point, clamp, narrowing) runs on 16 int32 lanes -- about half
    the instructions of the general int64 epilogue.
    """
    lanes = _lanes(acc)
    m32 = tirx.Cast("int32", mult)  # < 2**31 (checked): tells LLVM the product is 32 x 32 bits
    # s - 32 in [0, 30], said explicitly: TVM's bound analysis of ``x >> (int32(s) - 32)`` with s
    # unknown overflows and then drops the clamp below as if it could never apply (seen: -171
    # came out as int8 85).
    low_shift = tirx.max(tirx.min(tirx.Cast("int32", shift - tirx.const(32, "int64")), tirx.const(30, "int32")),
                         tirx.const(0, "int32"))

    def const(value):
        c = tirx.const(value, "int32")
        return c if lanes == 1 else tirx.Broadcast(c, lanes)

    if lanes == 1:
        product = tirx.Cast("int64", acc) * tirx.Cast("int64", m32) + rnd
        value = tirx.Cast("int32", tirx.shift_right(product, tirx.const(32, "int64")))
        value = tirx.shift_right(value, low_shift)
    else:
        half = lanes // 2
        i64 = f"int64x{half}"

        def pair(value, dtype="int64"):
            return tirx.Broadcast(tirx.const(value, dtype) if isinstance(value, int) else value, half)

        pairs = tirx.reinterpret(i64, acc)  # lane 2j in the low, lane 2j+1 in the high half
        low = tirx.shift_right(tirx.shift_left(pairs, pair(32)), pair(32))
        high = tirx.shift_right(pairs, pair(32))
        m64, r64 = pair(tirx.Cast("int64", m32)), pair(tirx.Cast("int64", rnd))
        even, odd = low * m64 + r64, high * m64 + r64
        merged = tirx.bitwise_or(tirx.bitwise_and(tirx.shift_right(even, pair(32)), pair(0xFFFFFFFF)),
                                 tirx.bitwise_and(odd, pair(-(1 << 32))))
        value = tirx.shift_right(tirx.reinterpret(f"int32x{lanes}", merged), tirx.Broadcast(low_shift, lanes))
    value = tirx.min(tirx.max(value + const(rq.y_zero_point), const(rq.y_min)), const(rq.y_max))
    return tirx.Cast(rq.y_dtype if lanes == 1 else f"{rq.y_dtype}x{lanes}", value)


# Epilogue cost in vpdpbusd-equivalents, read off the generated assembly: per output vector the
# tie-free requantization is ~9 vector instructions and a store; per output channel of a tile,
# loading and broadcasting its multiplier, rounding term and shift is ~12 instructions.
EPILOGUE_PER_VECTOR = 10.0
EPILOGUE_PER_CHANNEL = 12.0


def choose_tile(rows: int, vectors: int, steps: int, max_acc: int | None = None) -> tuple[int, int]:
    """Register tile (output channels, 16-pixel vectors) with the least estimated work.

    Per tile: ``steps`` (= input channel groups x taps) times its ``ob * pv`` vpdpbusd plus the
    loads feeding them (``pv`` activation vectors, ``ob`` weight broadcasts counting half), then
    the epilogue. With few steps (a 1x1 conv from 16-32 channels) the epilogue dominates and wide
    pixel tiles win ((2, 7) for MobileNetV2's expand convs, measured 1.2x faster than (6, 2));
    with many, the tile with the fewest loads per MAC and the least padding wins. Fewer than 4
    tiles are penalised so that two threads both get work.
    """
    max_acc = max_acc or MAX_ACCUMULATORS
    best = None
    for ob in range(1, 9):
        for pv in range(1, 9):
            if ob * pv > max_acc:
                continue
            tiles = math.ceil(rows / ob) * math.ceil(vectors / pv)
            per_tile = (steps * (ob * pv + pv + 0.5 * ob)
                        + EPILOGUE_PER_VECTOR * ob * pv + EPILOGUE_PER_CHANNEL * ob)
            work = tiles * per_tile
            if tiles < 4:
                work *= 1.0 + (4 - tiles) * 0.25
            key = (work, -ob * pv)
            if best is None or key < best[0]:
                best = (key, (ob, pv))
    return best[1]


def _loop(work: int, threshold: int):
    """``T.parallel`` when ``work`` reaches ``threshold``, else ``T.serial`` (used as ``for i in loop(n)``)."""
    return T.parallel if work >= threshold else T.serial


def _pieces(count: int) -> list[tuple[int, int]]:
    """``count`` bytes as (offset, size) pieces of 32, 16, 8, 4, 2, 1 bytes: one vector move each."""
    out, offset = [], 0
    for size in (32, 16, 8, 4, 2, 1):
        while count - offset >= size:
            out.append((offset, size))
            offset += size
    return out


def _emit_store_lanes(dst, start, value: tirx.PrimExpr, count: int, dtype: str) -> None:
    """Emit ``dst[start : start + count] = value[:count]`` (``value``: 16 lanes, ``count`` static)
    through a local vector, in 8/4/2/1-byte pieces instead of ``count`` scalar stores."""
    res = IB.alloc_buffer((LANES,), dtype, scope=SCRATCH_SCOPE)
    IB.buffer_store(res, value, [tirx.Ramp(0, 1, LANES)])
    for offset, size in _pieces(count):
        if size == 1:
            IB.buffer_store(dst, tirx.BufferLoad(res, [offset]), [start + offset])
        else:
            IB.buffer_store(dst, tirx.BufferLoad(res, [tirx.Ramp(offset, 1, size)]), [tirx.Ramp(start + offset, 1, size)])


def _emit_fill(buf, start, count: int, value) -> None:
    """Emit ``buf[start : start + count] = value`` (count static): 64-byte vector stores + tail."""
    if count // 64:
        with IB.serial(0, count // 64) as i:
            IB.buffer_store(buf, tirx.Broadcast(value, 64), [tirx.Ramp(start + i * 64, 1, 64)])
    for offset, size in _pieces(count % 64):
        at = start + count // 64 * 64 + offset
        if size == 1:
            IB.buffer_store(buf, value, [at])
        else:
            IB.buffer_store(buf, tirx.Broadcast(value, size), [tirx.Ramp(at, 1, size)])


def _emit_pack(xq, x, n, c, g: ConvGeometry, pp: PhasePlanes, planes: XPlanes, dense: bool) -> None:
    """Emit the packing of channel ``c`` (dense: channel group ``4c..4c+3``) into its phase planes.

    Called from TVMScript as a statement: it emits through the IR builder, so the
    per-phase ranges stay Python ints (constant loop bounds, vector stores) without
    TVMScript macros, whose expansion is slow. Every plane of ``planes`` gets its part.
    """
    signed = planes.signed
    width = 4 if dense else 1  # elements per plane position
    sh, sw = g.strides
    pt, pl = g.pads[0], g.pads[1]
    pw, plane = pp.plane_w, pp.plane_len
    for a, b in pp.used:
        h_lo, h_hi, w_lo, w_hi = pp.valid[(a, b)]
        full = _full_vectors(w_lo, w_hi, b - pl, sw, g.width)
        base = (c * pp.phases + a * sw + b) * plane * width
        _emit_fill_planes(xq, planes, base, h_lo * pw * width)
        if h_hi > h_lo:
            with IB.serial(h_lo, h_hi) as hq:
                row = base + hq * pw * width
                ih = hq * sh + a - pt
                _emit_fill_planes(xq, planes, row, w_lo * width)
                if full:
                    with IB.serial(0, full) as wv:
                        col = (w_lo + wv * LANES) * sw + b - pl
                        if dense:
                            value = _interleave4(x, n, c * 4, g.in_channels, ih, col, sw, signed)
                        else:
                            value = _gather_row(x, n, c, ih, col, sw, signed)
                        start = row + (w_lo + wv * LANES) * width
                        _emit_store_planes(xq, planes, value, start)
                tail = w_hi - w_lo - full * LANES
                if tail and dense and sw == 1:
                    # 8/4/2-pixel vector pieces (a 14-wide row: 3 moves instead of 56 bytes one by one)
                    for offset, size in _pieces(tail):
                        col = w_lo + full * LANES + offset + b - pl
                        value = (_interleave4(x, n, c * 4, g.in_channels, ih, col, 1, signed, size) if size > 1
                                 else None)
                        pos = row + (w_lo + full * LANES + offset) * width
                        if value is not None:
                            _emit_store_planes(xq, planes, value, pos)
                        else:
                            for j in range(4):
                                channel = tirx.min(c * 4 + j, g.in_channels - 1)
                                _emit_store_planes(xq, planes, _as_unsigned(
                                    tirx.BufferLoad(x, [n, channel, ih, col]), signed), pos + j)
                elif tail:
                    with IB.serial(0, tail) as wq:
                        col = (w_lo + full * LANES + wq) * sw + b - pl
                        pos = row + (w_lo + full * LANES + wq) * width
                        if dense:
                            with IB.serial(0, 4) as j:
                                channel = tirx.min(c * 4 + j, g.in_channels - 1)
                                _emit_store_planes(xq, planes, _as_unsigned(
                                    tirx.BufferLoad(x, [n, channel, ih, col]), signed), pos + j)
                        else:
                            _emit_store_planes(xq, planes, _as_unsigned(tirx.BufferLoad(x, [n, c, ih, col]), signed), pos)
                _emit_fill_planes(xq, planes, row + w_hi * width, (pw - w_hi) * width)
        _emit_fill_planes(xq, planes, base + h_hi * pw * width, (plane - h_hi * pw) * width)


def _packs_flat(g: ConvGeometry) -> bool:
    """1x1, stride 1, no padding: the dense pack's plane is the image flattened."""
    return g.kernel == (1, 1) and g.strides == (1, 1) and not any(g.pads) and g.height * g.width >= LANES


def _emit_pack_flat(xq, x, n, tile, tile_pixels: int, g: ConvGeometry, plane: int, planes: XPlanes) -> None:
    """Pack pixel tile ``tile`` (``tile_pixels`` pixels) of every channel group of a
    :func:`_packs_flat` conv: runs of 16-pixel vectors (the image's last one overlapping its
    predecessor) instead of row by row with a byte-by-byte tail (the pack had been half the
    time of MobileNetV2's 1x1 convs on 14x14 and 7x7 maps). Split by pixel tiles as the tile
    loop is, each thread packs what its own tiles read (split by channel group, 2 threads had
    each read half their input from the other core, and a 3-channel image did not split)."""
    pixels = g.height * g.width
    with IB.serial(0, math.ceil(g.in_channels / 4)) as c4:
        for v in range(tile_pixels // LANES):
            first = tile * tile_pixels + v * LANES
            with IB.If(first < pixels):
                with IB.Then():
                    # x[n, c, 0, start + i]: the flattened address of pixel start + i of channel c
                    start = tirx.min(first, pixels - LANES)
                    value = _interleave4(x, n, c4 * 4, g.in_channels, 0, start, 1, planes.signed)
                    _emit_store_planes(xq, planes, value, (c4 * plane + start) * 4)


def conv_kernel(
    g: ConvGeometry,
    x_dtype: str,
    x_zero_point: int,
    rq: Requant,
    depthwise: bool,
    tile: tuple[int, int] | None = None,
) -> tuple[tvm.tirx.PrimFunc, tuple[int, int]] | None:
    """NCHW integer conv (dense via VNNI, or depthwise) with the fused requant epilogue.

    Parameters of the PrimFunc: ``x [N,C,H,W] x_dtype``, ``w`` (packed by
    :func:`targets.cpu.schedules.pack_conv_weights`), ``bias/mult/rnd/shift [O_pad]``
    (int32, int64, int64, int64), ``y [N,O,Ho,Wo] y_dtype``. Returns the function
    and the (rows, vectors) register tile, which fixes the weight packing, or None
    for strides above 3.
    """
    if max(g.strides) > 3:
        return None
    if depthwise:
        return depthwise_kernel(g, x_dtype, x_zero_point, rq), (1, 1)
    return dense_kernel(g, x_dtype, x_zero_point, rq, tile)


def dense_kernel(
    g: ConvGeometry, x_dtype: str, x_zero_point: int, rq: Requant, tile: tuple[int, int] | None
) -> tuple[tvm.tirx.PrimFunc, tuple[int, int]]:
    """group == 1 conv: 4-channel interleaved phase planes, VNNI register tiles.

    16-bit ``x``: the packed input has a low-byte and a high-byte plane (:class:`XPlanes`), and
    every tile keeps one accumulator per plane (so at most half as many outputs per tile).
    """
    NP = XPlanes(x_dtype, x_zero_point).count
    N, C, H, W, OC = g.batch, g.in_channels, g.height, g.width, g.out_channels
    KH, KW = g.kernel
    (sh, sw), (dh, dw) = g.strides, g.dilations
    Ho, Wo = g.out_height, g.out_width
    PW = Wo + (KW - 1) * dw // sw
    GRID = Ho * PW  # outputs computed per channel, garbage columns included
    OB, PV = tile or choose_tile(OC, math.ceil(GRID / LANES), math.ceil(C / 4) * KH * KW * NP,
                                 MAX_ACCUMULATORS // NP)
    TP = PV * LANES  # pixels per tile
    NQT = math.ceil(GRID / TP)
    pp = phase_planes(g, NQT * TP)
    NPH, L = pp.phases, pp.plane_len
    C4 = math.ceil(C / 4)
    NOT = math.ceil(OC / OB)
    taps = KH * KW
    planes = XPlanes(x_dtype, x_zero_point, stride=C4 * NPH * L * 4)
    ACC = OB * TP  # accumulators of one plane
    flat = Wo == PW  # no garbage columns: vector stores straight into y

    def plane_base(c4, a, b):
        return (c4 * NPH + a * sw + b) * L * 4

    pack_loop = _loop(NP * C4 * len(pp.used) * L * 4, MIN_PARALLEL_BYTES)
    packs_flat = _packs_flat(g)
    tile_loop = _loop(OC * GRID * C * taps if NOT * NQT > 1 else 0, MIN_PARALLEL_MACS)
    copy_loop = _loop(OC * Ho * Wo, MIN_PARALLEL_BYTES)

    @T.prim_func
    def dense(
        x: T.Buffer((N, C, H, W), x_dtype),
        w: T.Buffer((NOT, taps, C4, OB), "int32"),
        bias: T.Buffer((NOT * OB,), "int32"),
        mult: T.Buffer((NOT * OB,), "int64"),
        rnd: T.Buffer((NOT * OB,), "int64"),
        shift: T.Buffer((NOT * OB,), "int64"),
        y: T.Buffer((N, OC, Ho, Wo), rq.y_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((NP * C4 * NPH * L * 4,), "uint8")
        ygrid = T.alloc_buffer((1 if flat else OC * NQT * TP,), rq.y_dtype)
        yf = T.decl_buffer((N * OC * Ho * Wo,), rq.y_dtype, data=y.data)
        for n in range(N):
            if packs_flat:
                for t in pack_loop(NQT):
                    _emit_pack_flat(xq, x, n, t, TP, g, L, planes)
                for c4 in range(C4):  # the slack past the image: read only by lanes never stored
                    _emit_fill_planes(xq, planes, (c4 * L + H * W) * 4, (L - H * W) * 4)
            else:
                for c4 in pack_loop(C4):
                    _emit_pack(xq, x, n, c4, g, pp, planes, True)
            # Tile t = pixel tile t // NOT, channel block t % NOT: pixel-major, so each thread
            # reads only its share of the packed input (channel-major split a 1x1 conv with
            # 16-32 output channels by channel block: every thread read all of xq, and 2
            # threads ran such layers 1.5x slower than 1).
            for t in tile_loop(NOT * NQT):
                acc = T.alloc_buffer((NP * ACC,), "int32", scope=SCRATCH_SCOPE)
                for i in T.unroll(OB * PV):
                    if rq.tie_free:  # the accumulator (of the low byte) starts at the bias
                        acc[T.ramp(i * LANES, 1, LANES)] = T.broadcast(bias[(t % NOT) * OB + i // PV], LANES)
                    else:
                        acc[T.ramp(i * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                if NP == 2:
                    for i in T.unroll(OB * PV):
                        acc[T.ramp(ACC + i * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                for kh, kw, c4 in T.grid(KH, KW, C4):
                    for p, i, v in T.grid(NP, OB, PV):
                        acc[T.ramp(p * ACC + (i * PV + v) * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16",
                            VNNI,
                            acc[T.ramp(p * ACC + (i * PV + v) * LANES, 1, LANES)],
                            xq[T.ramp(
                                p * planes.stride + plane_base(c4, (kh * dh) % sh, (kw * dw) % sw)
                                + ((t // NOT) * TP + v * LANES + (kh * dh) // sh * PW + (kw * dw) // sw) * 4, 1, 64)],
                            T.reinterpret("int8x64", T.broadcast(w[t % NOT, kh * KW + kw, c4, i], LANES)),
                        )
                for i, v in T.grid(OB, PV):
                    if (t % NOT) * OB + i < OC:
                        if flat:
                            if (t // NOT) * TP + v * LANES + LANES <= GRID:
                                yf[T.ramp(((n * OC + (t % NOT) * OB + i) * GRID) + (t // NOT) * TP + v * LANES, 1, LANES)] = requant_expr(
                                    _accumulated(acc, (i * PV + v) * LANES, LANES, planes, ACC, rq.tie_free),
                                    bias[(t % NOT) * OB + i], mult[(t % NOT) * OB + i],
                                    rnd[(t % NOT) * OB + i], shift[(t % NOT) * OB + i], rq)
                            elif (t // NOT) * TP + v * LANES < GRID:  # the grid's one partial vector
                                if GRID % LANES > SCALAR_TAIL:
                                    _emit_store_lanes(
                                        yf, ((n * OC + (t % NOT) * OB + i) * GRID) + (t // NOT) * TP + v * LANES,
                                        requant_expr(_accumulated(acc, (i * PV + v) * LANES, LANES, planes, ACC, rq.tie_free),
                                                     bias[(t % NOT) * OB + i], mult[(t % NOT) * OB + i],
                                                     rnd[(t % NOT) * OB + i], shift[(t % NOT) * OB + i], rq),
                                        GRID % LANES, rq.y_dtype)
                                else:
                                    for lane in range(GRID % LANES):
                                        yf[((n * OC + (t % NOT) * OB + i) * GRID) + (t // NOT) * TP + v * LANES + lane] = requant_expr(
                                            _accumulated(acc, (i * PV + v) * LANES + lane, 1, planes, ACC,
                                                         rq.tie_free),
                                            bias[(t % NOT) * OB + i], mult[(t % NOT) * OB + i],
                                            rnd[(t % NOT) * OB + i], shift[(t % NOT) * OB + i], rq)
                        else:
                            ygrid[T.ramp(((t % NOT) * OB + i) * NQT * TP + (t // NOT) * TP + v * LANES, 1, LANES)] = requant_expr(
                                _accumulated(acc, (i * PV + v) * LANES, LANES, planes, ACC, rq.tie_free),
                                bias[(t % NOT) * OB + i], mult[(t % NOT) * OB + i],
                                rnd[(t % NOT) * OB + i], shift[(t % NOT) * OB + i], rq)
            if not flat:
                for o in copy_loop(OC):
                    for oh in range(Ho):
                        for ow in T.vectorized(Wo):
                            y[n, o, oh, ow] = ygrid[o * NQT * TP + oh * PW + ow]

    return dense, (OB, PV)


def depthwise_kernel(g: ConvGeometry, x_dtype: str, x_zero_point: int, rq: Requant) -> tvm.tirx.PrimFunc:
    """group == C == O conv: per-channel phase planes, int32 MACs over 16-pixel row vectors.

    One parallel loop over channels packs, accumulates, requantizes and stores, so a
    channel's plane is still in cache when it is read. 16-bit ``x`` is packed as one uint16
    plane (no VNNI here, so no need for bytes); the int32 accumulator then needs
    ``65535 * sum|w| + |bias| < 2**31``, which :mod:`targets.cpu.schedules` checks.
    """
    planes = XPlanes(x_dtype, x_zero_point, split=False)
    N, C, H, W = g.batch, g.in_channels, g.height, g.width
    KH, KW = g.kernel
    (sh, sw), (dh, dw) = g.strides, g.dilations
    Ho, Wo = g.out_height, g.out_width
    PW = Wo + (KW - 1) * dw // sw
    NVR = math.ceil(Wo / LANES)  # vectors per output row
    pp = phase_planes(g, (Ho - 1) * PW + NVR * LANES)
    NPH, L = pp.phases, pp.plane_len
    taps = KH * KW

    def plane_base(c, a, b):
        return (c * NPH + a * sw + b) * L

    channel_loop = _loop(C * Ho * Wo * taps, MIN_PARALLEL_MACS)

    @T.prim_func
    def depthwise(
        x: T.Buffer((N, C, H, W), x_dtype),
        w: T.Buffer((C, taps), "int32"),
        bias: T.Buffer((C,), "int32"),
        mult: T.Buffer((C,), "int64"),
        rnd: T.Buffer((C,), "int64"),
        shift: T.Buffer((C,), "int64"),
        y: T.Buffer((N, C, Ho, Wo), rq.y_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((C * NPH * L,), planes.dtype)
        for n in range(N):
            for c in channel_loop(C):
                _emit_pack(xq, x, n, c, g, pp, planes, False)
                for oh in range(Ho):
                    acc = T.alloc_buffer((NVR * LANES,), "int32", scope=SCRATCH_SCOPE)
                    for v in T.unroll(NVR):
                        if rq.tie_free:  # the accumulator starts at the bias
                            acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(bias[c], LANES)
                        else:
                            acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                    for kh, kw in T.grid(KH, KW):
                        for v in T.unroll(NVR):
                            acc[T.ramp(v * LANES, 1, LANES)] = acc[T.ramp(v * LANES, 1, LANES)] + T.Cast(
                                "int32x16",
                                xq[T.ramp(
                                    plane_base(c, (kh * dh) % sh, (kw * dw) % sw)
                                    + (oh + (kh * dh) // sh) * PW + (kw * dw) // sw + v * LANES, 1, LANES)],
                            ) * T.broadcast(w[c, kh * KW + kw], LANES)
                    for v in T.unroll(Wo // LANES):
                        y[n, c, oh, T.ramp(v * LANES, 1, LANES)] = requant_expr(
                            acc[T.ramp(v * LANES, 1, LANES)], bias[c], mult[c], rnd[c], shift[c], rq)
                    if Wo % LANES > 0:
                        res = T.alloc_buffer((LANES,), rq.y_dtype, scope=SCRATCH_SCOPE)
                        res[T.ramp(0, 1, LANES)] = requant_expr(
                            acc[T.ramp(Wo // LANES * LANES, 1, LANES)], bias[c], mult[c], rnd[c], shift[c], rq)
                        for lane in range(Wo % LANES):
                            y[n, c, oh, Wo // LANES * LANES + lane] = res[lane]

    return depthwise


def _emit_pad_plane(xq, x, n, c, base, g: ConvGeometry, row_width: int, planes: XPlanes) -> None:
    """Emit the copy of channel ``c`` into its zero-point padded plane(s) at ``xq[base:]`` (unsigned view).

    Rows move as 64-, 32- or 16-byte vectors (the widest that fits), the last one overlapping
    its predecessor; rows narrower than 16 bytes move in 8/4/2/1-byte pieces (never a read
    past the row: the last row of the tensor has nothing after it).
    """
    pt, pl = g.pads[0], g.pads[1]
    width = g.width
    signed = planes.signed
    _emit_fill_planes(xq, planes, base, pt * row_width)
    with IB.serial(0, g.height) as h:
        row = base + (pt + h) * row_width
        _emit_fill_planes(xq, planes, row, pl)
        if width >= LANES:
            chunk = max(size for size in (64, 32, LANES) if size <= width)  # zmm/ymm/xmm moves
            for col in [min(v * chunk, width - chunk) for v in range(math.ceil(width / chunk))]:
                value = _as_unsigned(tirx.BufferLoad(x, [n, c, h, tirx.Ramp(col, 1, chunk)]), signed)
                _emit_store_planes(xq, planes, value, row + pl + col)
        else:
            for offset, size in _pieces(width):
                if size == 1:
                    value = _as_unsigned(tirx.BufferLoad(x, [n, c, h, offset]), signed)
                    _emit_store_planes(xq, planes, value, row + pl + offset)
                else:
                    value = _as_unsigned(tirx.BufferLoad(x, [n, c, h, tirx.Ramp(offset, 1, size)]), signed)
                    _emit_store_planes(xq, planes, value, row + pl + offset)
        _emit_fill_planes(xq, planes, row + pl + width, row_width - pl - width)
    # the bottom padding; the slack after it is read only by lanes that are never stored
    _emit_fill_planes(xq, planes, base + (pt + g.height) * row_width, g.pads[2] * row_width)


def _tap_window(xq, start, lane_offsets: list[int], dilation: int) -> tirx.PrimExpr:
    """64 bytes ``[lane i][tap j] = xq[start + lane_offsets[i] + j * dilation]`` (16 lanes x 4 taps):
    one 64-byte load and one byte permutation (``vpermb``)."""
    window = tirx.BufferLoad(xq, [tirx.Ramp(start, 1, 64)])
    return tirx.Shuffle([window], [offset + j * dilation for offset in lane_offsets for j in range(4)])


class DirectWindows:
    """Where each 64-byte tap window of :func:`depthwise_vnni_kernel` comes from when it is read
    straight from ``x`` (no padded plane): one 64-byte load of the channel at ``start`` and one
    two-source byte permutation (``vpermt2b``) with a zero-point vector, whose lanes take the
    taps that fall in the padding or past the kernel's width."""

    def __init__(self, g: ConvGeometry, rows: int, col_starts: list[int]) -> None:
        self.g, self.rows, self.col_starts = g, rows, col_starts
        self.wide = g.out_width >= LANES
        self._plans: dict[tuple, tuple[int, list[int], int] | None] = {}  # (start, indices, span)
        # Every window the kernel emits, planned once: wide rows one by one (and the interior
        # loop's, None), narrow rows by groups of ``rows`` (the last overlapping its predecessor).
        row_groups = ([*range(g.out_height), None] if self.wide
                      else sorted({min(k * rows, g.out_height - rows) for k in range(math.ceil(g.out_height / rows))}))
        for oh0 in row_groups:
            for v in range(len(col_starts)):
                for kh in range(g.kernel[0]):
                    for gi in range(math.ceil(g.kernel[1] / 4)):
                        self.plan(v, kh, gi, oh0)
        windows = [(key[3], window) for key, window in self._plans.items() if window is not None]
        self.fits = all(span < 64 for _, (_, _, span) in windows)  # each window's bytes in one 64-byte load
        # the largest load start within a channel (decides the tail channels)
        self.max_start = max((oh0 * g.strides[0] * g.width + start for oh0, (start, _, _) in windows
                              if oh0 is not None), default=0)

    def lanes(self, v: int) -> list[tuple[int, int] | None]:
        """(output row offset, output column) of each lane of vector ``v``; None: unused lane."""
        if self.wide:
            return [(0, self.col_starts[v] + i) for i in range(LANES)]
        used = self.rows * self.g.out_width
        return [(i // self.g.out_width, i % self.g.out_width) if i < used else None for i in range(LANES)]

    def plan(self, v: int, kh: int, gi: int, oh0: int | None) -> tuple[int, list[int]] | None:
        """(start relative to row ``oh0 * stride_h`` of the channel, byte indices into
        [load | zero points]) of one window, or None when every lane reads padding.
        ``oh0`` None: an interior row group, where every tap row is inside the image."""
        key = (v, kh, gi, oh0)
        if key not in self._plans:
            self._plans[key] = self._plan(v, kh, gi, oh0)
        window = self._plans[key]
        return None if window is None else window[:2]

    def _plan(self, v: int, kh: int, gi: int, oh0: int | None) -> tuple[int, list[int], int] | None:
        g = self.g
        (sh, sw), (dh, dw) = g.strides, g.dilations
        positions = []
        for lane in self.lanes(v):
            for j in range(4):
                tap = gi * 4 + j
                position = None
                if lane is not None and tap < g.kernel[1]:
                    r, ow = lane
                    iw = ow * sw + tap * dw - g.pads[1]
                    ih_rel = r * sh + kh * dh - g.pads[0]
                    inside_row = oh0 is None or 0 <= oh0 * sh + ih_rel < g.height
                    if 0 <= iw < g.width and inside_row:
                        position = ih_rel * g.width + iw
                positions.append(position)
        valid = [p for p in positions if p is not None]
        if not valid:
            return None
        start = min(valid)
        return start, [64 if p is None else p - start for p in positions], max(valid) - start


def _emit_depthwise_direct(x, w, bias, mult, rnd, shift, y, yf, n, c, g: ConvGeometry, windows: DirectWindows,
                           rq: Requant, zp_u8, signed: bool) -> None:
    """Emit channel ``c`` of :func:`depthwise_vnni_kernel` with its windows read straight from
    ``x`` (see :class:`DirectWindows`): border row groups unrolled with their padding known,
    interior rows in a loop. Same products, same epilogue as the padded-plane path."""
    KH, KW = g.kernel
    G = math.ceil(KW / 4)
    sh, dh = g.strides[0], g.dilations[0]
    Ho, Wo = g.out_height, g.out_width
    zero_points = tirx.Broadcast(zp_u8, 64)

    def row_group(oh0, oh0_const):
        for v in range(len(windows.col_starts)):
            acc = tirx.Broadcast(tirx.BufferLoad(bias, [c]) if rq.tie_free else tirx.const(0, "int32"), LANES)
            for kh in range(KH):
                for gi in range(G):
                    planned = windows.plan(v, kh, gi, oh0_const)
                    if planned is None:
                        window = zero_points
                    else:
                        start, indices = planned
                        load = _as_unsigned(
                            tirx.BufferLoad(x, [n, c, 0, tirx.Ramp(oh0 * sh * g.width + start, 1, 64)]), signed)
                        window = tirx.Shuffle([load, zero_points], indices)
                    weights = tirx.reinterpret("int8x64", tirx.Broadcast(tirx.BufferLoad(w, [c, kh * G + gi]), LANES))
                    acc = tirx.call_llvm_pure_intrin("int32x16", VNNI, acc, window, weights)
            value = requant_expr(acc, tirx.BufferLoad(bias, [c]), tirx.BufferLoad(mult, [c]),
                                 tirx.BufferLoad(rnd, [c]), tirx.BufferLoad(shift, [c]), rq)
            if windows.wide:
                IB.buffer_store(y, value, [n, c, oh0, tirx.Ramp(windows.col_starts[v], 1, LANES)])
            else:
                _emit_store_lanes(yf, ((n * g.in_channels + c) * Ho + oh0) * Wo, value, windows.rows * Wo, rq.y_dtype)

    if windows.wide:
        # rows whose every tap row is inside the image: -pt + oh*sh >= 0 and + (KH-1)*dh < H
        lo = min(Ho, -(-g.pads[0] // sh))
        hi = max(lo, min(Ho, (g.height - 1 - (KH - 1) * dh + g.pads[0]) // sh + 1))
        for oh in [*range(lo), *range(hi, Ho)]:
            row_group(oh, oh)
        if hi > lo:
            with IB.serial(lo, hi) as oh:
                row_group(oh, None)
    else:
        for group in range(math.ceil(Ho / windows.rows)):
            oh0 = min(group * windows.rows, Ho - windows.rows)
            row_group(oh0, oh0)


def depthwise_vnni_rows(g: ConvGeometry) -> int:
    """Output rows per 16-lane vector of :func:`depthwise_vnni_kernel` (0: it does not apply).

    One row (16 pixels per vector) when the output is at least 16 wide, else as many
    whole rows as fit 16 lanes and a 64-byte input window (7-wide rows: 2 rows, 14 lanes).
    """
    (sh, sw), dw = g.strides, g.dilations[1]
    row_width = g.width + g.pads[1] + g.pads[3]
    if g.out_width >= LANES:
        return 1 if (LANES - 1) * sw + 3 * dw < 64 else 0
    rows = min(LANES // g.out_width, g.out_height)
    while rows and (rows - 1) * sh * row_width + (g.out_width - 1) * sw + 3 * dw >= 64:
        rows -= 1
    return rows


def depthwise_vnni_kernel(g: ConvGeometry, x_dtype: str, x_zero_point: int, rq: Requant) -> tvm.tirx.PrimFunc:
    """group == C == O conv with ``vpdpbusd``: 4 taps of a kernel row per instruction.

    For the 16 output pixels of a vector and 4 horizontally adjacent taps, the 64 input
    bytes ``[pixel][tap]`` come from one 64-byte load and one byte permutation (AVX-512
    VBMI), and one ``vpdpbusd`` multiplies them by the 4 tap weights (packed as one int32
    word, zero past the kernel's width) -- 3 instructions where :func:`depthwise_kernel`
    needs 12 (widen, multiply, add per tap). The load reads ``x`` itself and the
    permutation takes padding lanes from a zero-point vector (:class:`DirectWindows`; the
    copy into padded planes had cost 1.6x on 14x14 maps, 3.2x on 7x7); only the last
    channels, whose loads could run past the end of ``x``, are copied into a plane padded
    with the zero point first. A vector holds 16 pixels of one row (the last
    vector of a row overlaps the one before, so every store is a whole vector) or, for
    rows narrower than 16, :func:`depthwise_vnni_rows` whole rows (contiguous in ``y``).

    Parameters: ``x [N,C,H,W]``, ``w [C, KH * ceil(KW/4)]`` int32 (4 taps per word, see
    :func:`targets.cpu.schedules.pack_conv_weights`), ``bias/mult/rnd/shift [C]``,
    ``y [N,C,Ho,Wo]``.
    """
    rows = depthwise_vnni_rows(g)
    if not rows:
        raise ValueError(f"strides {g.strides} / dilations {g.dilations} do not fit a 64-byte window")
    NP = XPlanes(x_dtype, x_zero_point).count
    N, C, H, W = g.batch, g.in_channels, g.height, g.width
    KH, KW = g.kernel
    (sh, sw), (dh, dw) = g.strides, g.dilations
    Ho, Wo = g.out_height, g.out_width
    G = math.ceil(KW / 4)  # words of 4 taps per kernel row
    WP = W + g.pads[1] + g.pads[3]
    wide = Wo >= LANES
    if wide:
        col_starts = [min(v * LANES, Wo - LANES) for v in range(math.ceil(Wo / LANES))]
        lane_offsets = [i * sw for i in range(LANES)]
        groups, span = Ho, 0
    else:
        col_starts = [0]
        used = rows * Wo
        lane_offsets = [(i // Wo) * sh * WP + (i % Wo) * sw if i < used else 0 for i in range(LANES)]
        groups = math.ceil(Ho / rows)
        span = (rows - 1) * sh * WP
    NV = len(col_starts)
    reach = ((Ho - 1) * sh + (KH - 1) * dh) * WP + col_starts[-1] * sw + (G - 1) * 4 * dw + 64
    L = math.ceil(max((H + g.pads[0] + g.pads[2]) * WP, reach + span) / 64) * 64
    channel_loop = _loop(C * Ho * Wo * KH * KW, MIN_PARALLEL_MACS)
    # Channels read straight from x (no padded plane: the copy was 15-45% of the kernel) are
    # all but the last few, whose 64-byte loads could run past the end of x; those, or every
    # channel when some window spans more than 64 bytes, take the padded plane. 16-bit x: every
    # channel, split into its low- and high-byte planes, one accumulator each (see XPlanes).
    windows = DirectWindows(g, rows, col_starts)
    tail = math.ceil((windows.max_start + 64 - H * W) / (H * W)) if windows.fits and NP == 1 else C
    direct = max(0, C - max(tail, 0))
    planes = XPlanes(x_dtype, x_zero_point, stride=(C - direct) * L)
    plane_loop = _loop((C - direct) * Ho * Wo * KH * KW * NP, MIN_PARALLEL_MACS)
    ACC = NV * LANES  # accumulators of one plane

    def col_start(v):
        """First output column of vector ``v`` of a row (the last one overlaps its predecessor)."""
        return tirx.min(v * LANES, Wo - LANES) if wide else 0

    def first_row(group):
        """First output row of a vector group (the last group overlaps the one before)."""
        return group if wide else tirx.min(group * rows, Ho - rows)

    @T.prim_func
    def depthwise_vnni(
        x: T.Buffer((N, C, H, W), x_dtype),
        w: T.Buffer((C, KH * G), "int32"),
        bias: T.Buffer((C,), "int32"),
        mult: T.Buffer((C,), "int64"),
        rnd: T.Buffer((C,), "int64"),
        shift: T.Buffer((C,), "int64"),
        y: T.Buffer((N, C, Ho, Wo), rq.y_dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((NP * (C - direct) * L,), "uint8")
        yf = T.decl_buffer((N * C * Ho * Wo,), rq.y_dtype, data=y.data)
        for n in range(N):
            if direct > 0:  # (never for 16-bit x: its windows are 8-bit)
                for c in channel_loop(direct):
                    _emit_depthwise_direct(x, w, bias, mult, rnd, shift, y, yf, n, c, g, windows, rq, planes.fill(0),
                                           planes.signed)
            for c in plane_loop(direct, C):
                _emit_pad_plane(xq, x, n, c, (c - direct) * L, g, WP, planes)
                for group in range(groups):
                    acc = T.alloc_buffer((NP * ACC,), "int32", scope=SCRATCH_SCOPE)
                    for v in T.unroll(NV):
                        if rq.tie_free:  # the accumulator (of the low byte) starts at the bias
                            acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(bias[c], LANES)
                        else:
                            acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                    if NP == 2:
                        for v in T.unroll(NV):
                            acc[T.ramp(ACC + v * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                    for kh in T.unroll(KH):
                        for gi in T.unroll(G):
                            for p in T.unroll(NP):
                                for v in T.unroll(NV):
                                    acc[T.ramp(p * ACC + v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                        "int32x16",
                                        VNNI,
                                        acc[T.ramp(p * ACC + v * LANES, 1, LANES)],
                                        _tap_window(xq, p * planes.stride + (c - direct) * L
                                                    + (first_row(group) * sh + kh * dh) * WP
                                                    + col_start(v) * sw + gi * 4 * dw, lane_offsets, dw),
                                        T.reinterpret("int8x64", T.broadcast(w[c, kh * G + gi], LANES)),
                                    )
                    if wide:
                        for v in T.unroll(NV):
                            y[n, c, group, T.ramp(col_start(v), 1, LANES)] = requant_expr(
                                _accumulated(acc, v * LANES, LANES, planes, ACC, rq.tie_free),
                                bias[c], mult[c], rnd[c], shift[c], rq)
                    else:
                        _emit_store_lanes(yf, ((n * C + c) * Ho + first_row(group)) * Wo, requant_expr(
                            _accumulated(acc, 0, LANES, planes, ACC, rq.tie_free), bias[c], mult[c], rnd[c], shift[c],
                            rq), rows * Wo, rq.y_dtype)

    return depthwise_vnni


def maxpool_kernel(g: ConvGeometry, x_dtype: str) -> tvm.tirx.PrimFunc:
    """ONNX MaxPool (2-D, NCHW, uint8/int8): the depthwise kernel's phase planes with max.

    Padding holds the dtype's minimum (0 in the uint8 view), so it never wins, as in
    ONNX. Parameters: ``x [N,C,H,W]``, ``y [N,C,Ho,Wo]`` of the same dtype.
    """
    signed = x_dtype == "int8"
    low = tirx.const(0, "uint8")  # the dtype's minimum in the uint8 view
    N, C, H, W = g.batch, g.in_channels, g.height, g.width
    KH, KW = g.kernel
    (sh, sw), (dh, dw) = g.strides, g.dilations
    Ho, Wo = g.out_height, g.out_width
    PW = Wo + (KW - 1) * dw // sw
    NVR = math.ceil(Wo / LANES)
    pp = phase_planes(g, (Ho - 1) * PW + NVR * LANES)
    NPH, L = pp.phases, pp.plane_len
    channel_loop = _loop(C * H * W, MIN_PARALLEL_BYTES)

    def plane_base(c, a, b):
        return (c * NPH + a * sw + b) * L

    def back(value):
        """uint8 view -> the tensor's dtype."""
        return _as_unsigned(value, signed) if not signed else tirx.reinterpret(
            f"int8x{_lanes(value)}" if _lanes(value) > 1 else "int8", _as_unsigned(value, True))

    @T.prim_func
    def maxpool(x: T.Buffer((N, C, H, W), x_dtype), y: T.Buffer((N, C, Ho, Wo), x_dtype)):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((C * NPH * L,), "uint8")
        for n in range(N):
            for c in channel_loop(C):
                _emit_pack(xq, x, n, c, g, pp, XPlanes(x_dtype, -128 if signed else 0), False)
                for oh in range(Ho):
                    acc = T.alloc_buffer((NVR * LANES,), "uint8", scope=SCRATCH_SCOPE)
                    for v in T.unroll(NVR):
                        acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(low, LANES)
                    for kh, kw in T.grid(KH, KW):
                        for v in T.unroll(NVR):
                            acc[T.ramp(v * LANES, 1, LANES)] = T.max(
                                acc[T.ramp(v * LANES, 1, LANES)],
                                xq[T.ramp(
                                    plane_base(c, (kh * dh) % sh, (kw * dw) % sw)
                                    + (oh + (kh * dh) // sh) * PW + (kw * dw) // sw + v * LANES, 1, LANES)])
                    for v in T.unroll(Wo // LANES):
                        y[n, c, oh, T.ramp(v * LANES, 1, LANES)] = back(acc[T.ramp(v * LANES, 1, LANES)])
                    for lane in range(Wo % LANES):
                        y[n, c, oh, Wo // LANES * LANES + lane] = back(acc[Wo // LANES * LANES + lane])

    return maxpool


def gemm_kernel(
    batch: int, k: int, m: int, x_dtype: str, rq: Requant, vectors: int | None = None
) -> tuple[tvm.tirx.PrimFunc, int]:
    """``y[N, M] = requant(x[N, K] @ w[K, M] + bias)`` with VNNI; lanes = output features.

    PrimFunc parameters: ``x [N,K]``, ``w`` packed ``[M/16, K/4, 64]`` int8 (see
    :func:`targets.cpu.schedules.pack_gemm_weights`), ``bias/mult/rnd/shift [M_pad]``,
    ``y [N, M]``. Returns the function and the vectors (of 16 features) per tile. 16-bit ``x``:
    a low- and a high-byte plane of the shifted input, one accumulator each (:class:`XPlanes`).
    """
    rq = dataclasses.replace(rq, tie_free=False)  # its epilogue takes per-lane constants
    K4 = math.ceil(k / 4)
    MV16 = math.ceil(m / LANES)
    planes = XPlanes(x_dtype, 0)
    NP = planes.count
    MV = vectors or max(1, min(8, MAX_ACCUMULATORS // NP, MV16 // 2))
    ACC = MV * LANES  # accumulators of one plane
    NMT = math.ceil(MV16 / MV)
    M_pad = NMT * MV * LANES
    N = batch
    tile_loop = _loop(k * m if NMT > 1 else 0, MIN_PARALLEL_MACS)

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
        xs = T.alloc_buffer((NP, N, K4 * 4), "uint8")
        for p, n, kk in T.grid(NP, N, K4 * 4):
            xs[p, n, kk] = T.if_then_else(
                kk < k, planes.plane(_as_unsigned(x[n, T.min(kk, k - 1)], planes.signed), p), T.uint8(0))
        for n in range(N):
            for t in tile_loop(NMT):
                acc = T.alloc_buffer((NP * ACC,), "int32", scope=SCRATCH_SCOPE)
                res = T.alloc_buffer((LANES,), rq.y_dtype, scope=SCRATCH_SCOPE)
                for v in T.unroll(NP * MV):
                    acc[T.ramp(v * LANES, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                for k4 in range(K4):
                    for p in T.unroll(NP):
                        for v in T.unroll(MV):
                            acc[T.ramp(p * ACC + v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                "int32x16",
                                VNNI,
                                acc[T.ramp(p * ACC + v * LANES, 1, LANES)],
                                T.reinterpret("uint8x64", T.broadcast(
                                    T.reinterpret("int32", xs[p, n, T.ramp(k4 * 4, 1, 4)]), LANES)),
                                w[t * MV + v, k4, T.ramp(0, 1, 64)],
                            )
                for v in range(MV):
                    res[T.ramp(0, 1, LANES)] = requant_expr(
                        _accumulated(acc, v * LANES, LANES, planes, ACC, False),
                        bias[T.ramp((t * MV + v) * LANES, 1, LANES)],
                        mult[T.ramp((t * MV + v) * LANES, 1, LANES)],
                        rnd[T.ramp((t * MV + v) * LANES, 1, LANES)],
                        shift[T.ramp((t * MV + v) * LANES, 1, LANES)], rq)
                    for lane in range(LANES):
                        if (t * MV + v) * LANES + lane < m:
                            y[n, (t * MV + v) * LANES + lane] = res[lane]

    return gemm, MV



def _splat(value, dtype: str, lanes: int) -> tirx.PrimExpr:
    """The constant ``value`` of ``dtype``: a scalar, or broadcast to ``lanes`` lanes."""
    constant = tirx.const(value, dtype)
    return constant if lanes == 1 else tirx.Broadcast(constant, lanes)


def _emit_elementwise(y, inputs: list, size: int, chunk: int, value_of, lanes: int = LANES) -> None:
    """Emit ``y[i] = value_of(inputs[0][i], ...)`` over ``size`` flat elements: explicit
    ``lanes``-wide ramps, parallel over chunks of about ``chunk`` elements, a scalar tail. (A loop
    that LLVM had to vectorize itself came out as gathers and byte-by-byte scatters, 4x
    slower than numpy.)"""
    vectors, tail = divmod(size, lanes)
    per_chunk = max(chunk // lanes, 1)  # vectors per parallel iteration
    chunks = math.ceil(vectors / per_chunk)
    loop = IB.parallel if chunks > 1 and size >= MIN_PARALLEL_BYTES else IB.serial
    with loop(0, chunks) as t:
        with IB.serial(0, tirx.min(per_chunk, vectors - t * per_chunk)) as i:
            ramp = tirx.Ramp((t * per_chunk + i) * lanes, 1, lanes)
            IB.buffer_store(y, value_of(*(tirx.BufferLoad(x, [ramp]) for x in inputs)), [ramp])
    for i in range(tail):
        index = vectors * lanes + i
        IB.buffer_store(y, value_of(*(tirx.BufferLoad(x, [index]) for x in inputs)), [index])


def qadd_kernel(
    shape: tuple[int, ...], a_dtype: str, b_dtype: str, a_zero_point: int, b_zero_point: int,
    a_multiplier: int, b_multiplier: int, shift: int, rq: Requant, chunk: int = 4096,
) -> tvm.tirx.PrimFunc:
    """QAdd of two activations of the same shape (the residual add), as compiler.intgraph says:
    ``y = clip(requant((a - a_zp) * a_M + (b - b_zp) * b_M, 1, shift) + y_zp)`` in int64.

    Explicit 16-lane vectors, parallel over chunks (the generic TE compute ran it element by
    element). Parameters: ``a shape a_dtype``, ``b shape b_dtype``, ``y shape rq.y_dtype``.
    """
    size = math.prod(shape)

    def add(va, vb):
        lanes = _lanes(va)
        i64 = "int64" if lanes == 1 else f"int64x{lanes}"
        acc = ((tirx.Cast(i64, va) - _splat(a_zero_point, "int64", lanes)) * _splat(a_multiplier, "int64", lanes)
               + (tirx.Cast(i64, vb) - _splat(b_zero_point, "int64", lanes)) * _splat(b_multiplier, "int64", lanes))
        return _shift_clip(acc, _splat(shift, "int64", lanes), _splat((1 << (shift - 1)) - 1, "int64", lanes), rq)

    @T.prim_func
    def qadd(as_: T.Buffer(shape, a_dtype), bs: T.Buffer(shape, b_dtype), ys: T.Buffer(shape, rq.y_dtype)):
        T.func_attr({"tirx.noalias": True})
        a = T.decl_buffer((size,), a_dtype, data=as_.data)
        b = T.decl_buffer((size,), b_dtype, data=bs.data)
        y = T.decl_buffer((size,), rq.y_dtype, data=ys.data)
        _emit_elementwise(y, [a, b], size, chunk, add)

    return qadd


def quantize_kernel(
    shape: tuple[int, ...], scale: float, zero_point: int, qmin: int, qmax: int, dtype: str,
    chunk: int = 4096,
) -> tvm.tirx.PrimFunc:
    """Float edge: ONNX QuantizeLinear of ``size`` float32 values, as compiler.requant computes it.

    ``clip(nearbyint(x / scale) + zero_point)`` with the division in float32 (IEEE, no
    reciprocal) and round half to even, so it equals
    :func:`compiler.requant.quantize_linear` bit for bit; vectorized and parallel.
    Parameters: ``x shape float32``, ``y shape dtype``.
    """
    size = math.prod(shape)

    def quantize(value):
        lanes = _lanes(value)
        rounded = tirx.nearbyint(value / _splat(scale, "float32", lanes)) + _splat(float(zero_point), "float32", lanes)
        clipped = tirx.min(tirx.max(rounded, _splat(float(qmin), "float32", lanes)), _splat(float(qmax), "float32", lanes))
        as_int = tirx.Cast("int32" if lanes == 1 else f"int32x{lanes}", clipped)
        return tirx.Cast(dtype if lanes == 1 else f"{dtype}x{lanes}", as_int)

    @T.prim_func
    def quantize_edge(xs: T.Buffer(shape, "float32"), ys: T.Buffer(shape, dtype)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((size,), "float32", data=xs.data)
        y = T.decl_buffer((size,), dtype, data=ys.data)
        _emit_elementwise(y, [x], size, chunk, quantize)

    return quantize_edge


VPERMI2B = "llvm.x86.avx512.vpermi2var.qi.512"  # AVX-512 VBMI: 64 bytes from two 64-byte tables


def _table_lookup(table, y_dtype: str):
    """``value_of`` for :func:`_emit_elementwise`: the bytes of ``table`` (256 uint8, by raw input
    byte) at each input byte -- two ``vpermi2b`` and a select on 64 lanes, one read on a scalar."""
    quarters = [tirx.reinterpret("int8x64", tirx.BufferLoad(table, [tirx.Ramp(64 * q, 1, 64)])) for q in range(4)]

    def look_up(value):
        if _lanes(value) == 1:  # the scalar tail
            raw = tirx.Cast("int32", tirx.reinterpret("uint8", value))
            return tirx.reinterpret(y_dtype, tirx.BufferLoad(table, [raw]))
        index = tirx.reinterpret("int8x64", value)
        low = tirx.call_llvm_pure_intrin("int8x64", VPERMI2B, quarters[0], index, quarters[1])
        high = tirx.call_llvm_pure_intrin("int8x64", VPERMI2B, quarters[2], index, quarters[3])
        picked = tirx.Select(index < tirx.Broadcast(tirx.const(0, "int8"), 64), high, low)
        return tirx.reinterpret(f"{y_dtype}x64", picked)

    return look_up


def lookup_kernel(shape: tuple[int, ...], x_dtype: str, y_dtype: str, chunk: int = 16384) -> tvm.tirx.PrimFunc:
    """QLookup of an 8-bit input to an 8-bit output (compiler.intgraph): ``y = table[x - x_min]``
    64 elements at a time with AVX-512 VBMI. Each half of the 256-byte table (indexed by the
    input's raw byte: :func:`targets.cpu.schedules.byte_table`) is one ``vpermi2b`` over the
    input bytes' low 7 bits, and their top bit picks between the two halves. (The generic
    compute read the table one element at a time: 0.16-0.28 ns per element.)
    Parameters: ``x shape x_dtype``, ``table (256,) uint8``, ``y shape y_dtype``."""
    size = math.prod(shape)

    @T.prim_func
    def lookup(xs: T.Buffer(shape, x_dtype), tables: T.Buffer((256,), "uint8"), ys: T.Buffer(shape, y_dtype)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((size,), x_dtype, data=xs.data)
        table = T.decl_buffer((256,), "uint8", data=tables.data)
        y = T.decl_buffer((size,), y_dtype, data=ys.data)
        _emit_elementwise(y, [x], size, chunk, _table_lookup(table, y_dtype), lanes=64)

    return lookup
