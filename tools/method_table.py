"""Perplexity against sparsity for every method and profile on one model, on identical calibration windows.

Every run prunes with `wanda-stream prune` in its own process (calibration: --nsamples x --seqlen
windows of --calib, seed 0, the same windows for every run) and measures WikiText-2 perplexity in the
same pass; the pruned checkpoint is deleted after its report is read; `dense` is the unpruned
model on the same evaluation windows. Prints a markdown table of the runs with the machine and
date, then perplexity by method and setting; `--json` keeps the figures (and resumes: runs already
in the file are skipped), `--plot` draws perplexity against sparsity (matplotlib, the `plot` extra).

    python tools/convert_smollm2.py /data/smollm2
    python tools/method_table.py /data/smollm2 --runs wanda:0.5,sparsegpt:0.5,wanda+owl:0.7 --json t.json
    python tools/method_table.py /data/smollm2 --runs sparsegpt+rec:2:4 --json t.json  # + --reconstruct
    python tools/method_table.py --from-json t.json --plot docs/methods.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
METHODS = ("magnitude", "wanda", "ria", "sparsegpt", "alps")
SETTINGS = ("0.5", "0.6", "0.7", "2:4")
DEFAULT_RUNS = ["dense"] + [f"{m}:{s}" for m in METHODS for s in SETTINGS] + [
    f"{m}+owl:{s}" for m in METHODS for s in SETTINGS if s != "2:4"] + [
    f"{m}+rec:{s}" for m in ("sparsegpt", "alps") for s in SETTINGS]
# METHOD+SUFFIX: the profile or the step after the masks, its flags, and how the table and plot name it.
VARIANTS = {"uniform": ([], ""), "owl": (["--sparsity-profile", "owl"], " + OWL"),
            "rec": (["--reconstruct"], " + reconstruct")}


def run_dense(model: Path, a: argparse.Namespace) -> dict:
    """The unpruned model's perplexity on the same evaluation windows (the baseline of the table)."""
    args = [sys.executable, "-m", "wanda_stream", "eval", str(model), "--data", a.eval_data, "--seqlen", "512",
            "--max-windows", "40", "--device", "cpu", "--json", "--quiet"]
    t0 = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"dense: exit {r.returncode}\n{r.stderr[-3000:]}")
    rep = json.loads(r.stdout)
    return {"run": "dense", "method": "dense", "profile": "uniform", "setting": "0", "perplexity": rep["perplexity"],
            "total_sparsity": 0.0, "wall_s": round(wall, 1), "peak_rss_bytes": rep.get("peak_rss_bytes", 0)}


def run_one(model: Path, spec: str, a: argparse.Namespace, work: Path) -> dict:
    """One prune + perplexity: spec is dense, METHOD[+owl|+rec]:SPARSITY or METHOD[+rec]:N:M."""
    if spec == "dense":
        return run_dense(model, a)
    method, _, setting = spec.partition(":")
    method, _, variant = method.partition("+")
    variant = variant or "uniform"
    out = work / spec.replace(":", "_").replace("+", "_")
    args = [sys.executable, "-m", "wanda_stream", "prune", str(model), str(out), "--method", method,
            "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", "0",
            "--device", "cpu", "--eval-data", a.eval_data, "--eval-windows", "40", "--eval-seqlen", "512", "--quiet"]
    args += ["--pattern", setting] if ":" in setting else ["--sparsity", setting]
    args += VARIANTS[variant][0] + (a.reconstruct_args.split() if variant == "rec" and a.reconstruct_args else [])
    t0 = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{spec}: exit {r.returncode}\n{r.stderr[-3000:]}")
    rep = json.loads((out / "wanda_stream.json").read_text())
    if a.reports:
        a.reports.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "wanda_stream.json", a.reports / f"{out.name}.json")
    shutil.rmtree(out)
    row = {"run": spec, "method": method, "profile": variant, "setting": setting,
           "perplexity": rep["eval"]["perplexity"], "total_sparsity": rep["total_sparsity"], "wall_s": round(wall, 1),
           "peak_rss_bytes": rep["peak_rss_bytes"]}
    if variant == "rec":  # the fit's options and the blocks' errors before and after it
        row["reconstruct"] = rep["config"]["reconstruct"]
        row["block_errors"] = [[b["reconstruct"]["output_error_before"], b["reconstruct"]["output_error_after"]]
                               for b in rep["blocks"]]
    return row


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| run | perplexity | sparsity | wall (s) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['perplexity']:.2f} | {r['total_sparsity']:.4f} | {r['wall_s']} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def grid(rows: list[dict]) -> str:
    """Perplexity by method and profile (rows) and setting (columns), the best of each column in bold."""
    by = {(r["method"], r["profile"], r["setting"]): r["perplexity"] for r in rows}
    best = {s: min((v for (m, _, st), v in by.items() if st == s and m != "dense"), default=None) for s in SETTINGS}
    head = ["50%", "60%", "70%", "2:4"]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    if ("dense", "uniform", "0") in by:
        lines.append(f"| dense | {by['dense', 'uniform', '0']:.2f} | | | |")
    for profile in VARIANTS:
        for m in METHODS:
            cells = []
            for st in SETTINGS:
                v = by.get((m, profile, st))
                cells.append("" if v is None else f"**{v:.2f}**" if v == best[st] else f"{v:.2f}")
            if any(cells):
                lines.append(f"| {m}{VARIANTS[profile][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str | None = None) -> None:
    """Perplexity (log scale) against unstructured sparsity, one line per method and profile; 2:4 as
    squares in a column of their own (2:4 is 50% sparse, but constrained), the dense model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nm_x = 0.42
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        if r["method"] == "dense":
            ax.axhline(r["perplexity"], color="gray", linestyle=":", label=f"dense ({r['perplexity']:.2f})")
    for m, color in zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for profile, style, marker in (("uniform", "-", "o"), ("owl", "--", "^"), ("rec", ":", "D")):
            pts = sorted((float(r["setting"]), r["perplexity"]) for r in rows
                         if r["method"] == m and r["profile"] == profile and ":" not in r["setting"])
            nm = [r["perplexity"] for r in rows if r["method"] == m and r["profile"] == profile and r["setting"] == "2:4"]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, color=color, label=m + VARIANTS[profile][1])
            elif nm:
                ax.plot([], [], style, marker=marker, color=color, label=m + VARIANTS[profile][1])
            if nm:
                ax.plot([nm_x], nm, marker="s" if profile == "uniform" else marker, color=color, linestyle="none")
    ax.set_xticks([nm_x, 0.5, 0.6, 0.7], ["2:4", "50%", "60%", "70%"])
    ax.axvline((nm_x + 0.5) / 2, color="black", linewidth=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder's linear layers (dashed: OWL's per-block sparsities; dotted: + reconstruct)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, nargs="?")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated METHOD[+owl|+rec]:SPARSITY|N:M")
    p.add_argument("--calib", default=str(WIKI / "wiki.valid.tokens"))
    p.add_argument("--eval-data", default=str(WIKI / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--reconstruct-args", default="",
                   help="further flags of the METHOD+rec runs, e.g. '--reconstruct-lr 3e-4' (default: the defaults)")
    p.add_argument("--json", type=Path, help="append each run's figures to this JSON file as it finishes")
    p.add_argument("--reports", type=Path, help="keep each run's report (per-block and per-matrix errors) here")
    p.add_argument("--from-json", type=Path, help="print (and plot) figures measured earlier instead of running")
    p.add_argument("--plot", type=Path, help="write a PNG of perplexity against sparsity")
    p.add_argument("--title", help="the plot's title (the model and calibration, say)")
    a = p.parse_args()
    if a.from_json:
        rows = json.loads(a.from_json.read_text())
    else:
        if a.model_dir is None:
            p.error("MODEL_DIR is needed unless --from-json is given")
        rows = json.loads(a.json.read_text()) if a.json and a.json.is_file() else []
        done = {r["run"] for r in rows}
        with tempfile.TemporaryDirectory(prefix="method-table-") as tmp:
            for spec in a.runs.split(","):
                if spec in done:
                    continue
                rows.append(run_one(a.model_dir, spec, a, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
                if a.json:
                    a.json.write_text(json.dumps(rows, indent=1))
    header = (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
              f"{psutil.virtual_memory().total / 2**30:.1f} GiB, {datetime.date.today()}")
    print(table(rows, header))
    print()
    print(grid(rows))
    if a.plot:
        plot(rows, a.plot, a.title)


if __name__ == "__main__":
    main()
