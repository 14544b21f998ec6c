"""How far a pruned block or matrix is from the dense one on the calibration inputs.

Two measures, both relative to the dense model's own size so that blocks and matrices of any width
compare:
- a block's relative output error ||Y_pruned - Y_dense|| / ||Y_dense|| (Frobenius norms over every
  calibration token), accumulated one micro-batch at a time by `OutputError`;
- a matrix's layer-wise error ||X (W' - W)||^2 / ||X W||^2, the objective SparseGPT and ALPS
  minimise, from the calibration Hessian H = X^T X (up to a factor that cancels) by `layer_error`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Rows of a weight whose quadratic form is taken at once (64 MB of float32 at the widest).
_QUAD_ELEMENTS = 1 << 24


def relative_output_error(sq_diff: float, sq_dense: float) -> float:
    """||Y_pruned - Y_dense|| / ||Y_dense|| from the two sums of squares (0 when both are 0)."""
    if sq_dense <= 0:
        return 0.0 if sq_diff <= 0 else math.inf
    return math.sqrt(sq_diff / sq_dense)


@dataclass
class OutputError:
    """Sums of squares of (pruned - dense) and of dense block outputs, over the micro-batches added.

    float64 sums of each micro-batch's float64 sums: the total does not depend on the compute dtype,
    and shares summed in micro-batch order (ranks) give the single-process value.
    """

    sq_diff: float = 0.0
    sq_dense: float = 0.0

    def add(self, pruned: torch.Tensor, dense: torch.Tensor) -> None:
        """Fold in one micro-batch of the pruned and the dense block's outputs (same shape)."""
        p, d = pruned.detach().to(torch.float64), dense.detach().to(torch.float64)
        self.sq_diff += float(torch.sum((p - d) ** 2))
        self.sq_dense += float(torch.sum(d * d))

    def merge(self, other: "OutputError") -> None:
        """Add another share's sums (another rank's windows)."""
        self.sq_diff += other.sq_diff
        self.sq_dense += other.sq_dense

    @property
    def value(self) -> float:
        """The relative output error of the outputs added so far."""
        return relative_output_error(self.sq_diff, self.sq_dense)


def hessian_quad(h: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """a -> sum over rows of a_i H a_i^T (float64 total), for a symmetric H [in, in] and a [rows, in]."""
    return lambda a: float(torch.sum((a @ h) * a, dtype=torch.float64))


def factor_quad(upper: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """a -> sum over rows of a_i H a_i^T where H^-1 = U^T U (U upper triangular): ||a U^-1||^2."""
    def quad(a: torch.Tensor) -> float:
        x = torch.linalg.solve_triangular(upper, a, upper=True, left=False)
        return float(torch.sum(x * x, dtype=torch.float64))
    return quad


def layer_error(quad: Callable[[torch.Tensor], float], shift: torch.Tensor, w: torch.Tensor,
                w_new: torch.Tensor) -> float:
    """||X (W' - W)||^2 / ||X W||^2 for the dense `w` and pruned `w_new` [out, in] (float32).

    `quad` is a -> sum_i a_i H a_i^T for the H the method factored, whose diagonal exceeds the
    calibration's own by `shift` [in] (the dampening, and 1 on dead inputs): subtracted here, so the
    figure is the error on the calibration inputs themselves. Taken a slice of rows at a time: on a
    7B MLP matrix each weight-sized temporary is 180 MB.
    """
    shift64 = shift.to(torch.float64)
    step = max(1, _QUAD_ELEMENTS // max(1, w.shape[1]))
    dense = delta = 0.0
    for r in range(0, w.shape[0], step):
        a = w[r : r + step]
        e = w_new[r : r + step] - a
        dense += quad(a) - float(torch.sum((a * a).sum(0, dtype=torch.float64) * shift64))
        delta += quad(e) - float(torch.sum((e * e).sum(0, dtype=torch.float64) * shift64))
    return delta / dense if dense > 0 else 0.0
