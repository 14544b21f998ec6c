"""What a 2:4 output buys at inference: the matmul time of a model's pruned linears (and one decoder
block's forward), dense against torch.sparse.to_sparse_semi_structured, on one CUDA card.

    python tools/bench_2of4.py                        # llama-2-7b shape, 2048 tokens, bf16 and fp16
    python tools/bench_2of4.py --preset llama-3-8b --tokens 16 --json out.json

Every linear of the block (q, k, v, o, gate, up, down) gets random weights pruned 2:4 by magnitude
(the same kernel as `--method magnitude --pattern 2:4`); x [tokens, in] @ W^T is timed dense (cuBLAS)
and semi-structured sparse, with each backend torch has: CUTLASS, and cuSPARSELt where it is built in.
The sparse result is checked against the dense one before it is timed. Times are CUDA-event medians
over --iters calls after --warmup. Needs a CUDA card of compute capability 8.0 or newer; on a CPU it
says so and exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wanda_stream.methods.kernel import nm_mask, satisfies_nm
from wanda_stream.storage.synthetic import PRESETS, load_spec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NEEDS_CUDA = ("bench_2of4: needs a CUDA device of compute capability 8.0 or newer (semi-structured sparse "
              "matmuls run on cuSPARSELt/CUTLASS GPU kernels); none is visible here, nothing was measured")


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    """`w` with the 2 smallest-magnitude of every 4 consecutive inputs of each row set to zero."""
    return w.masked_fill(nm_mask(w.detach().float().abs(), (2, 4)), 0)


def linear_shapes(config: object) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear of one decoder block of a Llama-like config."""
    c = config.get_text_config()  # type: ignore[attr-defined]
    h, inter = c.hidden_size, c.intermediate_size
    head = getattr(c, "head_dim", None) or h // c.num_attention_heads
    kv = c.num_key_value_heads * head
    return {"q_proj": (c.num_attention_heads * head, h), "k_proj": (kv, h), "v_proj": (kv, h),
            "o_proj": (h, c.num_attention_heads * head), "gate_proj": (inter, h), "up_proj": (inter, h),
            "down_proj": (h, inter)}


def cuda_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of one call of `fn` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def backends() -> list[str]:
    """The semi-structured backends this torch has: CUTLASS always, cuSPARSELt when built in."""
    out = ["cutlass"]
    if torch.backends.cusparselt.is_available():
        out.append("cusparselt")
    return out


def to_sparse(w: torch.Tensor, backend: str) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    return to_sparse_semi_structured(w)


def bench_linears(config: object, tokens: int, dtype: torch.dtype, warmup: int, iters: int) -> list[dict]:
    """One row per linear and backend: dense and sparse ms, speedup, and the sparse result's error."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (out_f, in_f) in linear_shapes(config).items():
        w = prune_2of4(torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=g) * 0.02)
        assert satisfies_nm(w, (2, 4))
        x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, generator=g)
        dense = torch.nn.functional.linear(x, w)
        dense_ms = cuda_ms(lambda: torch.nn.functional.linear(x, w), warmup, iters)
        for backend in backends():
            ws = to_sparse(w, backend)
            err = (torch.nn.functional.linear(x, ws).float() - dense.float()).abs().max().item()
            scale = dense.float().abs().max().item()
            sparse_ms = cuda_ms(lambda: torch.nn.functional.linear(x, ws), warmup, iters)
            rows.append({"what": name, "shape": [out_f, in_f], "backend": backend, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "max_rel_err": err / scale})
    return rows


def bench_block(config: object, tokens: int, dtype: torch.dtype, warmup: int, iters: int) -> list[dict]:
    """One decoder block's forward (batch 1, `tokens` positions, causal attention): dense 2:4-pruned
    weights against the same weights semi-structured, per backend."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    c = config.get_text_config()  # type: ignore[attr-defined]
    c._attn_implementation = "sdpa"  # what inference runs: flash/memory-efficient causal attention
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = LlamaDecoderLayer(c, layer_idx=0).to(dtype).eval()
        rope = LlamaRotaryEmbedding(c)
        x = torch.randn(1, tokens, c.hidden_size, dtype=dtype)
        pos = torch.arange(tokens)[None]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        for m in linears.values():
            m.weight.copy_(prune_2of4(m.weight))
        emb = rope(x, pos)
        run = lambda: layer(x, position_embeddings=emb)  # noqa: E731
        dense_out = run()
        dense_ms = cuda_ms(run, warmup, iters)
        dense_weights = {n: m.weight for n, m in linears.items()}
        rows = []
        for backend in backends():
            for n, m in linears.items():
                m.weight = nn.Parameter(to_sparse(dense_weights[n], backend), requires_grad=False)
            err = (run().float() - dense_out.float()).abs().max().item() / dense_out.float().abs().max().item()
            rows.append({"what": "decoder block", "shape": [tokens, c.hidden_size], "backend": backend,
                         "dense_ms": dense_ms, "sparse_ms": cuda_ms(run, warmup, iters), "max_rel_err": err})
            rows[-1]["speedup"] = dense_ms / rows[-1]["sparse_ms"]
            for n, m in linears.items():
                m.weight = nn.Parameter(dense_weights[n], requires_grad=False)
    return rows


def table(results: dict) -> str:
    lines = [f"2:4 semi-structured vs dense, {results['preset']}, {results['tokens']} tokens, "
             f"{results['device']}, {results['date']}, torch {results['torch']}",
             "| dtype | matmul | shape (out x in) | backend | dense ms | 2:4 ms | speedup | max rel err |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['dtype']} | {r['what']} | {r['shape'][0]} x {r['shape'][1]} | {r['backend']} | "
                     f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=2048, help="rows of x (one 2048-token window by default)")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-block", action="store_true", help="the linears only, not the decoder block's forward")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NEEDS_CUDA, file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"bench_2of4: {torch.cuda.get_device_name()} has compute capability {major}.{minor}; semi-structured "
              "sparse matmuls need 8.0 or newer, nothing was measured", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"bench_2of4: --dtypes {','.join(bad)}: use bfloat16 and/or float16", file=sys.stderr)
        return 2
    config = load_spec(a.preset)
    rows = []
    for name in dtypes:
        found = bench_linears(config, a.tokens, DTYPES[name], a.warmup, a.iters)
        if not a.no_block:
            found += bench_block(config, a.tokens, DTYPES[name], a.warmup, a.iters)
        rows += [{"dtype": name, **r} for r in found]
    results = {"preset": a.preset, "tokens": a.tokens, "device": torch.cuda.get_device_name(),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
               "rows": rows}
    print(table(results))
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
