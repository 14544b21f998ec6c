"""Structural plans as pure tensor math: which blocks, FFN channels and attention heads to remove, and the
least-squares refit of the matrix that reads what remains.

Nothing here touches files, modules or ranks: statistics and weights in, indices and weights out. Every
selection is a stable sort (ties keep the lower index), so equal inputs give equal plans.

- Blocks: ShortGPT's block influence (Men et al. 2024), BI_i = 1 - mean cos(h_in, h_out) over the
  calibration tokens, the N lowest removed; or Gromov et al. (2024)'s angular distance
  d(h_l, h_{l+N}) = arccos(cos) / pi, the N contiguous blocks from the l where it is smallest.
- FFN channels and attention heads: Wanda-sp's structured score (An et al. 2024, FLAP's baseline),
  channel j scores ||a_j||_2 * ||W_out[:, j]||_2, a head the sum over its columns; the lowest removed.
- Experts: REAP (Lasby et al. 2025), S_j = the mean over the calibration tokens routed to expert j of
  g_j(x) ||f_j(x)||_2 (its router weight times its output's norm), the lowest removed; ties remove the
  higher index, and a group-limited router loses as many experts in every group.
- Refit (the consuming matrix, down_proj or o_proj): W' = W G[:, K] G[K, K]^-1, the least-squares fit of the
  dense outputs X W^T from the kept inputs X_K, G = X^T X dampened as SparseGPT dampens its Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from wanda_stream.methods import kernel

REFIT_DAMPENING = 0.01  # fraction of G[K, K]'s mean diagonal, as SparseGPT's default
DAMPENING_TRIES = 5


def _window_cosines(a: torch.Tensor, b: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per window of a, b [windows, seqlen, hidden], cos(a_t, b_t) of its tokens in float64.

    float64, one window at a time: the angle of nearly parallel states (the blocks worth removing) is
    arccos of a cosine near 1, where float32's rounding alone moves it by 1e-4.
    """
    for u, v in zip(a, b):
        yield torch.nn.functional.cosine_similarity(u.double(), v.double(), dim=-1, eps=1e-12)


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per window, the float64 sum over its tokens of cos(a_t, b_t) (a, b: [windows, seqlen, hidden]).

    Per window, not per micro-batch, so that totals do not depend on how windows were batched or shared
    out over ranks: they are added in window order afterwards.
    """
    return torch.stack([c.sum() for c in _window_cosines(a, b)])


def token_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per window, the float64 sum over its tokens of the angular distance arccos(cos(a_t, b_t)) / pi."""
    return torch.stack([(torch.arccos(c.clamp(-1.0, 1.0)) / math.pi).sum() for c in _window_cosines(a, b)])


def lowest(scores: list[float] | torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores (stable: the lower index first on ties), ascending."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    order = torch.sort(s, stable=True).indices[:k]
    return sorted(int(i) for i in order)


def blocks_by_influence(influence: list[float], n: int) -> list[int]:
    """ShortGPT: the n blocks of lowest block influence."""
    return lowest(influence, n)


def blocks_by_angle(angles: list[float], n: int) -> list[int]:
    """Gromov et al.: angles[l] is d(h_l, h_{l+n}); the n contiguous blocks from the smallest (first on ties)."""
    start = lowest(angles, 1)[0]
    return list(range(start, start + n))


def reap_saliency(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """REAP's S_j: the summed weighted output norms over the tokens routed to expert j, over their count
    (float64; 0 for an expert no token was routed to)."""
    c = counts.to(torch.float64)
    return torch.where(c > 0, sums.double() / c.clamp(min=1), torch.zeros_like(c))


def experts_to_drop(saliency: torch.Tensor, n_drop: int, groups: int = 1) -> list[int]:
    """The n_drop experts of lowest saliency, n_drop / groups from each of the contiguous expert groups of a
    group-limited router; on ties the higher index goes first. Ascending."""
    n = saliency.shape[0]
    size, per = n // groups, n_drop // groups
    out: list[int] = []
    for g in range(groups):
        s = saliency[g * size:(g + 1) * size].double()
        # Descending index order first, then a stable sort: equal saliencies leave the highest index first.
        order = torch.sort(s.flip(0), stable=True).indices[:per]
        out += [g * size + size - 1 - int(i) for i in order]
    return sorted(out)


def channel_scores(sq_sum: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Wanda-sp's score of each input channel j of `w_out` [out, in]: ||a_j||_2 * ||W_out[:, j]||_2 (float64),
    on the device of `sq_sum` (the statistics: the compute device; `w_out` is the stored, host tensor)."""
    return torch.sqrt(sq_sum.double()) * torch.linalg.vector_norm(w_out.to(sq_sum.device).double(), dim=0)


def kept(width: int, removed: list[int]) -> torch.Tensor:
    """The indices 0..width-1 not in `removed`, ascending (int64)."""
    keep = torch.ones(width, dtype=torch.bool)
    keep[torch.as_tensor(removed, dtype=torch.int64)] = False
    return torch.nonzero(keep).flatten()


@dataclass(frozen=True)
class HeadPlan:
    """Query heads and key/value heads to remove from one attention block (ascending indices)."""

    q_removed: list[int]
    kv_removed: list[int]


def head_counts(n_heads: int, n_kv: int, n_drop: int) -> tuple[int, int]:
    """(query heads removed per KV group, whole KV groups removed) for removing n_drop query heads.

    Query heads go within every KV group alike when n_drop is a multiple of the number of groups (and
    leaves each group a head); else whole groups (a query head with its key/value head when n_kv == n_heads)
    when n_drop is a multiple of the group size. Raises ValueError when neither keeps the heads a multiple
    of the KV heads.
    """
    group = n_heads // n_kv
    if n_drop % n_kv == 0 and n_drop // n_kv < group:
        return n_drop // n_kv, 0
    if n_drop % group == 0 and n_drop // group < n_kv:
        return 0, n_drop // group
    raise ValueError(f"removing {n_drop} of {n_heads} query heads leaves them no multiple of the {n_kv} key/value "
                     f"heads: remove a multiple of {n_kv} (fewer than {n_heads}) within the groups, or a multiple "
                     f"of {group} as whole groups")


def plan_heads(head_scores: torch.Tensor, n_kv: int, n_drop: int) -> HeadPlan:
    """The heads to remove given each query head's score (heads of KV group g are g*group .. g*group+group-1)."""
    n_heads = head_scores.shape[0]
    group = n_heads // n_kv
    per_group, whole = head_counts(n_heads, n_kv, n_drop)
    by_group = head_scores.double().reshape(n_kv, group)
    if whole:
        groups = lowest(by_group.sum(dim=1), whole)
        return HeadPlan([g * group + h for g in groups for h in range(group)], groups)
    return HeadPlan([g * group + h for g in range(n_kv) for h in lowest(by_group[g], per_group)], [])


def head_scores(sq_sum: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Each query head's score: the sum of its o_proj input channels' Wanda-sp scores (float64)."""
    return channel_scores(sq_sum, w_o).reshape(n_heads, -1).sum(dim=1)


def head_rows(heads: list[int], head_dim: int) -> list[int]:
    """The rows (of q/k/v) or columns (of o_proj) that heads occupy."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


@dataclass
class Refit:
    """The consuming matrix on its kept inputs, and the layer errors ||X_K W'^T - X W^T||^2 / ||X W^T||^2 of
    that matrix and of the kept columns left as they were."""

    weight: torch.Tensor  # [out, |K|], float32
    dampening: float | None  # None: kept as it was (--no-refit)
    error: float
    error_as_is: float


@dataclass
class InputStats:
    """What a plan knows of the inputs of a matrix that reads removed channels: float64 sums of squares per
    input, and the Gram matrix X^T X (upper triangle, kernel.add_gram) when it is refit."""

    sq_sum: torch.Tensor
    gram: torch.Tensor | None = None


def fit_consumer(w: torch.Tensor, stats: InputStats, keep: torch.Tensor, refit: bool = True,
                 dampening: float = REFIT_DAMPENING) -> Refit:
    """W' = W G[:, K] (G[K, K] + damp)^-1, the least-squares fit of the dense outputs from the kept inputs
    (or W[:, K] as it is), with both layer errors.

    `stats.gram` is consumed: symmetrized in place, taken out of `stats` and freed once its kept block is
    copied, so that it is not alive beside the solve. The work and the returned weight are on the Gram
    matrix's device (the compute device), whatever the device of `w` (the stored tensor, on the host).
    Inputs no token touched (G_jj = 0) get G_jj = 1, as SparseGPT treats them; the dampening is raised
    tenfold while G[K, K] does not factor. float32 with a few weight-sized buffers, the Gram matrix and
    its kept block (a 7B MLP: 0.5 GB + 0.3 GB): the errors come from traces, never from X.
    """
    assert stats.gram is not None
    g, stats.gram = kernel.symmetrize(stats.gram), None
    dead = torch.diagonal(g) == 0
    torch.diagonal(g).masked_fill_(dead, 1.0)  # in place, through the view; no index list (a host sync on a GPU)
    k = keep.to(g.device)
    wf = w.to(device=g.device, dtype=torch.float32)  # the stored weight is on the host, the Gram matrix on the GPU
    wg = wf @ g  # [out, in]
    dense = float(torch.sum(wg * wf, dtype=torch.float64))
    rhs = wg[:, k]
    del wg
    gkk = g[k.unsqueeze(1), k.unsqueeze(0)]
    del g
    base = torch.diagonal(gkk).clone()
    mean, frac = float(base.mean()), dampening
    low = torch.empty_like(gkk)
    for _ in range(DAMPENING_TRIES):
        low.copy_(gkk).diagonal().copy_(base + frac * mean)
        info = torch.empty((), dtype=torch.int32, device=low.device)
        torch.linalg.cholesky_ex(low, out=(low, info))
        if int(info) == 0:
            break
        frac *= 10.0
    else:
        raise ValueError(f"the Gram matrix of the kept {k.numel()} inputs does not factor even with dampening "
                         f"{frac / 10:g}; use more calibration tokens (--nsamples)")
    del gkk
    lam = frac * mean

    def error(v: torch.Tensor) -> float:
        # ||X_K v^T - X W^T||^2 = tr(v G_KK v^T) - 2 tr(v rhs^T) + tr(W G W^T), G_KK = L L^T - lam I
        vl = v @ low
        quad = float(torch.sum(vl * vl, dtype=torch.float64)) - lam * float(torch.sum(v * v, dtype=torch.float64))
        return max(quad - 2 * float(torch.sum(v * rhs, dtype=torch.float64)) + dense, 0.0) / dense if dense > 0 else 0.0

    as_is = wf[:, k]
    err_as_is = error(as_is)
    if not refit:
        return Refit(as_is, None, err_as_is, err_as_is)
    new = torch.cholesky_solve(rhs.t(), low).t().contiguous()  # W' G_KK = rhs, G_KK symmetric
    return Refit(new, frac, error(new), err_as_is)
