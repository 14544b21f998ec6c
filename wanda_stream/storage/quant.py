"""Quantized checkpoints in: which stored tensors make up each float tensor, and the dequantization.

These formats are read, as the checkpoints on the hub store them:

- **Block FP8** (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8: `quantization_config.quant_method == "fp8"` with a
  `weight_block_size`): `X.weight` float8_e4m3fn with `X.weight_scale_inv` float32 of shape
  [ceil(out/bo), ceil(in/bi)]; W[i, j] = fp32(q[i, j]) * s[i // bo, j // bi]. Matrices whose sides
  are not multiples of the block (DeepSeek's 576-wide `kv_a_proj_with_mqa`) use the last, partial
  block's scale.
- **compressed-tensors FP8** (llm-compressor's output, `quant_method == "compressed-tensors"` with the
  `float-quantized` format: the hub's `*-FP8`, `*-FP8-dynamic` and `*-FP8-block` checkpoints):
  `X.weight` float8 with `X.weight_scale` of shape [1] (strategy `tensor`), [out, 1] (`channel`),
  [out, ceil(in/g)] (`group`) or [ceil(out/bo), ceil(in/bi)] (`block`): each the same tiling rule as
  block FP8, with blocks of out x in, 1 x in, 1 x g or bo x bi. The activations' and the KV cache's
  scales (`input_scale`, `k_scale`, ...) mean nothing to a float model and are not presented.
- **FBGEMM row-wise FP8** (Meta's Llama-3.1-405B-FP8: `quant_method == "fbgemm_fp8"`): `X.weight` float8
  with `X.weight_scale` [out, 1]; fused Llama 4 experts `E.gate_up_proj` [experts, in, out] with
  `E.gate_up_proj_scale` [experts, 1, out] and `E.down_proj` with `E.down_proj_scale` [experts, out, 1]:
  one scale per expert and output column.
- **MXFP4** (gpt-oss: `quant_method == "mxfp4"`): `X_blocks` uint8 [..., out, G, 16] (two e2m1 values a
  byte, low nibble first) and `X_scales` uint8 [..., out, G] (a power of two, 2^(s - 127), per 32
  values), stored [out, in]; the float tensor `X` is [..., in, out], the layout transformers loads it in.

Everything here is pure: the plan is made from tensor names, dtypes and shapes, and the functions take
tensors in and give tensors out. `Checkpoint` uses them to present float tensors only.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from wanda_stream.errors import InputError

FP8_SCALE = "_scale_inv"  # block FP8's scale, after its weight's key
SCALE = "_scale"  # compressed-tensors' and FBGEMM's
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
MX_GROUP = 32  # values per MXFP4 scale
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_DEQUANT_DTYPE = torch.bfloat16
# The 16 e2m1 values, by nibble (sign bit 3, two exponent bits, one mantissa bit).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Stored:
    """What a stored tensor is: its dtype and shape (from the shard header)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Source:
    """How one float tensor of the checkpoint is made: `kind` is "plain", "fp8" (a matrix whose scale tiles it
    in `block`s of rows x cols), "fp8_experts" (experts [E, in, out], a scale per expert and output column)
    or "mxfp4"; `keys` the stored tensors it is read from (the value first, then its scales); `dtype` and
    `shape` what it comes out as."""

    kind: str
    keys: tuple[str, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    block: tuple[int, int] | None = None


def dequant_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """W = fp32(q) * s[i // bo, j // bi] (float32), for any [out, in] shape, ragged sides included."""
    bo, bi = block
    out, inp = q.shape
    if tuple(scale_inv.shape) != (math.ceil(out / bo), math.ceil(inp / bi)):
        raise ValueError(f"scale {list(scale_inv.shape)} does not tile a {[out, inp]} matrix in {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, dim=0)[:out]
    if bi < inp:  # a whole row's scale broadcasts; narrower blocks are spelled out
        s = s.repeat_interleave(bi, dim=1)[:, :inp]
    return q.float().mul_(s)


def dequant_fp8_experts(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fused experts [E, in, out] with one scale per expert and output column, stored [E, 1, out] or
    [E, out, 1] (FBGEMM's gate_up_proj and down_proj): W[e, i, o] = fp32(q[e, i, o]) * s[e, o] (float32)."""
    experts, _, out = q.shape
    if scale.numel() != experts * out:
        raise ValueError(f"scale {list(scale.shape)} is not one per expert and output column of {list(q.shape)}")
    return q.float().mul_(scale.float().reshape(experts, 1, out))


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [..., out, G, 16] and scales [..., out, G] as float32 [..., in, out] (in = 32 G)."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != MX_GROUP // 2:
        raise ValueError(f"blocks {list(blocks.shape)} and scales {list(scales.shape)} are not MXFP4 pairs")
    lut = torch.tensor(E2M1, dtype=torch.float32)
    b = blocks.to(torch.int64)
    vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # low nibble first
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return vals.flatten(-2).transpose(-1, -2).contiguous()


def _not_converted(key: str, patterns: Sequence[str]) -> bool:
    """Whether `key` lies in one of quantization_config's modules_to_not_convert (names or globs)."""
    module = key.rpartition(".")[0]
    return any(module == p or module.startswith(p + ".") or fnmatch.fnmatchcase(module, p)
               or fnmatch.fnmatchcase(module, p + ".*") for p in patterns)


def _method(qc: Mapping[str, object] | None) -> str | None:
    return None if not qc else str(qc.get("quant_method", "")).lower() or None


METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8", "mxfp4")
# compressed-tensors' quantization parameters of activations and of the KV cache: a float model has no use
# for them (the weights' own scales are folded into the weights).
ACTIVATION_PARAMS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point",
                     "q_scale", "k_scale", "v_scale")


def plan(stored: Mapping[str, Stored], qc: Mapping[str, object] | None, where: str,
         save_dtype: torch.dtype | None) -> dict[str, Source]:
    """The float tensors a checkpoint presents, each with the stored tensors it is made of.

    `qc`: config.json's quantization_config (None for a float checkpoint); `where` names the file in
    errors. Dequantized tensors come out in `save_dtype` (bfloat16 when None); the others keep their
    stored dtype, or `save_dtype` when given and they are floating point.
    """
    method = _method(qc)
    if method not in (None, *METHODS):
        raise InputError(f"{where}: quantization_config.quant_method '{method}' is not supported (block FP8, "
                         "compressed-tensors FP8, FBGEMM FP8 and MXFP4 are); pass a float checkpoint or one of those")
    skip = list((qc or {}).get("modules_to_not_convert") or [])
    out_dtype = save_dtype or DEFAULT_DEQUANT_DTYPE
    block = _fp8_block(qc, where) if method == "fp8" else None
    tilings = _scaled_tilings(method, qc or {}, where)
    used: set[str] = set()
    out: dict[str, Source] = {}
    for key in sorted(stored):  # a weight sorts before its scale ("X.weight" < "X.weight_scale")
        info = stored[key]
        if key in used:
            continue
        fp8 = info.dtype in FP8_DTYPES and not _not_converted(key, skip)
        if method == "fp8" and fp8:
            scale = key + FP8_SCALE
            if scale not in stored:
                raise InputError(f"{where}: float8 tensor '{key}' has no '{scale}'; the checkpoint is incomplete")
            _check_fp8(key, info, stored[scale], block, where)
            out[key] = Source("fp8", (key, scale), out_dtype, info.shape, block)
            used.add(scale)
        elif tilings and fp8:
            scale = key + SCALE
            if scale not in stored:
                raise InputError(f"{where}: float8 tensor '{key}' has no '{scale}'; the checkpoint is incomplete")
            out[key] = _scaled_source(key, info, stored[scale], tilings, out_dtype, where)
            used.add(scale)
        elif method == "mxfp4" and key.endswith(MX_BLOCKS) and not _not_converted(key, skip):
            name = key[: -len(MX_BLOCKS)]
            scales = name + MX_SCALES
            if scales not in stored:
                raise InputError(f"{where}: MXFP4 tensor '{key}' has no '{scales}'; the checkpoint is incomplete")
            shape = _check_mxfp4(key, info, stored[scales], where)
            out[name] = Source("mxfp4", (key, scales), out_dtype, shape)
            used.add(scales)
        elif method == "compressed-tensors" and key.rpartition(".")[2] in ACTIVATION_PARAMS:
            continue
        else:
            _check_plain(key, info, method, where)
            dtype = save_dtype if save_dtype is not None and info.dtype.is_floating_point else info.dtype
            out[key] = Source("plain", (key,), dtype, info.shape)
    return out


def _check_plain(key: str, info: Stored, method: str | None, where: str) -> None:
    """A tensor presented as stored is not a quantized one the config does not describe."""
    if info.dtype in FP8_DTYPES:
        raise InputError(f"{where}: tensor '{key}' is float8 but quantization_config does not say how it is "
                         "scaled; pass a checkpoint whose config.json carries its quantization_config")
    if method == "compressed-tensors" and key.endswith(".weight" + SCALE):
        raise InputError(f"{where}: '{key}' scales a weight that is not float8 (quantization_status is not "
                         "'compressed', or the format is not FP8); pass a compressed FP8 checkpoint or a float one")


# A scaled FP8 tiling: how a matrix of a given [out, in] is cut into the blocks that share one scale.
Tiling = tuple[str, int, int]  # (strategy, rows, cols); rows and cols 0 for "the whole side"


def _scaled_tilings(method: str | None, qc: Mapping[str, object], where: str) -> list[Tiling]:
    """The weight tilings compressed-tensors' config groups (or FBGEMM's row-wise rule) allow, in order."""
    if method == "fbgemm_fp8":
        return [("channel", 1, 0)]
    if method != "compressed-tensors":
        return []
    name = "quantization_config"
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, Mapping) and sparsity.get("format") not in (None, "dense"):
        raise InputError(f"{where}: {name}.sparsity_config format '{sparsity.get('format')}' is not supported; "
                         "pass a dense (not sparse-compressed) checkpoint")
    if qc.get("transform_config"):
        raise InputError(f"{where}: {name}.transform_config (rotations) is not supported; pass a checkpoint "
                         "without transforms")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise InputError(f"{where}: {name} of compressed-tensors has no config_groups; the config.json is incomplete")
    tilings: list[Tiling] = []
    for group, scheme in groups.items():
        weights = scheme.get("weights") if isinstance(scheme, Mapping) else None
        if weights is None:
            continue  # activations only: the weights are stored as floats
        fmt = scheme.get("format") or qc.get("format")
        if (fmt not in ("float-quantized", "naive-quantized") or weights.get("type") != "float"
                or weights.get("num_bits") != 8):
            raise InputError(f"{where}: {name}.config_groups.{group} stores {weights.get('num_bits')}-bit "
                             f"{weights.get('type')} weights as '{fmt}'; of compressed-tensors only FP8 weights "
                             "(float-quantized) are read; pass an FP8 or a float checkpoint")
        if weights.get("symmetric") is False:
            raise InputError(f"{where}: {name}.config_groups.{group} is asymmetric (zero points); only "
                             "symmetric FP8 is read")
        tilings.append(_tiling(f"{where}: {name}.config_groups.{group}.weights", weights))
    return tilings


def _tiling(where: str, weights: Mapping[str, object]) -> Tiling:
    strategy = weights.get("strategy")
    if strategy == "tensor":
        return ("tensor", 0, 0)
    if strategy == "channel":
        return ("channel", 1, 0)
    if strategy == "group":
        g = weights.get("group_size")
        if isinstance(g, int) and g > 0:
            return ("group", 1, g)
    elif strategy == "block":
        b = weights.get("block_structure")
        if isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b):
            return ("block", int(b[0]), int(b[1]))
    else:
        raise InputError(f"{where}: strategy '{strategy}' is not supported (tensor, channel, group and block are)")
    raise InputError(f"{where}: strategy '{strategy}' without a valid {'group_size' if strategy == 'group' else 'block_structure'}")


def _scaled_source(key: str, q: Stored, s: Stored, tilings: list[Tiling], dtype: torch.dtype,
                   where: str) -> Source:
    """The source of a float8 weight with a `_scale`: the first tiling its scale's shape fits."""
    keys = (key, key + SCALE)
    if s.dtype.is_floating_point and len(q.shape) == 3:  # FBGEMM's fused experts [E, in, out]
        experts, _, cols = q.shape
        if tuple(s.shape) in ((experts, 1, cols), (experts, cols, 1)):
            return Source("fp8_experts", keys, dtype, q.shape)
    if s.dtype.is_floating_point and len(q.shape) == 2:
        rows, cols = q.shape
        for _, bo, bi in tilings:
            block = (bo or rows, bi or cols)
            want = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            if tuple(s.shape) == want or (want == (1, 1) and math.prod(s.shape) == 1):
                return Source("fp8", keys, dtype, q.shape, block)
    names = ", ".join(t[0] if not t[1] * t[2] else f"{t[0]} {t[1]}x{t[2]}" for t in tilings)
    raise InputError(f"{where}: '{key}' {list(q.shape)} and its scale {list(s.shape)} ({str(s.dtype)[6:]}) fit none "
                     f"of the quantization_config's weight tilings ({names}); the weights and config.json disagree")


def _fp8_block(qc: Mapping[str, object] | None, where: str) -> tuple[int, int]:
    block = (qc or {}).get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise InputError(f"{where}: quantization_config fp8 without a weight_block_size [rows, cols]; "
                         "only block FP8 checkpoints are supported")
    return int(block[0]), int(block[1])


def _check_fp8(key: str, q: Stored, s: Stored, block: tuple[int, int] | None, where: str) -> None:
    assert block is not None
    want = tuple(math.ceil(n / b) for n, b in zip(q.shape, block))
    if len(q.shape) != 2 or tuple(s.shape) != want or not s.dtype.is_floating_point:
        raise InputError(f"{where}: '{key}' {list(q.shape)} and its scale {list(s.shape)} do not form "
                         f"{block[0]}x{block[1]} block FP8 (expected a float scale of shape {list(want)})")


def _check_mxfp4(key: str, b: Stored, s: Stored, where: str) -> tuple[int, ...]:
    if (b.dtype != torch.uint8 or s.dtype != torch.uint8 or len(b.shape) < 3 or b.shape[-1] != MX_GROUP // 2
            or tuple(b.shape[:-1]) != tuple(s.shape)):
        raise InputError(f"{where}: '{key}' {list(b.shape)} and its scales {list(s.shape)} are not MXFP4 "
                         "(uint8 [..., out, groups, 16] and uint8 [..., out, groups])")
    *lead, rows, groups, _ = b.shape
    return (*lead, groups * MX_GROUP, rows)


def dequantize(src: Source, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float tensor `src` describes, from its stored tensors `parts` (read in `src.keys` order), before the
    cast to `src.dtype` (the caller casts, into page-locked memory where it wants it, without a second copy).

    `parts` may be the same rows of every part along its first dimension when that is the experts' of an
    MXFP4 tensor (a group of fused experts): each expert's values and scales dequantize on their own.
    """
    if src.kind == "plain":
        return parts[0]
    if src.kind == "fp8":
        assert src.block is not None
        q, (bo, bi) = parts[0], src.block
        return dequant_fp8_block(q, parts[1].reshape(math.ceil(q.shape[0] / bo), math.ceil(q.shape[1] / bi)), src.block)
    if src.kind == "fp8_experts":
        return dequant_fp8_experts(parts[0], parts[1])
    return dequant_mxfp4(parts[0], parts[1])


def output_config(config: dict, dequantized: bool, save_dtype: torch.dtype | None) -> dict:
    """config.json of the output: without quantization_config once its tensors are float, dtype updated."""
    out = dict(config)
    if dequantized:
        out.pop("quantization_config", None)
    if dequantized or save_dtype is not None:
        name = str(save_dtype or DEFAULT_DEQUANT_DTYPE).removeprefix("torch.")
        for field in ("dtype", "torch_dtype"):
            if field in out or field == "dtype":
                out[field] = name
    return out
