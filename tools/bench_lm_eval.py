"""Benchmark: lm-eval accuracy, wall time, peak RSS and bytes read, streamed backend vs lm-eval's `hf`.

    python tools/bench_lm_eval.py DENSE_DIR PRUNED_DIR [--items 200] [--batch-size 16]

Builds the wikitext_next_sentence task (tools/build_next_sentence_task.py) from
../shared/data/wikitext2/wiki.test.raw, then runs each model with each backend in a fresh process,
after evicting the model's files from the page cache (posix_fadvise DONTNEED: no root needed), so
bytes read are the checkpoint as read from storage plus whatever Python libraries were not cached.
Prints a markdown table with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_prune import evict_files  # tools/ is this script's sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
TASK = "wikitext_next_sentence"
WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def child(backend: str, model_dir: str, task_dir: str, batch_size: int) -> None:
    """One evaluation in this process; prints its figures as one JSON line."""
    sys.path.insert(0, str(ROOT))
    import lm_eval
    from lm_eval.tasks import TaskManager

    if backend == "streamed":
        from wanda_stream.eval.lm_eval_backend import WandaStreamLM

        lm = WandaStreamLM(model_dir, device="cpu", dtype="float32")
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    tm = TaskManager(include_path=task_dir, include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm)["results"][TASK]
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "peak_rss_bytes": ru.ru_maxrss * 1024,
                      "cpu_s": ru.ru_utime + ru.ru_stime, "read_bytes": int(io["read_bytes"])}))


def measure(backend: str, model_dir: Path, task_dir: Path, batch_size: int) -> dict:
    evict_files(model_dir)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, __file__, "--child", backend, str(model_dir), str(task_dir),
                        "--batch-size", str(batch_size)], capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{backend} on {model_dir} failed:\n{r.stderr[-3000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": wall}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) / 2**20
    return f"{cpu}, {os.cpu_count()} vCPUs, {mem:.0f} GiB RAM, torch threads default, no GPU used"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense", type=Path, nargs="?")
    ap.add_argument("pruned", type=Path, nargs="?")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="the hf backend's batch size")
    ap.add_argument("--child", nargs=3, metavar=("BACKEND", "MODEL", "TASK_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.batch_size)
        return 0
    if args.dense is None:
        ap.error("give the dense model directory")
    task_dir = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_next_sentence_task.py"), str(WIKI_TEST),
                    str(task_dir), "--items", str(args.items)], check=True)
    rows = []
    for label, model in (("dense", args.dense), ("50% wanda", args.pruned)):
        if model is None:
            continue
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for backend in ("streamed", "hf"):
            m = measure(backend, model, task_dir, args.batch_size)
            rows.append(f"| {label} | {backend} | {m['acc']:.4f} | {m['acc_norm']:.4f} | {m['wall_s']:.1f} | "
                        f"{m['cpu_s']:.0f} | "
                        f"{m['peak_rss_bytes'] / 2**20:.0f} | {m['read_bytes'] / 2**20:.0f} | {size / 2**20:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{TASK}, {args.items} items x 4 choices; {datetime.date.today()}; {machine()}\n")
    print("| model | backend | acc | acc_norm | wall s | CPU s | peak RSS MiB | read MiB | checkpoint MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
