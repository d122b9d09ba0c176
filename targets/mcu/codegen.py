"""Generate the standalone C project of the MCU target.

Layout of ``out/mcu/`` (everything a firmware engineer needs, no TVM at run time):

``model.h``      the one entry point ``model_run`` and the I/O sizes/quantization.
``model.c``      the runner: static DLTensor descriptors over one static arena,
                 one call per kernel through TVM's packed C ABI, no malloc.
``weights.c``    weights/biases as ``const`` arrays (flash); ``w_bits=4`` weights
                 packed two per byte (:mod:`targets.mcu.packing`).
``kernels.c``    the kernels: TVM's C codegen of one PrimFunc per node, scheduled
                 so each keeps only scalar accumulators (no workspace, no big
                 stack arrays), argument asserts off.
``include/``     tvm/ffi/c_api.h, tvm/ffi/extra/c_env_api.h, tvm/runtime/base.h,
                 tvm/runtime/c_backend_api.h, dlpack/dlpack.h -- copied from the
                 installed apache-tvm / apache-tvm-ffi wheels.
``runtime/``     edgeq's few lines of C: the workspace stubs the TVM ABI names,
                 and the test harness (Cortex-M startup, semihosting, mains).
``Makefile``     ``make`` -> firmware.elf (arm-none-eabi-gcc, Cortex-M4, mps2-an386
                 memory map) and host_runner (gcc), with -fstack-usage.

Kernels come as :class:`Kernel` (symbol, PrimFunc, argument tensor names); where
they come from (``targets.tvm_ops``) is the caller's business.

Why TVM's C codegen rather than its LLVM backend emitting Thumb objects: for the
same scheduled int8 gemm PrimFunc, arm-none-eabi-gcc -Os of the C was 168 bytes
of text, the LLVM ``thumbv7em-none-eabihf`` object 576 bytes (plus references to
``__aeabi_unwind_cpp_pr0`` and fp16 helpers); the C route also lets a firmware
engineer rebuild with their own compiler and flags.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.errors import EdgeqError
from targets.mcu.memory import MemoryPlan

log = logging.getLogger(__name__)

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
RUNTIME_FILES = (
    "edgeq_runtime.c",
    "startup_mps2.c",
    "semihost.c",
    "semihost.h",
    "main_qemu.c",
    "main_host.c",
    "mps2_an386.ld",
)
WORKSPACE_CALLS = ("TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace")

_C_TYPES = {
    "int8": ("int8_t", "kDLInt", 8),
    "uint8": ("uint8_t", "kDLUInt", 8),
    "int16": ("int16_t", "kDLInt", 16),
    "uint16": ("uint16_t", "kDLUInt", 16),
    "int32": ("int32_t", "kDLInt", 32),
    "int64": ("int64_t", "kDLInt", 64),
    "float32": ("float", "kDLFloat", 32),
}


@dataclass
class Kernel:
    """One compiled call of the runner."""

    symbol: str  # C-safe, unique; TVM exports it as __tvm_ffi_<symbol>
    func: object  # tvm.tirx.PrimFunc
    args: list[str]  # tensor names in the PrimFunc's parameter order
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # extra flash arrays args name


@dataclass
class ProjectSpec:
    """What the C files need besides the kernels."""

    plan: MemoryPlan
    activations: dict[str, tuple[tuple[int, ...], str]]  # tensor -> (shape, dtype), batch 1
    weights: dict[str, np.ndarray]  # initializer name -> value (stored in flash)
    input_quant: dict  # scale, zero_point, dtype of the integer input
    output_quant: dict  # scale, zero_point, dtype of the integer output


# --------------------------------------------------------------------------- kernels


def c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


# TVM's LowerTVMBuiltin keeps a constant-size CPU allocation on the stack only up to
# runtime::kMaxStackAlloca (include/tvm/runtime/device_api.h) bytes; anything larger
# becomes a TVMBackendAllocWorkspace call, which the MCU runtime does not provide.
MAX_WINDOW_BYTES = 1024


def schedule_for_mcu(func):
    """A schedule that needs no workspace and keeps the MAC loop branch-free.

    TE definitions compute a whole padded input and accumulator tensor before
    the epilogue; on an MCU those would be big stack arrays or a workspace.
    :func:`_pixel_window_schedule` (convolution/pooling shaped kernels: padding
    block -> reduction block -> NCHW epilogue) walks output pixels, copies the
    padded input window of one pixel (C x kh x kw bytes) into a small stack
    buffer, then runs every output channel's dot product over it as one fused
    loop with a scalar accumulator. Where that window would pass TVM's stack
    limit (:data:`MAX_WINDOW_BYTES`) the window is taken per output pixel *and
    channel* instead: for depthwise/grouped convolutions that is just the
    group's C/g x kh x kw inputs (wide depthwise layers, e.g. MobileNet's 128 or
    256 channels x 3 x 3). Anything else gets :func:`_scalar_schedule`. All
    three only reorder work: results are unchanged.
    """
    func, pairs = _inline_weight_views(func)
    for per_channel in (False, True):
        try:
            return _pixel_window_schedule(func, per_channel, pairs)
        except Exception as error:  # noqa: BLE001 -- TVM raises its own error types; fall back
            log.debug("pixel-window schedule (per_channel=%s) does not apply (%s)", per_channel,
                      str(error).splitlines()[0] if str(error) else type(error).__name__)
    return _scalar_schedule(func, pairs)


def _inline_weight_views(func):
    """Inline the stages that unpack int4 weights (targets.mcu.packing) into their readers,
    so the MAC loops read the packed flash bytes and the kernel keeps its usual blocks;
    returns (func, whether there were any)."""
    import tvm

    from targets.mcu.packing import UNPACK_BLOCK

    sch = tvm.s_tir.Schedule(func)
    inlined = False
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint.startswith(UNPACK_BLOCK):
            sch.compute_inline(block)
            inlined = True
    return sch.mod["main"], inlined


def _pair_steps(sch, loop):
    """Split a reduction loop into pairs with an unrolled inner step of 2: with int4 weights
    packed per output row, step 0 reads a byte's low nibble and step 1 its high one (constant
    shifts), instead of a shift computed from the index on every MAC. Returns the outer loop."""
    outer, inner = sch.split(loop, [None, 2])
    sch.unroll(inner)
    return outer


def _is_reduction(sch, block) -> bool:
    return any(int(var.iter_type) == 2 for var in sch.get(block).iter_vars)  # CommReduce


def _pixel_window_schedule(func, per_channel: bool = False, pairs: bool = False):
    """Output loops n, h, w, c; the padded input window is copied under w (shared by
    all output channels) or, with ``per_channel``, under c (what one channel reads)."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 2 or len(blocks) > 3:
        raise ValueError(f"{len(blocks)} blocks")
    output, reduction = blocks[-1], blocks[-2]
    if not _is_reduction(sch, reduction) or _is_reduction(sch, output):
        raise ValueError("not producer -> reduction -> epilogue")
    pad = blocks[0] if len(blocks) == 3 else None
    if pad is not None and _is_reduction(sch, pad):
        raise ValueError("first block reduces")
    loops = sch.get_loops(output)
    if len(loops) != 4:
        raise ValueError(f"output has {len(loops)} loops, not NCHW")
    n, c, h, w = loops
    sch.reorder(n, h, w, c)
    sch.compute_at(reduction, c)
    if pad is not None:
        at = c if per_channel else w
        sch.compute_at(pad, at)
        # the window is what the loops under ``at`` write (the block's own write
        # region is one element: it is in terms of the block's iteration variables)
        depth = 4 if per_channel else 3  # n, h, w(, c) are shared with the output block
        extent = 1
        for loop in sch.get_loops(pad)[depth:]:
            extent *= int(sch.get(loop).extent)
        dtype = sch.get(pad).writes[0].source.dtype
        if extent * tvm.DataType(str(dtype)).bits // 8 > MAX_WINDOW_BYTES:
            raise ValueError(f"window of {extent} elements is too big for the stack")
    reduce_loops = sch.get_loops(reduction)[len(sch.get_loops(output)):]
    fused = sch.fuse(*reduce_loops) if len(reduce_loops) > 1 else reduce_loops[0]
    sch.decompose_reduction(reduction, _pair_steps(sch, fused) if pairs else fused)
    return sch.mod["main"]


def _scalar_schedule(func, pairs: bool = False):
    """Fold every intermediate block into the output block's loops
    (:func:`targets.tvm_ops.fold_into_output`): one scalar accumulator per output
    element (or per row, for a row's reduction), padding read through a condition."""
    import tvm

    from targets.tvm_ops import fold_into_output

    sch = tvm.s_tir.Schedule(func)
    if len(sch.get_child_blocks(sch.get_sblock("root"))) < 2:
        return func

    def pair_reduction(block, depth: int) -> None:
        if pairs and _is_reduction(sch, block):
            reduce_loops = sch.get_loops(block)[depth + 1:]
            _pair_steps(sch, sch.fuse(*reduce_loops) if len(reduce_loops) > 1 else reduce_loops[0])

    fold_into_output(sch, on_attach=pair_reduction)
    return sch.mod["main"]


def build_kernels_c(kernels: list[Kernel]) -> str:
    """C source of all kernels (one TVM module), checked for dynamic allocation."""
    import tvm

    functions = {}
    for kernel in kernels:
        func = schedule_for_mcu(kernel.func)
        functions[kernel.symbol] = func.with_attr("global_symbol", kernel.symbol)
    module = tvm.IRModule(functions)
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        built = tvm.tirx.build(module, target={"kind": "c"})
    source = built.inspect_source()
    for call in WORKSPACE_CALLS:
        if call in source:
            raise RuntimeError(f"generated MCU kernels call {call}; a kernel still needs a workspace")
    return source


def copy_tvm_headers(include_dir: Path) -> list[Path]:
    """The five headers the generated C includes, from the installed wheels."""
    import tvm
    import tvm_ffi

    tvm_root = Path(tvm.__file__).resolve().parent / "include"
    ffi_root = Path(tvm_ffi.__file__).resolve().parent / "include"
    wanted = {
        "tvm/ffi/c_api.h": ffi_root,
        "tvm/ffi/extra/c_env_api.h": ffi_root,
        "dlpack/dlpack.h": ffi_root,
        "tvm/runtime/base.h": tvm_root,
        "tvm/runtime/c_backend_api.h": tvm_root,
    }
    written = []
    for rel, root in wanted.items():
        source = root / rel
        if not source.exists():
            raise RuntimeError(f"installed TVM wheel lacks {source}")
        target = include_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


# --------------------------------------------------------------------------- C text


def _c_array(ctype: str, name: str, values: np.ndarray, const: bool = True) -> str:
    flat = np.asarray(values).ravel()
    if flat.dtype.kind == "f":
        items = [repr(float(v)) + "f" for v in flat.astype(np.float32)]
    elif ctype == "int64_t":
        items = [f"{int(v)}LL" for v in flat]
    elif ctype == "int32_t":
        # INT32_MIN is not a valid decimal literal of type int
        items = [f"{int(v)}" if int(v) != -(2**31) else "(-2147483647 - 1)" for v in flat]
    else:
        items = [str(int(v)) for v in flat]
    lines = [", ".join(items[i : i + 24]) for i in range(0, len(items), 24)] or ["0"]
    body = ",\n  ".join(lines)
    qualifier = "const " if const else ""
    return f"{qualifier}{ctype} {name}[{max(len(flat), 1)}] __attribute__((aligned(4))) = {{\n  {body}\n}};\n"


def _dl_type(dtype: str) -> tuple[str, str, int]:
    if dtype not in _C_TYPES:
        raise EdgeqError(f"mcu target cannot store tensors of dtype {dtype}")
    return _C_TYPES[dtype]


def render_weights_c(weights: dict[str, np.ndarray]) -> str:
    parts = ["/* Generated by edgeq: weights and constants (const -> flash). */", "#include <stdint.h>", ""]
    for name, value in weights.items():
        ctype = _dl_type(str(value.dtype))[0]
        parts.append(f"/* {name}: shape {list(value.shape)} */")
        parts.append(_c_array(ctype, f"edgeq_w_{c_name(name)}", value))
    return "\n".join(parts)


def render_model_h(spec: ProjectSpec) -> str:
    plan = spec.plan
    in_shape, in_dtype = spec.activations[plan.input_tensor]
    out_shape, out_dtype = spec.activations[plan.output_tensor]
    in_ctype, out_ctype = _dl_type(in_dtype)[0], _dl_type(out_dtype)[0]
    in_bytes = plan.tensor_bytes[plan.input_tensor]
    out_bytes = plan.tensor_bytes[plan.output_tensor]
    iq, oq = spec.input_quant, spec.output_quant
    return f"""/* Generated by edgeq.  The model as one C function.
 *
 *   int model_run(const model_input_t *input, model_output_t *output);
 *
 * input : {in_dtype} tensor of shape {list(in_shape)} (row-major, the ONNX layout),
 *         quantized as q = saturate(round_half_even(x / MODEL_INPUT_SCALE) + MODEL_INPUT_ZERO_POINT).
 * output: {out_dtype} tensor of shape {list(out_shape)};
 *         real value = (q - MODEL_OUTPUT_ZERO_POINT) * MODEL_OUTPUT_SCALE.
 * Returns 0, or -(k + 1) when kernel k reported an error.
 * Not reentrant: all activations live in one static arena of MODEL_ARENA_BYTES
 * bytes (.bss); weights are const arrays (.rodata, flash).  No heap is used.
 */
#ifndef EDGEQ_MODEL_H_
#define EDGEQ_MODEL_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

typedef {in_ctype} model_input_t;
typedef {out_ctype} model_output_t;

#define MODEL_INPUT_BYTES {in_bytes}
#define MODEL_OUTPUT_BYTES {out_bytes}
#define MODEL_ARENA_BYTES {plan.arena_bytes}
#define MODEL_INPUT_SCALE {float(iq["scale"])!r}f
#define MODEL_INPUT_ZERO_POINT {int(iq["zero_point"])}
#define MODEL_OUTPUT_SCALE {float(oq["scale"])!r}f
#define MODEL_OUTPUT_ZERO_POINT {int(oq["zero_point"])}

int model_run(const model_input_t *input, model_output_t *output);

#ifdef __cplusplus
}}
#endif

#endif  /* EDGEQ_MODEL_H_ */
"""


def render_model_c(spec: ProjectSpec, kernels: list[Kernel]) -> str:
    plan = spec.plan
    lines = [
        "/* Generated by edgeq: the runner.  Static memory plan, static DLTensor",
        " * descriptors, one packed-ABI call per kernel.  See model.h. */",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <string.h>",
        "",
        '#include "dlpack/dlpack.h"',
        '#include "model.h"',
        '#include "tvm/ffi/c_api.h"',
        "",
        f"/* Activation arena: peak live bytes {plan.peak_live_bytes}, packed into {plan.arena_bytes}. */",
        f"static uint8_t edgeq_arena[{max(plan.arena_bytes, 4)}] __attribute__((aligned(8)));",
        "",
    ]
    for kernel in kernels:
        lines.append(f"int32_t __tvm_ffi_{kernel.symbol}(void *self, void *args, int32_t num_args, void *result);")
    lines.append("")
    constants: dict[str, np.ndarray] = {}
    for kernel in kernels:
        constants.update(kernel.constants)
    for name in sorted({a for k in kernels for a in k.args if a in spec.weights}):
        ctype = _dl_type(str(spec.weights[name].dtype))[0]
        lines.append(f"extern const {ctype} edgeq_w_{c_name(name)}[];")
    for name, value in constants.items():
        lines.append("static " + _c_array(_dl_type(str(value.dtype))[0], f"edgeq_c_{c_name(name)}", value))
    lines.append("")

    described: dict[str, str] = {}
    for kernel in kernels:
        for name in kernel.args:
            if name in described:
                continue
            var = f"edgeq_t{len(described)}"
            described[name] = var
            if name in spec.weights:
                shape, dtype = spec.weights[name].shape, str(spec.weights[name].dtype)
                data = f"(void *)edgeq_w_{c_name(name)}"
            elif name in constants:
                shape, dtype = constants[name].shape, str(constants[name].dtype)
                data = f"(void *)edgeq_c_{c_name(name)}"
            elif name in plan.offsets:
                shape, dtype = spec.activations[name]
                data = f"(void *)(edgeq_arena + {plan.offsets[name]})"
            else:
                raise RuntimeError(f"kernel {kernel.symbol} reads '{name}', which is neither planned nor stored")
            _, code, bits = _dl_type(dtype)
            dims = ", ".join(f"{int(d)}" for d in shape) or "1"
            lines.append(f"/* {name} */")
            lines.append(f"static const int64_t {var}_shape[] = {{{dims}}};")
            lines.append(
                f"static const DLTensor {var} = {{.data = {data}, .device = {{kDLCPU, 0}}, "
                f".ndim = {max(len(shape), 1)}, .dtype = {{{code}, {bits}, 1}}, "
                f".shape = (int64_t *){var}_shape, .strides = NULL, .byte_offset = 0}};"
            )
    lines.append("")
    lines.append("#define EDGEQ_ARG(t) {.type_index = kTVMFFIDLTensorPtr, .zero_padding = 0, .v_ptr = (void *)&(t)}")
    for index, kernel in enumerate(kernels):
        args = ", ".join(f"EDGEQ_ARG({described[a]})" for a in kernel.args)
        lines.append(f"static const TVMFFIAny edgeq_args{index}[{len(kernel.args)}] = {{{args}}};")
    lines.append("")
    lines.append("int model_run(const model_input_t *input, model_output_t *output) {")
    lines.append("  TVMFFIAny result;")
    lines.append(
        f"  memcpy(edgeq_arena + {plan.offsets[plan.input_tensor]}, input, MODEL_INPUT_BYTES);"
    )
    for index, kernel in enumerate(kernels):
        lines.append(
            f"  if (__tvm_ffi_{kernel.symbol}(NULL, (void *)edgeq_args{index}, {len(kernel.args)}, &result) != 0) "
            f"return -{index + 1};"
        )
    lines.append(
        f"  memcpy(output, edgeq_arena + {plan.offsets[plan.output_tensor]}, MODEL_OUTPUT_BYTES);"
    )
    lines.append("  return 0;")
    lines.append("}")
    return "\n".join(lines) + "\n"


MAKEFILE = r"""# Generated by edgeq.  `make` builds firmware.elf (Cortex-M4, mps2-an386 memory
# map, semihosting test harness) and host_runner (native gcc, same sources).
# To use the model in your own firmware, compile model.c weights.c kernels.c
# runtime/edgeq_runtime.c with -Iinclude and call model_run() (see model.h).
ARM_CC ?= arm-none-eabi-gcc
ARM_SIZE ?= arm-none-eabi-size
HOST_CC ?= gcc
ARM_FLAGS ?= -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16
# -O3: on DS-CNN 43% fewer executed instructions than -Os for +4% flash (the weights dominate flash);
# -funroll-loops: 22-38% fewer again on the MLPerf Tiny models for 0.5-3.3 KB more code
CFLAGS ?= -O3 -funroll-loops
COMMON = -std=gnu11 -Wall -Wno-unused-variable -Wno-unused-but-set-variable -ffunction-sections -fdata-sections -Iinclude -Iruntime -I.
MODEL_SRC = model.c weights.c kernels.c runtime/edgeq_runtime.c
ARM_SRC = $(MODEL_SRC) runtime/startup_mps2.c runtime/semihost.c runtime/main_qemu.c
HOST_SRC = $(MODEL_SRC) runtime/main_host.c
ARM_OBJ = $(patsubst %.c,build/arm/%.o,$(ARM_SRC))

all: firmware.elf host_runner

build/arm/%.o: %.c model.h
	@mkdir -p $(dir $@)
	$(ARM_CC) $(ARM_FLAGS) $(CFLAGS) $(COMMON) -fstack-usage -c $< -o $@

firmware.elf: $(ARM_OBJ) runtime/mps2_an386.ld
	$(ARM_CC) $(ARM_FLAGS) -T runtime/mps2_an386.ld -nostartfiles --specs=nano.specs --specs=nosys.specs -Wl,--gc-sections -Wl,-Map=build/firmware.map $(ARM_OBJ) -o $@
	$(ARM_SIZE) $@

host_runner: $(HOST_SRC) model.h
	$(HOST_CC) -O2 $(COMMON) $(HOST_SRC) -o $@

clean:
	rm -rf build firmware.elf host_runner

.PHONY: all clean
"""


def write_project(project_dir: Path, spec: ProjectSpec, kernels: list[Kernel]) -> list[Path]:
    """Write the C project into ``project_dir`` (an existing, empty directory)."""
    written: list[Path] = []

    def write(rel: str, text: str) -> None:
        path = project_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    write("kernels.c", build_kernels_c(kernels))
    write("weights.c", render_weights_c({k: v for k, v in spec.weights.items() if any(k in kn.args for kn in kernels)}))
    write("model.h", render_model_h(spec))
    write("model.c", render_model_c(spec, kernels))
    write("Makefile", MAKEFILE)
    for name in RUNTIME_FILES:
        write(f"runtime/{name}", (RUNTIME_DIR / name).read_text())
    written += copy_tvm_headers(project_dir / "include")
    return written
