"""Shared test helpers: tiny multi-shard checkpoints, a small tokenizer, hashing, running the CLI."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"


def small_text() -> str:
    """Real English text for tiny models: CPython's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(vocab_size: int) -> str:
    """The BPE trained on pydoc text, serialized: training takes a second, and tests build many models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([small_text()[:200_000]], trainer)
    return tok.to_str()


def build_tokenizer(out_dir: Path, vocab_size: int = 256) -> Any:
    """A small byte-level BPE tokenizer trained on pydoc text, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer(vocab_size)),
                                   eos_token="<eos>")
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, rms_norm_eps=1e-5)
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_tiny_model(out_dir: Path, config: Any = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                     shard_size: str = "40KB") -> Path:
    """Random-weight causal LM saved as a multi-shard safetensors checkpoint with a tokenizer."""
    from transformers import AutoModelForCausalLM

    config = config or tiny_llama_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms: non-trivial gains so a bug in them shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out_dir), max_shard_size=shard_size)
    build_tokenizer(out_dir, vocab_size=min(config.vocab_size, 300))
    return out_dir


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file below `path`, by relative name."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def checkpoint_files(out: Path) -> dict[str, str]:
    """Hashes of an output's files but the report (paths, timings), the model card's command line taken
    without its input and output paths, which differ between two runs of one configuration."""
    import re

    got = {k: v for k, v in tree_hash(out).items() if k != "wanda_stream.json"}
    if (out / "README.md").is_file():
        card = re.sub(r"^wanda-stream prune \S+ \S+ ", "wanda-stream prune MODEL OUT ",
                      (out / "README.md").read_text(), flags=re.M)
        got["README.md"] = hashlib.sha256(card.encode()).hexdigest()
    return got


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m wanda_stream ARGS` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "wanda_stream", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
