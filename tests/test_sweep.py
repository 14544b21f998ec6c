"""`prune --sweep`: several configurations in one pass, each output byte-identical to its single run,
every block read once for all of them, resumable after a kill or a stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.helpers import run_cli, write_tiny_model
from tests.test_resume import ARGS, assert_same_result
from wanda_stream import commands
from wanda_stream.cli import main
from wanda_stream.model.stream import Streamer
from wanda_stream.run.prune import PruneRun
from wanda_stream.run.sweep import Entry, entry_argv, parse_sweep
from wanda_stream.storage import state as state_mod

BLOCKS = 3
SWEEP = "wanda:0.5,sparsegpt:2:4,mag60=magnitude:0.6"
SINGLE = {"wanda-0.5": ["--method", "wanda", "--sparsity", "0.5"],
          "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4"],
          "mag60": ["--method", "magnitude", "--sparsity", "0.6"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("sweep") / "model")


@pytest.fixture(scope="module")
def singles(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each configuration as its own run, into ROOT/NAME."""
    root = tmp_path_factory.mktemp("singles")
    for name, flags in SINGLE.items():
        assert main(["prune", str(model), str(root / name), *ARGS, *flags, "--quiet"]) == 0
    return root


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The blocks read from the checkpoint in this process, in order."""
    reads: list[int] = []
    read = Streamer._read_block

    def counted(self: Streamer, i: int):  # type: ignore[no-untyped-def]
        reads.append(i)
        return read(self, i)

    monkeypatch.setattr(Streamer, "_read_block", counted)
    return reads


def test_parse_sweep_items_and_names() -> None:
    got = parse_sweep("wanda:0.5, sparsegpt:2:4,x=ria:0.7")
    assert got == [Entry("wanda-0.5", ("--method", "wanda", "--sparsity", "0.5")),
                   Entry("sparsegpt-2of4", ("--method", "sparsegpt", "--pattern", "2:4")),
                   Entry("x", ("--method", "ria", "--sparsity", "0.7"))]
    argv = ["prune", "M", "OUT/", "--sweep", "wanda:0.5", "--nsamples", "4", "--sparsity=0.6", "--pattern", "4:8"]
    assert entry_argv(argv, Path("OUT"), got[0]) == [
        "prune", "M", "OUT/wanda-0.5", "--nsamples", "4", "--method", "wanda", "--sparsity", "0.5"]
    plain = Entry("r", ("--method", "ria"))
    assert entry_argv(argv, Path("OUT"), plain)[-4:] == ["--pattern", "4:8", "--method", "ria"]


def test_sweep_equals_single_runs_and_reads_each_block_once(model: Path, singles: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    reads = count_reads(monkeypatch)
    out = tmp_path / "sweep"
    assert main(["prune", str(model), str(out), *ARGS, "--sweep", SWEEP, "--quiet"]) == 0
    assert reads == list(range(BLOCKS))  # one pass, shared by the three runs (separately: 9 reads)
    for name in SINGLE:
        assert_same_result(out / name, singles / name)
    table = json.loads((out / "wanda_stream_sweep.json").read_text())
    assert [r["name"] for r in table["configurations"]] == list(SINGLE)
    assert table["blocks_read_this_process"] == BLOCKS
    assert all(r["perplexity"] > 1 for r in table["configurations"])
    # The card's command is the single run's: the sweep's flags, the entry's last.
    card = (out / "mag60" / "README.md").read_text()
    assert "--method magnitude --sparsity 0.6" in card and "--sweep" not in card


def test_the_preflight_plans_for_the_runs_the_sweep_runs_side_by_side(model: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed sweep one of whose configurations is finished runs the other two side by side: the preflight
    checks each for those 2 runs sharing the memory, the count each run's memory plan is made for."""
    out = tmp_path / "sweep"
    assert main(["prune", str(model), str(out), *ARGS, "--sweep", "mag60=magnitude:0.6", "--quiet"]) == 0
    checked: list[int] = []
    planned: list[int] = []
    check, plan = commands.check_resources, PruneRun.plan_memory
    monkeypatch.setattr(commands, "check_resources", lambda *a, **k: (checked.append(k["runs"]), check(*a, **k))[1])
    monkeypatch.setattr(PruneRun, "plan_memory", lambda run, s: (planned.append(run.sweep_runs), plan(run, s))[1])
    assert main(["prune", str(model), str(out), *ARGS, "--sweep", SWEEP, "--resume", "--quiet"]) == 0
    assert checked == [2, 2] and planned == [2, 2]


def test_plan_file_with_owl_reads_the_dense_pass_once_more(model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("owl70: --method wanda --sparsity 0.7 --sparsity-profile owl\n"
                    "wanda70: [--method, wanda, --sparsity, '0.7']\n")
    single = tmp_path / "single-owl"
    assert main(["prune", str(model), str(single), *ARGS, "--method", "wanda", "--sparsity", "0.7",
                 "--sparsity-profile", "owl", "--quiet"]) == 0
    reads = count_reads(monkeypatch)
    out = tmp_path / "sweep"
    assert main(["prune", str(model), str(out), *ARGS, "--sweep", str(plan), "--quiet"]) == 0
    # OWL's pass over the dense model, alone; then one pruning pass for both.
    assert reads == [*range(BLOCKS), *range(BLOCKS)]
    assert_same_result(out / "owl70", single)


@pytest.mark.parametrize("point", ["block_done:4", "shard_write:2"])
def test_killed_sweep_resumes_to_the_same_bytes(model: Path, singles: Path, tmp_path: Path, point: str) -> None:
    out = tmp_path / "sweep"
    cmd = ["prune", str(model), str(out), *ARGS, "--sweep", SWEEP, "--quiet"]
    r = run_cli(*cmd, env={state_mod.KILL_ENV: point})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = run_cli(*cmd, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in SINGLE:
        assert_same_result(out / name, singles / name)


def test_stopped_sweep_says_how_to_resume(model: Path, singles: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = ["prune", str(model), str(out), *ARGS, "--sweep", SWEEP]
    r = run_cli(*cmd, "--quiet", env={state_mod.KILL_ENV: "block_done:2:TERM"})
    assert r.returncode == 75, r.stderr[-2000:]
    assert "--sweep" in r.stderr and "--resume" in r.stderr
    # Every run recorded what it finished: at most one block per run is redone.
    done = [json.loads((out / n / ".wanda-stream" / "state.json").read_text())["next_block"] for n in SINGLE]
    assert min(done) >= 1, done
    r = run_cli(*cmd, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mag60" in r.stdout  # the table
    for name in SINGLE:
        assert_same_result(out / name, singles / name)
    r = run_cli(*cmd, "--resume")
    assert r.returncode == 0 and r.stderr.count("already complete") == len(SINGLE), r.stderr


@pytest.mark.parametrize("sweep, extra, message", [
    ("wanda", (), "write METHOD:SPARSITY or METHOD:N:M"),
    ("wanda:0.5,wanda:0.5", (), "given twice"),
    ("a/b=wanda:0.5", (), "not a usable name"),
    ("PLAN", (), "is the sweep's to set"),
    ("wanda:0.5", ("--work-dir", "W"), "--work-dir: not with --sweep"),
    ("wanda:1.5", (), "--sparsity"),
])
def test_bad_sweeps_are_refused_with_one_line(model: Path, tmp_path: Path, sweep: str, extra: tuple[str, ...],
                                              message: str) -> None:
    if sweep == "PLAN":
        sweep = str(tmp_path / "plan.json")
        Path(sweep).write_text(json.dumps({"a": "--method wanda --device cpu"}))
    out = tmp_path / "sweep"
    r = run_cli("prune", str(model), str(out), *ARGS, "--sweep", sweep, *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(out.rglob("*.safetensors"))


def test_json_progress_names_each_configuration(model: Path, tmp_path: Path) -> None:
    r = run_cli("prune", str(model), str(tmp_path / "sweep"), *ARGS, "--sweep", "a=wanda:0.5,b=magnitude:0.5",
                "--log-format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in (r.stdout + r.stderr).splitlines() if line.startswith("{")]
    blocks = [e for e in events if e["event"] == "block"]
    assert [e["run"] for e in blocks] == ["a", "b"] * BLOCKS  # in lockstep
    assert sorted(e["run"] for e in events if e["event"] == "done") == ["a", "b"]
