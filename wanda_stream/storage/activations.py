"""Hidden states: one raw file per stream and block, read and written in micro-batches, and a copy
in memory (the compute device's, or host memory) while a run keeps them there.

A file holds `n` windows of `seqlen x hidden` values in one dtype, back to back. Reads use
positioned reads into a fresh buffer, so resident memory stays at one micro-batch no matter
how large the file is; a finished file is fsynced and renamed into place, so it is complete
whenever it exists. When the run holds a block's states in memory, the next block reads them
there, and the file is only the resume point, written behind the computation.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from wanda_stream.storage.checkpoint import byte_view, fsync_dir, read_exact
from wanda_stream.storage.state import killpoint

# Called on the writer thread: the host tensor whose bytes go to the file next (waiting for its copy).
Fetch = Callable[[], torch.Tensor]


class HiddenFile:
    """Fixed-shape windows of hidden states in a raw file, and in `memory` while a run holds them there."""

    def __init__(self, path: Path, n: int, seqlen: int, hidden: int, dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.shape = (n, seqlen, hidden)
        self.dtype = dtype
        self.window_bytes = seqlen * hidden * torch.empty(0, dtype=dtype).element_size()
        self.memory: torch.Tensor | None = None  # the same windows, on a device or in host memory
        self._durable: Future | None = None  # the file's fsync and rename, when left to the writer thread

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.window_bytes

    def read(self, start: int, count: int, pin: bool = False) -> torch.Tensor:
        """Windows [start, start+count) [count, seqlen, hidden]: a view of `memory` when it holds them,
        else a fresh CPU tensor read from the file (page-locked with `pin`, for asynchronous copies to CUDA)."""
        if self.memory is not None:
            return self.memory[start : start + count]
        buf = torch.empty((count,) + self.shape[1:], dtype=self.dtype, pin_memory=pin)
        read_exact(self.path, start * self.window_bytes, byte_view(buf))
        return buf

    def wait_durable(self) -> float:
        """Wait until the file written behind the computation is complete and in place; seconds waited.

        A run saves no state naming the file before this returns: the file is the resume point.
        """
        if self._durable is None:
            return 0.0
        t0 = time.perf_counter()
        pending, self._durable = self._durable, None
        pending.result()
        return time.perf_counter() - t0


def bind_device(device: torch.device) -> None:
    """Make `device` this thread's current CUDA device (a no-op on the CPU).

    The current device is per thread: without this, a thread's first pinned allocation or CUDA call
    opens a context on GPU 0, which under torchrun is another rank's card.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_pool(name: str, device: torch.device) -> ThreadPoolExecutor:
    """One background thread bound to the compute device."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=bind_device, initargs=(device,))


class Mover:
    """How hidden states leave the compute: the reader and writer threads, and on CUDA the side streams
    of device-to-host copies.

    The writer pool has one thread: its jobs run in the order submitted, which `HiddenWriter` relies on
    (a file's fsync after its writes).
    """

    def __init__(self, device: torch.device, threads: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.reader = device_pool("hidden-read", device) if threads else None
        self.writer = device_pool("hidden-write", device) if threads else None
        # One side stream for copies the compute thread queues, one for those the writer thread makes.
        self._side = torch.cuda.Stream(device) if self.cuda else None
        self._pull_stream = torch.cuda.Stream(device) if self.cuda else None
        self._pull_buf: torch.Tensor | None = None  # pinned; used by the writer thread only

    def allocate(self, like: HiddenFile, on: torch.device) -> torch.Tensor:
        """Room for every window of `like` on `on` (host memory is page-locked when computing on CUDA)."""
        pin = on.type == "cpu" and self.cuda
        return torch.empty(like.shape, dtype=like.dtype, device=on, pin_memory=pin)

    def keep(self, batch: torch.Tensor, dst: torch.Tensor) -> Fetch:
        """Copy `batch` into `dst` (a slice of memory from `allocate`); returns how the writer thread gets
        its bytes. The caller never waits for the copy to reach the host."""
        if not self.cuda:
            dst.copy_(batch)
            return lambda: dst
        if dst.device.type == "cuda":
            dst.copy_(batch)  # on the compute stream: the next block reads it there, in order
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            return lambda: self._pull(dst, ready)
        done = self._to_host(batch.to(dst.dtype), dst)
        return lambda: _after(done, dst)

    def stage(self, batch: torch.Tensor, dtype: torch.dtype, slot: torch.Tensor | None
              ) -> tuple[Fetch, torch.Tensor | None]:
        """`batch` in host memory for the writer thread, without keeping it; on CUDA through the pinned
        buffer `slot` (replaced by a larger one when it is too small), which the caller must not pass
        again before the write of what was staged in it has finished. Returns the fetch and the buffer."""
        if not self.cuda:
            t = batch.detach().to(device="cpu", dtype=dtype).contiguous()
            return (lambda: t), None
        n = batch.numel()
        if slot is None or slot.numel() < n or slot.dtype != dtype:
            slot = torch.empty(n, dtype=dtype, pin_memory=True)
        dst = slot[:n].view(batch.shape)
        done = self._to_host(batch.detach().to(dtype), dst)
        return (lambda: _after(done, dst)), slot

    def settle(self) -> None:
        """Order later work of the compute stream after every copy queued on the side stream (a block
        that reads host memory this block's outputs were copied into)."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def _to_host(self, src: torch.Tensor, dst: torch.Tensor) -> "torch.cuda.Event":
        """Queue src (device) -> dst (pinned host) on the side stream, after what the compute stream
        has queued so far; the event marks the copy's end."""
        assert self._side is not None
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            dst.copy_(src, non_blocking=True)
        # The compute thread drops `src` now: its memory must not be reused before the copy has run.
        src.record_stream(self._side)
        done = torch.cuda.Event()
        done.record(self._side)
        return done

    def _pull(self, src: torch.Tensor, ready: "torch.cuda.Event") -> torch.Tensor:
        """On the writer thread: `src` (device memory, complete once `ready` fires) copied into the
        writer's pinned buffer. The buffer is reused only after the write of its last contents
        returned, since this thread does both in turn."""
        assert self._pull_stream is not None
        n = src.numel()
        if self._pull_buf is None or self._pull_buf.numel() < n or self._pull_buf.dtype != src.dtype:
            self._pull_buf = torch.empty(n, dtype=src.dtype, pin_memory=True)
        dst = self._pull_buf[:n].view(src.shape)
        self._pull_stream.wait_event(ready)
        with torch.cuda.stream(self._pull_stream):
            dst.copy_(src, non_blocking=True)
        self._pull_stream.synchronize()  # `src` is referenced until here, so its memory stays ours
        return dst

    def close(self) -> None:
        for pool in (self.reader, self.writer):
            if pool is not None:
                pool.shutdown(wait=True)


def _after(done: "torch.cuda.Event", t: torch.Tensor) -> torch.Tensor:
    done.synchronize()
    return t


class HiddenWriter:
    """Writes a HiddenFile sequentially to a temp name; `commit` makes it durable and visible.

    With the mover's writer thread, each micro-batch is written while the caller computes the next.
    Disk only: one write is in flight at most, so memory holds one extra micro-batch, never more.
    With `keep` (a device), the windows are also kept in memory there and become the target's
    `memory` at commit; the writes then never make the caller wait (their bytes are in memory
    already), and with `defer` the fsync and rename are left to the writer thread as well:
    `target.wait_durable()` waits for them.
    """

    def __init__(self, target: HiddenFile, mover: Mover, keep: torch.device | None = None,
                 defer: bool = False) -> None:
        self.target = target
        self.mover = mover
        self.tmp = target.path.with_name(target.path.name + ".partial")
        self.f = open(self.tmp, "wb")
        self.written = 0
        self.waited_s = 0.0  # how long the caller waited for earlier writes
        self._writes: list[Future] = []
        self._memory = mover.allocate(target, keep) if keep is not None else None
        self._defer = defer and keep is not None and mover.writer is not None
        # Disk only, on CUDA: two pinned buffers, used in turn (one is being written while the other fills).
        self._staging: list[torch.Tensor | None] = [None, None]
        self._batches = 0

    def write(self, batch: torch.Tensor) -> None:
        if tuple(batch.shape[1:]) != self.target.shape[1:]:
            raise RuntimeError(f"hidden states of shape {tuple(batch.shape)} do not fit {self.target.shape}")
        count = batch.shape[0]
        if self._memory is not None:
            fetch = self.mover.keep(batch.detach(), self._memory[self.written : self.written + count])
        else:
            self._wait()  # the one write in flight: after it, no write uses the buffer staged two batches ago
            k = self._batches % 2
            fetch, self._staging[k] = self.mover.stage(batch, self.target.dtype, self._staging[k])
        self._batches += 1
        if self.mover.writer is None:
            self.f.write(byte_view(fetch()))
        else:
            self._writes.append(self.mover.writer.submit(lambda: self.f.write(byte_view(fetch()))))
        self.written += count

    def _wait(self) -> None:
        t0 = time.perf_counter()
        pending, self._writes = self._writes, []
        for w in pending:
            w.result()
        self.waited_s += time.perf_counter() - t0

    def commit(self) -> None:
        if self.written != self.target.shape[0]:
            self.abort()
            raise RuntimeError(f"{self.tmp}: {self.written} of {self.target.shape[0]} windows written")
        if self._memory is not None:
            self.mover.settle()
            self.target.memory = self._memory
        if self._defer:
            assert self.mover.writer is not None
            self.target._durable = self.mover.writer.submit(self._finish)
        else:
            self._wait()
            self._finish()

    def _finish(self) -> None:
        # Submitted after the writes on the one writer thread, so they have run: result() only re-raises.
        for w in self._writes:
            w.result()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        killpoint("hidden_commit")
        os.replace(self.tmp, self.target.path)
        fsync_dir(self.target.path.parent)

    def abort(self) -> None:
        try:
            self._wait()
        finally:
            self.f.close()
            self.tmp.unlink(missing_ok=True)


def read_ahead(src: HiddenFile, spans: list[tuple[int, int]], pool: ThreadPoolExecutor | None, pin: bool = False
               ) -> Iterator[tuple[int, int, torch.Tensor, float]]:
    """(start, count, windows, seconds waited) per span of `src`, in order.

    From memory when `src` holds its windows there; else, with a `pool`, the next span is read by
    the pool's thread while the caller works on this one (into page-locked memory with `pin`).
    """
    if src.memory is not None or pool is None:
        for start, count in spans:
            t0 = time.perf_counter()
            h = src.read(start, count, pin)
            yield start, count, h, time.perf_counter() - t0
        return
    ahead = pool.submit(src.read, *spans[0], pin) if spans else None
    for k, (start, count) in enumerate(spans):
        t0 = time.perf_counter()
        h = ahead.result()
        waited = time.perf_counter() - t0
        ahead = pool.submit(src.read, *spans[k + 1], pin) if k + 1 < len(spans) else None
        yield start, count, h, waited


def batches(n: int, size: int) -> list[tuple[int, int]]:
    """(start, count) micro-batches covering n windows."""
    return [(s, min(size, n - s)) for s in range(0, n, size)]
