"""MCU benchmark: edgeq's Cortex-M4 build of the MLPerf Tiny models vs TFLite Micro.

For each model of models/mlperf_tiny.py:

1. float ONNX, final Softmax included (an integer QSoftmax in the firmware, as
   TFLite Micro runs its int8 softmax) -> edgeq compile --target mcu (w8a8, int8
   activations, calibrated on the model's sample inputs) -> out/mcu C project ->
   firmware.elf.
2. Flash (arm-none-eabi-size text+data) and SRAM (planned arena; stack estimate)
   from out/mcu/memory.json, against the shipped .tflite's size and TFLite
   Micro's arena (tools/tflm_reference.py: TFLM's RecordingMicroAllocator, int8-io
   variant of the model).
3. Bit-exactness: the firmware runs the sample inputs in qemu-system-arm; every
   output byte is compared with the reference interpreter.
4. Executed instructions per inference in qemu (-icount shift=0, model_run timed
   with the board's timer: targets.mcu.qemu.instructions_per_sample); median over
   the sample inputs.
5. Fidelity vs the float model: edgeq's int8 and the shipped TFLite int8 model on
   the same inputs (tflm_reference.fidelity).
6. int4 packing: the bundled CNN at w8a8 and w4a8 (4-bit weights stored two per
   byte): flash, weight bytes, bit-exactness, instructions, accuracy.

    python tools/bench_mcu.py [--models resnet8 dscnn ...] [--out /tmp/bench_mcu]
writes benchmarks/mcu.md at the repo root (only numbers measured in this run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import tflm_reference  # noqa: E402

from compiler.atomic import atomic_write_text  # noqa: E402
from models import mlperf_tiny  # noqa: E402
from targets.mcu import PROJECT_DIR, TARGET, input_bytes, qemu  # noqa: E402

FLASH_SLACK_BYTES = 32 * 1024  # the target: flash <= .tflite size + 32 KB


def compile_mlperf(name: str, work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """edgeq compile --target mcu of one MLPerf Tiny model as it is (Softmax included), calibrated on
    the first half of its sample inputs (the second half is held out for fidelity);
    returns (out_dir, all sample inputs)."""
    from compiler.pipeline import CompileOptions, compile_model

    work.mkdir(parents=True, exist_ok=True)
    model_path = mlperf_tiny.build(name)
    inputs = mlperf_tiny.sample_inputs(name)
    calib_path = work / f"{name}.calib.npz"
    np.savez(calib_path, **{k: v[: len(v) // 2] for k, v in inputs.items()})
    out_dir = work / "out"
    compile_model(CompileOptions(model=str(model_path), calib=str(calib_path), target="mcu",
                                 device="cortex-m4", bits="w8a8", activation_type="int8",
                                 out_dir=str(out_dir), progress=False))
    return out_dir, inputs


def bench_model(name: str, work: Path, count_insns: bool = True) -> dict:
    start = time.perf_counter()
    out_dir, inputs = compile_mlperf(name, work)
    compile_s = time.perf_counter() - start
    project = out_dir / PROJECT_DIR
    memory = json.loads((project / "memory.json").read_text())

    start = time.perf_counter()
    verify = TARGET.verify(out_dir, inputs, on="qemu")
    qemu_s = time.perf_counter() - start
    result = {"model": name, "compile_s": compile_s, "qemu_run_s": qemu_s, "memory": memory,
              "verify": verify, "samples": len(inputs["input"])}

    if count_insns:
        counts = qemu.instructions_per_sample(project, input_bytes(out_dir, inputs))
        result["instructions_per_inference"] = int(np.median(counts))
        result["instructions_range"] = [int(min(counts)), int(max(counts))]

    held_out = {k: v[len(v) // 2:] for k, v in inputs.items()}
    result["fidelity_samples"] = len(held_out["input"])
    edgeq_out = TARGET.run(out_dir, held_out, on="qemu")["output"]
    reference = tflm_reference.float_run(name, held_out)["output"]
    tflm_out = tflm_reference.tflm_run(name, held_out)["output"]
    result["fidelity_edgeq"] = tflm_reference.fidelity(name, reference, edgeq_out, held_out["input"])
    result["fidelity_tflite"] = tflm_reference.fidelity(name, reference, tflm_out, held_out["input"])
    result["tflm"] = tflm_reference.tflm_stats(name)
    return result


def bench_bundled(bits: str, work: Path, samples: int = 256) -> dict:
    """The bundled Fashion-MNIST CNN at ``bits`` (w4a8: int4 weights packed two per byte):
    flash, weight bytes, bit-exactness in qemu, instructions and accuracy on test images."""
    from compiler.pipeline import CompileOptions, compile_model
    from models import bundled

    out_dir = work / f"bundled_{bits}"
    compile_model(CompileOptions(target="mcu", device="cortex-m4", bits=bits, out_dir=str(out_dir), progress=False))
    inputs, labels = bundled.test_data()
    inputs = {k: v[:samples] for k, v in inputs.items()}
    project = out_dir / PROJECT_DIR
    verify = TARGET.verify(out_dir, inputs, on="qemu")
    logits = next(iter(TARGET.run(out_dir, inputs, on="qemu").values())).reshape(samples, -1)
    counts = qemu.instructions_per_sample(project, input_bytes(out_dir, {k: v[:4] for k, v in inputs.items()}))
    return {"bits": bits, "memory": json.loads((project / "memory.json").read_text()), "verify": verify,
            "accuracy": float(np.mean(logits.argmax(1) == labels[:samples])), "samples": samples,
            "instructions_per_inference": int(np.median(counts))}


def render_bundled(rows: list[dict]) -> list[str]:
    lines = ["", "### int4 weights packed in flash (bundled Fashion-MNIST CNN)", "",
             "`w4a8`: the plan's 4-bit weights are stored two per byte (low nibble first, one",
             "byte-aligned row per output channel) and unpacked inside the kernels' MAC loops,",
             "which step in pairs (one byte, two constant shifts); same C project otherwise.",
             "Bit-exactness and accuracy on the first test images, in qemu; instructions: median",
             "over 4 images.", "",
             "| bits | bit-exact (qemu) | int4 packed tensors | weight bytes | flash model / elf | arena | "
             "instr./inference | accuracy |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["memory"]
        lines.append(f"| {r['bits']} | {r['verify']['bit_exact']} ({r['verify']['samples']} samples) | "
                     f"{m.get('int4_weight_tensors', 0)} | {m['weight_bytes']:,} | "
                     f"{m['flash_bytes_model_only']:,} / {m['flash_bytes']:,} | {m['arena_bytes']:,} | "
                     f"{r['instructions_per_inference']:,} | {r['accuracy']:.4g} ({r['samples']} images) |")
    return lines


def render(results: list[dict], failures: dict[str, str], bundled_rows: list[dict] | None = None) -> str:
    lines = [
        "## MCU target: edgeq vs TFLite Micro (MLPerf Tiny, Cortex-M4)",
        "",
        "Measured with `python tools/bench_mcu.py`. edgeq: w8a8, int8 activations, calibrated on",
        "the models' sample inputs (models/data), final Softmax included (edgeq's integer QSoftmax,",
        "8-bit probabilities, as TFLite's int8 softmax; until session 16 edgeq's build ended at the",
        "logits and the softmax ran in float on the host), kernels from TVM's C codegen built with",
        "arm-none-eabi-gcc -O3 -funroll-loops for cortex-m4; run in qemu-system-arm -M mps2-an386.",
        "TFLM: the shipped int8 .tflite (int8-io variant) in TFLite Micro's host interpreter",
        "(tools/tflm_reference.py; its persistent arena tail holds 64-bit pointers on the host).",
        "Flash: edgeq = text+data of the model objects (model.o weights.o kernels.o",
        "edgeq_runtime.o), and of the whole firmware.elf incl. the qemu harness; TFLM = the",
        ".tflite file alone (its interpreter and kernels come on top). Arena: edgeq's planned",
        "activation arena vs TFLM's arena_used (head = TFLM's planned tensors).",
        "Instructions: guest instructions executed per model_run in qemu (-icount shift=0,",
        "timed with the board timer; median over the sample inputs). No cycle model: a proxy.",
        "",
        "| model | bit-exact (qemu) | flash model / elf | .tflite + 32 KB | arena (greedy) | TFLM arena used (head) | stack | instr./inference |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        m, t = r["memory"], r["tflm"]["int8_io"]
        exact = f"{r['verify']['bit_exact']} ({r['verify']['samples']} samples)"
        lines.append(
            f"| {r['model']} | {exact} | {m['flash_bytes_model_only']:,} / {m['flash_bytes']:,} | "
            f"{r['tflm']['tflite_bytes'] + FLASH_SLACK_BYTES:,} | {m['arena_bytes']:,} ({m['greedy_by_size_arena_bytes']:,}) | "
            f"{t['arena_used_bytes']:,} ({t['arena_head_bytes']:,}) | {m['stack_bytes_model_run']:,} | "
            f"{r.get('instructions_per_inference', 'n/a'):,} |"
        )
    lines += ["", "Fidelity vs the float model on the same held-out inputs (edgeq calibrated on the other",
              "half of the sample inputs; the shipped TFLite model was calibrated by its authors on",
              "its training data; few samples, so differences of one sample are noise):", ""]
    for r in results:
        for label, key in (("edgeq int8", "fidelity_edgeq"), ("TFLite int8", "fidelity_tflite")):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in r[key].items())
            lines.append(f"- {r['model']} {label} ({r['fidelity_samples']} samples): {shown}")
    for name, why in failures.items():
        lines.append(f"- {name}: not measured -- {why}")
    if bundled_rows:
        lines += render_bundled(bundled_rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(mlperf_tiny.MODELS))
    parser.add_argument("--out", default="/tmp/edgeq_bench_mcu")
    parser.add_argument("--no-insns", action="store_true", help="skip the instruction count")
    parser.add_argument("--bundled-bits", nargs="*", default=["w8a8", "w4a8"],
                        help="also build the bundled CNN at these bits (int4 packing section)")
    args = parser.parse_args(argv)
    results, failures, bundled_rows = [], {}, []
    for name in args.models:
        try:
            result = bench_model(name, Path(args.out) / name, count_insns=not args.no_insns)
            results.append(result)
            print(json.dumps(result, indent=1, default=str))
        except Exception as error:  # noqa: BLE001 -- a model that fails is reported, not hidden
            traceback.print_exc()
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    for bits in args.bundled_bits:
        try:
            bundled_rows.append(bench_bundled(bits, Path(args.out)))
            print(json.dumps(bundled_rows[-1], indent=1, default=str))
        except Exception as error:  # noqa: BLE001 -- reported, not hidden
            traceback.print_exc()
            failures[f"bundled {bits}"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    atomic_write_text(REPO_ROOT / "benchmarks/mcu.md", render(results, failures, bundled_rows))
    print("wrote", REPO_ROOT / "benchmarks/mcu.md")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
