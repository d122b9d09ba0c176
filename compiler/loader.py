"""Load and check the user's model; every problem becomes a one-line EdgeqError."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from compiler.errors import EdgeqError
from compiler.graph import opset_version

# Oldest default-domain opset the version converter can lift to 13 reliably.
MIN_SUPPORTED_OPSET = 7
# Newest default-domain opset onnxruntime 1.31 loads (checked with a Relu model).
MAX_SUPPORTED_OPSET = 25


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read, parse and check an ONNX file (external data is loaded from beside it)."""
    path = Path(path)
    if not path.exists():
        raise EdgeqError(f"model file not found: {path}")
    if path.is_dir():
        raise EdgeqError(f"model path is a directory, expected an .onnx file: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError) as error:
        raise EdgeqError(f"{path} is not an ONNX model ({type(error).__name__})") from None
    except OSError as error:
        raise EdgeqError(f"cannot read {path}: {error.strerror or error}") from None
    if not model.graph.node:
        raise EdgeqError(f"{path} is not an ONNX model (no graph nodes)")
    version = opset_version(model)
    if version and version < MIN_SUPPORTED_OPSET:
        raise EdgeqError(f"{path} uses opset {version}; edgeq supports opsets {MIN_SUPPORTED_OPSET}..{MAX_SUPPORTED_OPSET}")
    if version > MAX_SUPPORTED_OPSET:
        raise EdgeqError(f"{path} uses opset {version}; edgeq supports opsets {MIN_SUPPORTED_OPSET}..{MAX_SUPPORTED_OPSET}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise EdgeqError(f"{path} is not a valid ONNX model: {first}") from None
    return model
