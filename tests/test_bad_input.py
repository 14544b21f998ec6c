"""Bad input: one line on stderr, exit 2, no traceback, the input checkpoint untouched, nothing lost.

Every case hashes the model directory before and after. Most run in-process (the CLI's `main`);
a full disk is simulated in a subprocess, by a file-size limit and, where mounting is allowed,
by filling a small tmpfs while the run is paused.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import ROOT, checkpoint_files, tree_hash
from wanda_stream.cli import main
from wanda_stream.storage.state import KILL_ENV

ARGS = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet"]
INDEX = "model.safetensors.index.json"


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one error line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanda-stream: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def model(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def _shards(model: Path) -> list[Path]:
    return sorted(model.glob("model-*.safetensors"))


def _truncate(model: Path) -> str:
    shard = _shards(model)[3]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return f"{shard.name}: truncated"


def _corrupt_header(model: Path) -> str:
    shard = _shards(model)[2]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    return f"{shard.name}: corrupt safetensors header"


def _huge_header_length(model: Path) -> str:
    shard = _shards(model)[1]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    shard.write_bytes(bytes(data))
    return f"{shard.name}: corrupt safetensors header"


def _missing_shard(model: Path) -> str:
    shard = _shards(model)[5]
    shard.unlink()
    return f"names shard '{shard.name}', which is missing"


def _index_entry(model: Path, name: str) -> None:
    index = json.loads((model / INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = name
    (model / INDEX).write_text(json.dumps(index))


def _escaping_path(model: Path) -> str:
    # The escaping target exists, so only the containment check can refuse it.
    shutil.copy(_shards(model)[0], model.parent / "x.safetensors")
    _index_entry(model, "../x.safetensors")
    return "shard path '../x.safetensors' is not a plain file name inside the model directory"


def _absolute_path(model: Path) -> str:
    target = model.parent / "abs.safetensors"
    shutil.copy(_shards(model)[0], target)
    _index_entry(model, str(target))
    return f"shard path '{target}' is not a plain file name"


def _shape_mismatch(model: Path) -> str:
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(cfg))
    return "has shape [128, 64], but config.json implies [96, 64]"


def _no_config(model: Path) -> str:
    (model / "config.json").unlink()
    return "no config.json"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "truncated shard": _truncate, "corrupt header": _corrupt_header, "header length": _huge_header_length,
    "missing shard": _missing_shard, "index escapes with ..": _escaping_path, "index absolute path": _absolute_path,
    "shapes disagree with config": _shape_mismatch, "no config.json": _no_config,
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint(case: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = DAMAGE[case](model)
    before = tree_hash(model)
    out = tmp_path / "out"
    err = refused(capsys, ["prune", str(model), str(out), *ARGS])
    assert expected in err
    assert tree_hash(model) == before
    assert not out.exists()  # refused before anything was created


def test_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, ["prune", str(tmp_path / "nope"), str(tmp_path / "out"), *ARGS])
    assert "model directory not found" in err


def test_pickle_weights_are_refused_and_never_unpickled(tiny_model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_model / "config.json", model / "config.json")
    canary = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (canary,))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    before = tree_hash(model)
    for cmd in (["prune", str(model), str(tmp_path / "out"), *ARGS], ["inspect", str(model)], ["eval", str(model)]):
        err = refused(capsys, cmd)
        assert "only pickle weights" in err and "never unpickles" in err
    assert not canary.exists()
    assert tree_hash(model) == before


@pytest.mark.parametrize("flags,expected", [
    (["--sparsity", "0"], "--sparsity 0.0: must be strictly between 0 and 1"),
    (["--sparsity", "1"], "--sparsity 1.0: must be strictly between 0 and 1"),
    (["--sparsity", "1.5"], "--sparsity 1.5"),
    (["--sparsity", "-0.2"], "--sparsity -0.2"),
    (["--pattern", "4:2"], "--pattern '4:2'"),
    (["--pattern", "2:2"], "--pattern '2:2'"),
    (["--pattern", "0:4"], "--pattern '0:4'"),
    (["--pattern", "2-4"], "--pattern '2-4'"),
    (["--pattern", "a:b"], "--pattern 'a:b'"),
    (["--nsamples", "0"], "--nsamples 0: must be a positive integer"),
    (["--nsamples", "-3"], "--nsamples -3: must be a positive integer"),
    (["--seqlen", "0"], "--seqlen 0: must be a positive integer"),
    (["--seqlen", "257"], "--seqlen 257: beyond the model's context of 256 tokens"),
    (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--max-activation-memory", "lots"], "--max-activation-memory 'lots'"),
])
def test_bad_arguments(flags: list[str], expected: str, tiny_model: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hash(tiny_model)
    out = tmp_path / "out"
    # Later flags win in argparse, so each case overrides the defaults in ARGS.
    err = refused(capsys, ["prune", str(tiny_model), str(out), *ARGS, *flags])
    assert expected in err
    assert not out.exists()
    assert tree_hash(tiny_model) == before


@pytest.mark.parametrize("content,expected", [
    (None, "no .txt/.jsonl/.json/.parquet files"),
    ("", "is too short: no document has more than 32 tokens (longest: 0)"),
    ("Too short to calibrate on.", "is too short: no document has more than 32 tokens"),
])
def test_bad_calibration_data(content: str | None, expected: str, tiny_model: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "calib"
    data.mkdir()
    if content is not None:
        data = data / "calib.txt"
        data.write_text(content)
    out = tmp_path / "out"
    before = tree_hash(tiny_model)
    err = refused(capsys, ["prune", str(tiny_model), str(out), *ARGS, "--calib", str(data)])
    assert expected in err
    # Nothing was started, so the corrected command needs neither --resume nor --overwrite.
    assert not out.exists()
    assert tree_hash(tiny_model) == before


def test_output_inside_or_equal_to_model(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hash(model)
    for out in (model, model / "pruned", model / "a" / "b"):
        err = refused(capsys, ["prune", str(model), str(out), *ARGS])
        assert "must not be the model directory or inside it" in err
    err = refused(capsys, ["prune", str(model), str(model.parent), *ARGS])
    assert "must not contain the model directory" in err
    assert tree_hash(model) == before


def test_output_not_writable(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hash(tiny_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = refused(capsys, ["prune", str(tiny_model), str(blocker / "out"), *ARGS])
    assert f"{blocker / 'out'}: output directory is not writable" in err
    ro = tmp_path / "ro"
    if os.geteuid() != 0:  # root ignores permission bits
        ro.mkdir(mode=0o500)
        err = refused(capsys, ["prune", str(tiny_model), str(ro / "out"), *ARGS])
        assert "not writable" in err
    elif _mount_tmpfs(ro, "1m", "ro"):  # as root, a read-only file system is what refuses
        try:
            err = refused(capsys, ["prune", str(tiny_model), str(ro / "out"), *ARGS])
            assert f"{ro / 'out'}: output directory is not writable (Read-only file system)" in err
        finally:
            subprocess.run(["umount", str(ro)], capture_output=True, timeout=30)
    assert tree_hash(tiny_model) == before


@pytest.mark.parametrize("where,expected", [
    ("model", "must not be, contain or be inside the model directory"),
    ("model/work", "must not be, contain or be inside the model directory"),
    ("sub/out", "must not be or contain the output directory"),
    ("sub", "must not be or contain the output directory"),
])
def test_work_dir_overlapping_input_or_output(where: str, expected: str, model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The work dir is deleted after success: one that held the output or the input would lose it."""
    before = tree_hash(model)
    out = tmp_path / "sub" / "out"
    for extra in ([], ["--overwrite"]):
        err = refused(capsys, ["prune", str(model), str(out), *ARGS, "--work-dir", str(tmp_path / where), *extra])
        assert expected in err
    assert tree_hash(model) == before
    assert not out.exists()


def test_work_dir_holding_other_files_is_never_deleted(tiny_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "scratch"
    work.mkdir()
    (work / "precious.txt").write_text("someone's data")
    out = tmp_path / "out"
    before = tree_hash(tiny_model)
    for extra in ([], ["--resume"], ["--overwrite"]):
        err = refused(capsys, ["prune", str(tiny_model), str(out), *ARGS, "--work-dir", str(work), *extra])
        assert f"--work-dir {work}: holds files no run wrote (precious.txt)" in err
    assert (work / "precious.txt").read_text() == "someone's data"
    assert tree_hash(tiny_model) == before
    # A work dir of its own is used, and removed after success.
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--work-dir", str(work / "run")]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"]


def test_existing_unrelated_output_is_not_touched(tiny_model: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_hash(tiny_model)
    err = refused(capsys, ["prune", str(tiny_model), str(out), *ARGS])
    assert "exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert tree_hash(tiny_model) == before


# ---- a full disk --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["prune", str(tiny_model), str(out), *ARGS]) == 0
    return out


def test_file_size_limit_mid_write_then_resume(tiny_model: Path, reference: Path, tmp_path: Path) -> None:
    """EFBIG from RLIMIT_FSIZE fails a shard write part-way, as a full disk would; resuming finishes it."""
    out = tmp_path / "out"
    before = tree_hash(tiny_model)

    def limit() -> None:
        # 100 KB: the hidden states and state files fit, the first 150 KB shard does not.
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, "-m", "wanda_stream", "prune", str(tiny_model), str(out), *ARGS],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=600)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "--resume" in lines[0], r.stderr
    assert list(out.glob("*.partial")), "the limit should have stopped a shard part-way"
    assert not (out / INDEX).exists()
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--resume"]) == 0
    assert checkpoint_files(out) == checkpoint_files(reference)
    assert tree_hash(tiny_model) == before


def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    """Mount a tmpfs of `size` at `path` (made here); False where mounting is not allowed."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _wait_stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the run never reached its pause point")


def _fill_while_stopped(proc: subprocess.Popen, filler: Path, check: Callable[[], None] = lambda: None) -> None:
    """Once `proc` has stopped itself (a STOP killpoint): `check`, then take every free byte of the disk with
    `filler`, then let it go on."""
    try:
        _wait_stopped(proc.pid)
        check()
        # Unbuffered: a buffered file would retry its failed flush when it closes, and raise there.
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_disk_full_on_tmpfs_then_resume(tiny_model: Path, reference: Path, tmp_path: Path) -> None:
    """A real ENOSPC: the run pauses after block 0, the disk is filled, the run continues and fails cleanly."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size-limit test covers the write failure")
    try:
        out = disk / "out"
        before = tree_hash(tiny_model)
        proc = subprocess.Popen([sys.executable, "-m", "wanda_stream", "prune", str(tiny_model), str(out), *ARGS],
                                cwd=ROOT, env={**os.environ, KILL_ENV: "block_done:1:STOP"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _fill_while_stopped(proc, disk / "filler")
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
        assert not (out / INDEX).exists()
        (disk / "filler").unlink()
        assert main(["prune", str(tiny_model), str(out), *ARGS, "--resume"]) == 0
        assert checkpoint_files(out) == checkpoint_files(reference)
        assert tree_hash(tiny_model) == before
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)
