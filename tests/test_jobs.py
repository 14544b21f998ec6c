"""Batch-job behaviour: --overwrite touches only the tool's own files, simultaneous starts, logs to a pipe."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, checkpoint_files, run_cli, tree_hash
from wanda_stream.cli import main

# Names of every kind the tool writes or copies (shards, index, report, card, config and tokenizer
# files), none of them its own: --overwrite must leave each one as it was.
UNRELATED = {
    "notes.md": b"# my notes\n", "foo.json": b"{}", "bar.safetensors": b"not ours",
    "x.txt": b"text", "model-notours.safetensors": b"x", "model-00001-of-00009.safetensors": b"other count",
    "model.safetensors.index.json.bak": b"{}", "chat_template.jinja.orig": b"{{ x }}",
    "tokenizer.model": b"spm", "special.yaml": b"a: 1",
}


def _magnitude(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), str(out), "--method", "magnitude", "--quiet", *extra]


def test_overwrite_deletes_only_what_the_tool_writes(tiny_model: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    assert main(_magnitude(tiny_model, clean)) == 0
    out = tmp_path / "out"
    out.mkdir()
    for name, data in UNRELATED.items():
        (out / name).write_bytes(data)
    assert main(_magnitude(tiny_model, out)) == 2  # not empty: refused, nothing touched
    assert tree_hash(out) == {n: h for n, h in tree_hash(out).items() if n in UNRELATED}
    for _ in range(2):  # a fresh output and an overwritten finished one
        assert main(_magnitude(tiny_model, out, "--overwrite")) == 0
        got = tree_hash(out)
        assert {n: (out / n).read_bytes() for n in UNRELATED} == UNRELATED
        assert got["wanda_stream.json"]
        assert {n: h for n, h in checkpoint_files(out).items() if n not in UNRELATED} == checkpoint_files(clean)


# Imports happen before the barrier, so the processes reach the lock within milliseconds of each other.
_AT_ONCE = """
import os, sys, time
from wanda_stream import cli
from wanda_stream import commands
from wanda_stream.run import prune
from wanda_stream.model import stream  # noqa: F401
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
sys.exit(cli.main(sys.argv[3:]))
"""


def test_simultaneous_starts_one_wins_the_others_get_the_lock_message(tiny_model: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert main(_magnitude(tiny_model, single)) == 0
    out, go, n = tmp_path / "out", tmp_path / "go", 6
    procs = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(tmp_path / f"ready{k}"), str(go),
                               *_magnitude(tiny_model, out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for k in range(n)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(n)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0] + [2] * (n - 1), results
    for rc, err in results:
        if rc == 2:
            assert "another wanda-stream process" in err and err.count("\n") == 1, err
    assert checkpoint_files(out) == checkpoint_files(single)


def test_progress_is_a_line_per_block_when_stderr_is_not_a_terminal(tiny_model: Path, tmp_path: Path) -> None:
    r = run_cli("prune", str(tiny_model), str(tmp_path / "out"), "--method", "magnitude")  # stderr is a pipe
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"^prune: block (\d)/3, elapsed \d+:\d\d:\d\d, ETA (?:\d+:\d\d:\d\d|\?), "
                       r"peak RSS (\d+) MiB$", r.stderr, re.M)
    assert [b for b, _ in lines] == ["1", "2", "3"], r.stderr
    assert all(int(mib) > 50 for _, mib in lines)  # torch alone is more than that


def test_default_seqlen_is_the_model_context_and_magnitude_ignores_seqlen(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny model's context is 256 tokens: the paper's 2048 would be refused.
    assert main(["prune", str(tiny_model), str(tmp_path / "w"), "--calib", "pydoc", "--nsamples", "2"]) == 0
    assert "--seqlen 256 (min of 2048 and the model's context of 256 tokens)" in capsys.readouterr().err
    report = json.loads((tmp_path / "w" / "wanda_stream.json").read_text())
    assert report["config"]["seqlen"] == 256
    # Recorded where a peak is: the kernel's high-water mark of this process, never more than it.
    assert 0 < report["peak_rss_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert "peak_cuda_bytes" not in report  # a CPU run
    # Magnitude reads no calibration windows: a --seqlen beyond the context does not block it.
    assert main(["prune", str(tiny_model), str(tmp_path / "m"), "--method", "magnitude", "--seqlen", "4096",
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["eval", str(tiny_model), "--data", "pydoc", "--max-windows", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["seqlen"] == 256 and "--seqlen 256 (min of 2048" in err
