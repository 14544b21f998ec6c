"""Magnitude pruning, the calibration-free baseline: |W| with one threshold per matrix (per group for N:M)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from wanda_stream.methods import kernel
from wanda_stream.methods.base import NM, Method, Observation, Pruned, Stat


@dataclass(frozen=True)
class Magnitude(Method[None]):
    """The lowest floor(numel * s) |W| of the whole matrix removed (stable); N:M per row groups."""

    name: ClassVar[str] = "magnitude"
    stat: ClassVar[Stat] = Stat.NONE
    paper: ClassVar[str] = "the magnitude baseline of the Wanda paper (per-matrix threshold)"

    def prepare(self, obs: Observation | None) -> None:
        return None

    def prune(self, weight: torch.Tensor, prepared: None, sparsity: float, nm: NM | None) -> Pruned:
        return Pruned(kernel.magnitude_mask(weight, sparsity, nm))
