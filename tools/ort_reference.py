"""onnxruntime.quantization.quantize_static as every edgeq benchmark runs it: the reference.

QDQ format, per-channel weights, uint8 activations, after onnxruntime's own
quant_pre_process, calibrated one sample at a time on the same data edgeq gets.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx


def ort_quantize(model_path: Path, calib: dict[str, np.ndarray], out_path: Path, *, method: str = "MinMax",
                 weight_type: str = "QInt8", op_types: tuple[str, ...] | None = None,
                 opset: int | None = None, extra_options: dict | None = None) -> Path:
    """Write onnxruntime's QDQ model of ``model_path`` to ``out_path`` (``method``: a CalibrationMethod name)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            count = next(iter(calib.values())).shape[0]
            self.samples = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(count)])

        def get_next(self):
            return next(self.samples, None)

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        source = Path(model_path)
        if opset:  # int4 weights need opset 21 types
            source = Path(tmp) / "source.onnx"
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(model_path)), opset), str(source))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                        calibrate_method=getattr(CalibrationMethod, method),
                        op_types_to_quantize=list(op_types) if op_types else None,
                        extra_options=extra_options or {})
    return out_path
