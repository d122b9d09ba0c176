"""Cost model of the ``cpu`` target: latency of the code edgeq itself generates.

Per layer: ``overhead_s + seconds_per_byte * bytes moved`` plus, by layer kind
and (w_bits, a_bits), ``seconds_per_mac * macs + seconds_per_layer_output_elem *
output elements (the epilogue) + seconds_per_channel * output channels``; once
per model call (through :meth:`CpuCostModel.fixed_costs`, which the allocator
adds to every plan's total): ``call_overhead_s + seconds_per_input_elem * input
elements + seconds_per_output_elem * output elements`` -- the library call, the
library quantizing its float input, and the Python runner around it (the input
copied in, the output copied out and dequantized), the first layer's input and
the last layer's output standing for the model's. Per sample, one thread, on the
host this runs on.

The coefficients come from ``cost_table.json`` next to this file when it exists:
tools/fit_cpu_cost.py times the kernels targets/cpu lowers (real TVM builds of
single layers of a grid of shapes, of chains of 1, 4 and 8 identical small
layers that separate the per-call from the per-layer overhead, and of
MobileNet-style block stacks that put layers in a model's context; every build
verified bit-exact) and fits the coefficients by non-negative least squares,
recording the host, the date, the measurements and the fit error in the file;
tools/validate_cpu_cost.py compares the model with whole compiled models.
Tables written before the per-call term existed have only ``overhead_s``
(then per layer and per call at once): they load with no per-call cost; tables
without the output-element or channel terms load with those at 0. On the host it
was measured on, a call costs ~20 us (mostly the Python runner), a layer
~0.3 us; 16-bit activations cost ~2x (KxK conv) to ~2.5x (1x1 "pointwise" conv,
depthwise) the time per MAC of 8-bit ones (the VNNI kernels read them as two
byte planes); 4-bit weights run the 8-bit kernels. Pointwise convs have their
own row: priced as KxK convs, MobileNetV2's 960->320 projection came out at
half its time in the compiled model. A layer at 8-bit activations whose output
feeds a 16-bit layer writes 16-bit output from the same kernel; the wider store
is not priced (a layer's cost depends on its own bits only): in a compiled
MobileNetV2 plan it cost five depthwise layers ~0.1 ns per output element,
~30 us in all (2%).
Last, each layer's latency is multiplied by the table's ``context_factor`` for
its activation width: whole compiled models run slower than the sum of their
layers priced as above (MobileNetV2 and EfficientNet-Lite0 by 7-17%, more at
16-bit activations; the cause is not settled), so the fit also times whole
zoo models at each width and takes the factor from them; and by its group's
``context_group_factor`` (:func:`context_group`), fitted from the same models'
layers timed in place, which shares that slowdown out by where it falls (tables
without them: 1).
Without a table the model falls back to an analytic estimate anchored on one measurement in
DESIGN.md (untuned Relax int8 MobileNetV2, ~300 M MACs in ~80 ms on one thread
of this host: ~2.7e-10 s/MAC); only the ratios between bit pairs matter to the
allocator, and the analytic ratios are: 4-bit/2-bit weights are unpacked to
int8 before the int8 dot products (same MAC time, fewer bytes), 16-bit
activations run the 16-bit multiply path at half the int8 lanes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from targets.base import CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost, nearest_supported, refuse_device, traffic_bytes

TABLE_PATH = Path(__file__).with_name("cost_table.json")
_WIDTHS = (4, 8, 16)


@dataclass
class CpuCoefficients:
    seconds_per_mac: dict[str, dict[str, float]]  # kind -> "w,a" -> s/MAC
    seconds_per_byte: float
    overhead_s: float  # per layer
    source: str
    info: dict = field(default_factory=dict)
    call_overhead_s: float = 0.0  # once per model call
    seconds_per_input_elem: float = 0.0  # once per call, per element of the model's (float) input
    seconds_per_output_elem: float = 0.0  # once per call, per element of the model's output
    # kind -> "w,a" -> seconds per element of the layer's output (epilogue) / per output channel
    seconds_per_layer_output_elem: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds_per_channel: dict[str, dict[str, float]] = field(default_factory=dict)
    # a_bits -> how much slower a layer runs inside a whole compiled model than its terms above say
    context_factor: dict[str, float] = field(default_factory=dict)
    # a_bits -> context_group -> that group's in-model slowdown relative to the model's as a whole
    context_group_factor: dict[str, dict[str, float]] = field(default_factory=dict)


def _analytic() -> CpuCoefficients:
    int8 = 2.7e-10
    pairs = {}
    for w in (4, 8, 16):
        for a in (4, 8, 16):
            pairs[f"{w},{a}"] = int8 * (2.0 if max(w, a) > 8 else 1.0)
    return CpuCoefficients(
        seconds_per_mac={"default": pairs},
        seconds_per_byte=1.0 / 10e9,  # ~10 GB/s streaming on one core
        overhead_s=1e-6,  # one more kernel call inside the library
        call_overhead_s=2e-5,  # the library call and the Python runner around it
        source="analytic (DESIGN.md: untuned Relax int8 MobileNetV2 ~80 ms / ~300 M MACs)",
    )


def load_coefficients(path: Path = TABLE_PATH) -> CpuCoefficients:
    if not path.exists():
        return _analytic()
    return coefficients_from_table(json.loads(path.read_text()), default_source=str(path))


def coefficients_from_table(data: dict, default_source: str = "cost table") -> CpuCoefficients:
    """The coefficients of a cost table as tools/fit_cpu_cost.py writes it (terms it lacks: 0)."""
    return CpuCoefficients(
        seconds_per_mac=data["seconds_per_mac"],
        seconds_per_byte=data["seconds_per_byte"],
        overhead_s=data["overhead_s"],
        source=data.get("source", default_source),
        info=data.get("info", {}),
        call_overhead_s=data.get("call_overhead_s", 0.0),
        seconds_per_input_elem=data.get("seconds_per_input_elem", 0.0),
        seconds_per_output_elem=data.get("seconds_per_output_elem", 0.0),
        seconds_per_layer_output_elem=data.get("seconds_per_layer_output_elem", {}),
        seconds_per_channel=data.get("seconds_per_channel", {}),
        context_factor=data.get("context_factor", {}),
        context_group_factor=data.get("context_group_factor", {}),
    )


class CpuCostModel(CostModel):
    name = "cpu"
    # The pairs cost_table.json was measured on (compiled, run and verified bit-exact).
    bit_pairs = ((4, 8), (8, 8), (4, 16), (8, 16))

    def __init__(self, coefficients: CpuCoefficients | None = None) -> None:
        self.coefficients = coefficients or load_coefficients()

    def seconds_per_mac(self, kind: str, w_bits: int | None, a_bits: int) -> float:
        return _per_kind(self.coefficients.seconds_per_mac, kind, w_bits, a_bits)

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        cost = base_layer_cost(layer, w_bits, a_bits)
        coefficients = self.coefficients
        w = w_bits if layer.weight_params else None
        # the library holds sub-byte weights as int8 (passes/integerize): they move 8-bit bytes
        stored_w = max(w, 8) if w else None
        kind = cost_kind(layer)
        cost.latency_s = (
            coefficients.overhead_s
            + self.seconds_per_mac(kind, w, a_bits) * layer.macs
            + _per_kind(coefficients.seconds_per_layer_output_elem, kind, w, a_bits) * layer.output_elems
            + _per_kind(coefficients.seconds_per_channel, kind, w, a_bits) * layer.output_channels
            + coefficients.seconds_per_byte * traffic_bytes(layer, stored_w, a_bits)
        ) * self.context_factor(layer, a_bits)
        return cost

    def context_factor(self, layer: LayerShape, a_bits: int) -> float:
        """How much slower ``layer`` runs at ``a_bits`` inside a compiled model than its terms say: the
        table's whole-model factor for the width times its group's relative one (1 where it has none)."""
        width = str(nearest_supported(a_bits, _WIDTHS))
        coefficients = self.coefficients
        return (coefficients.context_factor.get(width, 1.0)
                * coefficients.context_group_factor.get(width, {}).get(context_group(layer), 1.0))

    def call_latency_s(self, layers: list[LayerShape]) -> float:
        """Seconds one call of a model with these layers (in execution order) costs beyond its
        layers: the library call, the runner's input copy and output dequantize."""
        coefficients = self.coefficients
        latency = coefficients.call_overhead_s
        if layers:
            latency += (coefficients.seconds_per_input_elem * layers[0].input_elems
                        + coefficients.seconds_per_output_elem * layers[-1].output_elems)
        return latency

    def fixed_costs(self, layers: list[LayerShape], online_ops: list[LayerShape] = ()) -> dict[str, float]:
        """The online ops' costs, and the per-call latency (:meth:`call_latency_s`), charged once."""
        totals = super().fixed_costs(layers, online_ops)
        totals["latency_s"] = totals.get("latency_s", 0.0) + self.call_latency_s(list(layers))
        return totals


def context_group(layer: LayerShape) -> str:
    """The group whose in-model slowdown a layer shares: its kind, with the 1x1 convs that reduce
    channels ("projection") apart from those that widen them -- in place in MobileNetV2 and
    EfficientNet-Lite0 the former ran 1.1-1.6x their terms, the latter 0.9-1.2x (benchmarks/cpu.md)."""
    if layer.kind == "pointwise" and layer.weight_params > layer.output_channels ** 2:  # in channels > out
        return "projection"
    return cost_kind(layer)


def cost_kind(layer: LayerShape) -> str:
    """The table's name for a layer's kind: ``LayerShape.kind``, with max pools apart from the
    other pools -- on x86 they run a hand-written kernel (targets/cpu/schedules), average pools
    the generic TE reduction, several times slower per input element."""
    return "maxpool" if layer.op_type == "MaxPool" else layer.kind


def _per_kind(table: dict[str, dict[str, float]], kind: str, w_bits: int | None, a_bits: int) -> float:
    """``table[kind]["w,a"]`` (kind "default" when not measured); a pair the fit did not cover takes
    the widest weights measured at the same activations; 0 for a table the fit did not have."""
    if not table:
        return 0.0
    pairs = table.get(kind) or table["default"]
    a = nearest_supported(a_bits, _WIDTHS)
    w = nearest_supported(w_bits, _WIDTHS) if w_bits else a
    key = f"{w},{a}"
    if key not in pairs:
        same_activations = [k for k in pairs if k.endswith(f",{a}")] or list(pairs)
        key = max(same_activations, key=lambda k: int(k.split(",")[0]))
    return pairs[key]


def cost_model(device: str | None = None) -> CpuCostModel:
    refuse_device("cpu", device, "its table is measured on this machine; cross-compile with --target-triple")
    return CpuCostModel()
