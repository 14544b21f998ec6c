"""Write an FP8 or MXFP4 copy of a float checkpoint, as the hub's quantized checkpoints store them.

    python tools/make_quantized_checkpoint.py SRC_DIR OUT_DIR [--block 128 128] [--mtp]   # block FP8
    python tools/make_quantized_checkpoint.py SRC_DIR OUT_DIR --format mxfp4              # gpt-oss MXFP4
    python tools/make_quantized_checkpoint.py SRC_DIR OUT_DIR --format compressed-tensors --strategy channel
    python tools/make_quantized_checkpoint.py SRC_DIR OUT_DIR --format fbgemm_fp8         # Llama-3.1-405B-FP8's

fp8 (DeepSeek-V3's format): every 2D `*proj*.weight` of the decoder blocks (attention, MLA's low-rank
projections, experts, shared experts, dense MLPs; not routers, norms, embeddings or the head) becomes
`weight` float8_e4m3fn and `weight_scale_inv` float32 [ceil(out/bo), ceil(in/bi)], with
s = amax(|block|) / 448 and q = W / s rounded to e4m3 (partial blocks at ragged edges included).
`--mtp` appends a multi-token-prediction layer after the last block (`model.layers.{num_hidden_layers}`:
a copy of the last block plus `enorm`, `hnorm`, `eh_proj` and `shared_head.norm`, and
`num_nextn_predict_layers: 1`), as DeepSeek-V3's checkpoints carry one.

mxfp4 (gpt-oss's format): every fused expert tensor `*.experts.gate_up_proj` / `*.experts.down_proj`
([experts, in, out]) becomes `*_blocks` uint8 [experts, out, in/32, 16] and `*_scales` uint8
[experts, out, in/32]: per 32 inputs a power of two 2^(s - 127) with s - 127 = floor(log2(amax)) - 2
(the OCP MX rule), values rounded to the nearest e2m1 and clamped to +-6, two a byte, low nibble first.

compressed-tensors (llm-compressor's FP8 output; `--strategy tensor|channel|group|block`, `--group`, `--block`):
the same 2D weights become `weight` float8_e4m3fn and `weight_scale` in the weight's dtype, of shape [1],
[out, 1], [out, in/g] or [ceil(out/bo), ceil(in/bi)], with s = amax(|part|) / 448 as compressed-tensors'
minmax parameters are; the tensor strategy's static activations add an `input_scale` [1] per weight, as
the hub's `-FP8` checkpoints store them. tools/compare_compressed_tensors.py checks the reader against
compressed-tensors' own files.

fbgemm_fp8 (Meta's row-wise FP8): the 2D weights but attention's become `weight` float8_e4m3fn and
`weight_scale` float32 [out, 1]; fused Llama 4 experts ([experts, in, out]) get one scale per expert and
output column, `gate_up_proj_scale` [experts, 1, out] and `down_proj_scale` [experts, out, 1], as
transformers' FbgemmFp8Llama4TextExperts holds them.

`--per-expert` first splits fused experts in transformers' in-memory layout (`*.experts.gate_up_proj`
[experts, 2*inter, hidden], `*.experts.down_proj` [experts, hidden, inter], as tools/make_synthetic_model.py
writes MoE models) into the hub's per-expert `experts.{e}.gate_proj/up_proj/down_proj.weight` (the
Qwen-MoE, DeepSeek-V3 and GLM-4.5 layout).

config.json gains the format's quantization_config. For tests and benchmarks: one tensor in memory at
a time, the weights are whatever the source holds.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from wanda_stream.storage.checkpoint import INDEX_NAME, Checkpoint, atomic_write_json, write_shard
from wanda_stream.errors import InputError
from wanda_stream.storage.outputs import side_files
from wanda_stream.storage.quant import E2M1, MX_GROUP

E4M3_MAX = 448.0
FBGEMM_SKIP = ["model.layers.*.self_attn", "lm_head"]
QUANT_CONFIGS = {
    "fp8": lambda a: {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                      "weight_block_size": list(a.block)},
    "mxfp4": lambda a: {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    "compressed-tensors": lambda a: compressed_tensors_config(a.strategy, a.group, a.block),
    "fbgemm_fp8": lambda a: {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                             "modules_to_not_convert": FBGEMM_SKIP},
}
STRATEGIES = ("tensor", "channel", "group", "block")


def compressed_tensors_config(strategy: str, group: int, block: tuple[int, int]) -> dict:
    """quantization_config as compressed-tensors 0.20 writes it for one FP8 scheme over every Linear but the head."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
           "strategy": strategy}
    if strategy == "group":
        fp8["group_size"] = group
    if strategy == "block":
        fp8["block_structure"] = list(block)
    acts = dict(fp8, strategy="tensor", group_size=None) if strategy == "tensor" else \
        {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "group_size": None, "strategy": "token"}
    acts.pop("block_structure", None)
    return {"config_groups": {"group_0": {"format": "float-quantized", "input_activations": acts,
                                          "output_activations": None, "targets": ["Linear"], "weights": fp8}},
            "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": "0.20.1"}


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale_inv float32) with W ~ fp32(q) * s[i // bo, j // bi]."""
    bo, bi = block
    out, inp = w.shape
    rows, cols = math.ceil(out / bo), math.ceil(inp / bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32)
    padded[:out, :inp] = w.float()
    tiles = padded.view(rows, bo, cols, bi)
    scale = (tiles.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).view(rows * bo, cols * bi)[:out, :inp]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of a fused [experts, in, out] tensor, stored [experts, out, in/32, 16] and [.., in/32].

    One expert at a time: the nearest-value search takes 8 float32 copies of what it quantizes (34 GB for
    gpt-oss-120b's whole `gate_up_proj`, 0.5 GB for one expert's)."""
    if w.dim() > 2:
        parts = [quantize_mxfp4(e) for e in w]
        return torch.stack([b for b, _ in parts]), torch.stack([s for _, s in parts])
    t = w.float().transpose(-1, -2)
    *lead, rows, inp = t.shape
    groups = t.reshape(*lead, rows, inp // MX_GROUP, MX_GROUP)
    amax = groups.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - 2, torch.zeros_like(amax))
    exp = exp.clamp(-127, 127)
    scaled = (groups / torch.ldexp(torch.ones_like(exp), exp.int()).unsqueeze(-1)).clamp(-6.0, 6.0)
    mags = torch.tensor(E2M1[:8])
    code = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # the nearest magnitude, ties low
    code = code + 8 * (scaled < 0).to(code.dtype)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def quantize_fp8_scaled(w: torch.Tensor, strategy: str, group: int, block: tuple[int, int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale in w's dtype) for compressed-tensors' strategies: one scale per tensor, row,
    row x group of inputs, or block (ragged edge blocks keep their own)."""
    rows, cols = w.shape
    tile = {"tensor": (rows, cols), "channel": (1, cols), "group": (1, group), "block": block}[strategy]
    if strategy == "group" and cols % group:
        raise InputError(f"--group {group} does not divide an input width of {cols}")
    scale = quantize_fp8_block(w, tile)[1].to(w.dtype)  # as compressed-tensors stores it; q from the stored scale
    q = (w.float() / _expand(scale.float(), tile, w.shape)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), (scale.reshape(1) if strategy == "tensor" else scale).contiguous()


def _expand(scale: torch.Tensor, tile: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    return scale.repeat_interleave(tile[0], 0)[: shape[0]].repeat_interleave(tile[1], 1)[:, : shape[1]]


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM's row-wise FP8: a [out, in] matrix with float32 scales [out, 1]; fused experts [E, in, out] with
    one scale per expert and output column, [E, 1, out] (transformers' gate_up_proj_scale)."""
    if w.dim() == 3:
        t = w.float().transpose(1, 2)  # [E, out, in]: a row per output column
        scale = (t.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        q = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).transpose(1, 2)
        return q.contiguous(), scale.transpose(1, 2).contiguous()
    scale = (w.float().abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def fbgemm_quantizable(key: str, shape: tuple[int, ...]) -> bool:
    """The tensors FBGEMM's FP8 quantizes here: 2D projection weights but attention's, and fused Llama 4 experts."""
    if ".self_attn." in key:
        return False
    return quantizable(key, shape) or (".experts." in key and key.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")
                                       and len(shape) == 3)


def mxfp4_quantizable(key: str, shape: tuple[int, ...]) -> bool:
    """gpt-oss's MXFP4 tensors: the fused experts' weights (not their biases)."""
    return ".experts." in key and key.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") and len(shape) == 3


def quantizable(key: str, shape: tuple[int, ...]) -> bool:
    """The tensors DeepSeek-V3 stores in FP8: 2D projection weights of the decoder layers."""
    module, _, leaf = key.rpartition(".")
    return ".layers." in key and leaf == "weight" and len(shape) == 2 and "proj" in module.rpartition(".")[2]


def per_expert(key: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A fused in-memory expert tensor as the hub's per-expert tensors; None for any other tensor."""
    holder, _, leaf = key.rpartition(".")
    if not holder.endswith(".experts") or t.dim() != 3 or leaf not in ("gate_up_proj", "down_proj"):
        return None
    if leaf == "down_proj":
        return {f"{holder}.{e}.down_proj.weight": t[e].contiguous() for e in range(t.shape[0])}
    gate, up = t.chunk(2, dim=1)
    out = {f"{holder}.{e}.gate_proj.weight": gate[e].contiguous() for e in range(t.shape[0])}
    out.update({f"{holder}.{e}.up_proj.weight": up[e].contiguous() for e in range(t.shape[0])})
    return out


def mtp_tensors(ckpt: Checkpoint, n_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    """A multi-token-prediction layer after the last block: that block's tensors and MTP's own."""
    last, mtp = f"model.layers.{n_layers - 1}.", f"model.layers.{n_layers}."
    g = torch.Generator().manual_seed(1)
    out = {mtp + k[len(last):]: ckpt.get(k) for k in ckpt.keys() if k.startswith(last)}
    dtype = next(iter(out.values())).dtype
    out[mtp + "eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=g) * 0.05).to(dtype)
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        out[mtp + name] = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return out


def quantize_one(key: str, t: torch.Tensor, a: argparse.Namespace) -> dict[str, torch.Tensor] | None:
    """The stored tensors of one float tensor in format `a.format`; None when it stays as it is."""
    shape = tuple(t.shape)
    if a.format == "fp8" and quantizable(key, shape):
        q, s = quantize_fp8_block(t, a.block)
        return {key: q, key + "_scale_inv": s}
    if a.format == "mxfp4" and mxfp4_quantizable(key, shape):
        b, s = quantize_mxfp4(t)
        return {key + "_blocks": b, key + "_scales": s}
    if a.format == "compressed-tensors" and quantizable(key, shape):
        q, s = quantize_fp8_scaled(t, a.strategy, a.group, a.block)
        extra = {key.removesuffix("weight") + "input_scale": torch.tensor([0.02], dtype=t.dtype)} \
            if a.strategy == "tensor" else {}
        return {key: q, key + "_scale": s, **extra}
    if a.format == "fbgemm_fp8" and fbgemm_quantizable(key, shape):
        q, s = quantize_fp8_rows(t)
        if key.endswith("down_proj") and t.dim() == 3:
            s = s.transpose(1, 2).contiguous()  # [E, out, 1], as transformers' down_proj_scale
        return {key: q, key + "_scale": s}
    return None


def convert(src: Path, dst: Path, a: argparse.Namespace) -> dict[str, int]:
    """Write the quantized checkpoint; returns counts of quantized and copied tensors."""
    fmt, mtp, split = a.format, a.mtp, a.per_expert
    ckpt = Checkpoint(src)
    config = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=False)
    groups: dict[str, dict[str, torch.Tensor | None]] = {}
    for key in ckpt.keys():
        groups.setdefault(ckpt.tensors[key].file, {})[key] = None  # read when its shard is written
    if mtp:
        groups["model-mtp.safetensors"] = dict(mtp_tensors(ckpt, config["num_hidden_layers"], config["hidden_size"]))
    weight_map: dict[str, str] = {}
    counts = {"quantized": 0, "copied": 0}
    for fname, keys in groups.items():
        tensors: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        for key, t in keys.items():
            t = ckpt.get(key) if t is None else t
            parts.update((split and per_expert(key, t)) or {key: t})
        for key, t in parts.items():
            stored = quantize_one(key, t, a)
            tensors.update(stored or {key: t})
            counts["quantized" if stored else "copied"] += 1
        write_shard(dst / fname, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], tensors.__getitem__)
        weight_map.update(dict.fromkeys(tensors, fname))
    total = sum((dst / f).stat().st_size for f in set(weight_map.values()))
    atomic_write_json(dst / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for name in side_files(src):
        if name != "config.json":
            shutil.copy(src / name, dst / name)
    config["quantization_config"] = QUANT_CONFIGS[fmt](a)
    if mtp:
        config["num_nextn_predict_layers"] = 1
    atomic_write_json(dst / "config.json", config)
    return counts


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, convert, print a JSON summary; exit 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="a float safetensors checkpoint directory")
    p.add_argument("out", type=Path, help="a new directory")
    p.add_argument("--format", choices=tuple(QUANT_CONFIGS), default="fp8",
                   help="fp8 (block FP8), mxfp4, compressed-tensors (FP8) or fbgemm_fp8")
    p.add_argument("--block", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"),
                   help="weight_block_size, or compressed-tensors' block_structure (default 128 128, DeepSeek-V3's)")
    p.add_argument("--strategy", choices=STRATEGIES, default="channel",
                   help="compressed-tensors' weight strategy (default channel, the FP8-dynamic scheme's)")
    p.add_argument("--group", type=int, default=128, help="compressed-tensors' group_size (the group strategy)")
    p.add_argument("--per-expert", action="store_true",
                   help="split fused in-memory experts into the hub's per-expert tensors first")
    p.add_argument("--mtp", action="store_true", help="append a multi-token-prediction layer after the last block")
    a = p.parse_args(argv)
    try:
        a.block = (a.block[0], a.block[1])
        counts = convert(a.src, a.out, a)
    except (InputError, FileExistsError) as e:
        print(f"make_quantized_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
