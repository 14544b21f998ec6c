"""--expert-group: MoE blocks whose routed experts are read, observed, pruned and written a group at a time.

The streamed run against the whole-block run (the same tensors, the same evaluation) and against the
independent REAP reference; what it reads at once; kills, stops and resumes; the refusals; the shard
feed and the shard writer that takes pieces in any order; the per-token buffers in scratch files when the activation budget
has no room for them (the same bytes, kills, the preflight)."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.helpers import checkpoint_files, load_state_dict, run_cli
from tests.reference_experts import reference_reap
from tests.test_experts_drop import COUNT, GROUPS, MAKERS, moe_model, windows  # noqa: F401 (fixtures)
from tests.test_families import CALIB_ARGS
from wanda_stream import commands
from wanda_stream.cli import main
from wanda_stream.errors import InputError, Interrupted
from wanda_stream.model.stream import Streamer
from wanda_stream.run import resources
from wanda_stream.run.expert_groups import ShardFeed
from wanda_stream.storage import state as state_mod
from wanda_stream.storage.checkpoint import write_shard_pieces
from wanda_stream.storage.spill import BatchFile

REPORT = "wanda_stream.json"
EVAL = ["--eval-data", "pydoc", "--eval-windows", "4"]
SPILL = ["--max-activation-memory", "1KB"]  # no room in memory: a streamed block's buffers go to scratch files


def _prune(src: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert main(["prune", str(src), str(out), *CALIB_ARGS, *extra]) == 0
    return json.loads((out / REPORT).read_text())


def _close_tensors(a: Path, b: Path, rel: float = 2e-3) -> None:
    """Block 0's tensors (the same inputs in both runs) bit for bit; the later blocks' the same zeros and
    within `rel` of each other in norm. Refits (least squares on a few hundred tokens) carry the rounding
    of their inputs about a thousandfold: 4e-4 and 6e-4 measured on qwen2_moe, hence 2e-3 by default."""
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k] == 0, sb[k] == 0), k
        if not k.startswith("model.layers.") or k.startswith("model.layers.0."):
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert float((sa[k] - sb[k]).norm()) <= rel * float(sa[k].norm()), k


def _same_record(a: object, b: object, rel: float) -> None:
    """Records equal in everything but their floats, which agree within `rel`."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _same_record(a[k], b[k], rel)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_record(x, y, rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9)
    else:
        assert a == b


def _same_tensors(a: Path, b: Path) -> None:
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family,flags", [
    ("deepseek_v3", ["--sparsity", "0.5"]),
    ("deepseek_v3", ["--drop-experts", "0.25", "--sparsity", "0.5", "--method", "sparsegpt"]),
    ("qwen2_moe", ["--pattern", "2:4"]),
    ("mixtral", ["--drop-experts", "0.25", "--sparsity", "0.5", "--method", "ria"]),
    ("glm4_moe", ["--sparsity", "0.6", "--method", "magnitude"]),
    ("qwen3_next", ["--sparsity", "0.5"]),
    ("gpt_oss", ["--sparsity", "0.5", "--method", "sparsegpt"]),
    ("gpt_oss", ["--drop-experts", "0.25", "--sparsity", "0.5"]),
    ("llama4_text", ["--sparsity", "0.5", "--method", "sparsegpt"]),
    ("llama4_text", ["--drop-experts", "0.5", "--pattern", "2:4"]),
    ("qwen2_moe", ["--drop-heads", "0.5", "--drop-ffn", "0.25", "--sparsity", "0.5"]),
    ("mixtral", ["--drop-heads", "0.5", "--drop-experts", "0.25", "--sparsity", "0.5", "--method", "sparsegpt"]),
])
def test_streamed_equals_whole_blocks(family: str, flags: list[str], moe_model: Callable[[str], Path],
                                      tmp_path: Path) -> None:
    """Groups of 3 (the last one short) give the whole block's tensors to the bit, its evaluation and its
    output errors within rounding (the experts' sum is added to the rest of the block in another order)."""
    src = moe_model(family)
    whole = _prune(src, tmp_path / "whole", *flags, *EVAL, "--expert-group", "0")
    streamed = _prune(src, tmp_path / "streamed", *flags, *EVAL, "--expert-group", "3")
    refit = "--drop-heads" in flags or "--drop-ffn" in flags
    # Llama 4's whole block runs every expert on every token (unrouted rows zero), a streamed one each expert
    # on its routed rows alone: matmuls of other shapes, which round otherwise (1e-7 in down_proj's inputs).
    rounded = refit or family == "llama4_text"
    if rounded:
        # A later block's refit is a least-squares fit to its inputs, which carry the rounding of the
        # experts' other order of addition: the same structures and masks, the weights within rounding.
        _close_tensors(tmp_path / "whole", tmp_path / "streamed", 2e-3 if refit else 1e-5)  # 1.6e-6 measured
    else:
        _same_tensors(tmp_path / "whole", tmp_path / "streamed")
    rel = 1e-5 if rounded else 1e-6
    assert (tmp_path / "whole" / "config.json").read_bytes() == (tmp_path / "streamed" / "config.json").read_bytes()
    assert streamed["eval"]["perplexity"] == pytest.approx(whole["eval"]["perplexity"], rel=rel)
    notes = [b.get("streamed_experts") for b in streamed["blocks"]]
    assert any(notes) and not any(b.get("streamed_experts") for b in whole["blocks"])
    for w, s in zip(whole["blocks"], streamed["blocks"]):
        if w.get("output_error") is None:  # no calibration (magnitude)
            assert s.get("output_error") is None
        else:
            assert s["output_error"] == pytest.approx(w["output_error"], rel=rel, abs=1e-9)
        assert sorted(m["name"] for m in s["matrices"]) == sorted(m["name"] for m in w["matrices"])
        if "structure" in w:
            if rounded and w["block"] > 0:  # the same choices; the refits' errors within their rounding
                _same_record(s["structure"], w["structure"], rel=2e-3)
            else:
                assert s["structure"] == w["structure"]


@pytest.mark.parametrize("family,ratio", [("mixtral", 0.25), ("deepseek_v3", 0.25)])
def test_streamed_reap_matches_reference(family: str, ratio: float, moe_model: Callable[[str], Path],
                                         windows: torch.Tensor, tmp_path: Path) -> None:  # noqa: F811
    """Streamed in groups of 2, REAP keeps the independent reference's experts with its saliencies and token
    counts, and the output's logits are the reference model's."""
    from transformers import AutoModelForCausalLM

    src = moe_model(family)
    report = _prune(src, tmp_path / "out", "--drop-experts", str(ratio), "--expert-group", "2")
    ref = reference_reap(str(src), windows, ratio, COUNT[family], GROUPS.get(family))
    got = {i: next(iter(b["structure"]["experts"].values())) for i, b in enumerate(report["blocks"])
           if b.get("structure", {}).get("experts")}
    assert sorted(got) == sorted(ref.kept)
    for i, p in got.items():
        assert p["kept"] == ref.kept[i] and p["tokens"] == ref.tokens[i]
        assert p["saliency"] == pytest.approx(ref.saliency[i], rel=1e-5, abs=1e-9)
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True,
                                                       dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.allclose(model.eval()(windows, use_cache=False).logits,
                              ref.model(windows, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[tuple[str, Any]]], list[list[str]]]:
    """Lists that fill, as a run goes, with each group read's parts and each block read's keys."""
    reads: list[list[tuple[str, Any]]] = []
    blocks: list[list[str]] = []
    read_parts, read_block = Streamer.read_parts, Streamer._read_block

    def spy_read(self: Streamer, parts: list[tuple[str, Any]]) -> Any:
        reads.append(list(parts))
        return read_parts(self, parts)

    def spy_block(self: Streamer, i: int) -> Any:
        got = read_block(self, i)
        blocks.append(list(got[0]))
        return got

    monkeypatch.setattr(Streamer, "read_parts", spy_read)
    monkeypatch.setattr(Streamer, "_read_block", spy_block)
    return reads, blocks


def test_streamed_block_reads_one_group_at_a_time(moe_model: Callable[[str], Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed block's read leaves its routed experts out; they come in reads of at most a group."""
    src = moe_model("deepseek_v3")
    parts, blocks = _spy_reads(monkeypatch)
    _prune(src, tmp_path / "out", "--sparsity", "0.5", "--expert-group", "3")
    assert all(rows is None for r in parts for _, rows in r)  # per-expert tensors: each read whole
    reads = [[k for k, _ in r] for r in parts]
    # 8 experts of 3 parts (gate, up, down) in groups of 3, 3, 2: every expert read once.
    assert [len(r) for r in reads] == [9, 9, 6]
    assert sorted(k for r in reads for k in r) == sorted(k for k in load_state_dict(src) if ".mlp.experts." in k)
    assert not any(".mlp.experts." in k for b in blocks for k in b)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_fused_experts_are_read_by_their_rows(family: str, moe_model: Callable[[str], Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-oss and Llama 4 store every expert in one tensor per part: a streamed block's read leaves those
    tensors out, and each group reads its rows of each of them (at most a group's), every row once."""
    src = moe_model(family)
    stored = load_state_dict(src)
    fused = sorted(k for k in stored if ".experts." in k)
    assert fused
    reads, blocks = _spy_reads(monkeypatch)
    _prune(src, tmp_path / "out", "--sparsity", "0.5", "--expert-group", "3")
    assert reads and all(rows is not None and rows[1] - rows[0] <= 3 for r in reads for _, rows in r)
    for key in fused:
        got = sorted(e for r in reads for k, rows in r if k == key for e in range(*rows))
        assert got == list(range(stored[key].shape[0])), key
    assert not any(k in fused for b in blocks for k in b)


def test_streamed_kills_and_stops_resume_identical(moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    """Killed between groups, while the shard is written and after a block, or stopped (SIGTERM, exit 75)
    between groups: --resume finishes to the uninterrupted run's bytes."""
    src = moe_model("deepseek_v3")
    flags = ["--drop-experts", "0.25", "--sparsity", "0.5", "--expert-group", "2"]
    one = tmp_path / "one"
    _prune(src, one, *flags)
    killed = tmp_path / "killed"
    for point in ("hidden_write:2", "expert_group:2", "shard_write:2", "block_done:1", "finalize"):
        r = run_cli("prune", str(src), str(killed), *CALIB_ARGS, *flags, "--resume", env={state_mod.KILL_ENV: point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
    assert main(["prune", str(src), str(killed), *CALIB_ARGS, *flags, "--resume"]) == 0
    assert checkpoint_files(killed) == checkpoint_files(one)
    stopped = tmp_path / "stopped"
    r = run_cli("prune", str(src), str(stopped), *CALIB_ARGS, *flags, env={state_mod.KILL_ENV: "expert_group:1:TERM"})
    assert r.returncode == 75, r.stderr[-2000:]
    assert "--resume" in r.stderr
    assert main(["prune", str(src), str(stopped), *CALIB_ARGS, *flags, "--resume"]) == 0
    assert checkpoint_files(stopped) == checkpoint_files(one)


@pytest.mark.parametrize("family,extra,needle", [
    ("deepseek_v3", ["--reconstruct"], "--reconstruct"),
    ("mixtral", [], "cannot run its experts a group at a time"),  # an MoE family the table does not describe
])
def test_streamed_refusals(family: str, extra: list[str], needle: str, moe_model: Callable[[str], Path],
                           tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanda_stream.model import families

    if needle.startswith("cannot"):
        monkeypatch.setitem(families.STRUCTURE, family, families.Structure())
    src = moe_model(family)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["prune", str(src), str(out), *CALIB_ARGS, "--expert-group", "2", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--expert-group" in err[0] and needle in err[0], err
    assert not out.exists() or not any(out.glob("*.safetensors"))


def test_expert_group_flag_value(moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    r = run_cli("prune", str(moe_model("mixtral")), str(tmp_path / "out"), *CALIB_ARGS, "--expert-group", "some")
    assert r.returncode == 2 and "--expert-group" in r.stderr and "Traceback" not in r.stderr


# ---- the parts ---------------------------------------------------------------------------------------------
def test_stacked_routes_and_contributions_make_the_llama4_moe_output() -> None:
    """Llama 4's MoE module (top-2 here, so a token's experts sit in either slot), recorded through its router:
    the experts module is handed one copy of the inputs, not one per expert, and the module returns its
    shared expert's part; every expert's contribution on its rows, two groups held in turn, added to that
    gives the module's output."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from wanda_stream.run.expert_groups import Routing, contribution, holding

    torch.manual_seed(0)
    config = Llama4TextConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    moe = Llama4TextMoe(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 5, 16)
    seen: list[tuple[int, ...]] = []
    with torch.no_grad():
        want = moe(x)[0]
        handle = moe.experts.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
        with Routing(moe.experts, moe.router).recording() as calls:
            core = moe(x)[0]
        handle.remove()
        assert seen == [(10, 16)]  # one copy of the 10 tokens, not 4
        assert torch.equal(core, moe.shared_expert(x.reshape(-1, 16)))
        (r,) = calls
        assert r.scaled and torch.equal(r.x, x.reshape(-1, 16))
        sums, routed = torch.zeros_like(core), 0
        for group in ([0, 1], [2, 3]):
            held = {"gate_up_proj": moe.experts.gate_up_proj[group[0]:group[-1] + 1],
                    "down_proj": moe.experts.down_proj[group[0]:group[-1] + 1]}
            with holding(moe.experts, held, len(group)):
                for local, e in enumerate(group):
                    got = contribution(moe.experts, r, e, local)
                    assert got is not None
                    y, token = got
                    assert torch.equal(token, token.sort().values)  # token order, as the whole block's rows
                    sums.index_add_(0, token, y)
                    routed += token.numel()
    assert routed == 10 * 2
    assert torch.allclose(core + sums, want, atol=1e-5, rtol=1e-5)


def test_window_bytes_counts_llama4_stacked_experts() -> None:
    """A whole Llama 4 MoE block copies its inputs once per expert: the activation estimate of a window covers
    the copies and the gate/up and expert outputs that its experts module makes (measured by hooks), which
    for 16 experts outweigh everything else it counts; a streamed block's estimate leaves them out."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = Llama4TextConfig(hidden_size=64, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=16,
                              num_experts_per_tok=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    moe = Llama4TextMoe(config).eval()
    made: list[int] = []
    moe.experts.register_forward_pre_hook(lambda m, a: made.append(2 * a[0].nbytes))  # copied, then scaled
    real_bmm = torch.bmm

    def bmm(*args: torch.Tensor) -> torch.Tensor:  # the gate/up outputs, then the experts' outputs
        out = real_bmm(*args)
        made.append(out.nbytes)
        return out

    seqlen = 64
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bmm", bmm)
        moe(torch.randn(1, seqlen, 64))
    one = Llama4TextConfig(**{**config.to_dict(), "num_local_experts": 1})
    assert len(made) == 3
    assert resources.window_bytes(config, seqlen, torch.float32) >= sum(made) > resources.window_bytes(
        one, seqlen, torch.float32)
    # Streamed, the block hands its experts module one copy of the inputs (see the test above): not counted.
    assert resources.window_bytes(config, seqlen, torch.float32, streamed=True) < sum(made) / 2


def test_shard_feed_hands_over_in_order_and_bounds_what_waits() -> None:
    feed = ShardFeed(limit=8)
    a, b, c = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)  # 8 bytes each
    feed.put("a", a)
    blocked = threading.Event()
    done = threading.Event()

    def producer() -> None:
        blocked.set()
        feed.put("b", b)  # waits: 'a' (8 bytes) still waits for the writer
        feed.put("c", c)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    blocked.wait()
    assert not done.wait(0.2)
    pieces = feed.pieces()
    got = [next(pieces) for _ in range(3)]
    assert [(k, first) for k, first, _ in got] == [("a", 0), ("b", 0), ("c", 0)]
    assert all(t is want for (_, _, t), want in zip(got, (a, b, c)))
    t.join(5)
    assert done.is_set()


def test_shard_feed_stop_and_failure() -> None:
    feed = ShardFeed(limit=1 << 20)
    feed.stop()
    with pytest.raises(Interrupted):
        next(feed.pieces())
    feed = ShardFeed(limit=1 << 20)
    feed.fail(OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        feed.put("x", torch.zeros(1))


def test_write_shard_pieces_in_any_order_loads(tmp_path: Path) -> None:
    """Rows of a tensor written as they come, interleaved with other tensors: the file loads, every tensor as
    given; a row given twice is refused, and the file is not renamed into place."""
    from safetensors import safe_open

    tensors = {"z": torch.arange(12.0).reshape(4, 3), "a": torch.arange(4, dtype=torch.int64),
               "m": torch.ones(2, 2), "s": torch.tensor(7.0), "e": torch.zeros(0, 3)}
    items = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    pieces = [("z", 2, tensors["z"][2:]), ("a", 0, tensors["a"]), ("m", 1, tensors["m"][1:]), ("s", 0, tensors["s"]),
              ("z", 0, tensors["z"][:2]), ("e", 0, tensors["e"]), ("m", 0, tensors["m"][:1])]
    write_shard_pieces(tmp_path / "s.safetensors", items, iter(pieces))
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
    with pytest.raises(RuntimeError, match="does not fit"):
        write_shard_pieces(tmp_path / "t.safetensors", items, iter([("z", 0, tensors["z"]), ("z", 3, tensors["z"][3:])]))
    assert not (tmp_path / "t.safetensors").exists()


def test_disk_full_while_a_streamed_shard_is_written_then_resume(moe_model: Callable[[str], Path],
                                                                  tmp_path: Path) -> None:
    """A real ENOSPC while a streamed block's shard is written from its groups' rows (gpt-oss's fused
    experts): the run pauses after its first group, the disk is filled, the run fails with one line, and
    --resume after freeing the space finishes to the uninterrupted run's bytes."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT
    from tests.test_bad_input import _fill_while_stopped, _mount_tmpfs

    src = moe_model("gpt_oss")
    flags = ["--sparsity", "0.5", "--expert-group", "2"]
    one = tmp_path / "one"
    _prune(src, one, *flags)
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out"
        proc = subprocess.Popen([sys.executable, "-m", "wanda_stream", "prune", str(src), str(out), *CALIB_ARGS,
                                 *flags], cwd=ROOT, env={**os.environ, state_mod.KILL_ENV: "expert_group:1:STOP"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def part_written() -> None:
            assert list(out.glob("model-*.safetensors.partial")), "the block's shard should be part-written"

        _fill_while_stopped(proc, disk / "filler", part_written)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = [line for line in err.strip().splitlines() if line.startswith("wanda-stream")]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
        assert "Traceback" not in err
        (disk / "filler").unlink()
        assert main(["prune", str(src), str(out), *CALIB_ARGS, *flags, "--resume"]) == 0
        assert checkpoint_files(out) == checkpoint_files(one)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


@pytest.mark.parametrize("family,group", [("qwen3_moe", "1"), ("gpt_oss", "2"), ("llama4_text", "3")])
def test_streamed_two_ranks_equal_one_process(family: str, group: str, moe_model: Callable[[str], Path],
                                              tmp_path: Path) -> None:
    """Under 2 gloo ranks (each a share of the windows), streamed REAP and Wanda give one process's bytes,
    per-expert tensors and fused ones (gpt-oss, Llama 4: the kept experts' rows written group by group)."""
    from tests.test_dist import finish, launch

    src = moe_model(family)
    flags = ["--drop-experts", "0.5", "--sparsity", "0.5", "--expert-group", group]
    one = tmp_path / "one"
    _prune(src, one, *flags)
    two = tmp_path / "two"
    results = finish(launch(["prune", str(src), str(two), *CALIB_ARGS, *flags]))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    assert checkpoint_files(two) == checkpoint_files(one)
    report = json.loads((two / REPORT).read_text())
    assert any(b.get("streamed_experts") for b in report["blocks"])


def test_streamed_sweep_equals_single_runs(moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    """A sweep shares each streamed block's core read; every configuration reads its own expert groups and
    writes what its single run writes."""
    src = moe_model("deepseek_v3")
    assert main(["prune", str(src), str(tmp_path / "sweep"), *CALIB_ARGS, "--expert-group", "3",
                 "--sweep", "a=wanda:0.5,b=sparsegpt:2:4"]) == 0
    _prune(src, tmp_path / "a", "--expert-group", "3", "--method", "wanda", "--sparsity", "0.5")
    _prune(src, tmp_path / "b", "--expert-group", "3", "--method", "sparsegpt", "--pattern", "2:4")
    for name in ("a", "b"):
        _same_tensors(tmp_path / name, tmp_path / "sweep" / name)


@pytest.mark.parametrize("family,flags", [
    ("deepseek_v3", ["--sparsity-profile", "owl", "--sparsity", "0.6"]),
    ("gpt_oss", ["--sparsity-profile", "owl", "--sparsity", "0.6"]),
    ("llama4_text", ["--sparsity-profile", "owl", "--sparsity", "0.6"]),
    ("qwen2_moe", ["--drop-blocks", "1", "--sparsity", "0.5"]),
    ("qwen2_moe", ["--drop-blocks", "1", "--block-score", "angular", "--drop-experts", "0.25",
                   "--sparsity-profile", "owl", "--sparsity", "0.5"]),
])
def test_streamed_dense_pass_equals_whole_blocks(family: str, flags: list[str], moe_model: Callable[[str], Path],
                                                 tmp_path: Path) -> None:
    """The pass over the dense model (OWL's outlier ratios, --drop-blocks' scores) on streamed blocks: the
    same ratios and scores within rounding, the same blocks removed, the same tensors."""
    src = moe_model(family)
    whole = _prune(src, tmp_path / "whole", *flags, "--expert-group", "0")
    streamed = _prune(src, tmp_path / "streamed", *flags, "--expert-group", "3")
    _same_tensors(tmp_path / "whole", tmp_path / "streamed")
    for key in ("sparsity_profile", "structure"):
        if key not in whole:
            continue
        w, s = whole[key], streamed[key]
        for name in ("outlier_ratios", "block_sparsity", "influence", "angular", "removal_error"):
            if name in w:
                assert s[name] == pytest.approx(w[name], rel=1e-6, abs=1e-9), name
        if key == "structure":
            assert s["dropped_blocks"] == w["dropped_blocks"]


# ---- a streamed block's per-token buffers in scratch files --------------------------------------------------
def _outputs(out: Path) -> dict[str, str]:
    """The output's files by hash, but the model card (its command line names the flags that differ)."""
    return {k: v for k, v in checkpoint_files(out).items() if k != "README.md"}


def _computed(report: dict[str, Any]) -> dict[str, Any]:
    """What a run computed, from its report: blocks without timings or the buffers' placement, evaluation,
    profile, structure, sparsity."""
    blocks = []
    for b in report["blocks"]:
        b = {k: v for k, v in b.items() if k not in ("seconds", "timing")}
        if "streamed_experts" in b:
            b["streamed_experts"] = {k: v for k, v in b["streamed_experts"].items()
                                     if k not in ("expert_read_wait_s", "token_buffers")}
        blocks.append(b)
    keys = ("eval", "sparsity_profile", "structure", "total_sparsity", "parameters")
    return {"blocks": blocks, **{k: report[k] for k in keys if k in report}}


def _buffers(report: dict[str, Any]) -> set[str]:
    return {b["streamed_experts"]["token_buffers"] for b in report["blocks"] if "streamed_experts" in b}


@pytest.mark.parametrize("family,flags", [
    ("deepseek_v3", ["--drop-experts", "0.25", "--sparsity", "0.5", "--method", "sparsegpt", *EVAL]),
    ("qwen2_moe", ["--pattern", "2:4", *EVAL]),
    ("mixtral", ["--drop-experts", "0.25", "--sparsity", "0.5", "--method", "ria"]),
    ("qwen3_next", ["--sparsity", "0.5"]),
    ("deepseek_v3", ["--sparsity-profile", "owl", "--sparsity", "0.6"]),
    ("qwen2_moe", ["--drop-blocks", "1", "--block-score", "angular", "--drop-experts", "0.25",
                   "--sparsity-profile", "owl", "--sparsity", "0.5"]),
])
def test_spilled_buffers_give_the_same_bytes(family: str, flags: list[str], moe_model: Callable[[str], Path],
                                             tmp_path: Path) -> None:
    """A budget without room for a streamed block's per-token buffers puts them in scratch files: the same
    output bytes and the same report values (errors, perplexity, REAP's and OWL's scores, the records) as the
    run that holds them in memory, and no scratch left in a kept work dir. The hidden states stay on disk in
    both runs, so the buffers are all that differs."""
    src = moe_model(family)
    held = _prune(src, tmp_path / "held", *flags, "--expert-group", "3", "--states-on-disk")
    work = tmp_path / "work"
    spilled = _prune(src, tmp_path / "spilled", *flags, "--expert-group", "3", "--states-on-disk", *SPILL,
                     "--work-dir", str(work), "--keep-work-dir")
    assert _buffers(held) == {"host"} and _buffers(spilled) == {"disk"}
    assert _outputs(tmp_path / "spilled") == _outputs(tmp_path / "held")
    assert _computed(spilled) == _computed(held)
    assert work.is_dir() and not list(work.glob("spill-*"))


def test_spilled_kills_and_stops_resume_identical(moe_model: Callable[[str], Path], tmp_path: Path) -> None:
    """Killed while a spilled block rewrites its scratch (while REAP scores the groups, and while the pruned
    groups run), between groups, while the block's outputs are written from the scratch and after the block:
    the kill leaves scratch behind, the resume discards it and restarts the block, and the run ends with the
    bytes of the run that held its buffers in memory and no scratch. A clean stop deletes its scratch."""
    src = moe_model("deepseek_v3")
    flags = ["--drop-experts", "0.25", "--sparsity", "0.5", "--expert-group", "2", *EVAL]
    one = tmp_path / "one"
    _prune(src, one, *flags)
    killed, work = tmp_path / "killed", tmp_path / "work"
    args = ["prune", str(src), str(killed), *CALIB_ARGS, *flags, *SPILL, "--work-dir", str(work), "--keep-work-dir"]
    for point in ("spill_write:3", "spill_write:14", "expert_group:2", "hidden_write:3", "block_done:1"):
        r = run_cli(*args, "--resume", env={state_mod.KILL_ENV: point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        if point.startswith("spill_write"):
            assert list(work.glob("spill-*")), point
    assert main([*args, "--resume"]) == 0
    assert _outputs(killed) == _outputs(one)
    assert _buffers(json.loads((killed / REPORT).read_text())) == {"disk"}
    assert not list(work.glob("spill-*"))
    stopped, work = tmp_path / "stopped", tmp_path / "work2"
    args = ["prune", str(src), str(stopped), *CALIB_ARGS, *flags, *SPILL, "--work-dir", str(work), "--keep-work-dir"]
    r = run_cli(*args, env={state_mod.KILL_ENV: "spill_write:5:TERM"})
    assert r.returncode == 75, r.stderr[-2000:]
    assert not list(work.glob("spill-*"))
    assert main([*args, "--resume"]) == 0
    assert _outputs(stopped) == _outputs(one)


def test_preflight_counts_buffers_that_do_not_fit_memory_on_disk(moe_model: Callable[[str], Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """RAM that holds the run but not a streamed block's per-token buffers beside it, an eighth of which (the
    activation budget) does not hold them: the preflight counts them on the work dir's disk, not in RAM, and
    the run spills them and writes the bytes of one that held them. With disk for all but them it refuses in
    one line (exit 2) and creates nothing; with memory for them that disk is enough."""
    src = moe_model("deepseek_v3")
    seen: list[tuple[Any, ...]] = []
    check = commands.check_resources
    monkeypatch.setattr(commands, "check_resources", lambda *a, **k: (seen.append(a), check(*a, **k))[1])
    held = _prune(src, tmp_path / "held", "--expert-group", "3")
    cfg, sk, total, blocks, _, _, streamed = seen[-1]
    assert streamed and _buffers(held) == {"host"}
    hidden, el = sk.hidden_size(), 4
    base = resources.host_ram_needed(max(resources.block_host_bytes(b, "cpu", el) for b in blocks), cfg.batch_size,
                                     cfg.seqlen, hidden, el, 1)
    buffers = resources.streamed_buffers_bytes(2 * cfg.nsamples * cfg.seqlen, hidden, cfg.dtype)
    vm = namedtuple("vm", "available total")
    monkeypatch.setattr(commands.psutil, "virtual_memory", lambda: vm(base + buffers - 1, 10**12))
    plan = commands.preflight_plans(cfg, sk, 0, 1, streamed=True)[0]
    assert (plan.buffers_bytes, plan.buffers) == (buffers, "disk")  # counted in RAM, it would not fit
    spilled = _prune(src, tmp_path / "spilled", "--expert-group", "3")
    assert _buffers(spilled) == {"disk"}
    assert _outputs(tmp_path / "spilled") == _outputs(tmp_path / "held")

    out = tmp_path / "refused"
    fresh = dataclasses.replace(cfg, output_dir=str(out), work_dir=str(out / ".wanda-stream"))
    room = sum(n for _, n, _ in commands.disk_needs(fresh, sk, total, 0)) + buffers // 2
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(commands.shutil, "disk_usage", lambda path: usage(10 * room, 9 * room, room))
    capsys.readouterr()
    assert main(["prune", str(src), str(out), *CALIB_ARGS, "--expert-group", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs about" in err[0] and "free for" in err[0], err
    assert not out.exists()
    # Where the work dir's file system is the one short of room, the line names the buffers.
    with pytest.raises(InputError, match=r"hidden states and a streamed block's per-token buffers"):
        commands.check_disk(commands.disk_needs(fresh, sk, total, 0, 4 * room)[1:])
    monkeypatch.setattr(commands.psutil, "virtual_memory", lambda: vm(10**12, 10**12))
    commands.check_resources(fresh, sk, total, blocks, 0, 1, streamed=True)


# ---- the parts ---------------------------------------------------------------------------------------------
def test_buffers_go_where_the_budget_leaves_room() -> None:
    """Beside the micro-batch's activations and the hidden states kept in the same memory, device first."""
    place = resources.place
    cpu = {"host": 1000}
    assert place(300, 100, cpu, {"host": 600}) == "host" and place(301, 100, cpu, {"host": 600}) == "disk"
    assert place(900, 100, cpu) == "host"  # states on disk take nothing
    cuda = {"device": 1000, "host": 500}
    assert place(300, 100, cuda, {"device": 600}) == "device"
    assert place(301, 100, cuda, {"device": 600}) == "host"  # the activations stay on the device
    assert place(200, 100, cuda, {"host": 300}) == "device" and place(901, 100, cuda, {"host": 300}) == "disk"
    assert place(200, 900, cuda, {"host": 300}) == "host"  # no room on the device beside its activations
    assert place(201, 900, cuda, {"host": 300}) == "disk"  # the states kept in RAM take its room


def test_the_plan_puts_buffers_beside_every_runs_states() -> None:
    """resources.memory_plan for a streamed block: its buffers (calibration tokens twice, others once) go
    where the budget leaves them room beside the activations and the states of all a sweep's runs."""
    from tests.helpers import tiny_llama_config

    config, f32, Plan = tiny_llama_config(), torch.float32, resources.MemoryPlan
    streams = [("calib", 8, 32)]
    states = resources.resident_states_bytes([(8, 32)], 64, f32)
    acts = resources.window_bytes(config, 32, f32)  # micro-batches of 1 window
    buffers = resources.streamed_buffers_bytes(2 * 8 * 32, 64, f32)

    def plan(budget: int, streams: list[tuple[str, int, int]] = streams, **kw: Any) -> resources.MemoryPlan:
        return resources.memory_plan(streams, 64, f32, config=config, batch_size=1, seqlen=32,
                                     budgets={"host": budget}, streamed=True, **kw)

    assert plan(states + acts + buffers) == Plan("host", states, "host", buffers)
    assert plan(states + acts + buffers - 1) == Plan("host", states, "disk", buffers)
    assert plan(acts + buffers, states_on_disk=True) == Plan("disk", 0, "host", buffers)
    assert plan(acts + buffers - 1, states_on_disk=True) == Plan("disk", 0, "disk", buffers)
    # Two runs: each run's states fit its half, and the buffers go beside both runs' states.
    assert plan(2 * states + acts + buffers, runs=2) == Plan("host", states, "host", buffers)
    assert plan(2 * states + acts + buffers - 1, runs=2) == Plan("host", states, "disk", buffers)
    assert plan(10**9, [("calib", 8, 32), ("eval", 4, 16)]).buffers_bytes == resources.streamed_buffers_bytes(
        2 * 8 * 32 + 4 * 16, 64, f32)
    assert resources.memory_plan(streams, 64, f32, config=config, batch_size=1, seqlen=32, budgets={"host": 10**9}
                                 ) == Plan("host", states)  # no block streams: no buffers


@pytest.mark.parametrize("threads", [False, True])
def test_batch_file_round_trip_and_rewrite(tmp_path: Path, threads: bool) -> None:
    pool = ThreadPoolExecutor(1) if threads else None
    try:
        f = BatchFile(tmp_path / "spill-calib-00001.bin", pool)
        made = [[torch.randn(3, 4), torch.arange(6).view(3, 2), torch.randn(3, 2).to(torch.bfloat16)]
                for _ in range(3)]
        for rec in made:
            f.append(rec)
        assert len(f) == 3
        f.rewrite(1, 2, torch.ones(3, 2, dtype=torch.bfloat16))
        made[1][2] = torch.ones(3, 2, dtype=torch.bfloat16)
        for got, rec in zip(f.records(range(1, 3)), made):
            assert [t.dtype for t in got] == [torch.int64, torch.bfloat16]
            assert all(torch.equal(a, b) for a, b in zip(got, rec[1:]))
        assert torch.equal(f.read(2, range(0, 1))[0], made[2][0])
        with pytest.raises(ValueError):
            f.rewrite(0, 0, torch.zeros(4, 3))
        first = next(iter(f.records(range(3))))  # left early: the read ahead is waited for
        assert torch.equal(first[0], made[0][0])
        f.delete()
        assert not list(tmp_path.iterdir())
    finally:
        if pool is not None:
            pool.shutdown()
