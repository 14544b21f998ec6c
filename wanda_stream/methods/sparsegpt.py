"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023), as its reference code and llm-compressor's SparseGPTModifier define it.

Hessian H = 2 X^T X / n (n calibration tokens; the scale cancels) accumulated in float32 from the
dense block's inputs; inputs no token ever touched ("dead", H_jj = 0) get H_jj = 1 and their weights
zeroed; dampening of a fraction of the mean diagonal; U = the upper Cholesky factor of H^-1. Columns
are processed in blocks of `block_size`: unstructured, the block's mask removes the entries with
w^2 / U_jj^2 at or below the int(rows * cols * s)-th lowest of the block (the adaptive mask); N:M,
the N lowest of every M columns per row, chosen as the column loop reaches the group. Every column's
error is spread over the columns after it through U (the OBS update), within the block one column
at a time (vectorized over rows), then to the rest of the matrix in one product.

A Hessian that is not positive definite (a dead direction, too few calibration tokens) is retried
with ten times the dampening, up to DAMPENING_TRIES times; the dampening used is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from wanda_stream.methods import fidelity
from wanda_stream.methods import kernel
from wanda_stream.errors import InputError
from wanda_stream.methods.base import NM, Method, Observation, Pruned, Stat

DAMPENING_TRIES = 5


@dataclass
class HessianInverse:
    """What every matrix reading one input shares: U (upper Cholesky of H^-1) and the dead inputs.

    `shift` [in] is how far the factored H's diagonal exceeds the calibration's (the dampening, and 1
    on dead inputs), for the layer-wise error.
    """

    upper: torch.Tensor
    dead: torch.Tensor
    dampening: float
    shift: torch.Tensor


def inverse_hessian(gram: torch.Tensor, tokens: int, dampening: float) -> HessianInverse:
    """U, the upper Cholesky factor of (2 X^T X / n + damp I)^-1, from the float32 Gram matrix X^T X
    (its upper triangle is read, as `kernel.add_gram` accumulates it).

    Scales `gram` in place. Raises the dampening tenfold while a factorization fails.
    """
    h, dead = kernel.hessian(gram, tokens)
    diag = torch.arange(h.shape[0], device=h.device)
    base = torch.diagonal(h).clone()
    mean = float(base.mean())
    frac = dampening
    for _ in range(DAMPENING_TRIES):
        h[diag, diag] = base + frac * mean
        u = _upper_inverse_factor(h)
        if u is not None:
            return HessianInverse(u, dead, frac, dead.to(torch.float32) + frac * mean)
        frac *= 10.0
    raise InputError(f"SparseGPT: the calibration Hessian ({h.shape[0]} inputs) is not positive definite even "
                     f"with dampening {frac / 10:g}; use more calibration tokens (--nsamples) or a larger --dampening")


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    """chol(h^-1) as an upper factor, in one buffer beside `h` (kept for a retry): on a 7B MLP input
    each n x n buffer is 0.5 GB."""
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    torch.cholesky_inverse(low, out=low)
    info = torch.empty((), dtype=torch.int32, device=low.device)
    torch.linalg.cholesky_ex(low, upper=True, out=(low, info))
    if int(info) != 0 or not kernel.all_finite(low):
        return None
    return low


def sparsegpt_prune(weight: torch.Tensor, hinv: HessianInverse, sparsity: float, nm: NM | None,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned float32 weight and its mask (True = removed) of one matrix [out, in]."""
    # Worked on transposed ([in, out]): the column loop then updates contiguous rows, which on a
    # CPU is several times faster than strided columns.
    wt = weight.detach().t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    wt[hinv.dead] = 0
    u = hinv.upper
    cols = wt.shape[0]
    maskt = torch.zeros_like(wt, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1).reshape(-1, 1)
        err1 = torch.zeros_like(w1)
        mask1 = _block_mask(w1, d1, sparsity) if nm is None else torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = w1[i : i + nm[1]] ** 2 / d1[i : i + nm[1]] ** 2
                mask1.scatter_(0, i + torch.topk(tmp, nm[0], dim=0, largest=False).indices, True)
            col = w1[i]
            e = (col - col.masked_fill(mask1[i], 0)) / u1[i, i]
            # The OBS update of the columns from i on; column i itself becomes its pruned value.
            w1[i:].addr_(u1[i, i:], e, alpha=-1)
            err1[i] = e
        w1.masked_fill_(mask1, 0)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)
        maskt[i1:i2] = mask1
    return wt.t(), maskt.t()  # views: the caller copies them into the stored weight


def _block_mask(w1: torch.Tensor, d1: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The adaptive mask of a column block: w^2 / U_jj^2 at or below its int(numel * s)-th lowest value."""
    tmp = w1 ** 2 / d1 ** 2
    k = int(tmp.numel() * sparsity)
    # The (k+1)-th smallest value is what a full sort puts at index k, found by selection: on a
    # CPU about 9x faster than sorting, and the same value, so the same mask.
    thresh = torch.kthvalue(tmp.flatten(), k + 1).values
    return tmp <= thresh


@dataclass(frozen=True)
class SparseGPT(Method[HessianInverse]):
    """SparseGPT with the paper's defaults: 1% dampening, column blocks of 128."""

    name: ClassVar[str] = "sparsegpt"
    stat: ClassVar[Stat] = Stat.GRAM
    paper: ClassVar[str] = "Frantar & Alistarh, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot, ICML 2023"
    dampening: float = field(default=0.01, metadata={
        "flag": "--dampening", "help": "SparseGPT: dampening, a fraction of the Hessian's mean diagonal"})
    block_size: int = field(default=128, metadata={
        "flag": "--block-size", "help": "SparseGPT: columns per block of the adaptive mask and lazy update"})

    def __post_init__(self) -> None:
        if not self.dampening > 0:
            raise InputError(f"--dampening {self.dampening}: must be > 0 (the paper uses 0.01)")
        if self.block_size <= 0:
            raise InputError(f"--block-size {self.block_size}: must be a positive integer (the paper uses 128)")

    def check(self, nm: NM | None) -> None:
        if nm is not None and self.block_size % nm[1]:
            raise InputError(f"--block-size {self.block_size}: must be a multiple of M={nm[1]} for {nm[0]}:{nm[1]}")

    def prepare(self, obs: Observation | None) -> HessianInverse:
        assert obs is not None
        hinv = inverse_hessian(obs.stat, obs.tokens, self.dampening)
        obs.stat = obs.stat.new_empty(0)  # consumed: the Gram matrix is freed as soon as it is factored
        return hinv

    def prune(self, weight: torch.Tensor, prepared: HessianInverse, sparsity: float, nm: NM | None) -> Pruned:
        w, mask = sparsegpt_prune(weight, prepared, sparsity, nm, self.block_size)
        error = fidelity.layer_error(fidelity.factor_quad(prepared.upper), prepared.shift,
                                     weight.detach().to(torch.float32), w)
        return Pruned(mask, w, {"dampening": prepared.dampening, "layer_error": error})
