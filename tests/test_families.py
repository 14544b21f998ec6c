"""Every supported family, on a tiny random multi-shard checkpoint, gets two checks:

1. the streamed dense forward gives the logits (and NLL) of the whole model in transformers;
2. the streamed Wanda prune equals an in-memory reference prune, weight for weight.

Mixture-of-experts families are checkpoints in the hub's per-expert layout; their reference
computes each expert's statistics from the tokens the router sent it, in its own loop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from tests.helpers import build_tokenizer, load_state_dict
from tests.reference import _layers, capture_block_inputs, linear_input_sums, ref_mask, reference_prune
from wanda_stream.run import calib
from wanda_stream.cli import main
from wanda_stream.eval.evaluate import streamed_logits
from wanda_stream.eval.inspect import inspect_checkpoint
from wanda_stream.model.skeleton import TESTED_FAMILIES

CALIB_ARGS = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet",
              "--batch-size", "2"]
LAYERS = 2
DENSE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
             max_position_embeddings=256)
ATTN = dict(DENSE, num_key_value_heads=2)
DEEPSEEK_MOE = dict(moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4, n_group=2, topk_group=1,
                    num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                    qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, routed_scaling_factor=2.5,
                    tie_word_embeddings=False)


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**ATTN, tie_word_embeddings=False),
        "mistral": lambda: tf.MistralConfig(**ATTN, sliding_window=16, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**ATTN, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**ATTN, head_dim=16, tie_word_embeddings=False),
        "gemma2": lambda: tf.Gemma2Config(**ATTN, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                          final_logit_softcapping=5.0, attn_logit_softcapping=10.0),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **ATTN, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: tf.Phi3Config(**ATTN, tie_word_embeddings=False, pad_token_id=0),
        "olmo2": lambda: tf.Olmo2Config(**ATTN, tie_word_embeddings=False),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**DENSE, rotary_pct=0.5),
        "opt": lambda: tf.OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                                    do_layer_norm_before=False, pad_token_id=1),
        # top-1 routing with one expert the router can never pick (see _starve_last_expert)
        "mixtral": lambda: tf.MixtralConfig(**dict(ATTN, intermediate_size=32), num_local_experts=4,
                                            num_experts_per_tok=1, tie_word_embeddings=False),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**ATTN, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                               num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                                               tie_word_embeddings=False),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**ATTN, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, tie_word_embeddings=False),
        # MLA with a q LoRA, block 0 dense, group-limited sigmoid routing (2 groups, 1 reachable), a shared expert
        "deepseek_v3": lambda: tf.DeepseekV3Config(**dict(DENSE, num_key_value_heads=4), **DEEPSEEK_MOE),
        "glm4_moe": lambda: tf.Glm4MoeConfig(**ATTN, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                             use_qk_norm=True, attention_bias=True, tie_word_embeddings=False),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **ATTN, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"], tie_word_embeddings=False),
        "gpt_oss": lambda: tf.GptOssConfig(
            vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
            tie_word_embeddings=False),
        # block 0 a dense MLP, block 1 MoE (top-1, sigmoid-scaled inputs, a shared expert); chunked attention
        "llama4_text": lambda: tf.Llama4TextConfig(
            vocab_size=300, hidden_size=64, intermediate_size=32, intermediate_size_mlp=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, attention_chunk_size=16, max_position_embeddings=256,
            tie_word_embeddings=False),
    }


CONFIGS = _configs()
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3_next", "gpt_oss", "llama4_text")
# What the tests know independently of the package: the MoE routers/gates, by module name, and the
# hub's per-expert checkpoint keys.
ROUTERS = ("gate", "shared_expert_gate", "router")
FUSED = ("gpt_oss", "llama4_text")  # experts stored fused ([experts, in, out]) on disk, as in memory
EXPERT_KEY = {"mixtral": "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",
              "qwen2_moe": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
              "qwen3_moe": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
              "deepseek_v3": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
              "glm4_moe": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
              "qwen3_next": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
              "gpt_oss": "model.layers.{i}.mlp.experts.{w}[{e}]",
              "llama4_text": "model.layers.{i}.feed_forward.experts.{w}[{e}]"}
EXPERT_MATRICES = {"mixtral": ("w1", "w2", "w3"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                   "qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
                   "glm4_moe": ("gate_proj", "up_proj", "down_proj"), "qwen3_next": ("gate_proj", "up_proj", "down_proj"),
                   "gpt_oss": ("gate_up_proj", "down_proj"), "llama4_text": ("gate_up_proj", "down_proj")}


def _starve_last_expert(model: nn.Module) -> None:
    """Router rows v, -v, v/2 for experts 1..3: one of experts 1 and 2 always outscores expert 3 (top-1)."""
    for layer in _layers(model):
        w = layer.mlp.gate.weight
        with torch.no_grad():
            w[2] = -w[1]
            w[3] = 0.5 * w[1]


TWEAKS: dict[str, Callable[[nn.Module], None]] = {"mixtral": _starve_last_expert}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Tiny random checkpoint of a family (float32, 40KB shards, the helpers' tokenizer), built once per session."""

    root = tmp_path_factory.mktemp("families")
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir)
    made: dict[str, Path] = {}

    def make(family: str, dtype: torch.dtype = torch.float32) -> Path:
        name = family if dtype == torch.float32 else f"{family}-{str(dtype).removeprefix('torch.')}"
        if name in made:
            return made[name]
        made[name] = write_family_model(root / name, family, CONFIGS[family](), tok_dir, dtype)
        return made[name]

    return make


def write_family_model(out: Path, family: str, config: Any, tok_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random checkpoint of `config` (seed 0, 40KB shards, the family's tweak, the tokenizer of `tok_dir`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms and biases: non-trivial so a bug in them shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 3:  # fused experts: distinct scales per expert
                p.copy_(torch.randn_like(p) * 0.05)
    TWEAKS.get(family, lambda m: None)(model)
    model.to(dtype).save_pretrained(str(out), max_shard_size="40KB")
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def windows(family_model: Callable[[str], Path]) -> torch.Tensor:
    """The calibration windows CALIB_ARGS selects; every family has the same tokenizer, so they are made once."""
    tok = calib.load_tokenizer(family_model("llama"))
    return calib.sample_windows(calib.documents("pydoc"), tok, 4, 32, 0, "pydoc")


def test_tested_families_are_the_tested_ones(capsys: pytest.CaptureFixture) -> None:
    assert set(CONFIGS) == set(TESTED_FAMILIES)
    for family, make in CONFIGS.items():
        assert make().model_type == family
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert f"supported and tested model types: {', '.join(TESTED_FAMILIES)}" in listed


@pytest.mark.parametrize("family", list(CONFIGS))
def test_streamed_forward_matches_transformers(family: str, family_model: Callable[[str], Path],
                                               windows: torch.Tensor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = family_model(family)
    tokens = windows[:3]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(tokens, use_cache=False).logits.float()
    got, nll = streamed_logits(model_dir, tokens, "cpu", tmp_path / "work")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_nll = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, want.shape[-1]), tokens[:, 1:].reshape(-1))
    assert nll == pytest.approx(want_nll.item(), rel=1e-5)


def _experts_of(layer: nn.Module) -> nn.Module | None:
    """The block's routed-experts module (holding the fused gate_up_proj), if it has one."""
    return next((m for n, m in layer.named_modules() if n.endswith("experts") and hasattr(m, "gate_up_proj")), None)


def _expert_parts(family: str, experts: nn.Module, calls: list[tuple], scores: list[torch.Tensor],
                  e: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, str]], torch.Tensor]:
    """Expert e's routed inputs, its [out, in] matrices (views of the fused parameters, each with which input
    it reads: 'in' or 'act'), and the inputs of its down projection, computed here from the tensors the
    experts module and the router were called with."""
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
    if family == "llama4_text":  # inputs pre-scaled by the sigmoid router score (0: not routed)
        n_exp = gate_up.shape[0]
        xs = torch.cat([x.view(n_exp, -1, x.shape[-1])[e][sc[:, e] > 0] for (x,), sc in zip(calls, scores)])
        g, u = (xs @ gate_up[e]).chunk(2, dim=-1)
        return xs, [(gate_up[e].T, "in"), (down[e].T, "act")], u * experts.act_fn(g)
    xs = torch.cat([h[(idx == e).any(dim=-1)] for h, idx, *_ in calls])
    if family == "gpt_oss":  # [in, out] experts with biases, gate/up interleaved, clamped SwiGLU
        gu = xs @ gate_up[e] + experts.gate_up_proj_bias.data[e]
        gate, up = gu[..., ::2].clamp(max=experts.limit), gu[..., 1::2].clamp(-experts.limit, experts.limit)
        act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return xs, [(gate_up[e].T, "in"), (down[e].T, "act")], act
    inter = down.shape[-1]
    g, u = torch.nn.functional.linear(xs, gate_up[e]).chunk(2, dim=-1)
    return xs, [(gate_up[e, :inter], "in"), (gate_up[e, inter:], "in"), (down[e], "act")], experts.act_fn(g) * u


def _moe_reference(model_dir: Path, tokens: torch.Tensor, sparsity: float) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[tuple[int, int], int]]:
    """Wanda with the whole MoE model in memory: per-expert statistics from the tokens routed to each expert.

    Returns the pruned state dict (transformers' fused layout) and, per (layer, expert), the number of
    calibration tokens the router sent to it (0: pruned by magnitude).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    family = model.config.model_type
    layers = _layers(model)
    inputs, kwargs = capture_block_inputs(model, layers, tokens)
    routed_tokens: dict[tuple[int, int], int] = {}
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and n.rpartition(".")[2] not in ROUTERS}
        calls: list[tuple] = []
        scores: list[torch.Tensor] = []
        experts = _experts_of(layer)
        extra = [] if experts is None else [experts.register_forward_pre_hook(lambda mod, args: calls.append(args))]
        if experts is not None and family == "llama4_text":
            router = layer.feed_forward.router
            extra.append(router.register_forward_hook(lambda mod, args, out: scores.append(out[0])))
        sums = linear_input_sums(layer, linears, inputs, kwargs[i], extra)
        for n, m in linears.items():
            mask = ref_mask(m.weight.data, sums[n], sparsity, None, per_matrix=False)
            with torch.no_grad():
                m.weight.masked_fill_(mask, 0)
        if experts is not None:
            for e in range(experts.gate_up_proj.shape[0]):
                xs, parts, act = _expert_parts(family, experts, calls, scores, e)
                routed_tokens[(i, e)] = xs.shape[0]
                sq = {"in": (xs.double() ** 2).sum(0), "act": (act.double() ** 2).sum(0)}
                for w, reads in parts:
                    if xs.shape[0] == 0:
                        mk = ref_mask(w, None, sparsity, None, per_matrix=True)
                    else:
                        mk = ref_mask(w, sq[reads], sparsity, None, False)
                    w.masked_fill_(mk, 0)
        with torch.no_grad():
            outs = [layer(x, **kw) for x, kw in zip(inputs, kwargs[i])]
            inputs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, routed_tokens


def _expert_records(family: str, src: dict[str, torch.Tensor]) -> set[str]:
    """The report names the test expects for the pruned matrices of a checkpoint's expert tensors."""
    if family not in FUSED:
        return set()
    return {f"{k}[{e}]" for k, t in src.items() if t.dim() == 3 and ".experts." in k for e in range(t.shape[0])}


@pytest.mark.parametrize("family,dtype", [pytest.param(f, torch.float32, id=f) for f in CONFIGS]
                         + [pytest.param("mixtral", torch.bfloat16, id="mixtral-bf16")])
def test_streamed_prune_equals_reference(family: str, dtype: torch.dtype, family_model: Callable[..., Path],
                                         windows: torch.Tensor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = family_model(family, dtype)
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), str(out), *CALIB_ARGS]) == 0
    src, written = load_state_dict(model_dir), load_state_dict(out)
    assert set(written) == set(src)  # the checkpoint's own layout and keys, per-expert tensors included
    assert all(t.dtype == dtype for t in written.values())
    tokens = windows
    if family in MOE:
        ref, routed = _moe_reference(model_dir, tokens, 0.5)
    else:
        ref, routed = reference_prune(model_dir, tokens, "wanda", 0.5, None), {}
    starved = {ie for ie, n in routed.items() if n == 0}
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert set(got) == set(ref)
    for key, t in got.items():
        assert torch.equal(t, ref[key]), key
    # Every 2D block tensor but the routers is pruned to half; routers, norms and embeddings are untouched.
    report = json.loads((out / "wanda_stream.json").read_text())
    records = {m["name"]: m for b in report["blocks"] for m in b["matrices"]}
    assert set(records) == {k for k, t in src.items() if ".layers." in k and t.dim() == 2
                            and k.endswith("weight") and k.split(".")[-2] not in ROUTERS} | _expert_records(family, src)
    pruned_keys = {n.partition("[")[0] for n in records}
    for key, t in written.items():
        if key in pruned_keys:
            assert (t == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6), key
        else:
            assert torch.equal(t, src[key]), key
    inspected = inspect_checkpoint(out)["matrices"]
    assert {m["name"] for m in inspected} == set(records)
    # Experts that got no calibration token fell back to magnitude, in the reference and in the report alike.
    fallbacks = {k for k, m in records.items() if "fallback" in m}
    if family == "mixtral":
        assert starved == {(i, 3) for i in range(LAYERS)}
    assert fallbacks == {EXPERT_KEY[family].format(i=i, e=e, w=w)
                         for i, e in starved for w in EXPERT_MATRICES[family]}
    # Every expert matrix's record counts the calibration tokens routed to its expert, as the reference's
    # router pre-hook saw them: top-k of every token in all, none exactly for the fallbacks.
    counted = {k: m["calib_tokens"] for k, m in records.items() if "calib_tokens" in m}
    assert counted == {EXPERT_KEY[family].format(i=i, e=e, w=w): n
                       for (i, e), n in routed.items() for w in EXPERT_MATRICES[family]}
    assert {k for k, n in counted.items() if n == 0} == fallbacks
    top_k = CONFIGS[family]().num_experts_per_tok if family in MOE else 0
    for i in {i for i, _ in routed}:
        for w in EXPERT_MATRICES[family]:
            per_expert = [counted[EXPERT_KEY[family].format(i=i, e=e, w=w)] for j, e in routed if j == i]
            assert sum(per_expert) == tokens.numel() * top_k, (i, w)
    if family in FUSED:
        assert any(k.endswith("experts.gate_up_proj") and t.dim() == 3 for k, t in src.items())
    elif family in MOE:
        assert any(".experts.0." in k for k in src) and not any(k.endswith("gate_up_proj") for k in src)


@pytest.mark.parametrize("model_type", ["t5", "bert"])
def test_unsupported_family_is_named(model_type: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers as tf

    small = dict(vocab_size=300, num_heads=2, num_layers=2, d_model=32, d_kv=16, d_ff=64)
    if model_type == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(**small))
    else:
        model = tf.BertLMHeadModel(tf.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, is_decoder=True))
    model.save_pretrained(str(tmp_path / "m"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--data", "pydoc", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"model_type '{model_type}'" in err and "supported and tested: llama" in err


def test_fused_experts_on_disk_are_pruned_per_expert(family_model: Callable[[str], Path], windows: torch.Tensor,
                                                     tmp_path: Path) -> None:
    """A Qwen3-MoE checkpoint holding transformers' in-memory fused 3D experts ([experts, out, in]) is pruned
    expert by expert, in that layout, to what the per-expert checkpoint's reference gives."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = family_model("qwen3_moe")
    fused = tmp_path / "fused"
    shutil.copytree(src, fused, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["prune", str(fused), str(out), *CALIB_ARGS]) == 0
    written = load_state_dict(out)
    assert written["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3  # still fused
    ref, _ = _moe_reference(src, windows, 0.5)
    assert set(written) == set(ref)
    for key, t in written.items():
        assert torch.equal(t, ref[key]), key
    records = {m["name"] for b in json.loads((out / "wanda_stream.json").read_text())["blocks"] for m in b["matrices"]}
    assert {f"model.layers.0.mlp.experts.{w}[{e}]" for w in ("gate_up_proj", "down_proj") for e in range(4)} <= records
