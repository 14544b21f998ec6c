"""Observing a block's prunable matrices' inputs while it runs: one Observation per distinct input.

Dense linears are watched by forward hooks, fused MoE experts through `experts.ExpertStats`; both
feed `BlockObserver.record`. Linears that read the very same input tensor (q/k/v of attention,
gate/up of an MLP) share one Observation: one Gram matrix per input, not three. Sharing is found by
identity with the previous call's input, which the observer holds until the next call, so a freed
tensor's address can never be mistaken for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn

from wanda_stream import experts
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
                 device: torch.device) -> None:
        self.kind = kind
        self.device = device
        self.linears = linears
        self.obs: dict[str, Observation] = {}
        self._leader: dict[str, str] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        self._experts = experts.ExpertStats(model, layer, self.record)
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
            ob = self.obs[name] = Observation.empty(self.kind, x.shape[-1], self.device)
        ob.add(x, self.kind)
        self._last = (name, x)

    def __enter__(self) -> "BlockObserver":
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

    def results(self) -> BlockStats:
        """The observations (experts that got no token are absent) and the experts' token counts."""
        if self._experts.params:
            self._experts.check_observed()
        return BlockStats(self.obs, self._experts.token_counts())
