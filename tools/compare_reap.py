#!/usr/bin/env python3
"""Cross-check wanda-stream's `--drop-experts R` (REAP) against a peer implementation: llm-compressor's
`REAPPruningModifier` (0.14.0.1).

Not part of the test suite and not run in CI: it needs a second virtual environment with `llmcompressor`
(kept apart from the project's because llmcompressor pins its own transformers range). A CPU-minute or two
per family on the tiny checkpoints it builds. Results: docs/peer_comparison.md, section "REAP".

What it does, per family (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GLM-4.5 by default):

1. **Checkpoint.** A tiny random MoE model (3 decoder blocks, 8 routed experts, top-2, hidden 64, float32)
   made with transformers `from_config` and `save_pretrained(max_shard_size="40KB")` (several shards, the
   hub's per-expert layout), with a byte-level BPE tokenizer. Mixtral's router rows 1..4 are v, -v, u, -u
   and row 7 is zero, so expert 7 is never in a token's top 2 (logit 0 against |v.x| and |u.x| > 0): the
   never-routed rule is exercised. Qwen2-MoE has a shared expert and block 1 dense (`mlp_only_layers`);
   DeepSeek-V3 has block 0 dense, a shared expert, 2 expert groups with 1 reachable per token, sigmoid
   scores with a (random) `e_score_correction_bias` and `routed_scaling_factor` 2.5; GLM-4.5 is the same
   router with one group.
2. **Our side.** ``wanda-stream prune SRC OUT --drop-experts R --keep-work-dir --calib pydoc --nsamples N
   --seqlen L --device cpu``. The windows it drew (``OUT/.wanda-stream/tokens.safetensors``, key ``calib``)
   are the single source of calibration data for both sides. Our saliencies, kept experts and routed token
   counts come from ``OUT/wanda_stream.json`` (``blocks[i].structure.experts[<module>]``).
3. **Peer side.** This same file, run by the llmcompressor venv's interpreter (``peer`` subcommand; imports
   nothing from wanda_stream), loads SRC with transformers, wraps exactly those windows in a plain
   ``DataLoader`` (batch 1, sequential, no padding) and calls ``llmcompressor.oneshot`` with
   ``REAPPruningModifier(sparsity=R)``, ``pipeline="sequential"`` over the decoder-layer class,
   ``propagate_error=True`` and ``moe_calibrate_all_experts=False`` (the modifier's own advice; with
   ``True`` every expert also runs on unrouted tokens, which REAP then ignores). Wrapping, not copying:
   ``REAPSaliencyTracker.update`` (to log the order of calibration and pruning per layer) and
   ``REAPSaliencyTracker.compute_retained_experts`` (to record each layer's mean saliency, routed count
   and retained list when it decides). It writes the normalized tensors of the model before and after
   (router rows, stacked expert matrices, every other tensor by name), its config, and
   ``save_pretrained`` output (as oneshot leaves the model, and after llm-compressor's ``repack_moe``).
   It runs twice: ``peer/`` with an explicit 4-D causal ``attention_mask`` in every batch (the compared
   run, see "Attention mask" below) and ``peer_default/`` with ``input_ids`` only, as a user would.
4. **Oracle** for the first MoE block, whose inputs are the same on both sides: the dense source model in
   the project's transformers, each routed expert's output computed by hand from the fused weights in
   float64; once with transformers' causal attention, once with bidirectional attention (eager, no mask).
5. **Comparison** per MoE block: kept experts; each side's selection against the rule applied to its own
   saliencies; saliencies (relative difference; ours are the report's 6 significant digits); routed token
   counts (exact); router rows and expert matrices (each side against the source sliced by its kept
   indices, bit for bit, and ours against the peer's); every other tensor untouched; the config's expert
   count; the peer's checkpoint loaded in the project's transformers, and both outputs' logits on the
   calibration windows.

Semantic differences between llm-compressor 0.14.0.1 (modifiers/pruning/reap/{base,utils}.py,
modeling/moe/linear_experts.py) and the paper / wanda-stream, and what the script does about each:

* **Saliency.** Same formula: S_j = sum over routed (token, slot) pairs of g_j(x) * ||f_j(x)||_2 over
  their count, in float64; g = the ``top_k_weights`` the MoE block passes to its experts module (after
  the model's top-k, normalisation and ``routed_scaling_factor``). The peer takes ||f_j|| of the
  per-expert ``ExpertMLP`` output in float32 and multiplies by g (float64); we take the norm of
  transformers' own ``experts(x, index[:, k:k+1], weight[:, k:k+1])`` output, i.e. ||g f|| (= g ||f||
  for g >= 0, which every router here guarantees), in float64. Last-bit differences only.
* **Never-routed experts.** Both score 0 (the peer divides by ``count.clamp(min=1)``): they go first.
* **Ties.** The peer drops ``torch.topk(saliency, n, largest=False)``: no defined order among equal
  saliencies; we drop the higher index first. Only exact ties at the boundary can be decided
  differently; the script accepts a differing selection only where every differing expert's saliency
  equals the boundary value on both sides (or lies within the saliency drift of it, later blocks).
* **Groups.** The peer drops ``round(int(E * R) / n_group)`` per group and, when that does not split
  evenly, silently changes the total (a warning); we refuse such a ratio before any work. Equal for
  the ratios that split evenly (all tested here).
* **Order.** Both sequential: the peer's sequential pipeline calibrates one decoder layer on all
  batches, prunes it at ``SEQUENTIAL_EPOCH_END``, then (``propagate_error=True``) runs the pruned layer
  to make the next layer's inputs. The script checks that order from the peer's event log. Block 0's
  inputs are the same on both sides; later blocks' inputs differ by forward numerics only (eager
  attention, batch 1 on the peer; SDPA, micro-batches here), so later saliencies differ in the last bits.
* **Attention mask (a peer bug).** Fed ``input_ids`` only, llm-compressor 0.14.0.1 (with transformers
  5.17) calibrates Mixtral and Qwen3-MoE with *bidirectional* attention: the traced first subgraph
  calls ``create_causal_mask(config=<a config rebuilt as a constant from its fields>, ...)``; the rebuilt
  config has no ``_attn_implementation``, so the mask takes SDPA's "is_causal" shortcut and is ``None``,
  while the decoder layers run with the eager attention that ``calibration_forward_context`` forces, and
  eager attention with a ``None`` mask masks nothing. (Qwen2-MoE's traced code builds the mask inside an
  autowrapped call that reads the live config; it, DeepSeek-V3 and GLM-4.5 are causal.) The first MoE block of
  ``peer_default/`` is checked to equal the bidirectional or the causal oracle. Neutralized in ``peer/``
  by an explicit additive causal mask ``[1, 1, L, L]``, which transformers passes through unchanged.
* **Saved config (a peer bug).** ``save_pretrained`` rewrites config.json from the original file through
  ``resave_config``, which updates only the keys ``num_experts``/``num_local_experts``/``moe_num_experts``
  found in it: DeepSeek-V3 and GLM-4.5 files count with ``n_routed_experts``, which keeps the old number,
  and the checkpoint does not load. The script notes it and loads the peer's checkpoint with the
  in-memory count.
* **Saved layout.** As oneshot leaves it, the model holds linearized experts and ``save_pretrained`` writes
  ``experts.{j}.{gate,up,down}_proj`` keys: stock transformers maps them for Qwen-MoE/DeepSeek/GLM but not
  for Mixtral (hub keys ``w1/w2/w3``). After llm-compressor's ``repack_moe`` every family loads.
* **What is written.** Both slice the router rows (and bias, ``e_score_correction_bias``) and keep the
  experts in ascending order renumbered 0..E'-1; shared experts and dense blocks are untouched. The peer
  rewrites the config's count under the first of ``num_experts``/``num_local_experts``/``moe_num_experts``
  that the config object answers to (through ``attribute_map``, so ``num_local_experts`` ->
  ``n_routed_experts`` for DeepSeek-V3/GLM); we rewrite the key config.json uses. The peer leaves
  ``num_nextn_predict_layers`` and MTP weights as they are (none in these checkpoints); we drop MTP
  layers when the structure changes.

The run exits 1 on any disagreement not explained above.

Usage (from the repository root; the project venv runs the orchestrator, the llmcompressor venv the
peer side)::

    python3 -m venv /work/venv-llmc
    /work/venv-llmc/bin/pip install torch==2.13.0 && /work/venv-llmc/bin/pip install llmcompressor==0.14.0.1
    HF_HUB_OFFLINE=1 .venv/bin/python tools/compare_reap.py --workdir /tmp/reap-peer \\
        --llmc-python /work/venv-llmc/bin/python

Runs are reused from ``--workdir`` (checkpoint, our output, the peer's when finished); the comparison is
recomputed every time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
DEFAULT_FAMILIES = "mixtral,qwen2_moe,qwen3_moe,deepseek_v3,glm4_moe"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
ROUTER_ATTRS = ("gate", "router")


# ============================================================================================
# Shared by both sides (imports only torch): a transformers model's tensors in one normalized form.
# ============================================================================================

def moe_blocks(model: Any) -> dict[str, tuple[Any, Any]]:
    """The model's MoE blocks by module name: (router, experts module). A block is a module holding an
    `experts` child and a `gate`/`router` child, the rule of both implementations."""
    from torch import nn

    out = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "experts", None), nn.Module):
            for r in ROUTER_ATTRS:
                if isinstance(getattr(mod, r, None), nn.Module):
                    out[name] = (getattr(mod, r), mod.experts)
                    break
    return out


def expert_matrices(experts: Any, hidden: int) -> dict[str, Any]:
    """Every expert's gate [E, I, H], up [E, I, H] and down [E, H, I] weights, stacked in module order.

    Fused (transformers' `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I], or transposed) or
    linearized (llm-compressor's ModuleList of per-expert gate/up/down Linears)."""
    import torch

    if hasattr(experts, "gate_up_proj"):
        gu, d = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if gu.shape[1] == hidden and gu.shape[2] != hidden:  # [E, H, 2I]: transposed layout
            gu, d = gu.transpose(1, 2), d.transpose(1, 2)
        i = gu.shape[1] // 2
        return {"gate": gu[:, :i], "up": gu[:, i:], "down": d}
    kids = [c for c in experts.children() if hasattr(c, "down_proj")]
    return {w: torch.stack([getattr(c, f"{w}_proj").weight.detach() for c in kids]) for w in ("gate", "up", "down")}


def normalized_tensors(model: Any) -> dict[str, Any]:
    """`router/<block>/<tensor>`, `experts/<block>/{gate,up,down}` and `other/<state-dict key>` for the
    rest (float32, contiguous, CPU): one form for a fused and a linearized model."""
    import torch

    hidden = model.config.get_text_config().hidden_size
    out: dict[str, Any] = {}
    skip: list[str] = []
    for name, (router, experts) in moe_blocks(model).items():
        rname = next(r for r in ROUTER_ATTRS if getattr(model.get_submodule(name), r, None) is router)
        for t in ("weight", "bias", "e_score_correction_bias"):
            v = getattr(router, t, None)
            if isinstance(v, torch.Tensor):
                out[f"router/{name}/{t}"] = v.detach()
        block = model.get_submodule(name)
        if isinstance(getattr(block, "e_score_correction_bias", None), torch.Tensor):
            out[f"router/{name}/block_e_score_correction_bias"] = block.e_score_correction_bias.detach()
        for w, v in expert_matrices(experts, hidden).items():
            out[f"experts/{name}/{w}"] = v
        skip += [f"{name}.experts.", f"{name}.{rname}.", f"{name}.e_score_correction_bias"]
    for k, v in model.state_dict().items():
        if not any(k.startswith(s) for s in skip):
            out[f"other/{k}"] = v.detach()
    return {k: v.to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def tensor_sha256(t: Any) -> str:
    """SHA-256 of a token tensor's int64 bytes: proves both sides calibrated on the same windows."""
    import hashlib

    import torch

    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ============================================================================================
# Peer side: runs inside the llmcompressor venv. Imports nothing from wanda_stream.
# ============================================================================================

def run_peer(model_dir: Path, tokens_file: Path, ratio: float, out_dir: Path, mask: str = "causal") -> None:
    """Prune `model_dir` with llm-compressor's REAPPruningModifier on the windows in `tokens_file`.

    `mask`: "none" feeds `input_ids` only, as a user would (llm-compressor 0.14.0.1 then calibrates with
    bidirectional attention, see the module docstring); "causal" adds an explicit additive 4-D causal
    `attention_mask` [1, 1, L, L] (0 on and below the diagonal, float32 min above) to every batch, which
    transformers passes through unchanged to the (forced eager) attention.

    Writes to `out_dir`: `peer_result.json` (versions, settings, per layer the mean saliency, routed count,
    sums and retained experts as llm-compressor decided them, the event log, the config after),
    `tensors_before.safetensors` / `tensors_after.safetensors` (normalized_tensors) and `ckpt/`
    (`save_pretrained` of the pruned model).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader, Dataset, SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import REAPPruningModifier
    from llmcompressor.modifiers.pruning.reap import utils as reap_utils

    calib = load_file(str(tokens_file))["calib"].to(torch.long)
    nsamples, seqlen = calib.shape

    class Windows(Dataset):
        """Our calibration windows, one sample each, exactly `seqlen` tokens."""

        def __len__(self) -> int:
            return nsamples

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": calib[i]}

    causal = torch.full((1, 1, seqlen, seqlen), torch.finfo(torch.float32).min).triu(1)

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": torch.stack([it["input_ids"] for it in items])}
        if mask == "causal":
            batch["attention_mask"] = causal.expand(len(items), -1, -1, -1).clone()
        return batch

    loader = DataLoader(Windows(), batch_size=1, sampler=SequentialSampler(range(nsamples)), collate_fn=collate)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(normalized_tensors(model), str(out_dir / "tensors_before.safetensors"))
    layer_cls = type(model.model.layers[0]).__name__

    modifier = REAPPruningModifier(sparsity=ratio)
    tracker_cls = reap_utils.REAPSaliencyTracker
    events: list[list[Any]] = []
    decisions: dict[str, dict[str, Any]] = {}

    def layer_of(tracker: Any) -> str:
        return next((n for n, t in modifier._saliency_trackers.items() if t is tracker), "?")

    orig_update, orig_decide = tracker_cls.update, tracker_cls.compute_retained_experts

    def update(self: Any, topk_indices: Any, topk_weights: Any, norms: dict) -> Any:
        events.append(["update", layer_of(self), int(topk_indices.shape[0])])
        return orig_update(self, topk_indices, topk_weights, norms)

    def decide(self: Any, *args: Any, **kwargs: Any) -> Any:
        retained = orig_decide(self, *args, **kwargs)
        name = layer_of(self)
        events.append(["prune", name])
        decisions[name] = {"saliency": self.mean_saliency.tolist(),
                           "count": self.count.to(torch.float64).cpu().tolist(),
                           "sum": self.sum_saliency.to(torch.float64).cpu().tolist(),
                           "retained": [int(i) for i in retained.tolist()]}
        return retained

    settings = dict(pipeline="sequential", sequential_targets=[layer_cls], propagate_error=True, batch_size=1,
                    num_calibration_samples=nsamples, shuffle_calibration_samples=False, max_seq_length=seqlen,
                    pad_to_max_length=False, moe_calibrate_all_experts=False)
    tracker_cls.update, tracker_cls.compute_retained_experts = update, decide
    t0 = time.monotonic()
    try:
        model = oneshot(model=model, processor=tokenizer, dataset=loader, recipe=[modifier], **settings)
    finally:
        tracker_cls.update, tracker_cls.compute_retained_experts = orig_update, orig_decide
    seconds = time.monotonic() - t0

    save_file(normalized_tensors(model), str(out_dir / "tensors_after.safetensors"))
    # As oneshot leaves it (linearized per-expert Linears), then after llm-compressor's own explicit
    # repack into transformers' fused experts, its documented step before save_pretrained.
    from llmcompressor.modeling.moe.linearize import repack_moe

    save_error = None
    for sub in ("ckpt_linear", "ckpt"):
        try:
            if sub == "ckpt":
                model = repack_moe(model)
            model.save_pretrained(str(out_dir / sub))
            tokenizer.save_pretrained(str(out_dir / sub))
        except Exception as e:  # recorded, judged by the orchestrator
            save_error = f"{sub}: {type(e).__name__}: {e}"
            break

    import compressed_tensors
    import transformers
    info = {
        "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "compressed_tensors": compressed_tensors.__version__},
        "ratio": ratio, "mask": mask, "nsamples": nsamples, "seqlen": seqlen, "tokens_sha256": tensor_sha256(calib),
        "oneshot": settings, "decisions": decisions, "events": events, "config": model.config.to_dict(),
        "save_error": save_error, "seconds": round(seconds, 1),
    }
    (out_dir / "peer_result.json").write_text(json.dumps(info, indent=1))


# ============================================================================================
# Orchestrator and comparison: run with the project venv's interpreter.
# ============================================================================================

def family_config(family: str) -> Any:
    """The tiny config of `family`: 3 blocks, 8 routed experts, top-2, hidden 64."""
    import transformers as tf

    dense = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    moe = dict(num_experts_per_tok=2)
    if family == "mixtral":
        return tf.MixtralConfig(**dict(dense, intermediate_size=32), num_local_experts=8, **moe)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**dense, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                                 mlp_only_layers=[1], **moe)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**dense, head_dim=16, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True,
                                 **moe)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**dict(dense, num_key_value_heads=4), moe_intermediate_size=32, n_shared_experts=1,
                                   n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1,
                                   kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
                                   qk_nope_head_dim=16, routed_scaling_factor=2.5, **moe)
    if family == "glm4_moe":
        return tf.Glm4MoeConfig(**dense, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=1,
                                topk_group=1, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, **moe)
    raise SystemExit(f"unknown family {family!r}")


def make_checkpoint(family: str, out: Path) -> None:
    """A tiny random checkpoint of `family` in 40KB shards with a byte-level BPE tokenizer.

    Norm weights 1 + 0.1 N(0,1), other 1-D parameters (biases) 0.02 N(0,1), fused expert tensors 0.05 N(0,1) (transformers' 0.02 init
    gives near-identical experts), router rows N(0, 1/H), e_score_correction_bias 0.01 N(0,1). Mixtral: router rows 2 = -row 1, 4 = -row 3,
    7 = 0, so expert 7 is never among a token's top 2.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from wanda_stream.storage.synthetic import build_tokenizer  # the tokenizer only; nothing compared

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                # Norm weights near 1; biases small: q/k/v biases near 1 would make every token's attention
                # output the same vector and send all tokens to the same experts (Qwen2-MoE, GLM-4.5).
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
            elif p.dim() == 3:
                p.copy_(torch.randn_like(p) * 0.05)
        for name, (router, _) in moe_blocks(model).items():
            # Router rows N(0, 1/H): logits of order 1, so that tokens spread over the experts (with the
            # 0.02 init nearly all go to the same few, and the selection is decided among never-routed ties).
            router.weight.copy_(torch.randn_like(router.weight) / router.weight.shape[1] ** 0.5)
            if isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor):
                router.e_score_correction_bias.copy_(0.01 * torch.randn_like(router.e_score_correction_bias))
            if family == "mixtral":
                w = router.weight
                w[2], w[4], w[7] = -w[1], -w[3], 0.0
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="40KB")
    build_tokenizer(tmp, model.config.vocab_size)
    tmp.rename(out)


def run_cmd(cmd: list[str], log: Path) -> float:
    """Run `cmd` in the repository root with its output appended to `log`; the wall seconds. SystemExit with
    the log's tail on failure."""
    print("+ " + " ".join(cmd), flush=True)
    # No PYTHONPATH: `-m wanda_stream` in the repository root is this checkout's; the peer sees none of it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n+ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc != 0:
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return time.monotonic() - t0


def load_normalized(ckpt: Path, config: Any = None) -> tuple[Any, dict[str, Any], Any]:
    """(model, normalized tensors, loading info) of a checkpoint, in this venv's transformers (`config`
    instead of the checkpoint's own when given)."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"config": config} if config is not None else {}
    model, info = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, output_loading_info=True,
                                                       **extra)
    return model.eval(), normalized_tensors(model), info


def first_block_oracle(src: Path, tokens: Any, causal: bool) -> tuple[str, list[float], list[int]]:
    """REAP's saliencies and routed counts of the first MoE block of the dense source model, by hand.

    Its inputs are the same for both sides (every block before it is dense and untouched). transformers runs
    the model window by window (causal: its own SDPA mask; else eager attention with no mask, i.e.
    bidirectional); a hook on the block's experts module takes (x, top-k index, top-k weights) and computes
    each routed expert's output from the fused weights, f = down (silu(gate x) * up x), in float64, then
    S_j = sum g ||f|| / count. Returns (block name, saliencies, counts).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32,
                                                 attn_implementation="sdpa" if causal else "eager").eval()
    name, (_, experts) = next(iter(moe_blocks(model).items()))
    if model.config.get_text_config().hidden_act != "silu":
        raise SystemExit(f"{src}: the oracle computes SwiGLU experts only")
    mats = {k: v.double() for k, v in expert_matrices(experts, model.config.get_text_config().hidden_size).items()}
    n = mats["gate"].shape[0]
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)

    def hook(mod: Any, args: tuple, out: Any) -> None:
        x, index, weight = args[0].double(), args[1].long(), args[2].double()
        for j in range(n):
            tok, slot = torch.nonzero(index == j, as_tuple=True)
            h = x[tok]
            f = (torch.nn.functional.silu(h @ mats["gate"][j].T) * (h @ mats["up"][j].T)) @ mats["down"][j].T
            sums[j] += (weight[tok, slot] * torch.linalg.vector_norm(f, dim=-1)).sum()
            counts[j] += tok.numel()

    handles = [experts.register_forward_hook(hook)]
    if not causal:
        for layer in model.model.layers:
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw: (a, dict(kw, attention_mask=None)), with_kwargs=True))
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            model(input_ids=tokens[i:i + 1].long(), use_cache=False)
    for h in handles:
        h.remove()
    sal = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return name, sal.tolist(), counts.tolist()


def block_key(name: str) -> tuple[int, str]:
    """`model.layers.3.mlp` -> (3, "mlp")."""
    rest = name.split("layers.", 1)[1]
    i, _, sub = rest.partition(".")
    return int(i), sub


def rule_drop(saliency: list[float], n_drop: int, groups: int) -> list[int]:
    """The rule written out independently: per contiguous group, the n_drop / groups lowest saliencies,
    on equal saliency the higher index first (ours); ascending."""
    size, per = len(saliency) // groups, n_drop // groups
    out: list[int] = []
    for g in range(groups):
        idx = list(range(g * size, (g + 1) * size))
        out += sorted(idx, key=lambda j: (saliency[j], -j))[:per]
    return sorted(out)


def near_boundary(diff: set[int], sal: list[float], kept: list[int], groups: int, rtol: float) -> bool:
    """Whether every expert in `diff` (kept by one side, dropped by the other) lies within `rtol` (relative) of
    its group's boundary between the kept and dropped saliencies of `sal` (0: exact ties only)."""
    size = len(sal) // groups
    for j in diff:
        g = j // size
        members = range(g * size, (g + 1) * size)
        lo_kept = min(sal[k] for k in members if k in kept)
        hi_drop = max(sal[k] for k in members if k not in kept)
        b = 0.5 * (lo_kept + hi_drop)
        if abs(sal[j] - b) > rtol * max(abs(b), 1e-300) + (0.5 * abs(lo_kept - hi_drop) if rtol == 0 else 0):
            return False
    return True


def rel(a: float, b: float) -> float:
    """|a - b| / |b| (0 when both are 0)."""
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-300)


def compare_family(family: str, src: Path, ours: Path, peer: Path, peer_default: Path | None, ratio: float,
                   block0_rtol: float, later_rtol: float) -> dict[str, Any]:
    """Every per-block and per-model check of one family; `problems` lists the unexplained disagreements.

    `peer` is the peer run with the explicit causal mask (compared in full), `peer_default` the one fed
    input_ids only (its first MoE block is compared with the causal and the bidirectional oracle)."""
    import torch
    from safetensors.torch import load_file

    problems: list[str] = []
    notes: list[str] = []
    report = json.loads((ours / "wanda_stream.json").read_text())
    res = json.loads((peer / "peer_result.json").read_text())
    tokens = load_file(str(ours / ".wanda-stream" / "tokens.safetensors"))["calib"]
    if res["tokens_sha256"] != tensor_sha256(tokens):
        problems.append("the peer calibrated on other windows than ours")

    src_cfg = json.loads((src / "config.json").read_text())
    n_exp = src_cfg.get("num_local_experts", src_cfg.get("num_experts", src_cfg.get("n_routed_experts")))
    groups = int(src_cfg.get("n_group") or 1)
    n_drop = int(n_exp * ratio)

    # Peer event log: each layer calibrated on every batch, then pruned, before the next layer starts.
    order, seen = [], set()
    for ev in res["events"]:
        if ev[0] == "update" and ev[1] in seen:
            problems.append(f"peer: {ev[1]} calibrated after it was pruned")
        if ev[0] == "prune":
            seen.add(ev[1])
            order.append(ev[1])
    batches = {n: sum(1 for e in res["events"] if e[0] == "update" and e[1] == n) for n in order}
    if order != sorted(order, key=lambda n: block_key(n)[0]) or set(batches.values()) != {tokens.shape[0]}:
        problems.append(f"peer not sequential block by block over all batches: order {order}, batches {batches}")

    blocks = []
    default_kept = {}
    if peer_default is not None:
        default_kept = {block_key(k): v["retained"] for k, v in
                        json.loads((peer_default / "peer_result.json").read_text())["decisions"].items()}
    ours_blocks = {b["block"]: b for b in report["blocks"]}
    peer_layers = {block_key(n): d for n, d in res["decisions"].items()}
    our_layers = {(i, mod.removesuffix(".experts")): e
                  for i, b in ours_blocks.items() for mod, e in (b.get("structure") or {}).get("experts", {}).items()}
    if set(peer_layers) != set(our_layers):
        problems.append(f"MoE blocks differ: ours {sorted(our_layers)}, peer {sorted(peer_layers)}")
    diverged = None  # the block after which the two pruned models differ (an explained selection difference)
    for key in sorted(set(peer_layers) & set(our_layers)):
        o, p = our_layers[key], peer_layers[key]
        s_o, s_p = [float(x) for x in o["saliency"]], [float(x) for x in p["saliency"]]
        c_o, c_p = [int(x) for x in o["tokens"]], [int(x) for x in p["count"]]
        kept_o, kept_p = [int(x) for x in o["kept"]], [int(x) for x in p["retained"]]
        rtol = block0_rtol if key[0] == min(our_layers)[0] else later_rtol
        rels = [rel(a, b) for a, b in zip(s_o, s_p)]
        row: dict[str, Any] = {"block": key[0], "module": key[1], "kept_ours": kept_o, "kept_peer": kept_p,
                               "kept_peer_default": default_kept.get(key),
                               "dropped_ours": [j for j in range(n_exp) if j not in kept_o],
                               "max_rel_saliency": max(rels), "tokens_equal": c_o == c_p,
                               "never_routed": [j for j in range(n_exp) if c_p[j] == 0],
                               "saliency_ours": s_o, "saliency_peer": s_p, "tokens_ours": c_o, "tokens_peer": c_p}
        # Each side against the rule on its own saliencies (the peer: any order among exact ties).
        if [j for j in range(n_exp) if j not in kept_o] != rule_drop(s_o, n_drop, groups):
            problems.append(f"block {key[0]}: ours does not drop the {n_drop} lowest of its own saliencies")
        drop_p = sorted(set(range(n_exp)) - set(kept_p))
        if drop_p != rule_drop(s_p, n_drop, groups) and not near_boundary(
                set(drop_p) ^ set(rule_drop(s_p, n_drop, groups)), s_p, kept_p, groups, 0.0):
            problems.append(f"block {key[0]}: peer does not drop the {n_drop} lowest of its own saliencies")
        # After an explained selection difference the two models differ (e.g. a softmax router over other
        # remaining rows), so later blocks' inputs do: their saliencies and counts are reported, not judged.
        judge = problems if diverged is None else notes
        if max(rels) > rtol:
            judge.append(f"block {key[0]}: saliencies differ by {max(rels):.1e} relative (> {rtol:.0e})"
                         + (f", inputs differ since block {diverged}" if diverged is not None else ""))
        if c_o != c_p:
            (notes if key[0] != min(our_layers)[0] else problems).append(
                f"block {key[0]}: routed token counts differ ({sum(abs(a - b) for a, b in zip(c_o, c_p))} routings)")
        if kept_o != kept_p:
            diff = set(kept_o) ^ set(kept_p)
            if near_boundary(diff, s_p, kept_p, groups, 0.0) and near_boundary(diff, s_o, kept_o, groups, 0.0):
                notes.append(f"block {key[0]}: kept differ at an exact saliency tie {sorted(diff)} (tie rule)")
            elif key[0] != min(our_layers)[0] and near_boundary(diff, s_p, kept_p, groups, 2.5 * max(rels)):
                notes.append(f"block {key[0]}: kept differ at a near-tie within the saliency drift {sorted(diff)}")
            elif diverged is not None:
                notes.append(f"block {key[0]}: kept differ, inputs differ since block {diverged}")
            else:
                problems.append(f"block {key[0]}: kept experts differ, ours {kept_o} peer {kept_p}")
            diverged = key[0] if diverged is None else diverged
        blocks.append(row)

    # The first MoE block (identical inputs) against the oracle, causal and bidirectional.
    first = min(our_layers) if our_layers else None
    oracle: dict[str, Any] = {}
    if first is not None:
        for causal in (True, False):
            name, sal, cnt = first_block_oracle(src, tokens, causal)
            oracle["causal" if causal else "bidirectional"] = {"block": name, "saliency": sal, "count": cnt}
        if block_key(oracle["causal"]["block"]) != first:
            problems.append(f"oracle's first MoE block {oracle['causal']['block']} is not ours {first}")
        sides = {"ours": our_layers[first]["saliency"], "peer": peer_layers.get(first, {}).get("saliency")}
        counts = {"ours": our_layers[first]["tokens"], "peer": peer_layers.get(first, {}).get("count")}
        if peer_default is not None:
            d = json.loads((peer_default / "peer_result.json").read_text())["decisions"]
            pd = next((v for k, v in d.items() if block_key(k) == first), None)
            if pd is not None:
                sides["peer_default"], counts["peer_default"] = pd["saliency"], pd["count"]
                oracle["peer_default_kept"] = pd["retained"]
        for side, sal in sides.items():
            if sal is None:
                continue
            for kind in ("causal", "bidirectional"):
                o = oracle[kind]
                oracle[f"{side}_vs_{kind}"] = {
                    "max_rel": max(rel(float(a), b) for a, b in zip(sal, o["saliency"])),
                    "counts_equal": [int(c) for c in counts[side]] == [int(c) for c in o["count"]]}
            match = [k for k in ("causal", "bidirectional") if oracle[f"{side}_vs_{k}"]["max_rel"] <= block0_rtol
                     and oracle[f"{side}_vs_{k}"]["counts_equal"]]
            oracle[f"{side}_attention"] = match[0] if match else "neither"
            # Ours and the peer with the explicit mask must be the causal oracle; the peer fed input_ids only may
            # be either (llm-compressor's traced mask is None for some families), not something else.
            if (match[:1] != ["causal"]) if side != "peer_default" else not match:
                problems.append(f"{side}: first MoE block matches neither the causal nor the bidirectional oracle"
                                if not match else f"{side}: first MoE block is the {match[0]} oracle's, not causal")
        oracle["kept_causal"] = sorted(set(range(n_exp)) - set(rule_drop(oracle["causal"]["saliency"], n_drop, groups)))
        oracle["kept_bidirectional"] = sorted(
            set(range(n_exp)) - set(rule_drop(oracle["bidirectional"]["saliency"], n_drop, groups)))
        if oracle.get("peer_default_attention") == "bidirectional":
            moved = [b for b, k in sorted(default_kept.items()) if k != our_layers[b]["kept"]]
            notes.append(f"the peer fed input_ids only calibrates with bidirectional attention (its first MoE "
                         f"block is the bidirectional oracle's); its kept experts differ from ours in blocks "
                         f"{[b[0] for b in moved] or 'none'}")

    # Tensors: each side equals the source sliced by its own kept experts; everything else untouched.
    _, t_src, _ = load_normalized(src)
    m_ours, t_ours, info_o = load_normalized(ours)
    if any(info_o[k] for k in ("missing_keys", "unexpected_keys")):
        problems.append(f"ours does not load cleanly: {({k: info_o[k] for k in ('missing_keys', 'unexpected_keys')})}")
    p_before = load_file(str(peer / "tensors_before.safetensors"))
    p_after = load_file(str(peer / "tensors_after.safetensors"))
    if set(p_before) != set(t_src) or any(not torch.equal(p_before[k], t_src[k]) for k in t_src):
        problems.append("the two transformers versions read the source checkpoint differently")
    tensors = {"compared": 0, "ours_vs_source": 0, "peer_vs_source": 0, "ours_vs_peer": 0, "max_abs_ours_vs_peer": 0.0}
    kept_of = {(b["block"], b["module"]): (b["kept_ours"], b["kept_peer"]) for b in blocks}
    for side, t in (("ours", t_ours), ("peer", p_after)):
        if set(t) != set(t_src):
            problems.append(f"{side}: tensor set differs from the source: {sorted(set(t) ^ set(t_src))[:6]}")
    for k in sorted(set(t_src) & set(t_ours) & set(p_after)):
        kind, name = k.split("/")[0], k.split("/")[1] if "/" in k else ""
        tensors["compared"] += 1
        want_o = want_p = t_src[k]
        if kind in ("router", "experts"):
            ko, kp = kept_of.get(block_key(name), (None, None))
            if ko is None:
                problems.append(f"{k}: MoE block without a decision")
                continue
            want_o, want_p = t_src[k][torch.tensor(ko)], t_src[k][torch.tensor(kp)]
        if not torch.equal(t_ours[k], want_o):
            tensors["ours_vs_source"] += 1
            problems.append(f"ours: {k} is not the source's (kept slices)")
        if not torch.equal(p_after[k], want_p):
            tensors["peer_vs_source"] += 1
            problems.append(f"peer: {k} is not the source's (kept slices)")
        if t_ours[k].shape == p_after[k].shape:
            d = float((t_ours[k] - p_after[k]).abs().max()) if t_ours[k].numel() else 0.0
            tensors["max_abs_ours_vs_peer"] = max(tensors["max_abs_ours_vs_peer"], d)
            tensors["ours_vs_peer"] += int(d != 0)
        else:
            tensors["ours_vs_peer"] += 1

    # Config: the expert count, and every other key.
    cfg_o = json.loads((ours / "config.json").read_text())
    cfg_p = res["config"]
    count_keys = ("num_local_experts", "num_experts", "n_routed_experts")
    want = n_exp - n_drop
    cfg = {"count_ours": {k: cfg_o[k] for k in count_keys if k in cfg_o},
           "count_peer": {k: cfg_p[k] for k in count_keys if k in cfg_p}}
    for side, c in (("ours", cfg["count_ours"]), ("peer", cfg["count_peer"])):
        if not c or set(c.values()) != {want}:
            problems.append(f"{side}: config expert count {c}, expected {want}")
    ignore = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path", "quantization_config",
              "sparsity_config", "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
              "id2label", "label2id", "problem_type", "tie_word_embeddings", "use_cache"}
    cfg["other_diff"] = sorted(k for k in set(cfg_o) | set(src_cfg) if k not in ignore and k not in count_keys
                               and cfg_o.get(k) != src_cfg.get(k))
    if cfg["other_diff"] == ["num_nextn_predict_layers"] and cfg_o["num_nextn_predict_layers"] == 0:
        # Documented (docs/methods.md): the MTP layer is left out whenever the structure changes; the peer keeps
        # the value (there are no MTP weights in these checkpoints).
        notes.append(f"ours sets num_nextn_predict_layers {src_cfg['num_nextn_predict_layers']} -> 0 (MTP left "
                     f"out, documented); the peer keeps {cfg_p.get('num_nextn_predict_layers')}")
        cfg["other_diff"] = []
    if cfg["other_diff"]:
        problems.append(f"ours: config keys changed besides the count: {cfg['other_diff']}")

    # The peer's checkpoint in the project's transformers, and both outputs' logits on the windows.
    load: dict[str, Any] = {"save_error": res.get("save_error")}
    if res.get("save_error"):
        problems.append(f"peer: save_pretrained failed: {res['save_error']}")
    else:
        try:
            saved = json.loads((peer / "ckpt" / "config.json").read_text())
            load["saved_count"] = {k: saved[k] for k in count_keys if k in saved}
            fix = None
            if set(load["saved_count"].values()) != {want}:
                # llm-compressor's resave_config rewrites only num_experts/num_local_experts/moe_num_experts
                # in the original config.json; a file that counts with n_routed_experts keeps the old number.
                notes.append(f"the peer's saved config.json keeps {load['saved_count']} (in memory "
                             f"{cfg['count_peer']}): its checkpoint does not load as saved; loaded here with the "
                             f"in-memory count")
                from transformers import AutoConfig
                fix = AutoConfig.from_pretrained(str(peer / "ckpt"))
                for k in load["saved_count"]:
                    setattr(fix, k, want)
            m_peer, t_saved, info_p = load_normalized(peer / "ckpt", fix)
            _, _, info_l = load_normalized(peer / "ckpt_linear", fix)
            load["linear_missing"], load["linear_unexpected"] = (sorted(info_l["missing_keys"]),
                                                                 sorted(info_l["unexpected_keys"]))
            if load["linear_missing"] or load["linear_unexpected"]:
                notes.append(f"the peer's save_pretrained without repack_moe writes linearized expert keys that "
                             f"this transformers does not map ({len(load['linear_unexpected'])} unexpected, "
                             f"{len(load['linear_missing'])} missing); after repack_moe it loads cleanly")
            load["missing"], load["unexpected"] = sorted(info_p["missing_keys"]), sorted(info_p["unexpected_keys"])
            load["saved_equals_memory"] = set(t_saved) == set(p_after) and all(
                torch.equal(t_saved[k], p_after[k]) for k in p_after)
            with torch.no_grad():
                lo = m_ours(input_ids=tokens[:4].long()).logits
                lp = m_peer(input_ids=tokens[:4].long()).logits
            load["max_abs_logits"] = float((lo - lp).abs().max()) if lo.shape == lp.shape else float("nan")
            if not load["saved_equals_memory"] or load["missing"] or load["unexpected"]:
                problems.append(f"peer checkpoint does not load as it was in memory: {load}")
            if all(b["kept_ours"] == b["kept_peer"] for b in blocks) and load["max_abs_logits"] != 0.0:
                problems.append(f"same experts kept, yet the logits differ by {load['max_abs_logits']:.1e}")
        except Exception as e:  # a checkpoint that stock transformers cannot load is itself a finding
            load["error"] = f"{type(e).__name__}: {e}"[:500]
            problems.append(f"peer checkpoint does not load in transformers: {load['error']}")
    return {"family": family, "experts": n_exp, "groups": groups, "n_drop": n_drop, "blocks": blocks, "oracle": oracle,
            "tensors": tensors, "config": cfg, "peer_load": load, "problems": problems, "notes": notes,
            "peer_versions": res["versions"], "peer_seconds": res["seconds"], "ours_versions": report.get("versions")}


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def print_tables(results: list[dict[str, Any]], verbose: bool) -> str:
    """Print (and return as markdown) the per-block table, the per-family checks and, verbose, every saliency."""
    fmt = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    rows = []
    for r in results:
        for b in r["blocks"]:
            rows.append([r["family"], b["block"], fmt(b["kept_ours"]), fmt(b["kept_peer"]),
                         "yes" if b["kept_ours"] == b["kept_peer"] else "**no**", fmt(b["never_routed"]) or "-",
                         f"{b['max_rel_saliency']:.1e}", "yes" if b["tokens_equal"] else "no",
                         fmt(b["kept_peer_default"]) if b.get("kept_peer_default") is not None else "-"])
    lines = _table(["family", "block", "kept ours", "kept peer", "same", "never routed", "max rel. saliency diff",
                    "token counts equal", "kept peer default (input_ids only)"], rows)
    lines += ["", "Per family (tensors: normalized router rows, stacked expert matrices and every other tensor; "
              "`!= source` counts tensors that are not the source sliced by that side's own kept experts):", ""]
    rows = []
    for r in results:
        t, c, ld = r["tensors"], r["config"], r["peer_load"]
        rows.append([r["family"], f"{r['experts']} / {r['groups']} / {r['n_drop']}", t["compared"],
                     t["ours_vs_source"], t["peer_vs_source"], t["ours_vs_peer"],
                     json.dumps(c["count_ours"]), json.dumps(c["count_peer"]),
                     ld.get("error") or f"missing {len(ld.get('missing', []))}, unexpected {len(ld.get('unexpected', []))}",
                     f"{ld.get('max_abs_logits', float('nan')):.1e}", len(r["problems"])])
    lines += _table(["family", "experts / groups / dropped", "tensors", "ours != source", "peer != source",
                     "ours != peer", "config ours", "config peer", "peer ckpt in transformers", "max abs logits diff",
                     "problems"], rows)
    lines += ["", "First MoE block (identical inputs on both sides) against the oracle (dense source model in "
              "transformers, experts by hand in float64): max relative saliency difference, token counts equal; "
              "`peer` has the explicit causal mask, `peer default` only input_ids:", ""]
    rows = []
    for r in results:
        o = r.get("oracle") or {}
        cell = lambda k: (f"{o[k]['max_rel']:.1e} / {'yes' if o[k]['counts_equal'] else 'no'}"  # noqa: E731
                          if k in o else "-")
        rows.append([r["family"], cell("ours_vs_causal"), cell("peer_vs_causal"), cell("peer_default_vs_causal"),
                     cell("peer_default_vs_bidirectional"), fmt(o.get("kept_causal", [])),
                     fmt(o.get("peer_default_kept", [])) or "-", fmt(o.get("kept_bidirectional", []))])
    lines += _table(["family", "ours vs causal", "peer vs causal", "peer default vs causal",
                     "peer default vs bidirectional", "kept: causal oracle", "kept: peer default",
                     "kept: bidirectional oracle"], rows)
    if verbose:
        for r in results:
            for b in r["blocks"]:
                lines += ["", f"{r['family']} block {b['block']} ({b['module']}): saliency ours / peer, tokens", ""]
                lines += _table(["expert", "ours", "peer", "rel diff", "tokens ours", "tokens peer"],
                                [[j, f"{a:.6g}", f"{p:.9g}", f"{rel(a, p):.1e}", to, tp] for j, (a, p, to, tp) in
                                 enumerate(zip(b["saliency_ours"], b["saliency_peer"], b["tokens_ours"],
                                               b["tokens_peer"]))])
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point: `peer` (inside the llmcompressor venv) or the whole comparison (default)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        p = argparse.ArgumentParser(prog="compare_reap.py peer")
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--tokens", type=Path, required=True)
        p.add_argument("--ratio", type=float, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--mask", choices=("none", "causal"), default="causal")
        a = p.parse_args(argv[1:])
        run_peer(a.model, a.tokens, a.ratio, a.out, a.mask)
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma-separated (default {DEFAULT_FAMILIES})")
    p.add_argument("--ratio", type=float, default=0.5, help="--drop-experts R / REAPPruningModifier(sparsity=R)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/reap-peer"),
                   help="<family>/{src,ours,peer}, log.txt, results.json (finished runs are reused)")
    p.add_argument("--llmc-python", default="/work/venv-llmc/bin/python",
                   help="interpreter of the venv with llmcompressor installed")
    p.add_argument("--block0-rtol", type=float, default=1e-5,
                   help="largest relative saliency difference in the first MoE block (identical inputs; ours are "
                        "rounded to 6 significant digits in the report)")
    p.add_argument("--later-rtol", type=float, default=1e-4,
                   help="the same for later blocks, whose inputs differ by forward numerics")
    p.add_argument("--no-peer-default", dest="peer_default", action="store_false",
                   help="skip the second peer run fed input_ids only (no explicit causal mask)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    p.add_argument("--verbose", action="store_true", help="also print every expert's saliency and token count")
    a = p.parse_args(argv)

    from safetensors.torch import load_file

    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    results = []
    for family in a.families.split(","):
        src, ours, peer = work / family / "src", work / family / "ours", work / family / "peer"
        if not (src / "config.json").is_file():
            src.parent.mkdir(parents=True, exist_ok=True)
            make_checkpoint(family, src)
        if not (ours / "wanda_stream.json").is_file():
            shutil.rmtree(ours, ignore_errors=True)
            run_cmd([sys.executable, "-m", "wanda_stream", "prune", str(src), str(ours), "--drop-experts",
                     str(a.ratio), "--keep-work-dir", "--calib", "pydoc", "--nsamples", str(a.nsamples), "--seqlen",
                     str(a.seqlen), "--device", "cpu", "--quiet"], log)
        tokens_file = ours / ".wanda-stream" / "tokens.safetensors"
        shape = tuple(load_file(str(tokens_file))["calib"].shape)
        if shape != (a.nsamples, a.seqlen):
            raise SystemExit(f"{tokens_file}: calib windows {shape}, expected {(a.nsamples, a.seqlen)}")
        peer_default = work / family / "peer_default" if a.peer_default else None
        for d, mask in ((peer, "causal"), (peer_default, "none")):
            if d is not None and not (d / "peer_result.json").is_file():
                shutil.rmtree(d, ignore_errors=True)
                run_cmd([a.llmc_python, str(HERE), "peer", "--model", str(src), "--tokens", str(tokens_file),
                         "--ratio", str(a.ratio), "--out", str(d), "--mask", mask], log)
        results.append(compare_family(family, src, ours, peer, peer_default, a.ratio, a.block0_rtol, a.later_rtol))
    text = print_tables(results, a.verbose)
    if results:
        print(f"\npeer versions: {results[0]['peer_versions']}")
        print(f"ours: {results[0]['ours_versions']}")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if a.markdown:
        a.markdown.write_text(text + "\n")
    for r in results:
        for n in r["notes"]:
            print(f"NOTE {r['family']}: {n}")
    problems = [f"{r['family']}: {p_}" for r in results for p_ in r["problems"]]
    for p_ in problems[:50]:
        print("PROBLEM " + p_)
    if problems:
        print(f"{len(problems)} unexplained disagreement(s)")
        return 1
    print("REAP agrees: same experts kept in every MoE block, saliencies and token counts equal, same tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
