"""The driver: the one place that orders the passes.

``compile_model(options)`` runs, in this order (see :func:`compile_model`):

  load + canonicalize -> calibration data -> recipe's float transforms
  (equalization, smoothing, rotation)
  -> select layers -> allocate bits (when a budget is given)
  -> calibrate activation ranges -> weight grids (block-wise scales, when
  chosen) -> recipe's weight rounding (GPTQ, bias correction) -> insert QDQ
  -> write model.qdq.onnx
  -> target lowering (integer graph, code) when the target is not "onnx"
  -> under a latency budget, the artifact timed on this machine against it,
     and while over it re-planned and built again (--latency-rounds)
  -> fidelity of the kept model -> write plan.json, report.md

Everything a run writes goes to a temporary folder first and is moved into
``out_dir`` only when the whole run succeeded.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler.atomic import atomic_dir, check_output_dir, empty_dir
from compiler.budget import metric_names, parse_budget
from compiler.console import warn
from compiler.errors import EdgeqError
from compiler.export import Stage, export_plan, run_stage
from compiler.loader import check_model, load_model, parse_input_shapes, with_sample_dims
from compiler.ort_kernels import kernel_usage
from compiler.plan import QuantPlan
from compiler.quantizers import WEIGHT_BITS
from compiler.recipe import (
    MIN_WEIGHT_BLOCK,
    Recipe,
    apply_transforms,
    record_recipe,
    resolve_recipe,
)
from passes.canonicalize import canonicalize
from passes.select_layers import select_layers
from targets.base import CompileContext, get_target

log = logging.getLogger(__name__)

BITS_PATTERN = re.compile(r"^w(\d+)a(\d+)$")
ACTIVATION_BITS = (8, 16)
TENSOR_SQNR_SAMPLES = 32


@dataclass
class CompileOptions:
    """Everything ``edgeq compile`` can be told; the defaults are the CLI's."""

    # A path, or an onnx.ModelProto (Python callers; it is not modified); None: the bundled
    # Fashion-MNIST CNN with its data.
    model: str | os.PathLike | onnx.ModelProto | None = None
    # "NAME:3,224,224" (one, or a list): fixes an input's symbolic dims after the batch axis
    input_shapes: list[str] | str | None = None
    calib: str | None = None
    # In-memory data for Python callers (used instead of ``calib`` / ``eval_data``).
    calib_data: dict[str, np.ndarray] | None = None
    eval_inputs: dict[str, np.ndarray] | None = None
    preprocess: str | None = None
    random_calib: int = 0  # samples of random calibration data (explicit opt-in)
    max_calib_samples: int = 512
    eval_data: str | None = None
    target: str = "onnx"
    device: str | None = None
    target_triple: str | None = None
    bits: str = "w8a8"
    # Block-wise sub-8-bit MatMul/Gemm weights: "32", "64", ... (scale per block of the
    # reduction axis), "channel" (per output channel), None (the recipe's choice).
    weight_block: str | int | None = None
    activation_type: str = "uint8"
    calibrate_method: str = "auto"
    budget: str | None = None
    pins: list[str] | str | None = None  # "LAYER=w8a8" (one, or a list): bits the layer keeps
    recipe: str | None = None
    allocator: Any = None  # compiler.mixed.AllocatorOptions or a dict of its fields; None: its defaults
    out_dir: str = "out"
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        normalize_options(self)


@dataclass
class CompileResult:
    out_dir: Path
    plan: QuantPlan
    float_model: onnx.ModelProto
    qdq_model: onnx.ModelProto
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def normalize_options(options: CompileOptions) -> None:
    """Python callers' spellings in the types the pipeline uses, or a one-line EdgeqError.

    ``pins``, ``input_shapes``: one string is one item (not its characters);
    else a list of strings. ``allocator``: an AllocatorOptions, or a dict of its
    fields (converted). ``preprocess`` is parsed here, so a bad spec fails before
    any work even when the data turn out not to be images. Run again by
    compile_model: fields may be set after construction.
    """
    if options.model is not None and not isinstance(options.model, str | os.PathLike | onnx.ModelProto):
        raise EdgeqError(f"CompileOptions.model must be an .onnx path or an onnx.ModelProto, "
                         f"not {type(options.model).__name__}")
    if options.preprocess is not None:
        from compiler.data import parse_preprocess

        parse_preprocess(options.preprocess)
    options.pins = _string_list(options.pins, "pins", "'LAYER=w8a8'")
    options.input_shapes = _string_list(options.input_shapes, "input_shapes", "'NAME:3,224,224'")
    allocator = options.allocator
    if allocator is None:
        return
    from dataclasses import fields as dataclass_fields

    from compiler.mixed import AllocatorOptions

    if isinstance(allocator, dict):
        known = [item.name for item in dataclass_fields(AllocatorOptions)]
        unknown = [str(key) for key in allocator if key not in known]
        if unknown:
            raise EdgeqError(f"CompileOptions.allocator: unknown option {', '.join(map(repr, unknown))} "
                             f"(AllocatorOptions fields: {', '.join(known)})")
        try:
            options.allocator = AllocatorOptions(**allocator)
        except TypeError as error:
            raise EdgeqError(f"CompileOptions.allocator {allocator!r}: {error}") from None
    elif not isinstance(allocator, AllocatorOptions):
        raise EdgeqError(f"CompileOptions.allocator must be a compiler.mixed.AllocatorOptions or a dict of its "
                         f"fields, not {type(allocator).__name__}")


def options_from_args(args: Any, **fields: Any) -> CompileOptions:
    """CompileOptions from the options ``edgeq compile`` and ``edgeq allocate`` share (model, data,
    target, bits, budget, pins, recipe, weight blocks: compiler/cli.py), plus ``fields``."""
    return CompileOptions(
        model=args.model, input_shapes=args.input_shape, calib=args.calib, preprocess=args.preprocess,
        random_calib=args.random_calib, max_calib_samples=args.max_calib_samples,
        calibrate_method=args.calibrate_method, target=args.target, device=args.device, bits=args.bits,
        activation_type=args.activation_type, budget=args.budget, pins=args.pin, recipe=args.recipe,
        weight_block=args.weight_block, **fields)


def _string_list(value: Any, field_name: str, example: str) -> list[str] | None:
    """One string is one item (not its characters); else a list or tuple of strings."""
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise EdgeqError(f"CompileOptions.{field_name} must be a {example} string or a list of them, not {value!r}")
    return list(value)


def parse_bits(text: str) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8), checked against the widths edgeq can export."""
    match = BITS_PATTERN.match(text.strip().lower())
    if not match:
        raise EdgeqError(f"bad --bits '{text}': expected w<weight bits>a<activation bits>, e.g. w8a8 or w4a8")
    w_bits, a_bits = int(match.group(1)), int(match.group(2))
    if w_bits not in WEIGHT_BITS or a_bits not in ACTIVATION_BITS:
        raise EdgeqError(f"bad --bits '{text}': weight bits must be one of {WEIGHT_BITS}, "
                         f"activation bits one of {ACTIVATION_BITS}")
    return w_bits, a_bits


def parse_weight_block(value: str | int | None) -> int | None:
    """``--weight-block``: None (the recipe decides), 0 ("channel": per channel), or a block size."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("channel", "per-channel", "0"):
        return 0
    if not text.isdigit() or int(text) < MIN_WEIGHT_BLOCK:
        raise EdgeqError(f"bad --weight-block '{value}': expected a block size (an integer >= {MIN_WEIGHT_BLOCK}, "
                         "e.g. 32, 64, 128) or 'channel'")
    return int(text)


def choose_weight_block(option: str | int | None, recipe: Recipe, target_name: str,
                        integer_only: bool) -> tuple[int | None, str]:
    """The plan's ``weight_block_size`` and where it came from (recorded in plan.json).

    An explicit block size for a target that lowers to the integer-only graph
    is an error (its requantization is per output channel); a recipe's default
    block size is dropped for such targets.
    """
    explicit = parse_weight_block(option)
    if explicit is not None:
        if explicit and integer_only:
            raise EdgeqError(f"--weight-block {explicit}: target {target_name} lowers to an integer-only graph, "
                             "which needs per-channel weight scales; use --weight-block channel")
        return explicit or None, "--weight-block"
    if recipe.weight_block_size and integer_only:
        log.info("recipe %s: weight_block_size %d ignored for target %s (per-channel weights)",
                 recipe.name, recipe.weight_block_size, target_name)
        return None, f"per channel (recipe's block size ignored: target {target_name} is integer-only)"
    return recipe.weight_block_size, f"recipe {recipe.name}"


def compile_model(options: CompileOptions) -> CompileResult:
    """Run the whole flow for ``options``; see the module docstring for the order."""
    timings: dict[str, float] = {}

    def stage(name: str, func: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = func()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start  # summed over latency rounds
        log.info("%-12s %.2fs", name, timings[name])
        return result

    normalize_options(options)
    check_output_dir(options.out_dir)  # a bad -o fails before any work
    if not options.budget:
        check_no_allocator_options(options.allocator, "--budget")
    elif "latency_s" not in metric_names(parse_budget(options.budget)):
        check_no_allocator_options(options.allocator, "--budget latency=...", fields=("latency_rounds",))
    target = get_target(options.target)
    target.check_can_lower()  # a target without a lowering fails before any work
    if options.target_triple and not target.cross_compiles:
        from targets.base import target_names

        crossing = " or ".join(name for name in target_names() if get_target(name).cross_compiles)
        raise EdgeqError(f"--target-triple applies to --target {crossing}; target {options.target} does not "
                         "cross-compile (drop --target-triple)")
    bits = check_default_bits(options, target)
    integer_only = target.needs_integer_graph
    model_path, float_model, calib, evaluation = load_model_and_data(options, stage)
    recipe, model, plan = plan_before_allocation(options, target, bits, model_path, float_model, calib, stage)
    if options.pins and not options.budget:  # with a budget the allocator keeps them
        apply_pins(plan, options.pins, target.cost_model(options.device).bit_pairs)
    if options.budget:
        from compiler.mixed import allocate_bits

        mixed = stage("allocate", lambda: allocate_bits(model, plan, calib, target, options.device, options.budget,
                                                        integer_only=integer_only, pins=options.pins,
                                                        options=options.allocator, recipe=recipe))

    transformed = model  # same function as float_model; its tensors are what the QDQ model approximates

    def build(plan: QuantPlan, tmp: Path) -> tuple[onnx.ModelProto, QuantPlan]:
        """Export ``plan``, write the QDQ model, lower it and, under a budget, time it."""
        qdq, plan = export_plan(model, plan, calib, recipe, integer_only=integer_only,
                                batch_size=options.batch_size, progress=options.progress, stage=stage)
        plan.totals["onnxruntime_kernels"] = stage("ort_kernels", lambda: kernel_usage(qdq))
        plan.update_totals()
        onnx.save(qdq, str(tmp / "model.qdq.onnx"))
        if options.target != "onnx":
            ctx = CompileContext(out_dir=tmp, qdq_model_path=tmp / "model.qdq.onnx", plan=plan,
                                 calib_inputs=calib,
                                 options={"device": options.device, "target_triple": options.target_triple})
            stage("lower", lambda: target.lower(ctx))
            if options.budget:
                from compiler.mixed import check_latency

                stage("measure", lambda: check_latency(plan, target, tmp, calib))
        return qdq, plan

    out_dir = Path(options.out_dir)
    files: list[Path] = []
    with atomic_dir(out_dir, replaces_outputs=True) as tmp:  # the folder holds this run's outputs only
        qdq, plan = build(plan, tmp)
        if options.budget:  # a plan timed over a latency budget is re-planned from the measurement
            from compiler.mixed import next_latency_plan, record_latency_rounds

            while (replanned := next_latency_plan(mixed, plan)) is not None:
                empty_dir(tmp)
                qdq, plan = build(replanned, tmp)
            record_latency_rounds(mixed, plan)
            if mixed.pareto_svg:
                (tmp / "pareto.svg").write_text(mixed.pareto_svg)
        # of the kept build only: a re-planned one's fidelity would be thrown away
        stage("fidelity", lambda: _measure_fidelity(plan, float_model, transformed, qdq, calib, evaluation, options))
        plan.totals["seconds"] = {name: round(value, 3) for name, value in timings.items()}
        plan.save(str(tmp / "plan.json"))
        from compiler.report import write_report

        write_report(tmp / "report.md", plan)
        files = sorted(out_dir / path.name for path in tmp.iterdir())
    return CompileResult(out_dir=out_dir, plan=plan, float_model=float_model, qdq_model=qdq,
                         files=files, timings=timings)


def check_default_bits(options: CompileOptions, target: Any) -> tuple[int, int]:
    """``options.bits`` parsed, and checked against the weight widths ``target`` lowers."""
    w_bits, a_bits = parse_bits(options.bits)
    lowered_widths = {w for w, _ in target.cost_model(options.device).bit_pairs}
    if w_bits not in lowered_widths:
        raise EdgeqError(f"--bits {options.bits}: target {options.target} does not lower {w_bits}-bit weights "
                         f"(its weight widths: {', '.join(str(w) for w in sorted(lowered_widths))})")
    return w_bits, a_bits


def plan_before_allocation(options: CompileOptions, target: Any, bits: tuple[int, int], model_path: Path,
                           float_model: onnx.ModelProto, calib: dict[str, np.ndarray], stage: Stage = run_stage
                           ) -> tuple[Recipe, onnx.ModelProto, QuantPlan]:
    """(recipe, transformed model, plan) as ``options`` make them before any bit allocation.

    One place for ``edgeq compile`` and ``edgeq allocate`` (and ``allocate_model``),
    so a plan allocated without compiling is the one compile would allocate:
    same transforms, default bits (``--bits``), activation type and
    calibration method.
    """
    w_bits, a_bits = bits  # check_default_bits's, taken before any work
    integer_only = target.needs_integer_graph
    recipe = resolve_recipe(options.recipe, float_model)
    weight_block, weight_block_source = choose_weight_block(options.weight_block, recipe, options.target, integer_only)
    # The recipe's transforms rewrite the graph but keep its float function.
    model = stage("transforms", lambda: apply_transforms(recipe, float_model, calib, w_bits=w_bits, a_bits=a_bits))
    plan = stage("select", lambda: select_layers(
        model, w_bits=w_bits, a_bits=a_bits, integer_only=integer_only,
        activation_signed=options.activation_type == "int8"))
    plan.model, plan.target = str(model_path), options.target
    plan.weight_block_size = weight_block
    record_recipe(plan, recipe)
    plan.recipe["calibrate_method"] = options.calibrate_method
    plan.recipe["weight_block_source"] = weight_block_source
    return recipe, model, plan


# AllocatorOptions fields and the CLI options that set them (for messages).
ALLOCATOR_FLAGS = {"sensitivity": "--sensitivity", "sensitivity_samples": "--sensitivity-samples",
                   "rerank": "--rerank", "rerank_samples": "--rerank-samples", "refine": "--refine",
                   "solver": "--solver", "latency_rounds": "--latency-rounds", "context": "allocator context",
                   "pairs": "allocator pairs"}


def check_no_allocator_options(allocator: Any, needed: str, fields: tuple[str, ...] | None = None) -> None:
    """A one-line EdgeqError naming the allocator options (of ``fields``; all by default) set away
    from their defaults, for a run that does no bit allocation (without ``needed``): they would be ignored."""
    from dataclasses import fields as dataclass_fields

    from compiler.mixed import AllocatorOptions

    if not isinstance(allocator, AllocatorOptions):
        return
    default = AllocatorOptions()
    names = [item.name for item in dataclass_fields(AllocatorOptions) if fields is None or item.name in fields]
    given = [ALLOCATOR_FLAGS.get(name, name) for name in names if getattr(allocator, name) != getattr(default, name)]
    if given:
        many = len(given) > 1
        raise EdgeqError(f"{', '.join(given)} {'apply' if many else 'applies'} only to bit allocation, which "
                         f"runs with {needed}: add {needed} or drop {'them' if many else 'it'}")


def apply_pins(plan: QuantPlan, pins: list[str], bit_pairs: tuple[tuple[int, int], ...]) -> None:
    """``--pin`` without ``--budget``: each pinned layer takes its bits, the others keep ``--bits``.

    A pinned layer's (weight, activation) bits must be a pair the target runs
    (``bit_pairs``, what the allocator would offer); a weightless layer takes
    activation bits only.
    """
    from compiler.mixed import parse_pins
    from passes.allocate import choice_label

    for name, (w_pin, a_pin) in parse_pins(pins, plan).items():  # refuses weight pins on weightless layers
        layer = plan.layers[name]
        w_bits = layer.w_bits if w_pin is None else w_pin
        a_bits = layer.a_bits if a_pin is None else a_pin
        offered = ([choice_label(pair) for pair in bit_pairs] if w_bits is not None
                   else sorted({choice_label((None, a)) for _, a in bit_pairs}))
        chosen = choice_label((w_bits, a_bits))
        if chosen not in offered:
            raise EdgeqError(f"--pin {name}: {chosen} is not a choice the target runs for this layer "
                             f"({', '.join(offered)})")
        layer.w_bits, layer.a_bits = w_bits, a_bits
        layer.info["pinned"] = [w_pin, a_pin]


def load_model_and_data(options: CompileOptions, stage: Callable[[str, Callable[[], Any]], Any] | None = None
                        ) -> tuple[Path, onnx.ModelProto, dict[str, np.ndarray], dict[str, Any]]:
    """The model (read, checked, canonicalized), its calibration inputs and its evaluation set.

    What ``edgeq compile`` and ``edgeq allocate`` both load, so the two treat
    models and data alike: the bundled model (by default or by its path) comes
    with its calibration and test data; any other model needs ``calib`` (or
    ``calib_data``), or ``random_calib`` samples, which print a warning.
    ``stage(name, func)`` times each step (compile's stage timings); None runs them untimed.
    """
    stage = stage or run_stage
    model_path, source_model = stage("load", lambda: _load(options))
    float_model = stage("canonicalize", lambda: canonicalize(source_model))
    bundled = not isinstance(options.model, onnx.ModelProto) and is_bundled_model(model_path)
    calib, evaluation = stage("data", lambda: _data(options, float_model, bundled))
    return model_path, float_model, calib, evaluation


def is_bundled_model(path: Path) -> bool:
    """Whether ``path`` is the bundled model's file (not a copy of it: that has no bundled data)."""
    from models import bundled

    try:
        return Path(path).resolve() == bundled.model_path().resolve()
    except OSError:
        return False


def _load(options: CompileOptions) -> tuple[Path, onnx.ModelProto]:
    from models import bundled

    if isinstance(options.model, onnx.ModelProto):  # named by its graph in plan.json and the report
        path = Path(f"{options.model.graph.name or 'model'}.onnx")
        model = check_model(options.model, f"the model '{path.stem}'")
    else:
        path = bundled.model_path() if options.model is None else Path(options.model)
        model = load_model(path)
    if options.input_shapes:
        model = with_sample_dims(model, parse_input_shapes(options.input_shapes, model))
    return path, model


def _data(options: CompileOptions, model: onnx.ModelProto,
          bundled_model: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Calibration inputs, and the evaluation set (inputs, optional labels) for fidelity."""
    from compiler.data import load_calibration, warn_preprocess_unused

    labels = None
    if options.calib_data is not None:
        calib = options.calib_data
        eval_inputs = options.eval_inputs if options.eval_inputs is not None else calib
    elif bundled_model and options.calib is None and not options.random_calib:
        from models import bundled

        calib = bundled.calibration_data()
        eval_inputs, labels = bundled.test_data()
        if not options.eval_data:
            warn_preprocess_unused(options.preprocess, "the bundled model's data")
        else:
            eval_inputs, labels = load_calibration(options.eval_data, model, preprocess=options.preprocess,
                                                   role="evaluation"), None
    else:
        if options.calib is None and not options.random_calib:
            raise EdgeqError("no calibration data: pass --calib DIR (one <input>.npy per model input, "
                             ".npz files, or images with --preprocess), or --random-calib N to "
                             "calibrate on random data")
        if options.calib is None:
            warn(f"calibrating on {options.random_calib} samples of RANDOM data: "
                 "ranges will not match real inputs")
        calib = load_calibration(options.calib, model, preprocess=options.preprocess,
                                 random_samples=options.random_calib,
                                 max_samples=options.max_calib_samples)
        eval_inputs = calib
        if options.eval_data:
            eval_inputs = load_calibration(options.eval_data, model, preprocess=options.preprocess, role="evaluation")
    calib = {name: value[: options.max_calib_samples] for name, value in calib.items()}
    held_out = labels is not None or options.eval_data or options.eval_inputs is not None
    return calib, {"inputs": eval_inputs, "labels": labels,
                   "source": "held-out data" if held_out else "calibration data"}


def _measure_fidelity(plan: QuantPlan, float_model: onnx.ModelProto, transformed: onnx.ModelProto,
                      qdq: onnx.ModelProto, calib: dict[str, np.ndarray], evaluation: dict[str, Any],
                      options: CompileOptions) -> None:
    """Model outputs on the evaluation set; each quantized tensor's SQNR on the calibration set.

    Tensor SQNR compares with ``transformed`` (the float graph after the recipe's
    transforms): equalization rescales channels of intermediate tensors, so the
    original model's tensors are not what the QDQ model approximates.
    """
    from compiler.fidelity import model_fidelity, run_model, tensor_sqnr

    inputs = evaluation["inputs"]
    plan.fidelity = {"data": evaluation["source"],
                     "samples": int(next(iter(inputs.values())).shape[0]),
                     "outputs": model_fidelity(float_model, qdq, inputs, batch_size=options.batch_size)}
    labels = evaluation["labels"]
    if labels is not None:
        first_output = float_model.graph.output[0].name
        float_logits = run_model(float_model, inputs, batch_size=options.batch_size)[first_output]
        quant_logits = run_model(qdq, inputs, batch_size=options.batch_size)[first_output]
        plan.fidelity["float_accuracy"] = float(np.mean(float_logits.argmax(1) == labels))
        plan.fidelity["quantized_accuracy"] = float(np.mean(quant_logits.argmax(1) == labels))
    activations = [name for name, tq in plan.tensors.items() if tq.role == "activation"]
    # Per-tensor SQNR settles within a few batches; more samples only cost time.
    sqnr_samples = {name: value[:TENSOR_SQNR_SAMPLES] for name, value in calib.items()}
    plan.fidelity["tensor_sqnr_samples"] = int(next(iter(sqnr_samples.values())).shape[0])
    plan.fidelity["tensor_sqnr_db"] = tensor_sqnr(transformed, qdq, sqnr_samples, activations,
                                                  batch_size=options.batch_size)
