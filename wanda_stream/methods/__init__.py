"""Pruning methods behind one seam (see base.py); adding one is a module here and a line in METHODS.

Also the pure math the methods share: kernel (statistics, scores, masks), plans (structural choices),
profiles (sparsity per block), observe (hooks that feed the statistics) and fidelity (errors)."""

from __future__ import annotations

from dataclasses import Field, fields
from typing import Any

from wanda_stream.errors import InputError
from wanda_stream.methods.alps import Alps
from wanda_stream.methods.base import NM, Method, Observation, Pruned, Stat
from wanda_stream.methods.magnitude import Magnitude
from wanda_stream.methods.ria import Ria
from wanda_stream.methods.sparsegpt import SparseGPT
from wanda_stream.methods.wanda import Wanda

METHODS: dict[str, type[Method[Any]]] = {m.name: m for m in (Wanda, Magnitude, Ria, SparseGPT, Alps)}
# Where a method's statistic is missing (an MoE expert no calibration token was routed to).
FALLBACK = Magnitude()

__all__ = ["METHODS", "FALLBACK", "NM", "Method", "Observation", "Pruned", "Stat", "build", "dataclass_flags", "option_flags"]


def build(name: str, options: dict[str, float | int]) -> Method[Any]:
    """The method `name` with `options` (its dataclass fields); InputError for an unknown name or bad value."""
    cls = METHODS.get(name)
    if cls is None:
        raise InputError(f"--method '{name}': use one of {', '.join(METHODS)}")
    return cls(**options)


def option_flags() -> dict[str, tuple[str, Field[Any]]]:
    """Every method option's command-line flag -> (method name, its dataclass field)."""
    return {flag: (name, f) for name, cls in METHODS.items() for flag, f in dataclass_flags(cls).items()}


def dataclass_flags(cls: type) -> dict[str, Field[Any]]:
    """The command-line flags of an options dataclass (each field's metadata names one) -> the field."""
    return {f.metadata["flag"]: f for f in fields(cls)}
