"""The real pretrained model: SmolLM2-135M, calibrated on WikiText-2 validation, evaluated on its test split.

Figures (float32, 40 windows of 512 tokens of wiki.test.raw; 32 x 512 calibration tokens, seed 0):
dense 29.19 (tools/bench_eval.py); two independent implementations fed the same windows got magnitude 50% about 483,
wanda 50% about 61.8, wanda 2:4 about 166; llm-compressor's SparseGPT 52.91 on our windows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import WIKI_TEST, WIKI_VALID, tree_hash
from wanda_stream.run import calib
from wanda_stream.cli import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not WIKI_TEST.is_file(), reason="../shared/data/wikitext2 not present")]
EVAL = ["--eval-data", str(WIKI_TEST), "--eval-windows", "40", "--eval-seqlen", "512"]


def _prune(model: Path, out: Path, *extra: str) -> dict:
    args = ["prune", str(model), str(out), "--calib", str(WIKI_VALID), "--nsamples", "32", "--seqlen", "512",
            "--seed", "0", "--device", "cpu", "--quiet", *extra]
    assert main(args) == 0
    return json.loads((out / "wanda_stream.json").read_text())


@pytest.fixture(scope="module")
def outputs(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    base = tmp_path_factory.mktemp("real")
    before = tree_hash(smollm2)
    runs = {
        "wanda": ("--method", "wanda"),
        "magnitude": ("--method", "magnitude"),
        "wanda24": ("--method", "wanda", "--pattern", "2:4"),
        "sparsegpt": ("--method", "sparsegpt"),
    }
    result = {name: (base / name, _prune(smollm2, base / name, *args, *EVAL)) for name, args in runs.items()}
    assert tree_hash(smollm2) == before, "the input checkpoint was modified"
    return result


def in_memory_perplexity(model_dir: Path, windows: torch.Tensor) -> float:
    """Perplexity with the whole model loaded by transformers (the usual script)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0), use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += w.numel() - 1
    return math.exp(nll / count)


def _eval_json(model: Path, windows: int, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["eval", str(model), "--data", str(WIKI_TEST), "--seqlen", "512", "--max-windows", str(windows),
                 "--device", "cpu", "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dense_streamed_eval_equals_in_memory(smollm2: Path, capsys: pytest.CaptureFixture) -> None:
    streamed = _eval_json(smollm2, 8, capsys)
    assert streamed["windows"] == 8 and streamed["tokens"] == 8 * 511
    tok = calib.load_tokenizer(smollm2)
    windows = calib.eval_windows(WIKI_TEST.read_text(), tok, 512, 8, "test")
    assert streamed["perplexity"] == pytest.approx(in_memory_perplexity(smollm2, windows), rel=1e-4)


def test_wanda_far_below_magnitude(outputs: dict) -> None:
    wanda, magnitude = outputs["wanda"][1]["eval"]["perplexity"], outputs["magnitude"][1]["eval"]["perplexity"]
    assert 55.0 < wanda < 70.0          # independent implementations: about 61.8
    assert 430.0 < magnitude < 540.0    # about 483
    assert wanda < magnitude / 5


def test_every_decoder_linear_has_half_zeros_per_row(outputs: dict) -> None:
    from wanda_stream.storage.checkpoint import Checkpoint

    ckpt = Checkpoint(outputs["wanda"][0])
    linears = [k for k in ckpt.keys() if "layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 30 * 7
    for key in linears:
        w = ckpt.get(key)
        assert (w == 0).sum(dim=1).tolist() == [w.shape[1] // 2] * w.shape[0], key
    blocks = outputs["wanda"][1]["blocks"]
    assert all(m["sparsity"] == 0.5 for b in blocks for m in b["matrices"])


def test_sparsegpt_beats_wanda_on_the_same_windows(outputs: dict) -> None:
    sparsegpt, wanda = outputs["sparsegpt"][1], outputs["wanda"][1]["eval"]["perplexity"]
    # llm-compressor 0.14's SparseGPTModifier fed these windows: 52.91
    assert 50.0 < sparsegpt["eval"]["perplexity"] < 56.0
    assert sparsegpt["eval"]["perplexity"] < 0.9 * wanda
    assert sparsegpt["total_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(m["dampening"] == 0.01 for b in sparsegpt["blocks"] for m in b["matrices"])


def test_wanda_2_4_real(outputs: dict) -> None:
    from wanda_stream.eval.inspect import inspect_checkpoint

    out, report = outputs["wanda24"]
    assert 140.0 < report["eval"]["perplexity"] < 200.0  # about 166
    result = inspect_checkpoint(out, "2:4")
    assert result["all_satisfy_pattern"] and len(result["matrices"]) == 210
    # the de-quantized checkpoint already holds some exact zeros, so a group may have more than 2
    assert result["total_sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_pruned_streamed_eval_equals_in_memory(outputs: dict, capsys: pytest.CaptureFixture) -> None:
    # (that the fused --eval-data figure equals a separate eval run is checked exactly on tiny models)
    out, _ = outputs["wanda"]
    tok = calib.load_tokenizer(out)
    windows = calib.eval_windows(WIKI_TEST.read_text(), tok, 512, 8, "test")
    streamed8 = _eval_json(out, 8, capsys)["perplexity"]
    assert streamed8 == pytest.approx(in_memory_perplexity(out, windows), rel=1e-4)
