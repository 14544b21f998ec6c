#!/usr/bin/env python3
"""Cross-check the reader's compressed-tensors FP8 against the peer's own: compressed-tensors writes, transformers
decompresses, wanda-stream's Checkpoint reads the same files.

Per weight strategy (tensor, channel, group, block; llm-compressor's FP8, FP8_DYNAMIC and FP8_BLOCK schemes and
the group one), the script:

1. loads a float checkpoint (`--model DIR`; default a 2-block random Llama whose sides, 200 and 320, are not
   multiples of 128, written to the work directory) in bfloat16;
2. quantizes it with compressed-tensors itself: `apply_quantization_config` over every Linear but the head, the
   weights' scales from their min and max (`calculate_qparams`, what llm-compressor's minmax observer feeds it),
   a static input scale for the tensor strategy (so `input_scale` tensors are stored, as in the hub's `-FP8`
   checkpoints), then `ModelCompressor.compress_model`, `save_pretrained` and `update_config`: the files and the
   config.json are the peer's;
3. decompresses those files with stock transformers (`CompressedTensorsConfig(dequantize=True)`);
4. reads them with `wanda_stream.storage.checkpoint.Checkpoint` and compares every tensor, bit for bit, and the
   key sets (ours drops the activations' scales, as the decompressed model does).

Not part of the test suite and not run in CI: it needs compressed-tensors, which transformers would otherwise use
when the project's tests load a model. Install it apart and put it on the path:

    .venv/bin/pip install --target /tmp/ct --no-deps compressed-tensors loguru
    PYTHONPATH=/tmp/ct HF_HUB_OFFLINE=1 .venv/bin/python tools/compare_compressed_tensors.py [--model DIR]

It prints one table and exits 1 when any tensor differs. The recorded results are in docs/peer_comparison.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wanda_stream.storage.checkpoint import Checkpoint  # noqa: E402

STRATEGIES = {
    "tensor": {"strategy": "tensor"},
    "channel": {"strategy": "channel"},
    "group": {"strategy": "group", "group_size": 40},  # --group-size
    "block": {"strategy": "block", "block_structure": [128, 128]},
}


def tiny_llama(path: Path) -> Path:
    """A random 2-block Llama with sides that do not divide into 128 (ragged blocks; groups must divide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=200, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=40, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def min_max(w: torch.Tensor, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The extremes each scale covers, shaped as compressed-tensors' weight_scale for the strategy."""
    w = w.float()
    kind = weights["strategy"]
    if kind == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if kind == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if kind == "group":
        g = weights["group_size"]
        parts = w.view(w.shape[0], -1, g)  # compressed-tensors requires g to divide the inputs
        return parts.amin(-1), parts.amax(-1)
    bo, bi = weights["block_structure"]
    rows, cols = math.ceil(w.shape[0] / bo) * bo, math.ceil(w.shape[1] / bi) * bi
    big = torch.full((rows, cols), math.nan)
    big[: w.shape[0], : w.shape[1]] = w
    tiles = big.view(rows // bo, bo, cols // bi, bi)
    return (tiles.nan_to_num(math.inf).amin((1, 3)), tiles.nan_to_num(-math.inf).amax((1, 3)))


def quantize(src: Path, dst: Path, name: str) -> None:
    """The peer's FP8 checkpoint of `src`, in `dst`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, **STRATEGIES[name]}
    acts = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
            if name == "tensor" else {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                      "dynamic": True})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**acts))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        lo, hi = min_max(module.weight.detach(), weights)
        scale, _ = calculate_qparams(lo, hi, module.quantization_scheme.weights)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.01 + 0.01 * torch.rand((), generator=g).item())
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(str(dst))


def compare(path: Path) -> dict[str, object]:
    """Peer (transformers decompressing) against ours (Checkpoint), tensor by tensor."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    t0 = time.perf_counter()
    peer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs = {k: v.detach() for k, v in peer.state_dict().items()}
    ckpt = Checkpoint(path)
    ours = {k: ckpt.get(k) for k in ckpt.keys()}
    fp8 = sum(s.kind == "fp8" for s in ckpt.sources.values())
    stored = sum(len(s.keys) for s in ckpt.sources.values())
    dropped = len(ckpt.stored) - stored
    differ = [k for k in ours if k not in theirs or ours[k].dtype != theirs[k].dtype
              or not torch.equal(ours[k], theirs[k])]
    shared = {theirs[k].data_ptr() for k in ours if k in theirs}
    missing = sorted(k for k in set(theirs) - set(ours) if theirs[k].data_ptr() not in shared)  # tied: not stored
    worst = max((float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours
                 if k in theirs and ours[k].shape == theirs[k].shape), default=0.0)
    return {"tensors": len(ours), "fp8": fp8, "dropped": dropped, "differ": differ, "missing": missing,
            "max_abs_diff": worst, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    """Quantize, decompress, read, compare; print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a float checkpoint (default: a random tiny Llama)")
    p.add_argument("--work", type=Path, default=None, help="where the quantized copies go (default: a temp dir)")
    p.add_argument("--group-size", type=int, default=40,
                   help="inputs per scale of the group strategy; it must divide every input width (64 for SmolLM2)")
    p.add_argument("--strategies", nargs="+", choices=tuple(STRATEGIES), default=list(STRATEGIES))
    a = p.parse_args(argv)
    STRATEGIES["group"]["group_size"] = a.group_size
    import compressed_tensors
    import transformers

    work = a.work or Path(tempfile.mkdtemp(prefix="ct-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    src = a.model or tiny_llama(work / "float")
    print(f"{time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}; "
          f"model {src}")
    print("| strategy | tensors read | FP8 weights | activation scales dropped | differ | missing | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    bad = 0
    for name in a.strategies:
        dst = work / f"fp8-{name}"
        if not dst.exists():
            quantize(src, dst, name)
        r = compare(dst)
        bad += len(r["differ"]) + len(r["missing"])  # type: ignore[arg-type]
        print(f"| {name} | {r['tensors']} | {r['fp8']} | {r['dropped']} | {len(r['differ'])} | {len(r['missing'])} "
              f"| {r['max_abs_diff']:.3g} |")
        for k in list(r["differ"])[:5] + list(r["missing"])[:5]:  # type: ignore[arg-type]
            print(f"  {name}: {k}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
