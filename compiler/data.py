"""Calibration data: load it from the user's files, check it against the model, batch it.

Accepted (``load_calibration``):

* a directory with one ``<input name>.npy`` per model input (first axis =
  samples; a ``/`` or ``:`` in an input name is written ``_`` in the file name);
* one ``.npz`` file, or a directory of them, keyed by input name (several
  files are concatenated along the first axis; a single-input model also
  accepts the unnamed ``arr_0`` of ``np.savez(path, x)``);
* a directory of images (png/jpg/jpeg/bmp/webp) for a single-input image model,
  with a preprocessing spec such as
  ``size=224,resize=256,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NCHW,scale=255``;
* nothing, with ``random_samples > 0``: random data shaped like the inputs
  (the caller warns that ranges from random data are meaningless).

The model's first input axis is its batch axis; every array's first axis is
the sample axis and the rest must match the input's static dims. Values are
checked for dtype (float64 is cast to float32, other safe widenings such as
int32 -> int64 are applied, anything else is refused) and for NaN/inf. Every
problem is an :class:`EdgeqError` with one line that says what to pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from compiler.console import warn
from compiler.errors import EdgeqError
from compiler.graph import graph_input_names

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREPROCESS_EXAMPLE = "size=224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NCHW,scale=255"
PREPROCESS_KEYS = ("size", "resize", "mean", "std", "layout", "scale", "channels")
# Flags named in messages (the CLI's spelling).
CALIB_FLAG = "--calib"
# The key np.savez gives an array passed without a name; a one-input model takes it as its input.
UNNAMED_ARRAY = "arr_0"
# What the data are for, as messages name them, and the option that gives them.
ROLE_FLAGS = {"calibration": CALIB_FLAG, "evaluation": "--eval"}
PREPROCESS_FLAG = "--preprocess"
RANDOM_FLAG = "--random-calib"


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | str | None] | None  # static dims as int, symbolic as str/None; None: unknown

    def sample_shape_text(self) -> str:
        return ", ".join("?" if not isinstance(d, int) else str(d) for d in (self.shape or [])[1:])


def input_sample_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Each real graph input's dims after the batch axis.

    Integer-only code is generated for fixed shapes, so a symbolic or unknown
    dim there is a one-line EdgeqError naming the input (the batch axis may be
    anything).
    """
    result = {}
    for spec in model_inputs(model):
        dims = spec.shape or []
        if not all(isinstance(dim, int) for dim in dims[1:]):
            shown = [dim if dim is not None else "?" for dim in dims]
            raise EdgeqError(f"input '{spec.name}' needs static dims after the batch axis for integer-only code, "
                             f"got {shown}: fix them with --input-shape {spec.name}:D,D,...")
        result[spec.name] = list(dims[1:])
    return result


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Element type and shape of every real (non-initializer) input."""
    real = set(graph_input_names(model))
    specs = []
    for value in model.graph.input:
        if value.name not in real:
            continue
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception:  # noqa: BLE001 -- unknown/undefined element type
            raise EdgeqError(
                f"model input '{value.name}' has no supported tensor element type"
            ) from None
        shape: list[int | str | None] | None = [] if tensor_type.HasField("shape") else None
        for dim in tensor_type.shape.dim if shape is not None else []:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            else:
                shape.append(dim.dim_param or None)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _file_stem(input_name: str) -> str:
    return re.sub(r"[/\\:]", "_", input_name)


def _expected_files(specs: list[InputSpec]) -> str:
    return ", ".join(f"{_file_stem(spec.name)}.npy" for spec in specs)


def _layout_hint(specs: list[InputSpec], role: str = "calibration") -> str:
    names = ", ".join(f"'{spec.name}'" for spec in specs)
    return f"pass {ROLE_FLAGS[role]} DIR with one <input>.npy per model input ({names})"


# -- arrays ----------------------------------------------------------------------------
def _load_npy_dir(folder: Path, files: list[Path], specs: list[InputSpec], role: str) -> dict[str, np.ndarray]:
    by_stem = {path.stem: path for path in files}
    arrays = {}
    for spec in specs:
        path = by_stem.pop(_file_stem(spec.name), None)
        if path is None:
            raise EdgeqError(
                f"{role} folder {folder}/ has no {_file_stem(spec.name)}.npy for model input '{spec.name}'; expected {_expected_files(specs)}"
            )
        arrays[spec.name] = _read_npy(path)
    if by_stem:
        extra = ", ".join(sorted(f"{stem}.npy" for stem in by_stem))
        raise EdgeqError(
            f"{role} folder {folder}/ has {extra} which match no model input; expected {_expected_files(specs)}"
        )
    return arrays


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # noqa: BLE001 -- numpy raises ValueError/OSError/...
        raise EdgeqError(f"cannot read {path} as a .npy array: {error}") from error


def _load_npz_files(files: list[Path], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    names = [spec.name for spec in specs]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as archive:
                content = {key: archive[key] for key in archive.files}
        except Exception as error:  # noqa: BLE001
            raise EdgeqError(f"cannot read {path} as a .npz archive: {error}") from error
        if len(names) == 1 and list(content) == [UNNAMED_ARRAY]:
            content = {names[0]: content[UNNAMED_ARRAY]}
        missing = [name for name in names if name not in content]
        extra = [key for key in content if key not in names]
        if missing or extra:
            raise EdgeqError(
                f"{path} has keys {sorted(content)} but the model's inputs are {names}; save it with np.savez(path, **{{input_name: array}})"
            )
        for name in names:
            parts[name].append(content[name])
    arrays = {}
    for name, pieces in parts.items():
        ranks = {piece.ndim for piece in pieces}
        tails = {piece.shape[1:] for piece in pieces}
        if len(ranks) > 1 or len(tails) > 1:
            raise EdgeqError(
                f"the .npz files hold '{name}' with different per-sample shapes {sorted(tails)}; they must agree to be concatenated"
            )
        arrays[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    return arrays


# -- images ----------------------------------------------------------------------------
@dataclass
class Preprocess:
    """How images become a model input (parsed from the spec string)."""

    size: tuple[int, int] | None = None  # (height, width) of the center crop
    resize: int | None = None  # shorter side before cropping (default: to fit ``size``)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None  # NCHW or NHWC
    scale: float = 255.0  # pixels are divided by it before mean/std
    channels: int | None = None  # 1 (grayscale) or 3 (RGB)


def parse_preprocess(spec: str) -> Preprocess:
    """Parse ``key=value,...`` (keys: size, resize, mean, std, layout, scale, channels)."""
    result = Preprocess()

    def bad(what: str) -> EdgeqError:
        return EdgeqError(f"bad preprocessing spec '{spec}': {what}; example: {PREPROCESS_EXAMPLE}")

    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise bad(f"'{item}' is not key=value")
        try:
            if key == "size":
                dims = [int(v) for v in re.split(r"[x:]", value)]
                if len(dims) not in (1, 2) or min(dims) <= 0:
                    raise ValueError
                result.size = (dims[0], dims[-1])
            elif key == "resize":
                result.resize = int(value)
                if result.resize <= 0:
                    raise ValueError
            elif key in ("mean", "std"):
                numbers = tuple(float(v) for v in value.split(":"))
                if len(numbers) not in (1, 3) or (key == "std" and min(numbers) <= 0):
                    raise ValueError
                setattr(result, key, numbers)
            elif key == "layout":
                result.layout = value.upper()
                if result.layout not in ("NCHW", "NHWC"):
                    raise ValueError
            elif key == "scale":
                result.scale = float(value)
                if result.scale <= 0:
                    raise ValueError
            elif key == "channels":
                result.channels = int(value)
                if result.channels not in (1, 3):
                    raise ValueError
            else:
                raise bad(f"unknown key '{key}' (known: {', '.join(PREPROCESS_KEYS)})")
        except ValueError:
            raise bad(f"invalid value for {key}: '{value}'") from None
    return result


def _image_input_layout(spec: InputSpec, preprocess: Preprocess) -> tuple[str, int | None, tuple]:
    """Layout, channel count and (H, W) of a rank-4 image input, from the spec and the model."""
    if spec.shape is None or len(spec.shape) != 4:
        raise EdgeqError(
            f"image calibration needs a rank-4 image input, but '{spec.name}' has shape {spec.shape}; {_layout_hint([spec])}"
        )
    layout = preprocess.layout
    if layout is None:
        if spec.shape[1] in (1, 3):
            layout = "NCHW"
        elif spec.shape[3] in (1, 3):
            layout = "NHWC"
        else:
            raise EdgeqError(
                f"cannot tell the layout of input '{spec.name}' {spec.shape}; add layout=NCHW or layout=NHWC to {PREPROCESS_FLAG}"
            )
    channel_dim, spatial = (spec.shape[1], spec.shape[2:4]) if layout == "NCHW" else (spec.shape[3], spec.shape[1:3])
    channels = preprocess.channels or (channel_dim if isinstance(channel_dim, int) else 3)
    if preprocess.size is not None:
        size = preprocess.size
    elif all(isinstance(d, int) for d in spatial):
        size = tuple(spatial)
    else:
        raise EdgeqError(
            f"input '{spec.name}' has no static height/width; add size=H or size=HxW to {PREPROCESS_FLAG}"
        )
    return layout, channels, size


def _load_image(path: Path, channels: int, size: tuple[int, int], resize: int | None):
    from PIL import Image, UnidentifiedImageError  # optional dependency: only for image folders

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            height, width = size
            shorter = resize or max(height, width)
            factor = shorter / min(image.width, image.height)
            new_w = max(width, round(image.width * factor))
            new_h = max(height, round(image.height * factor))
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - width) // 2, (new_h - height) // 2
            image = image.crop((left, top, left + width, top + height))
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise EdgeqError(f"cannot decode image {path}: {error}") from error
    return array.reshape(height, width, channels)


def _load_images(folder: Path, files: list[Path], specs: list[InputSpec], preprocess: str | None, role: str):
    if len(specs) != 1:
        raise EdgeqError(
            f"{role} folder {folder}/ holds images but the model has {len(specs)} inputs; images work for single-input models only: {_layout_hint(specs, role)}"
        )
    if preprocess is None:
        raise EdgeqError(
            f"{role} folder {folder}/ holds images; say how to preprocess them with {PREPROCESS_FLAG} '{PREPROCESS_EXAMPLE}'"
        )
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise EdgeqError("reading calibration images needs Pillow: pip install pillow") from None
    spec = specs[0]
    if spec.dtype.kind != "f":
        raise EdgeqError(f"image calibration needs a float input, but '{spec.name}' is {spec.dtype}")
    options = parse_preprocess(preprocess)
    layout, channels, size = _image_input_layout(spec, options)
    for stats in (options.mean, options.std):
        if len(stats) not in (1, channels):
            raise EdgeqError(
                f"{PREPROCESS_FLAG} gives {len(stats)} mean/std values for a {channels}-channel input"
            )
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)
    images = np.empty((len(files), size[0], size[1], channels), dtype=np.float32)
    for index, path in enumerate(files):
        images[index] = (_load_image(path, channels, size, options.resize) / options.scale - mean) / std
    if layout == "NCHW":
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return {spec.name: images.astype(spec.dtype, copy=False)}


# -- random --------------------------------------------------------------------------------
def random_calibration(
    model: onnx.ModelProto, samples: int, *, seed: int = 0, symbolic_size: int = 16
) -> dict[str, np.ndarray]:
    """Random data shaped like the inputs: N(0, 1) floats, 0/1 integers and booleans.

    Symbolic dims other than the batch axis get ``symbolic_size``.
    """
    rng = np.random.default_rng(seed)
    data = {}
    for spec in model_inputs(model):
        if spec.shape is None:
            raise EdgeqError(f"cannot make random data for input '{spec.name}': its shape is unknown")
        shape = [samples] + [d if isinstance(d, int) else symbolic_size for d in spec.shape[1:]]
        if spec.dtype.kind == "f":
            data[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iub":
            data[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            raise EdgeqError(f"cannot make random data for input '{spec.name}' of type {spec.dtype}")
    return data


# -- checks ----------------------------------------------------------------------------------
def _all_finite(array: np.ndarray, chunk_bytes: int = 1 << 26) -> bool:
    """NaN/inf check in slices along the sample axis (bounded memory for memory-mapped data)."""
    step = max(1, chunk_bytes // max(1, array[:1].nbytes))
    return all(np.isfinite(array[start : start + step]).all() for start in range(0, len(array), step))


def _checked(spec: InputSpec, array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype != spec.dtype:
        if array.dtype == np.float64 and spec.dtype == np.float32:
            array = array.astype(np.float32)
        elif np.can_cast(array.dtype, spec.dtype, casting="safe"):
            if array.dtype.kind in "ui" and np.dtype(spec.dtype).kind == "f":
                # edgeq run refuses this; calibration takes it (a model may want raw 0..255 floats) but says so
                warn(f"{source}: '{spec.name}' is {array.dtype} but the model input is {spec.dtype}; using the "
                     f"values as they are (if the model expects normalised inputs, preprocess them first)")
            array = array.astype(spec.dtype)
        else:
            raise EdgeqError(
                f"{source}: '{spec.name}' is {array.dtype} but the model input is {spec.dtype}; save it as {spec.dtype}"
            )
    if not _fits_sample_shape(spec, array):
        raise EdgeqError(
            f"{source}: '{spec.name}' has shape {tuple(array.shape)}, but the model takes samples of shape ({spec.sample_shape_text()}); give an array of shape (N, {spec.sample_shape_text()})"
        )
    if len(array) == 0:
        raise EdgeqError(f"{source}: '{spec.name}' has no samples (first axis is 0)")
    if array.dtype.kind == "f" and not _all_finite(array):
        raise EdgeqError(f"{source}: '{spec.name}' contains NaN or infinite values")
    return array


def _fits_sample_shape(spec: InputSpec, array: np.ndarray) -> bool:
    """Whether ``array``'s samples have the model input's rank and static per-sample dims."""
    return spec.shape is None or (array.ndim == len(spec.shape) and all(
        not isinstance(want, int) or have == want
        for want, have in zip(spec.shape[1:], array.shape[1:], strict=False)))


def check_run_inputs(model: onnx.ModelProto | list[InputSpec], inputs: dict[str, np.ndarray],
                     source: str = "inputs") -> dict[str, np.ndarray]:
    """Inputs for running a compiled model, checked against its graph inputs (names, dtypes, shapes).

    Every model input must be given and nothing else. A dtype may differ only
    within its kind -- another float width (float64 -> float32), a safe integer
    widening (int32 -> int64) -- and is cast; anything else (uint8 pixels for a
    float input: the model's preprocessing was skipped) is a one-line
    EdgeqError naming the input and both dtypes. Per-sample dims must match the
    model's static ones; every input needs the same number (>= 1) of samples.
    """
    specs = model_inputs(model) if isinstance(model, onnx.ModelProto) else model
    names = [spec.name for spec in specs]
    if len(names) == 1 and list(inputs) == [UNNAMED_ARRAY]:  # as for calibration: one unnamed array
        inputs = {names[0]: inputs[UNNAMED_ARRAY]}
    missing = [name for name in names if name not in inputs]
    extra = [name for name in inputs if name not in names]
    if missing or extra:
        raise EdgeqError(f"{source} has {sorted(inputs)} but the model's inputs are {names}; "
                         "save them with np.savez(path, **{input_name: array})")
    checked = {}
    for spec in specs:
        array = np.asarray(inputs[spec.name])
        if array.dtype != spec.dtype:
            floats = array.dtype.kind == "f" and spec.dtype.kind == "f"
            integers = (array.dtype.kind in "iu" and spec.dtype.kind in "iu"
                        and np.can_cast(array.dtype, spec.dtype, casting="safe"))
            if not (floats or integers):
                raise EdgeqError(f"{source}: input '{spec.name}' is {array.dtype} but the model takes {spec.dtype}; "
                                 f"give {spec.dtype} values, preprocessed as for calibration")
            array = array.astype(spec.dtype)
        if not _fits_sample_shape(spec, array):
            raise EdgeqError(f"{source}: input '{spec.name}' has shape {list(array.shape)}, but the model takes "
                             f"samples of shape ({spec.sample_shape_text()}); give an array of shape "
                             f"(N, {spec.sample_shape_text()})")
        if array.ndim == 0 or len(array) == 0:
            raise EdgeqError(f"{source}: input '{spec.name}' has no samples (first axis is 0)")
        checked[spec.name] = array
    counts = {name: len(array) for name, array in checked.items()}
    if len(set(counts.values())) > 1:
        raise EdgeqError(f"{source}: inputs have different sample counts {counts}; every input needs the same number")
    return checked


def load_calibration(
    path: str | Path | None,
    model: onnx.ModelProto,
    *,
    preprocess: str | None = None,
    random_samples: int = 0,
    max_samples: int | None = None,
    seed: int = 0,
    role: str = "calibration",
) -> dict[str, np.ndarray]:
    """Calibration data for ``model`` as ``{input name: array [N, ...]}`` (see module doc).

    ``max_samples`` keeps the first N samples (file/name order is sorted, so the
    choice is deterministic). ``role`` ("calibration" or "evaluation") is what
    errors call the data, and names the option that gives them.
    """
    specs = model_inputs(model)
    if not specs:
        raise EdgeqError("the model has no inputs to calibrate")
    if path is None:
        if random_samples > 0:
            arrays = random_calibration(model, random_samples, seed=seed)
            source = "random calibration data"
        else:
            raise EdgeqError(
                f"no calibration data given; {_layout_hint(specs)} (or {RANDOM_FLAG} N for random data, which gives poor ranges)"
            )
    else:
        arrays, source = _load_path(Path(path), specs, preprocess, role)
    checked = {spec.name: _checked(spec, arrays[spec.name], source) for spec in specs}
    counts = {name: len(array) for name, array in checked.items()}
    if len(set(counts.values())) > 1:
        raise EdgeqError(
            f"{source}: inputs have different sample counts {counts}; every input needs the same number of samples"
        )
    if max_samples is not None:
        if max_samples <= 0:
            raise EdgeqError(f"the number of calibration samples must be positive, got {max_samples}")
        checked = {name: array[:max_samples] for name, array in checked.items()}
    return checked


def _load_path(path: Path, specs: list[InputSpec], preprocess: str | None, role: str):
    if not path.exists():
        raise EdgeqError(f"{role} data {path} does not exist; {_layout_hint(specs, role)}")
    if path.is_file():
        warn_preprocess_unused(preprocess, f"{role} data {path}")
        if path.suffix.lower() == ".npz":
            return _load_npz_files([path], specs), str(path)
        if path.suffix.lower() == ".npy" and len(specs) == 1:
            return {specs[0].name: _read_npy(path)}, str(path)
        raise EdgeqError(
            f"{role} data {path} is a file but not an .npz archive; {_layout_hint(specs, role)}, or an .npz keyed by input name"
        )
    entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    npy = [p for p in entries if p.suffix.lower() == ".npy"]
    npz = [p for p in entries if p.suffix.lower() == ".npz"]
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    kinds = [kind for kind, files in (("npy", npy), ("npz", npz), ("image", images)) if files]
    if not kinds:
        raise EdgeqError(
            f"{role} folder {path}/ has no .npy/.npz/image files; {_layout_hint(specs, role)}"
        )
    if len(kinds) > 1:
        raise EdgeqError(
            f"{role} folder {path}/ mixes {' and '.join(kinds)} files; keep one kind per folder"
        )
    source = f"{role} folder {path}/"
    if not images:
        warn_preprocess_unused(preprocess, source)
    if npy:
        return _load_npy_dir(path, npy, specs, role), source
    if npz:
        return _load_npz_files(npz, specs), source
    return _load_images(path, images, specs, preprocess, role), source


def warn_preprocess_unused(preprocess: str | None, source: str) -> None:
    """Arrays are used as they are: a --preprocess meant for them would otherwise be dropped silently."""
    if preprocess is not None:
        warn(f"{PREPROCESS_FLAG} applies to folders of images only; {source}: arrays, used as they are")


def iterate_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches ``{name: array[start:start+batch_size]}`` (contiguous copies of slices)."""
    if batch_size <= 0:
        raise EdgeqError(f"batch size must be positive, got {batch_size}")
    total = min((len(array) for array in data.values()), default=0)
    for start in range(0, total, batch_size):
        yield {name: np.ascontiguousarray(array[start : start + batch_size]) for name, array in data.items()}


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs pin (static first dimension), if any."""
    sizes = set()
    inits = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            sizes.add(dims[0].dim_value)
    return min(sizes) if sizes else None


def model_batches(model: onnx.ModelProto, data: dict[str, np.ndarray],
                  batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(batch, how many of its samples are real) in batches ``model`` accepts.

    A model with a fixed batch dimension gets batches of exactly that size: a
    short last batch is padded with copies of its final sample, whose outputs
    the caller drops (``output[:count]``).
    """
    return padded_batches(data, batch_size, fixed_batch(model))


def padded_batches(data: dict[str, np.ndarray], batch_size: int,
                   fixed: int | None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """:func:`model_batches` for a batch size ``fixed`` already known (None: any size, ``batch_size`` each)."""
    for batch in iterate_batches(data, fixed or batch_size):
        count = len(next(iter(batch.values())))
        if fixed and count < fixed:
            batch = {name: np.concatenate([value, np.repeat(value[-1:], fixed - count, axis=0)])
                     for name, value in batch.items()}
        yield batch, count
