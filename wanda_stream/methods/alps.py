"""ALPS (Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning
for Large Language Models", NeurIPS 2024).

The layer-wise problem SparseGPT solves approximately, min ||X W' - X W||^2 over W' of the wanted
sparsity pattern, solved by ADMM on the splitting W' = D (D in the pattern), then a conjugate-gradient
solve of the kept weights on the support ADMM chose.

Preparation (shared by the matrices reading one input): H = 2 X^T X / n as SparseGPT builds it
(`kernel.hessian`: dead inputs H_jj = 1, their weights zeroed), dampened by a fraction of its mean
diagonal, scaled to a unit diagonal (H_n = S^-1 H S^-1, S = diag(sqrt(H_jj))), and its
eigendecomposition H_n = Q diag(L) Q^T, from which (H_n + rho I)^-1 = Q diag(1 / (L + rho)) Q^T is
rebuilt whenever rho changes, without another factorization. Weights are worked in the scaled
coordinates B = W S, where the projection's |B_ij| = |W_ij| * sqrt(H_jj) is Wanda's score.

Per matrix, with Y = B0 H_n (B0 the dense scaled weights), from D = the projection of B0, V = 0:
  B = (Y - V + rho D) (H_n + rho I)^-1     the least-squares step, penalised towards D
  D = projection of B + V / rho            top-k of the whole matrix, or the N largest of every M inputs
  V = V + rho (B - D)                      the scaled dual update
Every `UPDATE_EVERY` iterations rho grows with how much the support changed since the last check
(by 1.3x when over 10% of the kept entries changed, 1.2x over 0.5%, 1.1x when any did); a support
that did not change before rho ever grew divides rho by 5 (with any change, ADMM also restarts from
B0). ADMM stops when the support no longer changes once rho has grown, after `max_iter` iterations,
or, from iteration SWITCH_ITER on, when under STOP_CHANGE of the kept entries changed. The last B is
projected, and the kept weights are refit on that support by conjugate gradients on
H_n B_S = Y_S, one system per output row (on the unit-diagonal H_n plain CG is Jacobi-preconditioned
CG on H), starting from the projected B.

An H whose smallest eigenvalue is not positive (rounding on a dead direction) is retried with ten
times the dampening, up to DAMPENING_TRIES times; the dampening used is reported.
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
UPDATE_EVERY = 3  # ADMM iterations between rho updates
SWITCH_ITER = 30  # from this iteration on, a nearly fixed support ends ADMM
STOP_CHANGE = 3e-4  # ... when fewer than this fraction of the kept entries changed
RHO_MAX = 1e6
# rho's growth by the fraction of kept entries whose membership changed since the last update.
RHO_STEPS = ((0.1, 1.3), (0.005, 1.2))
RHO_SLOW = 1.1  # any other change, once rho has grown
RHO_SHRINK = 5.0  # before rho has grown: a support that barely moves means rho started too large
CG_RTOL = 1e-4


@dataclass
class Eigen:
    """What every matrix reading one input shares: the scaled H_n, its eigendecomposition, S and the dead inputs.

    `shift` [in] is how far H_n's diagonal exceeds the calibration's own in the scaled coordinates
    (dampening, and 1 on dead inputs), for the layer-wise error.
    """

    h: torch.Tensor
    vectors: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor
    dead: torch.Tensor
    dampening: float
    shift: torch.Tensor

    def inverse(self, rho: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """(H_n + rho I)^-1 from the eigendecomposition (into `out` when given)."""
        return torch.matmul(self.vectors * (1.0 / (self.values + rho)), self.vectors.t(), out=out)


def scaled_hessian(gram: torch.Tensor, tokens: int, dampening: float) -> Eigen:
    """H_n and its eigendecomposition from the float32 Gram matrix X^T X (its upper triangle; scaled in place).

    Raises the dampening tenfold while the dampened H has an eigenvalue at or below zero.
    """
    h, dead = kernel.hessian(gram, tokens)
    diag = torch.arange(h.shape[0], device=h.device)
    base = torch.diagonal(h).clone()
    mean = float(base.mean())
    frac = dampening
    for _ in range(DAMPENING_TRIES):
        h[diag, diag] = base + frac * mean
        scale = torch.sqrt(torch.diagonal(h)).clone()
        hn = h / scale.reshape(-1, 1) / scale.reshape(1, -1)
        values, vectors = torch.linalg.eigh(hn)
        if float(values.min()) > 0 and bool(torch.isfinite(values).all()):
            shift = (dead.to(torch.float32) + frac * mean) / scale ** 2
            return Eigen(hn, vectors, values, scale, dead, frac, shift)
        frac *= 10.0
    raise InputError(f"ALPS: the calibration Hessian ({h.shape[0]} inputs) is not positive definite even "
                     f"with dampening {frac / 10:g}; use more calibration tokens (--nsamples) or a larger "
                     f"--alps-dampening")


def project(b: torch.Tensor, sparsity: float, nm: NM | None) -> torch.Tensor:
    """The mask (True = removed) of the projection onto the pattern: the lowest |b| of the whole matrix, or N:M per row."""
    score = b.abs()
    return kernel.nm_mask(score, nm) if nm else kernel.matrix_mask(score, sparsity)


@dataclass
class Admm:
    """ADMM's options: the initial penalty and the iteration cap."""

    rho: float
    max_iter: int


def admm_support(b0: torch.Tensor, y: torch.Tensor, eig: Eigen, sparsity: float, nm: NM | None,
                 opts: Admm) -> tuple[torch.Tensor, int, float]:
    """ADMM on the scaled problem; returns (the last least-squares iterate B, iterations run, final rho)."""
    mask = project(b0, sparsity, nm)
    kept = max(1, mask.numel() - int(torch.count_nonzero(mask)))
    d = b0.masked_fill(mask, 0)
    v = torch.zeros_like(b0)
    b = b0.clone()
    rho, grown, seen = opts.rho, False, mask
    inv = eig.inverse(rho)
    it = 0
    for it in range(opts.max_iter):
        # In place where it can be: on a CPU the element-wise passes cost as much as the product.
        torch.matmul(d.mul_(rho).add_(y).sub_(v), inv, out=b)
        d = torch.add(b, v, alpha=1 / rho)
        mask = project(d, sparsity, nm)
        d.masked_fill_(mask, 0)
        v.add_(b, alpha=rho).sub_(d, alpha=rho)
        if (it + 1) % UPDATE_EVERY:
            continue
        change = int(torch.count_nonzero(mask ^ seen))
        seen = mask
        frac = change / kept
        step = next((f for limit, f in RHO_STEPS if frac > limit), None)
        if step is not None:
            rho, grown = rho * step, True
        elif change and grown:
            rho *= RHO_SLOW
        elif grown:
            break  # the support no longer moves
        else:
            rho /= RHO_SHRINK
            if change:
                b.copy_(b0)
                d = b0.masked_fill(project(b0, sparsity, nm), 0)
                v.zero_()
        rho = min(rho, RHO_MAX)
        eig.inverse(rho, out=inv)
        if it >= SWITCH_ITER and frac < STOP_CHANGE:
            break
    return b, it + 1, rho


def refit_on_support(h: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, b: torch.Tensor,
                     steps: int) -> torch.Tensor:
    """Conjugate gradients on H b_S = y_S for every row of `b` (in place), entries off `keep` held at zero."""
    r = (y - b @ h).mul_(keep)
    p = r.clone()
    rr = (r * r).sum(dim=1, keepdim=True)
    target = CG_RTOL ** 2 * (y * y * keep).sum(dim=1, keepdim=True)
    for _ in range(steps):
        if bool((rr <= target).all()):
            break
        hp = (p @ h).mul_(keep)
        php = (p * hp).sum(dim=1, keepdim=True)
        alpha = rr / torch.where(php > 0, php, torch.ones_like(php))
        b.addcmul_(alpha, p)
        r.addcmul_(alpha, hp, value=-1)
        rr_new = (r * r).sum(dim=1, keepdim=True)
        beta = rr_new / torch.where(rr > 0, rr, torch.ones_like(rr))
        p.mul_(beta).add_(r)
        rr = rr_new
    return b


def alps_prune(weight: torch.Tensor, eig: Eigen, sparsity: float, nm: NM | None, opts: Admm,
               cg_steps: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The pruned float32 weight [out, in], its mask (True = removed) and what the report records."""
    w = weight.detach().to(torch.float32, copy=True)
    w[:, eig.dead] = 0
    b0 = w.mul_(eig.scale.reshape(1, -1))
    y = b0 @ eig.h
    b, iters, rho = admm_support(b0, y, eig, sparsity, nm, opts)
    mask = project(b, sparsity, nm)
    b.masked_fill_(mask, 0)
    refit_on_support(eig.h, y, (~mask).to(b.dtype), b, cg_steps)
    b.masked_fill_(mask, 0)
    dense = weight.detach().to(torch.float32) * eig.scale.reshape(1, -1)
    error = fidelity.layer_error(fidelity.hessian_quad(eig.h), eig.shift, dense, b)
    info = {"dampening": eig.dampening, "admm_iters": iters, "rho": rho, "layer_error": error}
    return b.div_(eig.scale.reshape(1, -1)), mask, info


@dataclass(frozen=True)
class Alps(Method[Eigen]):
    """ALPS with the paper's defaults: rho starting at 0.1, at most 300 ADMM iterations, 10 CG steps, 1% dampening."""

    name: ClassVar[str] = "alps"
    stat: ClassVar[Stat] = Stat.GRAM
    paper: ClassVar[str] = ("Meng, Behdin, Wang & Mazumder, ALPS: Improved Optimization for Highly Sparse One-Shot "
                            "Pruning for Large Language Models, NeurIPS 2024")
    dampening: float = field(default=0.01, metadata={
        "flag": "--alps-dampening", "help": "ALPS: dampening, a fraction of the Hessian's mean diagonal"})
    rho: float = field(default=0.1, metadata={
        "flag": "--alps-rho", "help": "ALPS: ADMM's initial penalty rho (on the unit-diagonal Hessian)"})
    max_iter: int = field(default=300, metadata={
        "flag": "--alps-max-iter", "help": "ALPS: at most this many ADMM iterations per matrix"})
    cg_steps: int = field(default=10, metadata={
        "flag": "--alps-cg-steps", "help": "ALPS: conjugate-gradient steps refitting the kept weights"})

    def __post_init__(self) -> None:
        if not self.dampening > 0:
            raise InputError(f"--alps-dampening {self.dampening}: must be > 0 (the paper uses 0.01)")
        if not self.rho > 0:
            raise InputError(f"--alps-rho {self.rho}: must be > 0 (the paper uses 0.1)")
        if self.max_iter < 0 or self.cg_steps < 0:
            raise InputError(f"--alps-max-iter {self.max_iter} / --alps-cg-steps {self.cg_steps}: must be >= 0 "
                             f"(the paper uses 300 and 10)")

    def prepare(self, obs: Observation | None) -> Eigen:
        assert obs is not None
        eig = scaled_hessian(obs.stat, obs.tokens, self.dampening)
        obs.stat = obs.stat.new_empty(0)  # consumed: H_n holds what is needed
        return eig

    def prune(self, weight: torch.Tensor, prepared: Eigen, sparsity: float, nm: NM | None) -> Pruned:
        w, mask, info = alps_prune(weight, prepared, sparsity, nm, Admm(self.rho, self.max_iter), self.cg_steps)
        return Pruned(mask, w, info)
