"""--budget strings -> metric limits; malformed strings are user errors."""

from __future__ import annotations

import pytest

from compiler.budget import format_metric, parse_budget
from compiler.errors import EdgeqError


def test_parses_every_metric_with_units():
    assert parse_budget("flash=512KB,sram=128KB") == {"flash_bytes": 512 * 1024, "sram_bytes": 128 * 1024}
    assert parse_budget("latency=1.5ms")["latency_s"] == pytest.approx(1.5e-3)
    assert parse_budget("latency=200us")["latency_s"] == pytest.approx(2e-4)
    assert parse_budget("size=0.5") == {"size_fraction": 0.5}
    assert parse_budget("size=300KB") == {"weight_bytes": 300 * 1024}
    assert parse_budget("bitops=2.5G")["bitops"] == pytest.approx(2.5e9)
    assert parse_budget("energy=30uJ")["energy_j"] == pytest.approx(30e-6)
    assert parse_budget(" lut = 50k , dsp=200 ") == {"lut": 50e3, "dsp": 200.0}
    assert parse_budget("flash=1MiB")["flash_bytes"] == 1024**2
    assert parse_budget("") == {} and parse_budget(None) == {}


def test_percentages_are_fractions_of_the_all_8_bit_plan():
    assert parse_budget("latency=80%,bitops=50 %") == {"latency_s_fraction": 0.8, "bitops_fraction": 0.5}
    assert parse_budget("size=50%") == parse_budget("size=0.5") == {"size_fraction": 0.5}
    assert parse_budget("flash=75%,sram=100%") == {"flash_bytes_fraction": 0.75, "sram_bytes_fraction": 1.0}


@pytest.mark.parametrize("text", [
    "flash", "flash=", "flash=lots", "flash=12parsecs", "speed=3", "size=0", "size=-1", "size=7",
    "latency=-2ms", "flash=1KB,flash=2KB", "flash=1KB,,sram=2KB", "latency=1e400",
])
def test_bad_budgets_are_user_errors(text):
    with pytest.raises(EdgeqError):
        parse_budget(text)


@pytest.mark.parametrize(("text", "says"), [
    ("size=0.5,size=20KB", "'size' given twice"),
    ("size=0.5,size=50%", "'size' given twice"),
    ("latency=1ms,latency=80%", "'latency' given twice"),  # one limit per metric, relative or not
    ("latency=0%", "above 0%"),
    ("bitops=500%", "at most 400%"),
    ("speed=50%", "unknown budget key 'speed'"),  # a fraction and bytes are one weight-size limit
    ("size=20KB,size=0.5", "'size' given twice"),
    ("flash=0.5B", "less than one byte"),  # was parsed as 0 bytes, then reported "infeasible"
    ("size=0.2B", "less than one byte"),
    ("size=-1", "positive"),
    ("latency=-1ms", "positive"),
    ("size=0.5,", "stray comma"),
])
def test_bad_budget_messages_name_the_mistake(text, says):
    with pytest.raises(EdgeqError, match=says):
        parse_budget(text)


def test_format_round_trips_the_units_a_user_writes():
    assert format_metric("flash_bytes", 512 * 1024) == "512.00KB"
    assert format_metric("latency_s", 1.5e-3) == "1.5ms"
    assert parse_budget("flash=" + format_metric("flash_bytes", 512 * 1024))["flash_bytes"] == 512 * 1024
