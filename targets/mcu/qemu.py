"""Build the generated C project and run it: under qemu-system-arm (an emulated
Cortex-M4 on the mps2-an386 board, I/O through semihosting) or natively.

Both runners take raw input bytes (whole samples, concatenated) and return raw
output bytes; quantization and comparison live in :mod:`targets.mcu`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from compiler.errors import EdgeqError

QEMU = "qemu-system-arm"
QEMU_MACHINE = ["-M", "mps2-an386", "-cpu", "cortex-m4", "-nographic", "-monitor", "none",
                "-semihosting-config", "enable=on,target=native"]
TIMER_NS_PER_TICK = 40  # mps2 SYSCLK 25 MHz; main_qemu.c times model_run with CMSDK timer 0
MODEL_OBJECTS = ("model.o", "weights.o", "kernels.o", "runtime/edgeq_runtime.o")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EdgeqError(f"'{name}' is not installed (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")
    return path


def build(project_dir: Path, targets: tuple[str, ...] = ("firmware.elf", "host_runner"), jobs: int = 2) -> None:
    """``make`` the project (firmware and/or host runner)."""
    require_tool("make")
    if "firmware.elf" in targets:
        require_tool("arm-none-eabi-gcc")
    result = subprocess.run(
        ["make", "-C", str(project_dir), f"-j{jobs}", *targets], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"building {project_dir} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _run_in_tmp(command: list[str], input_bytes: bytes, timeout_s: float, what: str,
                outputs: tuple[str, ...] = ("output.bin",)) -> dict[str, bytes]:
    """Run ``command`` in a fresh directory holding input.bin; the named files it wrote."""
    with tempfile.TemporaryDirectory(prefix="edgeq-mcu-") as tmp:
        work = Path(tmp)
        (work / "input.bin").write_bytes(input_bytes)
        try:
            result = subprocess.run(command, cwd=work, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{what} did not finish within {timeout_s:.0f} s") from exc
        log = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"{what} exited with {result.returncode}: {log[-2000:]}")
        return {name: (work / name).read_bytes() if (work / name).exists() else b"" for name in outputs}


def _firmware(project_dir: Path) -> Path:
    require_tool(QEMU)
    firmware = (project_dir / "firmware.elf").resolve()
    if not firmware.exists():
        build(project_dir, ("firmware.elf",))
    return firmware


def run_qemu(project_dir: Path, input_bytes: bytes, timeout_s: float = 600.0) -> bytes:
    """Run firmware.elf in qemu on ``input_bytes``; the bytes it wrote to output.bin."""
    command = [QEMU, *QEMU_MACHINE, "-kernel", str(_firmware(project_dir))]
    return _run_in_tmp(command, input_bytes, timeout_s, "qemu firmware")["output.bin"]


def instructions_per_sample(project_dir: Path, input_bytes: bytes, timeout_s: float = 600.0) -> list[int]:
    """Guest instructions each ``model_run`` executed, one entry per sample.

    qemu runs with ``-icount shift=0``: virtual time advances exactly 1 ns per
    guest instruction. The harness reads the board's 25 MHz CMSDK timer around
    each model_run, so instructions = ticks * 40, to within 40. (Cross-checked
    against :func:`count_instructions_traced` in the tests.)
    """
    command = [QEMU, *QEMU_MACHINE, "-icount", "shift=0", "-kernel", str(_firmware(project_dir))]
    ticks = _run_in_tmp(command, input_bytes, timeout_s, "qemu firmware", ("ticks.bin",))["ticks.bin"]
    return [int(t) * TIMER_NS_PER_TICK for t in np.frombuffer(ticks, dtype="<u4")]


def count_instructions_traced(project_dir: Path, input_bytes: bytes, timeout_s: float = 600.0) -> int:
    """Guest instructions executed by the whole firmware on ``input_bytes`` (harness included).

    Debian's qemu has no TCG plugins, so this counts from the execution trace:
    with ``-d in_asm,exec,nochain`` qemu logs each translation block's
    instructions once when it translates it and one ``Trace`` line per executed
    block; executed instructions = sum over trace lines of the block's length.
    The log is streamed through this process (gigabytes for big models: slow;
    :func:`instructions_per_sample` is the fast way).
    """
    firmware = _firmware(project_dir)
    command = [QEMU, *QEMU_MACHINE, "-d", "in_asm,exec,nochain", "-D", "/dev/stderr",
               "-kernel", str(firmware)]
    block_start = re.compile(rb"^IN:")
    insn_line = re.compile(rb"^0x([0-9a-f]+):\s")
    trace_line = re.compile(rb"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")
    sizes: dict[int, int] = {}
    total = 0
    with tempfile.TemporaryDirectory(prefix="edgeq-mcu-") as tmp:
        (Path(tmp) / "input.bin").write_bytes(input_bytes)
        process = subprocess.Popen(command, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        current_pc, current_len = None, 0
        assert process.stderr is not None
        for line in process.stderr:
            if block_start.match(line):
                if current_pc is not None:
                    sizes[current_pc] = current_len
                current_pc, current_len = None, 0
                continue
            match = insn_line.match(line)
            if match:
                if current_pc is None:
                    current_pc = int(match.group(1), 16)
                current_len += 1
                continue
            match = trace_line.match(line)
            if match:
                if current_pc is not None:
                    sizes[current_pc] = current_len
                    current_pc, current_len = None, 0
                total += sizes.get(int(match.group(1), 16), 0)
        if process.wait(timeout=timeout_s) != 0:
            raise RuntimeError(f"qemu exited with {process.returncode} while counting instructions")
    return total


def run_host(project_dir: Path, input_bytes: bytes, timeout_s: float = 600.0) -> bytes:
    """Run the native host_runner build on ``input_bytes``."""
    runner = (project_dir / "host_runner").resolve()
    if not runner.exists():
        build(project_dir, ("host_runner",))
    return _run_in_tmp([str(runner), "input.bin", "output.bin"], input_bytes, timeout_s, "host runner")["output.bin"]


def arm_size(paths: list[Path]) -> dict[str, int]:
    """text/data/bss summed over ``paths`` as arm-none-eabi-size (Berkeley format) counts them."""
    result = subprocess.run(
        [require_tool("arm-none-eabi-size"), *[str(p) for p in paths]], capture_output=True, text=True, check=True
    )
    totals = {"text": 0, "data": 0, "bss": 0}
    for line in result.stdout.splitlines()[1:]:
        fields = line.split()
        totals["text"] += int(fields[0])
        totals["data"] += int(fields[1])
        totals["bss"] += int(fields[2])
    return totals


def stack_usage(project_dir: Path) -> dict[str, int]:
    """Per-function stack bytes from gcc's -fstack-usage files of the ARM build."""
    usage: dict[str, int] = {}
    for su in (project_dir / "build" / "arm").rglob("*.su"):
        for line in su.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                usage[parts[0].rsplit(":", 1)[-1]] = int(parts[1])
    return usage
