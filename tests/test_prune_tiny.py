"""The streamed prune equals an in-memory reference prune, weight for weight, on a tiny multi-shard Llama."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.helpers import load_state_dict, tree_hash
from tests.reference import reference_prune
from wanda_stream.run import calib
from wanda_stream.cli import main

CALIB_ARGS = ["--calib", "pydoc", "--nsamples", "6", "--seqlen", "32", "--device", "cpu", "--quiet"]


def _prune(model: Path, out: Path, *extra: str) -> None:
    assert main(["prune", str(model), str(out), *CALIB_ARGS, *extra]) == 0


def _tokens(model: Path) -> torch.Tensor:
    tok = calib.load_tokenizer(model)
    return calib.sample_windows(calib.documents("pydoc"), tok, 6, 32, 0, "pydoc")


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("wanda", "2:4"), ("wanda", "4:8"),
                                            ("magnitude", "unstructured"), ("magnitude", "2:4")])
def test_streamed_equals_reference(tiny_model: Path, tmp_path: Path, method: str, pattern: str) -> None:
    out = tmp_path / "out"
    _prune(tiny_model, out, "--method", method, "--pattern", pattern, "--batch-size", "4")
    got = load_state_dict(out)
    nm = None if pattern == "unstructured" else tuple(int(x) for x in pattern.split(":"))
    ref = reference_prune(tiny_model, _tokens(tiny_model) if method == "wanda" else None, method, 0.5, nm)
    assert set(got) == set(k for k in ref if k in load_state_dict(tiny_model))
    pruned = 0
    for key, t in got.items():
        assert t.dtype == ref[key].dtype
        assert torch.equal(t, ref[key]), key
        if key.endswith("proj.weight"):
            pruned += 1
            assert (t == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
    assert pruned == 3 * 7


def test_output_is_standard_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _prune(tiny_model, out, "--sparsity", "0.3")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("model-*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    w = model.model.layers[1].mlp.down_proj.weight
    assert (w == 0).sum(1).tolist() == [int(w.shape[1] * 0.3)] * w.shape[0]
    src = load_state_dict(tiny_model)
    got = load_state_dict(out)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.input_layernorm.weight"):
        assert torch.equal(got[key], src[key])
    report = json.loads((out / "wanda_stream.json").read_text())
    assert report["config"]["sparsity"] == 0.3 and len(report["blocks"]) == 3
    assert not (out / ".wanda-stream").exists()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes()


def test_bf16_weights_keep_dtype_and_match_reference(tmp_path: Path) -> None:
    from tests.helpers import write_tiny_model

    model = write_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    out = tmp_path / "out"
    before = tree_hash(model)
    _prune(model, out)
    assert tree_hash(model) == before
    got = load_state_dict(out)
    ref = reference_prune(model, _tokens(model), "wanda", 0.5, None)
    for key, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, ref[key]), key


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    from tests.helpers import tiny_llama_config, write_tiny_model
    from transformers import AutoModelForCausalLM

    model = write_tiny_model(tmp_path / "tied", config=tiny_llama_config(tie_word_embeddings=True))
    assert "lm_head.weight" not in load_state_dict(model)
    out = tmp_path / "out"
    _prune(model, out, "--eval-data", "pydoc", "--eval-windows", "3")
    assert "lm_head.weight" not in load_state_dict(out)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_prefetch_changes_no_byte_and_report_times_every_phase(tiny_model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefetch on and off (blocks and hidden states, 3 micro-batches) write the same bytes.

    Each block records read, compute and write seconds and how long the loop waited on I/O; without
    prefetch the loop waits for the whole read and the whole write, and the phases fit in the loop time.
    The loop is held up after each shard's submission, as a loaded host deschedules it while the writer
    thread runs: the wait still covers the whole write.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from wanda_stream.run import prune as prune_mod

    class HeldUp(ThreadPoolExecutor):
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
            future = super().submit(fn, *args, **kwargs)
            time.sleep(0.05)
            return future

    monkeypatch.setattr(prune_mod, "ThreadPoolExecutor", HeldUp)
    outs = {}
    for prefetch in (True, False):
        out = outs[prefetch] = tmp_path / f"out-{prefetch}"
        _prune(tiny_model, out, "--batch-size", "2", *([] if prefetch else ["--no-prefetch"]))
        report = json.loads((out / "wanda_stream.json").read_text())
        keys = {"read_s", "read_cpu_s", "read_wait_s", "compute_s", "write_s", "write_cpu_s", "write_wait_s",
                "hidden_wait_s", "states_wait_s"}
        for b in report["blocks"]:
            t = b["timing"]
            assert set(t) == keys and all(v >= 0 for v in t.values())
            assert t["hidden_wait_s"] <= t["compute_s"] + 1e-3
            assert b["seconds"] == pytest.approx(t["read_wait_s"] + t["compute_s"], abs=2e-3)
            if not prefetch:
                # Rounded to the millisecond each; the wait includes the call around the read.
                assert t["read_wait_s"] >= t["read_s"] - 2e-3 and t["write_wait_s"] >= t["write_s"] - 2e-3
        waits = ("read_wait_s", "compute_s", "write_wait_s", "states_wait_s")
        phases = sum(b["timing"][k] for b in report["blocks"] for k in waits)
        assert 0 < phases <= report["block_loop_seconds_this_process"] + 0.01
    shards = sorted(p.name for p in outs[True].glob("model-*.safetensors"))
    assert shards and shards == sorted(p.name for p in outs[False].glob("model-*.safetensors"))
    for name in shards:
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
