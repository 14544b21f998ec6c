"""The prepared GPU check, run here as its --dry-run (the same steps on the CPU with a tiny model),
and its 2:4 benchmark's refusal without CUDA: the first GPU minutes must not go to a broken script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_2of4  # noqa: E402


def _bench(tmp_path: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "BENCH_DIR": str(tmp_path / "bench")}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_bench.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=900)


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("step", "---"):
            rows[cells[0]] = cells
    return rows


def test_dry_run_runs_every_step(tmp_path: Path) -> None:
    r = _bench(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _rows(r.stdout)
    steps = ["cuda-tests", "features", "generate", "wanda-7b", "eval", "sparsegpt", "wanda-owl", "wanda", "resume", "torchrun",
             "2:4", "masks"]
    assert list(rows) == steps, r.stdout
    assert all(rows[s][1] == "ok" for s in steps if s != "2:4"), r.stdout
    assert "skipped" in rows["features"][3]  # the GPU-against-CPU cases need a card
    assert rows["2:4"][1] == "needs CUDA" and "needs a CUDA device" in rows["2:4"][-1]
    assert rows["resume"][3] == "identical bytes" and rows["torchrun"][3] == "identical to 1 process"
    assert rows["masks"][3].count("1.00000") == 4  # CPU against CPU: every mask entry agrees
    assert rows["wanda-7b"][3].startswith("ppl ") and float(rows["wanda-7b"][5]) > 0  # compute s per block
    ppl = rows["eval"][3].split()[1]
    assert rows["eval"][-1] == f"in the prune pass: {ppl}"  # the streamed eval agrees with the in-pass one
    work = tmp_path / "bench"
    assert (work / "gpu_bench.md").read_text().strip() == r.stdout.strip()
    assert not list(work.glob("model-*")) and not list(work.glob("out-*"))  # checkpoints and outputs removed


def test_without_cuda_the_real_run_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = _bench(tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().endswith("sees no CUDA device; use --dry-run to check the script on the CPU"), r.stderr


def test_a_python_without_torch_is_named(tmp_path: Path) -> None:
    bare = Path("/usr/bin/python3")
    if not bare.exists() or subprocess.run([str(bare), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without torch here")
    r = _bench(tmp_path, "--dry-run", python=str(bare))
    assert r.returncode == 2 and "lacks torch" in r.stderr and "no local wheel cache" in r.stderr, r.stderr


def test_bench_2of4_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_2of4.py")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip() == bench_2of4.NEEDS_CUDA


def test_bench_2of4_prunes_the_7b_linears_2of4() -> None:
    from wanda_stream.methods.kernel import satisfies_nm
    from wanda_stream.storage.synthetic import load_spec

    shapes = bench_2of4.linear_shapes(load_spec("llama-2-7b"))
    assert shapes == {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                      "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pruned = bench_2of4.prune_2of4(w)
    assert satisfies_nm(pruned, (2, 4)) and int((pruned == 0).sum()) == w.numel() // 2
    kept = pruned != 0
    assert torch.equal(pruned[kept], w[kept])
    groups = w.float().abs().reshape(64, 32, 4)
    assert torch.equal((pruned == 0).reshape(64, 32, 4).sum(2), torch.full((64, 32), 2))
    assert bool(((groups * kept.reshape(64, 32, 4)).amax(2) == groups.amax(2)).all())  # the largest of each 4 kept
