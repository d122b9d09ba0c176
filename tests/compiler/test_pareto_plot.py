"""The Pareto SVG: well-formed, one marker per point, the chosen plan marked."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from compiler.pareto_plot import pareto_svg
from passes import allocate as al
from targets.mcu.cost import cost_model


def test_frontier_plot_of_a_real_sweep():
    problem = al.synthetic_problem(12, cost_model("cortex-m4"), seed=2)
    points = al.pareto(problem, "flash_bytes", 5)
    chosen = points[len(points) // 2]
    svg = pareto_svg([(p.totals["flash_bytes"], p.objective) for p in points], "flash_bytes",
                     (chosen.totals["flash_bytes"], chosen.objective), title="synthetic")
    root = ET.fromstring(svg)
    circles = [el for el in root.iter() if el.tag.endswith("circle")]
    assert len(circles) == len(points) + 1  # the frontier plus the chosen marker
    assert any(el.get("stroke") == "#d62728" for el in circles)
    xs = [float(el.get("cx")) for el in circles[:-1]]
    assert xs == sorted(xs)  # drawn along the metric


def test_empty_frontier_is_an_error():
    with pytest.raises(ValueError):
        pareto_svg([], "weight_bytes")
