"""Random-weight checkpoints with the exact shapes of real models, written one tensor at a time.

Used to measure memory, I/O and time at scale (a 13.5 GB llama-2-7b-shaped checkpoint) without
downloading anything. The weights are random, so perplexities are meaningless; everything the
pruner does with the bytes is real. Each tensor is drawn from its own generator seeded from
(seed, name), so the output is reproducible and does not depend on shard size or write order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from wanda_stream.storage.checkpoint import INDEX_NAME, SINGLE_NAME, atomic_write_json, fsync_dir, write_shard_pieces

# Shapes from the models' published config.json files (the fields that decide tensor shapes and
# the block forward); everything else is transformers' default for the family.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                       rope_theta=10000.0, tie_word_embeddings=False),
    # For tests and smoke runs: llama-2's layout at a size that generates in a blink.
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
DEFAULT_SHARD_SIZE = 5 * 10**9
# Training the BPE tokenizer beyond this many tokens takes minutes and pydoc text cannot fill it anyway.
MAX_TOKENIZER_VOCAB = 32000


def load_spec(name_or_config: str) -> Any:
    """A transformers config from a preset name, a config.json file or a directory holding one."""
    from transformers import AutoConfig

    if name_or_config in PRESETS:
        kw = dict(PRESETS[name_or_config])
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    path = Path(name_or_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"'{name_or_config}' is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    cfg = json.loads(path.read_text())
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: no model_type; not a transformers config.json")
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
              "quantization_config"):
        cfg.pop(k, None)
    return AutoConfig.for_model(model_type, **cfg)


def tensor_specs(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint key, shape) of every stored tensor, in the model's own order; tied copies left out."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    out: list[tuple[str, tuple[int, ...]]] = []
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in tied or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, tuple(p.shape)))
    persistent = {n for n, _ in model.named_buffers()} - _non_persistent(model)
    for name, b in model.named_buffers():
        if name in persistent:
            out.append((name, tuple(b.shape)))
    return out


def _non_persistent(model: torch.nn.Module) -> set[str]:
    names = set()
    for mname, mod in model.named_modules():
        for b in mod._non_persistent_buffers_set:
            names.add(f"{mname}.{b}" if mname else b)
    return names


def _tensor_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def make_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float,
                device: str = "cpu") -> torch.Tensor:
    """The tensor `key` of a synthetic checkpoint: N(0, std) matrices, norm gains near 1, small biases.

    Drawn on `device` (a GPU draws a 7B model in seconds); CPU and CUDA generators give different
    numbers for the same seed, so a checkpoint is reproducible for a given seed and device kind.
    """
    g = torch.Generator(device=device).manual_seed(_tensor_seed(seed, key))
    t = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
    if len(shape) == 1:
        # Norm gains around 1 (not exactly 1, so a norm that is skipped by mistake shows); biases small.
        t = 1.0 + 0.1 * t if "norm" in key or "ln" in key else std * t
    else:
        t.mul_(std)
    return t.to(dtype).cpu()


DRAW_LIMIT = 1 << 28  # values drawn at once (1 GiB of float32); a larger tensor is drawn a slab of rows at a time


def tensor_pieces(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float, device: str = "cpu",
                  limit: int | None = None) -> Iterator[tuple[str, int, torch.Tensor]]:
    """The tensor `key` as (key, first row, rows) pieces of at most `limit` values (default DRAW_LIMIT; one row
    at least): a tensor within the limit is `make_tensor`'s, whole; a larger one (Llama-4-Maverick's experts:
    10.7 G values) is slabs of rows, each drawn from its own generator, seeded from its key and first row."""
    rows = shape[0] if shape else 1
    per_row = max(torch.Size(shape[1:]).numel(), 1)
    step = max(1, (limit or DRAW_LIMIT) // per_row)
    if not shape or rows <= step:
        yield key, 0, make_tensor(key, shape, dtype, seed, std, device)
        return
    for start in range(0, rows, step):
        part = (min(step, rows - start), *shape[1:])
        yield key, start, make_tensor(key if start == 0 else f"{key}@{start}", part, dtype, seed, std, device)


def plan_shards(items: list[tuple[str, tuple[int, ...]]], element_size: int,
                shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors (in order) into shards of at most `shard_size` bytes, as save_pretrained does."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in items:
        n = torch.Size(shape).numel() * element_size
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += n
    return shards


def build_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """A byte-level BPE trained on CPython's pydoc text; returns its vocabulary size (<= vocab_size)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n\n".join(topics[k] for k in sorted(topics))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Every id the tokenizer can produce must be a row of the embedding: its vocabulary is capped
    # at the model's (a model with a vocabulary under 257 cannot hold the byte alphabet).
    target = min(vocab_size, MAX_TOKENIZER_VOCAB)
    if target < 257:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs at least 257)")
    trainer = trainers.BpeTrainer(vocab_size=target, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(str(out_dir))
    return len(fast)


def generate(name_or_config: str, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
             shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, tokenizer: bool = True,
             device: str = "cpu") -> dict[str, Any]:
    """Write a random-weight checkpoint of the given shape to `out_dir`; returns a summary.

    Tensors are produced and written one at a time (a tensor over DRAW_LIMIT values a slab of rows at a
    time), so memory stays at one tensor or slab (plus its float32 draw) whatever the model size. The directory is built under a temporary name and
    renamed into place when complete.
    """
    config = load_spec(name_or_config)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; remove it or choose another directory")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    std = float(getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02)
    specs = tensor_specs(config)
    el = torch.empty(0, dtype=dtype).element_size()
    shards = plan_shards(specs, el, shard_size)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shapes = dict(specs)
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        items = [(k, dtype, s) for k, s in shard]
        write_shard_pieces(tmp / fname, items,
                           (p for k, _ in shard for p in tensor_pieces(k, shapes[k], dtype, seed, std, device)))
        for k, s in shard:
            weight_map[k] = fname
            total += torch.Size(s).numel() * el
    if len(shards) > 1:
        atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.dtype = dtype
    config.save_pretrained(str(tmp))
    tok_vocab = build_tokenizer(tmp, config.get_text_config().vocab_size) if tokenizer else None
    fsync_dir(tmp)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    return {"model_dir": str(out_dir), "model_type": config.model_type, "tensors": len(specs),
            "shards": len(shards), "bytes": total, "dtype": str(dtype).removeprefix("torch."), "seed": seed, "device": device,
            "vocab_size": config.get_text_config().vocab_size, "tokenizer_vocab_size": tok_vocab}
