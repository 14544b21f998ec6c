"""REAP expert pruning (--drop-experts): golden cases of the selection, the streamed run against the in-memory
reference (tests/reference_experts.py) on tiny multi-shard MoE checkpoints of each family, the output loading
in stock transformers with the reference's logits, the fused on-disk layouts, kills, ranks and refusals."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.helpers import build_tokenizer, checkpoint_files, load_state_dict, run_cli
from tests.reference_experts import reference_reap
from tests.test_families import (
    CALIB_ARGS, CONFIGS, DEEPSEEK_MOE, DENSE, EXPERT_KEY, EXPERT_MATRICES, FUSED, write_family_model,
)
from wanda_stream.cli import main
from wanda_stream.methods import plans
from wanda_stream.run import calib
from wanda_stream.storage import state as state_mod

REPORT = "wanda_stream.json"
# What the tests know of each family independently of the package: the config key counting routed experts,
# and the key of a group-limited router's groups.
COUNT = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
         "deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts", "qwen3_next": "num_experts",
         "gpt_oss": "num_local_experts", "llama4_text": "num_local_experts"}
GROUPS = {"deepseek_v3": "n_group"}


def _deepseek_8() -> Any:
    """DeepSeek-V3 with 8 routed experts in 2 groups (4 each), a token reaching 1 group for its 2 experts."""
    import transformers as tf

    return tf.DeepseekV3Config(**dict(DENSE, num_key_value_heads=4), **dict(DEEPSEEK_MOE, n_routed_experts=8))


MAKERS: dict[str, Callable[[], Any]] = {**CONFIGS, "deepseek_v3": _deepseek_8}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Tiny random MoE checkpoint of a family (float32, 40KB shards), made once per module."""
    root = tmp_path_factory.mktemp("moe")
    tok = root / "tokenizer"
    build_tokenizer(tok)
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = write_family_model(root / family, family, MAKERS[family](), tok)
        return made[family]

    return make


@pytest.fixture(scope="module")
def windows(moe_model: Callable[[str], Path]) -> torch.Tensor:
    tok = calib.load_tokenizer(moe_model("mixtral"))
    return calib.sample_windows(calib.documents("pydoc"), tok, 4, 32, 0, "pydoc")


def _prune(src: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert main(["prune", str(src), str(out), *CALIB_ARGS, *extra]) == 0
    return json.loads((out / REPORT).read_text())


def _load(out: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _plans(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {i: next(iter(b["structure"]["experts"].values())) for i, b in enumerate(report["blocks"])
            if b.get("structure", {}).get("experts")}


# ---- golden cases of the selection -------------------------------------------------------------------------
def test_reap_saliency_by_hand() -> None:
    s = plans.reap_saliency(torch.tensor([3.0, 0.0, 1.5], dtype=torch.float64), torch.tensor([2, 0, 3]))
    assert s.tolist() == [1.5, 0.0, 0.5]  # a never-routed expert scores 0


def test_experts_to_drop_ties_and_groups() -> None:
    s = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0, 0.5, 0.5, 4.0], dtype=torch.float64)
    assert plans.experts_to_drop(s, 1) == [2]  # ties: the higher index goes first
    assert plans.experts_to_drop(s, 3) == [0, 2, 6]
    assert plans.experts_to_drop(s, 2, groups=2) == [2, 6]  # one per group, not the two zeros of group 0


# ---- the streamed run against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("family,ratio", [("mixtral", 0.25), ("qwen2_moe", 0.5), ("qwen3_moe", 0.5),
                                          ("deepseek_v3", 0.25), ("glm4_moe", 0.5)])
def test_drop_experts_matches_reference(family: str, ratio: float, moe_model: Callable[[str], Path],
                                        windows: torch.Tensor, tmp_path: Path) -> None:
    src = moe_model(family)
    report = _prune(src, tmp_path / "out", "--drop-experts", str(ratio))
    ref = reference_reap(str(src), windows, ratio, COUNT[family], GROUPS.get(family))
    got = _plans(report)
    assert sorted(got) == sorted(ref.kept)
    for i, p in got.items():
        assert p["kept"] == ref.kept[i], (i, p, ref.saliency[i])
        assert p["tokens"] == ref.tokens[i]
        assert p["saliency"] == pytest.approx(ref.saliency[i], rel=1e-5, abs=1e-9)
    from transformers import AutoConfig

    n = getattr(MAKERS[family](), COUNT[family])
    assert getattr(AutoConfig.from_pretrained(tmp_path / "out"), COUNT[family]) == n - int(n * ratio)
    model = _load(tmp_path / "out")
    with torch.no_grad():
        got_logits = model(windows, use_cache=False).logits
        want = ref.model(windows, use_cache=False).logits
    assert torch.allclose(got_logits, want, atol=1e-5, rtol=1e-5)
    if family == "mixtral":  # the expert the router never picks scores 0 and goes first
        assert all(p["tokens"][3] == 0 and 3 in p["dropped"] for p in got.values())


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "qwen3_next"])
def test_drop_experts_fused_layouts(family: str, moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    """Experts stored fused on disk (gpt-oss's and Llama 4's [experts, in, out], gpt-oss's biases) and
    Qwen3-Next's per-expert keys in hybrid blocks: the output's experts are the input's kept experts in order,
    the router's rows with them, and it loads in transformers."""
    src = moe_model(family)
    report = _prune(src, tmp_path / "out", "--drop-experts", "0.5")
    got = _plans(report)
    assert got
    top_k = MAKERS[family]().num_experts_per_tok
    before, after = load_state_dict(src), load_state_dict(tmp_path / "out")
    for i, p in got.items():
        assert len(p["kept"]) == 2 and sum(p["tokens"]) == 4 * 32 * top_k
        assert sorted(p["kept"] + p["dropped"]) == [0, 1, 2, 3]
        keep = torch.tensor(p["kept"])
        for w in EXPERT_MATRICES[family]:
            if family in FUSED:
                key = EXPERT_KEY[family].format(i=i, w=w, e=0).rpartition("[")[0]
                assert torch.equal(after[key], before[key][keep]), key
                if family == "gpt_oss":
                    assert torch.equal(after[key + "_bias"], before[key + "_bias"][keep])
            else:
                for j, e in enumerate(p["kept"]):
                    assert torch.equal(after[EXPERT_KEY[family].format(i=i, w=w, e=j)],
                                       before[EXPERT_KEY[family].format(i=i, w=w, e=e)])
                assert EXPERT_KEY[family].format(i=i, w=w, e=2) not in after
        routers = [k for k in before if k.startswith(f"model.layers.{i}.") and k.endswith((".gate.weight",
                                                                                          ".router.weight"))]
        assert len(routers) == 1
        assert torch.equal(after[routers[0]], before[routers[0]][keep])
    _load(tmp_path / "out")


def test_drop_experts_with_wanda_masks_the_kept_experts(moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    """--drop-experts and --method wanda in one pass: the kept experts carry 50% masks, counted on the
    routed tokens that reached them; the expert statistics follow the experts' new numbers."""
    report = _prune(moe_model("qwen2_moe"), tmp_path / "out", "--drop-experts", "0.5", "--sparsity", "0.5")
    plan = _plans(report)[0]
    records = {m["name"]: m for m in report["blocks"][0]["matrices"]}
    expert_records = {k: v for k, v in records.items() if ".experts." in k}
    assert len(expert_records) == 2 * 3  # 2 experts left, gate/up/down each
    for j, e in enumerate(plan["kept"]):
        rec = records[f"model.layers.0.mlp.experts.{j}.down_proj.weight"]
        assert rec["sparsity"] == pytest.approx(0.5)
        assert rec["calib_tokens"] == plan["tokens"][e]
    _load(tmp_path / "out")
    assert "2 experts remain per MoE block" in (tmp_path / "out" / "README.md").read_text()


def test_drop_experts_resume_and_two_ranks_identical(moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    from tests.test_dist import finish, launch

    src = moe_model("qwen3_moe")
    flags = ["--drop-experts", "0.5", "--sparsity", "0.5"]
    one = tmp_path / "one"
    _prune(src, one, *flags)
    killed = tmp_path / "killed"
    for point in ("hidden_write:3", "block_done:1", "finalize"):
        r = run_cli("prune", str(src), str(killed), *CALIB_ARGS, *flags, "--resume", env={state_mod.KILL_ENV: point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
    assert main(["prune", str(src), str(killed), *CALIB_ARGS, *flags, "--resume"]) == 0
    assert checkpoint_files(killed) == checkpoint_files(one)
    two = tmp_path / "two"
    results = finish(launch(["prune", str(src), str(two), *CALIB_ARGS, *flags]))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    assert _plans(json.loads((two / REPORT).read_text())) == _plans(json.loads((one / REPORT).read_text()))
    assert checkpoint_files(two) == checkpoint_files(one)


@pytest.mark.parametrize("family,ratio,needle", [
    ("llama", "0.5", "no routed experts"),
    ("qwen2_moe", "0.75", "fewer than the 2"),  # 1 of 4 left, top-2
    ("qwen2_moe", "0.2", "removes no expert"),
    ("deepseek_v3", "0.125", "cannot share equally"),  # 1 of 8 over 2 groups
    ("deepseek_v3", "0.75", "per group"),  # 1 left per group: groups rank by their best two
    ("qwen2_moe", "1.5", "0 <= R < 1"),
])
def test_drop_experts_refusals(family: str, ratio: str, needle: str, moe_model: Callable[[str], Path],
                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = moe_model(family)
    capsys.readouterr()  # the fixture's own output
    out = tmp_path / "out"
    assert main(["prune", str(src), str(out), *CALIB_ARGS, "--drop-experts", ratio]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--drop-experts" in err[0] and needle in err[0], err
    assert not out.exists()


def test_fp8_deepseek_drop_experts_drops_the_mtp_layer(moe_model: Callable[[str], Path], windows: torch.Tensor,
                                                       tmp_path: Path) -> None:
    """A block-FP8 DeepSeek-V3 with an MTP layer: REAP on the dequantized tensors equals the reference on the
    model dequantized in memory; the MTP layer, which no longer fits the smaller blocks, is left out and its
    count set to 0."""
    from tests.test_quantized import _dequantized_copy, run_cli_tool

    fp8 = tmp_path / "fp8"
    r = run_cli_tool("tools/make_quantized_checkpoint.py", str(moe_model("deepseek_v3")), str(fp8), "--block", "16",
                     "16", "--mtp")
    assert r.returncode == 0, r.stderr
    assert any(k.startswith("model.layers.2.") for k in load_state_dict(fp8))
    out = tmp_path / "out"
    report = _prune(fp8, out, "--drop-experts", "0.25", "--save-dtype", "float32")
    ref = reference_reap(str(_dequantized_copy(fp8, tmp_path / "dense")), windows, 0.25, "n_routed_experts", "n_group")
    assert {i: p["kept"] for i, p in _plans(report).items()} == ref.kept
    written = load_state_dict(out)
    assert not any(k.startswith("model.layers.2.") for k in written)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 6
    assert report["structure"]["mtp_dropped"] is True
    model = _load(out)
    with torch.no_grad():
        assert torch.allclose(model(windows, use_cache=False).logits, ref.model(windows, use_cache=False).logits,
                              atol=1e-5, rtol=1e-5)
