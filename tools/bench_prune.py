"""Benchmark the streamed pruner against the in-memory approach on one checkpoint and one setting.

    python tools/bench_prune.py MODEL_DIR --nsamples 4 --seqlen 128 --device cpu
    python tools/bench_prune.py MODEL_DIR --runs streamer,streamer-no-prefetch,in-memory --json out.json
    python tools/bench_prune.py MODEL_DIR --runs streamer --method sparsegpt --nproc 2 --threads 1
    python tools/bench_prune.py MODEL_DIR --runs streamer,streamer-states-on-disk
    python tools/bench_prune.py MODEL_DIR --runs streamer --nproc 2 --flags '--reconstruct --reconstruct-batch 4'

Every run is its own process: `streamer` is `wanda-stream prune`, `streamer-no-prefetch` the same
with --no-prefetch (block reads and shard writes in series with the compute), `streamer-states-on-disk`
the same with --states-on-disk (hidden states read back from their files every block), and `in-memory`
loads the whole model with transformers, prunes it layer by layer with the same Wanda kernel
(the original Wanda code's loop) and saves it with save_pretrained. For each the table shows wall
time, peak RSS (the kernel's ru_maxrss of the child), bytes that reached the disk (read_bytes,
write_bytes of /proc/<pid>/io, read just before the child is reaped) and bytes passed through
read()/write() including page-cache hits (rchar, wchar), and blocks per second. Page caches are
dropped before each run when permitted (root), so read_bytes counts real reads. A run that fails
(out of memory: killed by the --mem-limit RSS watchdog, or an allocation failed) is shown with its status.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

RUNS = ("streamer", "streamer-no-prefetch", "streamer-states-on-disk", "in-memory")
DEFAULT_RUNS = ("streamer", "streamer-no-prefetch", "in-memory")
IO_FIELDS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")
OOM_MARKERS = ("can't allocate memory", "Cannot allocate memory", "MemoryError", "out of memory", "std::bad_alloc")
GiB = 2**30
# The watchdog stops a run before the machine itself runs this low.
MIN_AVAILABLE = 1 * GiB


# ---- measuring a child process ------------------------------------------------------------
def read_proc_io(pid: int) -> dict[str, int] | None:
    """The /proc/<pid>/io counters (whole process, all threads), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            pairs = (line.split(":") for line in f if ":" in line)
            return {k.strip(): int(v) for k, v in pairs if k.strip() in IO_FIELDS}
    except (OSError, ValueError):
        return None


def drop_caches() -> bool:
    """Write back and drop the page cache so the next run's reads come from the disk; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict_files(model_dir: Path) -> None:
    """Drop only the checkpoint's files from the page cache (posix_fadvise DONTNEED), so the run reads
    them from storage: on a shared host, dropping every cache would slow the other jobs."""
    for p in model_dir.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rss_bytes(pid: int) -> int:
    """Current resident set size of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left of the group


def measure(cmd: list[str], log: Path, mem_limit: int, env: dict[str, str] | None = None,
            timeout: float = 0) -> dict[str, Any]:
    """Run `cmd` and return its status, wall time, peak RSS and I/O counters.

    The child is waited for without being reaped (waitid WNOWAIT), so its final /proc/<pid>/io
    is still readable; then wait4 reaps it and gives its rusage (peak RSS), even when it was killed.
    A watchdog kills it (SIGKILL, reported as OOM) when its RSS passes `mem_limit`, or when the
    machine's available memory falls under MIN_AVAILABLE: on a shared host the kernel's OOM
    killer must never have to choose a victim. (An address-space cap is no substitute: a torch
    process maps several times more address space than it touches.)
    """
    killed_at, timed_out = 0, False
    with open(log, "w") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        last_io: dict[str, int] | None = None
        while True:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            io = read_proc_io(proc.pid)
            last_io = io or last_io
            if info is not None:
                break
            rss = rss_bytes(proc.pid)
            if not killed_at and ((mem_limit and rss > mem_limit)
                                  or psutil.virtual_memory().available < MIN_AVAILABLE):
                killed_at = rss
                _kill_group(proc.pid)
            if timeout and not timed_out and time.monotonic() - t0 > timeout:
                timed_out = True
                _kill_group(proc.pid)
            time.sleep(0.1)
        wall = time.monotonic() - t0
        _kill_group(proc.pid)  # the child is a zombie until wait4: its group id still names its strays
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace")[-4000:]
    rc = proc.returncode
    if rc == 0:
        state = "ok"
    elif timed_out:
        state = f"timed out (killed after {timeout:.0f} s)"
    elif killed_at:
        state = f"OOM (killed at {killed_at / GiB:.1f} GiB RSS)"
    elif rc == -signal.SIGKILL:
        state = "OOM (killed)"
    elif any(m in tail for m in OOM_MARKERS):
        state = "OOM (allocation failed)"
    else:
        state = f"failed (exit {rc})"
    return {"status": state, "exit": rc, "wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "io": last_io or {},
            "load_avg_1m": os.getloadavg()[0], "log_tail": tail[-1500:] if rc else ""}


# ---- the in-memory approach (runs in the child) ---------------------------------------------
def in_memory_prune(model_dir: str, out_dir: str, nsamples: int, seqlen: int, sparsity: float, seed: int,
                    device: str, compute_dtype: str, batch: int) -> None:
    """Load the whole model with transformers, prune every decoder linear with Wanda, save it.

    The loop of the original Wanda code: catch block 0's inputs, then for each block sum the
    squared inputs of its linears, mask them with the same kernel as the streamer, and run the
    pruned block to get the next block's inputs. Everything stays in memory.
    """
    from transformers import AutoModelForCausalLM

    from wanda_stream.run import calib
    from wanda_stream.methods import kernel
    from wanda_stream.storage.checkpoint import Checkpoint
    from wanda_stream.run.block import linear_modules

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    ckpt = Checkpoint(model_dir)
    stored_dtype = next(i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point)
    tok = calib.load_tokenizer(Path(model_dir))
    ids = calib.sample_windows(calib.documents("pydoc"), tok, nsamples, seqlen, seed, "pydoc")
    layers = model.get_decoder().layers
    inputs: list[tuple[torch.Tensor, dict[str, Any]]] = []

    class Caught(Exception):
        pass

    def catch(_: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "hidden_states")}
        kw["use_cache"] = False
        inputs.append((hs, kw))
        raise Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for s in range(0, nsamples, batch):
            try:
                model(input_ids=ids[s : s + batch].to(device), use_cache=False)
            except Caught:
                pass
    handle.remove()
    with torch.no_grad():
        for layer in layers:
            sums: dict[str, torch.Tensor] = {}
            hooks = []
            for name, mod in linear_modules(layer).items():
                sums[name] = torch.zeros(mod.in_features, dtype=torch.float64, device=device)
                def hook(m: Any, args: tuple, out: Any, name: str = name) -> None:
                    sums[name] += kernel.column_sq_sum(args[0])

                hooks.append(mod.register_forward_hook(hook))
            for hs, kw in inputs:
                layer(hs, **kw)
            for h in hooks:
                h.remove()
            for name, mod in linear_modules(layer).items():
                mod.weight.masked_fill_(kernel.wanda_mask(mod.weight, sums[name], sparsity), 0)
            inputs = [((lambda o: o[0] if isinstance(o, tuple) else o)(layer(hs, **kw)), kw) for hs, kw in inputs]
    model.to(stored_dtype)
    model.save_pretrained(out_dir, max_shard_size="5GB")


# ---- the benchmark --------------------------------------------------------------------------
def checkpoint_facts(model_dir: Path) -> dict[str, Any]:
    from wanda_stream.model.stream import open_model

    ckpt, sk = open_model(model_dir)
    return {"bytes": ckpt.total_bytes(), "file_bytes": sum((model_dir / f).stat().st_size for f in ckpt.files),
            "n_layers": sk.n_layers, "hidden": sk.hidden_size(), "model_type": sk.model.config.model_type}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
           "gpu": None, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def command(kind: str, a: argparse.Namespace, out: Path) -> list[str]:
    if kind == "in-memory":
        spec = json.dumps({"model_dir": str(a.model_dir), "out_dir": str(out), "nsamples": a.nsamples,
                           "seqlen": a.seqlen, "sparsity": a.sparsity or 0.5, "seed": a.seed, "device": a.device,
                           "compute_dtype": a.compute_dtype_resolved, "batch": a.batch_size_resolved})
        return [sys.executable, str(Path(__file__).resolve()), "--in-memory-child", spec]
    launcher = [sys.executable, "-m", "wanda_stream"]
    if a.timeline is not None:  # the same CLI, run inside memory_timeline.py's sampler (one rank only)
        launcher = [sys.executable, str(Path(__file__).resolve().parent / "memory_timeline.py"),
                    "--interval", "0.05", "--json", str(a.timeline.resolve().with_suffix(f".{kind}.json")), "--"]
    if a.nproc > 1:  # torchrun's launcher; its workers' usage is counted in its own once it reaps them
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
                    "--master-port", str(free_port()), "-m", "wanda_stream"]
    # With --structure and no --sparsity, structured pruning alone (no masks on top), as the CLI does.
    sparsity = [] if a.structure and a.sparsity is None else ["--sparsity", str(a.sparsity or 0.5)]
    cmd = [*launcher, "prune", str(a.model_dir), str(out), "--calib", a.calib,
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), *sparsity, *shlex.split(a.structure),
           "--method", a.method, "--sparsity-profile", a.sparsity_profile,
           "--seed", str(a.seed), "--device", a.device, "--compute-dtype", a.compute_dtype_resolved,
           "--batch-size", str(a.batch_size_resolved), *shlex.split(a.flags), "--quiet", "--overwrite"]
    if kind == "streamer-no-prefetch":
        cmd.append("--no-prefetch")
    if kind == "streamer-states-on-disk":
        cmd.append("--states-on-disk")
    return cmd


def _what(a: argparse.Namespace) -> str:
    """The pruning asked for, in words: structure, and masks unless structured pruning alone."""
    masks = "" if a.structure and a.sparsity is None else f"{a.sparsity or 0.5:.0%} {a.method} ({a.sparsity_profile})"
    return ", ".join(p for p in (f"structure `{a.structure}`" if a.structure else "", masks,
                                 f"flags `{a.flags}`" if a.flags else "") if p)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fmt_table(results: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    def gb(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e9:.2f}"

    rows = ["| run | status | wall (s) | CPU (s) | peak RSS (GiB) | read_bytes (GB) | rchar (GB) | write_bytes (GB) "
            "| wchar (GB) | blocks/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        io = r["io"]
        ok = r["status"] == "ok"
        bps = f"{facts['n_layers'] / r['wall_s']:.3f}" if ok else "-"
        cpu = f"{r['cpu_s']:.0f}" if "cpu_s" in r else "-"
        rows.append(f"| {r['run']} | {r['status']} | {r['wall_s']:.1f} | {cpu} | {r['peak_rss_bytes'] / GiB:.2f} | "
                    f"{gb(io.get('read_bytes'))} | {gb(io.get('rchar'))} | {gb(io.get('write_bytes'))} | "
                    f"{gb(io.get('wchar'))} | {bps} |")
    return "\n".join(rows)


def phase_totals(r: dict[str, Any]) -> dict[str, float] | None:
    """Sums over blocks of the streamer's own timings, or None for a run without them."""
    blocks = r.get("block_timing")
    if not blocks or not r.get("block_loop_s"):
        return None
    keys = ("compute_s", "hidden_wait_s", "read_s", "read_cpu_s", "read_wait_s", "write_s", "write_cpu_s",
            "write_wait_s", "states_wait_s")
    out = {k: sum(b.get(k, 0.0) for b in blocks) for k in keys}
    # Hidden-state reads and writes happen inside the compute phase; counted as I/O here.
    out["io_s"] = out["read_s"] + out["write_s"] + out["hidden_wait_s"]
    out["pure_compute_s"] = out["compute_s"] - out["hidden_wait_s"]
    out["waited_s"] = out["read_wait_s"] + out["write_wait_s"] + out["states_wait_s"]
    out["loop_s"] = r["block_loop_s"]
    return out


def fmt_phases(results: list[dict[str, Any]]) -> str:
    """Where the block loop's time went, per streamer run, as a Markdown table.

    Without prefetch the phases run in turn, so that run gives compute and I/O in isolation; the
    line under the table sets the prefetch run's loop time against their sum and their maximum.
    """
    rows = ["| run | block loop (s) | compute (s) | of which hidden-state I/O (s) | read (s) | read CPU (s) "
            "| write (s) | write CPU (s) | loop waited on I/O (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    totals = {}
    for r in results:
        t = phase_totals(r)
        if t is None:
            continue
        totals.setdefault(r["run"], []).append(t)
        rows.append(f"| {r['run']} | {t['loop_s']:.1f} | {t['compute_s']:.1f} | {t['hidden_wait_s']:.1f} | "
                    f"{t['read_s']:.1f} | "
                    f"{t['read_cpu_s']:.1f} | {t['write_s']:.1f} | {t['write_cpu_s']:.1f} | {t['waited_s']:.1f} |")
    if len(rows) == 2:
        return ""
    lines = ["\n".join(rows)]
    serial, overlapped = totals.get("streamer-no-prefetch"), totals.get("streamer")
    if serial and overlapped:
        c = sum(t["pure_compute_s"] for t in serial) / len(serial)
        io = sum(t["io_s"] for t in serial) / len(serial)
        loop = sum(t["loop_s"] for t in overlapped) / len(overlapped)
        lines.append(f"\nwithout prefetch (mean of {len(serial)}): compute {c:.1f} s, I/O {io:.1f} s, sum {c + io:.1f} s, "
                     f"max {max(c, io):.1f} s; with prefetch (mean of {len(overlapped)}) the block loop took "
                     f"{loop:.1f} s, {loop / (c + io):.0%} of the sum and {loop / max(c, io):.0%} of the max")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected approaches one after another and print the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--in-memory-child"]:
        in_memory_prune(**json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--work", type=Path, default=None, help="where outputs go (default: next to MODEL_DIR); "
                   "each is deleted after its run unless --keep-outputs")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=None, help="default 0.5 (none with --structure)")
    p.add_argument("--structure", default="", help="the streamer's structured-pruning flags, e.g. '--drop-ffn 0.25'")
    p.add_argument("--flags", default="", help="more of the streamer's prune flags, e.g. "
                   "'--reconstruct --reconstruct-batch 4' (the in-memory run ignores them)")
    p.add_argument("--method", default="wanda", help="the streamer's --method (the in-memory run is always wanda)")
    p.add_argument("--sparsity-profile", default="uniform", help="the streamer's --sparsity-profile")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks of the streamer runs (torchrun --nproc-per-node; gloo on CPU); peak RSS is then the "
                        "largest rank's, CPU and I/O all ranks' together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-dtype", default="auto", help="auto: float32 on CPU, the checkpoint's dtype on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch (default min(8, nsamples))")
    p.add_argument("--mem-limit", default="auto",
                   help="kill a run whose RSS passes this, e.g. 16GiB (reported as OOM); 0 = only when the "
                        "machine runs low; auto = 80%% of the RAM available at the start")
    p.add_argument("--timeout", type=float, default=0, help="kill a run after this many seconds (0: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads of each run (OMP_NUM_THREADS); default: torch's own choice. "
                        "Fewer threads than cores leaves a core to the reader and writer threads")
    p.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    p.add_argument("--evict-model", action="store_true",
                   help="instead of dropping all caches, evict only MODEL_DIR's files before each run (shared hosts)")
    p.add_argument("--keep-outputs", action="store_true")
    p.add_argument("--timeline", type=Path, default=None,
                   help="run each streamer run under tools/memory_timeline.py (interval peaks of VmHWM every 50 ms "
                        "and the steps in progress), writing FILE with .RUN.json as suffix; its report ends the log. "
                        "Peak RSS is then the timeline's (its resets also reset ru_maxrss); 0 for a killed run")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    a = p.parse_args(argv)
    if a.timeline is not None and a.nproc > 1:
        p.error("--timeline measures one process: use it with --nproc 1")

    from wanda_stream.run.resources import parse_size
    from wanda_stream.run.config import resolve_compute_dtype
    from wanda_stream.storage.state import REPORT_NAME
    from wanda_stream.model.stream import checkpoint_dtype, open_model

    a.model_dir = a.model_dir.resolve()
    ckpt, sk = open_model(a.model_dir)
    a.compute_dtype_resolved = resolve_compute_dtype(a.compute_dtype, "cpu" if a.device == "cpu" else "cuda",
                                                     checkpoint_dtype(ckpt, sk))
    a.batch_size_resolved = a.batch_size or min(8, a.nsamples)
    facts = checkpoint_facts(a.model_dir)
    el = torch.empty(0, dtype=getattr(torch, a.compute_dtype_resolved)).element_size()
    # One file of calibration hidden states per block (block 0's inputs .. block n-2's outputs).
    facts["hidden_state_bytes"] = facts["n_layers"] * a.nsamples * a.seqlen * facts["hidden"] * el
    if a.mem_limit == "auto":
        mem_limit = int(psutil.virtual_memory().available * 0.8)
    else:
        mem_limit = parse_size(a.mem_limit, "--mem-limit")
    work = (a.work or a.model_dir.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kinds = [k.strip() for k in a.runs.split(",") if k.strip()]
    unknown = set(kinds) - set(RUNS)
    if unknown:
        p.error(f"unknown runs: {', '.join(sorted(unknown))}")
    results = []
    dropped = True
    for kind in kinds:
        out = work / f"bench-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        if a.evict_model:
            evict_files(a.model_dir)
        else:
            dropped = (not a.no_drop_caches and drop_caches()) and dropped
        print(f"running {kind} ...", file=sys.stderr, flush=True)
        env = None if a.threads is None else {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        r = measure(command(kind, a, out), work / f"bench-{kind}.log", mem_limit, env=env, timeout=a.timeout)
        r["run"] = kind
        tl_file = a.timeline.resolve().with_suffix(f".{kind}.json") if a.timeline is not None else None
        if tl_file is not None and kind != "in-memory":
            # The timeline resets the high-water mark every interval, and with it the child's ru_maxrss:
            # the peak is the largest interval's (none when the run was killed before writing it).
            peak = json.loads(tl_file.read_text())["peak_mib"] * 2**20 if tl_file.is_file() else None
            r["ru_maxrss_after_resets"] = r["peak_rss_bytes"]
            r["peak_rss_bytes"] = int(peak) if peak is not None else 0
        report = out / REPORT_NAME
        if report.is_file():
            # The run's own per-block timings: read, compute (materialize, statistics, mask, propagate),
            # write, and how long the block loop waited on the reader and the writer.
            rep = json.loads(report.read_text())
            r["block_timing"] = [b.get("timing", {}) for b in rep["blocks"]]
            r["block_loop_s"] = rep.get("block_loop_seconds_this_process")
        results.append(r)
        print(f"  {r['status']} in {r['wall_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB",
              file=sys.stderr, flush=True)
        if not a.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    m = machine()
    settings = (f"{facts['model_type']}, {facts['n_layers']} blocks, checkpoint {facts['bytes'] / 1e9:.2f} GB "
                f"({facts['file_bytes'] / 1e9:.2f} GB of files); {_what(a)}, "
                f"{a.nproc} rank(s), {a.nsamples} x {a.seqlen} "
                f"tokens of {a.calib}, device {a.device}, compute {a.compute_dtype_resolved}, micro-batch "
                f"{a.batch_size_resolved}; calibration hidden states {facts['hidden_state_bytes'] / 1e9:.2f} GB; "
                f"compute threads {a.threads or torch.get_num_threads()}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; {m['date']}")
    print(f"setting: {settings}")
    caches = ("only the checkpoint's files evicted" if a.evict_model
              else "yes" if dropped and not a.no_drop_caches else "no")
    print(f"page cache dropped before each run: {caches}; "
          f"memory cap per run: {f'{mem_limit / GiB:.1f} GiB RSS (watchdog)' if mem_limit else 'none'}")
    print()
    print(fmt_table(results, facts))
    print()
    phases = fmt_phases(results)
    if phases:
        print(phases)
        print()
    for r in results:
        io = r["io"]
        if r["status"] == "ok" and io:
            print(f"{r['run']}: read_bytes / checkpoint = {io['read_bytes'] / facts['file_bytes']:.3f}; "
                  f"write_bytes / (checkpoint + hidden states) = "
                  f"{io['write_bytes'] / (facts['file_bytes'] + facts['hidden_state_bytes']):.3f}; "
                  f"cancelled_write_bytes {io.get('cancelled_write_bytes', 0) / 1e9:.2f} GB")
        elif r["status"] != "ok":
            print(f"{r['run']}: {r['status']}; last output:\n    " + "\n    ".join(r["log_tail"].splitlines()[-4:]))
    if a.json:
        a.json.write_text(json.dumps({"machine": m, "setting": settings, "facts": facts, "mem_limit": mem_limit,
                                      "caches_dropped": dropped and not a.no_drop_caches and not a.evict_model,
                                      "checkpoint_evicted": a.evict_model, "results": results},
                                     indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
