"""The family table, kept free of torch so `wanda-stream --help` can list it without importing a model stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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


def family_of(config: "PretrainedConfig") -> str:
    """The family of a config: its text model's model_type, so that a multimodal checkpoint (Llama 4's
    `llama4`, its vision tower copied as it is) is its language model's family (`llama4_text`)."""
    return str(config.get_text_config().model_type)
# Families whose fused experts are [experts, in, out] (x @ W[e]) although their experts module does not say
# so (transformers marks the others with use_experts_implementation(is_transposed=...)).
EXPERTS_IN_OUT = ("llama4_text",)


# ---- structured pruning: what a family's blocks are made of ---------------------------------------------
@dataclass(frozen=True)
class Ffn:
    """An MLP whose hidden channels can be removed: the linears that produce them (their output rows), the
    linear that reads them (its input columns; refit), and the config key of their number. `parts` channel
    blocks are stacked in each producer's rows (Phi-3's gate_up_proj holds gate then up: 2)."""

    producers: tuple[str, ...]
    consumer: str
    width_key: str
    parts: int = 1


@dataclass(frozen=True)
class Attention:
    """Attention whose heads can be removed: the q, k, v projections (or one fused `qkv`, rows q | k | v)
    and the output projection that reads the heads (refit). Per-head norms (q_norm over head_dim) are
    untouched; a family whose norms span all heads (OLMo-2) has no entry."""

    o: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""


@dataclass(frozen=True)
class Experts:
    """Routed experts `--drop-experts` can remove: the router's name beside the experts module (its rows go
    with the experts), the config key of their number, and, for group-limited routers, the config keys of
    the number of groups and of the groups a token may reach (experts are dropped evenly per group).

    `stacked`: the experts module is called on every expert's inputs stacked ([experts * tokens, hidden]),
    each token's scaled by its router score (zero rows for the unrouted), and the router returns those
    scores [tokens, experts] first (Llama 4); else it is called as transformers' (hidden states, top-k
    index, top-k weights). Either way its output is only added to the block's output (shared experts and
    residual beside it), so a block too large to hold can run its experts a group at a time
    (`run/expert_groups.py`)."""

    router: str
    count_key: str
    groups_key: str = ""
    reach_key: str = ""
    stacked: bool = False


@dataclass(frozen=True)
class Structure:
    """What `--drop-ffn`, `--drop-heads` and `--drop-experts` may shrink in a family, and how `--drop-blocks`
    keeps its layer kinds: `moe_step` = (the every-k-th-layer key, the key of the list of dense-MLP layer
    indices), made explicit when blocks are removed (a kept block keeps its kind once the indices shift).
    `mtp_key` counts the multi-token-prediction layers stored after the last block (not part of the
    transformers model): they are dropped when the structure changes, as they would no longer match it.
    `layer_lists` are config keys holding lists of block indices (Llama 4's `moe_layers`, the MoE blocks),
    renumbered over the kept blocks when blocks are removed. `dense_first` counts the first blocks, which
    are dense (DeepSeek-V3's `first_k_dense_replace`): the kept ones are counted again."""

    ffn: tuple[Ffn, ...] = ()
    heads: Attention | None = None
    moe_step: tuple[str, str] | None = None
    experts: Experts | None = None
    mtp_key: str = ""
    layer_lists: tuple[str, ...] = ()
    dense_first: str = ""


_MLP = Ffn(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
_ATTN = Attention(o="self_attn.o_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj")
_QWEN_MOE_STEP = ("decoder_sparse_step", "mlp_only_layers")
_GROUPED = Experts("gate", "n_routed_experts", "n_group", "topk_group")
# Every family of FAMILIES can lose whole blocks; these can also lose FFN channels and heads. GPT-NeoX and
# OPT derive their head size from hidden_size / num_attention_heads, so their heads cannot go; Mixtral's
# and Qwen3-MoE's MLPs are experts only (expert removal is --drop-experts' business).
STRUCTURE: dict[str, Structure] = {
    "llama": Structure((_MLP,), _ATTN),
    "mistral": Structure((_MLP,), _ATTN),
    "qwen2": Structure((_MLP,), _ATTN),
    "qwen3": Structure((_MLP,), _ATTN),
    # The language models of Qwen2.5-VL and Qwen3-VL: Qwen2's and Qwen3's MLPs. Qwen2.5-VL's attention derives
    # its head size from hidden_size, so its heads stay; Qwen3-VL's states head_dim (M-RoPE spans it, and head
    # removal keeps it). Checked against transformers' logits in tests/test_multimodal.py.
    "qwen2_5_vl_text": Structure((_MLP,)),
    "qwen3_vl_text": Structure((_MLP,), _ATTN),
    "gemma2": Structure((_MLP,), _ATTN),
    "gemma3_text": Structure((_MLP,), _ATTN),
    "phi3": Structure((Ffn(("mlp.gate_up_proj",), "mlp.down_proj", "intermediate_size", parts=2),),
                      Attention(o="self_attn.o_proj", qkv="self_attn.qkv_proj")),
    "olmo2": Structure((_MLP,)),
    "gpt_neox": Structure((Ffn(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "intermediate_size"),)),
    "opt": Structure((Ffn(("fc1",), "fc2", "ffn_dim"),)),
    "mixtral": Structure((), _ATTN, experts=Experts("gate", "num_local_experts")),
    "qwen2_moe": Structure((Ffn(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                "mlp.shared_expert.down_proj", "shared_expert_intermediate_size"), _MLP),
                           _ATTN, _QWEN_MOE_STEP, Experts("gate", "num_experts")),
    "qwen3_moe": Structure((_MLP,), _ATTN, _QWEN_MOE_STEP, Experts("gate", "num_experts")),
    "deepseek_v3": Structure(experts=_GROUPED, mtp_key="num_nextn_predict_layers", dense_first="first_k_dense_replace"),
    "glm4_moe": Structure(experts=_GROUPED, mtp_key="num_nextn_predict_layers", dense_first="first_k_dense_replace"),
    "qwen3_next": Structure(moe_step=_QWEN_MOE_STEP, experts=Experts("gate", "num_experts")),
    "gpt_oss": Structure(experts=Experts("router", "num_local_experts")),
    # Llama 4's dense blocks' MLP (intermediate_size_mlp); its shared experts share intermediate_size with the
    # routed experts, so their channels stay.
    "llama4_text": Structure((Ffn(("feed_forward.gate_proj", "feed_forward.up_proj"), "feed_forward.down_proj",
                                  "intermediate_size_mlp"),), _ATTN,
                             experts=Experts("router", "num_local_experts", stacked=True), layer_lists=("moe_layers",)),
}
