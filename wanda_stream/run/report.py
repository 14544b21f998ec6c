"""Progress output (tqdm bars, JSON lines or nothing) and the memory and I/O figures of a run."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


PEAK_KEYS = ("peak_rss_bytes", "peak_cuda_bytes", "peak_cuda_reserved_bytes")


def reset_peaks(device: str) -> None:
    """Start the CUDA allocator's high-water marks afresh on `device` (a no-op on the CPU): the
    report's peaks are then this run's, not whatever the process did before."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_cuda(device: str) -> dict[str, int]:
    """The CUDA allocator's high-water marks on `device` for this process, allocated and reserved
    (what the card actually held: the allocator keeps freed blocks); {} on a CPU run."""
    if not device.startswith("cuda"):
        return {}
    import torch

    d = torch.device(device)
    return {"peak_cuda_bytes": torch.cuda.max_memory_allocated(d),
            "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved(d)}


def peak_figures(device: str, other_ranks: Sequence[dict[str, int]] = ()) -> dict[str, int]:
    """The peaks a report records, read now (call it last): the kernel's ru_maxrss and, on a GPU run,
    the CUDA allocator's; each the maximum of this process and `other_ranks`' own figures."""
    out = {"peak_rss_bytes": peak_rss_bytes(), **peak_cuda(device)}
    for other in other_ranks:
        for k, v in other.items():
            out[k] = max(out.get(k, 0), v)
    return out


def io_bytes() -> dict[str, int]:
    """Bytes this process read from and wrote to storage (Linux /proc/self/io; zeros elsewhere)."""
    out = {"read_bytes": 0, "write_bytes": 0}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v)
    except OSError:
        pass
    return out


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from wanda_stream import __version__

    return {
        "wanda_stream": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }


class Progress:
    """One progress channel for a run: 'bar', 'json' (one object per line) or 'quiet'.

    'bar' is a tqdm bar on a terminal; when the stream is not one (a batch job's log file, a pipe)
    it prints one plain line per block instead, as a bar's redraws would be lost or garble the log.
    """

    def __init__(self, mode: str, total: int, desc: str, stream: TextIO | None = None, run: str | None = None) -> None:
        self.stream = stream or sys.stderr
        # A sweep's configuration: named in each JSON event, as several runs write to one log.
        self.tag = {"run": run} if run is not None else {}
        self.mode = "lines" if mode == "bar" and not _is_terminal(self.stream) else mode
        self.total = total
        self.desc = desc
        self.start = time.monotonic()
        self.initial = 0
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="block", file=self.stream, disable=None)

    def begin(self, done: int) -> None:
        """Start counting at `done` blocks finished by an earlier process (a resumed run).

        Rates and the ETA then count only this process's blocks; counting the earlier ones against
        this process's elapsed time would promise a resumed run's end far too soon.
        """
        self.initial = done
        self.start = time.monotonic()
        if self.bar is not None:
            self.bar.initial = done
            self.bar.reset(total=self.total)
            self.bar.n = done
            self.bar.refresh()

    def _elapsed_eta(self, done: int) -> tuple[float, float | None]:
        """Seconds since begin() and the estimated seconds left, from this process's blocks only."""
        elapsed = time.monotonic() - self.start
        this_run = done - self.initial
        rate = this_run / elapsed if this_run > 0 and elapsed > 0 else 0.0
        return elapsed, (self.total - done) / rate if rate else None

    def update(self, done: int, **fields: Any) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        elif self.mode == "json":
            elapsed, eta = self._elapsed_eta(done)
            rec = {"event": "block", **self.tag, "done": done, "total": self.total, "resumed_from": self.initial,
                   "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 1),
                   "peak_rss_bytes": peak_rss_bytes(), **fields}
            print(json.dumps(rec), file=self.stream, flush=True)
        elif self.mode == "lines":
            elapsed, eta = self._elapsed_eta(done)
            print(f"{self.desc}: block {done}/{self.total}, elapsed {_clock(elapsed)}, "
                  f"ETA {'?' if eta is None else _clock(eta)}, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB",
                  file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "json":
            print(json.dumps({"event": "message", **self.tag, "text": text}), file=self.stream, flush=True)
        elif self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a descriptor
        return False


def _clock(seconds: float) -> str:
    """3725.4 -> '1:02:05'."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
