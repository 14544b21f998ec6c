"""Write a random-weight checkpoint of a config's shapes straight in block FP8, experts per expert (hub layout).

    python tools/make_synthetic_fp8.py docs/bench_deepseek_v3_e256.json /data/ds-e256-fp8 --shard-size 4GB

For models too large for a float intermediate (two DeepSeek-V3 MoE blocks are 46 GB in bf16): each
tensor is drawn (tools/make_synthetic_model.py's generator and seeds, per checkpoint key), quantized
(tools/make_quantized_checkpoint.py's 128 x 128 block FP8 of every 2D projection weight of the
decoder blocks) and written one at a time; fused experts are written as the hub's per-expert
`experts.{e}.gate_proj/up_proj/down_proj.weight`, drawn one expert at a time. config.json carries
the FP8 quantization_config; a tokenizer trained on pydoc text is added.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_quantized_checkpoint import QUANT_CONFIGS, quantizable, quantize_fp8_block  # noqa: E402

from wanda_stream.storage.checkpoint import INDEX_NAME, atomic_write_json, fsync_dir, write_shard  # noqa: E402
from wanda_stream.storage.synthetic import build_tokenizer, load_spec, make_tensor, tensor_specs  # noqa: E402

BLOCK = (128, 128)


def stored_specs(config: object) -> list[tuple[str, tuple[int, ...]]]:
    """(key, float shape) of every tensor as the hub stores it: fused experts split per expert."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for key, shape in tensor_specs(config):
        holder, _, leaf = key.rpartition(".")
        if holder.endswith(".experts") and len(shape) == 3 and leaf in ("gate_up_proj", "down_proj"):
            e, rows, cols = shape
            for i in range(e):
                if leaf == "down_proj":
                    out.append((f"{holder}.{i}.down_proj.weight", (rows, cols)))
                else:
                    out += [(f"{holder}.{i}.gate_proj.weight", (rows // 2, cols)),
                            (f"{holder}.{i}.up_proj.weight", (rows // 2, cols))]
        else:
            out.append((key, shape))
    return out


def items_of(specs: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The stored tensors: FP8 weights with their float32 inverse scales, the rest bf16."""
    out: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for key, shape in specs:
        if quantizable(key, shape):
            rows, cols = -(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])
            out += [(key, torch.float8_e4m3fn, shape), (key + "_scale_inv", torch.float32, (rows, cols))]
        else:
            out.append((key, torch.bfloat16, shape))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a config.json (or a preset of tools/make_synthetic_model.py)")
    p.add_argument("out", type=Path, help="a new directory")
    p.add_argument("--shard-size", type=float, default=4.0, help="GB per shard (default 4)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.out.exists():
        print(f"make_synthetic_fp8: error: {a.out}: already exists; choose a new directory", file=sys.stderr)
        return 2
    config = load_spec(a.config)
    std = float(getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02)
    specs = stored_specs(config)
    shapes = dict(specs)
    tmp = a.out.with_name(a.out.name + ".partial")
    tmp.mkdir(parents=True)
    items = items_of(specs)
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for it in items:
        n = torch.Size(it[2]).numel() * torch.empty(0, dtype=it[1]).element_size()
        if shards[-1] and size + n > a.shard_size * 1e9 and not it[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n
    cache: dict[str, torch.Tensor] = {}

    def produce(key: str) -> torch.Tensor:
        if key in cache:
            return cache.pop(key)
        base = key.removesuffix("_scale_inv")
        w = make_tensor(base, shapes[base], torch.float32, a.seed, std)
        if not quantizable(base, shapes[base]):
            return w.to(torch.bfloat16)
        q, s = quantize_fp8_block(w, BLOCK)
        cache[base], cache[base + "_scale_inv"] = q, s
        return cache.pop(key)

    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        # The weight before its scale: produce() quantizes once and hands the scale over next.
        order = sorted(shard, key=lambda it: (it[0].removesuffix("_scale_inv"), it[0].endswith("_scale_inv")))
        write_shard(tmp / name, order, produce, in_order=True)
        total += sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, d, s in shard)
        weight_map.update((k, name) for k, _, _ in shard)
        print(f"{name}: {len(shard)} tensors", flush=True)
    atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.dtype = torch.bfloat16
    config.save_pretrained(str(tmp))
    raw = json.loads((tmp / "config.json").read_text())
    raw["quantization_config"] = QUANT_CONFIGS["fp8"](BLOCK)
    atomic_write_json(tmp / "config.json", raw)
    build_tokenizer(tmp, config.get_text_config().vocab_size)
    fsync_dir(tmp)
    os.replace(tmp, a.out)
    print(json.dumps({"model_dir": str(a.out), "tensors": len(items), "shards": len(shards), "bytes": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
