"""Peak memory and time of streamed vs in-memory perplexity, each in its own process.

    python tools/bench_eval.py MODEL_DIR --data FILE --seqlen 512 --windows 40

The in-memory side is the usual script: the whole model loaded by transformers, one window at a
time through model(input_ids).logits. Both see the same windows; the table shows both
perplexities, wall time and peak RSS (from the kernel's accounting of each child process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

IN_MEMORY = r"""
import json, math, sys, resource, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from wanda_stream.run import calib
model_dir, data, seqlen, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = calib.load_tokenizer(Path(model_dir))
w = calib.eval_windows("\n\n".join(calib.documents(data, "evaluation")), tok, seqlen, windows, data)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
nll, n = 0.0, 0
with torch.no_grad():
    for x in w:
        logits = model(x.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum")); n += x.numel() - 1
print(json.dumps({"perplexity": math.exp(nll / n),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(cmd: list[str]) -> dict:
    """Run a child process; returns its last JSON line (which carries its own peak RSS) and wall time."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.monotonic() - t0
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1], "wall_s": wall}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=1)
    a = ap.parse_args()
    mem = run([sys.executable, "-c", IN_MEMORY, str(a.model_dir), a.data, str(a.seqlen), str(a.windows)])
    streamed = run([sys.executable, "-m", "wanda_stream", "eval", str(a.model_dir), "--data", a.data,
                    "--seqlen", str(a.seqlen), "--max-windows", str(a.windows), "--device", "cpu",
                    "--batch-size", str(a.batch_size), "--json", "--quiet"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, {_cpu()}")
    print(f"model: {a.model_dir.name}, {a.windows} x {a.seqlen} tokens of {Path(a.data).name}, float32, CPU")
    print(f"| run | perplexity | wall (s) | peak RSS (MiB) |\n| --- | --- | --- | --- |")
    for name, r in (("in-memory (transformers)", mem), ("streamed (wanda-stream eval)", streamed)):
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | {r['wall_s']:.0f} | - |")
        else:
            print(f"| {name} | {r['perplexity']:.4f} | {r['wall_s']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} |")


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
