"""Quantized checkpoints in: which stored tensors make up each float tensor, and the dequantization.

Two formats are read, as the checkpoints on the hub store them:

- **Block FP8** (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8: `quantization_config.quant_method == "fp8"` with a
  `weight_block_size`): `X.weight` float8_e4m3fn with `X.weight_scale_inv` float32 of shape
  [ceil(out/bo), ceil(in/bi)]; W[i, j] = fp32(q[i, j]) * s[i // bo, j // bi]. Matrices whose sides
  are not multiples of the block (DeepSeek's 576-wide `kv_a_proj_with_mqa`) use the last, partial
  block's scale.
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

FP8_SCALE = "_scale_inv"
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
    """How one float tensor of the checkpoint is made: `kind` is "plain", "fp8" or "mxfp4"; `keys` the stored
    tensors it is read from (the value first, then its scales); `dtype` and `shape` what it comes out as."""

    kind: str
    keys: tuple[str, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]


def dequant_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """W = fp32(q) * s[i // bo, j // bi] (float32), for any [out, in] shape, ragged sides included."""
    bo, bi = block
    out, inp = q.shape
    if tuple(scale_inv.shape) != (math.ceil(out / bo), math.ceil(inp / bi)):
        raise ValueError(f"scale {list(scale_inv.shape)} does not tile a {[out, inp]} matrix in {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, dim=0)[:out].repeat_interleave(bi, dim=1)[:, :inp]
    return q.float().mul_(s)


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


def plan(stored: Mapping[str, Stored], qc: Mapping[str, object] | None, where: str,
         save_dtype: torch.dtype | None) -> dict[str, Source]:
    """The float tensors a checkpoint presents, each with the stored tensors it is made of.

    `qc`: config.json's quantization_config (None for a float checkpoint); `where` names the file in
    errors. Dequantized tensors come out in `save_dtype` (bfloat16 when None); the others keep their
    stored dtype, or `save_dtype` when given and they are floating point.
    """
    method = _method(qc)
    if method not in (None, "fp8", "mxfp4"):
        raise InputError(f"{where}: quantization_config.quant_method '{method}' is not supported "
                         "(block FP8 and MXFP4 are); pass a float checkpoint or one of those")
    skip = list((qc or {}).get("modules_to_not_convert") or [])
    out_dtype = save_dtype or DEFAULT_DEQUANT_DTYPE
    used: set[str] = set()
    out: dict[str, Source] = {}
    block = _fp8_block(qc, where) if method == "fp8" else None
    for key in sorted(stored):
        info = stored[key]
        if key in used:
            continue
        if method == "fp8" and info.dtype in FP8_DTYPES and not _not_converted(key, skip):
            scale = key + FP8_SCALE
            if scale not in stored:
                raise InputError(f"{where}: float8 tensor '{key}' has no '{scale}'; the checkpoint is incomplete")
            _check_fp8(key, info, stored[scale], block, where)
            out[key] = Source("fp8", (key, scale), out_dtype, info.shape)
            used.add(scale)
        elif method == "mxfp4" and key.endswith(MX_BLOCKS) and not _not_converted(key, skip):
            name = key[: -len(MX_BLOCKS)]
            scales = name + MX_SCALES
            if scales not in stored:
                raise InputError(f"{where}: MXFP4 tensor '{key}' has no '{scales}'; the checkpoint is incomplete")
            shape = _check_mxfp4(key, info, stored[scales], where)
            out[name] = Source("mxfp4", (key, scales), out_dtype, shape)
            used.add(scales)
        else:
            if info.dtype in FP8_DTYPES:
                raise InputError(f"{where}: tensor '{key}' is float8 but not block-quantized with a scale; "
                                 "only block FP8 (weight + weight_scale_inv) is supported")
            dtype = save_dtype if save_dtype is not None and info.dtype.is_floating_point else info.dtype
            out[key] = Source("plain", (key,), dtype, info.shape)
    for key in used:
        out.pop(key, None)  # a scale sorted before its weight was taken as plain
    return out


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


def dequantize(src: Source, parts: Sequence[torch.Tensor], qc: Mapping[str, object] | None) -> torch.Tensor:
    """The float tensor `src` describes, from its stored tensors `parts` (read in `src.keys` order), before the
    cast to `src.dtype` (the caller casts, into page-locked memory where it wants it, without a second copy).

    `parts` may be the same rows of every part along its first dimension when that is the experts' of an
    MXFP4 tensor (a group of fused experts): each expert's values and scales dequantize on their own.
    """
    if src.kind == "plain":
        return parts[0]
    if src.kind == "fp8":
        return dequant_fp8_block(parts[0], parts[1], _fp8_block(qc, ""))
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
