"""Data-parallel calibration on torch.distributed: ranks from torchrun's environment, one share of the
calibration micro-batches each, and the few agreements a run needs.

Launched by torchrun (or anything that sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT the way it does), a prune runs on WORLD_SIZE ranks: NCCL when the run
computes on CUDA (rank on cuda:LOCAL_RANK), gloo on the CPU. Without WORLD_SIZE (or with 1) it is
the single-process run, with no process group and every agreement a no-op.

Every collective is bounded by the process group's timeout (`--dist-timeout`); a rank that dies
closes its connections, which the others see at their next collective (gloo at once; NCCL by the
timeout). They then raise PeerLost, which the CLI turns into exit 75 with the state saved.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from wanda_stream.errors import InputError, Interrupted

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class PeerLost(Interrupted):
    """Another rank stopped answering (it died, or was killed): this rank stops too."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = ""

    @classmethod
    def from_env(cls, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> "World":
        """The world torchrun's environment describes; joins its process group when there is more than one rank."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if timeout_s <= 0:
            raise InputError(f"--dist-timeout {timeout_s}: must be a positive number of seconds")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, size, local_rank, local_size, backend)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes output shards, state and report."""
        return self.rank == 0

    @property
    def suffix(self) -> str:
        """What this rank's own files carry in their names ('' for a single process)."""
        return f".r{self.rank}" if self.size > 1 else ""

    def device(self, device: str) -> str:
        """The compute device of this rank: each rank of a CUDA run has its own card."""
        return f"cuda:{self.local_rank}" if self.size > 1 and device.startswith("cuda") else device

    def share(self, n: int, batch: int) -> tuple[int, int]:
        """(first window, count) of this rank's contiguous share of `n` windows, in whole micro-batches.

        Whole micro-batches: the windows run through the blocks in exactly the single-process
        groups, so every micro-batch computes the same bits on any rank.
        """
        batches = -(-n // batch)
        if batches < self.size:
            raise InputError(f"{n} calibration windows in micro-batches of {batch} make {batches} micro-batches, "
                             f"fewer than the {self.size} ranks; raise --nsamples or lower --batch-size")
        lo, hi = batches * self.rank // self.size, batches * (self.rank + 1) // self.size
        return lo * batch, min(hi * batch, n) - lo * batch

    # ---- agreements ---------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """Whether any rank says True (every rank must call it: it is also a barrier)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=self._comm_device())
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return bool(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[T] = [None] * self.size  # type: ignore[list-item]
        self._collective(lambda: dist.all_gather_object(out, obj))
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks in place, in float64 (the result keeps t's dtype)."""
        if self.size > 1:
            wide = t.to(torch.float64)
            self._collective(lambda: dist.all_reduce(wide))
            t.copy_(wide)
        return t

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 alone; every rank returns its result, or raises the InputError or
        Interrupted it raised (so a refusal or a stop on rank 0 ends every rank the same way)."""
        if self.size == 1:
            return fn()
        box: list[object] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except (InputError, Interrupted) as e:
                box[0] = (type(e).__name__, str(e))
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return _unbox(box[0])

    def together(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if any raises InputError, every rank raises the first such message."""
        if self.size == 1:
            return fn()
        try:
            result, error = fn(), None
        except InputError as e:
            result, error = None, str(e)
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise InputError(errors[0])
        return result  # type: ignore[return-value]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def _collective(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (RuntimeError, dist.DistError) as e:
            raise PeerLost(f"rank {self.rank} of {self.size}: another rank stopped answering "
                           f"({str(e).splitlines()[0][:200]})") from None


def _unbox(box: object) -> T:
    kind, value = box  # type: ignore[misc]
    if kind == "InputError":
        raise InputError(value)
    if kind in ("Interrupted", "PeerLost"):
        raise Interrupted(value)
    return value
