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

from wanda_stream import kernel

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

    `stat` is the total over the micro-batches closed so far (`close_batch`). For SQ_SUM the
    micro-batches' own sums are added in their order, and kept in `batch_sums` when
    `keep_batches`: ranks that each saw a share of the micro-batches then add all of them in the
    single-process order, to the same bits.
    """

    kind: Stat
    stat: torch.Tensor
    tokens: int = 0
    keep_batches: bool = False
    batch_sums: list[torch.Tensor] = field(default_factory=list)
    _open: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Fold in the inputs `x` [..., in] of one call of the matrix."""
        if self.kind is Stat.SQ_SUM:
            s = kernel.column_sq_sum(x)
            self._open = s if self._open is None else self._open.add_(s)
        else:
            kernel.add_gram(self.stat, x)
        self.tokens += x.numel() // x.shape[-1]

    def close_batch(self) -> None:
        """End a micro-batch: its sum joins the total."""
        if self._open is not None:
            self.stat += self._open
            if self.keep_batches:
                self.batch_sums.append(self._open)
            self._open = None

    @classmethod
    def empty(cls, kind: Stat, width: int, device: torch.device, keep_batches: bool = False) -> "Observation":
        if kind is Stat.SQ_SUM:
            return cls(kind, torch.zeros(width, dtype=torch.float64, device=device), keep_batches=keep_batches)
        return cls(kind, torch.zeros(width, width, dtype=torch.float32, device=device))


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
