"""Benchmark `prune --sweep` against the same configurations run one by one.

    python tools/bench_sweep.py MODEL_DIR --sweep wanda:0.5,wanda:0.6,sparsegpt:0.6,wanda:2:4 \
        --args "--calib wikitext2 --nsamples 32 --seqlen 512 --eval-data wikitext2 --eval-windows 16"

Every run is its own process (`python -m wanda_stream prune ... --device cpu` unless --args says
otherwise), measured as tools/bench_prune.py measures one: wall time, CPU time, peak RSS (the
kernel's ru_maxrss of the child), bytes that reached the disk (read_bytes, write_bytes) and bytes
through read() including page-cache hits (rchar). Page caches are dropped before each run when
permitted (root). Afterwards the sweep's outputs are compared with the single runs' file by file
(the report, whose timings and paths differ, left out), and the table says whether each is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prune import GiB, drop_caches, evict_files, machine, measure  # noqa: E402
from wanda_stream.run.sweep import parse_sweep  # noqa: E402

VOLATILE_FILES = ("wanda_stream.json", "README.md")  # timings, paths; the card names its output directory


def digest(out: Path) -> dict[str, str]:
    """sha256 of each file of an output but the report and card."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in VOLATILE_FILES}


def run(cmd: list[str], log: Path, model: Path, mem_limit: int) -> dict[str, Any]:
    if not drop_caches():
        evict_files(model)
    return measure(cmd, log, mem_limit)


def row(name: str, r: dict[str, Any]) -> str:
    io = r["io"]
    return (f"| {name} | {r['status']} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {r['peak_rss_bytes'] / GiB:.2f} | "
            f"{io.get('read_bytes', 0) / 1e9:.2f} | {io.get('rchar', 0) / 1e9:.2f} | {io.get('write_bytes', 0) / 1e9:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--sweep", required=True)
    p.add_argument("--args", default="--calib pydoc --nsamples 4 --seqlen 128",
                   help="the prune flags every run gets (one shell-quoted string)")
    p.add_argument("--work", type=Path, default=None, help="where outputs go (default: next to MODEL_DIR)")
    p.add_argument("--mem-limit", default="18GiB", help="kill a run whose RSS passes this")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from wanda_stream.run.resources import parse_size

    limit = parse_size(a.mem_limit, "--mem-limit")
    work = a.work or a.model_dir.parent / "bench-sweep"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = shlex.split(a.args)
    if "--device" not in common:
        common += ["--device", "cpu"]
    base = [sys.executable, "-m", "wanda_stream", "prune", str(a.model_dir)]
    entries = parse_sweep(a.sweep)
    results: dict[str, Any] = {"machine": machine(), "sweep": a.sweep, "args": a.args}
    print(f"running the sweep of {len(entries)} ...", flush=True)
    results["sweep_run"] = run([*base, str(work / "sweep"), *common, "--sweep", a.sweep, "--log-format", "json"],
                               work / "sweep.log", a.model_dir, limit)
    singles: dict[str, Any] = {}
    for e in entries:
        print(f"running {e.name} alone ...", flush=True)
        singles[e.name] = run([*base, str(work / e.name), *common, *e.flags, "--log-format", "json"],
                              work / f"{e.name}.log", a.model_dir, limit)
        same = digest(work / "sweep" / e.name) == digest(work / e.name) if singles[e.name]["status"] == "ok" else None
        singles[e.name]["identical_to_sweep"] = same
    results["singles"] = singles
    m = results["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; {m['date']}")
    print(f"model: {a.model_dir}; every run: {a.args}; sweep: {a.sweep}\n")
    print("| run | status | wall (s) | CPU (s) | peak RSS (GiB) | read_bytes (GB) | rchar (GB) | write_bytes (GB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(row(f"sweep of {len(entries)}", results["sweep_run"]))
    for name, r in singles.items():
        print(row(f"{name} alone (identical output: {r['identical_to_sweep']})", r))
    total = {k: sum(r[k] for r in singles.values()) for k in ("wall_s", "cpu_s")}
    reads = sum(r["io"].get("read_bytes", 0) for r in singles.values())
    sw = results["sweep_run"]
    print(f"\nseparate runs together: wall {total['wall_s']:.1f} s, CPU {total['cpu_s']:.0f} s, read_bytes "
          f"{reads / 1e9:.2f} GB; the sweep: wall {sw['wall_s']:.1f} s ({total['wall_s'] / sw['wall_s']:.2f}x), "
          f"read_bytes {sw['io'].get('read_bytes', 0) / 1e9:.2f} GB")
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))
    return 0 if sw["status"] == "ok" and all(r["status"] == "ok" for r in singles.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
