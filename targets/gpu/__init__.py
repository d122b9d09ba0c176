"""The ``gpu`` target: its cost model only, for now.

The bit allocator can plan for this target (``edgeq allocate --target gpu``);
lowering and running are not implemented yet and say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import EdgeqError
from targets.base import CompileContext, CostModel, Target


class GpuTarget(Target):
    name = "gpu"

    def cost_model(self, device: str | None = None) -> CostModel:
        from targets.gpu.cost import cost_model

        return cost_model(device)

    def lower(self, ctx: CompileContext) -> list[Path]:
        raise EdgeqError("target 'gpu' lowering is not implemented yet (edgeq allocate --target gpu works)")

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        raise EdgeqError("target 'gpu' has no runner yet: its lowering is not implemented")


TARGET = GpuTarget()
