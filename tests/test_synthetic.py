"""Synthetic checkpoints (tools/make_synthetic_model.py) and the benchmark's process measurements."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, load_state_dict, run_cli, tree_hash
from wanda_stream.storage.checkpoint import INDEX_NAME
from wanda_stream.model.stream import open_model
from wanda_stream.storage.synthetic import (PRESETS, generate, load_spec, make_tensor, plan_shards, tensor_pieces,
                                            tensor_specs)

sys.path.insert(0, str(ROOT / "tools"))
import bench_prune  # noqa: E402
import make_synthetic_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "tiny"
    assert make_synthetic_model.main(["tiny-llama", str(out), "--shard-size", "100KB", "--seed", "3"]) == 0
    return out


def test_preset_shapes_dtype_and_shards(tiny_synthetic: Path) -> None:
    config = load_spec("tiny-llama")
    ckpt, sk = open_model(tiny_synthetic)  # checks every tensor against the config
    assert len(ckpt.files) > 1 and (tiny_synthetic / INDEX_NAME).is_file()
    ckpt.check_index_consistent()
    assert {k: i.shape for k, i in ckpt.tensors.items()} == dict(tensor_specs(config))
    assert {i.dtype for i in ckpt.tensors.values()} == {torch.bfloat16}
    assert sk.n_layers == PRESETS["tiny-llama"]["num_hidden_layers"]
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight").float()
    assert 0.015 < float(q.std()) < 0.025  # N(0, initializer_range)
    norm = ckpt.get("model.layers.0.input_layernorm.weight").float()
    assert abs(float(norm.mean()) - 1.0) < 0.05 and float(norm.std()) > 0.05
    # every id the tokenizer produces is a row of the embedding
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_synthetic))
    assert len(tok) <= config.vocab_size
    assert max(tok("def f(x): return x ** 2  # the quick brown fox")["input_ids"]) < config.vocab_size


def test_reproducible_by_seed_and_independent_of_sharding(tiny_synthetic: Path, tmp_path: Path) -> None:
    same = generate("tiny-llama", tmp_path / "same", shard_size=100_000, seed=3, tokenizer=False)
    resharded = generate("tiny-llama", tmp_path / "one", shard_size=10**9, seed=3, tokenizer=False)
    other = generate("tiny-llama", tmp_path / "other", shard_size=100_000, seed=4, tokenizer=False)
    a = tree_hash(tiny_synthetic)
    b = tree_hash(Path(same["model_dir"]))
    assert {k: v for k, v in a.items() if k.endswith(".safetensors")} == {
        k: v for k, v in b.items() if k.endswith(".safetensors")}
    assert resharded["shards"] == 1
    ref, one, diff = (load_state_dict(Path(r["model_dir"])) for r in (same, resharded, other))
    assert ref.keys() == one.keys() == diff.keys()
    assert all(torch.equal(ref[k], one[k]) for k in ref)
    assert not any(torch.equal(ref[k], diff[k]) for k in ref if ref[k].dim() == 2)


def test_a_tensor_over_the_draw_limit_comes_in_slabs_of_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor over the limit (Llama-4-Maverick's experts, 10.7 G values) is drawn and written a slab of rows at
    a time, each slab its own draw; one within the limit is make_tensor's. The checkpoint holds the slabs."""
    bf16 = torch.bfloat16
    pieces = list(tensor_pieces("w", (10, 4), bf16, 0, 0.02, limit=12))
    assert [(k, first, tuple(t.shape)) for k, first, t in pieces] == [
        ("w", 0, (3, 4)), ("w", 3, (3, 4)), ("w", 6, (3, 4)), ("w", 9, (1, 4))]
    assert torch.equal(pieces[0][2], make_tensor("w", (3, 4), bf16, 0, 0.02))
    assert torch.equal(pieces[1][2], make_tensor("w@3", (3, 4), bf16, 0, 0.02))
    assert not torch.equal(pieces[0][2], pieces[1][2])
    ((_, _, whole),) = tensor_pieces("w", (10, 4), bf16, 0, 0.02, limit=40)
    assert torch.equal(whole, make_tensor("w", (10, 4), bf16, 0, 0.02))
    from wanda_stream.storage import synthetic

    monkeypatch.setattr(synthetic, "DRAW_LIMIT", 1000)
    out = generate("tiny-llama", tmp_path / "slabs", shard_size=10**9, seed=3, tokenizer=False)
    got = load_state_dict(Path(out["model_dir"]))
    key = "model.embed_tokens.weight"
    shape = tuple(got[key].shape)
    step = 1000 // shape[1]
    assert shape[0] > step and torch.equal(got[key][step:2 * step], make_tensor(f"{key}@{step}", (step, shape[1]),
                                                                              bf16, 3, 0.02))


def test_config_json_with_tied_embeddings(tmp_path: Path) -> None:
    cfg = {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True,
           "max_position_embeddings": 128, "architectures": ["MistralForCausalLM"], "torch_dtype": "float16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    s = generate(str(path), tmp_path / "m", dtype=torch.float16, seed=0)
    assert s["shards"] == 1 and s["model_type"] == "mistral" and s["tokenizer_vocab_size"] <= 300
    ckpt, sk = open_model(tmp_path / "m")
    assert "lm_head.weight" not in ckpt.tensors  # tied: stored once, as save_pretrained does
    assert {i.dtype for i in ckpt.tensors.values()} == {torch.float16}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True


def test_bad_spec_and_existing_output(tmp_path: Path) -> None:
    assert make_synthetic_model.main(["no-such-model", str(tmp_path / "x")]) == 2
    (tmp_path / "exists").mkdir()
    assert make_synthetic_model.main(["tiny-llama", str(tmp_path / "exists")]) == 2


def test_plan_shards_respects_the_limit() -> None:
    items = [("a", (10,)), ("b", (30,)), ("c", (30,)), ("d", (100,))]
    assert [[k for k, _ in s] for s in plan_shards(items, 2, 100)] == [["a", "b"], ["c"], ["d"]]


def test_prune_synthetic_checkpoint(tiny_synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    r = run_cli("prune", str(tiny_synthetic), str(out), "--calib", "pydoc", "--nsamples", "2", "--seqlen", "64",
                "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    before, after = load_state_dict(tiny_synthetic), load_state_dict(out)
    assert before.keys() == after.keys()
    for k, w in after.items():
        assert w.dtype == torch.bfloat16 and w.shape == before[k].shape
        if k.endswith("proj.weight"):
            assert float((w == 0).float().mean()) == 0.5, k
        else:
            assert torch.equal(w, before[k]), k


def test_measure_reports_io_and_peak_rss(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    code = f"import os; f = open({str(target)!r}, 'wb'); f.write(os.urandom(8 << 20)); f.flush(); os.fsync(f.fileno())"
    r = bench_prune.measure([sys.executable, "-c", code], tmp_path / "log", 0)
    assert r["status"] == "ok" and r["exit"] == 0
    assert r["io"]["wchar"] >= 8 << 20 and r["io"]["write_bytes"] >= 8 << 20
    assert r["peak_rss_bytes"] > 0


def test_measure_shows_a_run_over_the_limit_as_oom(tmp_path: Path) -> None:
    code = "import time; x = bytearray(400 << 20); time.sleep(30)"
    r = bench_prune.measure([sys.executable, "-c", code], tmp_path / "log", 200 << 20)
    assert r["status"].startswith("OOM (killed at")
    assert r["peak_rss_bytes"] > 200 << 20 and r["wall_s"] < 30
    table = bench_prune.fmt_table([{**r, "run": "in-memory"}], {"n_layers": 2})
    assert "| in-memory | OOM (killed at" in table and table.rstrip().endswith("| - |")


def test_activation_budget_bounds_70b_calibration_micro_batches() -> None:
    from wanda_stream.run.resources import auto_batch, parse_size, window_bytes

    config = load_spec("llama-2-70b")
    # The paper's calibration of a 70B model: 4 GiB of hidden states per block in bf16.
    assert 128 * 2048 * config.hidden_size * 2 == 4 * 2**30
    batch = auto_batch(config, 2048, torch.bfloat16, 128, "cpu", budget=parse_size("4GiB", "--max-activation-memory"))
    assert 1 <= batch < 128 and batch * window_bytes(config, 2048, torch.bfloat16) <= 4 * 2**30
    # smaller than one window: still one window at a time
    assert auto_batch(config, 2048, torch.bfloat16, 128, "cpu", budget=parse_size("1MB", "--max-activation-memory")) == 1


def test_70b_presets_have_the_published_shapes() -> None:
    # Meta's config.json files: the two 70B models share the block; llama-3 has the 128256-token
    # vocabulary (its embedding and head are 2.1 GB each in bf16) and rope_theta 500000.
    shapes = {name: dict(tensor_specs(load_spec(name))) for name in ("llama-2-70b", "llama-3-70b")}
    for name, s in shapes.items():
        assert s["model.layers.0.self_attn.q_proj.weight"] == (8192, 8192)
        assert s["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)  # 8 KV heads of 128
        assert s["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)
        assert sum(1 for k in s if k.endswith("mlp.gate_proj.weight")) == 80
        block = sum(torch.Size(v).numel() for k, v in s.items() if k.startswith("model.layers.0."))
        assert 855_000_000 < block < 857_000_000, name  # 1.71 GB per block in bf16
    assert shapes["llama-2-70b"]["model.embed_tokens.weight"] == (32000, 8192)
    assert shapes["llama-3-70b"]["model.embed_tokens.weight"] == (128256, 8192)
    assert shapes["llama-3-70b"]["lm_head.weight"] == (128256, 8192)
    assert load_spec("llama-3-70b").rope_parameters["rope_theta"] == 500000.0
