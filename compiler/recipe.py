"""Recipes: which transform and rounding passes run, with which options (TOML).

A recipe is a small TOML file (``compiler/recipes/<name>.toml`` or any path)::

    name = "cnn"
    family = "cnn"
    description = "..."
    weight_block_size = 64                  # optional: block-wise sub-8-bit MatMul/Gemm weights
    [[steps]]
    pass = "equalize"                       # a name from PASSES
    options = { iterations = 20 }           # keyword options of that pass
    [[steps]]
    pass = "gptq"
    max_w_bits = 4                          # only when some layer gets <= 4-bit weights

Steps run in file order within their stage: *transforms* (equalize, smooth,
rotate: float graph in, same function out) run on the canonical float graph
before layer selection; *rounding* (gptq, bias_correction) runs after bit
allocation and activation calibration, right before QDQ insertion.
``default_recipe(model)`` picks by model family (conv nets: equalization +
bias correction + GPTQ below 8 bits; transformers: smoothing + GPTQ below 8
bits).  The recipe that ran is recorded in plan.json (``plan.recipe``).

``weight_block_size`` is the recipe's default weight granularity for
sub-8-bit MatMul/Gemm weights (one scale per that many reduction-axis
elements per output channel, see ``compiler.quantizers``); ``--weight-block``
overrides it, and targets that run an integer-only graph ignore it (their
lowering has per-channel requantization only).
"""

from __future__ import annotations

import inspect
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler.errors import EdgeqError
from compiler.graph import initializer_array
from compiler.plan import QuantPlan

log = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).parent / "recipes"
TRANSFORM_PASSES = ("equalize", "smooth", "rotate")
ROUNDING_PASSES = ("gptq", "bias_correction")
FAMILY_RECIPES = {"cnn": "cnn", "transformer": "transformer", "other": "default"}
MIN_WEIGHT_BLOCK = 2


def _pass_function(name: str):
    if name == "equalize":
        from passes.equalize import equalize as function
    elif name == "smooth":
        from passes.smooth import smooth as function
    elif name == "rotate":
        from passes.rotate import rotate as function
    elif name == "gptq":
        from passes.gptq import gptq as function
    elif name == "bias_correction":
        from passes.bias_correction import bias_correction as function
    else:
        raise KeyError(name)
    return function


@dataclass
class RecipeStep:
    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)
    max_w_bits: int | None = None  # run only when some layer's weights have at most this many bits

    @property
    def stage(self) -> str:
        return "transform" if self.pass_name in TRANSFORM_PASSES else "rounding"

    def applies(self, min_w_bits: int) -> bool:
        return self.max_w_bits is None or min_w_bits <= self.max_w_bits


@dataclass
class Recipe:
    name: str
    family: str = "any"
    description: str = ""
    steps: list[RecipeStep] = field(default_factory=list)
    source: str = ""
    weight_block_size: int | None = None  # default block-wise weight granularity (None: per channel)

    def to_dict(self) -> dict[str, Any]:
        """The form recorded in plan.json."""
        return {
            "name": self.name, "family": self.family, "source": self.source,
            "weight_block_size": self.weight_block_size,
            "steps": [{"pass": step.pass_name, "options": dict(step.options),
                       **({"max_w_bits": step.max_w_bits} if step.max_w_bits is not None else {})}
                      for step in self.steps],
        }

    def with_steps(self, keep) -> Recipe:
        """A copy keeping the steps for which ``keep(step)`` is true (ablations)."""
        return Recipe(self.name, self.family, self.description, [s for s in self.steps if keep(s)], self.source,
                      self.weight_block_size)


def _parse(text: str, source: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise EdgeqError(f"recipe {source}: not valid TOML: {error}") from error
    unknown = set(data) - {"name", "family", "description", "steps", "weight_block_size"}
    if unknown:
        raise EdgeqError(f"recipe {source}: unknown keys {sorted(unknown)}")
    block = data.get("weight_block_size")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < MIN_WEIGHT_BLOCK):
        raise EdgeqError(f"recipe {source}: weight_block_size must be an integer >= {MIN_WEIGHT_BLOCK} "
                         f"(omit it for per-channel weights), got {block!r}")
    steps = []
    for index, entry in enumerate(data.get("steps", [])):
        name = entry.get("pass")
        extra = set(entry) - {"pass", "options", "max_w_bits"}
        if extra:
            raise EdgeqError(f"recipe {source}: step {index + 1}: unknown keys {sorted(extra)}")
        if name not in TRANSFORM_PASSES + ROUNDING_PASSES:
            raise EdgeqError(f"recipe {source}: step {index + 1}: unknown pass {name!r}; "
                             f"known: {', '.join(TRANSFORM_PASSES + ROUNDING_PASSES)}")
        options = dict(entry.get("options", {}))
        accepted = {p.name for p in inspect.signature(_pass_function(name)).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        bad = set(options) - accepted
        if bad:
            raise EdgeqError(f"recipe {source}: pass {name}: unknown options {sorted(bad)}; "
                             f"known: {', '.join(sorted(accepted))}")
        max_w_bits = entry.get("max_w_bits")
        if max_w_bits is not None and not isinstance(max_w_bits, int):
            raise EdgeqError(f"recipe {source}: pass {name}: max_w_bits must be an integer")
        steps.append(RecipeStep(name, options, max_w_bits))
    return Recipe(str(data.get("name", Path(source).stem)), str(data.get("family", "any")),
                  str(data.get("description", "")), steps, source, block)


def available_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A bundled recipe by name (``cnn``, ``transformer``, ...) or a TOML file path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise EdgeqError(f"recipe file {name_or_path} does not exist")
        return _parse(path.read_text(), str(path))
    bundled = RECIPE_DIR / f"{name_or_path}.toml"
    if not bundled.is_file():
        raise EdgeqError(f"unknown recipe {name_or_path!r}: give a .toml path or one of {', '.join(available_recipes())}")
    return _parse(bundled.read_text(), bundled.name)


def model_family(model: onnx.ModelProto) -> str:
    """"transformer" (LayerNorm or activation x activation MatMul), "cnn" (Conv), else "other"."""
    ops = {node.op_type for node in model.graph.node}
    attention = any(node.op_type == "MatMul" and initializer_array(model, node.input[1]) is None
                    and initializer_array(model, node.input[0]) is None for node in model.graph.node)
    if "LayerNormalization" in ops or (attention and "Softmax" in ops):
        return "transformer"
    if "Conv" in ops:
        return "cnn"
    return "other"


def default_recipe(model: onnx.ModelProto) -> Recipe:
    family = model_family(model)
    recipe = load_recipe(FAMILY_RECIPES[family])
    log.info("recipe: %s (model family %s)", recipe.name, family)
    return recipe


def resolve_recipe(name_or_path: str | None, model: onnx.ModelProto) -> Recipe:
    """``--recipe`` as given, or the family default when None / "auto"."""
    if name_or_path in (None, "", "auto"):
        return default_recipe(model)
    return load_recipe(name_or_path)


def apply_transforms(recipe: Recipe, model: onnx.ModelProto, data: dict[str, np.ndarray], *,
                     w_bits: int = 8, a_bits: int = 8) -> onnx.ModelProto:
    """Run the recipe's equivalence transforms in order (function-preserving)."""
    for step in recipe.steps:
        if step.stage != "transform" or not step.applies(w_bits):
            continue
        function = _pass_function(step.pass_name)
        options = dict(step.options)
        accepted = inspect.signature(function).parameters
        for key, value in (("w_bits", w_bits), ("a_bits", a_bits), ("data", data)):
            if key in accepted and key not in options:
                options[key] = value
        if step.pass_name == "smooth":
            model = function(model, options.pop("data"), **options)
        else:
            model = function(model, **options)
    return model


def apply_rounding(recipe: Recipe, model: onnx.ModelProto, plan: QuantPlan, data: dict[str, np.ndarray],
                   *, float_model: onnx.ModelProto | None = None, progress: bool = True
                   ) -> tuple[onnx.ModelProto, QuantPlan]:
    """Run the recipe's rounding passes (GPTQ, bias correction); records the recipe in the plan."""
    reference = model if float_model is None else float_model
    bits = [layer.w_bits for layer in plan.layers.values() if layer.w_bits] or [plan.w_bits]
    for step in recipe.steps:
        if step.stage != "rounding" or not step.applies(min(bits)):
            continue
        if step.pass_name == "gptq":
            options = {"progress": progress, **_gptq_options(step)}
            model, plan = _pass_function("gptq")(model, plan, data, **options)
        else:
            model, plan = _pass_function("bias_correction")(model, plan, data, float_model=reference,
                                                            **step.options)
    record_recipe(plan, recipe)
    return model, plan


def gptq_rounding(recipe: Recipe, widths: list[int]) -> tuple[list[int], dict[str, Any]]:
    """(weight widths GPTQ would round, its options) when the recipe GPTQ-rounds a plan narrowest at
    ``min(widths)``; ``([], {})`` when it would not (the allocator then measures nearest rounding)."""
    for step in recipe.steps:
        if step.pass_name == "gptq" and step.applies(min(widths)):
            options = _gptq_options(step)
            pass_default = inspect.signature(_pass_function("gptq")).parameters["max_bits"].default
            max_bits = options.get("max_bits", pass_default)
            return sorted(w for w in set(widths) if w <= max_bits), options
    return [], {}


def _gptq_options(step: RecipeStep) -> dict[str, Any]:
    """The gptq step's options as the pass gets them: it rounds up to the step's ``max_w_bits`` unless told."""
    options = dict(step.options)
    if step.max_w_bits is not None:
        options.setdefault("max_bits", step.max_w_bits)
    return options


def record_recipe(plan: QuantPlan, recipe: Recipe) -> None:
    plan.recipe.update(recipe.to_dict())
