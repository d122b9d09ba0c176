"""The device-independent part of every target's cost model.

Bytes and bit-operations follow from the layer's shape and the chosen bits
alone; each target's ``cost.py`` adds what depends on its hardware (latency,
energy, flash/SRAM/LUT/DSP). Keeping this in one place means every target
counts weight bytes the same way (sub-byte values packed, as the QDQ export and
the integer runtimes store them).
"""

from __future__ import annotations

from compiler.errors import EdgeqError
from targets.base import LayerCost, LayerShape, packed_bytes

# Bytes of the per-output-channel constants an integer layer carries besides
# its weights: int32 bias, int32 requantization multiplier and an int8 shift
# (compiler/intgraph.py's dyadic requantization).
PER_CHANNEL_CONSTANT_BYTES = 4 + 4 + 1


def base_layer_cost(layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
    """Bytes, MACs and bit-operations of ``layer`` at (w_bits, a_bits); no timing."""
    w_bits = w_bits if layer.weight_params else None
    # A weightless layer (Add, pooling) multiplies activations by activations
    # or not at all; count its work at a_bits x a_bits.
    multiplier_bits = w_bits if w_bits else a_bits
    return LayerCost(
        weight_bytes=packed_bytes(layer.weight_params, w_bits),
        activation_bytes=packed_bytes(layer.output_elems, a_bits),
        macs=layer.macs,
        bitops=layer.macs * multiplier_bits * a_bits,
    )


def constant_bytes(layer: LayerShape) -> int:
    """Bytes of bias and requantization constants stored next to the weights."""
    return layer.output_channels * PER_CHANNEL_CONSTANT_BYTES if layer.weight_params else 0


def traffic_bytes(layer: LayerShape, w_bits: int | None, a_bits: int) -> int:
    """Bytes a layer moves from/to memory once: weights, input and output activations."""
    w_bits = w_bits if layer.weight_params else None
    return (
        packed_bytes(layer.weight_params, w_bits)
        + packed_bytes(layer.input_elems, a_bits)
        + packed_bytes(layer.output_elems, a_bits)
    )


def nearest_supported(bits: int, supported: tuple[int, ...]) -> int:
    """The smallest supported width that holds ``bits`` (hardware computes wider)."""
    for width in sorted(supported):
        if bits <= width:
            return width
    return max(supported)


def refuse_device(target: str, device: str | None, why: str) -> None:
    """A one-line EdgeqError for ``--device`` given to a target without presets (it would be ignored)."""
    if device is not None:
        raise EdgeqError(f"--device {device}: target {target} has no device presets ({why}); "
                         "presets are for --target mcu, gpu and fpga")
