"""Structured pruning (--drop-blocks, --drop-ffn, --drop-heads): golden cases of the plans, the streamed run
against the in-memory reference (tests/reference_structured.py) on tiny multi-shard checkpoints, the output
loading in stock transformers with no missing or unexpected keys and the reference's logits, kills, ranks,
and the refusals."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import checkpoint_files, load_state_dict, run_cli, tiny_llama_config, write_tiny_model
from tests.reference_structured import reference_structured
from wanda_stream.run import calib
from wanda_stream.methods import kernel
from wanda_stream.methods import plans
from wanda_stream.storage import state as state_mod
from wanda_stream.cli import main

ARGS = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet", "--batch-size", "2"]
REPORT = "wanda_stream.json"


# ---- golden cases of the pure plans ----------------------------------------------------------------------
def test_lowest_is_stable_and_sorted() -> None:
    assert plans.lowest([3.0, 1.0, 2.0, 1.0], 2) == [1, 3]
    assert plans.lowest([0.5, 0.5, 0.5], 2) == [0, 1]


def test_blocks_by_angle_picks_the_contiguous_run() -> None:
    # angles[l] = d(h_l, h_{l+2}) for l = 0..3: smallest at l = 2 -> blocks 2 and 3
    assert plans.blocks_by_angle([0.4, 0.3, 0.1, 0.1], 2) == [2, 3]
    assert plans.blocks_by_influence([0.2, 0.05, 0.3, 0.05, 0.9], 3) == [0, 1, 3]


def test_token_cosines_and_angles_by_hand() -> None:
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [2.0, 2.0]]])
    assert plans.token_cosines(a, b).tolist() == pytest.approx([1.0])  # cos 0 and 1
    assert plans.token_angles(a, b).tolist() == pytest.approx([0.5])  # 90 degrees = 1/2, 0 degrees = 0


def test_head_counts_within_groups_or_whole_groups() -> None:
    assert plans.head_counts(9, 3, 3) == (1, 0)  # SmolLM2: one query head of every KV group
    assert plans.head_counts(8, 2, 4) == (2, 0)
    assert plans.head_counts(8, 8, 2) == (0, 2)  # multi-head attention: a head with its key/value head
    assert plans.head_counts(8, 2, 6) == (3, 0)
    with pytest.raises(ValueError):
        plans.head_counts(9, 3, 2)


def test_plan_heads_by_hand() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 9.0])  # 3 KV groups of 2 query heads
    assert plans.plan_heads(scores, 3, 3) == plans.HeadPlan([1, 3, 4], [])
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 0.4])  # whole groups: group sums 6, 5, 0.9
    assert plans.plan_heads(scores, 3, 2) == plans.HeadPlan([4, 5], [2])


def test_refit_is_the_least_squares_solution() -> None:
    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5])

    def gram() -> torch.Tensor:
        g = torch.zeros(6, 6)
        kernel.add_gram(g, x.float())  # as the observation accumulates it (upper triangle)
        return g

    fit = plans.fit_consumer(w.float(), plans.InputStats(torch.ones(6), gram()), keep, dampening=0.0)
    want = torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t()
    assert fit.dampening == 0.0
    assert torch.allclose(fit.weight.double(), want, rtol=1e-3, atol=1e-3)

    def direct(v: torch.Tensor) -> float:
        return float(((x[:, keep] @ v.double().t() - x @ w.t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())

    assert fit.error == pytest.approx(direct(want), rel=1e-3)
    assert fit.error_as_is == pytest.approx(direct(w[:, keep]), rel=1e-3) and fit.error < fit.error_as_is
    damped = plans.fit_consumer(w.float(), plans.InputStats(torch.ones(6), gram()), keep)  # the default dampening: errors of the damped fit
    assert damped.error == pytest.approx(direct(damped.weight), rel=1e-3)
    as_is = plans.fit_consumer(w.float(), plans.InputStats(torch.ones(6), gram()), keep, refit=False)
    assert as_is.dampening is None and torch.equal(as_is.weight, w.float()[:, keep])


def test_channel_scores_by_hand() -> None:
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert plans.channel_scores(torch.tensor([4.0, 9.0]), w).tolist() == [10.0, 3.0]  # 2 * 5, 3 * 1


# ---- the streamed run against the reference --------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with grouped-query attention: 4 blocks, 4 query heads in 2 KV groups, many small shards."""
    return write_tiny_model(tmp_path_factory.mktemp("gqa") / "m", tiny_llama_config(num_hidden_layers=4))


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma-3 text with per-layer attention types (sliding, full, sliding, sliding, full)."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           query_pre_attn_scalar=16, max_position_embeddings=256,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                        "sliding_attention", "full_attention"])
    return write_tiny_model(tmp_path_factory.mktemp("gemma") / "m", cfg)


def _windows(model: Path) -> torch.Tensor:
    return calib.sample_windows(calib.documents("pydoc"), calib.load_tokenizer(model), 4, 32, 0, "pydoc")


def _load(out: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _compare(out: Path, ref: Any, tokens: torch.Tensor, atol: float = 2e-4) -> None:
    got = load_state_dict(out)
    for key, t in got.items():
        if ".experts." in key and key not in ref.state_dict:
            continue  # per-expert on disk, fused in the reference's model: the logits below cover them
        assert key in ref.state_dict, key
        want = ref.state_dict[key]
        assert t.shape == want.shape, key
        # float32 here, float64 there: in later blocks a near-tie of a mask may fall the other way (2 of 6144
        # entries of one matrix on an AMD EPYC); anything else must agree.
        off = ~torch.isclose(t.float(), want.float(), rtol=1e-3, atol=atol)
        flips = off & ((t == 0) != (want == 0))
        assert torch.equal(off, flips) and int(flips.sum()) <= max(2, t.numel() // 1000), \
            (key, int(off.sum()), int(flips.sum()), (t.float() - want).abs().max())
    model = _load(out)
    with torch.no_grad():
        for t in tokens[:2]:
            a = model(t.unsqueeze(0), use_cache=False).logits
            b = ref.model(t.unsqueeze(0), use_cache=False).logits
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), (a - b).abs().max()


def _blocks(out: Path) -> list[dict]:
    return json.loads((out / REPORT).read_text())["blocks"]


def test_blocks_ffn_and_heads_equal_the_reference(gqa_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ["--drop-blocks", "1", "--drop-ffn", "0.25", "--drop-heads", "0.5"]
    assert main(["prune", str(gqa_model), str(out), *ARGS, *flags]) == 0
    tokens = _windows(gqa_model)
    ref = reference_structured(gqa_model, tokens, drop_blocks=1, drop_ffn=0.25, drop_heads=0.5)
    rep = json.loads((out / REPORT).read_text())
    assert rep["structure"]["dropped_blocks"] == ref.dropped
    assert rep["structure"]["influence"] == pytest.approx(ref.influence, abs=1e-5)
    for b in rep["blocks"]:
        if b.get("dropped"):
            assert b["output_error"] == pytest.approx(ref.removal_error[b["block"]], rel=1e-4)
            continue
        assert 0 < b["output_error"] < 1  # the kept, shrunk block against the dense one (tests/test_fidelity.py)
        st = b["structure"]
        assert st["mlp.down_proj"]["removed"] == ref.removed_channels[b["block"]]["mlp.down_proj"]
        assert st["self_attn.o_proj"]["removed_heads"] == ref.removed_heads[b["block"]]
        assert st["mlp.down_proj"]["layer_error"] < st["mlp.down_proj"]["layer_error_no_refit"]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (3, 96)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    assert rep["parameters"]["decoder_after"] < rep["parameters"]["decoder_before"]
    card = (out / "README.md").read_text()
    assert '- "structured"' in card and "parameters" in card
    _compare(out, ref, tokens)


def test_angular_blocks_keep_their_layer_types(gemma_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prune", str(gemma_model), str(out), *ARGS, "--drop-blocks", "2", "--block-score", "angular"]) == 0
    tokens = _windows(gemma_model)
    ref = reference_structured(gemma_model, tokens, drop_blocks=2, score="angular")
    rep = json.loads((out / REPORT).read_text())
    assert rep["structure"]["dropped_blocks"] == ref.dropped
    assert rep["structure"]["angular"] == pytest.approx(ref.angular, abs=1e-5)
    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == [t for i, t in enumerate(types) if i not in ref.dropped]
    assert config["num_hidden_layers"] == 3
    _compare(out, ref, tokens, atol=1e-5)  # nothing refit: the kept blocks' weights are the input's


def test_no_refit_keeps_the_surviving_weights(gqa_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prune", str(gqa_model), str(out), *ARGS, "--drop-ffn", "0.5", "--no-refit"]) == 0
    ref = reference_structured(gqa_model, _windows(gqa_model), drop_ffn=0.5, refit=False)
    got, dense = load_state_dict(out), load_state_dict(gqa_model)
    for b in _blocks(out):
        removed = b["structure"]["mlp.down_proj"]["removed"]
        assert removed == ref.removed_channels[b["block"]]["mlp.down_proj"]
        kept = [j for j in range(128) if j not in removed]
        key = f"model.layers.{b['block']}.mlp.down_proj.weight"
        assert torch.equal(got[key], dense[key][:, kept])
    _compare(out, ref, _windows(gqa_model), atol=1e-6)


def test_structure_then_wanda_masks(gqa_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prune", str(gqa_model), str(out), *ARGS, "--drop-ffn", "0.25", "--pattern", "2:4"]) == 0
    tokens = _windows(gqa_model)
    ref = reference_structured(gqa_model, tokens, drop_ffn=0.25, nm=(2, 4))
    rep = json.loads((out / REPORT).read_text())
    assert rep["total_sparsity"] == pytest.approx(0.5)
    _compare(out, ref, tokens)


def test_moe_blocks_keep_their_kinds(tmp_path: Path) -> None:
    """Qwen2-MoE with dense-MLP layers mixed in (mlp_only_layers): blocks, heads and the shared expert's and
    dense MLPs' channels go; every kept block keeps its kind (the config's layer lists follow)."""
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                         num_experts_per_tok=2, mlp_only_layers=[1, 3], tie_word_embeddings=False)
    model = write_tiny_model(tmp_path / "moe", cfg)
    out = tmp_path / "out"
    flags = ["--drop-blocks", "1", "--drop-ffn", "0.25", "--drop-heads", "0.5"]
    assert main(["prune", str(model), str(out), *ARGS, *flags]) == 0
    tokens = _windows(model)
    ref = reference_structured(model, tokens, drop_blocks=1, drop_ffn=0.25, drop_heads=0.5)
    kept = [i for i in range(4) if i not in ref.dropped]
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_only_layers"] == [j for j, i in enumerate(kept) if i in (1, 3)]
    assert config["decoder_sparse_step"] == 1 and config["num_hidden_layers"] == 3
    assert (config["intermediate_size"], config["shared_expert_intermediate_size"]) == (96, 36)
    for b in _blocks(out):
        if not b.get("dropped"):
            got = {k: v["removed"] for k, v in b["structure"].items() if "removed" in v}
            assert got == ref.removed_channels[b["block"]]
    _compare(out, ref, tokens)


def _kinds_config(family: str) -> Any:
    """4 blocks of a family whose config says which blocks are MoE by index: Llama 4's MoE blocks 1 and 3
    (interleave_moe_layer_step 2, as Maverick), DeepSeek-V3's dense blocks 0 and 1 (first_k_dense_replace),
    Qwen3-Next's dense block 2 (mlp_only_layers)."""
    import transformers as tf

    from tests.test_families import ATTN, DEEPSEEK_MOE, DENSE

    layers = dict(num_hidden_layers=4)
    if family == "llama4_text":
        return tf.Llama4TextConfig(**{**ATTN, **layers, "intermediate_size": 32}, head_dim=16, intermediate_size_mlp=128,
                                   num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                   attention_chunk_size=16, tie_word_embeddings=False)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**{**DENSE, **layers}, num_key_value_heads=4,
                                   **{**DEEPSEEK_MOE, "first_k_dense_replace": 2})
    return tf.Qwen3NextConfig(**{**ATTN, **layers}, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                              linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                              num_experts_per_tok=2, mlp_only_layers=[2], tie_word_embeddings=False,
                              layer_types=["linear_attention", "full_attention"] * 2)


def _moe_blocks(config: Any) -> list[int]:
    """The MoE blocks of a config, by the rule the family's modeling code applies."""
    n = config.num_hidden_layers
    if config.model_type == "llama4_text":
        return sorted(config.moe_layers)
    if config.model_type == "deepseek_v3":
        return [i for i in range(n) if i >= config.first_k_dense_replace]
    return [i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]


@pytest.mark.parametrize("family", ["llama4_text", "deepseek_v3", "qwen3_next"])
@pytest.mark.parametrize("dropped", [[0], [1], [3], [0, 2]])
def test_kept_blocks_keep_their_kind_in_the_config(family: str, dropped: list[int]) -> None:
    """Families that say by block index which blocks are MoE: after any removal, the output config makes each
    kept block what it was (moe_layers renumbered, first_k_dense_replace recounted, mlp_only_layers renumbered
    with the sparse step made explicit); the config as the hub states it (moe_layers derived)."""
    from transformers import AutoConfig

    from wanda_stream.model import shrink

    config = _kinds_config(family)
    raw = {k: v for k, v in config.to_dict().items() if k != "moe_layers"}
    out = shrink.output_config(raw, config, shrink.ShrinkSpec(drop_blocks=len(dropped)), dropped)
    kept = [i for i in range(4) if i not in dropped]
    got = _moe_blocks(AutoConfig.for_model(**out))
    assert got == [j for j, i in enumerate(kept) if i in _moe_blocks(config)]


@pytest.mark.parametrize("family", ["llama4_text", "deepseek_v3"])
def test_blocks_removed_among_dense_and_moe_load_in_transformers(family: str, tmp_path: Path) -> None:
    """--drop-blocks 2 of 4 interleaved or dense-first blocks: the output loads with no missing or unexpected
    keys, each kept block as the input's, renumbered."""
    from transformers import AutoModelForCausalLM

    model = write_tiny_model(tmp_path / "m", _kinds_config(family))
    out = tmp_path / "out"
    assert main(["prune", str(model), str(out), *ARGS, "--drop-blocks", "2", "--sparsity", "0"]) == 0
    dropped = json.loads((out / REPORT).read_text())["structure"]["dropped_blocks"]
    kept = [i for i in range(4) if i not in dropped]
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert _moe_blocks(loaded.config) == [j for j, i in enumerate(kept) if i in _moe_blocks(_kinds_config(family))]
    before, after = load_state_dict(model), load_state_dict(out)
    for j, i in enumerate(kept):
        old, new = f"model.layers.{i}.", f"model.layers.{j}."
        assert {k[len(old):] for k in before if k.startswith(old)} == {k[len(new):] for k in after if k.startswith(new)}
        assert all(torch.equal(after[new + k[len(old):]], t) for k, t in before.items() if k.startswith(old))


@pytest.mark.parametrize("group", ["0", "2"], ids=["whole", "streamed"])
def test_llama4_heads_and_dense_mlp_channels(group: str, tmp_path: Path) -> None:
    """Llama 4 with dense and MoE blocks interleaved: heads go in every block and the dense blocks' MLP
    channels (intermediate_size_mlp) go, the experts and shared experts keep their width; the in-memory
    reference's choices and weights, held whole or with the experts streamed in groups of 2."""
    model = write_tiny_model(tmp_path / "l4", _kinds_config("llama4_text"))
    out = tmp_path / "out"
    flags = ["--drop-ffn", "0.25", "--drop-heads", "0.5", "--expert-group", group]
    assert main(["prune", str(model), str(out), *ARGS, *flags]) == 0
    tokens = _windows(model)
    ref = reference_structured(model, tokens, drop_ffn=0.25, drop_heads=0.5)
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size_mlp"], config["intermediate_size"]) == (96, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)  # a head of each group
    assert set(ref.removed_channels) == {0, 2}  # the dense blocks
    assert any(b.get("streamed_experts") for b in _blocks(out)) == (group != "0")
    for b in _blocks(out):
        got = {k: v["removed"] for k, v in b["structure"].items() if "removed" in v}
        assert got == ref.removed_channels.get(b["block"], {})
    _compare(out, ref, tokens)


def test_without_drop_flags_nothing_changes(gqa_model: Path, tmp_path: Path) -> None:
    """No --drop-* flag: the config fingerprint and output of a plain run are today's."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["prune", str(gqa_model), str(a), *ARGS]) == 0
    assert main(["prune", str(gqa_model), str(b), *ARGS, "--sparsity", "0.5", "--drop-blocks", "0"]) == 0
    same = {k: v for k, v in checkpoint_files(a).items() if k != "README.md"}  # the card shows the command line
    assert same == {k: v for k, v in checkpoint_files(b).items() if k != "README.md"}
    rep = json.loads((a / REPORT).read_text())
    assert "structure" not in rep and json.loads((a / "config.json").read_text()) == json.loads(
        (gqa_model / "config.json").read_text())


def test_killed_anywhere_resumes_to_the_same_bytes(gqa_model: Path, tmp_path: Path) -> None:
    flags = ["--drop-blocks", "1", "--drop-ffn", "0.25", "--drop-heads", "0.5", "--sparsity", "0.5"]
    ref = tmp_path / "ref"
    assert main(["prune", str(gqa_model), str(ref), *ARGS, *flags]) == 0
    out = tmp_path / "out"
    # In run order: each kill leaves work for the next point (counts start again in every process).
    for point in ("profile_block_done:2", "hidden_write:3", "block_done:1", "shard_write:1", "block_done:1",
                  "finalize"):
        r = run_cli("prune", str(gqa_model), str(out), *ARGS, *flags, "--resume", env={state_mod.KILL_ENV: point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        if point.startswith("profile"):
            status = run_cli("status", str(out), "--json")
            assert status.returncode == 0 and json.loads(status.stdout)["profile_blocks_done"] == 2, status.stderr
    assert main(["prune", str(gqa_model), str(out), *ARGS, *flags, "--resume"]) == 0
    assert checkpoint_files(out) == checkpoint_files(ref)


@pytest.mark.parametrize("flags", [("--drop-blocks", "1", "--drop-ffn", "0.25", "--no-refit"),
                                   ("--drop-blocks", "1", "--block-score", "angular", "--drop-heads", "0.5")],
                         ids=["blocks-ffn", "angular-heads"])
def test_two_ranks_equal_one_process(gqa_model: Path, tmp_path: Path, flags: tuple[str, ...]) -> None:
    from tests.test_dist import finish, launch

    single, two = tmp_path / "single", tmp_path / "two"
    assert main(["prune", str(gqa_model), str(single), *ARGS, *flags]) == 0
    results = finish(launch(["prune", str(gqa_model), str(two), *ARGS, *flags]))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    got, want = load_state_dict(two), load_state_dict(single)
    assert sorted(got) == sorted(want)
    for k in want:  # selections agree exactly; a refit from Gram matrices summed over ranks, to rounding
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    a, b = json.loads((two / REPORT).read_text()), json.loads((single / REPORT).read_text())
    assert a["structure"]["dropped_blocks"] == b["structure"]["dropped_blocks"]
    assert [x.get("structure", {}).get("self_attn.o_proj", {}).get("removed_heads") for x in a["blocks"]] == \
        [x.get("structure", {}).get("self_attn.o_proj", {}).get("removed_heads") for x in b["blocks"]]


@pytest.mark.parametrize("flags,message", [
    (("--drop-blocks", "4"), "--drop-blocks 4: the model has 4 blocks"),
    (("--drop-heads", "0.25"), "--drop-heads 0.25"),
    (("--drop-ffn", "1.5"), "--drop-ffn 1.5"),
    (("--drop-ffn", "0.25", "--sparsity-profile", "owl"), "--sparsity-profile owl"),
    (("--drop-ffn", "0.3", "--pattern", "2:4"), "--pattern 2:4: after structured pruning"),
    (("--block-score", "cosine", "--drop-blocks", "1"), "--block-score"),
])
def test_bad_structure_flags_are_refused(gqa_model: Path, tmp_path: Path, flags: tuple[str, ...], message: str,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    try:
        code = main(["prune", str(gqa_model), str(out), *ARGS, *flags])
    except SystemExit as e:  # argparse's own refusals (choices) exit from inside the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() or not any(p.name != ".wanda-stream" for p in out.iterdir())


def test_families_that_cannot_lose_heads_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import OPTConfig

    model = write_tiny_model(tmp_path / "opt", OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         max_position_embeddings=256, word_embed_proj_dim=64))
    assert main(["prune", str(model), str(tmp_path / "out"), *ARGS, "--drop-heads", "0.5"]) == 2
    assert "model_type 'opt' cannot lose attention heads" in capsys.readouterr().err
    assert main(["prune", str(model), str(tmp_path / "out2"), *ARGS, "--drop-ffn", "0.25", "--drop-blocks", "1"]) == 0
    _load(tmp_path / "out2")
