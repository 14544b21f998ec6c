"""Quantized checkpoints in: block FP8, compressed-tensors FP8, FBGEMM FP8 and MXFP4 dequantized by the reader,
checked against hand-computed values; a tiny FP8 DeepSeek-V3 (tools/make_quantized_checkpoint.py) pruned streamed
equals the same model dequantized in memory and pruned by the reference; compressed-tensors and FBGEMM copies
prune to the bytes of their independently dequantized float copies."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import ROOT, checkpoint_files, load_state_dict, run_cli
from tests.test_families import CALIB_ARGS, _moe_reference, family_model, windows  # noqa: F401 - fixtures
from wanda_stream.storage.checkpoint import Checkpoint
from wanda_stream.cli import main
from wanda_stream.errors import InputError
from wanda_stream.storage.quant import dequant_fp8_block, dequant_fp8_experts, dequant_mxfp4

FP8_QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [2, 2]}


def _model_dir(tmp_path: Path, tensors: dict[str, torch.Tensor], qc: dict | None) -> Path:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **({"quantization_config": qc} if qc else {})}))
    save_file(tensors, str(model / "model.safetensors"))
    return model


def test_fp8_block_dequant_hand_computed() -> None:
    """A 3x5 matrix in 2x2 blocks: a partial last block row and column, each with its own scale."""
    q = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.5],
                      [4.0, 0.25, -0.5, 1.0, 2.0],
                      [-3.0, 6.0, 1.5, -4.0, 0.75]]).to(torch.float8_e4m3fn)
    s = torch.tensor([[2.0, 0.5, 10.0],
                      [-1.0, 3.0, 0.125]])
    want = torch.tensor([[2.0, -4.0, 0.25, 1.5, -15.0],
                         [8.0, 0.5, -0.25, 0.5, 20.0],
                         [3.0, -6.0, 4.5, -12.0, 0.09375]])
    assert torch.equal(dequant_fp8_block(q, s, (2, 2)), want)


def test_fp8_ragged_576_wide(tmp_path: Path) -> None:
    """DeepSeek's kv_a_proj_with_mqa shape class: sides that are not multiples of 128, through the reader."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(200, 576, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(2, 5, generator=g) + 0.1
    model = _model_dir(tmp_path, {"a.kv_a_proj_with_mqa.weight": q, "a.kv_a_proj_with_mqa.weight_scale_inv": s},
                       dict(FP8_QC, weight_block_size=[128, 128]))
    ckpt = Checkpoint(model, torch.float32)
    assert ckpt.keys() == ["a.kv_a_proj_with_mqa.weight"] and ckpt.dequantized
    got = ckpt.get("a.kv_a_proj_with_mqa.weight")
    want = torch.empty(200, 576)
    for i in range(200):
        for jb in range(5):
            want[i, jb * 128 : (jb + 1) * 128] = q[i, jb * 128 : (jb + 1) * 128].float() * s[i // 128, jb]
    assert torch.equal(got, want)
    assert ckpt.total_bytes() == 200 * 576 * 4 > q.numel() + s.numel() * 4  # the output, not the input


def test_fp8_unquantized_tensors_stay_as_stored(tmp_path: Path) -> None:
    """modules_to_not_convert and tensors without a scale are not touched; dequantized ones are bfloat16."""
    norm = torch.randn(4).to(torch.bfloat16)
    bias = torch.randn(3, dtype=torch.float32)
    head = torch.randn(3, 4).to(torch.bfloat16)
    q = torch.full((3, 4), 2.0).to(torch.float8_e4m3fn)
    model = _model_dir(tmp_path, {"l.norm.weight": norm, "l.gate.e_score_correction_bias": bias, "lm_head.weight": head,
                                  "l.proj.weight": q, "l.proj.weight_scale_inv": torch.tensor([[0.5, 4.0], [1.0, 1.0]])},
                       dict(FP8_QC, modules_to_not_convert=["lm_head"]))
    ckpt = Checkpoint(model)
    assert sorted(ckpt.keys()) == ["l.gate.e_score_correction_bias", "l.norm.weight", "l.proj.weight", "lm_head.weight"]
    for key, t in (("l.norm.weight", norm), ("l.gate.e_score_correction_bias", bias), ("lm_head.weight", head)):
        got = ckpt.get(key)
        assert got.dtype == t.dtype and torch.equal(got, t), key
    w = ckpt.get("l.proj.weight")
    assert w.dtype == torch.bfloat16
    assert torch.equal(w.float(), torch.tensor([[1.0, 1.0, 8.0, 8.0], [1.0, 1.0, 8.0, 8.0], [2.0, 2.0, 2.0, 2.0]]))


def test_fp8_without_scale_is_refused(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"l.proj.weight": torch.ones(3, 4).to(torch.float8_e4m3fn)}, FP8_QC)
    with pytest.raises(InputError, match="'l.proj.weight' has no 'l.proj.weight_scale_inv'"):
        Checkpoint(model)


def _ct_config(strategy: str, **weights: object) -> dict:
    """A compressed-tensors FP8 quantization_config of one scheme (as compressed-tensors 0.20 writes it)."""
    w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy, **weights}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "format": "float-quantized",
                                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                                "dynamic": False, "symmetric": True}}},
            "ignore": ["lm_head"], "sparsity_config": {}, "transform_config": {}, "kv_cache_scheme": None}


Q34 = torch.tensor([[1.0, -2.0, 0.5, 3.0], [4.0, 0.25, -0.5, 1.0], [-3.0, 6.0, 1.5, -4.0]])


@pytest.mark.parametrize("strategy, weights, scale, want", [
    ("tensor", {}, torch.tensor([0.5]), Q34 * 0.5),
    ("channel", {}, torch.tensor([[2.0], [0.5], [-1.0]]), Q34 * torch.tensor([[2.0], [0.5], [-1.0]])),
    ("group", {"group_size": 2}, torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.25]]),
     torch.tensor([[1.0, -2.0, 1.0, 6.0], [12.0, 0.75, -2.0, 4.0], [-1.5, 3.0, 0.375, -1.0]])),
    ("block", {"block_structure": [2, 3]}, torch.tensor([[2.0, 10.0], [-1.0, 0.5]]),  # ragged: 3 rows, 4 columns
     torch.tensor([[2.0, -4.0, 1.0, 30.0], [8.0, 0.5, -1.0, 10.0], [3.0, -6.0, -1.5, -2.0]])),
])
def test_compressed_tensors_fp8_hand_computed(tmp_path: Path, strategy: str, weights: dict, scale: torch.Tensor,
                                              want: torch.Tensor) -> None:
    """Each strategy's scale shape, through the reader (bfloat16 scales, as compressed-tensors stores them); the
    activations' input_scale is not presented and the head, in the ignore list, stays as stored."""
    head = torch.randn(3, 4).to(torch.bfloat16)
    model = _model_dir(tmp_path, {"l.proj.weight": Q34.to(torch.float8_e4m3fn), "l.proj.weight_scale":
                                  scale.to(torch.bfloat16), "l.proj.input_scale": torch.tensor([0.1]).to(torch.bfloat16),
                                  "lm_head.weight": head}, _ct_config(strategy, **weights))
    ckpt = Checkpoint(model, torch.float32)
    assert ckpt.keys() == ["l.proj.weight", "lm_head.weight"] and ckpt.dequantized
    assert torch.equal(ckpt.get("l.proj.weight"), want)
    assert torch.equal(ckpt.get("lm_head.weight"), head.float())


def test_fbgemm_fp8_rows_and_fused_experts_hand_computed(tmp_path: Path) -> None:
    """Row-wise matrices ([out, 1]) and Llama 4's fused experts: gate_up_proj [E, in, out] with scales [E, 1, out],
    down_proj with [E, out, 1], each one per expert and output column; attention, not converted, stays float."""
    gate_up = torch.tensor([[[1.0, 2.0, -1.0], [0.5, 4.0, 3.0]], [[2.0, -2.0, 1.0], [1.0, 0.25, 6.0]]])
    gu_scale = torch.tensor([[[1.0, 0.5, 2.0]], [[-1.0, 4.0, 0.25]]])
    down = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]], [[2.0, 1.0], [0.5, -4.0], [6.0, 1.0]]])
    d_scale = torch.tensor([[[2.0], [0.5]], [[0.25], [-1.0]]])
    attn = torch.randn(2, 2).to(torch.bfloat16)
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["l.self_attn"]}
    model = _model_dir(tmp_path, {
        "l.mlp.weight": Q34.to(torch.float8_e4m3fn), "l.mlp.weight_scale": torch.tensor([[2.0], [0.5], [-1.0]]),
        "l.experts.gate_up_proj": gate_up.to(torch.float8_e4m3fn), "l.experts.gate_up_proj_scale": gu_scale,
        "l.experts.down_proj": down.to(torch.float8_e4m3fn), "l.experts.down_proj_scale": d_scale,
        "l.self_attn.q_proj.weight": attn}, qc)
    ckpt = Checkpoint(model, torch.float32)
    assert ckpt.keys() == ["l.experts.down_proj", "l.experts.gate_up_proj", "l.mlp.weight", "l.self_attn.q_proj.weight"]
    assert torch.equal(ckpt.get("l.mlp.weight"), Q34 * torch.tensor([[2.0], [0.5], [-1.0]]))
    want_gu = torch.tensor([[[1.0, 1.0, -2.0], [0.5, 2.0, 6.0]], [[-2.0, -8.0, 0.25], [-1.0, 1.0, 1.5]]])
    want_d = torch.tensor([[[2.0, 1.0], [6.0, 2.0], [-2.0, 0.25]], [[0.5, -1.0], [0.125, 4.0], [1.5, -1.0]]])
    assert torch.equal(ckpt.get("l.experts.gate_up_proj"), want_gu)
    assert torch.equal(ckpt.get("l.experts.down_proj"), want_d)
    assert torch.equal(ckpt.get("l.experts.down_proj", rows=(1, 2)), want_d[1:])  # a group of experts, read alone
    assert torch.equal(dequant_fp8_experts(down.to(torch.float8_e4m3fn), d_scale), want_d)
    assert torch.equal(ckpt.get("l.self_attn.q_proj.weight"), attn.float())


BAD_CT = {
    "int4": (dict(_ct_config("group", group_size=2), format="pack-quantized",
                  config_groups={"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 2},
                                       "format": "pack-quantized"}}),
             "config_groups.g stores 4-bit int weights as 'pack-quantized'"),
    "asymmetric": (_ct_config("channel", symmetric=False), "config_groups.group_0 is asymmetric"),
    "token strategy": (_ct_config("token"), "strategy 'token' is not supported"),
    "block without structure": (_ct_config("block"), "strategy 'block' without a valid block_structure"),
    "sparse": (dict(_ct_config("channel"), sparsity_config={"format": "sparse-24-bitmask"}),
               "sparsity_config format 'sparse-24-bitmask' is not supported"),
    "rotations": (dict(_ct_config("channel"), transform_config={"config_groups": {"u": {}}}),
                  "transform_config (rotations) is not supported"),
    "no groups": (dict(_ct_config("channel"), config_groups={}), "has no config_groups"),
    "scale shape": (_ct_config("group", group_size=3), "'l.proj.weight' [3, 4] and its scale [3, 1] (bfloat16) fit "
                    "none of the quantization_config's weight tilings (group 1x3)"),
}


@pytest.mark.parametrize("case", list(BAD_CT))
def test_compressed_tensors_that_are_not_fp8_are_refused(tmp_path: Path, case: str) -> None:
    """One line naming config.json and the field; nothing read as if it were FP8."""
    qc, message = BAD_CT[case]
    model = _model_dir(tmp_path, {"l.proj.weight": Q34.to(torch.float8_e4m3fn),
                                  "l.proj.weight_scale": torch.ones(3, 1).to(torch.bfloat16)}, qc)
    with pytest.raises(InputError, match=re.escape(message)) as e:
        Checkpoint(model)
    assert str(model / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_scaled_fp8_missing_scale_and_float_weights_with_scales_are_refused(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"l.proj.weight": Q34.to(torch.float8_e4m3fn)}, _ct_config("channel"))
    with pytest.raises(InputError, match="'l.proj.weight' has no 'l.proj.weight_scale'"):
        Checkpoint(model)
    (tmp_path / "f").mkdir()
    frozen = _model_dir(tmp_path / "f", {"l.proj.weight": Q34.to(torch.bfloat16),
                                         "l.proj.weight_scale": torch.ones(3, 1).to(torch.bfloat16)},
                        _ct_config("channel"))
    with pytest.raises(InputError, match="'l.proj.weight_scale' scales a weight that is not float8"):
        Checkpoint(frozen)


def test_mxfp4_dequant_hand_computed() -> None:
    """One row of 32 values: bytes (low nibble first) through the e2m1 table, times 2^(scale - 127)."""
    row = torch.zeros(16, dtype=torch.uint8)
    row[0], row[1], row[15] = 0x21, 0xF7, 0x9C  # (0.5, 1.0), (6.0, -6.0), (-2.0, -0.5)
    blocks = torch.stack([row, row]).view(2, 1, 16)  # [out=2, groups=1, 16]
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)  # x2 and x1/4
    got = dequant_mxfp4(blocks, scales)
    assert got.shape == (32, 2)  # [in, out]
    want_row = torch.zeros(32)
    want_row[0:4] = torch.tensor([0.5, 1.0, 6.0, -6.0])
    want_row[30:32] = torch.tensor([-2.0, -0.5])
    assert torch.equal(got[:, 0], want_row * 2) and torch.equal(got[:, 1], want_row / 4)


def test_mxfp4_checkpoint_presents_fused_float_experts(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 2, 16), generator=g, dtype=torch.uint8)  # 2 experts, out 6, in 64
    scales = torch.randint(120, 130, (2, 6, 2), generator=g, dtype=torch.uint8)
    bias = torch.randn(2, 6)
    model = _model_dir(tmp_path, {"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales,
                                  "e.gate_up_proj_bias": bias}, {"quant_method": "mxfp4"})
    ckpt = Checkpoint(model, torch.float32)
    assert ckpt.keys() == ["e.gate_up_proj", "e.gate_up_proj_bias"]
    got = ckpt.get("e.gate_up_proj")
    assert got.shape == (2, 64, 6)
    lut = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    for e, o, k in ((0, 0, 0), (1, 5, 63), (0, 3, 33), (1, 2, 16)):
        byte = int(blocks[e, o, k // 32, (k % 32) // 2])
        nib = byte & 0xF if k % 2 == 0 else byte >> 4
        assert got[e, k, o].item() == lut[nib] * 2.0 ** (int(scales[e, o, k // 32]) - 127)
    assert torch.equal(ckpt.get("e.gate_up_proj_bias"), bias)
    # An expert's rows alone (a group of streamed experts): its values and scales read and dequantized alone.
    assert torch.equal(ckpt.get("e.gate_up_proj", rows=(1, 2)), got[1:2])
    assert torch.equal(ckpt.get("e.gate_up_proj_bias", rows=(0, 1)), bias[:1])


def test_dequantized_tensors_are_pinned_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """get(pin=True) on a quantized key (FP8, MXFP4, and a plain tensor cast to the presented dtype): the
    result is asked of the allocator in pinned memory (the stored parts, read then dropped, are not), and its
    values are those of the pageable read. Checked on any host by recording what torch.empty is asked for."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": (torch.randn(4, 6, generator=g) * 10).to(torch.float8_e4m3fn),
               "a.weight_scale_inv": torch.rand(2, 3, generator=g) + 0.5,
               "e.gate_up_proj_blocks": torch.randint(0, 256, (2, 6, 2, 16), generator=g, dtype=torch.uint8),
               "e.gate_up_proj_scales": torch.randint(120, 130, (2, 6, 2), generator=g, dtype=torch.uint8),
               "n.weight": torch.randn(6, generator=g), "z.weight": torch.empty(0, 6)}
    (tmp_path / "fp8").mkdir()
    (tmp_path / "mx").mkdir()
    fp8 = Checkpoint(_model_dir(tmp_path / "fp8", {k: v for k, v in tensors.items() if not k.startswith("e.")},
                                FP8_QC), torch.bfloat16)
    mx = Checkpoint(_model_dir(tmp_path / "mx", {k: v for k, v in tensors.items() if k.startswith("e.")},
                               {"quant_method": "mxfp4"}), torch.bfloat16)
    want = {k: fp8.get(k) for k in ("a.weight", "n.weight", "z.weight")} | {"e.gate_up_proj": mx.get("e.gate_up_proj")}
    asked: list[tuple[tuple[int, ...], bool]] = []
    real_empty = torch.empty

    def empty(shape: object, dtype: torch.dtype | None = None, pin_memory: bool = False, **kw: object) -> torch.Tensor:
        if isinstance(shape, (tuple, list, torch.Size)):
            asked.append((tuple(shape), pin_memory))
        return real_empty(shape, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    for key, expected in want.items():
        asked.clear()
        got = (mx if key.startswith("e.") else fp8).get(key, pin=True)
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected), key
        assert asked[-1] == (tuple(expected.shape), expected.numel() > 0), (key, asked)
        assert not any(pin for _, pin in asked[:-1]), (key, asked)


def _float_copy(src: Path, out: Path, dense: dict[str, torch.Tensor]) -> Path:
    """`out`: the quantized checkpoint `src`'s side files, its config without quantization_config, and the
    float tensors `dense` the test dequantized itself."""
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    save_file(dense, str(out / "model.safetensors"))
    return out


def _dequantized_copy(fp8: Path, out: Path) -> Path:
    """The FP8 checkpoint dequantized in memory, independently of the reader (float32), saved as float."""
    state = load_state_dict(fp8)
    block = json.loads((fp8 / "config.json").read_text())["quantization_config"]["weight_block_size"]
    dense: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = state[key + "_scale_inv"]
            w = torch.empty(t.shape)
            for i in range(0, t.shape[0], block[0]):
                for j in range(0, t.shape[1], block[1]):
                    w[i : i + block[0], j : j + block[1]] = t[i : i + block[0], j : j + block[1]].float() \
                        * s[i // block[0], j // block[1]]
            t = w
        dense[key] = t.float()
    return _float_copy(fp8, out, dense)


def test_fp8_deepseek_pruned_equals_dequantized_reference(family_model: Callable[[str], Path],
                                                          windows: torch.Tensor, tmp_path: Path) -> None:
    """Blocks of 16x16 (the tiny model's 24-row kv_a_proj_with_mqa and 24-wide q_b_proj are ragged), an MTP layer."""
    from transformers import AutoModelForCausalLM

    fp8 = tmp_path / "fp8"
    r = run_cli_tool("tools/make_quantized_checkpoint.py", str(family_model("deepseek_v3")), str(fp8), "--block", "16", "16",
                     "--mtp")
    assert r.returncode == 0, r.stderr
    stored = load_state_dict(fp8)
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 4)  # 24 x 64
    out = tmp_path / "out"
    assert main(["prune", str(fp8), str(out), *CALIB_ARGS, "--save-dtype", "float32"]) == 0
    written = load_state_dict(out)
    assert not any(k.endswith("_scale_inv") for k in written) and all(t.dtype != torch.float8_e4m3fn
                                                                       for t in written.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    report = json.loads((out / "wanda_stream.json").read_text())
    assert report["dequantized"] == {"quant_method": "fp8", "to": "float32"}
    assert config["num_nextn_predict_layers"] == 1
    dense = _dequantized_copy(fp8, tmp_path / "dense")
    ref, _ = _moe_reference(dense, windows, 0.5)
    want = load_state_dict(dense)
    # The MTP layer (model.layers.2, past the last block) is copied dequantized and unpruned.
    mtp = {k for k in want if k.startswith("model.layers.2.")}
    assert mtp and all(torch.equal(written[k], want[k]) for k in mtp)
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert set(got) == set(ref)
    for key, t in got.items():
        assert torch.equal(t, ref[key]), key
    # bfloat16 by default, and the preflight counts the dequantized size.
    ckpt = Checkpoint(fp8)
    want_bytes = sum(0 if k.endswith("_scale_inv") else t.numel() * (2 if t.dtype == torch.float8_e4m3fn
                                                                      else t.element_size())
                     for k, t in stored.items())
    assert ckpt.total_bytes() == want_bytes > sum(t.numel() * t.element_size() for t in stored.values())
    assert {ckpt.tensors[k].dtype for k in ckpt.keys() if k.endswith("proj.weight") and ".layers." in k} \
        == {torch.bfloat16}


def _mxfp4_dequantized_copy(mx: Path, out: Path) -> Path:
    """The MXFP4 checkpoint dequantized in memory by explicit loops over bytes, saved as float32."""
    lut = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    state = load_state_dict(mx)
    dense: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith("_scales"):
            continue
        if key.endswith("_blocks"):
            scales = state[key.removesuffix("_blocks") + "_scales"]
            n_exp, rows, groups, _ = t.shape
            w = torch.empty(n_exp, groups * 32, rows)
            for e in range(n_exp):
                for r in range(rows):
                    for g in range(groups):
                        mult = 2.0 ** (int(scales[e, r, g]) - 127)
                        for b in range(16):
                            byte = int(t[e, r, g, b])
                            w[e, g * 32 + 2 * b, r] = lut[byte & 0xF] * mult
                            w[e, g * 32 + 2 * b + 1, r] = lut[byte >> 4] * mult
            dense[key.removesuffix("_blocks")] = w
        else:
            dense[key] = t.float()
    return _float_copy(mx, out, dense)


def test_mxfp4_gpt_oss_pruned_equals_dequantized_reference(family_model: Callable[[str], Path],
                                                          windows: torch.Tensor, tmp_path: Path) -> None:
    """gpt-oss with MXFP4 experts: pruned streamed (float32 out) equals the model dequantized in memory and
    pruned by the reference; the output holds float fused experts under their own names."""
    from transformers import AutoModelForCausalLM

    mx = tmp_path / "mx"
    r = run_cli_tool("tools/make_quantized_checkpoint.py", str(family_model("gpt_oss")), str(mx), "--format", "mxfp4")
    assert r.returncode == 0, r.stderr
    stored = load_state_dict(mx)
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 64, 2, 16)
    out = tmp_path / "out"
    assert main(["prune", str(mx), str(out), *CALIB_ARGS, "--save-dtype", "float32"]) == 0
    written = load_state_dict(out)
    assert written["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 64)
    assert not any(k.endswith(("_blocks", "_scales")) for k in written)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    dense = _mxfp4_dequantized_copy(mx, tmp_path / "dense")
    ref, _ = _moe_reference(dense, windows, 0.5)
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert set(got) == set(ref)
    for key, t in got.items():
        assert torch.equal(t, ref[key]), key
    # Its experts streamed 3 at a time (rows 0-2, then 3, of the MXFP4 parts read alone): the same tensors.
    grouped = tmp_path / "grouped"
    assert main(["prune", str(mx), str(grouped), *CALIB_ARGS, "--save-dtype", "float32", "--expert-group", "3"]) == 0
    assert any(b.get("streamed_experts") for b in json.loads((grouped / "wanda_stream.json").read_text())["blocks"])
    again = load_state_dict(grouped)
    assert set(again) == set(written) and all(torch.equal(again[k], written[k]) for k in written)


def _scaled_dequantized_copy(src: Path, out: Path) -> Path:
    """A compressed-tensors or FBGEMM FP8 checkpoint dequantized by loops over rows and blocks (float32, independently
    of the reader), saved as float without the activations' scales."""
    state = load_state_dict(src)
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    weights = qc.get("config_groups", {}).get("group_0", {}).get("weights", {"strategy": "channel"})
    dense: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith("_scale"):  # weight_scale, gate_up_proj_scale, input_scale
            continue
        if t.dtype == torch.float8_e4m3fn:
            q, scale, w = t.float(), state[key + "_scale"].float(), torch.empty(t.shape)
            if q.dim() == 3:  # [experts, in, out]: one scale per expert and output column, stored either way round
                for e in range(q.shape[0]):
                    for o in range(q.shape[2]):
                        w[e, :, o] = q[e, :, o] * scale[e].flatten()[o]
            else:
                bo, bi = {"tensor": tuple(q.shape), "channel": (1, q.shape[1]), "group": (1, weights.get("group_size")),
                          "block": weights.get("block_structure")}[weights["strategy"]]
                scale = scale.reshape(-(-q.shape[0] // bo), -(-q.shape[1] // bi))
                for i in range(q.shape[0]):
                    for j in range(0, q.shape[1], bi):
                        w[i, j : j + bi] = q[i, j : j + bi] * scale[i // bo, j // bi]
            t = w
        dense[key] = t.float()
    return _float_copy(src, out, dense)


@pytest.mark.parametrize("family, args, flags", [
    ("llama", ["--format", "compressed-tensors", "--strategy", "tensor"], []),  # with static input_scale tensors
    ("llama", ["--format", "compressed-tensors", "--strategy", "block", "--block", "24", "24"], []),  # ragged
    ("llama4_text", ["--format", "fbgemm_fp8"], []),  # row-wise matrices and fused experts, attention not converted
    # per-expert FP8 experts (the hub's Qwen3-MoE FP8 layout), streamed one expert at a time
    ("qwen3_moe", ["--format", "compressed-tensors", "--strategy", "channel", "--per-expert"], ["--expert-group", "1"]),
], ids=["ct-tensor", "ct-block-ragged", "fbgemm-llama4", "ct-moe-streamed"])
def test_scaled_fp8_pruned_equals_its_dequantized_copy(family_model: Callable[[str], Path], tmp_path: Path,
                                                       family: str, args: list[str], flags: list[str]) -> None:
    """An FP8 copy pruned streamed writes the bytes its float copy, dequantized by loops, is pruned to; the output
    carries no quantization_config and loads in transformers with no missing or unexpected key."""
    from transformers import AutoModelForCausalLM

    fp8 = tmp_path / "fp8"
    r = run_cli_tool("tools/make_quantized_checkpoint.py", str(family_model(family)), str(fp8), *args)
    assert r.returncode == 0, r.stderr
    stored = load_state_dict(fp8)
    assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) >= 8
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert main(["prune", str(fp8), str(out), *CALIB_ARGS, "--save-dtype", "float32", *flags]) == 0
    assert main(["prune", str(_scaled_dequantized_copy(fp8, tmp_path / "dense")), str(ref), *CALIB_ARGS,
                 "--save-dtype", "float32", *flags]) == 0
    written, want = load_state_dict(out), load_state_dict(ref)
    assert set(written) == set(want) and not any(k.endswith("_scale") for k in written)
    for key, t in want.items():
        assert torch.equal(written[key], t), key
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    method = json.loads((fp8 / "config.json").read_text())["quantization_config"]["quant_method"]
    report = json.loads((out / "wanda_stream.json").read_text())
    assert report["dequantized"] == {"quant_method": method, "to": "float32"}
    assert any(b.get("streamed_experts") for b in report["blocks"]) == bool(flags)
    _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def run_cli_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a script of tools/ with this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def test_fp8_killed_and_resumed_is_identical(family_model: Callable[[str], Path], tmp_path: Path) -> None:
    """Killed after block 0 and again after the side files (config.json rewritten), the resumed run of an FP8
    checkpoint ends byte-identical to an uninterrupted one."""
    from wanda_stream.storage.state import KILL_ENV

    fp8 = tmp_path / "fp8"
    r = run_cli_tool("tools/make_quantized_checkpoint.py", str(family_model("deepseek_v3")), str(fp8), "--block", "16",
                     "16", "--mtp")
    assert r.returncode == 0, r.stderr
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["prune", str(fp8), str(ref), *CALIB_ARGS]) == 0
    for n, point in enumerate(["block_done:1", "finalize"]):
        r = run_cli("prune", str(fp8), str(out), *CALIB_ARGS, *(["--resume"] if n else []), env={KILL_ENV: point})
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-2000:])
    r = run_cli("prune", str(fp8), str(out), *CALIB_ARGS, "--resume")
    assert r.returncode == 0, r.stderr
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_save_dtype_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prune", str(tmp_path / "none"), str(tmp_path / "out"), "--save-dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--save-dtype 'int8'" in err

