"""Parse the user's ``--budget`` string into the metric limits the allocator enforces.

Syntax: comma-separated ``key=value`` items, e.g. ``flash=512KB,sram=128KB``,
``latency=1.5ms``, ``size=0.5``, ``bitops=2.5G``, ``energy=30uJ``, ``lut=50000``.

Result keys (the metric names of :mod:`passes.allocate`):

==============  ===============================================================
``flash_bytes``  MCU flash: packed weights + per-channel constants + code estimate
``sram_bytes``   MCU peak SRAM: live activation bytes over the execution order
``weight_bytes`` ``size=300KB`` (absolute bytes of packed weights)
``size_fraction`` ``size=0.5``: fraction of the int8 weight bytes (0 < f <= 4)
``latency_s``    seconds per sample (``s``, ``ms``, ``us``, ``ns``; bare number = s)
``energy_j``     joules per sample (``J``, ``mJ``, ``uJ``, ``nJ``; bare number = J)
``bitops``       bit-operations per sample (MACs x w_bits x a_bits); K/M/G/T suffix
``lut``/``dsp``/``bram``  FPGA resources (counts; K/M suffix allowed)
==============  ===============================================================

Any key also takes a percentage, e.g. ``latency=80%``, ``bitops=50%``,
``sram=60%``: a fraction of what the all-8-bit plan costs on the target
(``size=50%`` is ``size=0.5``). It parses to ``<metric>_fraction`` (e.g.
``latency_s_fraction``), which :func:`compiler.mixed.absolute_budget` turns into
an absolute limit once the model is priced.

Byte sizes use binary prefixes, as MCU datasheets do: ``KB`` = ``KiB`` = 1024 bytes,
``MB`` = ``MiB`` = 1024**2; a bare number is bytes.
"""

from __future__ import annotations

import math
import re

from compiler.errors import EdgeqError

_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_ENERGY_UNITS = {"": 1.0, "j": 1.0, "mj": 1e-3, "uj": 1e-6, "µj": 1e-6, "nj": 1e-9}
_COUNT_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

# budget key -> (result key, unit table, integer result?)
_KEYS: dict[str, tuple[str, dict[str, float], bool]] = {
    "flash": ("flash_bytes", _BYTE_UNITS, True),
    "sram": ("sram_bytes", _BYTE_UNITS, True),
    "latency": ("latency_s", _TIME_UNITS, False),
    "energy": ("energy_j", _ENERGY_UNITS, False),
    "bitops": ("bitops", _COUNT_UNITS, False),
    "lut": ("lut", _COUNT_UNITS, False),
    "dsp": ("dsp", _COUNT_UNITS, False),
    "bram": ("bram", _COUNT_UNITS, False),
}
# ``size=`` as a fraction or in bytes: one weight-size limit either way
_SIZE_KEYS = {"weight_bytes", "size_fraction"}
# Every metric name a parsed budget may contain (passes.allocate knows them all).
BUDGET_METRICS = tuple(sorted({key for key, _, _ in _KEYS.values()} | _SIZE_KEYS))

# suffix of a relative limit's key: a fraction of the all-8-bit plan's total of the metric
FRACTION = "_fraction"
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")

_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def _number_with_unit(key: str, text: str, units: dict[str, float]) -> float:
    match = _VALUE.match(text)
    if not match:
        if text.strip().startswith("-"):
            raise EdgeqError(f"budget '{key}={text}': must be a positive number")
        raise EdgeqError(f"budget '{key}={text}': expected a number with an optional unit")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in units:
        known = ", ".join(u for u in units if u) or "none"
        raise EdgeqError(f"budget '{key}={text}': unknown unit '{match.group(2)}' (use {known})")
    value = number * units[unit]
    if not math.isfinite(value) or value <= 0:
        raise EdgeqError(f"budget '{key}={text}': must be a positive number")
    return value


def parse_budget(text: str | None) -> dict[str, float]:
    """``"flash=512KB,sram=128KB"`` -> ``{"flash_bytes": 524288, "sram_bytes": 131072}``.

    An empty or None string is no budget (``{}``). Malformed strings raise EdgeqError.
    """
    budget: dict[str, float] = {}
    if text is None or not text.strip():
        return budget
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise EdgeqError(f"budget '{text}': an empty item (a stray comma?)")
        if "=" not in item:
            raise EdgeqError(f"budget item '{item}' is not key=value (e.g. flash=512KB)")
        key, value = (part.strip() for part in item.split("=", 1))
        key = key.lower()
        percent = _PERCENT.match(value)
        if percent and (key == "size" or key in _KEYS):
            fraction = float(percent.group(1)) / 100
            if not 0 < fraction <= 4:
                raise EdgeqError(f"budget '{key}={value}': a percentage of the all-8-bit plan, above 0% and at most 400%")
            result_key = "size_fraction" if key == "size" else _KEYS[key][0] + FRACTION
            parsed = fraction
        elif key == "size":
            result_key, parsed = _parse_size(value)
        elif key in _KEYS:
            result_key, units, integer = _KEYS[key]
            parsed = _number_with_unit(key, value, units)
            if integer:
                if parsed < 1:
                    raise EdgeqError(f"budget '{key}={value}': less than one byte")
                parsed = int(parsed)
        else:
            known = ", ".join(sorted([*_KEYS, "size"]))
            raise EdgeqError(f"unknown budget key '{key}' (known: {known})")
        if base_metric(result_key) in {base_metric(given) for given in budget}:
            raise EdgeqError(f"budget key '{key}' given twice")
        budget[result_key] = parsed
    return budget


def base_metric(key: str) -> str:
    """The allocator metric a parsed budget key limits: ``latency_s_fraction`` -> ``latency_s``,
    ``size_fraction`` -> ``weight_bytes``."""
    if key == "size_fraction":
        return "weight_bytes"
    return key.removesuffix(FRACTION)


def metric_names(budget: dict[str, float]) -> list[str]:
    """The allocator metrics a parsed budget limits (``size_fraction`` is a weight-bytes limit,
    ``latency_s_fraction`` a latency one)."""
    return [base_metric(key) for key in budget]


def _parse_size(value: str) -> tuple[str, float]:
    """``size=0.5`` is a fraction of the int8 weight bytes; ``size=300KB`` is absolute."""
    match = _VALUE.match(value)
    if match and match.group(2) == "":
        fraction = float(match.group(1))
        if not 0 < fraction <= 4:
            raise EdgeqError(f"budget 'size={value}': a bare size is a fraction of the int8 weight bytes, 0 < size <= 4 (use size=300KB for bytes)")
        return "size_fraction", fraction
    size = _number_with_unit("size", value, _BYTE_UNITS)
    if size < 1:
        raise EdgeqError(f"budget 'size={value}': less than one byte")
    return "weight_bytes", int(size)


def format_metric(metric: str, value: float) -> str:
    """Human-readable value of a budget metric, in the unit a user would write."""
    if metric in ("flash_bytes", "sram_bytes", "weight_bytes"):
        if value >= 1024**2:
            return f"{value / 1024**2:.3f}MB"
        if value >= 1024:
            return f"{value / 1024:.2f}KB"
        return f"{int(value)}B"
    if metric == "latency_s":
        return f"{value * 1e3:.4g}ms"
    if metric == "energy_j":
        return f"{value * 1e6:.4g}uJ"
    if metric in ("lut", "dsp", "bram") and value >= 100:
        return f"{value:.0f}"  # device counts: 53200 LUTs, not 5.32e+04
    return f"{value:.4g}"
