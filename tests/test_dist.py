"""Data-parallel calibration on torch.distributed: 2 CPU ranks (gloo) started by the tests with the
environment torchrun sets, against the single-process run of the same command line.

Byte-identical for wanda (unstructured and 2:4), ria, magnitude and a MoE family; SparseGPT within
float rounding of its Gram matrices (same masks but for near-ties). A rank killed mid-run makes the
other exit 75 within seconds (gloo sees the closed connection at the next collective); both resume
under 2 ranks to the same bytes; SIGTERM to both stops both with 75; a resume on another number of
ranks is refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, load_state_dict, run_cli
from tests.test_families import family_model  # noqa: F401 - the fixture
from tests.test_resume import checkpoint_files
from wanda_stream.cli import main

ARGS = ["--calib", "pydoc", "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--batch-size", "2", "--quiet"]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], ranks: int = 2, env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """`python -m wanda_stream ARGS` on `ranks` processes, with the environment torchrun gives its workers."""
    port = free_port()
    procs = []
    for r in range(ranks):
        e = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
             "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", **(env or {}).get(r, {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "wanda_stream", *args], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def prune_on_two(model: Path, out: Path, *extra: str) -> None:
    results = finish(launch(["prune", str(model), str(out), *ARGS, *extra]))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]


@pytest.mark.parametrize("extra", [("--method", "wanda"), ("--method", "wanda", "--pattern", "2:4"),
                                   ("--method", "ria", "--sparsity-profile", "owl", "--sparsity", "0.6"),
                                   ("--method", "magnitude")], ids=["wanda", "wanda-2:4", "ria-owl", "magnitude"])
def test_two_ranks_write_the_single_process_bytes(tiny_model: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(tiny_model), str(single), *ARGS, *extra]) == 0
    prune_on_two(tiny_model, two, *extra)
    assert checkpoint_files(two) == checkpoint_files(single)
    rep = json.loads((two / "wanda_stream.json").read_text())
    assert rep["config"]["world_size"] == 2 and not (two / ".wanda-stream").exists()


def test_two_ranks_moe_equal_single_process(family_model, tmp_path: Path) -> None:  # noqa: F811
    model = family_model("qwen2_moe")
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(model), str(single), *ARGS]) == 0
    prune_on_two(model, two)
    assert checkpoint_files(two) == checkpoint_files(single)
    tokens = [json.loads((d / "wanda_stream.json").read_text())["blocks"] for d in (single, two)]
    # The block's output error: float64 sums per rank, then over ranks, against one running sum: rounding.
    errors = [[b.pop("output_error") for b in blocks] for blocks in tokens]
    assert errors[1] == pytest.approx(errors[0], rel=1e-9)
    assert tokens[0] == [{**b, "seconds": tokens[0][k]["seconds"], "timing": tokens[0][k]["timing"]}
                         for k, b in enumerate(tokens[1])]  # expert token counts summed over the ranks


def test_two_ranks_sparsegpt_within_rounding(tiny_model: Path, tmp_path: Path) -> None:
    """Gram matrices summed over ranks in float64 differ from one process's float32 running sum by rounding:
    the masks agree but for near-ties (here: everywhere) and the weights to float32 noise."""
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(tiny_model), str(single), *ARGS, "--method", "sparsegpt"]) == 0
    prune_on_two(tiny_model, two, "--method", "sparsegpt")
    a, b = load_state_dict(single), load_state_dict(two)
    for key in a:
        if key.endswith("proj.weight"):
            assert (a[key] == 0).eq(b[key] == 0).float().mean() >= 0.999, key
            assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-4), key
        else:
            assert torch.equal(a[key], b[key]), key


def test_a_killed_rank_stops_the_other_and_both_resume(tiny_model: Path, tmp_path: Path) -> None:
    single, out = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(tiny_model), str(single), *ARGS]) == 0
    t0 = time.monotonic()
    procs = launch(["prune", str(tiny_model), str(out), *ARGS], env={1: {"WANDA_STREAM_KILL_AT": "hidden_write:3"}})
    (rc0, err0), (rc1, _) = finish(procs)
    assert rc1 == -9 and rc0 == 75, err0[-2000:]
    assert "another rank stopped answering" in err0 and time.monotonic() - t0 < 120
    status = json.loads(run_cli("status", str(out), "--json").stdout)
    assert status["world_size"] == 2 and status["can_resume"]
    prune_on_two(tiny_model, out, "--resume")
    assert_same_result_bytes(out, single)


def test_slow_setup_on_rank_0_is_not_a_lost_peer(tiny_model: Path, tmp_path: Path) -> None:
    """Rank 0 alone makes the windows (C4 or lm-eval requests: hours for big suites) while the other
    waits: under the setup group's long timeout, not --dist-timeout, so the run goes on."""
    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(tiny_model), str(single), *ARGS]) == 0
    slow = {"WANDA_STREAM_KILL_AT": "tokens:1:CONT:15"}  # sleeps 15 s, then a harmless SIGCONT
    results = finish(launch(["prune", str(tiny_model), str(two), *ARGS, "--dist-timeout", "8"], env={0: slow}))
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    got, want = checkpoint_files(two), checkpoint_files(single)
    del got["README.md"], want["README.md"]  # the model card records the command, --dist-timeout included
    assert got == want


def test_sigterm_to_both_ranks_exits_75_and_resumes(tiny_model: Path, tmp_path: Path) -> None:
    single, out = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(tiny_model), str(single), *ARGS]) == 0
    term = {"WANDA_STREAM_KILL_AT": "hidden_write:3:TERM"}
    results = finish(launch(["prune", str(tiny_model), str(out), *ARGS], env={0: term, 1: term}))
    assert [rc for rc, _ in results] == [75, 75], [e[-2000:] for _, e in results]
    assert "--resume" in results[0][1]
    r = run_cli("prune", str(tiny_model), str(out), *ARGS, "--resume")
    assert r.returncode == 2 and "started on 2 rank(s) and is resumed on 1" in r.stderr
    prune_on_two(tiny_model, out, "--resume")
    assert_same_result_bytes(out, single)


def assert_same_result_bytes(out: Path, ref: Path) -> None:
    assert checkpoint_files(out) == checkpoint_files(ref)
    assert not (out / ".wanda-stream").exists()


UNBATCHED = [a for k, a in enumerate(ARGS) if "--batch-size" not in ARGS[max(k - 1, 0) : k + 1]]


@pytest.mark.parametrize("extra", [("--method", "wanda"), ("--method", "wanda", "--sparsity-profile", "owl"),
                                   ("--method", "ria", "--pattern", "2:4")], ids=["wanda", "wanda-owl", "ria-2:4"])
def test_bytes_do_not_depend_on_the_batch_size_or_the_ranks(tiny_model: Path, tmp_path: Path,
                                                             extra: tuple[str, ...]) -> None:
    """Per-column sums are reduced per window in window order: one process with micro-batches of 1, 3 or 8
    windows and 2 ranks with the automatic micro-batch (which gives both ranks work) write the same bytes."""
    outs = []
    for batch in ("1", "3", "8"):
        outs.append(tmp_path / f"b{batch}")
        assert main(["prune", str(tiny_model), str(outs[-1]), *UNBATCHED, "--batch-size", batch, *extra]) == 0
    results = finish(launch(["prune", str(tiny_model), str(tmp_path / "two"), *UNBATCHED, *extra]))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    outs.append(tmp_path / "two")
    files = [{k: v for k, v in checkpoint_files(d).items() if k != "README.md"} for d in outs]  # the card: its command
    assert all(f == files[0] for f in files[1:])
    assert json.loads((tmp_path / "two" / "wanda_stream.json").read_text())["config"]["batch_size"] == 4


def test_ranks_with_the_automatic_micro_batch_are_never_refused(tiny_model: Path, tmp_path: Path) -> None:
    """Without --batch-size, 3 ranks and 4 windows get micro-batches of 1; fewer windows than ranks is about
    --nsamples, and says so."""
    args = [a if a != "8" else "4" for a in UNBATCHED]
    results = finish(launch(["prune", str(tiny_model), str(tmp_path / "three"), *args], ranks=3))
    assert [rc for rc, _ in results] == [0, 0, 0], [err[-3000:] for _, err in results]
    few = [a if a != "8" else "2" for a in UNBATCHED]
    results = finish(launch(["prune", str(tiny_model), str(tmp_path / "few"), *few], ranks=3))
    assert results[0][0] == 2 and "--nsamples 2: fewer calibration windows than the 3 ranks" in results[0][1]


def test_work_is_assigned_costliest_first_to_the_least_loaded_rank() -> None:
    from wanda_stream.run.dist import assign_by_cost

    # A 7B block under SparseGPT (rows x cols^2, in units of 4096^3): down_proj alone is a third of the work.
    costs = {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0, "gate": 2.6875, "up": 2.6875, "down": 7.22}
    got = assign_by_cost(costs, 2)
    # down 0; gate, up, k, o 1 (loads 7.22 and 7.375); q 0 (8.22); v 1 (8.375)
    assert got == {"down": 0, "gate": 1, "up": 1, "k": 1, "o": 1, "q": 0, "v": 1}
    assert assign_by_cost(costs, 1) == dict.fromkeys(costs, 0)
    assert sorted(set(assign_by_cost({"a": 1.0, "b": 1.0, "c": 1.0}, 8).values())) == [0, 1, 2]


@pytest.mark.parametrize("windows", ["5", "2"], ids=["a-share-each", "fewer-than-ranks"])
def test_ranks_split_the_evaluation_windows(tiny_model: Path, tmp_path: Path, windows: str) -> None:
    """The perplexity windows are split over the ranks in whole micro-batches (a rank may get none) and their
    per-micro-batch sums added in window order: 3 ranks report one process's perplexity, bit for bit."""
    extra = ["--eval-data", "pydoc", "--eval-windows", windows, "--eval-seqlen", "32"]
    single = tmp_path / "single"
    assert main(["prune", str(tiny_model), str(single), *ARGS, *extra]) == 0
    results = finish(launch(["prune", str(tiny_model), str(tmp_path / "three"), *ARGS, *extra], ranks=3))
    assert [rc for rc, _ in results] == [0, 0, 0], [err[-3000:] for _, err in results]
    a, b = (json.loads((d / "wanda_stream.json").read_text())["eval"] for d in (single, tmp_path / "three"))
    assert a == b and a["windows"] == int(windows)
    assert checkpoint_files(tmp_path / "three") == checkpoint_files(single)


def test_a_sweep_on_two_ranks_writes_each_single_process_output(tiny_model: Path, tmp_path: Path) -> None:
    """The runs of a sweep step in the same order on every rank, so their collectives pair up; OWL's dense
    pass goes first, alone."""
    plan = {"w50": "--method wanda --sparsity 0.5", "owl": "--method ria --sparsity 0.6 --sparsity-profile owl",
            "m24": "--method magnitude --pattern 2:4"}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    prune_on_two(tiny_model, tmp_path / "sweep", "--sweep", str(tmp_path / "plan.json"))
    for name, flags in plan.items():
        single = tmp_path / name
        assert main(["prune", str(tiny_model), str(single), *ARGS, *flags.split()]) == 0
        assert_same_result_bytes(tmp_path / "sweep" / name, single)
