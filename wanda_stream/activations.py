"""Hidden states on disk: one raw file per stream and block, read and written in micro-batches.

A file holds `n` windows of `seqlen x hidden` values in one dtype, back to back. Reads use
positioned reads into a fresh buffer, so resident memory stays at one micro-batch no matter
how large the file is; a finished file is fsynced and renamed into place, so it is complete
whenever it exists.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from wanda_stream.checkpoint import byte_view, fsync_dir, read_exact


class HiddenFile:
    """Fixed-shape windows of hidden states in a raw file."""

    def __init__(self, path: Path, n: int, seqlen: int, hidden: int, dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.shape = (n, seqlen, hidden)
        self.dtype = dtype
        self.window_bytes = seqlen * hidden * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.window_bytes

    def read(self, start: int, count: int) -> torch.Tensor:
        """Windows [start, start+count) as a CPU tensor [count, seqlen, hidden]."""
        buf = torch.empty((count,) + self.shape[1:], dtype=self.dtype)
        read_exact(self.path, start * self.window_bytes, byte_view(buf))
        return buf


class HiddenWriter:
    """Writes a HiddenFile sequentially to a temp name; `commit` makes it durable and visible.

    With a `pool`, each micro-batch is written by the pool's thread while the caller computes the
    next; one write is in flight at most, so memory holds one extra micro-batch, never more.
    """

    def __init__(self, target: HiddenFile, pool: ThreadPoolExecutor | None = None) -> None:
        self.target = target
        self.tmp = target.path.with_name(target.path.name + ".partial")
        self.f = open(self.tmp, "wb")
        self.written = 0
        self.waited_s = 0.0  # how long the caller waited for earlier writes
        self._pool = pool
        self._pending: Future | None = None

    def write(self, batch: torch.Tensor) -> None:
        t = batch.detach().to(device="cpu", dtype=self.target.dtype).contiguous()
        if tuple(t.shape[1:]) != self.target.shape[1:]:
            raise RuntimeError(f"hidden states of shape {tuple(t.shape)} do not fit {self.target.shape}")
        self._wait()
        if self._pool is None:
            self.f.write(byte_view(t))
        else:
            self._pending = self._pool.submit(self.f.write, byte_view(t))
        self.written += t.shape[0]

    def _wait(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()
            self.waited_s += time.perf_counter() - t0

    def commit(self) -> None:
        self._wait()
        if self.written != self.target.shape[0]:
            raise RuntimeError(f"{self.tmp}: {self.written} of {self.target.shape[0]} windows written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.target.path)
        fsync_dir(self.target.path.parent)

    def abort(self) -> None:
        try:
            self._wait()
        finally:
            self.f.close()
            self.tmp.unlink(missing_ok=True)


def read_ahead(src: HiddenFile, spans: list[tuple[int, int]], pool: ThreadPoolExecutor | None
               ) -> Iterator[tuple[int, int, torch.Tensor, float]]:
    """(start, count, windows, seconds waited) per span of `src`, in order.

    With a `pool`, the next span is read by the pool's thread while the caller works on this one.
    """
    if pool is None:
        for start, count in spans:
            t0 = time.perf_counter()
            h = src.read(start, count)
            yield start, count, h, time.perf_counter() - t0
        return
    ahead = pool.submit(src.read, *spans[0]) if spans else None
    for k, (start, count) in enumerate(spans):
        t0 = time.perf_counter()
        h = ahead.result()
        waited = time.perf_counter() - t0
        ahead = pool.submit(src.read, *spans[k + 1]) if k + 1 < len(spans) else None
        yield start, count, h, waited


def batches(n: int, size: int) -> list[tuple[int, int]]:
    """(start, count) micro-batches covering n windows."""
    return [(s, min(size, n - s)) for s in range(0, n, size)]
