"""Multimodal checkpoints (Llama 4 as the hub ships it: `Llama4ForConditionalGeneration`, model_type `llama4`; Gemma 3
and Mistral 3 in the hub's layout, `language_model.model.layers`, which transformers renames on load): the language
model is pruned as its text-only twin is, the vision tower and projector are copied as they are, and the output
loads in stock transformers as the same multimodal class."""

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


def _as_twin(text_out: Path, mm_out: Path, mm_in: Path) -> list[dict]:
    """Check a multimodal output against its text twin's: the language tensors (`language_model.` + the text
    model's keys) bit for bit, everything else the input's, the same perplexity. Returns both reports."""
    want, got, before = (load_state_dict(p) for p in (text_out, mm_out, mm_in))
    language = {k.removeprefix("language_model."): v for k, v in got.items() if k.startswith("language_model.")}
    assert sorted(language) == sorted(want)
    for k, t in want.items():
        assert torch.equal(language[k], t), k
    rest = {k: v for k, v in got.items() if not k.startswith("language_model.")}
    assert rest and sorted(rest) == sorted(k for k in before if not k.startswith("language_model."))
    assert all(torch.equal(v, before[k]) for k, v in rest.items())
    reports = [json.loads((d / REPORT).read_text()) for d in (text_out, mm_out)]
    assert reports[1]["eval"]["perplexity"] == reports[0]["eval"]["perplexity"]
    return reports


def test_the_language_model_is_pruned_as_its_text_twin(twins: tuple[Path, Path], tmp_path: Path) -> None:
    """SparseGPT, REAP and streamed expert groups: the multimodal output's language tensors are the text
    model's output bit for bit, its vision tower and projector the input's, its evaluation the same; it
    loads as Llama4ForConditionalGeneration with no missing or unexpected keys, half its experts left."""
    import transformers as tf

    text_dir, mm_dir = twins
    assert main(["prune", str(text_dir), str(tmp_path / "text"), *CALIB_ARGS, *FLAGS]) == 0
    assert main(["prune", str(mm_dir), str(tmp_path / "mm"), *CALIB_ARGS, *FLAGS]) == 0
    reports = _as_twin(tmp_path / "text", tmp_path / "mm", mm_dir)
    assert any(b.get("streamed_experts") for b in reports[1]["blocks"])
    model, info = tf.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "mm"), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(model).__name__ == "Llama4ForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.num_local_experts == CONFIGS["llama4_text"]().num_local_experts // 2


def _llava_twin(root: Path, family: str) -> tuple[Path, Path]:
    """A tiny text model of `family` and the Gemma 3 / Mistral 3 checkpoint around the same language model, saved
    by transformers in the hub's layout (`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`)."""
    import transformers as tf

    build_tokenizer(root / "tokenizer")
    text_dir = write_family_model(root / "text", family, CONFIGS[family](), root / "tokenizer")
    text = tf.AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14)
    torch.manual_seed(1)
    if family == "gemma3_text":
        mm = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text.config.to_dict(), vision_config=vision,
                                                               mm_tokens_per_image=4))
    else:
        mm = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(
            text_config=text.config.to_dict(), vision_config=dict(vision, head_dim=16), spatial_merge_size=1,
            tie_word_embeddings=text.config.tie_word_embeddings))
    state = text.state_dict()
    mm.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()
                                             if k.startswith("model.")})
    if not text.config.tie_word_embeddings:
        mm.lm_head.load_state_dict({"weight": state["lm_head.weight"]})
    mm_dir = root / "mm"
    mm.save_pretrained(str(mm_dir), max_shard_size="40KB")
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, mm_dir / f.name)
    return text_dir, mm_dir


@pytest.mark.parametrize("family, flags", [
    ("gemma3_text", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("mistral", ["--method", "wanda", "--pattern", "2:4"]),
    ("gemma3_text", ["--drop-blocks", "1", "--drop-ffn", "0.25"]),  # block 1 renumbered under the hub's prefix
], ids=["gemma3-sparsegpt", "mistral3-2:4", "gemma3-structured"])
def test_hub_layout_multimodal_is_pruned_as_its_text_twin(tmp_path: Path, family: str, flags: list[str]) -> None:
    """The blocks are found under the checkpoint's own prefix (`language_model.model.layers`, not the parameters'
    `model.language_model.layers`); the output keeps the input's keys, its language tensors are the text model's
    output bit for bit, its vision tensors the input's, its perplexity the same, and it loads with no missing or
    unexpected keys."""
    import transformers as tf

    text_dir, mm_dir = _llava_twin(tmp_path, family)
    assert any(k.startswith("language_model.model.layers.") for k in load_state_dict(mm_dir))
    eval_flags = ["--eval-data", "pydoc", "--eval-windows", "4"]
    assert main(["prune", str(text_dir), str(tmp_path / "text-out"), *CALIB_ARGS, *flags, *eval_flags]) == 0
    assert main(["prune", str(mm_dir), str(tmp_path / "mm-out"), *CALIB_ARGS, *flags, *eval_flags]) == 0
    _as_twin(tmp_path / "text-out", tmp_path / "mm-out", mm_dir)
    model, info = tf.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "mm-out"), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(model).__name__ == {"gemma3_text": "Gemma3ForConditionalGeneration",
                                    "mistral": "Mistral3ForConditionalGeneration"}[family]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    text_config = json.loads((tmp_path / "text-out" / "config.json").read_text())
    assert model.config.text_config.num_hidden_layers == text_config["num_hidden_layers"]
    assert model.config.text_config.intermediate_size == text_config["intermediate_size"]


def _qwen_vl(root: Path, kind: str) -> Path:
    """A tiny Qwen2.5-VL or Qwen3-VL (M-RoPE over text positions; Qwen2.5-VL saved in its hub layout,
    `model.layers.*` and `visual.*`, Qwen3-VL in transformers' own), norms and biases non-trivial."""
    import transformers as tf

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  spatial_merge_size=2, temporal_patch_size=2)
    torch.manual_seed(0)
    if kind == "qwen2_5_vl":
        model = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(vision, patch_size=14, window_size=56, fullatt_block_indexes=[0]),
            tie_word_embeddings=False))
    else:
        model = tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                              "mrope_interleaved": True}),
            vision_config=dict(vision, patch_size=16, deepstack_visual_indexes=[0], num_position_embeddings=16),
            tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    out = root / kind
    model.save_pretrained(str(out), max_shard_size="40KB")
    build_tokenizer(out)
    return out


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_streams_as_transformers_computes_it(tmp_path: Path, kind: str) -> None:
    """Dense and pruned, the streamed forward of the language model gives transformers' logits of the whole
    multimodal model exactly on text; the pruned output loads with no missing or unexpected keys."""
    import transformers as tf

    from wanda_stream.eval.evaluate import streamed_logits

    src = _qwen_vl(tmp_path, kind)
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out"
    assert main(["prune", str(src), str(out), *CALIB_ARGS, "--method", "sparsegpt", "--sparsity", "0.5"]) == 0
    for model_dir in (src, out):
        got, _ = streamed_logits(model_dir, tokens, "cpu", tmp_path / f"work-{model_dir.name}")
        model, info = tf.AutoModelForImageTextToText.from_pretrained(str(model_dir), output_loading_info=True,
                                                                     dtype=torch.float32)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            want = model(input_ids=tokens, use_cache=False).logits
        assert torch.equal(got, want), model_dir
    pruned = load_state_dict(out)
    q = next(k for k in pruned if k.endswith("layers.1.self_attn.q_proj.weight") and "visual" not in k)
    assert (pruned[q] == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kind, heads", [("qwen2_5_vl", 4), ("qwen3_vl", 2)])
def test_qwen_vl_loses_channels_heads_and_a_block(tmp_path: Path, kind: str, heads: int,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A quarter of the MLP channels, one block and (Qwen3-VL; Qwen2.5-VL derives its head size from
    hidden_size and refuses in one line) half the query heads removed: the output's text_config carries the
    new widths and depth, it loads with no missing or unexpected keys, and the streamed forward of the
    narrower model gives transformers' logits exactly."""
    import transformers as tf

    from wanda_stream.eval.evaluate import streamed_logits

    src, out = _qwen_vl(tmp_path, kind), tmp_path / "out"
    flags = ["--drop-ffn", "0.25", "--drop-blocks", "1", "--drop-heads", "0.5"]
    if heads == 4:
        capsys.readouterr()
        assert main(["prune", str(src), str(out), *CALIB_ARGS, *flags]) == 2
        assert "--drop-heads: model_type 'qwen2_5_vl_text' cannot lose attention heads" in capsys.readouterr().err
        flags = flags[:4]
    assert main(["prune", str(src), str(out), *CALIB_ARGS, *flags]) == 0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["intermediate_size"], text["num_attention_heads"]) == (1, 96, heads)
    model, info = tf.AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    got, _ = streamed_logits(out, tokens, "cpu", tmp_path / "work")
    with torch.no_grad():
        want = model(input_ids=tokens, use_cache=False).logits
    assert torch.equal(got, want)
