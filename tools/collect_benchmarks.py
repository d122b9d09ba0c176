"""Assemble BENCHMARKS.md from the sections the benchmark tools write into benchmarks/.

Each tool owns one file in benchmarks/ (and rewrites it when run);
BENCHMARKS.md is the summary followed by every section, in the order below.

    python tools/collect_benchmarks.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["summary", "compare_ort", "models", "calibration", "transforms", "ort_smoothquant", "mixed", "size_budget", "resources",
         "resources_pipeline",
         "integer-core", "cpu", "mcu", "mcu_cost", "tflm"]


def main() -> int:
    sections = {path.stem: path for path in (ROOT / "benchmarks").glob("*.md")}
    names = [name for name in ORDER if name in sections] + sorted(set(sections) - set(ORDER))
    parts = ["# edgeq benchmarks", "",
             "Assembled by `python tools/collect_benchmarks.py` from benchmarks/*.md; each section says "
             "which command produced it and on what machine.", ""]
    for name in names:
        parts += [sections[name].read_text().rstrip(), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"BENCHMARKS.md: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
