"""Data-parallel calibration on torch.distributed: ranks from torchrun's environment, one share of the
calibration micro-batches each, and the few agreements a run needs.

Launched by torchrun (or anything that sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT the way it does), a prune runs on WORLD_SIZE ranks: NCCL when the run
computes on CUDA (rank on cuda:LOCAL_RANK), gloo on the CPU. Without WORLD_SIZE (or with 1) it is
the single-process run, with no process group and every agreement a no-op.

Agreements (the stop flag, gathers and broadcasts of Python objects) run on a gloo group beside the
compute group: a rank that dies closes its gloo connections, which the others see at their next
agreement at once, on CUDA as on the CPU. Only tensor sums (Gram matrices) ride on NCCL, and they
wait in blocking mode (TORCH_NCCL_BLOCKING_WAIT), so a lost peer there surfaces as an error in this
thread by the timeout instead of NCCL's watchdog aborting the process. A timeout or a lost
connection raises PeerLost, which the CLI turns into exit 75 with the state saved; any other error
of a collective (a NCCL configuration error, out of memory) stays an error (exit 1), so that a batch
script does not requeue a job that can never succeed.

WANDA_STREAM_DIST_BACKEND=gloo runs a CUDA run on gloo alone (CUDA tensors summed by gloo): for two
ranks on one card, which NCCL refuses.

Work that one rank does while the others wait before the run starts (a hub download, C4 or lm-eval
windows: hours for a 70B model on a slow link) runs under a separate group with SETUP_TIMEOUT_S.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from wanda_stream.errors import InputError, Interrupted

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0
SETUP_TIMEOUT_S = 24 * 3600.0
# gloo with CUDA tensors where NCCL cannot run (two ranks on one card: NCCL refuses a duplicate GPU).
BACKEND_ENV = "WANDA_STREAM_DIST_BACKEND"
# What torch.distributed's errors say when a peer is gone or did not answer in time (gloo, NCCL, the store).
PEER_LOSS_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "connection refused",
                     "broken pipe", "remote process exited", "ncclremoteerror", "socket closed", "end of file",
                     "network error")


class PeerLost(Interrupted):
    """Another rank stopped answering (it died, or was killed): this rank stops too."""


def window_share(n: int, batch: int, rank: int, size: int) -> tuple[int, int]:
    """(first window, count) of rank `rank`'s contiguous share, of `size` ranks, of `n` windows in whole
    micro-batches of `batch` (see World.share); the count is 0 for a rank left without a micro-batch. Also
    what the preflight sizes each rank's hidden states by, before any rank starts."""
    batches = -(-n // batch)
    lo, hi = batches * rank // size, batches * (rank + 1) // size
    return lo * batch, min(hi * batch, n) - lo * batch


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = ""
    cuda_index: int = 0  # this rank's card among the visible ones
    agree_group: object = field(default=None, compare=False)  # gloo: agreements during the run
    setup_group: object = field(default=None, compare=False)  # gloo, SETUP_TIMEOUT_S: one-rank setup work

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
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
        if backend not in ("nccl", "gloo") or (backend == "nccl" and not cuda):
            raise InputError(f"{BACKEND_ENV}={backend}: use gloo, or nccl with --device cuda")
        index = 0
        if cuda:
            index = rank_cuda_index(local_rank, torch.cuda.device_count())
            torch.cuda.set_device(index)
            # The one wait on NCCL (a tensor sum) then raises here on a timeout; NCCL's watchdog would abort.
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout)
        agree = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        setup = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S)))
        return cls(rank, size, local_rank, local_size, backend, index, agree, setup)

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
        return f"cuda:{self.cuda_index}" if self.size > 1 and device.startswith("cuda") else device

    def share(self, n: int, batch: int, allow_empty: bool = False) -> tuple[int, int]:
        """(first window, count) of this rank's contiguous share of `n` windows, in whole micro-batches.

        Whole micro-batches: the windows run through the blocks in exactly the single-process
        groups, so every micro-batch computes the same bits on any rank. `allow_empty`: with fewer
        micro-batches than ranks, some ranks get none (evaluation windows) instead of a refusal.
        """
        batches = -(-n // batch)
        if batches < self.size and not allow_empty:
            raise InputError(f"{n} calibration windows in micro-batches of {batch} make {batches} micro-batches, "
                             f"fewer than the {self.size} ranks; raise --nsamples or lower --batch-size")
        return window_share(n, batch, self.rank, self.size)

    # ---- agreements ---------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """Whether any rank says True (every rank must call it: it is also a barrier)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.agree_group))
        return bool(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[T] = [None] * self.size  # type: ignore[list-item]
        self._collective(lambda: dist.all_gather_object(out, obj, group=self.agree_group))
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks in place, in float64 (the result keeps t's dtype)."""
        if self.size > 1:
            wide = t.to(torch.float64)
            self._collective(lambda: dist.all_reduce(wide, async_op=True).wait())
            t.copy_(wide)
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """`t` as rank `src` holds it, on every rank, in place (bit for bit; NCCL moves it through the card)."""
        if self.size > 1:
            device = torch.device("cuda", self.cuda_index) if self.backend == "nccl" else t.device
            buf = t.to(device).contiguous() if t.device != device or not t.is_contiguous() else t
            self._collective(lambda: dist.broadcast(buf, src=src, async_op=True).wait())
            if buf is not t:
                t.copy_(buf)
        return t

    def on_main(self, fn: Callable[[], T], setup: bool = False) -> T:
        """Run `fn` on rank 0 alone; every rank returns its result, or raises the InputError or
        Interrupted it raised (so a refusal or a stop on rank 0 ends every rank the same way).

        `setup`: work that may take hours (downloads, building windows): the others wait for it under
        SETUP_TIMEOUT_S rather than --dist-timeout.
        """
        if self.size == 1:
            return fn()
        box: list[object] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except (InputError, Interrupted) as e:
                box[0] = (type(e).__name__, str(e))
        group = self.setup_group if setup else self.agree_group
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=group))
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

    def _collective(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (RuntimeError, dist.DistError) as e:
            if not is_peer_loss(e):
                raise
            raise PeerLost(f"rank {self.rank} of {self.size}: another rank stopped answering "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def assign_by_cost(costs: dict[str, float], ranks: int) -> dict[str, int]:
    """The rank that does each piece of work: the costliest first, each to the least loaded rank (the lower
    rank on ties); a function of the names and costs only, so every rank computes the same assignment."""
    load = [0.0] * ranks
    out: dict[str, int] = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(ranks), key=lambda j: (load[j], j))
        out[key] = r
        load[r] += costs[key]
    return out


def is_peer_loss(e: BaseException) -> bool:
    """Whether a collective's error means a peer is gone or did not answer in time (then a requeue can
    help), rather than a configuration error or an out-of-memory (where it never would)."""
    if isinstance(e, dist.DistNetworkError):
        return True
    text = str(e).lower()
    return any(m in text for m in PEER_LOSS_MARKERS)


def rank_cuda_index(local_rank: int, visible: int) -> int:
    """The card of the rank with this LOCAL_RANK among `visible` cards: its own when every rank of the
    node sees all of them; the only one when the scheduler gives each rank one (SLURM --gpus-per-task)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise InputError(f"LOCAL_RANK {local_rank}: only {visible} CUDA device(s) visible to this rank; start at most "
                     f"{visible} ranks per node, or give each rank one card (CUDA_VISIBLE_DEVICES)")


def _unbox(box: object) -> T:
    kind, value = box  # type: ignore[misc]
    if kind == "InputError":
        raise InputError(value)
    if kind in ("Interrupted", "PeerLost"):
        raise Interrupted(value)
    return value
