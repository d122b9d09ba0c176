"""Calibration data loading: every accepted format and every error path."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.data import iterate_batches, load_calibration, parse_preprocess
from compiler.errors import EdgeqError


def model_with_inputs(*inputs: tuple[str, int, list]) -> onnx.ModelProto:
    """Identity per input: enough for loading (the data is checked against the inputs)."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs],
        [helper.make_tensor_value_info(f"{name}_out", dtype, shape) for name, dtype, shape in inputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def two_inputs() -> onnx.ModelProto:
    return model_with_inputs(("ids", TensorProto.INT64, ["N", "S"]), ("image", TensorProto.FLOAT, ["N", 3, 4, 4]))


@pytest.fixture
def image_model() -> onnx.ModelProto:
    return model_with_inputs(("input", TensorProto.FLOAT, [1, 3, 8, 6]))


def arrays(samples: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(0, 9, (samples, 7)), "image": rng.normal(size=(samples, 3, 4, 4)).astype(np.float32)}


# -- accepted formats -------------------------------------------------------------
def test_npy_directory(tmp_path, two_inputs):
    for name, array in arrays().items():
        np.save(tmp_path / f"{name}.npy", array)
    data = load_calibration(tmp_path, two_inputs)
    for name, array in arrays().items():
        np.testing.assert_array_equal(data[name], array)
    assert data["ids"].dtype == np.int64 and data["image"].dtype == np.float32


def test_npy_with_safe_casts(tmp_path, two_inputs):
    source = arrays()
    np.save(tmp_path / "ids.npy", source["ids"].astype(np.int32))
    np.save(tmp_path / "image.npy", source["image"].astype(np.float64))
    data = load_calibration(tmp_path, two_inputs, max_samples=3)
    assert data["ids"].dtype == np.int64 and data["image"].dtype == np.float32
    np.testing.assert_array_equal(data["ids"], source["ids"][:3])


def test_integer_pixels_for_a_float_input_are_taken_with_a_warning(tmp_path, two_inputs, capsys):
    source = arrays()
    np.save(tmp_path / "ids.npy", source["ids"])
    np.save(tmp_path / "image.npy", np.full((5, 3, 4, 4), 200, np.uint8))
    data = load_calibration(tmp_path, two_inputs)
    assert data["image"].dtype == np.float32 and data["image"].max() == 200
    err = capsys.readouterr().err
    assert "'image' is uint8 but the model input is float32" in err and "'ids'" not in err  # int widening is quiet


def test_npz_directory_is_concatenated_in_name_order(tmp_path, two_inputs):
    first, second = arrays(3), arrays(4)
    np.savez(tmp_path / "b.npz", **second)
    np.savez(tmp_path / "a.npz", **first)
    data = load_calibration(tmp_path, two_inputs)
    np.testing.assert_array_equal(data["image"], np.concatenate([first["image"], second["image"]]))
    single = load_calibration(tmp_path / "a.npz", two_inputs)
    np.testing.assert_array_equal(single["ids"], first["ids"])


def test_single_input_accepts_unnamed_npz_and_single_npy(tmp_path, image_model):
    x = np.zeros((2, 3, 8, 6), np.float32)
    np.savez(tmp_path / "unnamed.npz", x)
    assert load_calibration(tmp_path / "unnamed.npz", image_model)["input"].shape == (2, 3, 8, 6)
    np.save(tmp_path / "anything.npy", x)
    assert load_calibration(tmp_path / "anything.npy", image_model)["input"].shape == (2, 3, 8, 6)


def test_image_folder(tmp_path, image_model):
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)  # H=12, W=10
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"img{index}.png")
    Image.fromarray(pixels[0]).save(tmp_path / "extra.jpg", quality=95)
    spec = "mean=0.5:0.5:0.5,std=0.25,scale=255,resize=8"
    data = load_calibration(tmp_path, image_model, preprocess=spec)
    assert data["input"].shape == (4, 3, 8, 6) and data["input"].dtype == np.float32
    # shorter side (W=10) -> 8: 12x10 becomes 10x8 (HxW), then the centred 8x6 crop
    resized = np.asarray(Image.fromarray(pixels[0]).resize((8, 10), Image.Resampling.BILINEAR), np.float32)
    top, left = (10 - 8) // 2, (8 - 6) // 2
    expected = (resized[top : top + 8, left : left + 6] / 255 - 0.5) / 0.25
    np.testing.assert_allclose(data["input"][1], expected.transpose(2, 0, 1), atol=1e-5)  # sorted: extra.jpg, img0.png, ...


def test_image_folder_nhwc_grayscale(tmp_path):
    from PIL import Image

    model = model_with_inputs(("gray", TensorProto.FLOAT, ["N", 5, 5, 1]))
    Image.fromarray(np.full((5, 5), 51, np.uint8)).save(tmp_path / "a.png")
    data = load_calibration(tmp_path, model, preprocess="scale=255")
    np.testing.assert_allclose(data["gray"], np.full((1, 5, 5, 1), 0.2), atol=1e-6)


def test_random_samples(two_inputs):
    data = load_calibration(None, two_inputs, random_samples=6)
    assert data["image"].shape == (6, 3, 4, 4) and data["image"].dtype == np.float32
    assert data["ids"].shape[0] == 6 and data["ids"].dtype == np.int64


def test_iterate_batches():
    data = {"a": np.arange(10), "b": np.arange(20).reshape(10, 2)}
    batches = list(iterate_batches(data, 4))
    assert [len(batch["a"]) for batch in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([batch["b"] for batch in batches]), data["b"])


def test_parse_preprocess():
    spec = parse_preprocess("size=224x192, mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=nhwc,scale=1")
    assert spec.size == (224, 192) and spec.layout == "NHWC" and spec.scale == 1.0
    assert spec.mean == (0.485, 0.456, 0.406)


# -- errors ---------------------------------------------------------------------------
def test_no_data_and_no_random(two_inputs):
    with pytest.raises(EdgeqError, match=r"no calibration data given; pass --calib DIR .*'ids', 'image'"):
        load_calibration(None, two_inputs)


def test_missing_path(tmp_path, two_inputs):
    with pytest.raises(EdgeqError, match="does not exist"):
        load_calibration(tmp_path / "nope", two_inputs)


def test_evaluation_data_errors_name_the_eval_option(tmp_path, two_inputs):
    """Held-out data go through the same loader; its errors once told the user to fix --calib."""
    with pytest.raises(EdgeqError, match=r"^evaluation data .*nope does not exist; pass --eval DIR"):
        load_calibration(tmp_path / "nope", two_inputs, role="evaluation")
    np.save(tmp_path / "ids.npy", arrays()["ids"])
    with pytest.raises(EdgeqError, match=r"^evaluation folder .* has no image\.npy"):
        load_calibration(tmp_path, two_inputs, role="evaluation")


def test_preprocess_for_arrays_is_reported_not_silently_dropped(tmp_path, two_inputs, capsys):
    np.savez(tmp_path / "all.npz", **arrays())
    load_calibration(tmp_path, two_inputs, preprocess="size=4")
    assert "--preprocess applies to folders of images only" in capsys.readouterr().err
    load_calibration(tmp_path, two_inputs)
    assert "--preprocess" not in capsys.readouterr().err


def test_empty_folder(tmp_path, two_inputs):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(EdgeqError, match=r"has no \.npy/\.npz/image files; pass --calib DIR with one <input>\.npy"):
        load_calibration(tmp_path, two_inputs)


def test_missing_and_extra_npy(tmp_path, two_inputs):
    np.save(tmp_path / "ids.npy", arrays()["ids"])
    with pytest.raises(EdgeqError, match=r"no image\.npy for model input 'image'"):
        load_calibration(tmp_path, two_inputs)
    np.save(tmp_path / "image.npy", arrays()["image"])
    np.save(tmp_path / "imgae.npy", arrays()["image"])
    with pytest.raises(EdgeqError, match=r"imgae\.npy which match no model input"):
        load_calibration(tmp_path, two_inputs)


def test_mixed_kinds(tmp_path, two_inputs):
    np.save(tmp_path / "ids.npy", arrays()["ids"])
    np.savez(tmp_path / "all.npz", **arrays())
    with pytest.raises(EdgeqError, match="mixes npy and npz files"):
        load_calibration(tmp_path, two_inputs)


def test_wrong_dtype(tmp_path, two_inputs):
    source = arrays()
    np.save(tmp_path / "ids.npy", source["ids"].astype(np.float32))
    np.save(tmp_path / "image.npy", source["image"])
    with pytest.raises(EdgeqError, match="'ids' is float32 but the model input is int64; save it as int64"):
        load_calibration(tmp_path, two_inputs)


def test_wrong_shape(tmp_path, two_inputs):
    source = arrays()
    np.save(tmp_path / "ids.npy", source["ids"])
    np.save(tmp_path / "image.npy", source["image"][:, :, :3])
    with pytest.raises(EdgeqError, match=r"'image' has shape \(5, 3, 3, 4\).*\(N, 3, 4, 4\)"):
        load_calibration(tmp_path, two_inputs)
    np.save(tmp_path / "image.npy", source["image"][0])  # one sample without the sample axis
    with pytest.raises(EdgeqError, match=r"samples of shape \(3, 4, 4\)"):
        load_calibration(tmp_path, two_inputs)


def test_empty_and_mismatched_counts(tmp_path, two_inputs):
    source = arrays()
    np.save(tmp_path / "ids.npy", source["ids"][:0])
    np.save(tmp_path / "image.npy", source["image"][:0])
    with pytest.raises(EdgeqError, match="has no samples"):
        load_calibration(tmp_path, two_inputs)
    np.save(tmp_path / "ids.npy", source["ids"][:4])
    np.save(tmp_path / "image.npy", source["image"])
    with pytest.raises(EdgeqError, match="different sample counts"):
        load_calibration(tmp_path, two_inputs)


def test_nan_values(tmp_path, image_model):
    x = np.zeros((2, 3, 8, 6), np.float32)
    x[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "input.npy", x)
    with pytest.raises(EdgeqError, match="contains NaN or infinite values"):
        load_calibration(tmp_path, image_model)


def test_npz_with_wrong_keys_and_bad_file(tmp_path, two_inputs):
    np.savez(tmp_path / "a.npz", ids=arrays()["ids"], pixels=arrays()["image"])
    with pytest.raises(EdgeqError, match=r"has keys \['ids', 'pixels'\] but the model's inputs are \['ids', 'image'\]"):
        load_calibration(tmp_path, two_inputs)
    (tmp_path / "a.npz").write_bytes(b"not a zip")
    with pytest.raises(EdgeqError, match="cannot read .*a.npz as a .npz archive"):
        load_calibration(tmp_path, two_inputs)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ids.npy").write_bytes(b"garbage")
    (bad / "image.npy").write_bytes(b"garbage")
    with pytest.raises(EdgeqError, match="cannot read .* as a .npy array"):
        load_calibration(bad, two_inputs)


def test_non_npz_file(tmp_path, two_inputs):
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(EdgeqError, match="is a file but not an .npz archive"):
        load_calibration(tmp_path / "data.csv", two_inputs)


def test_image_errors(tmp_path, image_model, two_inputs):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(EdgeqError, match=r"holds images; say how to preprocess them with --preprocess 'size="):
        load_calibration(tmp_path, image_model)
    with pytest.raises(EdgeqError, match="single-input models only"):
        load_calibration(tmp_path, two_inputs, preprocess="size=4")
    with pytest.raises(EdgeqError, match=r"bad preprocessing spec .*unknown key 'colour'"):
        load_calibration(tmp_path, image_model, preprocess="colour=red")
    with pytest.raises(EdgeqError, match="invalid value for std"):
        load_calibration(tmp_path, image_model, preprocess="std=0")
    with pytest.raises(EdgeqError, match="'size224' is not key=value"):
        load_calibration(tmp_path, image_model, preprocess="size224")
    with pytest.raises(EdgeqError, match="invalid value for mean: '1:2'"):
        load_calibration(tmp_path, image_model, preprocess="mean=1:2")
    with pytest.raises(EdgeqError, match="gives 3 mean/std values for a 1-channel input"):
        load_calibration(tmp_path, image_model, preprocess="mean=1:2:3,channels=1")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(EdgeqError, match="cannot decode image .*b.jpg"):
        load_calibration(tmp_path, image_model, preprocess="scale=255")


def test_image_model_without_static_size(tmp_path):
    from PIL import Image

    model = model_with_inputs(("x", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(EdgeqError, match="no static height/width; add size=H"):
        load_calibration(tmp_path, model, preprocess="scale=255")
    assert load_calibration(tmp_path, model, preprocess="size=4")["x"].shape == (1, 3, 4, 4)


def test_bad_max_samples_and_batch(tmp_path, image_model):
    np.save(tmp_path / "input.npy", np.zeros((2, 3, 8, 6), np.float32))
    with pytest.raises(EdgeqError, match="must be positive"):
        load_calibration(tmp_path, image_model, max_samples=0)
    with pytest.raises(EdgeqError, match="batch size must be positive"):
        next(iterate_batches({"x": np.zeros(3)}, 0))
