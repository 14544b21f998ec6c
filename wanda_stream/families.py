"""The family table, kept free of torch so `wanda-stream --help` can list it without importing a model stack."""

from __future__ import annotations

# The family table: every model_type tests/test_families.py runs (streamed dense forward equals
# transformers' logits; streamed prune equals an in-memory reference), and what it exercises there.
# No family needs code of its own in transformers 5: the parts are discovered from the model and the
# checkpoint layout comes from transformers' conversion mapping (layout.py). A family that ever needs
# a special case gets it here, not as a condition elsewhere.
FAMILIES: dict[str, str] = {
    "llama": "grouped-query attention, rotary, untied head",
    "mistral": "sliding-window attention mask",
    "qwen2": "q/k/v biases, tied embeddings",
    "qwen3": "q/k norms",
    "gemma2": "scaled embedding, (1+w) norms, attention and final logit softcapping, sliding layers",
    "gemma3_text": "per-layer sliding/full attention types, local rotary, scaled embedding",
    "phi3": "fused qkv_proj and gate_up_proj linears",
    "olmo2": "post-norms, q/k norms",
    "gpt_neox": "gpt_neox.layers, fused query_key_value, partial rotary, embed_out renamed to lm_head",
    "opt": "decoder nesting (model.decoder), learned positions, project_in/project_out, post-norm",
    "mixtral": "MoE: per-expert w1/w2/w3 on disk fused into gate_up_proj/down_proj, router never pruned",
    "qwen2_moe": "MoE with shared expert; shared_expert_gate and router never pruned; dense-MLP layers mixed in",
    "qwen3_moe": "MoE: per-expert gate/up/down on disk, q/k norms",
    "deepseek_v3": "MLA (q/kv LoRA, 576-wide kv_a_proj_with_mqa at full size), dense first blocks, sigmoid "
                   "group-limited router with e_score_correction_bias, shared expert; MTP layer copied",
    "glm4_moe": "MoE with shared expert, sigmoid router with e_score_correction_bias, dense first block, "
                "q/k norms, partial rotary, qkv biases; MTP layer copied",
    "qwen3_next": "hybrid gated-DeltaNet linear attention (its conv kernel is not pruned) and gated full "
                  "attention, MoE with shared expert",
    "gpt_oss": "fused [experts, in, out] experts on disk (bf16) or MXFP4, interleaved gate/up, expert biases, "
               "attention sinks, sliding/full layer_types",
    "llama4_text": "fused [experts, in, out] experts on disk, sigmoid-scaled expert inputs, shared expert, "
                   "interleaved MoE and dense blocks, chunked attention, q/k norms",
}
TESTED_FAMILIES = tuple(FAMILIES)
# Families whose fused experts are [experts, in, out] (x @ W[e]) although their experts module does not say
# so (transformers marks the others with use_experts_implementation(is_transposed=...)).
EXPERTS_IN_OUT = ("llama4_text",)
