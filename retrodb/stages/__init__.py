"""Stages: one class per pipeline step, each with one `run(unit)` over a unit of work (a segment)."""

from .base import Stage

__all__ = ["Stage"]
