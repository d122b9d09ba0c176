"""Plan -> QDQ model: the part of the flow that runs once the bits are known.

calibrate activation ranges -> weight grids (block-wise scales) -> the
recipe's weight rounding (GPTQ, bias correction) -> insert QDQ.

``compile_model`` runs it once on the chosen plan; the allocator's
re-ranking (``--rerank``) runs it on each candidate plan, so that what it
measures is what would be compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from compiler.plan import QuantPlan
from compiler.recipe import Recipe, apply_rounding
from passes.insert_qdq import (
    activation_groups,
    plan_weight_grids,
    quantize_model,
    tensors_to_calibrate,
)

Stage = Callable[[str, Callable[[], Any]], Any]


def run_stage(name: str, func: Callable[[], Any]) -> Any:
    """The default ``stage``: run it, nothing recorded."""
    return func()


def calibrate_plan(model: onnx.ModelProto, plan: QuantPlan, calib: dict[str, np.ndarray], *,
                   integer_only: bool, method: str = "auto", batch_size: int = 32,
                   progress: bool = False) -> dict[str, tuple[float, float]]:
    """Activation ranges for every tensor ``plan`` quantizes, each fitted for its quantizer's width."""
    from compiler.calibrate import collect_ranges, resolve_method

    names = tensors_to_calibrate(model, plan, integer_only=integer_only)
    method, overrides = resolve_method(method, model, names)
    # Each quantizer's range is fitted for its own width (16-bit layers of a mixed plan).
    widths = {name: plan.a_bits for name in names}
    for group in activation_groups(model, plan, integer_only=integer_only):
        widths.update({name: group.bits for name in group.tensors if name in widths})
    return collect_ranges(model, calib, names, method=method, bits=widths,
                          signed=plan.activation_signed, batch_size=batch_size,
                          progress=progress, method_overrides=overrides)


def export_plan(model: onnx.ModelProto, plan: QuantPlan, calib: dict[str, np.ndarray], recipe: Recipe, *,
                integer_only: bool, batch_size: int = 32, progress: bool = False,
                stage: Stage = run_stage) -> tuple[onnx.ModelProto, QuantPlan]:
    """The QDQ model of ``plan`` (and the plan, its weight quantizers filled in); ``model`` is not changed.

    The calibration method is the plan's (``plan.recipe["calibrate_method"]``,
    "auto" when unset). ``stage(name, func)`` runs each step (the driver times them).
    """
    method = plan.recipe.get("calibrate_method", "auto")
    ranges = stage("calibrate", lambda: calibrate_plan(model, plan, calib, integer_only=integer_only,
                                                       method=method, batch_size=batch_size, progress=progress))
    # Block-wise grids go into the plan first: the rounding passes round onto the plan's grid.
    plan.totals["block_wise_weights"] = plan_weight_grids(model, plan)
    rounded, plan = stage("rounding", lambda: apply_rounding(recipe, model, plan, calib, progress=progress))
    qdq = stage("insert_qdq", lambda: quantize_model(rounded, plan, ranges, integer_only=integer_only))
    return qdq, plan
