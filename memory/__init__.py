"""Measure, estimate and budget the memory of a training step, and plan the update scheme that fits."""

from memory.budget import Budget, format_bytes, parse_bytes
from memory.estimate import estimate
from memory.measure import measure
from memory.plan import Candidate, Plan, plan
from memory.report import MemoryReport, budget_bytes_needed

__all__ = [
    "Budget",
    "Candidate",
    "MemoryReport",
    "Plan",
    "budget_bytes_needed",
    "estimate",
    "format_bytes",
    "measure",
    "parse_bytes",
    "plan",
]
