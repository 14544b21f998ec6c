"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024): score |W_ij| * ||X_j||_2, the lowest removed per output row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from wanda_stream.methods import kernel
from wanda_stream.methods.base import NM, Method, Observation, Pruned, Stat


@dataclass(frozen=True)
class Wanda(Method[torch.Tensor]):
    """Per row: floor(in * s) lowest scores removed (stable); N:M: the N lowest of every M inputs."""

    name: ClassVar[str] = "wanda"
    stat: ClassVar[Stat] = Stat.SQ_SUM
    paper: ClassVar[str] = "Sun et al., A Simple and Effective Pruning Approach for LLMs, ICLR 2024"

    def prepare(self, obs: Observation | None) -> torch.Tensor:
        assert obs is not None
        return obs.stat

    def prune(self, weight: torch.Tensor, prepared: torch.Tensor, sparsity: float, nm: NM | None) -> Pruned:
        return Pruned(kernel.wanda_mask(weight, prepared, sparsity, nm))
