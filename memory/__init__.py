"""Measure, estimate and budget the memory of a training step, and plan the update scheme that fits."""

from memory.budget import Budget, format_bytes, parse_bytes
from memory.measure import measure
from memory.report import MemoryReport

__all__ = ["Budget", "MemoryReport", "format_bytes", "measure", "parse_bytes"]
