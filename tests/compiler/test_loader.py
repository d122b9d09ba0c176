"""--input-shape: parsing, and the copy of the model with those dims (the original untouched)."""

import onnx
import pytest

from compiler.data import input_sample_dims
from compiler.errors import EdgeqError
from compiler.loader import parse_input_shapes, with_sample_dims
from tests.tiny_models import single_conv


def test_per_sample_or_whole_shape_fixes_the_dims_after_the_batch_axis():
    model = single_conv(["N", 3, "H", "W"])
    assert parse_input_shapes(["x:3,32,24"], model) == {"x": [3, 32, 24]}
    assert parse_input_shapes(["1,3,32,24"], model) == {"x": [3, 32, 24]}  # one input: the name may go
    assert parse_input_shapes(["x:3x32x24"], model) == {"x": [3, 32, 24]}
    fixed = with_sample_dims(model, {"x": [3, 32, 24]})
    assert input_sample_dims(fixed) == {"x": [3, 32, 24]}
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # batches still run
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "H"  # the user's model is untouched
    inferred = onnx.shape_inference.infer_shapes(fixed)
    y = next(value for value in [*inferred.graph.value_info, *inferred.graph.output] if value.name == "y")
    assert [dim.dim_value for dim in y.type.tensor_type.shape.dim][1:] == [4, 32, 24]


@pytest.mark.parametrize(("texts", "message"), [
    (["3,32,24"], "name the input"),
    (["y:3,32,24"], "has no input 'y'"),
    (["x:3,32"], "has rank 4, so give 3 dims"),
    (["x:3,a,24"], "expected positive integers"),
    (["x:3,0,24"], "expected positive integers"),
    (["x:4,32,24"], "axis 1 of input 'x' is 3 in the model, not 4"),
    (["x:3,32,24", "x:3,8,8"], "gives input 'x' twice"),
])
def test_bad_input_shapes_are_one_line_errors(texts, message):
    with pytest.raises(EdgeqError, match=message):
        parse_input_shapes(texts, single_conv(["N", 3, "H", "W"], extra_input=True))


def test_symbolic_dims_after_the_batch_axis_are_refused_with_the_fix():
    with pytest.raises(EdgeqError, match=r"input 'x' needs static dims .* got \['N', 3, 'H', 'W'\]: fix them "
                                         r"with --input-shape x:"):
        input_sample_dims(single_conv(["N", 3, "H", "W"]))
    assert input_sample_dims(single_conv(["N", 3, 8, 8])) == {"x": [3, 8, 8]}
