"""Pure tensor functions of the method: statistics, scores and masks.

Nothing here touches files, modules or devices beyond the tensors it is given.
A mask is a bool tensor shaped like the weight; True marks a weight to remove.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

NM = tuple[int, int]
# Scores are computed this many at a time (64 MB of float32); see row_slices.
SCORE_CHUNK_ELEMENTS = 1 << 24


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of `t` is finite, checked SCORE_CHUNK_ELEMENTS at a time.

    Whole, `torch.isfinite` of a float tensor makes its absolute value and two bool tensors: for the
    28672 x 28672 float32 Gram matrix of a 70B block's down_proj input (3.3 GB) that is 5.7 GB of
    temporaries, the largest allocation of a 70B SparseGPT block.
    """
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[s : s + SCORE_CHUNK_ELEMENTS]).all())
               for s in range(0, flat.numel(), SCORE_CHUNK_ELEMENTS))


def column_sq_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all tokens of x**2 per input feature, in float64 (x: [..., in]).

    float64: the sum over 2^18 tokens must not depend on how they were batched. The squares are
    exact in float64 for every input dtype; they are made SCORE_CHUNK_ELEMENTS at a time (128 MB),
    not for the whole input: an 8 x 2048 micro-batch of a 28672-wide input would otherwise take a
    7.5 GB float64 copy and its square on the GPU, beyond the activation budget. A micro-batch of at
    most that many elements gets the very bits of one whole-input sum; a larger one sums its chunks'
    float64 sums in order (a fixed order for a given micro-batch shape, so resumed and multi-rank
    runs still agree bit for bit).
    """
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    total = rows[:step].to(torch.float64, copy=True).square_().sum(dim=0)
    for r in range(step, rows.shape[0], step):
        total += rows[r : r + step].to(torch.float64, copy=True).square_().sum(dim=0)
    return total


def gram_tile(width: int) -> int:
    """Rows per tile of the Gram matrix's upper triangle: wider tiles for wide inputs, where they run faster."""
    return 512 if width >= 4096 else 128


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += X^T X in float32 for the inputs x [..., in] (the SparseGPT Hessian, up to a factor),
    on and above the diagonal only; `symmetrize` fills in the rest once all inputs are added.

    The matrix is symmetric, so a band of tile rows from the diagonal on does all the work: 55-65%
    of the full product's time, the largest single cost of a SparseGPT run after the forward passes.
    """
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    tile = gram_tile(gram.shape[0])
    for i in range(0, gram.shape[0], tile):
        gram[i : i + tile, i:].addmm_(rows[:, i : i + tile].t(), rows[:, i:])


def symmetrize(gram: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of the square `gram` onto its lower one, in place, a band of tile columns at a time."""
    tile = gram_tile(gram.shape[0])
    for i in range(0, gram.shape[0], tile):
        gram[i + tile :, i : i + tile].copy_(gram[i : i + tile, i + tile :].t())
    return gram


def hessian(gram: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H = 2 X^T X / n from the float32 Gram matrix's upper triangle (in place), and its dead inputs.

    A dead input (H_jj = 0: no calibration token touched it) gets H_jj = 1, so that H can be
    dampened and factored; the methods zero its weights, which no input can reach.
    """
    h = symmetrize(gram).mul_(2.0 / max(tokens, 1))
    diag = torch.arange(h.shape[0], device=h.device)
    dead = torch.diagonal(h) == 0
    h[diag[dead], diag[dead]] = 1.0
    return h, dead


def wanda_score(weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in float32; `sq_sum` is the per-column sum of squares of the inputs."""
    norm = torch.sqrt(sq_sum.to(torch.float32))
    # One float32 matrix, modified in place: on a 7B MLP matrix each temporary is 180 MB.
    score = weight.detach().to(torch.float32, copy=True)
    return score.abs_().mul_(norm.reshape(1, -1))


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the floor(in * sparsity) lowest scores of every row (stable: lower index first on ties)."""
    rows, cols = score.shape
    k = int(cols * sparsity)
    if k == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    return _lowest_k(score, k)


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the floor(numel * sparsity) lowest scores of the whole matrix (stable)."""
    flat = score.reshape(1, -1)
    k = int(flat.numel() * sparsity)
    if k == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return _lowest_k(flat, k).reshape(score.shape)


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest scores of every row, ties going to the lower index (as a stable sort would).

    A selection (topk, unsorted) instead of a full sort: on a CPU it is about 4x faster for 7B-sized
    matrices, which made the sort the largest part of a pruning run.
    """
    if torch.isnan(score).any():
        # topk's NaN order is not the stable sort's; NaN scores are rare enough to take the slow path.
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        return mask
    # The k-th lowest score of every row; topk without sorting beat kthvalue on the 2-core test host.
    thr = torch.topk(score, k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    mask = score <= thr
    # Every row has at least k scores <= its k-th lowest; when the whole matrix holds exactly
    # rows * k, no row has a tie across the threshold (the usual case, and a whole-tensor count
    # is far cheaper than per-row sums of a bool tensor).
    if int(torch.count_nonzero(mask)) == score.shape[0] * k:
        return mask
    rows = torch.nonzero(mask.sum(dim=1, dtype=torch.int32) > k).reshape(-1)
    sub, t = score[rows], thr[rows]
    lt = sub < t
    eq = sub == t
    need = k - lt.sum(dim=1, dtype=torch.int32, keepdim=True)
    mask[rows] = lt | (eq & (eq.cumsum(dim=1) <= need))
    return mask


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Remove the N lowest of every M consecutive inputs of each row (stable within a group)."""
    n, m = nm
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{n}:{m} needs the input dimension to be a multiple of {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def row_slices(weight: torch.Tensor) -> Iterator[slice]:
    """Consecutive slices of `weight`'s rows of about SCORE_CHUNK_ELEMENTS entries each.

    Scores are computed a slice at a time: whole, the float32 scores of a 7B MLP matrix and a
    selection's values and indices over them hold ~500 MB at once.
    """
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for r in range(0, weight.shape[0], step):
        yield slice(r, r + step)


def row_rule_mask(weight: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], sparsity: float,
                  nm: NM | None) -> torch.Tensor:
    """The mask of a per-row rule (floor(in * s) lowest per row, or N:M) on `score` of each slice of rows."""
    mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    for rows in row_slices(weight):
        s = score(weight[rows])
        mask[rows] = nm_mask(s, nm) if nm else row_mask(s, sparsity)
    return mask


def wanda_mask(
    weight: torch.Tensor, sq_sum: torch.Tensor, sparsity: float, nm: NM | None = None
) -> torch.Tensor:
    """Wanda mask of one linear weight [out, in] from the inputs' per-column sum of squares."""
    return row_rule_mask(weight, lambda rows: wanda_score(rows, sq_sum), sparsity, nm)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: NM | None = None) -> torch.Tensor:
    """Magnitude baseline: |W| with a per-matrix threshold, or per row groups for N:M."""
    score = weight.detach().to(torch.float32).abs()
    return nm_mask(score, nm) if nm else matrix_mask(score, sparsity)


def satisfies_nm(weight: torch.Tensor, nm: NM) -> bool:
    """Whether every group of M consecutive inputs of every row holds at least N zeros."""
    n, m = nm
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())
