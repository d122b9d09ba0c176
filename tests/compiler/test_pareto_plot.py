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


def _texts(svg: str) -> list[ET.Element]:
    return [el for el in ET.fromstring(svg).iter() if el.tag.endswith("text")]


def test_budget_near_the_frontier_is_a_dashed_line_beyond_it_a_note():
    points = [(1000.0, 0.5), (1500.0, 0.1), (2000.0, 0.01)]
    near = ET.fromstring(pareto_svg(points, "weight_bytes", (1500.0, 0.1), budget=1600.0))
    dashed = [el for el in near.iter() if el.tag.endswith("line") and el.get("stroke-dasharray")]
    assert len(dashed) == 1
    chosen_x = next(float(el.get("cx")) for el in near.iter() if el.get("stroke") == "#d62728")
    assert float(dashed[0].get("x1")) > chosen_x  # the limit lies right of the plan that meets it
    far = pareto_svg(points, "weight_bytes", (2000.0, 0.01), budget=100000.0)
    assert not any(el.get("stroke-dasharray") for el in ET.fromstring(far).iter())
    assert any("every plan drawn fits" in (el.text or "") for el in _texts(far))


def test_labels_at_the_right_edge_are_anchored_inside_the_picture():
    """The chosen plan at the widest point and the axis's last value once ran off the right edge."""
    svg = pareto_svg([(1000.0, 0.5), (2000.0, 0.01)], "weight_bytes", (2000.0, 0.01))
    chosen = next(el for el in _texts(svg) if el.text == "chosen")
    assert chosen.get("text-anchor") == "end"
    last_tick = max((el for el in _texts(svg) if el.text and el.text.endswith("KB")), key=lambda el: float(el.get("x")))
    assert last_tick.get("text-anchor") == "end"


def test_log_axis_marks_the_decades_between_its_ends():
    svg = pareto_svg([(1.0, 1e-4), (2.0, 1e-1)], "bitops")
    labels = {el.text for el in _texts(svg)}
    assert {"0.0001", "0.001", "0.01", "0.1"} <= labels
