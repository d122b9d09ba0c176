"""Measure the GPU roofline numbers the gpu cost model uses (run on the GPU machine, needs torch+CUDA).

Times with CUDA events (median of --repeat after warm-up):
* int8 x int8 -> int32 GEMMs (``torch._int_mm``) and fp16 GEMMs, from weight-read-bound
  shapes (M=32 rows, a batch-1 layer padded to the kernel's minimum) to compute-bound ones;
* device memory bandwidth (a large device-to-device copy);
* the cost of one tiny kernel (launch + completion), what a layer costs at minimum.

Prints one JSON object; targets/gpu/measured_<gpu>.json keeps the H100 run that
targets/gpu/cost.py cites.

    python tools/measure_gpu_roofline.py > measured.json
"""

from __future__ import annotations

import json
import statistics

import torch


def timed(fn, repeat: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(repeat: int = 50) -> None:
    device = torch.device("cuda")
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "gemms": []}
    for m, k, n in [(32, 1280, 1000), (32, 4096, 4096), (256, 4096, 4096), (4096, 4096, 4096), (8192, 8192, 8192)]:
        a8 = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=device)
        b8 = torch.randint(-128, 127, (k, n), dtype=torch.int8, device=device)
        a16, b16 = a8.half(), b8.half()
        int8_s = timed(lambda a8=a8, b8=b8: torch._int_mm(a8, b8), repeat)
        fp16_s = timed(lambda a16=a16, b16=b16: a16 @ b16, repeat)
        result["gemms"].append({"m": m, "k": k, "n": n, "int8_s": int8_s, "fp16_s": fp16_s,
                                "int8_tops": 2 * m * k * n / int8_s / 1e12,
                                "fp16_tflops": 2 * m * k * n / fp16_s / 1e12,
                                "int8_weight_gbps": k * n / int8_s / 1e9})
    big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    other = torch.empty_like(big)
    copy_s = timed(lambda: other.copy_(big), repeat)
    result["copy_bandwidth_gbps"] = 2 * big.numel() / copy_s / 1e9  # read + write
    tiny = torch.zeros(1, device=device)
    result["tiny_kernel_s"] = timed(lambda: tiny.add_(1), repeat * 4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
