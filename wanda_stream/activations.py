"""Hidden states on disk: one raw file per stream and block, read and written in micro-batches.

A file holds `n` windows of `seqlen x hidden` values in one dtype, back to back. Reads use
positioned reads into a fresh buffer, so resident memory stays at one micro-batch no matter
how large the file is; a finished file is fsynced and renamed into place, so it is complete
whenever it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wanda_stream.checkpoint import fsync_dir


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
        view = memoryview(buf.view(torch.uint8).reshape(-1).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset, done = start * self.window_bytes, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise RuntimeError(f"{self.path}: short read at byte {offset + done}")
                done += got
        finally:
            os.close(fd)
        return buf


class HiddenWriter:
    """Writes a HiddenFile sequentially to a temp name; `commit` makes it durable and visible."""

    def __init__(self, target: HiddenFile) -> None:
        self.target = target
        self.tmp = target.path.with_name(target.path.name + ".partial")
        self.f = open(self.tmp, "wb")
        self.written = 0

    def write(self, batch: torch.Tensor) -> None:
        t = batch.detach().to(device="cpu", dtype=self.target.dtype).contiguous()
        if tuple(t.shape[1:]) != self.target.shape[1:]:
            raise RuntimeError(f"hidden states of shape {tuple(t.shape)} do not fit {self.target.shape}")
        self.f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self.written += t.shape[0]

    def commit(self) -> None:
        if self.written != self.target.shape[0]:
            raise RuntimeError(f"{self.tmp}: {self.written} of {self.target.shape[0]} windows written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.target.path)
        fsync_dir(self.target.path.parent)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def batches(n: int, size: int) -> list[tuple[int, int]]:
    """(start, count) micro-batches covering n windows."""
    return [(s, min(size, n - s)) for s in range(0, n, size)]
