"""The model card written into the output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from wanda_stream.run.card import base_model_id, card_command, render_card
from wanda_stream.cli import main

ORIGINAL = "---\nlicense: apache-2.0\n---\n# Tiny\n\nThe base model's own card.\n"


def _report(**config: object) -> dict:
    cfg = {"method": "wanda", "pattern": "2:4", "sparsity": 0.5, "calib": "c4", "nsamples": 128, "seqlen": 2048,
           "seed": 0, **config}
    return {"config": cfg, "total_sparsity": 0.5, "versions": {"wanda_stream": "0.1.0"},
            "eval": {"perplexity": 12.3456789, "data": "wikitext2", "windows": 40, "seqlen": 512}}


def test_card_front_matter_body_and_original_below() -> None:
    card = render_card(_report(), "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "wanda-stream prune a b",
                       ORIGINAL)
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front == ('base_model: "meta-llama/Llama-2-7b-hf"\nlibrary_name: "transformers"\n'
                     'pipeline_tag: "text-generation"\ntags:\n- "pruned"\n- "wanda"\n- "sparsity-50"\n- "2:4"\n'
                     '- "wanda-stream"\n')
    for text in ("| method | wanda |", "| pattern | 2:4 |", "50.00%", "`c4`, 128 x 2048 tokens, seed 0",
                 "12.3457 on `wikitext2`, 40 x 512 tokens", "| wanda-stream | 0.1.0 |", "wanda-stream prune a b"):
        assert text in body, text
    ours, original = body.split("## Original model card\n")
    assert "The base model's own card." in original and "```yaml\nlicense: apache-2.0\n```" in original
    report = _report(method="magnitude", pattern="unstructured")
    del report["eval"]
    magnitude = render_card(report, "x", "x", "c")
    assert "none (magnitude pruning reads no data)" in magnitude and '"2:4"' not in magnitude
    ria = render_card(_report(method="ria"), "x", "x", "c")
    assert "`c4`, 128 x 2048 tokens, seed 0 |" in ria  # every method but magnitude reads calibration data


def test_the_pipeline_tag_is_the_input_cards() -> None:
    """A multimodal input (Llama 4: image-text-to-text) keeps its pipeline tag; text-generation otherwise."""
    vlm = "---\npipeline_tag: image-text-to-text\nlicense: other\n---\n# Llama 4\n"
    assert 'pipeline_tag: "image-text-to-text"\n' in render_card(_report(), "x", "x", "c", vlm)
    assert 'pipeline_tag: "text-generation"\n' in render_card(_report(), "x", "x", "c", ORIGINAL)
    assert 'pipeline_tag: "text-generation"\n' in render_card(_report(), "x", "x", "c", "---\npipeline_tag: [1]\n---\n")


def test_card_says_when_the_windows_cover_few_distinct_tokens() -> None:
    few = {**_report(seqlen=512), "calibration": {"tokens": 65536, "distinct_tokens": 700}}
    assert ("| calibration | `c4`, 128 x 512 tokens, seed 0; the windows overlap and cover only 700 distinct tokens "
            "of the 65,536 asked for |") in render_card(few, None, "m", "c")
    half = {**_report(seqlen=512), "calibration": {"tokens": 65536, "distinct_tokens": 32768}}
    assert "| calibration | `c4`, 128 x 512 tokens, seed 0 |" in render_card(half, None, "m", "c")


def test_base_model_is_a_model_id_or_left_out() -> None:
    card = "---\nbase_model: HuggingFaceTB/SmolLM2-135M\nlicense: apache-2.0\n---\n# A fine-tune\n"
    named = {"_name_or_path": "meta-llama/Llama-2-7b-hf"}
    assert base_model_id("org/model", card, named) == "org/model"  # the hub id it came from wins
    assert base_model_id(None, card, named) == "HuggingFaceTB/SmolLM2-135M"  # then the input card's own
    assert base_model_id(None, "---\nbase_model:\n- a/b\n- c/d\n---\n", {}) == ["a/b", "c/d"]
    assert base_model_id(None, "# no front matter\n", named) == "meta-llama/Llama-2-7b-hf"  # then the config's
    assert base_model_id(None, "---\nbase_model: [unclosed\n---\n", named) == "meta-llama/Llama-2-7b-hf"
    assert base_model_id(None, None, {"_name_or_path": "/home/me/models/llama"}) is None  # a path is no id
    assert base_model_id(None, None, {}) is None
    body = render_card(_report(), None, "smollm2-135m", "c")
    assert "base_model" not in body and body.startswith('---\nlibrary_name: "transformers"\n')
    assert "# smollm2-135m, pruned" in body and "`smollm2-135m` with the weights" in body


def test_card_command_drops_how_to_run_flags() -> None:
    argv = ["prune", "in dir", "out", "--resume", "--overwrite", "--quiet", "--log-format", "json",
            "--log-format=bar", "--res", "--seqlen", "512", "--work-dir", "/scratch/w", "--keep-work-dir"]
    assert card_command(argv) == "wanda-stream prune 'in dir' out --seqlen 512"


def test_output_gets_a_card_and_keeps_the_input_card(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "Tiny-Base"
    shutil.copytree(tiny_model, model)
    (model / "README.md").write_text(ORIGINAL)
    out = tmp_path / "out"
    assert main(["prune", str(model), str(out), "--method", "magnitude", "--pattern", "2:4", "--quiet"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith('---\nlibrary_name: "transformers"\n')  # a directory's name is no model id
    assert f"wanda-stream prune {model} {out} --method magnitude --pattern 2:4\n" in card  # without --quiet
    assert card.index("# Tiny-Base, pruned") < card.index("## Original model card") < card.index("own card.")


def test_local_input_card_names_its_base_model(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "my-finetune"
    shutil.copytree(tiny_model, model)
    (model / "README.md").write_text("---\nbase_model: org/Base-1B\n---\n# My fine-tune\n")
    out = tmp_path / "out"
    assert main(["prune", str(model), str(out), "--method", "magnitude", "--quiet"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith('---\nbase_model: "org/Base-1B"\n') and "# my-finetune, pruned" in card
    (model / "README.md").unlink()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/From-Config"}))
    assert main(["prune", str(model), str(tmp_path / "out2"), "--method", "magnitude", "--quiet"]) == 0
    assert (tmp_path / "out2" / "README.md").read_text().startswith('---\nbase_model: "org/From-Config"\n')
