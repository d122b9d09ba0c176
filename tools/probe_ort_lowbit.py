"""Which sub-8-bit QDQ forms the installed onnxruntime loads and runs (tiny onnx.helper graphs).

For INT4 / UINT4 / INT2 / UINT2 at opsets 21, 23 and 25: a DequantizeLinear of
constant weights per channel (axis 0) and block-wise (block_size 8 on axis 1)
feeding a Gemm, a QuantizeLinear -> DequantizeLinear activation pair, and a
per-channel weight feeding a Conv; plus INT16 / UINT16 activations. Each
result is checked against numpy. Prints one markdown table.

    python tools/probe_ort_lowbit.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

RNG = np.random.default_rng(0)
TYPES = {"INT4": (T.INT4, -8, 8), "UINT4": (T.UINT4, 0, 16), "INT2": (T.INT2, -2, 2), "UINT2": (T.UINT2, 0, 4)}


def run(opset: int, nodes, inits, inputs, outputs, feeds) -> tuple[str, np.ndarray | None]:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return "runs", session.run(None, feeds)[0]
    except Exception as error:  # noqa: BLE001 - report onnxruntime's refusal
        first = str(error).splitlines()[0]
        return ("refused (type not allowed at this opset)" if "Type Error" in first else "refused: " + first[:90]), None


def weight_case(dtype: int, lo: int, hi: int, opset: int, block: int | None) -> str:
    out_ch, in_ch = 8, 16
    q = RNG.integers(lo, hi, (out_ch, in_ch))
    zero = 0 if lo < 0 else 1
    scale_shape = [out_ch, in_ch // block] if block else [out_ch]
    scale = RNG.uniform(0.05, 0.2, scale_shape).astype(np.float32)
    inits = [helper.make_tensor("wq", dtype, [out_ch, in_ch], q.flatten().tolist()),
             helper.make_tensor("s", T.FLOAT, scale_shape, scale.flatten().tolist()),
             helper.make_tensor("z", dtype, scale_shape, [zero] * int(np.prod(scale_shape)))]
    attrs = {"axis": 1, "block_size": block} if block else {"axis": 0}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], **attrs),
             helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    x = RNG.standard_normal((2, in_ch)).astype(np.float32)
    status, out = run(opset, nodes, inits, [helper.make_tensor_value_info("x", T.FLOAT, [2, in_ch])],
                      [helper.make_tensor_value_info("y", T.FLOAT, [2, out_ch])], {"x": x})
    if out is None:
        return status
    full_scale = np.repeat(scale, block, axis=1) if block else scale[:, None]
    expected = x @ ((q - zero) * full_scale).T
    return f"{status}, max err {float(np.abs(out - expected).max()):.1e}"


def activation_case(dtype: int, lo: int, opset: int) -> str:
    zero = 0 if lo < 0 else 1
    inits = [helper.make_tensor("s", T.FLOAT, [], [0.1]), helper.make_tensor("z", dtype, [], [zero])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    x = RNG.standard_normal((2, 16)).astype(np.float32) * 0.3
    status, out = run(opset, nodes, inits, [helper.make_tensor_value_info("x", T.FLOAT, [2, 16])],
                      [helper.make_tensor_value_info("y", T.FLOAT, [2, 16])], {"x": x})
    if out is None:
        return status
    info = np.iinfo(np.int16 if dtype == T.INT16 else np.uint16) if dtype in (T.INT16, T.UINT16) else None
    lo_q, hi_q = (info.min, info.max) if info else (lo, {T.INT4: 7, T.UINT4: 15, T.INT2: 1, T.UINT2: 3}[dtype])
    expected = (np.clip(np.round(x / 0.1) + zero, lo_q, hi_q) - zero) * 0.1
    return f"{status}, max err {float(np.abs(out - expected).max()):.1e}"


def main() -> None:
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}\n")
    print("| type | opset | weights per channel -> Gemm | weights block_size=8 -> Gemm | activation Q->DQ |")
    print("|---|---|---|---|---|")
    for name, (dtype, lo, hi) in TYPES.items():
        for opset in (21, 23, 25):
            print(f"| {name} | {opset} | {weight_case(dtype, lo, hi, opset, None)} | "
                  f"{weight_case(dtype, lo, hi, opset, 8)} | {activation_case(dtype, lo, opset)} |")
    for name, dtype in (("INT16", T.INT16), ("UINT16", T.UINT16)):
        print(f"| {name} | 21 | - | - | {activation_case(dtype, -1 if dtype == T.INT16 else 0, 21)} |")


if __name__ == "__main__":
    main()
