"""MoE blocks too large to hold: their routed experts read, observed, pruned and written a group at a time.

A DeepSeek-V3 MoE block is 11.5 B parameters (23 GB in bf16, 46 GB in float32): held whole, as every
other block is, it needs several times that in host RAM. A streamed block holds its *core* (every
tensor but the routed experts: attention, norms, router, shared experts) and one group of experts:

1. The dense core runs over the calibration states with the experts module replaced by `Routing`,
   which records what transformers' own router hands the experts (hidden states, top-k index and
   combine weights) and returns zeros; the core's output is then the block's output without the routed
   experts' part. That part is only added, so it is added afterwards, expert by expert. Llama 4's
   experts module takes every expert's inputs stacked and scaled by the router (`Experts.stacked` in the
   family table): there the router's input and scores are recorded, kept as a top-k index and weights.
2. Each group of experts is read (the next one behind the compute), loaded into the experts module in
   place of the whole stack, and run on exactly the rows the whole block gives each expert (those
   transformers' eager loop takes; Llama 4's nonzero rows, the expert alone in the module): its inputs
   are observed (the same statistics, in the same micro-batches, as a whole block gives), its
   contributions summed, then it is pruned, run on the pruned core's routing, and handed to the shard
   writer, which writes the block's shard while the groups are computed.
3. With --drop-experts a first pass over the groups scores every expert (REAP) before any is pruned,
   so a kept expert is read twice.

The block's outputs are the core's plus the experts' sums: one float addition in another order than
transformers' (residual + (experts + shared)), so they equal the whole block's within rounding.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

import psutil
import torch
from torch import nn

from wanda_stream.errors import InputError, Interrupted
from wanda_stream.model import experts
from wanda_stream.model.families import Experts
from wanda_stream.model.skeleton import Skeleton
from wanda_stream.storage.checkpoint import Checkpoint, TensorInfo

GROUP_BYTES = 1 << 30  # compute-dtype bytes of the experts held at once under --expert-group auto
STREAM_SHARE = 8  # auto: a block streams its experts when they take over 1/8 of the device's memory


@dataclass(frozen=True)
class Streamed:
    """A block whose routed experts are streamed: the experts module, its router, how many experts are held
    at once, and where the experts are stored. In the hub's per-expert layout `keys` are each expert's
    stored keys (in key order); experts stored fused (gpt-oss: every expert's rows of `gate_up_proj` in one
    tensor) have `fused`, those tensors' keys, whose rows along the first dimension are the experts, and a
    group is read and written as its rows. `stacked`: the experts module takes every expert's inputs stacked
    (`Experts.stacked`, Llama 4)."""

    holder: str
    router: str
    keys: tuple[tuple[str, ...], ...]
    group: int
    fused: tuple[str, ...] = ()
    count: int = 0  # the experts of a fused layout (its tensors' first dimension)
    stacked: bool = False

    @property
    def n_experts(self) -> int:
        return len(self.keys) if self.keys else self.count

    def all_keys(self) -> frozenset[str]:
        """The stored keys of the experts: what a read of the block's core leaves out."""
        return frozenset(k for ks in self.keys for k in ks) | frozenset(self.fused)

    def groups(self, experts_: list[int]) -> list[list[int]]:
        """`experts_` (ascending) in groups of `group`."""
        return [experts_[s : s + self.group] for s in range(0, len(experts_), self.group)]

    def parts(self, group: list[int]) -> list[tuple[str, tuple[int, int] | None]]:
        """What to read for the experts `group` (ascending): (key, None) for a whole stored tensor, (key, rows
        [start, stop)) for each run of consecutive experts' rows of a fused one, in order."""
        if not self.fused:
            return [(k, None) for e in group for k in self.keys[e]]
        runs: list[tuple[int, int]] = []
        for e in group:
            if runs and runs[-1][1] == e:
                runs[-1] = (runs[-1][0], e + 1)
            else:
                runs.append((e, e + 1))
        return [(k, run) for k in self.fused for run in runs]

    def expert_of(self, m: experts.Matrix, group: list[int]) -> int:
        """The expert of `group` that the matrix `m` of its stored tensors belongs to."""
        if self.fused:
            assert m.label is not None
            return m.label
        return next(e for e in group if m.key in self.keys[e])

    def renamed(self, stored: dict[str, torch.Tensor], group: list[int], new: dict[int, int]
                ) -> dict[str, torch.Tensor]:
        """A group's stored tensors under the kept experts' new indices (the key names of those indices, as
        `experts.keep_experts` renames): per-expert keys renamed; fused tensors' rows are already the kept
        experts' in order."""
        if self.fused:
            return dict(stored)
        return {self.keys[new[e]][p]: stored[k] for e in group for p, k in enumerate(self.keys[e])}

    def pieces(self, out: dict[str, torch.Tensor], group: list[int], new: dict[int, int]
               ) -> list[tuple[str, int, torch.Tensor]]:
        """A renamed group's tensors as shard pieces (key, first row, rows), sorted by key: a fused tensor's
        rows go where the group's first kept expert does."""
        first = new[group[0]] if self.fused else 0
        return [(k, first, out[k]) for k in sorted(out)]

    def items(self, infos: dict[str, TensorInfo], kept: list[int]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The kept experts' tensors in the block's shard (under the new indices' names), from the
        checkpoint's tensor infos."""
        if self.fused:
            return [(k, infos[k].dtype, (len(kept), *infos[k].shape[1:])) for k in self.fused]
        return [(k, infos[src].dtype, tuple(infos[src].shape))
                for j, e in enumerate(kept) for k, src in zip(self.keys[j], self.keys[e])]

    def expert_bytes(self, infos: dict[str, TensorInfo], element_size: int | None = None) -> int:
        """Bytes of one expert's tensors as presented (dequantized), or in `element_size` bytes a value."""
        def size(info: TensorInfo) -> int:
            return torch.Size(info.shape).numel() * (element_size or torch.empty(0, dtype=info.dtype).element_size())

        if self.fused:
            return sum(size(infos[k]) for k in self.fused) // max(self.count, 1)
        return sum(size(infos[k]) for k in self.keys[0])


def plan_streaming(ckpt: Checkpoint, sk: Skeleton, family: Experts | None, requested: int | None,
                   device: torch.device, dtype: torch.dtype) -> dict[int, Streamed]:
    """The blocks whose experts are streamed, by index: every MoE block when `requested` is a count, none
    for 0, and for None (auto) those whose experts in `dtype` take over 1/STREAM_SHARE of the device's
    memory. InputError when a count is asked of a model whose experts cannot stream."""
    if requested == 0:
        return {}
    out: dict[int, Streamed] = {}
    size = torch.empty(0, dtype=dtype).element_size()
    for i, layer in enumerate(sk.layers):
        holders = experts.moe_modules(layer)
        if not holders:
            continue
        why = _not_streamable(sk, family, holders)
        if why or family is None:
            if requested is not None:
                raise InputError(f"--expert-group {requested}: {why}; their groups cannot be read apart "
                                 "(use --expert-group 0)")
            continue
        plan = _stored_experts(ckpt, sk, i, next(iter(holders)), family.router)
        if plan is None:
            if requested is not None:
                raise InputError(f"--expert-group {requested}: block {i}'s experts are stored in a layout whose "
                                 "groups cannot be read apart (use --expert-group 0)")
            continue
        per_expert = plan.expert_bytes(ckpt.tensors, size)
        if requested is None and per_expert * plan.n_experts * STREAM_SHARE <= _device_memory(device):
            continue
        group = requested or max(1, GROUP_BYTES // max(per_expert, 1))
        out[i] = replace(plan, group=min(group, plan.n_experts), stacked=family.stacked)
    return out


def held_tensor_bytes(ckpt: Checkpoint, sk: Skeleton, i: int, plan: Streamed | None) -> list[int]:
    """The sizes of block i's stored tensors held at once: all of them, or for a streamed block its core and
    two groups of experts (the one computed, the next one read ahead)."""
    prefix = sk.block_key_prefix(i)
    keys = [k for k in ckpt.tensors if k.startswith(prefix)]
    if plan is None:
        return [ckpt.tensors[k].nbytes for k in keys]
    apart = plan.all_keys()
    core = [ckpt.tensors[k].nbytes for k in keys if k not in apart]
    held = min(2 * plan.group, plan.n_experts)
    if plan.fused:
        return core + [ckpt.tensors[k].nbytes * held // plan.n_experts for k in plan.fused]
    return core + [ckpt.tensors[k].nbytes for ks in plan.keys[:held] for k in ks]


def _not_streamable(sk: Skeleton, family: Experts | None, holders: dict[str, int]) -> str:
    if family is None:
        return f"model_type '{sk.model.config.model_type}' cannot run its experts a group at a time"
    if len(holders) != 1:
        return "the block has several experts modules"
    return ""


def _stored_experts(ckpt: Checkpoint, sk: Skeleton, i: int, holder: str, router: str) -> Streamed | None:
    """Block i's experts module `holder` as stored: each expert's keys (the hub's per-expert layout), or the
    fused tensors holding every expert along their first dimension (gpt-oss); None for a mix, or a tensor of
    the experts module not indexed by the experts. The group is set by the caller."""
    stored = sk.block_key_prefix(i)
    tensors = experts.expert_tensors(sk, i, holder, router, [k for k in ckpt.keys() if k.startswith(stored)])
    inside = f"{sk.block_prefix(i)}{holder}."
    fused = tuple(k for k in tensors.stacked if sk.layout.slots[k].param.startswith(inside))
    if fused:
        counts = {ckpt.tensors[k].shape[0] if ckpt.tensors[k].shape else 0 for k in fused}
        if tensors.per_expert or len(counts) != 1 or not min(counts):
            return None
        return Streamed(holder, router, (), 1, fused, counts.pop())
    if not tensors.per_expert:
        return None
    n = len(tensors.per_expert[0])
    if any(len(part) != n for part in tensors.per_expert):
        return None
    return Streamed(holder, router, tuple(tuple(part[e] for part in tensors.per_expert) for e in range(n)), 1)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)


@dataclass
class Routes:
    """One micro-batch's call of an experts module: its inputs [tokens, hidden], top-k index and weights.
    `scaled`: an expert's inputs are the tokens' rows times their weight, its output unweighted (Llama 4);
    else the experts module takes the rows and weights apart, as transformers' eager loop does."""

    x: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    scaled: bool = False


class Routing:
    """While `recording`, the experts module `mod` records each call's Routes and returns zeros. With `router`
    (the module beside it, `Experts.stacked`) the routes are taken from the router's call instead: its input
    and its scores [tokens, experts], zero for the experts a token does not reach."""

    def __init__(self, mod: nn.Module, router: nn.Module | None = None) -> None:
        self.mod = mod
        self.router = router
        self.calls: list[Routes] = []
        self._signature = inspect.signature(mod.forward)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Routes]]:
        """Record into a fresh list, yielded."""
        self.calls = []
        # An instance attribute: nn.Module.__call__ finds it before the class's forward.
        self.mod.forward = self._stacked if self.router is not None else self._top_k
        hook = self.router.register_forward_hook(self._scores) if self.router is not None else None
        try:
            yield self.calls
        finally:
            del self.mod.forward
            if hook is not None:
                hook.remove()

    def _top_k(self, *args: object, **kwargs: object) -> torch.Tensor:
        x, index, weight = list(self._signature.bind(*args, **kwargs).arguments.values())[:3]
        assert isinstance(x, torch.Tensor) and isinstance(index, torch.Tensor) and isinstance(weight, torch.Tensor)
        self.calls.append(Routes(x, index, weight))
        return torch.zeros_like(x)

    def _scores(self, mod: nn.Module, args: tuple, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        scores = out[0]
        # Every nonzero score is kept; a row with fewer takes zero weights, whose inputs are zero rows (unrouted).
        k = max(int(scores.ne(0).sum(dim=1).max()), 1) if scores.numel() else 1
        weight, index = scores.topk(k, dim=1)
        self.calls.append(Routes(args[0], index, weight, scaled=True))
        # The block stacks one copy of its inputs per column of the scores for the experts module (all 128 of
        # Llama-4-Maverick's: 10 GB a 2048-token window in float32); one zero column makes that one copy of zeros.
        return (scores.new_zeros(scores.shape[0], 1), *out[1:])

    def _stacked(self, x: torch.Tensor) -> torch.Tensor:
        # Zeros without memory: the caller only sums them over the experts.
        return torch.zeros((), dtype=x.dtype, device=x.device).expand_as(x)


@contextlib.contextmanager
def holding(mod: nn.Module, params: dict[str, torch.Tensor], n: int) -> Iterator[nn.Module]:
    """The experts module `mod` holding only `params` (its fused parameters for `n` experts, relative names)
    in the context; its meta stand-ins and expert count are put back after."""
    before = dict(mod._parameters)
    count = mod.num_experts
    for name, t in params.items():
        mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    mod.num_experts = n
    try:
        yield mod
    finally:
        mod._parameters.update(before)
        mod.num_experts = count


def expert_rows(r: Routes, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token rows routed to expert `e` and their top-k slots, in the order transformers' eager experts
    loop takes them (slot, then token)."""
    pos, token = torch.where((r.index == e).T)
    return token, pos


def contribution(mod: nn.Module, r: Routes, e: int, local: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Expert `e`'s weighted outputs g_e(x) f_e(x) on its rows of `r` and those rows (None: no token), computed
    by the experts module itself on the expert it holds at index `local`, so the expert sees exactly the
    inputs of the whole block's call (biases and activation clamps included)."""
    if r.scaled:
        return _scaled_contribution(mod, r, e, local)
    token, pos = expert_rows(r, e)
    if not token.numel():
        return None
    x = r.x[token]
    index = torch.full((token.shape[0], 1), local, dtype=r.index.dtype, device=x.device)
    return mod(x, index, r.weight[token, pos].unsqueeze(1)), token


def _scaled_contribution(mod: nn.Module, r: Routes, e: int, local: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As `contribution` for an experts module taking every expert's scaled inputs stacked: expert `e`'s rows
    x * weight, the nonzero ones in token order (those the whole block's expert sees), run through the module
    holding that expert alone."""
    token, pos = expert_rows(r, e)
    order = token.argsort()
    token, pos = token[order], pos[order]
    x = r.x[token] * r.weight[token, pos].unsqueeze(1)  # the whole block's product, element for element
    hit = x.ne(0).any(dim=-1)
    token, x = token[hit], x[hit]
    if not token.numel():
        return None
    alone = {n: p[local:local + 1] for n, p in mod.named_parameters(recurse=False) if p.dim() == 3}
    with holding(mod, alone, 1):
        return mod(x), token


class ShardFeed:
    """Pieces of tensors handed from the computing thread to the thread writing their shard, in the order
    handed; at most `limit` bytes wait at once (one more piece always may), so the block is never held whole.
    A piece is (key, first row, rows), as `write_shard_pieces` takes them. A feed not `enabled` (a rank that
    does not write) drops what it is handed."""

    def __init__(self, limit: int, enabled: bool = True) -> None:
        self.limit = limit
        self.enabled = enabled
        self._items: deque[tuple[str, int, torch.Tensor]] = deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._stopped = False
        self._error: BaseException | None = None

    def put(self, key: str, t: torch.Tensor, first: int = 0) -> None:
        """Hand over `t`, rows `first`.. of tensor `key` (all of it by default); waits while the writer is
        `limit` bytes behind; raises the writer's error."""
        if not self.enabled:
            return
        with self._cv:
            while self._items and self._bytes + t.nbytes > self.limit and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            self._items.append((key, first, t))
            self._bytes += t.nbytes
            self._cv.notify_all()

    def pieces(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """The pieces as handed over (the writer's side); Interrupted when the block stopped."""
        while True:
            with self._cv:
                while not self._items:
                    if self._stopped:
                        raise Interrupted("the block stopped before its shard was complete")
                    self._cv.wait()
                piece = self._items.popleft()
                self._bytes -= piece[2].nbytes
                self._cv.notify_all()
            yield piece

    def stop(self) -> None:
        """The computing side gives up: the writer stops waiting (and leaves its partial file)."""
        with self._cv:
            self._stopped = True
            self._items.clear()
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        """The writer failed: the next `put` raises its error."""
        with self._cv:
            self._error = error
            self._items.clear()
            self._cv.notify_all()
