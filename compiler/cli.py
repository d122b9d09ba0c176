"""The ``edgeq`` command line.

  edgeq compile [MODEL] [--calib DIR] [--target T] [--bits w8a8] [-o OUT] ...
  edgeq allocate [MODEL] [--calib DIR] [--target T] (--budget B | --pareto) [-o OUT]
  edgeq run OUT --inputs x.npz [-o y.npz] [--repeat N --json]

A mistake the user can fix (bad file, bad option, bad data, infeasible budget)
prints one line, ``edgeq: error: ...``, and exits with code 2. Anything else
is a bug in edgeq and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from compiler.errors import EdgeqError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise EdgeqError(f"{message} (see '{self.prog} --help')")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", metavar="PATH",
                        help="calibration data: a folder with one <input>.npy per model input, "
                             ".npz file(s) keyed by input name, or a folder of images (with --preprocess)")
    parser.add_argument("--preprocess", metavar="SPEC",
                        help="image preprocessing, e.g. size=224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NCHW")
    parser.add_argument("--input-shape", action="append", metavar="[NAME:]D,D,...",
                        help="fix an input's symbolic dims, e.g. input:3,224,224 or input:1,3,224,224 (repeatable; the "
                             "batch axis stays as the model has it; integer-only code needs static dims)")
    parser.add_argument("--random-calib", type=int, default=0, metavar="N",
                        help="calibrate on N random samples (no real data; ranges will be poor)")
    parser.add_argument("--max-calib-samples", type=int, default=512, metavar="N",
                        help="use at most the first N calibration samples (default 512)")
    parser.add_argument("--calibrate-method", default="auto",
                        choices=["auto", "minmax", "percentile", "entropy", "mse"],
                        help="activation range estimation (auto: MSE-optimal clipping, outputs min-max)")


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    from targets.base import target_names

    parser.add_argument("--target", default="onnx", choices=target_names(),
                        help="onnx: the QDQ model only (default); cpu, mcu: + TVM integer-only code; gpu, fpga: "
                             "cost model only (edgeq allocate)")
    parser.add_argument("--device", help="device preset of the target (e.g. cortex-m4)")
    parser.add_argument("--bits", default="w8a8",
                        help="default weight/activation bits, e.g. w8a8, w4a8, w8a16, w2a8 (target onnx)")
    parser.add_argument("--activation-type", default="uint8", choices=["uint8", "int8"],
                        help="8-bit activation type (uint8 is ~3x faster in onnxruntime on x86)")
    parser.add_argument("--budget", help="bit allocation budget, e.g. size=0.5, flash=512KB,sram=128KB, latency=1.5ms; "
                                           "a percentage is of the all-8-bit plan (latency=80%%, bitops=50%%)")
    parser.add_argument("--pin", action="append", metavar="LAYER=w8a8",
                        help="fix a layer's bits in the bit allocation (repeatable; LAYER=w8 pins weights only)")
    parser.add_argument("--recipe", help="transform recipe name or TOML file (default: by model family)")
    allocator = parser.add_argument_group("bit allocation (with --budget / --pareto)")
    allocator.add_argument("--sensitivity", default="single-layer", choices=["single-layer", "in-context", "proxy"],
                           help="layer sensitivity: each layer quantized alone (default), inside the all-w8a8 plan, "
                                "or the second-moment proxy (nothing run)")
    allocator.add_argument("--sensitivity-samples", type=int, default=None, metavar="N",
                           help="calibration samples the sensitivities are measured on (default 128)")
    allocator.add_argument("--rerank", type=int, default=0, metavar="K",
                           help="compile the ILP's K best plans (and greedy's) and keep the one closest to float on "
                                "held-out calibration samples")
    allocator.add_argument("--rerank-samples", type=int, default=None, metavar="N",
                           help="held-out calibration samples (after the sensitivities' ones) --rerank and "
                                "--refine measure whole plans on (default 32)")
    allocator.add_argument("--refine", type=int, default=0, metavar="N",
                           help="up to N steps re-measuring sensitivities around the plan and re-solving")
    allocator.add_argument("--solver", default="ilp", choices=["ilp", "greedy"],
                           help="ilp (default): the optimum of the summed sensitivities under the budget; greedy: "
                                "the HAWQ-style baseline on the same table, for comparison")


def _add_weight_block_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight-block", metavar="N|channel",
                        help="sub-8-bit MatMul/Gemm weights: one scale per N input channels per output channel "
                             "(block_size of DequantizeLinear / MatMulNBits, e.g. 32, 64, 128), or 'channel' "
                             "for per-output-channel scales (default: the recipe's choice; convolutions and "
                             "int8 weights are always per channel)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeq", description="ONNX quantizing compiler for edge hardware")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    compile_cmd = commands.add_parser("compile", help="quantize a model and compile it for a target")
    compile_cmd.add_argument("model", nargs="?", help="float .onnx model (default: the bundled Fashion-MNIST CNN)")
    _add_data_options(compile_cmd)
    _add_target_options(compile_cmd)
    compile_cmd.add_argument("--eval", dest="eval_data", metavar="PATH",
                             help="held-out data for the fidelity report (same formats as --calib)")
    _add_weight_block_option(compile_cmd)
    compile_cmd.add_argument("--target-triple", metavar="TRIPLE", help="cross-compile, e.g. aarch64-linux-gnu")
    compile_cmd.add_argument("--latency-rounds", type=int, default=None, metavar="N",
                             help="under --budget latency: while the built model measures over the budget on this "
                                  "machine, re-plan from the measurement and build again, up to N times (default 2)")
    compile_cmd.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    compile_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    allocate_cmd = commands.add_parser("allocate", help="choose per-layer bit-widths under a budget (ILP)")
    allocate_cmd.add_argument("model", nargs="?", help="float .onnx model (default: the bundled Fashion-MNIST CNN)")
    _add_data_options(allocate_cmd)
    _add_target_options(allocate_cmd)
    _add_weight_block_option(allocate_cmd)
    allocate_cmd.add_argument("--pareto", action="store_true", help="sweep the budget: the whole frontier")
    allocate_cmd.add_argument("-o", "--output", default="out",
                              help="output folder for plan.json / pareto.json and pareto.svg (default: out)")
    allocate_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    run_cmd = commands.add_parser("run", help="run a compiled artifact (any target) on inputs")
    run_cmd.add_argument("artifact", help="output folder of 'edgeq compile'")
    run_cmd.add_argument("--inputs", required=True, help=".npz keyed by input name (first axis = samples)")
    run_cmd.add_argument("-o", "--output", help="write the outputs to this .npz")
    run_cmd.add_argument("--repeat", type=int, default=0, metavar="N", help="time N runs of one sample")
    run_cmd.add_argument("--json", action="store_true",
                         help="print JSON: the latency with --repeat, else each output's shape, dtype and first values")
    run_cmd.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every CPU this process may use)")
    run_cmd.add_argument("--on", default=None, metavar="WHERE", help="where to run (mcu: qemu or host)")
    return parser


def _compile(args: argparse.Namespace) -> int:
    from compiler.budget import format_metric
    from compiler.mixed import allocator_options
    from compiler.pipeline import compile_model, options_from_args

    options = options_from_args(args, eval_data=args.eval_data, target_triple=args.target_triple,
                                out_dir=args.output, progress=not args.quiet, allocator=allocator_options(args))
    result = compile_model(options)
    fidelity = result.plan.fidelity
    summary = [f"wrote {', '.join(path.name for path in result.files)} to {result.out_dir}/"]
    if "quantized_accuracy" in fidelity:
        summary.append(f"accuracy {fidelity['float_accuracy']:.4f} (float) -> "
                       f"{fidelity['quantized_accuracy']:.4f} (quantized)")
    for name, metrics in fidelity.get("outputs", {}).items():
        shown = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()
                          if key in ("top1_agreement", "cosine", "sqnr_db"))
        summary.append(f"output {name}: {shown}")
    allocation = result.plan.totals.get("allocation") or {}
    measured = allocation.get("measured")
    if measured:
        threads = f"{measured['threads']} thread; " if measured.get("threads") else ""
        summary.append(f"latency {format_metric('latency_s', measured['latency_s'])} per sample "
                       f"{measured.get('where', 'on this machine')} "
                       f"({threads}budget {format_metric('latency_s', allocation['budget']['latency_s'])}, "
                       f"predicted {format_metric('latency_s', measured['predicted_latency_s'])}"
                       + (f"; re-planned {len(allocation['latency_rounds']) - 1}x from measurements"
                          if allocation.get("latency_rounds") else "") + ")")
    print("\n".join(summary))
    return 0


def _allocate(args: argparse.Namespace) -> int:
    from compiler import mixed
    from compiler.pipeline import parse_weight_block

    parse_weight_block(args.weight_block)  # a bad value is a one-line error before any work
    return mixed.allocate_command(args)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    from compiler.data import UNNAMED_ARRAY

    if not Path(path).is_file():
        raise EdgeqError(f"inputs file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise EdgeqError(f"{path} is neither an .npz archive nor an .npy array") from None
    if isinstance(loaded, np.ndarray):  # one .npy array: a one-input model's input, as an unnamed .npz holds it
        return {UNNAMED_ARRAY: loaded}
    with loaded as archive:
        return {name: archive[name] for name in archive.files}


def _run(args: argparse.Namespace) -> int:
    from compiler.atomic import atomic_write_bytes, check_output_file
    from compiler.plan import QuantPlan
    from targets.base import get_target

    if args.repeat < 0:
        raise EdgeqError(f"--repeat must be >= 1 to time runs (0, the default, times none), not {args.repeat}")
    if args.output:
        check_output_file(args.output)
    plan_path = Path(args.artifact) / "plan.json"
    if not plan_path.exists():
        raise EdgeqError(f"{args.artifact} is not an edgeq output folder (no plan.json)")
    target = get_target(QuantPlan.load(str(plan_path)).target)
    inputs = target.check_inputs(Path(args.artifact), _load_npz(args.inputs), source=args.inputs)
    options = {key: value for key, value in (("threads", args.threads), ("on", args.on)) if value is not None}
    for key in options:
        if key not in target.run_options:
            takes = " and ".join(f"--{name}" for name in sorted(target.run_options)) or "no options"
            raise EdgeqError(f"--{key} does not apply to {target.name} builds (they take {takes})")
    outputs = target.run(Path(args.artifact), inputs, **options)
    if args.output:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        atomic_write_bytes(args.output, buffer.getvalue())
    if args.repeat:
        latency = target.benchmark(Path(args.artifact), inputs, repeat=args.repeat, **options)
        latency["target"] = target.name
        line = f"{target.name}: median {latency['median_ms']:.3f} ms per sample over {latency['runs']} runs"
        if "device_ms_at_least" in latency:  # an emulator: its wall time says little about the device
            line = (f"{target.name}: at least {latency['device_ms_at_least']:.3f} ms per sample on a {latency['device']} "
                    f"({latency['instructions_per_inference']:,} instructions in qemu; emulator wall time "
                    f"{latency['median_ms']:.3f} ms, median of {latency['runs']} runs)")
        print(json.dumps(latency) if args.json else line)
    elif args.json:  # the outputs' summary, as JSON
        summary = {"target": target.name, "samples": int(len(next(iter(inputs.values())))),
                   "outputs": {name: {"shape": list(value.shape), "dtype": str(value.dtype),
                                      "first_sample": np.asarray(value[0]).ravel()[:10].tolist()}
                               for name, value in outputs.items()}}
        if args.output:
            summary["written_to"] = str(args.output)
        print(json.dumps(summary))
    elif args.output:
        print(f"wrote {', '.join(outputs)} to {args.output}")
    else:
        for name, value in outputs.items():
            print(f"{name}: shape {list(value.shape)}, first sample {np.array2string(value[0].ravel()[:10], precision=4)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="edgeq: %(message)s")
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        handler = {"compile": _compile, "allocate": _allocate, "run": _run}[args.command]
        return handler(args)
    except EdgeqError as error:
        print(f"edgeq: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
