"""The ``gpu`` target: its cost model only, for now.

The bit allocator can plan for this target (``edgeq allocate --target gpu``);
lowering and running are not implemented yet and say so.
"""

from targets.base import CostModelOnlyTarget


class GpuTarget(CostModelOnlyTarget):
    name = "gpu"


TARGET = GpuTarget()
