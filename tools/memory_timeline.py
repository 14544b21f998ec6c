"""Where a prune's peak memory goes: the kernel's high-water mark over time, beside what the run was doing.

    python tools/memory_timeline.py --json timeline.json -- prune MODEL OUT --nsamples 4 --seqlen 128 --device cpu

Runs `wanda-stream ARGS...` in this process. A sampler thread reads the kernel's high-water mark
(VmHWM of /proc/self/status) every --interval seconds and resets it (writing 5 to /proc/self/clear_refs),
so every interval gets the true peak of its own, not a sample. Around the run's steps (block reads
on the prefetch thread, shard writes on the writer thread, materializing, observing, pruning and
propagating a block on the main thread) it records start and end times and the bytes of the tensors
involved. It prints the peak, the steps in progress at that moment, and the largest interval peak
of each main-thread step. SIGUSR1 writes the timeline so far (--json) and exits: for a run that is
stopped once its peak has passed. Linux only (clear_refs needs Linux 4.0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Timeline:
    """Interval peaks of the resident set, and spans of named steps (thread, start, end, bytes)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.t0 = time.perf_counter()
        self.peaks: list[tuple[float, int]] = []  # (end of interval, high-water KiB within it)
        self.spans: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _sample(self) -> None:
        while not self._stop.is_set():
            hwm = _status_kib("VmHWM")
            _reset_hwm()
            self.peaks.append((self.now(), hwm))
            self._stop.wait(self.interval)

    def start(self) -> None:
        _reset_hwm()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peaks.append((self.now(), _status_kib("VmHWM")))

    def wrap(self, owner: Any, name: str, label: str, size: Callable[..., int] | None = None) -> None:
        """Record every call of owner.name as a span called `label` (with `size(*args, result)` bytes)."""
        fn = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            out = fn(*args, **kwargs)
            span = {"step": label, "thread": threading.current_thread().name, "start": start, "end": self.now()}
            if size is not None:
                span["bytes"] = size(*args, out)
            self.spans.append(span)
            return out

        setattr(owner, name, wrapped)

    def active(self, t: float, slack: float) -> list[dict[str, Any]]:
        """Steps in progress within `slack` seconds of `t`."""
        return [s for s in self.spans if s["start"] - slack <= t <= s["end"] + slack]


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def instrument(tl: Timeline) -> None:
    """Wrap the run's steps; sizes are the tensors each step makes or hands on."""
    from torch import nn

    from wanda_stream.run import block, prune
    from wanda_stream.model import stream

    def read_size(_st: Any, _i: int, out: Any) -> int:
        return _tensor_bytes(out[0].values())

    def layer_size(_st: Any, _i: int, _stored: Any, layer: nn.Module) -> int:
        return _tensor_bytes(p for p in layer.parameters())

    def shard_size(_run: Any, _i: int, tensors: dict, _out: Any) -> int:
        return _tensor_bytes(tensors.values())

    tl.wrap(stream.Streamer, "_read_block", "read block (prefetch thread)", read_size)
    tl.wrap(stream.Streamer, "load_block", "materialize block (compute dtype)", layer_size)
    tl.wrap(stream.Streamer, "run_block", "run block over hidden states")
    tl.wrap(prune, "observe_all", "observe (dense block, every statistic)")  # as the run calls it
    tl.wrap(block, "check_finite", "check the statistics are finite")
    from wanda_stream.methods import fidelity, sparsegpt

    tl.wrap(sparsegpt.SparseGPT, "prepare", "SparseGPT: factor a Hessian", lambda s, o, out: _tensor_bytes([out.upper]))
    tl.wrap(sparsegpt, "sparsegpt_prune", "SparseGPT: column loop of a matrix",
            lambda w, *rest: w.numel() * 4)
    tl.wrap(fidelity, "layer_error", "layer-wise error of a matrix")
    tl.wrap(prune, "prune_block", "prune matrices")
    tl.wrap(prune.PruneRun, "_write_block_shard", "write shard (writer thread)", shard_size)
    tl.wrap(prune.PruneRun, "_start", "stem shard and block-0 hidden states")
    tl.wrap(prune.PruneRun, "_finalize", "finalize (side files, card, index, report)")


def report(tl: Timeline, top: int) -> dict[str, Any]:
    """The peak, what was in progress then, and each step's largest interval peak."""
    peak_t, peak = max(tl.peaks, key=lambda p: p[1])
    active = tl.active(peak_t, tl.interval)
    by_step: dict[str, int] = {}
    for i, (t, hwm) in enumerate(tl.peaks):
        begin = tl.peaks[i - 1][0] if i else 0.0
        for s in tl.spans:
            if s["start"] <= t and s["end"] >= begin and s["thread"] == "MainThread":
                by_step[s["step"]] = max(by_step.get(s["step"], 0), hwm)
    worst = sorted(tl.peaks, key=lambda p: -p[1])[:top]
    return {"peak_mib": peak / 1024, "peak_at_s": round(peak_t, 3),
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "active_at_peak": active, "step_peaks_mib": {k: v / 1024 for k, v in by_step.items()},
            "worst_intervals": [{"t": round(t, 3), "mib": v / 1024,
                                 "active": sorted({s["step"] for s in tl.active(t, tl.interval)})} for t, v in worst],
            "spans": tl.spans, "peaks": tl.peaks}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.01, help="seconds per high-water interval")
    p.add_argument("--top", type=int, default=8, help="print this many of the highest intervals")
    p.add_argument("--json", type=Path, default=None, help="also write the whole timeline here")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the wanda-stream command line")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    from wanda_stream.cli import main as cli_main

    tl = Timeline(a.interval)
    instrument(tl)

    def dump_and_exit(signum: int, frame: Any) -> None:
        # SIGUSR1: the timeline so far, for a run stopped once its peak has passed (a 70B SparseGPT block
        # takes an hour here; its peak comes in the first minutes). The CLI keeps SIGTERM for itself.
        tl.peaks.append((tl.now(), _status_kib("VmHWM")))
        r = report(tl, a.top)
        print(f"stopped by SIGUSR1 at {tl.now():.2f} s; peak {r['peak_mib']:.0f} MiB at {r['peak_at_s']:.2f} s",
              flush=True)
        if a.json:
            a.json.write_text(json.dumps(r, indent=1) + "\n")
        os._exit(128 + signum)

    signal.signal(signal.SIGUSR1, dump_and_exit)
    tl.start()
    try:
        rc = cli_main(args)
    finally:
        tl.stop()
    r = report(tl, a.top)
    print(f"peak {r['peak_mib']:.0f} MiB at {r['peak_at_s']:.2f} s (this process's ru_maxrss after the resets: "
          f"{r['ru_maxrss_mib']:.0f} MiB); in progress then:")
    for s in r["active_at_peak"]:
        size = f", {s['bytes'] / MiB:.0f} MiB" if "bytes" in s else ""
        print(f"  {s['step']} [{s['thread']}] {s['start']:.2f}-{s['end']:.2f} s{size}")
    print("highest interval peak within each main-thread step (MiB):")
    for step, mib in sorted(r["step_peaks_mib"].items(), key=lambda kv: -kv[1]):
        print(f"  {mib:7.0f}  {step}")
    print(f"the {a.top} highest intervals:")
    for w in r["worst_intervals"]:
        print(f"  {w['t']:8.2f} s {w['mib']:7.0f} MiB  {', '.join(w['active'])}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
