"""Scratch files of per-micro-batch tensors: what a block streaming its experts keeps per token (the
experts' inputs and routing, the core's outputs, the experts' sums) when memory cannot hold it.

A `BatchFile` holds one record of tensors per micro-batch, back to back in a raw file of the run's work
dir (the records' shapes and dtypes are kept in memory): appended in micro-batch order as a pass through
the block's core makes them, then read back in that order, the next record read ahead by a thread while
the caller works on this one, and a part of a record rewritten in place where the caller changed it. So
writes are sequential, reads go in order, and memory holds two records whatever the file's size.

The files are scratch for one block: nothing resumes from them (a block killed midway restarts, and a
run's clean-up at its (re)start deletes what a kill left behind, see WorkDir.stale), so they are neither
fsynced nor renamed into place; their owner deletes them when the block ends, finished or not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from wanda_stream.storage.checkpoint import byte_view, pread_into, tensor_bytes
from wanda_stream.storage.state import killpoint

Spec = tuple[tuple[int, ...], torch.dtype]


class BatchFile:
    """Records of tensors, one per micro-batch, in the scratch file `path` (created empty, or emptied)."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor | None = None, pin: bool = False) -> None:
        self.path = Path(path)
        self._pool = pool  # reads the next record while the caller works on this one (None: read in turn)
        self._pin = pin  # page-locked reads, for copies to CUDA
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._records: list[tuple[int, list[Spec]]] = []  # per record: its offset, its tensors' shapes and dtypes
        self._end = 0

    def __len__(self) -> int:
        return len(self._records)

    def append(self, tensors: Sequence[torch.Tensor]) -> None:
        """Write a micro-batch's tensors (any device) after the last record."""
        self._records.append((self._end, [(tuple(t.shape), t.dtype) for t in tensors]))
        for t in tensors:
            self._end = self._write(self._end, t)

    def read(self, k: int, parts: range) -> list[torch.Tensor]:
        """Record k's tensors `parts` (indices in the order appended), fresh CPU tensors."""
        offset, specs = self._records[k]
        offset += sum(_nbytes(s) for s in specs[: parts.start])
        out = []
        for shape, dtype in specs[parts.start : parts.stop]:
            t = torch.empty(shape, dtype=dtype, pin_memory=self._pin)
            view = byte_view(t)
            done = pread_into(self._fd, offset, view)
            if done < len(view):
                raise OSError(f"{self.path}: ended at byte {offset + done}; the scratch file was cut short")
            offset += len(view)
            out.append(t)
        return out

    def records(self, parts: range) -> Iterator[list[torch.Tensor]]:
        """Every record's tensors `parts`, in order; the next one is read ahead while the caller holds this one."""
        n = len(self._records)
        if self._pool is None:
            yield from (self.read(k, parts) for k in range(n))
            return
        ahead = self._pool.submit(self.read, 0, parts) if n else None
        try:
            for k in range(n):
                assert ahead is not None
                got = ahead.result()
                ahead = self._pool.submit(self.read, k + 1, parts) if k + 1 < n else None
                yield got
        finally:
            if ahead is not None:  # left early: no read may outlive the file it reads
                wait([ahead])

    def rewrite(self, k: int, part: int, t: torch.Tensor) -> None:
        """Replace tensor `part` of record k by `t`, of the same shape and dtype."""
        offset, specs = self._records[k]
        if specs[part] != (tuple(t.shape), t.dtype):
            raise ValueError(f"{self.path}: record {k} part {part} is {specs[part]}, not {(tuple(t.shape), t.dtype)}")
        self._write(offset + sum(_nbytes(s) for s in specs[:part]), t)
        killpoint("spill_write")

    def delete(self) -> None:
        """Close and remove the file."""
        os.close(self._fd)
        self.path.unlink(missing_ok=True)

    def _write(self, offset: int, t: torch.Tensor) -> int:
        """`t`'s bytes at `offset`; returns the offset after them."""
        view = tensor_bytes(t)
        done = 0
        while done < len(view):
            done += os.pwritev(self._fd, [view[done:]], offset + done)
        return offset + done


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
