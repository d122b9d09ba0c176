"""The ``fpga`` target: its cost model only, for now.

The bit allocator can plan for this target (``edgeq allocate --target fpga``);
lowering and running are not implemented yet and say so.
"""

from targets.base import CostModelOnlyTarget


class FpgaTarget(CostModelOnlyTarget):
    name = "fpga"


TARGET = FpgaTarget()
