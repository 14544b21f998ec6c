"""Block-output reconstruction: with the masks fixed, fit the kept weights of one decoder block so that the
pruned block's outputs match the dense block's outputs on the calibration inputs.

The idea of BESA (Xu et al., ICLR 2024), SAFE/SAFE+ (ICML 2025), Wanda++'s regional optimisation
(Yang et al., 2025) and "A Free Lunch in LLM Compression" (2025): after a layer-wise method chose the
masks, the whole block is tuned, mask held, on min sum ||B_pruned(X) - B_dense(X)||^2 over the
calibration windows X the pruned model feeds it, which also corrects how the matrices' errors combine
through the block's non-linearities (what a layer-wise objective cannot see).

This module is the pure loop: a block forward, the trainable float32 weights with their masks, and a
window fetch in, the fitted weights (in place) and a record out. No files, no ranks, no model names:
`wanda_stream.run.prune` wires it to the hidden-state streams and the ranks' exchange.

Deterministic by construction: the windows of every step are a fixed function of the window count and
the step size (no shuffling, nothing random); each window's gradient is its own backward pass, and a
step's gradient is the sum of its windows' gradients in window order, however the windows are spread
over ranks (each rank computes the windows it holds, then `exchange` hands every window's part to every
rank, one window after another in window order, and each rank adds them up as it goes). So a run gives
the same bytes on rerun, after a resume, and on any number of ranks. On CUDA that needs one
more thing (`fit_attention`): attention's backward by the math kernel, not the fused ones.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanda_stream.errors import InputError

PAPERS = ("Xu et al., ICLR 2024, BESA: Pruning Large Language Models with Blockwise Parameter-Efficient "
          "Sparsity Allocation; SAFE/SAFE+ (ICML 2025); Yang et al. 2025, Wanda++: Pruning Large Language "
          "Models via Regional Gradients; A Free Lunch in LLM Compression (2025)")

# One window's (input, dense target), each [1, seqlen, hidden], on the compute device.
Window = tuple[torch.Tensor, torch.Tensor]
# One window's share of a step: (window index, its loss, its gradient per trainable weight).
Part = tuple[int, float, list[torch.Tensor]]
# Window j's part on every rank: given by the rank that holds it (its own part), received by the others (None).
Exchange = Callable[[int, Part | None], Part]


def held_here(j: int, part: Part | None) -> Part:
    """The exchange of a single process, which holds every window."""
    assert part is not None, f"window {j} is held by no process"
    return part


@dataclass(frozen=True)
class Reconstruct:
    """The options of --reconstruct (defaults measured on SmolLM2-135M; docs/methods.md)."""

    epochs: int = field(default=2, metadata={"flag": "--reconstruct-epochs",
                                            "help": "passes over the calibration windows per block"})
    lr: float = field(default=1e-3, metadata={"flag": "--reconstruct-lr",
                                             "help": "Adam's peak learning rate (cosine decay to 0 over the block's steps)"})
    batch: int = field(default=1, metadata={"flag": "--reconstruct-batch",
                                           "help": "calibration windows per optimiser step (under torchrun, "
                                                   "the ranks share each step's windows)"})

    def check(self, windows: int) -> None:
        """InputError naming the flag for a value the fit cannot use with `windows` calibration windows."""
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"--reconstruct-epochs {self.epochs}: must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--reconstruct-lr {self.lr}: must be a positive number, e.g. 1e-4")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise InputError(f"--reconstruct-batch {self.batch}: must be a positive integer")
        if self.batch > windows:
            raise InputError(f"--reconstruct-batch {self.batch}: more than the {windows} calibration windows "
                             f"(--nsamples); use at most {windows}")

    def to_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "batch": self.batch}


def step_windows(n: int, batch: int) -> list[list[int]]:
    """The windows of each optimiser step of one epoch: ceil(n / batch) steps, step s taking windows
    s, s + S, s + 2S, ... (S the step count).

    Strided rather than contiguous: ranks hold contiguous shares of the windows, so every rank holds
    a part of every step and they compute it side by side; the steps are the same at any rank count.
    """
    steps = -(-n // batch)
    return [list(range(s, n, steps)) for s in range(steps)]


def cosine_lr(lr: float, step: int, total: int) -> float:
    """Step `step` (0-based) of `total`: lr * (1 + cos(pi * step / total)) / 2, from lr down towards 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


@dataclass
class FitRecord:
    """What a fit reports: the mean squared error per output element of each epoch (each step's windows
    measured before its update), the steps taken, and seconds."""

    epoch_mse: list[float]
    steps: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"epoch_mse": self.epoch_mse, "steps": self.steps, "seconds": round(self.seconds, 3)}


def fit_attention(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context a fit on `device` runs in: on CUDA, scaled-dot-product attention by its math kernel only.

    The fused kernels' backward passes are not deterministic on CUDA (the memory-efficient one, which float32
    inputs get, splits the keys and adds their gradients by atomics; cuDNN's likewise), so the same windows
    would give other gradients, and other fitted bytes, on every run and resume. The math kernel is plain
    matrix products. Elsewhere (the CPU) nothing changes: its kernels are deterministic already.
    """
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cuda" else contextlib.nullcontext()


def fit_block(
    forward: Callable[[torch.Tensor], torch.Tensor],
    weights: Sequence[torch.Tensor],
    removed: Sequence[torch.Tensor | None],
    n_windows: int,
    held: range,
    fetch: Callable[[int], Window],
    opts: Reconstruct,
    exchange: Exchange = held_here,
    stop: Callable[[], bool] = lambda: False,
) -> FitRecord | None:
    """Fit `weights` (float32 leaf tensors the block `forward` reads) in place with Adam, so that
    forward(x) matches the dense target y of every calibration window; None when `stop` said so.

    `removed[k]` is True where weight k was pruned (None: nothing removed): those gradients are zeroed,
    so Adam's moments and the weights stay exact zeros there (and they are zeroed again after each step,
    so no rounding can revive one). `held` is the range of window indices (of `n_windows`) this process
    holds, `fetch(j)` window j's (input, target). Each step's loss is the mean squared error over its
    windows' output elements; its gradient the sum, in window order, of every window's own gradient,
    the windows of other ranks coming through `exchange` (called for every window of the step, in window
    order, on every rank: with this process's part where it holds the window, else None).
    The learning rate decays from `opts.lr` along a cosine over the block's steps. On CUDA, call it under
    `fit_attention`.
    """
    t0 = time.perf_counter()
    steps = step_windows(n_windows, opts.batch)
    total = opts.epochs * len(steps)
    optim = torch.optim.Adam(list(weights), lr=opts.lr, foreach=False)
    epoch_mse: list[float] = []
    step = 0
    for _ in range(opts.epochs):
        mse = 0.0
        for windows in steps:
            if stop():
                return None
            own = {j: _window_grad(j, forward, weights, *fetch(j), len(windows)) for j in windows if j in held}
            losses, grads = _sum_in_order(windows, own, exchange, weights)
            for g, mask in zip(grads, removed):
                if mask is not None:
                    g.masked_fill_(mask, 0)
            for group in optim.param_groups:
                group["lr"] = cosine_lr(opts.lr, step, total)
            for w, g in zip(weights, grads):
                w.grad = g
            optim.step()
            optim.zero_grad(set_to_none=True)
            with torch.no_grad():
                for w, mask in zip(weights, removed):
                    if mask is not None:
                        w.masked_fill_(mask, 0)
            step += 1
            mse += sum(losses)  # in window order: the same figure on any number of ranks
            del own, grads
        epoch_mse.append(mse / len(steps))
    return FitRecord(epoch_mse, step, time.perf_counter() - t0)


def _window_grad(j: int, forward: Callable[[torch.Tensor], torch.Tensor], weights: Sequence[torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, step_windows_count: int) -> Part:
    """One window's share of its step's loss, mean((B(x) - y)^2) / windows in the step, and its gradient
    (detached, one tensor per weight). Computed in float32 whatever the block's dtype."""
    with torch.enable_grad():
        out = forward(x)
        diff = out.float() - y.float()
        loss = (diff * diff).mean() / step_windows_count
        grads = torch.autograd.grad(loss, list(weights))
    return j, float(loss.detach()), [g.detach() for g in grads]


def _sum_in_order(windows: list[int], own: dict[int, Part], exchange: Exchange, like: Sequence[torch.Tensor]
                  ) -> tuple[list[float], list[torch.Tensor]]:
    """Every window's loss, and the sum of their gradients added one window after another in window order.

    One window's part is alive at a time besides the sum and this process's own parts, so ranks never hold
    a whole step's gradients; and the additions are the same, in the same order, on any number of ranks.
    """
    losses: list[float] = []
    out: list[torch.Tensor] = []
    for j in windows:
        _, loss, grads = exchange(j, own.pop(j, None))
        losses.append(loss)
        if not out:
            out = [g.to(w.device).clone() for g, w in zip(grads, like)]
        else:
            for acc, g in zip(out, grads):
                acc.add_(g.to(acc.device))
        del grads
    return losses, out
