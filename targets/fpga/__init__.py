"""The ``fpga`` target: its cost model only, for now.

The bit allocator can plan for this target (``edgeq allocate --target fpga``);
lowering and running are not implemented yet and say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import EdgeqError
from targets.base import CompileContext, CostModel, Target


class FpgaTarget(Target):
    name = "fpga"

    def cost_model(self, device: str | None = None) -> CostModel:
        from targets.fpga.cost import cost_model

        return cost_model(device)

    def lower(self, ctx: CompileContext) -> list[Path]:
        raise EdgeqError("target 'fpga' lowering is not implemented yet (edgeq allocate --target fpga works)")

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        raise EdgeqError("target 'fpga' has no runner yet: its lowering is not implemented")


TARGET = FpgaTarget()
