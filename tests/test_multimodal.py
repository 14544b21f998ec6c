"""Multimodal checkpoints (Llama 4 as the hub ships it: `Llama4ForConditionalGeneration`, model_type `llama4`): the
language model is pruned as its text-only twin is, the vision tower and projector are copied as they are, and
the output loads in stock transformers as the same multimodal class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import build_tokenizer, load_state_dict
from tests.test_families import CALIB_ARGS, CONFIGS, write_family_model
from wanda_stream.cli import main

REPORT = "wanda_stream.json"
FLAGS = ["--method", "sparsegpt", "--sparsity", "0.5", "--drop-experts", "0.5", "--expert-group", "3",
         "--eval-data", "pydoc", "--eval-windows", "4"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama 4 text model, and the multimodal checkpoint holding the same language model beside a
    random vision tower (40KB shards both)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("multimodal")
    build_tokenizer(root / "tokenizer")
    text_dir = write_family_model(root / "text", "llama4_text", CONFIGS["llama4_text"](), root / "tokenizer")
    text = tf.AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(1)
    mm = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text.config.to_dict(), vision_config=vision))
    mm.language_model.load_state_dict(text.state_dict())
    mm_dir = root / "mm"
    mm.save_pretrained(str(mm_dir), max_shard_size="40KB")
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, mm_dir / f.name)
    return text_dir, mm_dir


def _text_key(key: str) -> str:
    """A multimodal checkpoint's language-model key as the text model stores it."""
    return key.removeprefix("language_model.")


def test_the_language_model_is_pruned_as_its_text_twin(twins: tuple[Path, Path], tmp_path: Path) -> None:
    """SparseGPT, REAP and streamed expert groups: the multimodal output's language tensors are the text
    model's output bit for bit, its vision tower and projector the input's, its evaluation the same; it
    loads as Llama4ForConditionalGeneration with no missing or unexpected keys, half its experts left."""
    import transformers as tf

    text_dir, mm_dir = twins
    assert main(["prune", str(text_dir), str(tmp_path / "text"), *CALIB_ARGS, *FLAGS]) == 0
    assert main(["prune", str(mm_dir), str(tmp_path / "mm"), *CALIB_ARGS, *FLAGS]) == 0
    want, got, before = (load_state_dict(p) for p in (tmp_path / "text", tmp_path / "mm", mm_dir))
    language = {_text_key(k): v for k, v in got.items() if k.startswith("language_model.")}
    assert sorted(language) == sorted(want)
    for k, t in want.items():
        assert torch.equal(language[k], t), k
    rest = {k: v for k, v in got.items() if not k.startswith("language_model.")}
    assert rest and sorted(rest) == sorted(k for k in before if not k.startswith("language_model."))
    assert all(torch.equal(v, before[k]) for k, v in rest.items())
    reports = [json.loads((tmp_path / d / REPORT).read_text()) for d in ("text", "mm")]
    assert reports[1]["eval"]["perplexity"] == reports[0]["eval"]["perplexity"]
    assert any(b.get("streamed_experts") for b in reports[1]["blocks"])
    model, info = tf.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "mm"), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(model).__name__ == "Llama4ForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.num_local_experts == CONFIGS["llama4_text"]().num_local_experts // 2
