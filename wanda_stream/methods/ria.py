"""RIA, Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models", ICLR 2024).

score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (||X_j||_2)^a, a = 0.5 by default (the
paper's). The same statistics as Wanda, so no extra pass. Selection as Wanda here: per output row for
unstructured sparsity, per group of M for N:M. (The paper's channel permutation for N:M is not done.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from wanda_stream.methods import kernel
from wanda_stream.errors import InputError
from wanda_stream.methods.base import NM, Method, Observation, Pruned, Stat

TINY = torch.finfo(torch.float32).tiny


def ria_score(weight: torch.Tensor, col_abs_sum: torch.Tensor, sq_sum: torch.Tensor, alpha: float) -> torch.Tensor:
    """RIA scores (float32) of some rows of a matrix, given the whole matrix's per-column sums of |W|.

    An all-zero row or column scores 0 (its relative terms are 0/0), rather than NaN.
    """
    a = weight.detach().to(torch.float32).abs()
    act = torch.sqrt(sq_sum.to(torch.float32)).pow(alpha)
    rel = a / col_abs_sum.clamp_min(TINY).reshape(1, -1) + a / a.sum(dim=1, keepdim=True).clamp_min(TINY)
    return rel.mul_(act.reshape(1, -1))


def ria_mask(weight: torch.Tensor, sq_sum: torch.Tensor, sparsity: float, nm: NM | None, alpha: float) -> torch.Tensor:
    """RIA mask of one linear weight [out, in]; rows are scored a slice at a time, as for Wanda."""
    col = weight.detach().to(torch.float32).abs().sum(dim=0)
    return kernel.row_rule_mask(weight, lambda rows: ria_score(rows, col, sq_sum, alpha), sparsity, nm)


@dataclass(frozen=True)
class Ria(Method[torch.Tensor]):
    """RIA with exponent `alpha` on the activation norm."""

    name: ClassVar[str] = "ria"
    stat: ClassVar[Stat] = Stat.SQ_SUM
    paper: ClassVar[str] = "Zhang et al., Plug-and-Play: An Efficient Post-training Pruning Method for LLMs, ICLR 2024"
    alpha: float = field(default=0.5, metadata={"flag": "--ria-alpha", "help": "exponent a of ||X_j||_2 in the RIA score"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha:
            raise InputError(f"--ria-alpha {self.alpha}: must be >= 0 (the paper uses 0.5)")

    def prepare(self, obs: Observation | None) -> torch.Tensor:
        assert obs is not None
        return obs.stat

    def prune(self, weight: torch.Tensor, prepared: torch.Tensor, sparsity: float, nm: NM | None) -> Pruned:
        return Pruned(ria_mask(weight, prepared, sparsity, nm, self.alpha))
