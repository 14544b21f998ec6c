"""Inspecting checkpoints (sparsity per matrix, N:M compliance) and run directories (status)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from wanda_stream.model import experts
from wanda_stream.methods import kernel
from wanda_stream.run.config import parse_pattern
from wanda_stream.errors import InputError
from wanda_stream.storage.state import REPORT_NAME, RUN_FILE, WorkDir, profile_blocks_done


def inspect_checkpoint(model_dir: Path, pattern: str | None = None) -> dict[str, Any]:
    """Per-matrix and total sparsity of the decoder linears' weights, one tensor in memory at a time."""
    from wanda_stream.model.stream import open_model

    nm = parse_pattern(pattern) if pattern else None
    ckpt, sk = open_model(model_dir)
    pruned = experts.pruned_matrices(sk)
    rows, zeros_total, numel_total = [], 0, 0
    for key in ckpt.keys():
        if key not in pruned:
            continue
        stored = ckpt.get(key)
        for matrix in pruned[key]:  # one, or every expert of a fused 3D tensor
            w = matrix.view(stored)
            zeros = int((w == 0).sum())
            row = {"name": matrix.name, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                   "bytes": w.numel() * w.element_size(), "sparsity": zeros / w.numel()}
            if nm:
                row[f"{nm[0]}:{nm[1]}"] = kernel.satisfies_nm(w, nm)
            rows.append(row)
            zeros_total += zeros
            numel_total += w.numel()
    rows.sort(key=lambda r: natural_key(r["name"]))
    result: dict[str, Any] = {"model_dir": str(model_dir), "matrices": rows,
                              "total_sparsity": zeros_total / max(numel_total, 1), "parameters": numel_total}
    if nm:
        result["pattern"] = pattern
        result["all_satisfy_pattern"] = all(r[f"{nm[0]}:{nm[1]}"] for r in rows)
    return result


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """'layers.10.x' sorts after 'layers.2.x': digit runs compare as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def _block_and_kind(name: str) -> tuple[int | None, str]:
    """'model.layers.12.self_attn.q_proj.weight' -> (12, 'self_attn.q_proj.weight')."""
    m = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(m[1]), re.sub(r"\.\d+\.", ".*.", m[2])) if m else (None, name)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Weights, zeros and sparsity per layer kind (q_proj, experts' down_proj, ...) and per block."""
    groups: dict[str, dict[Any, dict[str, int]]] = {"by_kind": {}, "by_block": {}}
    for r in result["matrices"]:
        numel = math.prod(r["shape"])
        block, kind = _block_and_kind(r["name"])
        for table, key in (("by_kind", kind), ("by_block", block)):
            g = groups[table].setdefault(key, {"matrices": 0, "weights": 0, "zeros": 0})
            g["matrices"] += 1
            g["weights"] += numel
            g["zeros"] += round(r["sparsity"] * numel)
    return {table: [{"name": k, **v, "sparsity": v["zeros"] / max(v["weights"], 1)}
                    for k, v in sorted(g.items(), key=lambda kv: natural_key(str(kv[0])))]
            for table, g in groups.items()} | {"total_sparsity": result["total_sparsity"],
                                               "parameters": result["parameters"]}


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for table, title in (("by_kind", "layer kind"), ("by_block", "block")):
        head = f"{title:<40} {'matrices':>8} {'weights':>12} {'sparsity':>9}"
        lines += [head, "-" * len(head)]
        lines += [f"{str(g['name']):<40} {g['matrices']:>8} {g['weights']:>12} {g['sparsity']:>9.4f}"
                  for g in summary[table]]
        lines.append("")
    lines.append(f"total sparsity of {summary['parameters']} decoder-linear weights: {summary['total_sparsity']:.4f}")
    return "\n".join(lines)


def format_status(row: dict[str, Any]) -> str:
    """`status` as aligned 'label  value' lines, floats to four decimals."""
    width = max(map(len, row)) + 2
    return "\n".join(f"{k:<{width}}{f'{v:.4f}' if isinstance(v, float) else v}" for k, v in row.items())


def format_table(result: dict[str, Any]) -> str:
    pat = result.get("pattern")
    head = f"{'matrix':<48} {'shape':>14} {'dtype':>9} {'sparsity':>9}" + (f" {pat:>6}" if pat else "")
    lines = [head, "-" * len(head)]
    for r in result["matrices"]:
        shape = "x".join(map(str, r["shape"]))
        line = f"{r['name']:<48} {shape:>14} {r['dtype']:>9} {r['sparsity']:>9.4f}"
        if pat:
            line += f" {'yes' if r[pat] else 'no':>6}"
        lines.append(line)
    lines.append(f"total sparsity of {result['parameters']} decoder-linear weights: {result['total_sparsity']:.4f}")
    if pat:
        lines.append(f"every matrix satisfies {pat}: {'yes' if result['all_satisfy_pattern'] else 'no'}")
    return "\n".join(lines)


def run_status(path: Path) -> dict[str, Any]:
    """What run `path` (a work dir or an output dir) holds, how far it got, whether it can resume."""
    work = WorkDir(path if (path / RUN_FILE).is_file() else path / ".wanda-stream")
    report = path / REPORT_NAME
    if not work.exists():
        if report.is_file():
            try:
                rep = json.loads(report.read_text())
                cfg = rep["config"]
                blocks = len(rep["blocks"])
                row = {"state": "finished", "model": cfg["model_dir"], "output": cfg["output_dir"],
                       "method": cfg["method"], "pattern": cfg["pattern"], "sparsity": cfg["sparsity"],
                       "blocks_done": blocks, "blocks_total": blocks, "total_sparsity": rep["total_sparsity"],
                       "can_resume": False}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputError(f"{report}: unreadable report ({e.__class__.__name__}); the output is damaged")
            if "eval" in rep:
                row["perplexity"] = rep["eval"]["perplexity"]
            return row
        raise InputError(
            f"{path}: no wanda-stream run here (no {RUN_FILE} and no {REPORT_NAME}); "
            "pass the output directory or the --work-dir of a run"
        )
    run = work.load_run()
    state = work.load_state()
    from wanda_stream.run.config import RunConfig
    from wanda_stream.storage.state import resume_command

    try:
        cfg = RunConfig.from_json(run["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{work.path / RUN_FILE}: unreadable run file ({e}); start over with --overwrite") from None
    row: dict[str, Any] = {
        "state": "finished" if state.stage == "done" else "incomplete", "work_dir": str(work.path),
        "model": cfg.model_dir, "output": cfg.output_dir, "method": cfg.method, "pattern": cfg.pattern,
        "sparsity": cfg.sparsity, "sparsity_profile": cfg.sparsity_profile, "stage": state.stage,
        "blocks_done": state.next_block,
    }
    if "profile" in state.extra:
        row["profile_blocks_done"] = profile_blocks_done(state.extra["profile"])
    row["world_size"] = cfg.world_size
    if cfg.world_size > 1:
        row["ranks"] = [_rank_progress(work, r) for r in range(cfg.world_size)]
    try:
        from wanda_stream.model.skeleton import load_config

        row["blocks_total"] = load_config(Path(cfg.model_dir)).get_text_config().num_hidden_layers
        row["can_resume"] = state.stage != "done"
    except InputError as e:
        # The run is intact but its input is not: resuming would be refused until it is back.
        row["blocks_total"] = None
        row["can_resume"] = False
        row["problem"] = str(e)
    holder = work.locked_by()
    if holder is not None:
        row["state"], row["running_pid"], row["can_resume"] = "running", holder, False
    if row["can_resume"]:
        row["resume_with"] = resume_command(cfg)
    return row


def _rank_progress(work: WorkDir, rank: int) -> dict[str, Any]:
    """The last block rank `rank` of a torchrun launch finished (each rank notes it after every block)."""
    try:
        return json.loads(work.rank_note(rank).read_text())
    except (OSError, ValueError):
        return {"rank": rank, "block": None}
