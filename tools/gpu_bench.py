"""The prepared GPU check: what a GPU user will do, in one run of under ten minutes, as one table.

Run through tools/gpu_bench.sh (it finds Python and sets the checkout up); see that script for usage.
Every step is its own process with its own time limit, cut further so the whole stays under the
total; a step that fails or runs out of time is a row saying so, and the next step still runs.

Steps, on a llama-2-7b-shaped bf16 checkpoint of random weights (generated on the GPU) and pydoc
text (the paper's C4 needs the hub; the shapes and token counts are the paper's):
  cuda-tests   the CUDA tests (tests/test_cuda.py, test_checkpoint.py, test_cuda_path.py)
  features     tests/test_cuda_features.py: every method, structural step, MoE streaming and REAP, a sweep
               and a killed streamed run on the GPU against the CPU, on tiny checkpoints
  generate     the 32-block checkpoint, a 4-block one of the same shape, a 2-block one for the CPU
  wanda-7b     50% wanda, 128 x 2048 tokens, --compute-dtype auto (bf16), streamed perplexity in the
               same pass; time per block split into read, compute and write; peaks
  eval         `wanda-stream eval` of that output (streamed perplexity)
  sparsegpt / wanda-owl / wanda     the 4-block checkpoint, 128 x 2048 tokens
  resume       the same wanda run killed (SIGKILL) after block 1 and resumed: the same bytes
  torchrun     the same on 2 ranks under torchrun on the one GPU (NCCL; if NCCL refuses two ranks
               on one card, gloo with CUDA tensors, and the row says so): the same bytes
  2:4          tools/bench_2of4.py: the 7B linears and one block, dense vs semi-structured sparse
  masks        wanda and sparsegpt on the 2-block checkpoint, float32, on the GPU and on the CPU:
               how many mask entries agree

--dry-run runs the same steps on the CPU with a tiny model and few tokens, so the script itself is
tested (tests/test_gpu_bench.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench_prune import GiB, measure

ROOT = Path(__file__).resolve().parents[1]
KILL_ENV = "WANDA_STREAM_KILL_AT"


@dataclass(frozen=True)
class Plan:
    """Sizes and limits of one kind of run: the real GPU check, or the dry run on the CPU."""

    device: str
    preset: str
    small_layers: int | None  # None: the sparsegpt/owl/resume/torchrun steps use the full model
    compare_layers: int | None
    nsamples: int
    seqlen: int
    batch: int
    eval_windows: int
    compare_nsamples: int
    compare_seqlen: int
    total_s: float
    limits: dict[str, float]


GPU = Plan("cuda", "llama-2-7b", 4, 2, 128, 2048, 8, 16, 8, 512, 570,
           {"cuda-tests": 120, "features": 120, "generate": 150, "wanda-7b": 150, "eval": 60, "sparsegpt": 90, "wanda-owl": 60,
            "wanda": 40, "resume": 70, "torchrun": 90, "2:4": 90, "masks": 150})
DRY = Plan("cpu", "tiny-llama", None, None, 4, 64, 2, 2, 4, 64, 300,
           {"cuda-tests": 60, "features": 60, "generate": 60, "wanda-7b": 60, "eval": 60, "sparsegpt": 60, "wanda-owl": 60,
            "wanda": 60, "resume": 60, "torchrun": 90, "2:4": 60, "masks": 120})


class Bench:
    """The steps' shared state: paths, the deadline, the rows of the table."""

    def __init__(self, plan: Plan, work: Path, python: str) -> None:
        self.plan = plan
        self.work = work
        self.py = python
        self.start = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.full, self.small, self.compare = work / "model-full", work / "model-small", work / "model-compare"
        if plan.small_layers is None:
            self.small = self.full
        if plan.compare_layers is None:
            self.compare = self.full

    def left(self) -> float:
        return self.plan.total_s - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> dict[str, Any]:
        """`cmd` under `limit` seconds (and what is left of the total); its log is work/NAME.log."""
        limit = max(1.0, min(limit, self.left()))
        return measure(cmd, self.work / f"{name}.log", 0, {**self.env, **(env or {})}, timeout=limit)

    def prune(self, name: str, model: Path, out: Path, extra: list[str], limit: float, device: str | None = None,
              env: dict[str, str] | None = None, launcher: list[str] | None = None,
              nsamples: int | None = None, seqlen: int | None = None) -> dict[str, Any]:
        p = self.plan
        cmd = [*(launcher or [self.py]), "-m", "wanda_stream", "prune", str(model), str(out), "--calib", "pydoc",
               "--nsamples", str(nsamples or p.nsamples), "--seqlen", str(seqlen or p.seqlen),
               "--batch-size", str(p.batch), "--device", device or p.device, "--quiet", *extra]
        return self.run(name, cmd, limit, env)

    def add(self, step: str, status: str, wall_s: float | None = None, result: str = "", note: str = "",
            report: dict[str, Any] | None = None, rss: int | None = None) -> None:
        row: dict[str, Any] = {"step": step, "status": status, "wall_s": wall_s, "result": result, "note": note}
        if report is not None:
            row.update(block_split(report))
            rss = report.get("peak_rss_bytes", rss)
            row["cuda_alloc_gib"] = _gib(report.get("peak_cuda_bytes"))
            row["cuda_reserved_gib"] = _gib(report.get("peak_cuda_reserved_bytes"))
        row["rss_gib"] = _gib(rss)
        self.rows.append(row)


def _gib(n: int | None) -> float | None:
    return None if n is None else n / GiB


def block_split(report: dict[str, Any]) -> dict[str, float]:
    """Mean seconds per block: reading (prefetch thread), compute, shard writing (writer thread), and
    how long the compute waited for any of them (reads, hidden states, writes)."""
    timing = [b["timing"] for b in report.get("blocks", [])]
    if not timing:
        return {}
    mean = lambda k: statistics.fmean(t.get(k, 0.0) for t in timing)  # noqa: E731
    return {"read_s": mean("read_s"), "compute_s": mean("compute_s") - mean("hidden_wait_s"),
            "write_s": mean("write_s"), "wait_s": mean("read_wait_s") + mean("hidden_wait_s") + mean("write_wait_s")}


def weight_hashes(out: Path) -> dict[str, str]:
    """sha256 of the output's weight files and index (the model card records the command line)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors")) + sorted(out.glob("*.index.json"))}


def read_report(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "wanda_stream.json").read_text())
    except (OSError, ValueError):
        return None


def mask_agreement(a: Path, b: Path) -> tuple[float, float, int]:
    """(lowest, mean) share of equal zero masks over the pruned matrices of two outputs, and how many."""
    from safetensors import safe_open

    shares = []
    for shard in sorted(a.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fa, safe_open(str(b / shard.name), "pt") as fb:
            for key in fa.keys():
                if key.endswith("proj.weight") and ".layers." in key:
                    za, zb = fa.get_tensor(key) == 0, fb.get_tensor(key) == 0
                    shares.append(float((za == zb).float().mean()))
    return (min(shares), statistics.fmean(shares), len(shares)) if shares else (0.0, 0.0, 0)


# ---- the steps ----------------------------------------------------------------------------
def _pytest_step(b: Bench, step: str, files: list[str]) -> None:
    r = b.run(step, [b.py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files], b.plan.limits[step])
    log = (b.work / f"{step}.log").read_text(errors="replace").strip().splitlines()
    summary = log[-1].strip("= ") if log else ""
    b.add(step, "ok" if r["exit"] == 0 else r["status"], r["wall_s"], summary, " ".join(files), rss=r["peak_rss_bytes"])


def step_cuda_tests(b: Bench) -> None:
    _pytest_step(b, "cuda-tests", ["tests/test_cuda.py"] if b.plan.device == "cpu" else
                 ["tests/test_cuda.py", "tests/test_checkpoint.py", "tests/test_cuda_path.py"])


def step_features(b: Bench) -> None:
    _pytest_step(b, "features", ["tests/test_cuda_features.py"])  # skipped on the dry run's CPU


def _config_json(b: Bench, layers: int, where: Path) -> Path:
    from wanda_stream.storage.synthetic import load_spec

    config = load_spec(b.plan.preset)
    config.num_hidden_layers = layers
    where.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(where / "config.json"))
    return where / "config.json"


def step_generate(b: Bench) -> None:
    t0 = time.monotonic()
    jobs = [(b.plan.preset, b.full)]
    for layers, out in ((b.plan.small_layers, b.small), (b.plan.compare_layers, b.compare)):
        if layers is not None:
            jobs.append((str(_config_json(b, layers, b.work / f"config-{layers}")), out))
    status, sizes = "ok", []
    for spec, out in jobs:
        shutil.rmtree(out, ignore_errors=True)
        limit = b.plan.limits["generate"] - (time.monotonic() - t0)
        r = b.run(f"generate-{out.name}", [b.py, str(ROOT / "tools" / "make_synthetic_model.py"), spec, str(out),
                                           "--dtype", "bfloat16", "--device", b.plan.device], limit)
        if r["exit"] != 0:
            status = r["status"]
            break
        sizes.append(f"{out.name} {sum(p.stat().st_size for p in out.glob('*.safetensors')) / 1e9:.2f} GB")
    b.add("generate", status, round(time.monotonic() - t0, 2), ", ".join(sizes), f"bf16 random weights on {b.plan.device}")


def step_wanda_7b(b: Bench) -> None:
    out = b.work / "out-wanda-7b"
    r = b.prune("wanda-7b", b.full, out, ["--compute-dtype", "auto", "--eval-data", "pydoc",
                                          "--eval-windows", str(b.plan.eval_windows)], b.plan.limits["wanda-7b"])
    rep = read_report(out) if r["exit"] == 0 else None
    if rep is None:
        b.add("wanda-7b", r["status"], r["wall_s"], rss=r["peak_rss_bytes"])
        return
    dtype = rep["config"]["compute_dtype"]
    b.add("wanda-7b", "ok", r["wall_s"], f"ppl {rep['eval']['perplexity']:.2f}, sparsity {rep['total_sparsity']:.4f}",
          f"--compute-dtype auto -> {dtype}; {len(rep['blocks'])} blocks", rep)


def step_eval(b: Bench) -> None:
    out = b.work / "out-wanda-7b"
    if read_report(out) is None:
        b.add("eval", "skipped", note="no wanda-7b output")
        return
    r = b.run("eval", [b.py, "-m", "wanda_stream", "eval", str(out), "--data", "pydoc", "--seqlen", str(b.plan.seqlen),
                       "--max-windows", str(b.plan.eval_windows), "--device", b.plan.device, "--json", "--quiet"],
              b.plan.limits["eval"])
    result = {}
    if r["exit"] == 0:
        log = (b.work / "eval.log").read_text().strip().splitlines()
        result = json.loads(log[-1])
    in_pass = read_report(out)["eval"]["perplexity"]  # type: ignore[index]
    b.add("eval", "ok" if result else r["status"], r["wall_s"],
          f"ppl {result['perplexity']:.2f} ({result['windows']} x {result['seqlen']})" if result else "",
          f"in the prune pass: {in_pass:.2f}", result or None, rss=r["peak_rss_bytes"])
    if b.full != b.small:
        shutil.rmtree(out, ignore_errors=True)  # 13.5 GB: room for the rest


def _method_step(b: Bench, step: str, extra: list[str]) -> None:
    out = b.work / f"out-{step}"
    r = b.prune(step, b.small, out, extra, b.plan.limits[step])
    rep = read_report(out) if r["exit"] == 0 else None
    layers = b.plan.small_layers or "all"
    b.add(step, "ok" if rep else r["status"], r["wall_s"],
          f"sparsity {rep['total_sparsity']:.4f}" if rep else "", f"{layers} blocks, {' '.join(extra)}", rep,
          rss=r["peak_rss_bytes"])


def step_sparsegpt(b: Bench) -> None:
    _method_step(b, "sparsegpt", ["--method", "sparsegpt"])


def step_owl(b: Bench) -> None:
    _method_step(b, "wanda-owl", ["--method", "wanda", "--sparsity-profile", "owl", "--sparsity", "0.7"])


def step_wanda_small(b: Bench) -> None:
    _method_step(b, "wanda", ["--method", "wanda"])


def step_resume(b: Bench) -> None:
    ref, out = b.work / "out-wanda", b.work / "out-resume"
    if read_report(ref) is None:
        b.add("resume", "skipped", note="no uninterrupted wanda output to compare with")
        return
    t0 = time.monotonic()
    killed = b.prune("resume-killed", b.small, out, [], b.plan.limits["resume"] / 2, env={KILL_ENV: "block_done:2"})
    resumed = b.prune("resume", b.small, out, ["--resume"], b.plan.limits["resume"] - (time.monotonic() - t0))
    same = resumed["exit"] == 0 and weight_hashes(out) == weight_hashes(ref)
    status = "ok" if killed["exit"] == -9 and same else f"failed (kill exit {killed['exit']}, resume {resumed['status']})"
    b.add("resume", status, round(time.monotonic() - t0, 2), "identical bytes" if same else "bytes differ",
          "SIGKILL after block 1 was saved, then --resume", read_report(out), rss=resumed["peak_rss_bytes"])


def step_torchrun(b: Bench) -> None:
    ref, out = b.work / "out-wanda", b.work / "out-torchrun"
    if read_report(ref) is None:
        b.add("torchrun", "skipped", note="no single-process wanda output to compare with")
        return
    t0 = time.monotonic()
    launcher = [b.py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    backends = ["nccl", "gloo"] if b.plan.device == "cuda" else ["gloo"]
    tried = []
    for backend in backends:
        shutil.rmtree(out, ignore_errors=True)
        r = b.prune(f"torchrun-{backend}", b.small, out, [], b.plan.limits["torchrun"] - (time.monotonic() - t0),
                    env={"WANDA_STREAM_DIST_BACKEND": backend, "OMP_NUM_THREADS": "1"}, launcher=launcher)
        tried.append(f"{backend}: {r['status']}")
        if r["exit"] == 0:
            same = weight_hashes(out) == weight_hashes(ref)
            note = f"2 ranks, {backend}" + ("" if backend == backends[0] else f" (NCCL refused: see {b.work}/torchrun-nccl.log)")
            b.add("torchrun", "ok" if same else "bytes differ", round(time.monotonic() - t0, 2),
                  "identical to 1 process" if same else "differs from 1 process", note, read_report(out))
            return
    b.add("torchrun", "failed", round(time.monotonic() - t0, 2), "; ".join(tried), "2 ranks on one device")


def step_2of4(b: Bench) -> None:
    js = b.work / "bench_2of4.json"
    r = b.run("2of4", [b.py, str(ROOT / "tools" / "bench_2of4.py"), "--preset", b.plan.preset if b.plan.device == "cuda"
                       else "llama-2-7b", "--json", str(js)], b.plan.limits["2:4"])
    if r["exit"] != 0:
        line = (b.work / "2of4.log").read_text(errors="replace").strip().splitlines()
        needs = bool(line) and "needs a CUDA device" in line[-1]
        b.add("2:4", "needs CUDA" if needs else r["status"], r["wall_s"], "", line[-1][:120] if line else "")
        return
    rows = json.loads(js.read_text())["rows"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["backend"]), []).append(row)
    parts = []
    for (dtype, backend), rs in groups.items():
        lin = [x["speedup"] for x in rs if x["what"] != "decoder block"]
        blk = [x["speedup"] for x in rs if x["what"] == "decoder block"]
        parts.append(f"{dtype} {backend}: linears {min(lin):.2f}-{max(lin):.2f}x" + (f", block {blk[0]:.2f}x" if blk else ""))
    b.add("2:4", "ok", r["wall_s"], "; ".join(parts), f"speedup of 2:4 over dense, 2048 tokens; per matmul in {js}")


def step_masks(b: Bench) -> None:
    t0 = time.monotonic()
    p = b.plan
    parts, status = [], "ok"
    for method in ("wanda", "sparsegpt"):
        outs = []
        earlier = b.work / f"out-{method}"
        if p is DRY and read_report(earlier) is not None:
            outs.append(earlier)  # the dry run's "device" run is this very command on the CPU: made already
        for tag, device in (("device", p.device), ("cpu", "cpu"))[len(outs):]:
            out = b.work / f"out-masks-{method}-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            r = b.prune(f"masks-{method}-{tag}", b.compare, out, ["--method", method, "--compute-dtype", "float32"],
                        p.limits["masks"] - (time.monotonic() - t0), device=device, nsamples=p.compare_nsamples,
                        seqlen=p.compare_seqlen)
            if r["exit"] != 0:
                status = f"{method} on {device}: {r['status']}"
                break
            outs.append(out)
        if len(outs) < 2:
            break
        low, mean, n = mask_agreement(*outs)
        parts.append(f"{method}: {mean:.5f} mean, {low:.5f} lowest of {n} matrices")
    layers = p.compare_layers or "all"
    b.add("masks", status, round(time.monotonic() - t0, 2), "; ".join(parts),
          f"{p.device} vs cpu, float32, {layers} blocks, {p.compare_nsamples} x {p.compare_seqlen} tokens")


STEPS: list[tuple[str, Callable[[Bench], None]]] = [
    ("cuda-tests", step_cuda_tests), ("features", step_features), ("generate", step_generate), ("wanda-7b", step_wanda_7b), ("eval", step_eval),
    ("sparsegpt", step_sparsegpt), ("wanda-owl", step_owl), ("wanda", step_wanda_small), ("resume", step_resume),
    ("torchrun", step_torchrun), ("2:4", step_2of4), ("masks", step_masks),
]
# Steps that need the checkpoints: skipped when the generation failed.
NEEDS_MODEL = {name for name, _ in STEPS} - {"cuda-tests", "features", "generate", "2:4"}


# ---- the table ------------------------------------------------------------------------------
def machine(plan: Plan) -> str:
    import torch
    import transformers

    if plan.device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        card = f"{p.name} ({p.total_memory / GiB:.0f} GiB)"
    else:
        card = "no GPU (dry run on the CPU)"
    return (f"{card}; {os.cpu_count()} CPUs, {_ram_gib():.0f} GiB RAM, {platform.node()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.1f}")


def _ram_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / GiB


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def table(b: Bench) -> str:
    lines = [f"gpu_bench{' --dry-run' if b.plan is DRY else ''}: {machine(b.plan)}", "",
             "| step | status | wall s | result | read s/blk | compute s/blk | write s/blk | waited s/blk "
             "| peak RSS GiB | CUDA alloc GiB | CUDA reserved GiB | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in b.rows:
        lines.append(" | ".join(["", r["step"], r["status"], _fmt(r["wall_s"]), r["result"], _fmt(r.get("read_s"), ".3f"),
                                 _fmt(r.get("compute_s"), ".3f"), _fmt(r.get("write_s"), ".3f"),
                                 _fmt(r.get("wait_s"), ".3f"), _fmt(r.get("rss_gib"), ".2f"),
                                 _fmt(r.get("cuda_alloc_gib"), ".2f"), _fmt(r.get("cuda_reserved_gib"), ".2f"),
                                 r["note"], ""]).strip())
    lines += ["", *goals(b), f"total {time.monotonic() - b.start:.0f} s"]
    return "\n".join(lines)


def goals(b: Bench) -> list[str]:
    """The issue's targets for the 7B run, met or not."""
    row = next((r for r in b.rows if r["step"] == "wanda-7b" and r["status"] == "ok"), None)
    if row is None or b.plan is DRY:
        return []
    from wanda_stream.model.skeleton import load_config
    from wanda_stream.run.resources import window_bytes

    import torch

    config = load_config(b.full)
    block = sum(p.stat().st_size for p in b.full.glob("*.safetensors")) / config.num_hidden_layers  # about one block
    budget = b.plan.batch * window_bytes(config, b.plan.seqlen, torch.bfloat16)
    cuda = (row.get("cuda_alloc_gib") or 0) * GiB
    said = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return [f"goal: 7B wanda with 128 x 2048 tokens in under 60 s: {row['wall_s']:.0f} s, {said(row['wall_s'] < 60)}",
            f"goal: host RSS under 16 GiB: {row['rss_gib']:.2f} GiB, {said(row['rss_gib'] < 16)}",
            f"goal: CUDA peak under one block + the activation budget ({(block + budget) / GiB:.2f} GiB): "
            f"{cuda / GiB:.2f} GiB, {said(cuda < block + budget)}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a tiny model")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_DIR", "/tmp/wanda-gpu-bench")))
    p.add_argument("--steps", default=",".join(n for n, _ in STEPS), help="comma-separated subset of the steps")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs under --work")
    a = p.parse_args(argv)
    plan = DRY if a.dry_run else GPU
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_bench: torch {torch.__version__} ({sys.executable}) sees no CUDA device; use --dry-run to check "
                  "the script on the CPU", file=sys.stderr)
            return 2
    chosen = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in dict(STEPS)]
    if unknown:
        print(f"gpu_bench: --steps {','.join(unknown)}: use some of {','.join(n for n, _ in STEPS)}", file=sys.stderr)
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    b = Bench(plan, a.work.resolve(), sys.executable)
    try:
        for name, fn in STEPS:
            if name not in chosen:
                continue
            if b.left() < 5:
                b.add(name, "skipped", note="out of time")
            elif name in NEEDS_MODEL and not (b.full / "config.json").is_file():
                b.add(name, "skipped", note="no checkpoint (generate failed or not chosen)")
            else:
                print(f"gpu_bench: {name} ({b.left():.0f} s left)", file=sys.stderr, flush=True)
                fn(b)
        text = table(b)
        print(text)
        (b.work / "gpu_bench.md").write_text(text + "\n")
        (b.work / "gpu_bench.json").write_text(json.dumps({"plan": plan.__dict__, "rows": b.rows}, indent=1))
        if os.environ.get("OUT"):
            for f in ["gpu_bench.md", "gpu_bench.json", "bench_2of4.json", *(q.name for q in b.work.glob("*.log"))]:
                if (b.work / f).is_file():
                    shutil.copy(b.work / f, Path(os.environ["OUT"]) / f)
    finally:
        if not a.keep:
            for d in b.work.glob("model-*"):
                shutil.rmtree(d, ignore_errors=True)
            for d in b.work.glob("out-*"):
                shutil.rmtree(d, ignore_errors=True)
    return 0 if all(r["status"] in ("ok", "needs CUDA") for r in b.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
