"""The names of what a run writes into its output directory, in one place.

Writing, finalizing and --overwrite all take the names from here, so --overwrite deletes exactly
what a run would write and nothing a user put beside it.
"""

from __future__ import annotations

from pathlib import Path

from wanda_stream.storage.checkpoint import INDEX_NAME
from wanda_stream.storage.state import REPORT_NAME

CARD_NAME = "README.md"
SWEEP_NAME = "wanda_stream_sweep.json"  # a sweep's table, in its OUTPUT_DIR beside the configurations
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
# Input files never copied verbatim: weights' indexes and the files a run writes itself.
SKIP_FILES = (INDEX_NAME, "pytorch_model.bin.index.json", REPORT_NAME, CARD_NAME)


def shard_count(n_blocks: int) -> int:
    """One shard for the non-block tensors, then one per decoder block."""
    return n_blocks + 1


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard naming: model-00001-of-00031.safetensors (1-based)."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def shard_names(n_blocks: int) -> list[str]:
    """Every shard of a pruned checkpoint of `n_blocks` decoder blocks, in order."""
    total = shard_count(n_blocks)
    return [shard_name(i, total) for i in range(total)]


def input_card(model_dir: Path) -> str | None:
    """The input checkpoint's own model card (README.md), if it has one."""
    source = model_dir / CARD_NAME
    return source.read_text(encoding="utf-8", errors="replace") if source.is_file() else None


def side_files(model_dir: Path) -> list[str]:
    """The input's non-weight files (config, generation config, tokenizer, chat template) a run copies."""
    return sorted(
        p.name for p in model_dir.iterdir()
        if p.is_file() and p.name not in SKIP_FILES and p.suffix not in WEIGHT_SUFFIXES
        and not p.name.endswith(".index.json")
    )


def own_files(model_dir: Path, n_blocks: int) -> list[str]:
    """Every name a run of this input writes in the output directory, report and index first.

    The report and index come first so that a deletion killed midway never leaves an index that
    names deleted shards, or a report that calls a half-deleted output finished.
    """
    return [REPORT_NAME, INDEX_NAME, CARD_NAME, *shard_names(n_blocks), *side_files(model_dir)]
