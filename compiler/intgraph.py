"""The integer-only graph: what ``passes/integerize`` emits and every target lowers.

It is an ordinary ``onnx.ModelProto`` so it can be saved, viewed in Netron and
walked with the helpers in :mod:`compiler.graph`.  Between the single
``Quantize`` at each graph input and the single ``Dequantize`` at each graph
output every tensor is an integer (int8/uint8/int16/int32; int4 weights are
stored one value per int8 element, ``w_bits`` says how many bits are used).
The numpy reference interpreter (:mod:`compiler.interpreter`) defines what the
ops mean; each target must match it bit for bit.

Ops in domain ``edgeq`` (version 1)
-----------------------------------

Notation: ``requant(acc, M, s) = round_half_even(acc * M / 2**s)`` computed
exactly in int64 (``M`` in [2**30, 2**31), ``1 <= s <= 62``; ties to even like
ONNX QuantizeLinear), see :mod:`compiler.requant` for the integer expression. ``M`` and ``s`` are int64 lists: one entry (per
tensor) or one per output channel (axis 1 for NCHW, last axis for Gemm/MatMul).
``clip(v)`` clamps to ``[y_min, y_max]``, which also implements fused
ReLU/ReLU6/Clip and the output dtype's range.

Every op with an integer output has ``y_zero_point y_min y_max y_dtype``
(``y_dtype`` a numpy dtype name: int8, uint8, int16, uint16; int4/uint4
activations are stored as int8/uint8 with ``y_min/y_max`` = the 4-bit range).

``Quantize(x) -> y``            float input edge. attrs ``scale`` (float) + y_*.
                                ``y = clip(round_half_even(x / scale) + y_zero_point)``
                                in float32 (ONNX QuantizeLinear).
``Dequantize(x) -> y``          float output edge: ``y = (x - zero_point) * scale``.
``QConv(x, w, bias) -> y``      ``x`` int8/uint8/int16/uint16 NCHW, ``w`` int8 OIHW (symmetric,
                                zero point 0), ``bias`` int32 [O] *with the input
                                zero point folded in*:
                                ``bias = round(b / (sx * sw)) - x_zero_point * sum(w[o])``.
                                Padding reads ``x_zero_point``.
                                attrs: ``strides pads dilations group kernel_shape``
                                (ONNX Conv meaning), ``x_zero_point``,
                                ``multiplier shift`` (per channel or per tensor),
                                ``y_zero_point y_min y_max``, ``y_dtype``, ``w_bits``.
                                ``acc = sum(x * w) + bias`` (exact: int64, as 16-bit x
                                can take it past int32), where padded
                                positions of x hold x_zero_point;
                                ``y = clip(requant(acc, M, s) + y_zero_point)``.
``QGemm(x, w, bias) -> y``      x [..., K] (rank >= 2), w [K, M] int8 (already
                                transposed so the reduction axis is 0), bias [M]
                                folded as above; same attrs (no conv attrs).
                                Gemm's alpha/beta are folded into M, s and bias.
``QMatMul(a, b) -> y``          two activations: ``acc = sum((a - a_zp) * (b - b_zp))``;
                                attrs ``a_zero_point b_zero_point multiplier shift
                                y_zero_point y_min y_max y_dtype``.
``QAdd(a, b) -> y``             ``acc = (a - a_zp) * a_multiplier + (b - b_zp) * b_multiplier``
                                (int64, numpy broadcasting; a or b may be an
                                integer initializer); the multipliers are
                                ``round(s_a / s_y * 2**shift)``, the larger in [2**30, 2**31);
                                ``y = clip(requant(acc, 1, shift) + y_zero_point)``.
                                attrs ``a_zero_point b_zero_point a_multiplier
                                b_multiplier shift y_zero_point y_min y_max y_dtype``.
                                QMul analogous: ``acc = (a - a_zp) * (b - b_zp)``,
                                ``y = clip(requant(acc, multiplier, shift) + y_zero_point)``.
``Requantize(x) -> y``          ``y = clip(requant(x - x_zero_point, M, s) + y_zero_point)``
                                (per tensor); used by Concat inputs whose scale
                                differs, by Q->DQ pairs that change scale, and, with
                                the identity ``M = 2**30, s = 30``, as a standalone
                                Relu/Clip (clamp only).
``QAveragePool(x) -> y``        ``acc = sum over window (x - x_zero_point)``; the
                                divisor (kernel size) is folded into ``M, s``; pads
                                count as x_zero_point (count_include_pad=1; padded
                                pooling with count_include_pad=0 is rejected);
                                attrs: ``kernel_shape strides pads count_include_pad``
                                plus ``x_zero_point multiplier shift`` + y_*.
                                QGlobalAveragePool: the window is all of H x W
                                (output [N, C, 1, 1]).
``QSoftmax(x) -> y``            softmax over the last axis: ``d = max(x) - x`` along it,
                                ``e = exp_table[min(d, len(exp_table) - 1)]`` where
                                ``exp_table[d] = round(exp(-d * x_scale) * 2**16)`` (cut
                                after its last nonzero entry, plus one 0),
                                ``total = sum(e)`` along the axis (int64),
                                ``y = clip(floor((2 * e * M + total * 2**s) / (2 * total * 2**s))
                                + y_zero_point)`` with ``M * 2**-s ~= 1 / y_scale`` (round
                                half up). attrs ``exp_table multiplier shift`` + y_*.
``QLookup(x) -> y``             any elementwise function of one input (:data:`TABLE_OPS`):
                                ``y = table[x - x_min]``; ``table`` (one entry per input
                                level, ``x_min`` .. x's largest level) is the ONNX op applied to
                                each dequantized level in float32 (ONNX's reference implementation), quantized to y's
                                parameters and clamp (exactly what the QDQ model computes).
                                attrs ``table x_min`` + y_*.

Standard ONNX ops allowed on integer tensors (pure data movement or exact):
``MaxPool``, ``Reshape``, ``Flatten``, ``Transpose``, ``Squeeze``,
``Unsqueeze``, ``Concat`` (all inputs share scale and zero point), ``Pad``
(``constant_value`` = the zero point), ``Slice``, ``Gather`` (indices),
``Identity``.

Every integer tensor's quantization (scale, zero point, dtype, qmin, qmax) is
recorded as JSON in the model's metadata_props under ``edgeq.tensor_quant``
(read it with :func:`passes.integerize.tensor_quant`) so targets can
dequantize outputs and reports can explain values. Graph inputs and outputs
keep the QDQ model's names and float32 type; data movement on a float input
is moved after its Quantize. No float region is allowed after the last
Dequantize (see passes/integerize).
"""

INT_DOMAIN = "edgeq"
INT_DOMAIN_VERSION = 1

# Standard ONNX ops that are exact on integer tensors.
DATA_MOVEMENT_OPS = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
     "Pad", "Slice", "Gather", "Identity"}
)

# Elementwise functions of one activation that the integer graph runs as QLookup tables.
TABLE_OPS = frozenset(
    {"Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus",
     "Softsign", "Mish", "Exp"}
)
