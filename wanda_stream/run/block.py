"""One block's pruning work, as the run does it: observe the block's inputs, then prune its matrices.

`observe_all` runs a block over the calibration states with the observers a run needs (the method's
statistic, a width plan's) and combines them across the ranks; `prune_block` masks every linear
and expert matrix of the block, each matrix by one rank, and rebuilds the pruned block.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from wanda_stream.methods import FALLBACK, NM, Method, Pruned, Stat, plans
from wanda_stream.methods.observe import BlockObserver, BlockStats, check_finite, reduce_stats
from wanda_stream.model import experts
from wanda_stream.model.skeleton import release
from wanda_stream.model.stream import Streamer
from wanda_stream.run.dist import World, assign_by_cost
from wanda_stream.storage.activations import HiddenFile
from wanda_stream.storage.state import StopFlag


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block but MoE routers/gates, by relative name: the dense matrices that get pruned."""
    routers = experts.router_names(layer)
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in routers}


Watch = tuple[Stat, dict[str, nn.Linear], bool]  # a statistic, of these linears' inputs, and of the experts' too


def observe_all(
    st: Streamer, i: int, layer: nn.Module, watches: list[Watch], src: HiddenFile, batch: int,
    stop: StopFlag | None, dst: HiddenFile | None = None, world: World = World(), hooks: Sequence[Any] = (),
    on_output: Callable[[int, int, torch.Tensor], None] | None = None,
) -> list[BlockStats] | None:
    """Run block i over the calibration states `src` (into `dst` when given; each micro-batch's outputs to
    `on_output` when given), observing the inputs of the matrices each watch names as its statistic says
    (the method's, and a width plan's of the matrices it refits), summed over every rank's share; `hooks`
    are further context managers entered around the run. None when a stop was requested midway."""
    observers = [BlockObserver(st.sk.model, layer, linears, kind, st.device, keep_windows=world.size > 1,
                               with_experts=with_experts) for kind, linears, with_experts in watches]
    with contextlib.ExitStack() as stack:
        for ctx in [*observers, *hooks]:
            stack.enter_context(ctx)
        finished = st.run_block(i, layer, src, batch, dst=dst, stop=stop, on_output=on_output)
    if not finished:
        return None
    got = [reduce_stats(world, o.results(), st.device) for o in observers]
    for stats in got:
        check_finite(stats, i, st.dtype)
    return got


def prune_block(
    method: Method[Any], sparsity: float, nm: NM | None, st: Streamer, i: int, layer: nn.Module,
    stored: dict[str, torch.Tensor], stats: BlockStats | None, narrow: bool = False, world: World = World(),
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], nn.Module]:
    """Prune every linear and expert matrix of block i; returns the output tensors (stored dtype), records,
    and the pruned block.

    The block is rebuilt from the pruned tensors (in the skeleton of the new widths when `narrow`), so
    that it then computes the next block's inputs. Per-expert tensors are pruned in the checkpoint's own
    layout, and their records carry the number of calibration tokens routed to the expert; an expert
    that got none falls back to magnitude, and its record says so. `sparsity` 0 (structured pruning
    alone) masks nothing.

    Under several ranks each matrix is pruned by one rank (`assign_matrices`) and sent from there to
    the others, so every rank holds the very bits one process computes, at a share of the work.
    """
    linears = linear_modules(layer)
    # The matrices as the block's tensors now are: with fewer experts, the narrow skeleton's (meta) block.
    sk = st.skeleton(narrow)
    keys = experts.prunable_keys(sk, i, sk.layers[i], stored, linears) if sparsity > 0 else {}
    # The block's compute-dtype weights (0.8 GB for a 7B block in float32) are not needed while its
    # matrices are pruned: freed here, rebuilt from the pruned tensors below.
    release(layer)
    records = prune_matrices(method, sparsity, nm, st.device, stored, keys, stats, world)
    # The pruned block, to compute the next block's inputs (fused expert parameters rebuilt from the
    # pruned per-expert tensors, as transformers loads them).
    return dict(stored), records, st.load_block(i, stored, narrow=narrow)


def prune_matrices(
    method: Method[Any], sparsity: float, nm: NM | None, device: torch.device, stored: dict[str, torch.Tensor],
    keys: dict[str, experts.Matrix], stats: BlockStats | None, world: World = World(),
) -> list[dict[str, Any]]:
    """Prune the matrices `keys` (by report name) inside the stored tensors `stored`, in place; their records.

    Under several ranks each matrix is pruned by one rank and sent from there to the others.
    """
    records: list[dict[str, Any]] = []
    observed = {key: stats.obs.get(m.stat) if stats is not None else None for key, m in keys.items()}
    owner = assign_by_cost({k: matrix_cost(method, stored[m.key], m) for k, m in keys.items()}, world.size)
    mine = {k: m for k, m in keys.items() if owner[k] == world.rank}
    # A prepared statistic (a Hessian inverse: 0.5 GB for a 7B MLP input) lives while matrices still need it.
    users = Counter(id(observed[k]) for k in mine)
    prepared: dict[int, object] = {}
    for key, matrix in mine.items():
        obs = observed[key]
        fallback = method.stat is not Stat.NONE and obs is None
        m = FALLBACK if fallback else method
        if id(obs) not in prepared:
            prepared[id(obs)] = m.prepare(obs)
        w = matrix.view(stored[matrix.key])  # a view: pruning it prunes the stored tensor
        wd = w.to(device).contiguous()  # a transposed expert slice is pruned in a copy, written back below
        result = m.prune(wd, prepared[id(obs)], sparsity, nm)
        users[id(obs)] -= 1
        if not users[id(obs)]:
            del prepared[id(obs)]
        pruned, info = _pruned(wd, result), result.info
        # Dropped now, not when the next matrix's result replaces it: SparseGPT's float32 weight and the
        # mask of a 70B MLP matrix are 1.2 GB, which would otherwise sit beside the next matrix's Hessian
        # factorization (the 28672-wide down_proj input's: 6.6 GB, the peak of a 70B block).
        del result
        if pruned is not w:
            w.copy_(pruned)  # into the stored tensor: no second host copy of the block
        del pruned, wd
        zeros = w.numel() - int(torch.count_nonzero(w))  # (x == 0).sum() is 10x slower on CPU
        record: dict[str, Any] = {"name": key, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                                  "sparsity": zeros / w.numel(), **info}
        if stats is not None and matrix.stat in stats.tokens:
            record["calib_tokens"] = stats.tokens[matrix.stat]
        if fallback:
            record["fallback"] = "magnitude: no calibration token was routed to this expert"
        records.append(record)
    if world.size > 1:
        records = _share_pruned(world, keys, owner, stored, records)
    return records


def matrix_cost(method: Method[Any], stored: torch.Tensor, matrix: experts.Matrix) -> float:
    """A relative cost of pruning one matrix: rows x columns, and x columns again for the methods that solve
    with a Hessian of the columns (SparseGPT's and ALPS's updates grow with its square)."""
    rows, cols = matrix.view(stored).shape
    return float(rows * cols * (cols if method.stat is Stat.GRAM else 1))


def _share_pruned(world: World, keys: dict[str, experts.Matrix], owner: dict[str, int],
                  stored: dict[str, torch.Tensor], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's pruned matrices sent to the others, in the block's matrix order; the records of all ranks
    in that order."""
    for key, matrix in keys.items():
        w = matrix.view(stored[matrix.key])
        world.broadcast_(w, owner[key])
    by_name = {r["name"]: r for part in world.gather(records) for r in part}
    return [by_name[key] for key in keys]


def _pruned(wd: torch.Tensor, result: Pruned) -> torch.Tensor:
    """`wd` (the matrix in the stored dtype, on the compute device) pruned in place.

    In place: on the CPU `wd` is the stored copy, and a second copy of the block's matrices would add
    its whole size (400 MB for a 7B block) to the peak.
    """
    if result.weight is not None:
        wd.copy_(result.weight)  # cast first, then zero: the removed weights must be exact zeros in any dtype
    return wd.masked_fill_(result.mask, 0)


def width_inputs(got: list[BlockStats]) -> dict[str, plans.InputStats]:
    """A width plan's observations (sums of squares, then Gram matrices when refit) by matrix name."""
    if not got:
        return {}
    sq = got[0].obs
    grams = got[1].obs if len(got) > 1 else {}
    return {n: plans.InputStats(ob.stat, grams[n].stat if n in grams else None) for n, ob in sq.items()}
