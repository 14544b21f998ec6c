"""Every method and structural step on the GPU against the same run on the CPU: what has only ever run on CPUs.

Each case prunes a tiny checkpoint twice, with `--device cuda` and `--device cpu` (float32 compute, the same
calibration and evaluation windows), and requires the same structure (blocks, channels, heads and experts
chosen), the same keys, shapes and config, masks that agree, weights and perplexity within rounding. GPU
kernels sum in another order than the CPU's, so a near-tie may flip a mask entry: masks are compared by
agreement, not for equality. A killed and resumed streamed-experts run on the GPU must give the bytes of the
uninterrupted GPU run.

Skipped where torch sees no CUDA device (CI); `tools/gpu_bench.sh` runs it on a GPU machine.
WANDA_STREAM_TEST_DEVICE=cpu runs the same comparisons CPU against CPU, so that the checks themselves are
checked without a GPU (they must then hold exactly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.helpers import checkpoint_files, load_state_dict, run_cli, tiny_llama_config, write_tiny_model
from tests.test_experts_drop import moe_model  # noqa: F401 (fixture)
from wanda_stream.cli import main
from wanda_stream.storage import state as state_mod

DEVICE = os.environ.get("WANDA_STREAM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device (WANDA_STREAM_TEST_DEVICE=cpu checks the checks)")

ARGS = ["--calib", "pydoc", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--compute-dtype", "float32",
        "--eval-data", "pydoc", "--eval-windows", "4", "--quiet"]
REPORT = "wanda_stream.json"
# Report keys that hold what a structural step chose: equal on both devices.
CHOICES = ("dropped_blocks", "removed", "removed_heads", "removed_groups", "kept", "dropped")


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block random Llama with grouped-query attention, float32."""
    return write_tiny_model(tmp_path_factory.mktemp("gqa") / "m", tiny_llama_config(num_hidden_layers=4))


def _prune(src: Path, out: Path, device: str, flags: list[str]) -> dict[str, Any]:
    assert main(["prune", str(src), str(out), *ARGS, "--device", device, *flags]) == 0
    return json.loads((out / REPORT).read_text())


def _choices(report: Any) -> list[tuple[str, Any]]:
    """Every structural choice in the report, in report order."""
    found: list[tuple[str, Any]] = []
    if isinstance(report, dict):
        for k, v in report.items():
            found += [(k, v)] if k in CHOICES else _choices(v)
    elif isinstance(report, list):
        for v in report:
            found += _choices(v)
    return found


def _compare(dev: Path, cpu: Path, rep_dev: dict[str, Any], rep_cpu: dict[str, Any], ppl_rel: float) -> None:
    assert _choices(rep_dev.get("structure")) == _choices(rep_cpu.get("structure"))
    assert [_choices(b) for b in rep_dev["blocks"]] == [_choices(b) for b in rep_cpu["blocks"]]
    assert (dev / "config.json").read_bytes() == (cpu / "config.json").read_bytes()
    got, want = load_state_dict(dev), load_state_dict(cpu)
    assert {k: (t.shape, t.dtype) for k, t in got.items()} == {k: (t.shape, t.dtype) for k, t in want.items()}
    for key, t in got.items():
        w = want[key]
        assert ((t == 0) == (w == 0)).float().mean().item() >= 0.98, key
        scale = w.abs().max().item() or 1.0
        close = torch.isclose(t, w, rtol=1e-3, atol=1e-5 * scale)
        assert close.float().mean().item() >= 0.98, key
    assert rep_dev["total_sparsity"] == pytest.approx(rep_cpu["total_sparsity"], abs=1e-3)
    assert rep_dev["eval"]["perplexity"] == pytest.approx(rep_cpu["eval"]["perplexity"], rel=ppl_rel)
    assert rep_dev["config"]["device"].startswith(DEVICE.split(":")[0])


def _on_both(src: Path, tmp_path: Path, flags: list[str], ppl_rel: float = 1e-3) -> dict[str, Any]:
    rep_dev = _prune(src, tmp_path / "dev", DEVICE, flags)
    rep_cpu = _prune(src, tmp_path / "cpu", "cpu", flags)
    _compare(tmp_path / "dev", tmp_path / "cpu", rep_dev, rep_cpu, ppl_rel)
    return rep_dev


@pytest.mark.parametrize("flags,ppl_rel", [
    (["--method", "wanda", "--pattern", "4:8"], 1e-3),
    (["--method", "ria", "--sparsity", "0.6"], 1e-3),
    (["--method", "magnitude", "--sparsity", "0.5"], 1e-3),
    (["--method", "sparsegpt", "--pattern", "2:4"], 1e-3),
    (["--method", "alps", "--sparsity", "0.6"], 1e-2),
    (["--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl"], 1e-3),
    (["--method", "wanda", "--pattern", "2:4", "--reconstruct", "--reconstruct-epochs", "2",
      "--reconstruct-batch", "4"], 1e-2),
], ids=["wanda-4:8", "ria", "magnitude", "sparsegpt-2:4", "alps", "wanda-owl", "wanda-reconstruct"])
def test_methods_on_the_device_match_the_cpu(tiny_model: Path, tmp_path: Path, flags: list[str],
                                             ppl_rel: float) -> None:
    _on_both(tiny_model, tmp_path, flags, ppl_rel)


@pytest.mark.parametrize("flags", [
    ["--drop-blocks", "1", "--sparsity", "0"],
    ["--drop-blocks", "1", "--block-score", "angular", "--sparsity", "0"],
    ["--drop-ffn", "0.25", "--drop-heads", "0.5", "--sparsity", "0"],
    ["--drop-ffn", "0.25", "--method", "wanda", "--pattern", "2:4"],
], ids=["blocks-bi", "blocks-angular", "ffn-heads", "ffn-then-2:4"])
def test_structure_on_the_device_matches_the_cpu(gqa_model: Path, tmp_path: Path, flags: list[str]) -> None:
    rep = _on_both(gqa_model, tmp_path, flags)
    assert rep["structure"]


@pytest.mark.parametrize("family,flags", [
    ("deepseek_v3", ["--expert-group", "3", "--sparsity", "0.5"]),
    ("deepseek_v3", ["--expert-group", "2", "--drop-experts", "0.25", "--method", "sparsegpt", "--sparsity", "0.5"]),
    ("mixtral", ["--expert-group", "0", "--drop-experts", "0.25", "--sparsity", "0.5"]),
    ("qwen2_moe", ["--expert-group", "3", "--pattern", "2:4"]),
    ("gpt_oss", ["--expert-group", "3", "--drop-experts", "0.25", "--sparsity", "0.5"]),
    ("llama4_text", ["--expert-group", "3", "--drop-experts", "0.5", "--method", "sparsegpt", "--sparsity", "0.5"]),
], ids=["deepseek-streamed", "deepseek-streamed-reap-sparsegpt", "mixtral-reap", "qwen2-moe-streamed-2:4",
        "gpt-oss-fused-rows-reap", "llama4-stacked-reap-sparsegpt"])
def test_experts_on_the_device_match_the_cpu(moe_model: Callable[[str], Path], tmp_path: Path,  # noqa: F811
                                             family: str, flags: list[str]) -> None:
    _on_both(moe_model(family), tmp_path, flags)


def test_sweep_on_the_device_matches_the_cpu(tiny_model: Path, tmp_path: Path) -> None:
    sweep = ["--sweep", "wanda:0.5,sparsegpt:2:4"]
    for device, out in ((DEVICE, tmp_path / "dev"), ("cpu", tmp_path / "cpu")):
        assert main(["prune", str(tiny_model), f"{out}/", *ARGS, "--device", device, *sweep]) == 0
    for name in ("wanda-0.5", "sparsegpt-2of4"):
        dev, cpu = tmp_path / "dev" / name, tmp_path / "cpu" / name
        _compare(dev, cpu, json.loads((dev / REPORT).read_text()), json.loads((cpu / REPORT).read_text()), 1e-3)


def test_streamed_experts_killed_and_resumed_on_the_device(moe_model: Callable[[str], Path],  # noqa: F811
                                                           tmp_path: Path) -> None:
    """SIGKILL between two groups of a streamed block, then --resume: the uninterrupted run's bytes, on the GPU."""
    src = moe_model("deepseek_v3")
    flags = [*ARGS, "--device", DEVICE, "--expert-group", "2", "--drop-experts", "0.25", "--sparsity", "0.5"]
    whole = tmp_path / "whole"
    assert main(["prune", str(src), str(whole), *flags]) == 0
    out = tmp_path / "out"
    killed = run_cli("prune", str(src), str(out), *flags, env={state_mod.KILL_ENV: "expert_group:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli("prune", str(src), str(out), *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint_files(out) == checkpoint_files(whole)
