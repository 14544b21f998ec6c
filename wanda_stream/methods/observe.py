"""Observing a block's prunable matrices' inputs while it runs: one Observation per distinct input.

Dense linears are watched by forward hooks, fused MoE experts through `experts.ExpertStats`; both
feed `BlockObserver.record`. Linears that read the very same input tensor (q/k/v of attention,
gate/up of an MLP) share one Observation: one Gram matrix per input, not three. Sharing is found by
identity with the previous call's input, which the observer holds until the next call, so a freed
tensor's address can never be mistaken for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
                 device: torch.device, keep_windows: bool = False, with_experts: bool = True) -> None:
        self.kind = kind
        self.device = device
        self.keep_windows = keep_windows
        self.layer = layer
        self.linears = linears
        self.obs: dict[str, Observation] = {}
        self._leader: dict[str, str] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        self._experts = experts.ExpertStats(model, layer if with_experts else nn.Module(), self.record)
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

    def results(self) -> BlockStats:
        """The observations (experts that got no token are absent) and the experts' token counts."""
        self._close_batches()
        if self._experts.params:
            self._experts.check_observed()
        return BlockStats(self.obs, self._experts.token_counts())


def reduce_stats(world: World, stats: BlockStats) -> BlockStats:
    """The block's statistics over every rank's share, the same on every rank.

    Sums of squares add every window's own sum in window order (ranks hold contiguous shares), so
    they equal the single-process statistics bit for bit, whatever the micro-batch size. Gram
    matrices are summed over the ranks in float64; their float32 totals then differ from a single
    process's by rounding only.
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
            h_in, h_out = args[0], out[0] if isinstance(out, tuple) else out
            self.cos.append(plans.token_cosines(h_in, h_out).cpu())
            self.removal.add(h_in, h_out)
            if self.back is not None:
                old = self.back.read(self._pos, h_out.shape[0]).to(h_out.device)
                self.angles.append(plans.token_angles(old, h_out).cpu())
            self._pos += h_out.shape[0]
            self.tokens += h_out.shape[0] * h_out.shape[1]

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

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
