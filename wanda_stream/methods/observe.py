"""Observing a block's prunable matrices' inputs while it runs: one Observation per distinct input.

Dense linears are watched by forward hooks, fused MoE experts through `experts.ExpertStats`; both
feed `BlockObserver.record`. Linears that read the very same input tensor (q/k/v of attention,
gate/up of an MLP) share one Observation: one Gram matrix per input, not three. Sharing is found by
identity with the previous call's input, which the observer holds until the next call, so a freed
tensor's address can never be mistaken for it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from wanda_stream.model import experts
from wanda_stream.methods import kernel, plans
from wanda_stream.storage.activations import HiddenFile
from wanda_stream.run.dist import World
from wanda_stream.errors import InputError
from wanda_stream.methods.fidelity import OutputError
from wanda_stream.methods import Observation, Stat


@dataclass
class BlockStats:
    """A block's observations by matrix name (shared objects for shared inputs), and the calibration
    tokens routed to each expert matrix (`param[e]`, 0 for an expert that got none)."""

    obs: dict[str, Observation]
    tokens: dict[str, int] = field(default_factory=dict)


class BlockObserver:
    """Context manager gathering `kind` statistics of every linear in `linears` and every expert of `layer`."""

    def __init__(self, model: nn.Module, layer: nn.Module, linears: dict[str, nn.Linear], kind: Stat,
                 device: torch.device, keep_windows: bool = False, with_experts: bool = True,
                 expert_index: Sequence[int] | None = None) -> None:
        self.kind = kind
        self.device = device
        self.keep_windows = keep_windows
        self.layer = layer
        self.linears = linears
        self.obs: dict[str, Observation] = {}
        self._leader: dict[str, str] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        self._experts = experts.ExpertStats(model, layer if with_experts else nn.Module(), self.record, expert_index)
        self._stack = contextlib.ExitStack()

    def record(self, name: str, x: torch.Tensor) -> None:
        """Fold one call's input `x` of matrix `name` into its observation (or its group's)."""
        last = self._last
        if last is not None and last[1] is x:
            leader = self._leader.setdefault(name, self._leader[last[0]])
            if leader != self._leader[last[0]]:
                raise RuntimeError(f"'{name}' shared an input with '{last[0]}' in one micro-batch, not in another")
            self.obs[name] = self.obs[leader]
            self._last = (name, x)
            return
        if self._leader.setdefault(name, name) != name:
            raise RuntimeError(f"'{name}' read the input of '{self._leader[name]}' in one micro-batch, not in another")
        ob = self.obs.get(name)
        if ob is None:
            ob = self.obs[name] = Observation.empty(self.kind, x.shape[-1], self.device, self.keep_windows)
        ob.add(x)
        self._last = (name, x)

    def __enter__(self) -> "BlockObserver":
        # Each call of the block is one micro-batch.
        self._stack.callback(self.layer.register_forward_pre_hook(lambda m, a: self._close_batches()).remove)
        for name, mod in self.linears.items():
            def hook(m: nn.Module, args: tuple, out: object, name: str = name) -> None:
                self.record(name, args[0])

            self._stack.callback(mod.register_forward_hook(hook).remove)
        # The function mode costs Python overhead on every op: entered only for blocks with experts.
        if self._experts.params:
            self._stack.enter_context(self._experts)
        self._stack.callback(self._forget_last)
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stack.close()

    def _forget_last(self) -> None:
        self._last = None

    def _close_batches(self) -> None:
        for ob in {id(o): o for o in self.obs.values()}.values():
            ob.close_batch()

    def close_batch(self) -> None:
        """End a micro-batch of calls made without the block's forward (which ends one by itself)."""
        self._close_batches()

    def results(self, check: bool = True) -> BlockStats:
        """The observations (experts that got no token are absent) and the experts' token counts; with `check`,
        InputError when no expert saw a token (see ExpertStats.check_observed)."""
        self._close_batches()
        if self._experts.tokens and check:
            self._experts.check_observed()
        return BlockStats(self.obs, self._experts.token_counts())


def reduce_stats(world: World, stats: BlockStats, device: torch.device | None = None) -> BlockStats:
    """The block's statistics over every rank's share, the same on every rank, on `device` (the compute device;
    by default that of the first observation).

    Sums of squares add every window's own sum in window order (ranks hold contiguous shares), so
    they equal the single-process statistics bit for bit, whatever the micro-batch size. Gram
    matrices are summed over the ranks in float64; their float32 totals then differ from a single
    process's by rounding only.

    A rank may hold no observation at all (a group of streamed experts that none of its tokens reached):
    it still takes part in every sum, and its totals must land on the compute device like the others' (a
    CPU Gram matrix in a NCCL sum, or a CPU statistic beside a CUDA weight, fails), so callers pass it.
    """
    if world.size == 1:
        return stats
    leaders: dict[str, Observation] = {}
    groups: dict[str, str] = {}
    for name, ob in stats.obs.items():
        leader = next((n for n, o in leaders.items() if o is ob), name)
        leaders.setdefault(leader, ob)
        groups[name] = leader
    shared = world.gather({"groups": groups, "kinds": {n: o.kind.value for n, o in leaders.items()},
                           "widths": {n: o.stat.shape[0] for n, o in leaders.items()},
                           "tokens": {n: o.tokens for n, o in leaders.items()}, "experts": stats.tokens})
    for part in shared:
        groups.update(part["groups"])
    names = sorted({n for part in shared for n in part["kinds"]})
    sq = [n for n in names if next(p["kinds"][n] for p in shared if n in p["kinds"]) == Stat.SQ_SUM.value]
    window_sums = world.gather({n: [t.cpu() for t in leaders[n].window_sums] for n in sq if n in leaders})
    if device is None:
        device = next(iter(stats.obs.values())).stat.device if stats.obs else torch.device("cpu")
    merged: dict[str, Observation] = {}
    for n in names:
        width = next(p["widths"][n] for p in shared if n in p["widths"])
        if n in sq:
            ob = Observation.empty(Stat.SQ_SUM, width, device)
            for part in window_sums:  # rank order, then micro-batch order: window order
                for batch in part.get(n, []):
                    for window in batch.to(device):
                        ob.stat += window
        else:
            ob = leaders.get(n) or Observation.empty(Stat.GRAM, width, device)
            world.sum_(ob.stat)
        ob.tokens = sum(p["tokens"].get(n, 0) for p in shared)
        merged[n] = ob
    tokens = {k: sum(p["experts"].get(k, 0) for p in shared) for k in shared[0]["experts"]}
    return BlockStats({name: merged[leader] for name, leader in groups.items()}, tokens)


def check_finite(stats: BlockStats, block: int, dtype: torch.dtype) -> None:
    """Refuse a block whose statistics hold inf or NaN (activations that overflow the compute dtype:
    float16 in some families), naming the block and matrix, before a method turns them into masks."""
    for name, ob in stats.obs.items():
        if not kernel.all_finite(ob.stat):  # in slices: see all_finite
            what = str(dtype).removeprefix("torch.")
            raise InputError(
                f"block {block}: the calibration statistics of '{name}' are not finite (the activations overflow "
                f"{what}); rerun with --compute-dtype float32 (or bfloat16) and --overwrite")


class DepthProbe:
    """Per calibration window, the sums over its tokens of cos(h_in, h_out) of a dense block and, given the
    states `back` that entered the block N-1 earlier, of the angular distance d(h_back, h_out); and the
    output error of removing the block (its input in place of its output)."""

    def __init__(self, back: HiddenFile | None) -> None:
        self.back = back
        self.removal = OutputError()
        self.cos: list[torch.Tensor] = []
        self.angles: list[torch.Tensor] = []
        self.tokens = 0
        self._pos = 0

    @contextlib.contextmanager
    def on(self, layer: nn.Module) -> Iterator[None]:
        """Watch `layer`'s calls (one per micro-batch, in window order) while in the context."""
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            self.add(args[0], out[0] if isinstance(out, tuple) else out)

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def add(self, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """One micro-batch of the block's inputs and outputs, the next windows in order."""
        self.cos.append(plans.token_cosines(h_in, h_out).cpu())
        self.removal.add(h_in, h_out)
        if self.back is not None:
            old = self.back.read(self._pos, h_out.shape[0]).to(h_out.device)
            self.angles.append(plans.token_angles(old, h_out).cpu())
        self._pos += h_out.shape[0]
        self.tokens += h_out.shape[0] * h_out.shape[1]

    def results(self, world: World) -> dict[str, float]:
        """The block's influence 1 - mean cos and, with `back`, the mean angular distance, over every rank's
        windows (per-window sums added in window order: the same bits for any batching or rank count)."""
        parts = world.gather({"cos": torch.cat(self.cos).tolist(), "angles": torch.cat(self.angles).tolist()
                              if self.angles else [], "tokens": self.tokens,
                              "removal": (self.removal.sq_diff, self.removal.sq_dense)})
        tokens = sum(p["tokens"] for p in parts)
        removal = OutputError()
        for p in parts:  # rank order
            removal.merge(OutputError(*p["removal"]))
        out = {"influence": 1.0 - sum(c for p in parts for c in p["cos"]) / tokens, "removal_error": removal.value}
        if self.back is not None:
            out["angular"] = sum(a for p in parts for a in p["angles"]) / tokens
        return out


class ExpertSaliency:
    """REAP's observation of one block's routed experts: per calibration window and expert, the sum over the
    tokens routed to it of ||g_j(x) f_j(x)||_2 (float64), the norm of the expert's contribution to the block's
    output as the model weights it, and the number of those tokens.

    The contribution is transformers' own: the experts module is run again once per routing slot k with
    that slot's experts and combine weights only (`experts(x, index[:, k:k+1], weight[:, k:k+1])`), which
    returns exactly g_j(x) f_j(x) of each token's k-th expert, biases included (gpt-oss). Llama 4's experts
    module takes every expert's inputs stacked (unrouted rows zero, routed ones scaled by the router) and
    returns every expert's output, so there the contribution is its rows. Costs one more pass of the experts.
    """

    def __init__(self, modules: dict[str, int]) -> None:
        self.modules = modules
        self.sums: dict[str, list[torch.Tensor]] = {n: [] for n in modules}  # per micro-batch [windows, experts]
        self.counts: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self._windows = 0

    @contextlib.contextmanager
    def on(self, layer: nn.Module) -> Iterator[None]:
        """Watch `layer`'s experts modules while in the context (one block call per micro-batch)."""
        def windows(mod: nn.Module, args: tuple) -> None:
            self._windows = int(args[0].shape[0])

        handles = [layer.register_forward_pre_hook(windows)]
        for name in self.modules:
            mod = layer.get_submodule(name)
            handles.append(mod.register_forward_hook(
                lambda m, a, kw, out, name=name: self._observe(name, m, a, kw, out), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _observe(self, name: str, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        n_exp, b = self.modules[name], self._windows
        bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
        values = list(bound.values())
        if len(values) >= 3 and values[1] is not None:  # (hidden states, top-k index, top-k weights)
            x, index, weight = values[:3]
            norms = torch.empty(index.shape, dtype=torch.float64, device=x.device)
            with torch.no_grad(), experts.unobserved():
                for k in range(index.shape[1]):
                    y = mod.forward(x, index[:, k:k + 1], weight[:, k:k + 1])
                    norms[:, k] = torch.linalg.vector_norm(y.double(), dim=-1)
            rows = index.shape[0]
            routed = index.long()
            window = (torch.arange(rows, device=x.device) // (rows // b)).unsqueeze(1).expand_as(routed)
        else:  # every expert's rows stacked: [experts * tokens, hidden] in, the same out (Llama 4)
            x, y = values[0], out[0] if isinstance(out, tuple) else out
            rows = x.shape[0] // n_exp
            hit = x.reshape(n_exp, rows, -1).ne(0).any(dim=-1).T  # [tokens, experts]
            norms = torch.linalg.vector_norm(y.reshape(n_exp, rows, -1).double(), dim=-1).T[hit].reshape(-1, 1)
            routed = torch.arange(n_exp, device=x.device).expand(rows, n_exp)[hit].reshape(-1, 1)
            window = (torch.nonzero(hit)[:, 0] // (rows // b)).reshape(-1, 1)
        self._add(name, norms, routed, window, b, n_exp)

    def _add(self, name: str, norms: torch.Tensor, routed: torch.Tensor, window: torch.Tensor, b: int,
             n_exp: int) -> None:
        # Summed on the host: a float index_add_ on CUDA adds a slot's many tokens by atomics in no fixed
        # order, so the sums (and a near tie in REAP's choice) would change from run to run and on a resume.
        slot = (window * n_exp + routed).flatten().cpu()
        sums = torch.zeros(b * n_exp, dtype=torch.float64).index_add_(0, slot, norms.flatten().cpu())
        counts = torch.zeros(b * n_exp, dtype=torch.int64).index_add_(0, slot, torch.ones_like(slot))
        self.sums[name].append(sums.view(b, n_exp))
        self.counts[name].append(counts.view(b, n_exp))

    def results(self, world: World) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per experts module, (summed contribution norms, routed token counts) over every rank's windows,
        added window by window in window order: the same bits for any micro-batch size or rank count."""
        parts = world.gather({n: (torch.cat(self.sums[n]) if self.sums[n] else torch.zeros(0, e, dtype=torch.float64),
                                  torch.cat(self.counts[n]) if self.counts[n] else torch.zeros(0, e, dtype=torch.int64))
                              for n, e in self.modules.items()})
        out = {}
        for n, e in self.modules.items():
            sums, counts = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.int64)
            for part in parts:  # rank order
                for s, c in zip(*part[n]):
                    sums += s
                    counts += c
            out[n] = (sums, counts)
        return out
