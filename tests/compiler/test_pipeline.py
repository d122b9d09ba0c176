"""The main job on the bundled model, end to end through the Python API."""

import json

import pytest

from compiler.errors import EdgeqError
from compiler.pipeline import CompileOptions, compile_model, parse_bits


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "out"
    return compile_model(CompileOptions(out_dir=str(out), progress=False))


def test_bundled_cnn_loses_at_most_0_3_points(bundled):
    fidelity = bundled.plan.fidelity
    assert fidelity["float_accuracy"] > 0.88
    assert fidelity["quantized_accuracy"] >= fidelity["float_accuracy"] - 0.003


def test_bundled_cnn_runs_on_integer_kernels(bundled):
    kernels = bundled.plan.totals["onnxruntime_kernels"]
    assert kernels["float"] == {}
    assert kernels["integer"]["QLinearConv"] >= 3


def test_plan_json_lists_every_layer_with_bits_and_scales(bundled):
    plan = json.loads((bundled.out_dir / "plan.json").read_text())
    assert plan["recipe"]["name"] == "cnn"
    layers = {layer["node"]: layer for layer in plan["layers"]}
    tensors = {tensor["name"]: tensor for tensor in plan["tensors"]}
    for layer in layers.values():
        assert layer["a_bits"] == 8
        if layer["weight"]:
            assert layer["w_bits"] == 8
            assert tensors[layer["weight"]]["scale"]
    assert plan["totals"]["weight_bytes"] == sum(layer["weight_params"] for layer in layers.values())


@pytest.mark.parametrize("text,expected", [("w8a8", (8, 8)), ("W4A8", (4, 8)), ("w8a16", (8, 16)), ("w2a8", (2, 8))])
def test_parse_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text", ["8", "w8", "w5a8", "w1a8", "w8a4", "a8w8"])
def test_parse_bits_rejects(text):
    with pytest.raises(EdgeqError, match="--bits"):
        parse_bits(text)


def test_calibration_fits_each_quantizer_at_its_own_width():
    """A 16-bit layer's input range is MSE-fitted for 16 bits, not clipped as for 8."""
    from compiler.calibrate import collect_ranges
    from compiler.export import calibrate_plan
    from passes.insert_qdq import activation_groups
    from passes.select_layers import select_layers
    from tests.passes.tiny_models import conv_data, conv_net

    model, data = conv_net(), conv_data()
    plan = select_layers(model)
    wide_layer = next(iter(plan.layers.values()))
    wide_layer.a_bits = 16
    ranges = calibrate_plan(model, plan, data, integer_only=False)

    groups = {name: group.bits for group in activation_groups(model, plan) for name in group.tensors}
    wide_input = wide_layer.inputs[0]
    assert groups[wide_input] == 16
    by_width = {bits: collect_ranges(model, data, [wide_input], method="mse", bits=bits, progress=False)[wide_input]
                for bits in (8, 16)}
    assert by_width[8] != by_width[16]  # the data clips differently at the two widths
    assert ranges[wide_input] == by_width[16]
    narrow = [name for name, bits in groups.items() if bits == 8 and name in ranges]
    assert narrow, "the other quantizers stay 8-bit"
    for name in narrow:
        assert ranges[name] == collect_ranges(model, data, [name], method="mse", bits=8, progress=False)[name]


def test_a_model_with_a_fixed_batch_compiles_and_is_measured_on_every_sample(tmp_path):
    """Edge models often pin batch 1: fidelity and tensor SQNR run at that batch size (and a fixed batch of 4
    with 10 samples pads its last batch), measuring every sample once."""
    import numpy as np
    import onnx

    from compiler.fidelity import run_model
    from tests.qdq_fixtures import conv_block_model

    model = conv_block_model()  # its input is [1, 3, 16, 16]
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    calib = {"x": np.random.default_rng(0).uniform(-1, 1, (10, 3, 16, 16)).astype(np.float32)}
    result = compile_model(CompileOptions(model=str(path), calib_data=calib, out_dir=str(tmp_path / "out"),
                                          progress=False))
    assert result.plan.fidelity["samples"] == 10 and result.plan.fidelity["tensor_sqnr_db"]
    one_by_one = np.concatenate([run_model(model, {"x": calib["x"][i:i + 1]})["y"] for i in range(10)])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.testing.assert_allclose(run_model(model, calib)["y"], one_by_one, rtol=1e-5, atol=1e-6)


def test_compile_options_take_one_pin_string_and_an_allocator_dict(tmp_path):
    import numpy as np
    import onnx

    from compiler.mixed import AllocatorOptions
    from tests.tiny_models import random_inputs, tiny_cnn

    assert CompileOptions(pins="/0/Conv=w8a8").pins == ["/0/Conv=w8a8"]
    assert CompileOptions(pins=("a=w8", "b=a8")).pins == ["a=w8", "b=a8"]
    allocator = CompileOptions(allocator={"solver": "greedy"}).allocator
    assert isinstance(allocator, AllocatorOptions) and allocator.solver == "greedy"
    for bad, message in (({"pins": 5}, "pins must be"), ({"pins": ["a=w8", 3]}, "pins must be"),
                         ({"allocator": {"solvr": "greedy"}}, "unknown option 'solvr'"),
                         ({"allocator": {"solver": "annealing"}}, "unknown solver"),
                         ({"allocator": "greedy"}, "must be a compiler.mixed.AllocatorOptions")):
        with pytest.raises(EdgeqError, match=message):
            CompileOptions(**bad)

    onnx.save(tiny_cnn(), str(tmp_path / "tiny.onnx"))
    calib = {"input": random_inputs((3, 16, 16), 16)}
    options = CompileOptions(model=str(tmp_path / "tiny.onnx"), calib_data=calib, bits="w4a8",
                             out_dir=str(tmp_path / "out"), progress=False)
    options.pins = "conv2=w8a8"  # set after construction: compile_model normalizes again
    layers = compile_model(options).plan.layers
    assert (layers["conv2"].w_bits, layers["conv2"].a_bits) == (8, 8) and layers["conv1"].w_bits == 4
    result = compile_model(CompileOptions(model=str(tmp_path / "tiny.onnx"), calib_data=calib, budget="size=0.85",
                                          allocator={"sensitivity": "proxy"}, out_dir=str(tmp_path / "b"),
                                          progress=False))
    assert result.plan.totals["allocation"]["allocator"]["sensitivity"] == "proxy"
    assert np.isfinite(result.plan.fidelity["outputs"]["logits"]["sqnr_db"])


def test_compile_takes_an_in_memory_model_and_leaves_it_as_it_was(tmp_path):
    """Python callers holding an onnx.ModelProto (from an exporter) pass it as it is, as onnxsim takes one;
    it once failed with a TypeError from Path()."""
    from compiler.mixed import allocate_model
    from tests.tiny_models import random_inputs, tiny_cnn

    model = tiny_cnn()
    before = model.SerializeToString()
    calib = {"input": random_inputs((3, 16, 16), 16)}
    result = compile_model(CompileOptions(model=model, calib_data=calib, out_dir=str(tmp_path / "out"), progress=False))
    assert result.plan.model == "tiny_cnn.onnx"  # named by its graph
    assert (tmp_path / "out" / "report.md").read_text().startswith("# edgeq report: tiny_cnn.onnx")
    assert result.plan.fidelity["outputs"]["logits"]["sqnr_db"] > 25
    assert model.SerializeToString() == before
    plan = allocate_model(CompileOptions(model=model, calib_data=calib, budget="size=0.7",
                                         allocator={"sensitivity": "proxy"}, progress=False))
    assert plan.totals["allocation"]["totals"]["size_fraction"] <= 0.7
    assert model.SerializeToString() == before
    with pytest.raises(EdgeqError, match="must be an .onnx path or an onnx.ModelProto, not int"):
        CompileOptions(model=42)


@pytest.mark.parametrize("target", ["mcu", "cpu"])
def test_mobilenet_v3_ingredients_compile_to_integer_code(target, tmp_path):
    """HardSwish, a squeeze-excite gate (HardSigmoid x activations), Sigmoid and a final Softmax:
    integer-only code (QLookup tables, QSoftmax) bit-exact with the reference interpreter, and as
    faithful as the QDQ model; the onnx target keeps those ops float."""
    import numpy as np
    import onnx

    from tests.qdq_fixtures import mobilenet_v3_block_model

    model = mobilenet_v3_block_model()
    calib = {"x": np.random.default_rng(0).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)}
    result = compile_model(CompileOptions(model=model, calib_data=calib, target=target, out_dir=str(tmp_path / "out"),
                                          progress=False))
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["bit_exact"]
    int_model = onnx.load(str(next((tmp_path / "out").rglob("model.int.onnx"))))
    lookups = [node for node in int_model.graph.node if node.op_type == "QLookup"]
    assert len(lookups) == 3 and any(node.op_type == "QSoftmax" for node in int_model.graph.node)
    fidelity = result.plan.fidelity["outputs"]["y"]
    assert fidelity["top1_agreement"] == 1.0 and fidelity["cosine"] > 0.999
    onnx_plan = compile_model(CompileOptions(model=model, calib_data=calib, out_dir=str(tmp_path / "onnx"),
                                             progress=False)).plan
    kept_float = {entry["op_type"] for entry in onnx_plan.float_nodes}
    assert {"HardSwish", "HardSigmoid", "Sigmoid", "Softmax"} <= kept_float


@pytest.mark.parametrize("target", ["mcu", "cpu"])
def test_a_u_net_step_compiles_to_integer_code(target, tmp_path):
    """Nearest upsampling (Gathers) and a skip Concat of a Relu map with a signed conv output: bit-exact
    with the reference interpreter and as faithful as the QDQ model (the Relu map had lost its Relu to the
    Concat's shared range: 6 dB; see tests/passes/test_insert_qdq.py)."""
    import numpy as np

    from tests.qdq_fixtures import upsampling_model

    calib = {"x": np.random.default_rng(0).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    result = compile_model(CompileOptions(model=upsampling_model(), calib_data=calib, target=target,
                                          out_dir=str(tmp_path / "out"), progress=False))
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["bit_exact"]
    assert result.plan.fidelity["outputs"]["y"]["sqnr_db"] > 30

