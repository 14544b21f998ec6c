"""Killed (SIGKILL) at any point, stopped by SIGTERM/SIGINT, a resumed run ends byte-identical to an uninterrupted one.

Kills go through WANDA_STREAM_KILL_AT=point[:k[:SIG]] (the process signals itself at an exact point)
plus SIGKILLs at random moments; every run is a subprocess, as a batch scheduler would run it.
"""

from __future__ import annotations

import fcntl
import json
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, checkpoint_files, run_cli, tree_hash, write_tiny_model
from wanda_stream.storage import state as state_mod
from wanda_stream.cli import main
from wanda_stream.storage.state import WorkDir

# Two micro-batches per calibration hidden-state file, so "while hidden states are written" is mid-file;
# an evaluation stream too, whose perplexity must also come out the same.
ARGS = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--batch-size", "2",
        "--eval-data", "pydoc", "--eval-windows", "2"]
REPORT = "wanda_stream.json"
INDEX = "model.safetensors.index.json"
# Report fields that legitimately differ between runs: timings, memory, I/O counters, paths.
VOLATILE = ("peak_rss_bytes", "peak_cuda_bytes", "io", "seconds_this_process", "block_loop_seconds_this_process",
            "versions")


def prune_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), str(out), *ARGS, *extra]


def report_core(out: Path) -> dict[str, Any]:
    """The report without what legitimately differs between two runs of one configuration."""
    rep = json.loads((out / REPORT).read_text())
    for k in VOLATILE:
        rep.pop(k, None)
    for k in ("output_dir", "work_dir"):
        rep["config"].pop(k)
    rep.pop("config_fingerprint")  # covers output_dir, which differs between the two directories
    for b in rep["blocks"]:
        b.pop("seconds")
        b.pop("timing")
    return rep


def assert_same_result(out: Path, ref: Path) -> None:
    got, want = checkpoint_files(out), checkpoint_files(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    assert report_core(out) == report_core(ref)
    assert not (out / ".wanda-stream").exists()


def kill_at(model: Path, out: Path, point: str, resume: bool = True,
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    r = run_cli(*prune_args(model, out, *extra, *(["--resume"] if resume else []), "--quiet"),
                env={state_mod.KILL_ENV: point})
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
    return r


def _wait_until_running(proc: subprocess.Popen, work: Path, timeout: float = 300) -> float:
    """Seconds until the run holds its lock (start-up done, the run proper begins), or until it exits."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if WorkDir(work).locked_by() is not None:
            break
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("resume") / "model")


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted run, and how long it ran after start-up (to aim the random kills)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = subprocess.Popen([sys.executable, "-m", "wanda_stream", *prune_args(model, out, "--quiet")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_until_running(proc, out / ".wanda-stream")
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out, time.monotonic() - t0


def test_killed_at_every_point_resumes_to_the_same_bytes(model: Path, reference: tuple[Path, float],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, _ = reference
    out = tmp_path / "out"
    before = tree_hash(model)
    # Each resumed run gets further: mid hidden-state file of block 1; a block shard written but not
    # renamed, held back 2 s so the main thread is already waiting for it (a state saved before the
    # shard is durable would be caught here); right after a block is recorded; after the side files;
    # after the index. Five kills, one run.
    points = ["hidden_write:4", "shard_write:2:KILL:2", "block_done:1", "finalize", "finalize_index"]
    for n, point in enumerate(points):
        kill_at(model, out, point, resume=n > 0)
        assert not (out / REPORT).exists(), f"report of an unfinished run after a kill at {point}"
        if point != "finalize_index":
            assert not (out / INDEX).exists(), f"index of an unfinished run after a kill at {point}"
        assert (out / ".wanda-stream" / "run.json").is_file()
    r = run_cli(*prune_args(model, out, "--resume", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert_same_result(out, ref)
    assert tree_hash(model) == before
    # A requeued job on a finished run does nothing and exits 0, leaving every byte as it was.
    finished = tree_hash(out)
    assert main(prune_args(model, out, "--resume")) == 0
    assert "already complete" in capsys.readouterr().err
    assert tree_hash(out) == finished


def test_signals_at_random_times(model: Path, reference: tuple[Path, float], tmp_path: Path) -> None:
    """SIGKILL, SIGTERM, SIGKILL at random moments of successive resumed runs, then a last resume."""
    ref, seconds = reference
    out = tmp_path / "out"
    rng = random.Random(1234)
    outcomes = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-m", "wanda_stream", *prune_args(model, out, "--resume", "--quiet")],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Aim at the run proper, not interpreter start-up: a random moment between taking the lock
        # (the signal handler is installed by then) and the end, as long as the reference run took.
        _wait_until_running(proc, out / ".wanda-stream")
        time.sleep(rng.uniform(0.0, seconds))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        # A signal that lands after the last block lets the run finish: 0 is always a valid answer.
        assert proc.returncode in (0, -sig if sig == signal.SIGKILL else 75), err
        if proc.returncode == 75:
            assert "Resume with: wanda-stream prune" in err.strip().splitlines()[-1], err
        saved = out / ".wanda-stream" / "state.json"
        outcomes.append((proc.returncode, json.loads(saved.read_text())["next_block"] if saved.is_file() else None))
        if proc.returncode == 0:
            break
        if (out / REPORT).exists():
            # Killed after the report, while tidying up: the report is last, so the output is complete.
            assert (out / INDEX).exists()
            break
    r = run_cli(*prune_args(model, out, "--resume", "--quiet"))
    assert r.returncode == 0, (outcomes, r.stderr)
    assert_same_result(out, ref)


def test_sigterm_stops_cleanly_with_75_and_resumes(model: Path, reference: tuple[Path, float],
                                                   tmp_path: Path) -> None:
    ref, _ = reference
    out = tmp_path / "out"
    # A real SIGTERM, delivered at a known moment: mid-way through block 1's hidden states (five writes a
    # block: the dense outputs' two micro-batches, the pruned calibration states' two, the evaluation's one).
    r = run_cli(*prune_args(model, out, "--log-format", "json"), env={state_mod.KILL_ENV: "hidden_write:7:TERM"})
    assert r.returncode == 75, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Resume with: wanda-stream prune" in last and "--resume" in last, last
    assert "Traceback" not in r.stderr
    assert not (out / INDEX).exists() and not (out / REPORT).exists()
    # Half-written files are gone and the saved state names a block that is complete on disk.
    work = out / ".wanda-stream"
    assert not list(work.glob("*.partial")) and not list(out.glob("*.partial"))
    saved = json.loads((work / "state.json").read_text())
    assert saved["next_block"] == 1 and [b["block"] for b in saved["blocks"]] == [0]
    assert (out / "model-00002-of-00004.safetensors").is_file()
    # The command line the message prints is the one that resumes.
    resume_argv = shlex.split(last.split("Resume with: ", 1)[1])[1:]
    assert resume_argv[:3] == ["prune", str(model), str(out)]
    assert main([*resume_argv, "--quiet"]) == 0  # in-process: the subprocesses are the slow part
    assert_same_result(out, ref)


def test_sigint_in_the_writer_thread(model: Path, reference: tuple[Path, float], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ref, _ = reference
    out = tmp_path / "out"
    # In-process: the signal arrives while a block shard is written on the writer thread.
    monkeypatch.setenv(state_mod.KILL_ENV, "shard_write:2:INT")
    state_mod._kill_counts.clear()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(prune_args(model, out, "--quiet")) == 75
    assert "--resume" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    monkeypatch.delenv(state_mod.KILL_ENV)
    assert main(prune_args(model, out, "--resume", "--quiet")) == 0
    assert_same_result(out, ref)


def test_refusals_and_overwrite(model: Path, reference: tuple[Path, float], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _ = reference
    own = tmp_path / "model"
    shutil.copytree(model, own)
    out = tmp_path / "out"
    monkeypatch.setenv(state_mod.KILL_ENV, "block_done:1:TERM")
    state_mod._kill_counts.clear()
    assert main(prune_args(own, out, "--quiet")) == 75
    monkeypatch.delenv(state_mod.KILL_ENV)
    capsys.readouterr()

    def refused(*extra: str) -> str:
        assert main(prune_args(own, out, "--quiet", *extra)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    err = refused()
    assert "--resume" in err and "--overwrite" in err
    err = refused("--resume", "--sparsity", "0.6")
    assert "sparsity: 0.5 -> 0.6" in err
    err = refused("--resume", "--seed", "3")
    assert "seed: 0 -> 3" in err
    # The input checkpoint changes under the run: the refusal names the file.
    shard = sorted(own.glob("model-*.safetensors"))[4]
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"\0" * 8)
    err = refused("--resume")
    assert f"{shard.name} size {size} -> {size + 8} bytes" in err
    with open(shard, "r+b") as f:
        f.truncate(size)
    config = (own / "config.json").read_text()
    assert '"rms_norm_eps": 1e-05' in config
    (own / "config.json").write_text(config.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
    err = refused("--resume")
    assert "the input checkpoint" in err and "(config.json content changed)" in err
    (own / "config.json").write_text(config)
    # Restored, it resumes; status first says how far it got.
    assert main(["status", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    # The stop came right after block 0 was recorded; block 1, already computed, was saved before exiting.
    assert (st["state"], st["blocks_done"], st["blocks_total"], st["can_resume"]) == ("incomplete", 2, 3, True)
    assert st["resume_with"].endswith("--resume") and str(out) in st["resume_with"]
    # --overwrite discards it and starts over; the result is the same as any other run's.
    assert main(prune_args(own, out, "--quiet", "--overwrite")) == 0
    assert checkpoint_files(out) == checkpoint_files(ref)
    assert main(["status", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["state"], st["blocks_done"], st["can_resume"]) == ("finished", 3, False)
    err = refused()
    assert "already holds this finished run" in err and "--overwrite" in err


def test_killed_while_removing_the_work_dir(model: Path, reference: tuple[Path, float], tmp_path: Path) -> None:
    """A finished output with a half-removed work dir is finished: --resume tidies up, redoes nothing."""
    ref, _ = reference
    out = tmp_path / "out"
    assert main(prune_args(model, out, "--quiet", "--keep-work-dir")) == 0
    work = out / ".wanda-stream"
    (work / "state.json").unlink()  # as if the removal after success got this far
    report = (out / REPORT).read_bytes()
    assert main(prune_args(model, out, "--quiet", "--resume")) == 0
    assert not work.exists()
    assert (out / REPORT).read_bytes() == report  # not rerun: a rerun rewrites the timings
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_a_second_process_on_the_same_run_is_refused(model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued job must not work on a run its predecessor is still finishing."""
    out = tmp_path / "out"
    monkeypatch.setenv(state_mod.KILL_ENV, "block_done:1:TERM")
    state_mod._kill_counts.clear()
    assert main(prune_args(model, out, "--quiet")) == 75
    monkeypatch.delenv(state_mod.KILL_ENV)
    work = out / ".wanda-stream"
    # Another process holds the run. flock conflicts between open file descriptions, so this test's
    # own open of the lock file stands in for the other process.
    with open(work / "lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        capsys.readouterr()
        before = tree_hash(out)
        for extra in (["--resume"], ["--overwrite"]):
            assert main(prune_args(model, out, "--quiet", *extra)) == 2
            err = capsys.readouterr().err
            assert "another wanda-stream process (pid 4242) is working on this run" in err, err
        assert tree_hash(out) == before
        assert main(["status", str(out), "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert (st["state"], st["running_pid"], st["can_resume"]) == ("running", "4242", False)
    # Closing releases the lock (as the holder's exit would, SIGKILL included): the run resumes.
    assert main(prune_args(model, out, "--quiet", "--resume")) == 0


def test_stopped_while_tokenizing(model: Path, reference: tuple[Path, float], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the text is tokenized (many seconds for C4): exit 75 at once, nothing but run.json written."""
    ref, _ = reference
    out = tmp_path / "out"
    work = out / ".wanda-stream"
    # pydoc is one document: the first tokenize is the calibration text, the second the evaluation text.
    for n, stream in enumerate(("calibration", "evaluation"), start=1):
        monkeypatch.setenv(state_mod.KILL_ENV, f"tokenize:{n}:TERM")
        state_mod._kill_counts.clear()
        assert main(prune_args(model, out, "--quiet", *(["--resume"] if n > 1 else []))) == 75
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"stopped while tokenizing the {stream} data" in last and last.endswith("--resume"), last
        assert state_mod._kill_counts["tokenize"] == n  # nothing tokenized after the stop
        assert sorted(p.name for p in out.iterdir()) == [".wanda-stream"]
        assert sorted(p.name for p in work.iterdir()) == ["lock", "run.json"]  # no tokens.safetensors
    monkeypatch.delenv(state_mod.KILL_ENV)
    assert main(prune_args(model, out, "--quiet", "--resume")) == 0
    assert_same_result(out, ref)


def test_resume_of_a_finished_run_whose_input_is_gone(model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Batch users requeue finished jobs after deleting the inputs: the report identifies the finished run."""
    own = Path(shutil.copytree(model, tmp_path / "model"))
    out = tmp_path / "out"
    assert main(prune_args(own, out, "--quiet", "--keep-work-dir")) == 0
    shutil.rmtree(own)
    finished = tree_hash(out)
    capsys.readouterr()
    assert main(prune_args(own, out, "--resume", "--keep-work-dir")) == 0
    assert "already complete; nothing to do" in capsys.readouterr().err
    assert tree_hash(out) == finished
    # The original command may have left device and batch size automatic: the report settles them.
    # Without --keep-work-dir the kept work dir goes, as it would with the input present.
    automatic = ["prune", str(own), str(out), "--calib", "pydoc", "--nsamples", "4", "--seqlen", "32",
                 "--eval-data", "pydoc", "--eval-windows", "2", "--resume", "--quiet"]
    assert main(automatic) == 0
    assert tree_hash(out) == {k: v for k, v in finished.items() if not k.startswith(".wanda-stream/")}
    assert not (out / ".wanda-stream").exists()
    finished = tree_hash(out)
    for extra, diff in ((["--sparsity", "0.6"], "sparsity: 0.5 -> 0.6"), (["--seed", "3"], "seed: 0 -> 3"),
                        (["--eval-windows", "3"], "eval_windows: 2 -> 3")):
        assert main(prune_args(own, out, "--quiet", "--resume", *extra)) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"{own}: model directory not found" in lines[0] and diff in lines[0], lines[0]
    # No finished run to recognise: the input is needed, and the refusal says it is missing.
    assert main(prune_args(own, tmp_path / "elsewhere", "--quiet", "--resume")) == 2
    assert f"{own}: model directory not found" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
    assert tree_hash(out) == finished
