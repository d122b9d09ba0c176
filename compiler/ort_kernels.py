"""Which kernels onnxruntime really runs for a QDQ model.

A QDQ model is only fast if onnxruntime fuses each DequantizeLinear -> op ->
QuantizeLinear group into an integer kernel; when a pattern does not match it
silently dequantizes and runs the float op. This asks onnxruntime for its
optimized graph and counts both kinds.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import onnx
import onnxruntime as ort

# Kernels that compute on integers (onnxruntime CPU, default and com.microsoft domains).
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu",
    "QLinearSigmoid", "QLinearSoftmax", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QLinearReduceMean", "QAttention", "MatMulNBits", "QLinearWhere",
})
# Float compute ops that a quantized layer should not fall back to.
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                           "NchwcConv"})


def kernel_usage(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Counts of integer kernels and float compute ops in onnxruntime's optimized graph."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = optimized
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ops = Counter(node.op_type for node in onnx.load(optimized, load_external_data=False).graph.node)
    return {
        "integer": {op: count for op, count in sorted(ops.items()) if op in INTEGER_KERNELS},
        "float": {op: count for op, count in sorted(ops.items()) if op in FLOAT_COMPUTE},
    }
