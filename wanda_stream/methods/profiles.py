"""Layer-wise sparsity profiles: how the target sparsity is spread over the decoder blocks.

`uniform` gives every block the target. `owl` is OWL (Yin et al., "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024), as its
reference code computes it: on the dense model, a block's outlier ratio is the share (in percent)
of the Wanda scores |W_ij| * ||X_j||_2 of all its prunable matrices together that exceed M times
their mean; the ratios are min-max scaled to [0, 2 lambda] and shifted so that the blocks' keep
ratios (1 - sparsity) average 1 - target. Defaults M = 5, lambda = 0.08 (the paper's for LLaMA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from wanda_stream.methods import kernel
from wanda_stream.errors import InputError

PROFILES = ("uniform", "owl")
OWL_PAPER = "Yin et al., Outlier Weighed Layerwise Sparsity (OWL), ICML 2024"


@dataclass(frozen=True)
class Owl:
    """OWL's two hyperparameters."""

    m: float = field(default=5.0, metadata={"flag": "--owl-m", "help": "OWL: outliers are scores above M x mean"})
    lmbda: float = field(default=0.08, metadata={
        "flag": "--owl-lambda", "help": "OWL: blocks' sparsities span at most 2 x lambda around the target"})

    def check(self, sparsity: float, nm: tuple[int, int] | None) -> None:
        """Refuse before any work what the allocation could not honour."""
        if nm is not None:
            raise InputError("--sparsity-profile owl: gives blocks different sparsities, which an N:M --pattern "
                             "cannot express; use --pattern unstructured")
        if self.m <= 0:
            raise InputError(f"--owl-m {self.m}: must be > 0 (the paper uses 5)")
        if not 0 <= self.lmbda:
            raise InputError(f"--owl-lambda {self.lmbda}: must be >= 0 (the paper uses 0.08)")
        # A block's sparsity lies within 2 lambda of the target, whatever the ratios.
        if not 0 < sparsity - 2 * self.lmbda or not sparsity + 2 * self.lmbda < 1:
            raise InputError(f"--owl-lambda {self.lmbda}: --sparsity {sparsity} +- 2 x lambda must stay within "
                             f"(0, 1); use a lambda below {min(sparsity, 1 - sparsity) / 2:.3f}")


def outlier_ratio(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], m: float) -> float:
    """Percent of the Wanda scores of all (weight, sq_sum) pairs together above m times their mean.

    Scores are computed a slice of rows at a time, twice (mean, then count): a 7B block's scores
    together would take 800 MB.
    """
    pairs = list(pairs)
    total, count = score_sums(pairs)
    return 100.0 * count_above(pairs, m * total / max(count, 1)) / max(count, 1)


def score_sums(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """The sum and number of the Wanda scores of (weight, sq_sum) pairs: the first of outlier_ratio's passes,
    which a block streamed in parts makes a part at a time."""
    total, count = 0.0, 0
    for w, sq in pairs:
        for score in _score_slices(w, sq):
            total += float(score.sum(dtype=torch.float64))
            count += score.numel()
    return total, count


def count_above(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], threshold: float) -> int:
    """How many Wanda scores of (weight, sq_sum) pairs are above `threshold`: outlier_ratio's second pass."""
    return sum(int((score > threshold).sum()) for w, sq in pairs for score in _score_slices(w, sq))


def _score_slices(w: torch.Tensor, sq: torch.Tensor) -> Iterable[torch.Tensor]:
    for rows in kernel.row_slices(w):
        yield kernel.wanda_score(w[rows], sq)


def owl_sparsities(ratios: list[float], sparsity: float, lmbda: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (more outliers, fewer weights removed)."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:  # nothing tells the blocks apart
        return [sparsity] * len(ratios)
    scaled = [(r - lo) * (1 / (hi - lo) * lmbda * 2) for r in ratios]  # the reference code's order
    mean = sum(scaled) / len(scaled)
    return [1.0 - (x - mean + (1.0 - sparsity)) for x in scaled]
