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
    return check_model(model, str(path))


def check_model(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """``model`` if edgeq can take it (nodes, a supported opset, onnx.checker); else a one-line
    EdgeqError that names it by ``label`` (its path, or what a Python caller passed)."""
    if not model.graph.node:
        raise EdgeqError(f"{label} is not an ONNX model (no graph nodes)")
    version = opset_version(model)
    if version and version < MIN_SUPPORTED_OPSET:
        raise EdgeqError(f"{label} uses opset {version}; edgeq supports opsets {MIN_SUPPORTED_OPSET}..{MAX_SUPPORTED_OPSET}")
    if version > MAX_SUPPORTED_OPSET:
        raise EdgeqError(f"{label} uses opset {version}; edgeq supports opsets {MIN_SUPPORTED_OPSET}..{MAX_SUPPORTED_OPSET}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise EdgeqError(f"{label} is not a valid ONNX model: {first}") from None
    return model


INPUT_SHAPE_EXAMPLE = "input:3,224,224"


def parse_input_shapes(texts: list[str], model: onnx.ModelProto) -> dict[str, list[int]]:
    """``--input-shape`` values as ``{input: dims after the batch axis}``.

    Each text is ``NAME:D,D,...`` (``NAME:`` may be left out for a one-input
    model), with the dims after the batch axis or the whole shape: onnxsim and
    polygraphy take the whole shape, edgeq's data files the per-sample one. The
    batch axis stays as the model has it, since edgeq runs batches of samples.
    """
    from compiler.data import model_inputs

    declared = {spec.name: spec.shape or [] for spec in model_inputs(model)}  # int where static
    shapes: dict[str, list[int]] = {}
    for text in texts:
        name, _, dims_text = text.rpartition(":")
        if not name:
            if len(declared) != 1:
                raise EdgeqError(f"--input-shape '{text}': name the input (the model has {len(declared)}: "
                                 f"{', '.join(declared)}), e.g. {INPUT_SHAPE_EXAMPLE}")
            name = next(iter(declared))
        if name not in declared:
            raise EdgeqError(f"--input-shape '{text}': the model has no input '{name}' (inputs: {', '.join(declared)})")
        if name in shapes:
            raise EdgeqError(f"--input-shape gives input '{name}' twice")
        try:
            dims = [int(part) for part in dims_text.replace("x", ",").split(",") if part.strip()]
        except ValueError:
            dims = []
        if not dims or any(dim <= 0 for dim in dims):
            raise EdgeqError(f"--input-shape '{text}': expected positive integers, e.g. {INPUT_SHAPE_EXAMPLE}")
        rank = len(declared[name])
        if len(dims) not in (rank, rank - 1):
            raise EdgeqError(f"--input-shape '{text}': input '{name}' has rank {rank}, so give {rank - 1} dims "
                             f"after the batch axis (or all {rank})")
        shapes[name] = dims[1:] if len(dims) == rank else dims
        for axis, (fixed, given) in enumerate(zip(declared[name][1:], shapes[name], strict=True), start=1):
            if isinstance(fixed, int) and fixed != given:  # only symbolic dims are the user's to set
                raise EdgeqError(f"--input-shape '{text}': axis {axis} of input '{name}' is {fixed} in the model, "
                                 f"not {given}")
    return shapes


def with_sample_dims(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have ``shapes`` after the batch axis (the original is untouched);
    inferred shapes are dropped, to be inferred again from the new ones."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name not in shapes:
            continue
        for dim, size in zip(value.type.tensor_type.shape.dim[1:], shapes[value.name], strict=True):
            dim.Clear()
            dim.dim_value = size
    del fixed.graph.value_info[:]
    return fixed
