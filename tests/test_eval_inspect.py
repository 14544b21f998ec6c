"""Streamed evaluation and inspection on tiny checkpoints, against transformers with the whole model loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_llama_config, write_tiny_model
from wanda_stream.run import calib
from wanda_stream.cli import main

PRUNE = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet"]


def in_memory_ppl(model_dir: Path, windows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


def _eval(model: Path, capsys: pytest.CaptureFixture, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["eval", str(model), "--data", "pydoc", "--seqlen", "48", "--max-windows", "5", "--device", "cpu",
                 "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _windows(model: Path) -> torch.Tensor:
    return calib.eval_windows(calib.documents("pydoc")[0], calib.load_tokenizer(model), 48, 5, "pydoc")


def test_eval_equals_in_memory(tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    got = _eval(tiny_model, capsys)
    assert set(got) >= {"perplexity", "tokens", "windows", "seqlen", "seconds", "peak_rss_bytes"}
    assert got["windows"] == 5 and got["tokens"] == 5 * 47 and got["seqlen"] == 48
    assert got["perplexity"] == pytest.approx(in_memory_ppl(tiny_model, _windows(tiny_model)), rel=1e-5)
    # micro-batching must not change the result beyond float noise
    assert _eval(tiny_model, capsys, "--batch-size", "2")["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)


def test_eval_tied_head(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = write_tiny_model(tmp_path / "tied", config=tiny_llama_config(tie_word_embeddings=True))
    got = _eval(model, capsys)
    assert got["perplexity"] == pytest.approx(in_memory_ppl(model, _windows(model)), rel=1e-5)


def test_fused_eval_equals_separate_eval(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *PRUNE, "--eval-data", "pydoc", "--eval-windows", "5",
                 "--eval-seqlen", "48", "--batch-size", "2"]) == 0
    fused = json.loads((out / "wanda_stream.json").read_text())["eval"]
    separate = _eval(out, capsys, "--batch-size", "2")  # same micro-batches: the same arithmetic
    assert fused["windows"] == 5 and fused["tokens"] == separate["tokens"]
    assert fused["perplexity"] == separate["perplexity"]
    assert separate["perplexity"] == pytest.approx(in_memory_ppl(out, _windows(out)), rel=1e-5)
    dense = _eval(tiny_model, capsys)["perplexity"]
    assert fused["perplexity"] != pytest.approx(dense, rel=1e-3), "pruning changed nothing?"


def test_eval_table_output(tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["eval", str(tiny_model), "--data", "pydoc", "--seqlen", "48", "--max-windows", "2",
                 "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("perplexity") and "windows" in out


def test_inspect_dense_and_2_4(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["inspect", str(tiny_model), "--pattern", "2:4", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert len(dense["matrices"]) == 3 * 7 and dense["total_sparsity"] == 0.0
    assert dense["all_satisfy_pattern"] is False
    out = tmp_path / "o24"
    assert main(["prune", str(tiny_model), str(out), *PRUNE, "--pattern", "2:4"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--pattern", "2:4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["all_satisfy_pattern"] is True and res["total_sparsity"] == 0.5
    q = next(m for m in res["matrices"] if m["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert q == {"name": q["name"], "shape": [64, 64], "dtype": "float32", "bytes": 64 * 64 * 4,
                 "sparsity": 0.5, "2:4": True}
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.2.mlp.down_proj.weight" in table and "total sparsity" in table


def test_inspect_sorts_numerically_and_summarizes_and_status_reads(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    import re

    model = write_tiny_model(tmp_path / "m11", tiny_llama_config(num_hidden_layers=11, hidden_size=32,
                                                                 intermediate_size=64))
    out = tmp_path / "out"
    assert main(["prune", str(model), str(out), "--method", "magnitude", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    blocks = [int(m["name"].split(".")[2]) for m in json.loads(capsys.readouterr().out)["matrices"]]
    assert blocks == sorted(blocks) and blocks[-1] == 10  # 0, 1, 2, ..., 10: not 0, 1, 10, 2
    assert main(["inspect", str(out), "--summary", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in summary["by_block"]] == list(range(11))
    assert all(b["matrices"] == 7 and b["sparsity"] == 0.5 for b in summary["by_block"])
    kinds = {k["name"]: k["matrices"] for k in summary["by_kind"]}
    assert kinds["self_attn.q_proj.weight"] == 11 and len(kinds) == 7
    assert sum(k["weights"] for k in summary["by_kind"]) == summary["parameters"]
    assert main(["inspect", str(out), "--summary"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^mlp\.down_proj\.weight\s+11\s+\d+\s+0\.5000$", text, re.M), text
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^total_sparsity\s+0\.5000$", status, re.M), status  # separated, rounded
    assert re.search(r"^sparsity\s+0\.5000$", status, re.M), status


def test_every_flag_has_help_and_prune_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    import argparse

    from wanda_stream.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 0.5)", "(default: wanda)", "(default: c4)", "(default: 128)", "(default: 0)",
                  "min(2048, the model's context)", "examples:"):
        assert shown in text, shown
