"""The model card written into the output directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from wanda_stream.card import card_command, render_card
from wanda_stream.cli import main

ORIGINAL = "---\nlicense: apache-2.0\n---\n# Tiny\n\nThe base model's own card.\n"


def _report(**config: object) -> dict:
    cfg = {"method": "wanda", "pattern": "2:4", "sparsity": 0.5, "calib": "c4", "nsamples": 128, "seqlen": 2048,
           "seed": 0, **config}
    return {"config": cfg, "total_sparsity": 0.5, "versions": {"wanda_stream": "0.1.0"},
            "eval": {"perplexity": 12.3456789, "data": "wikitext2", "windows": 40, "seqlen": 512}}


def test_card_front_matter_body_and_original_below() -> None:
    card = render_card(_report(), "meta-llama/Llama-2-7b-hf", "wanda-stream prune a b", ORIGINAL)
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
    magnitude = render_card(report, "x", "c")
    assert "none (magnitude pruning reads no data)" in magnitude and '"2:4"' not in magnitude


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
    assert card.startswith('---\nbase_model: "Tiny-Base"\nlibrary_name: "transformers"\n')
    assert f"wanda-stream prune {model} {out} --method magnitude --pattern 2:4\n" in card  # without --quiet
    assert card.index("# Tiny-Base, pruned") < card.index("## Original model card") < card.index("own card.")
