"""A finished run's report as a picture: per block, the relative output error, the sparsity, and OWL's
outlier ratios when the run used that profile (matplotlib, the `plot` extra)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from wanda_stream.storage.checkpoint import atomic_write_bytes
from wanda_stream.errors import InputError
from wanda_stream.storage.state import REPORT_NAME


def load_report(out_dir: Path) -> dict[str, Any]:
    """The report of the finished run in `out_dir`; InputError naming the file when it is missing or unreadable."""
    path = Path(out_dir) / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no report here; --plot needs the output directory of a finished prune") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable report ({e}); point --plot's OUT at a finished prune") from None


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Draw per-block error, sparsity and (OWL) outlier ratios of `report` to the PNG `path` (atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot: matplotlib is not installed; pip install 'wanda-stream[plot]'") from None
    blocks = report["blocks"]
    x = [b["block"] for b in blocks]
    owl = [b["outlier_ratio"] for b in blocks if "outlier_ratio" in b]
    fig, axes = plt.subplots(3 if owl else 2, 1, figsize=(8, 7 if owl else 5), sharex=True)
    err = axes[0]
    if all("output_error" in b for b in blocks):
        err.plot(x, [b["output_error"] for b in blocks], marker="o", label="block output ||Y'-Y|| / ||Y||")
    layer = [(b["block"], max(m["layer_error"] for m in b["matrices"])) for b in blocks
             if b["matrices"] and all("layer_error" in m for m in b["matrices"])]
    if layer:
        err.plot(*zip(*layer), marker=".", linestyle="--", label="worst matrix ||X(W'-W)||^2 / ||XW||^2")
    err.set_ylabel("relative error")
    err.set_title(f"{report['method']['name']}: errors on the calibration inputs", fontsize=10)
    if err.lines:
        err.legend(fontsize=8)
    axes[1].plot(x, [b["sparsity"] for b in blocks], marker="o", label="sparsity")
    if any("target_sparsity" in b for b in blocks):
        axes[1].plot(x, [b.get("target_sparsity") for b in blocks], linestyle="--", label="target (OWL)")
    axes[1].set_ylabel("sparsity")
    axes[1].legend(fontsize=8)
    if owl:
        axes[2].bar(x, owl)
        axes[2].set_ylabel("OWL outlier ratio (%)")
    axes[-1].set_xlabel("block")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
