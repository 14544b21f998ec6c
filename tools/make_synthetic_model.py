"""Write a random-weight Hugging Face checkpoint with a real model's shapes, one tensor at a time.

    python tools/make_synthetic_model.py llama-2-7b /data/llama-2-7b-random --dtype bfloat16
    python tools/make_synthetic_model.py path/to/config.json OUT_DIR --shard-size 2GB --seed 1

Presets: llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, mistral-7b, tiny-llama; or any
transformers config.json (a file, or a directory holding one). A byte-level BPE tokenizer trained
on CPython's pydoc text is saved with it (its vocabulary is at most the model's, so every token id
is a valid row); perplexities of these models are meaningless, memory, I/O and time are not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from wanda_stream.run.resources import parse_size
from wanda_stream.errors import InputError
from wanda_stream.storage.synthetic import PRESETS, generate

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, generate, print a JSON summary; exit 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name_or_config", help=f"a preset ({', '.join(PRESETS)}) or a config.json")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true", help="weights and config only")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn: cpu or cuda (much faster); "
                   "the weights for a seed differ between the two")
    a = p.parse_args(argv)
    try:
        shard = parse_size(a.shard_size, "--shard-size")
        t0 = time.monotonic()
        summary = generate(a.name_or_config, a.out_dir, DTYPES[a.dtype], shard, a.seed, not a.no_tokenizer,
                           a.device)
    except (InputError, ValueError, FileExistsError) as e:
        print(f"make_synthetic_model: error: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
