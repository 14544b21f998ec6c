"""Batch-job behaviour: progress output, early resource refusals, status, and the documented exit codes."""

from __future__ import annotations

import io
import json
import re
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from tests.helpers import ROOT
from wanda_stream import cli
from wanda_stream import commands
from wanda_stream.storage import state as state_mod
from wanda_stream.cli import main

ARGS = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


def test_json_progress_lines(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(tiny_model), str(tmp_path / "out"), *ARGS, "--log-format", "json"]) == 0
    cap = capsys.readouterr()
    events = [json.loads(line) for line in cap.err.strip().splitlines()]  # every line is one JSON object
    blocks = [e for e in events if e["event"] == "block"]
    assert [(e["block"], e["done"], e["total"]) for e in blocks] == [(0, 1, 3), (1, 2, 3), (2, 3, 3)]
    for e in blocks:
        assert e["elapsed_s"] >= 0 and e["peak_rss_bytes"] > 10**6 and e["bytes_written"] >= 0
        assert e["eta_s"] is None or e["eta_s"] >= 0
    assert blocks[-1]["eta_s"] == 0
    elapsed = [e["elapsed_s"] for e in blocks]
    assert elapsed == sorted(elapsed)
    done = json.loads(cap.out.strip())
    assert done["event"] == "done" and done["total_sparsity"] == pytest.approx(0.5)


def test_quiet_prints_nothing(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(tiny_model), str(tmp_path / "out"), *ARGS, "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


def _free(n: int) -> object:
    usage = namedtuple("usage", "total used free")
    return lambda path: usage(10 * n, 9 * n, n)


def test_refuses_early_when_the_disk_is_too_small(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands.shutil, "disk_usage", _free(100_000))
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    # The checkpoint's tensors are ~590 KiB; 100000 bytes are 97.7 KiB.
    assert re.fullmatch(rf"wanda-stream: error: {re.escape(str(out))}: needs about [0-9.]+ KiB free for the pruned "
                        r"checkpoint, has 97\.7 KiB; free space or choose another --work-dir / output directory", err), err
    needed = float(re.search(r"needs about ([0-9.]+) KiB", err)[1])
    assert 590 < needed < 800
    assert not out.exists()  # refused before the run was created: the same command works once there is room
    monkeypatch.undo()
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--quiet"]) == 0


def test_refuses_early_when_memory_is_too_small(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    vm = namedtuple("vm", "available total")
    monkeypatch.setattr(commands.psutil, "virtual_memory", lambda: vm(200_000, 10**9))
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"wanda-stream: error: these settings need about [0-9.]+ KiB of RAM on this node, 195\.3 KiB is "
                        r"available; lower --batch-size or --max-activation-memory, run fewer ranks per node, or use a "
                        r"bigger machine", err), err
    assert not out.exists()


def test_status(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert main(["status", str(out)]) == 2
    assert "no wanda-stream run here" in capsys.readouterr().err
    monkeypatch.setenv(state_mod.KILL_ENV, "hidden_write:2:TERM")  # 1: block 0's dense outputs; 2: its pruned ones
    state_mod._kill_counts.clear()
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--quiet", "--keep-work-dir"]) == 75
    monkeypatch.delenv(state_mod.KILL_ENV)
    capsys.readouterr()
    # The output dir and the work dir name the same run.
    for path in (out, out / ".wanda-stream"):
        assert main(["status", str(path)]) == 0
        text = capsys.readouterr().out
        assert re.search(r"^state\s+incomplete$", text, re.M)
        # One micro-batch per block: the stop came during block 0's last write, so block 0 completed.
        assert re.search(r"^blocks_done\s+1$", text, re.M) and re.search(r"^blocks_total\s+3$", text, re.M)
        assert re.search(r"^can_resume\s+True$", text, re.M)
        assert re.search(rf"^model\s+{re.escape(str(tiny_model))}$", text, re.M)
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--quiet", "--resume", "--keep-work-dir"]) == 0
    assert main(["status", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["state"], st["blocks_done"], st["can_resume"]) == ("finished", 3, False)
    assert "resume_with" not in st


def test_internal_error_exits_1_with_traceback(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(commands, "check_resources", boom)
    assert main(["prune", str(tiny_model), str(tmp_path / "out"), *ARGS]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: simulated bug" in err and "internal error" in err


def test_exit_codes_are_documented() -> None:
    doc = (ROOT / "docs" / "batch.md").read_text()
    rows = dict(re.findall(r"^\|\s*`?(\d+)`?\s*\|\s*([^|]+)\|", doc, re.M))
    assert {int(k) for k in rows} == {cli.EXIT_OK, cli.EXIT_INTERNAL, cli.EXIT_INPUT, cli.EXIT_TEMPFAIL}
    assert cli.EXIT_TEMPFAIL == state_mod.EX_TEMPFAIL == 75
    assert "75 stopped by SIGTERM/SIGINT with its state saved: rerun with --resume" in " ".join(cli.PRUNE_EXAMPLES.split())
    script = ROOT / "docs" / "slurm_example.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--resume" in text and "75" in text and "scontrol requeue" in text


def test_eta_of_a_resumed_run_counts_only_its_own_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from wanda_stream.run import report

    clock = [1000.0]
    monkeypatch.setattr(report.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()
    progress = report.Progress("json", 80, "prune", stream=stream)
    clock[0] += 3600  # an hour of start-up (reading, tokenizing) in an earlier process must not count either
    progress.begin(40)
    clock[0] += 60
    progress.update(41, block=40)
    rec = json.loads(stream.getvalue())
    # One block a minute in this process: 39 to go is 39 minutes, not the 57 s that 41 blocks per minute would say.
    assert (rec["done"], rec["resumed_from"], rec["elapsed_s"], rec["eta_s"]) == (41, 40, 60.0, 2340.0)


def test_resumed_run_reports_where_it_resumed(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv(state_mod.KILL_ENV, "block_done:1:TERM")
    state_mod._kill_counts.clear()
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--quiet"]) == 75
    monkeypatch.delenv(state_mod.KILL_ENV)
    capsys.readouterr()
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--resume", "--log-format", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [(e["done"], e["resumed_from"]) for e in events if e["event"] == "block"] == [(3, 2)]


def test_sigterm_during_start_up_exits_75(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    original = commands.build_prune_config

    def signalled(*args: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)  # while the checkpoint is being opened and checked
        return original(*args)

    monkeypatch.setattr(commands, "build_prune_config", signalled)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--quiet"]) == 75
    err = capsys.readouterr().err
    assert "stopped before the first block" in err and "--resume" in err
    monkeypatch.undo()
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--quiet", "--resume"]) == 0
    assert (out / "wanda_stream.json").is_file()


def test_refuses_early_on_a_real_small_disk(tiny_model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_bad_input import _mount_tmpfs

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-disk_usage test covers the check")
    try:
        out = disk / "out"
        assert main(["prune", str(tiny_model), str(out), *ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(rf"wanda-stream: error: {re.escape(str(out))}: needs about [0-9.]+ KiB free for the "
                            r"pruned checkpoint, has 25\d\.0 KiB; .*", err), err  # the run's lock file may hold a block
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_counts_resumed_blocks() -> None:
    from wanda_stream.run.report import Progress

    term = _Terminal()
    progress = Progress("bar", 80, "prune", stream=term)
    progress.begin(40)
    progress.update(41, block=40)
    progress.close()
    assert "41/80" in term.getvalue() and "prune" in term.getvalue()
    plain = Progress("bar", 3, "prune", stream=io.StringIO())
    assert plain.bar is None and plain.mode == "lines"  # no terminal, no bar: a line per block


def test_refuses_before_the_first_hidden_state_when_uncapped_evaluation_does_not_fit(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Without --eval-windows the preflight cannot know how many windows the text makes; the run checks
    # again once they are known, before any hidden state is written, and the fix is a resume.
    out = tmp_path / "out"
    args = ["prune", str(tiny_model), str(out), *ARGS, "--eval-data", "pydoc", "--eval-seqlen", "32"]
    monkeypatch.setattr(commands.shutil, "disk_usage", _free(10_000))
    assert main(args) == 2
    preflight = float(re.search(r"needs about ([0-9.]+) KiB", capsys.readouterr().err)[1])
    monkeypatch.setattr(commands.shutil, "disk_usage", _free(int((preflight + 20) * 1024)))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"wanda-stream: error: {re.escape(str(out))}: needs about [0-9.]+ (KiB|MiB) free for the pruned "
                        r"checkpoint, has [0-9.]+ KiB; free space, then resume with: wanda-stream prune .* --resume.*", err), err
    assert not list((out / ".wanda-stream").glob("*.bin"))  # nothing computed yet
    monkeypatch.undo()
    assert main([*args, "--resume", "--quiet"]) == 0
    report = json.loads((out / "wanda_stream.json").read_text())
    assert report["eval"]["windows"] > 10
