"""A sweep: several pruning configurations in one pass over the checkpoint.

Each configuration is a complete run of its own (work dir, hidden-state streams, state, output
directory, report and card), exactly as `wanda-stream prune` with its flags would make it. The runs
step in lockstep, block by block (`PruneRun.steps`), the one furthest behind first, so that every
block is read from the checkpoint once for all of them (`SharedBlocks`) instead of once per run.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanda_stream.errors import InputError
from wanda_stream.model.stream import SharedBlocks
from wanda_stream.run.prune import Position, PruneRun

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# What the sweep as a whole decides, so no configuration may set it for itself.
SHARED_FLAGS = ("--device", "--work-dir", "--resume", "--overwrite", "--no-prefetch", "--dist-timeout",
                "--revision", "--sweep", "--log-format", "--quiet")
PLAN_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class Entry:
    """One configuration of a sweep: its name (the output's subdirectory) and its prune flags."""

    name: str
    flags: tuple[str, ...]


def parse_sweep(spec: str) -> list[Entry]:
    """The configurations of `--sweep SPEC`: a plan file (.json/.yaml: a mapping of name to prune flags),
    or comma-separated METHOD:SPARSITY and METHOD:N:M items, each optionally NAME=... ."""
    if spec.endswith(PLAN_SUFFIXES):
        entries = _plan_file(Path(spec))
    else:
        entries = [_item(item.strip()) for item in spec.split(",") if item.strip()]
    if not entries:
        raise InputError(f"--sweep {spec!r}: names no configuration; give e.g. wanda:0.5,wanda:0.6,sparsegpt:2:4")
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--sweep: the name {twice[0]!r} is given twice; name each configuration once (NAME=...)")
    for e in entries:
        _check_entry(e)
    return entries


def _item(item: str) -> Entry:
    """NAME=METHOD:SPARSITY or NAME=METHOD:N:M (NAME optional) as an Entry."""
    name, _, body = item.rpartition("=")
    parts = body.split(":")
    if len(parts) == 2:
        method, sparsity = parts
        flags: tuple[str, ...] = ("--method", method, "--sparsity", sparsity)
        default = f"{method}-{sparsity}"
    elif len(parts) == 3:
        method, n, m = parts
        flags = ("--method", method, "--pattern", f"{n}:{m}")
        default = f"{method}-{n}of{m}"
    else:
        raise InputError(f"--sweep item {item!r}: write METHOD:SPARSITY or METHOD:N:M (e.g. wanda:0.5, "
                         "sparsegpt:2:4), optionally NAME=..., or give a .json/.yaml plan file")
    return Entry(name or default, flags)


def _plan_file(path: Path) -> list[Entry]:
    """A plan file's entries: {name: "prune flags" or [flags]}."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--sweep {path}: cannot read it ({e.strerror})") from None
    if path.suffix == ".json":
        try:
            plan = json.loads(text)
        except ValueError as e:
            raise InputError(f"--sweep {path}: not valid JSON ({e})") from None
    else:
        import yaml

        try:
            plan = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"--sweep {path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(plan, dict) or not all(isinstance(v, (str, list)) for v in plan.values()):
        raise InputError(f"--sweep {path}: must map each configuration's name to its prune flags, e.g. "
                         '{"wanda-50": "--method wanda --sparsity 0.5"}')
    return [Entry(str(name), tuple(shlex.split(v) if isinstance(v, str) else map(str, v)))
            for name, v in plan.items()]


def _check_entry(e: Entry) -> None:
    if not NAME.fullmatch(e.name):
        raise InputError(f"--sweep: {e.name!r} is not a usable name (the output's subdirectory): use letters, "
                         "digits and . _ + -")
    for flag in e.flags:
        if flag.split("=")[0] in SHARED_FLAGS:
            raise InputError(f"--sweep {e.name}: {flag.split('=')[0]} is the sweep's to set, not a configuration's; "
                             "give it once, outside --sweep")


def entry_argv(argv: Sequence[str], output_dir: Path, entry: Entry) -> list[str]:
    """The single `prune` command line equal to this entry: the sweep's own without --sweep, into
    OUTPUT_DIR/NAME, with the entry's flags last (they win). An entry that sets --sparsity or --pattern
    replaces both of the sweep's (2:4 beside a sweep-wide --sparsity 0.5 would be a contradiction)."""
    own = {f.split("=")[0] for f in entry.flags}
    dropped = {"--sweep"} | ({"--sparsity", "--pattern"} if own & {"--sparsity", "--pattern"} else set())
    out: list[str] = []
    skip = replaced = False
    for token in argv:
        if skip:
            skip = False
        elif token in dropped:
            skip = True
        elif token.split("=")[0] in dropped and "=" in token:
            continue
        elif not replaced and not token.startswith("-") and Path(token) == output_dir:
            out.append(str(output_dir / entry.name))
            replaced = True
        else:
            out.append(token)
    return [*out, *entry.flags]


def run_lockstep(runs: Sequence[PruneRun]) -> list[dict[str, Any] | None]:
    """Step the runs block by block, the one furthest behind first (ties in the sweep's order), so that
    a block the runs share is read once; returns their reports (None on ranks other than 0).

    On an error or a stop in one run, every other run is closed where it stands: each records its last
    block as done first, so that a resumed sweep loses no finished work.
    """
    groups: dict[tuple[str, str], SharedBlocks] = {}
    for r in runs:
        r.sweep_runs = len(runs)
        r.st.shared = groups.setdefault((r.cfg.model_dir, str(r.cfg.output_dtype)), SharedBlocks())
    steps: list[Steps] = [r.steps() for r in runs]
    reports: list[dict[str, Any] | None] = [None] * len(runs)
    at: dict[int, Position] = {}
    try:
        for k in range(len(runs)):
            _advance(k, steps, at, reports)
        while at:
            k = min(at, key=lambda j: (at[j], j))
            shared = runs[k].st.shared
            assert shared is not None
            shared.hand_over = not any(at[j] == at[k] and runs[j].st.shared is shared for j in at if j != k)
            _advance(k, steps, at, reports)
    except BaseException:
        for k in list(at):
            steps[k].close()
        raise
    return reports


Steps = Generator[Position, None, "dict[str, Any] | None"]


def _advance(k: int, steps: list[Steps], at: dict[int, Position], reports: list[dict[str, Any] | None]) -> None:
    """One step of run k: to its next position, or to its end (its report)."""
    at.pop(k, None)
    try:
        at[k] = next(steps[k])
    except StopIteration as done:
        reports[k] = done.value


def blocks_read(runs: Sequence[PruneRun]) -> int:
    """Blocks the sweep read from the checkpoint, over all its share groups."""
    return sum(s.reads for s in {id(r.st.shared): r.st.shared for r in runs if r.st.shared is not None}.values())


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's results, one line per configuration."""
    lines = ["| configuration | method | sparsity | perplexity | output |", "|---|---|---:|---:|---|"]
    for r in rows:
        ppl = f"{r['perplexity']:.4f}" if r.get("perplexity") is not None else "-"
        lines.append(f"| {r['name']} | {r['method']} | {r['total_sparsity']:.4f} | {ppl} | {r['output_dir']} |")
    return "\n".join(lines)
