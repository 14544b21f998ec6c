"""The method seam: what a pruning method observes of a matrix's inputs, and how it prunes the matrix.

The block loop knows no method by name. It asks the method which statistic of the inputs it needs
(`Stat`), gathers one `Observation` per distinct input of the block (q/k/v share one, as do
gate/up), lets the method `prepare` each observation once, and calls `prune` per matrix with the
block's sparsity. A method is a frozen dataclass whose fields are its options; their `metadata`
names the command-line flag that sets them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import torch

from wanda_stream.methods import kernel

NM = tuple[int, int]
P = TypeVar("P")


class Stat(enum.Enum):
    """What a method observes of a linear's inputs over all calibration tokens."""

    NONE = "none"
    SQ_SUM = "sq_sum"  # per input column: sum of x**2 (float64)
    GRAM = "gram"  # X^T X (float32; the upper triangle), the Hessian of the layer-wise squared error up to a factor


@dataclass
class Observation:
    """A statistic of one input over the calibration tokens, and the token count.

    `stat` is the total over the micro-batches closed so far (`close_batch`). For SQ_SUM every
    calibration window's own float64 sum is added to it in window order, so that the total is the
    same bits however the windows were grouped into micro-batches or shared among ranks. With
    `keep_windows` the windows' sums are also kept (`window_sums`, one [windows, in] tensor per
    micro-batch), for ranks that each saw a share of the windows to add all of them in that order.
    Inputs without a window axis (the tokens routed to an MoE expert) count as one window per
    micro-batch.
    """

    kind: Stat
    stat: torch.Tensor
    tokens: int = 0
    keep_windows: bool = False
    window_sums: list[torch.Tensor] = field(default_factory=list)
    _open: torch.Tensor | None = None  # the open micro-batch's sums per window, [windows, in]

    def add(self, x: torch.Tensor) -> None:
        """Fold in the inputs `x` ([windows, seqlen, in], or [tokens, in]) of one call of the matrix."""
        if self.kind is Stat.SQ_SUM:
            s = _window_sq_sums(x)
            self._open = s if self._open is None else self._open.add_(s)
        else:
            kernel.add_gram(self.stat, x)
        self.tokens += x.numel() // x.shape[-1]

    def close_batch(self) -> None:
        """End a micro-batch: its windows' sums join the total, one window after another."""
        if self._open is not None:
            for window in self._open:
                self.stat += window
            if self.keep_windows:
                self.window_sums.append(self._open)
            self._open = None

    @classmethod
    def empty(cls, kind: Stat, width: int, device: torch.device, keep_windows: bool = False) -> "Observation":
        if kind is Stat.SQ_SUM:
            return cls(kind, torch.zeros(width, dtype=torch.float64, device=device), keep_windows=keep_windows)
        return cls(kind, torch.zeros(width, width, dtype=torch.float32, device=device))


def _window_sq_sums(x: torch.Tensor) -> torch.Tensor:
    """Per window (x's first axis when it has a sequence axis, else all of x as one), the float64
    column sums of squares: [windows, in]."""
    if x.dim() < 3:
        return kernel.column_sq_sum(x).unsqueeze(0)
    windows = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.stack([kernel.column_sq_sum(w) for w in windows])


@dataclass
class Pruned:
    """A method's result for one matrix.

    `mask` is True where a weight was removed. `weight` is the new float32 matrix when the method also
    changes the weights it keeps (None: the kept weights stay as stored). `info` goes to the report.
    """

    mask: torch.Tensor
    weight: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)


class Method(Generic[P]):
    """A pruning method: the statistic it needs, and (weight, prepared statistic, sparsity, N:M) -> Pruned.

    Subclasses are frozen dataclasses whose fields are their options (see the module docstring).
    """

    name: ClassVar[str]
    stat: ClassVar[Stat]
    paper: ClassVar[str]

    def check(self, nm: NM | None) -> None:
        """Raise InputError when the options cannot serve this pattern (called before any work)."""

    def prepare(self, obs: Observation | None) -> P:
        """Work shared by every matrix reading one input (a Hessian inverse); may consume `obs`."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, prepared: P, sparsity: float, nm: NM | None) -> Pruned:
        """Prune `weight` [out, in] (stored dtype, on the compute device) to `sparsity` or N:M."""
        raise NotImplementedError
