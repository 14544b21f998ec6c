"""Structured pruning on one model: perplexity, decoder parameters kept, and CPU speed of the result in plain
transformers, for every structural option on identical calibration windows.

Each run is `wanda-stream prune` in its own process (calibration: --nsamples x --seqlen windows of --calib,
seed 0; perplexity of --eval-data in the same pass, 40 x 512 tokens, as tools/method_table.py); the outputs
are kept under --keep. `--speed` then loads the dense model and every output in stock transformers (float32,
--threads threads, all in this one process) and measures, interleaved round by round so that a change of
load on the host hits every model alike: prefill tokens/s of one 512-token window and greedy decode
tokens/s (64 new tokens after a 32-token prompt, KV cache on). Prints markdown tables with the machine and
date; `--json` keeps the figures (and resumes), `--plot` draws perplexity against parameters kept and
against prefill speed (matplotlib), with the unstructured methods of `--unstructured` (method_table's JSON).

    python tools/structure_table.py /data/smollm2 --keep /data/struct --json docs/structure_table.json --speed
    python tools/structure_table.py --from-json docs/structure_table.json --plot docs/structure.png \\
        --unstructured docs/methods_table.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
RUNS: dict[str, list[str]] = {
    "blocks3-bi": ["--drop-blocks", "3"],
    "blocks3-angular": ["--drop-blocks", "3", "--block-score", "angular"],
    "blocks6-bi": ["--drop-blocks", "6"],
    "blocks6-angular": ["--drop-blocks", "6", "--block-score", "angular"],
    "ffn0.25": ["--drop-ffn", "0.25"],
    "ffn0.25-norefit": ["--drop-ffn", "0.25", "--no-refit"],
    "ffn0.5": ["--drop-ffn", "0.5"],
    "ffn0.5-norefit": ["--drop-ffn", "0.5", "--no-refit"],
    "heads1/3": ["--drop-heads", "0.3333"],
    "heads1/3-norefit": ["--drop-heads", "0.3333", "--no-refit"],
    "ffn0.25+sparsegpt2:4": ["--drop-ffn", "0.25", "--method", "sparsegpt", "--pattern", "2:4"],
}


def prune(model: Path, name: str, a: argparse.Namespace) -> dict:
    """One structural prune with its perplexity; the output stays in --keep/NAME."""
    out = a.keep / name.replace("/", "_").replace(":", "_")
    args = [sys.executable, "-m", "wanda_stream", "prune", str(model), str(out), *RUNS[name], "--calib", a.calib,
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", "0", "--device", "cpu",
            "--eval-data", a.eval_data, "--eval-windows", "40", "--eval-seqlen", "512", "--quiet", "--overwrite"]
    t0, c0 = time.monotonic(), psutil.Process().cpu_times()
    r = subprocess.run(args, capture_output=True, text=True)
    wall = time.monotonic() - t0
    c1 = psutil.Process().cpu_times()
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
    rep = json.loads((out / "wanda_stream.json").read_text())
    p = rep["parameters"]
    return {"run": name, "flags": " ".join(RUNS[name]), "dir": str(out), "perplexity": rep["eval"]["perplexity"],
            "decoder_kept": p["decoder_after"] / p["decoder_before"], "params_after": p["after"],
            "params_before": p["before"], "total_sparsity": rep["total_sparsity"],
            "dropped_blocks": rep["structure"]["dropped_blocks"], "wall_s": round(wall, 1),
            "cpu_s": round(c1.children_user + c1.children_system - c0.children_user - c0.children_system, 1),
            "peak_rss_bytes": rep["peak_rss_bytes"]}


def dense(model: Path, a: argparse.Namespace) -> dict:
    r = subprocess.run([sys.executable, "-m", "wanda_stream", "eval", str(model), "--data", a.eval_data, "--seqlen",
                        "512", "--max-windows", "40", "--device", "cpu", "--json", "--quiet"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dense: exit {r.returncode}\n{r.stderr[-3000:]}")
    return {"run": "dense", "flags": "", "dir": str(model), "perplexity": json.loads(r.stdout)["perplexity"],
            "decoder_kept": 1.0, "total_sparsity": 0.0, "dropped_blocks": []}


def speed(rows: list[dict], threads: int, rounds: int) -> None:
    """Prefill and greedy-decode tokens/s of every row's model, interleaved over `rounds` rounds (medians)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {r["run"]: AutoModelForCausalLM.from_pretrained(r["dir"], dtype=torch.float32).eval() for r in rows}
    vocab = next(iter(models.values())).config.vocab_size
    window = torch.randint(0, vocab, (1, 512))
    prompt = window[:, :32]
    pre: dict[str, list[float]] = {k: [] for k in models}
    dec: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(window, use_cache=False)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(window, use_cache=False)
                pre[name].append(512 / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                m.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
                dec[name].append(64 / (time.perf_counter() - t0))
    base = {"prefill": statistics.median(pre["dense"]), "decode": statistics.median(dec["dense"])}
    for r in rows:
        r["prefill_tok_s"] = round(statistics.median(pre[r["run"]]), 1)
        r["decode_tok_s"] = round(statistics.median(dec[r["run"]]), 2)
        r["prefill_x"] = round(r["prefill_tok_s"] / base["prefill"], 3)
        r["decode_x"] = round(r["decode_tok_s"] / base["decode"], 3)
        r["speed_threads"] = threads


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| run | flags | perplexity | decoder params kept | blocks removed | prefill tok/s (x dense) "
             "| decode tok/s (x dense) |", "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        sp = (f"{r['prefill_tok_s']} ({r['prefill_x']:.2f}x) | {r['decode_tok_s']} ({r['decode_x']:.2f}x)"
              if "prefill_tok_s" in r else " | ")
        lines.append(f"| {r['run']} | `{r['flags']}` | {r['perplexity']:.2f} | {r['decoder_kept']:.1%} | "
                     f"{', '.join(map(str, r['dropped_blocks']))} | {sp} |")
    return "\n".join(lines)


def plot(rows: list[dict], unstructured: list[dict], path: Path, title: str | None) -> None:
    """Perplexity (log) against decoder parameters kept, and against prefill speed-up: structural options as
    points, the unstructured methods (whose zeros keep every parameter's cost) as lines at 1.0x speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kinds = {"blocks": colors[0], "ffn": colors[1], "heads": colors[2], "ffn0.25+": colors[3]}
    for r in rows:
        if r["run"] == "dense":
            for ax in (ax1, ax2):
                ax.axhline(r["perplexity"], color="gray", linestyle=":", label=f"dense ({r['perplexity']:.2f})")
            continue
        kind = next(k for k in sorted(kinds, key=len, reverse=True) if r["run"].startswith(k))
        marker = "x" if "norefit" in r["run"] else "o"
        ax1.plot(r["decoder_kept"], r["perplexity"], marker, color=kinds[kind])
        ax1.annotate(r["run"], (r["decoder_kept"], r["perplexity"]), fontsize=6, xytext=(3, 3),
                     textcoords="offset points")
        if "prefill_x" in r:
            ax2.plot(r["prefill_x"], r["perplexity"], marker, color=kinds[kind])
            ax2.annotate(r["run"], (r["prefill_x"], r["perplexity"]), fontsize=6, xytext=(3, 3),
                         textcoords="offset points")
    for m, color in zip(("wanda", "sparsegpt"), colors[4:]):
        pts = sorted((1 - u["total_sparsity"], u["perplexity"]) for u in unstructured
                     if u["method"] == m and u["profile"] == "uniform" and ":" not in u["setting"])
        if pts:
            ax1.plot(*zip(*pts), "--", color=color, label=f"{m}, unstructured (nonzeros kept)")
            ax2.plot([1.0] * len(pts), [p for _, p in pts], "s", color=color, label=f"{m} 50-70%: 1.0x")
    ax1.set_xlabel("decoder parameters kept (unstructured: nonzero weights)")
    ax2.set_xlabel("prefill speed in transformers, x dense (CPU)")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, nargs="?")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--keep", type=Path, help="where the pruned outputs are written and kept")
    p.add_argument("--calib", default=str(WIKI / "wiki.valid.tokens"))
    p.add_argument("--eval-data", default=str(WIKI / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", type=Path, help="keep every run's figures here (and skip runs already in it)")
    p.add_argument("--from-json", type=Path, help="print (and plot) figures measured earlier")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode speed of every output")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--plot", type=Path)
    p.add_argument("--unstructured", type=Path, help="tools/method_table.py's JSON, for the plot")
    p.add_argument("--title")
    a = p.parse_args()
    if a.from_json:
        rows = json.loads(a.from_json.read_text())
    else:
        if a.model_dir is None or a.keep is None:
            p.error("MODEL_DIR and --keep are needed unless --from-json is given")
        rows = json.loads(a.json.read_text()) if a.json and a.json.is_file() else []
        done = {r["run"] for r in rows}
        for name in ["dense", *a.runs.split(",")]:
            if name not in done:
                rows.append(dense(a.model_dir, a) if name == "dense" else prune(a.model_dir, name, a))
                print(json.dumps(rows[-1]), flush=True)
                if a.json:
                    a.json.write_text(json.dumps(rows, indent=1))
        if a.speed:
            speed(rows, a.threads, a.rounds)
            if a.json:
                a.json.write_text(json.dumps(rows, indent=1))
    header = (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
              f"{psutil.virtual_memory().total / 2**30:.1f} GiB, {datetime.date.today()}, "
              f"load average {psutil.getloadavg()[0]:.1f}")
    print(table(rows, header))
    if a.plot:
        plot(rows, json.loads(a.unstructured.read_text()) if a.unstructured else [], a.plot, a.title)


if __name__ == "__main__":
    main()
