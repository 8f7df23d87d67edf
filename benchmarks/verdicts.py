"""The last lines of every benchmark: each measured figure against its target, PASS or MISS."""

from __future__ import annotations

import operator
from collections.abc import Mapping

_COMPARISONS = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt}


def print_verdicts(measured: Mapping[str, float], targets: Mapping[str, tuple[str, float]]) -> None:
    """One line per figure: its value, its target (``(comparison, value)`` by name) and whether it is met."""
    width = max(map(len, measured))
    for name, value in measured.items():
        comparison, target = targets[name]
        met = _COMPARISONS[comparison](value, target)
        print(f"{name:{width}} {value:10.2f}   target {comparison} {target:g}   {'PASS' if met else 'MISS'}")
