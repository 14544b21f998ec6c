"""Hidden states held in memory between blocks: the same bytes as read back from disk, files that are
resume points written behind the computation, and resumes from them (also switching placement).

The CUDA placements (device memory; page-locked host memory) run only where CUDA is.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import checkpoint_files, run_cli, tiny_llama_config, write_tiny_model
from tests.test_resume import REPORT, prune_args, report_core
from wanda_stream.run import prune as prune_mod
from wanda_stream.run import resources
from wanda_stream.storage import state as state_mod
from wanda_stream.storage.activations import HiddenFile, HiddenWriter, Mover, batches, read_ahead
from wanda_stream.cli import main


# ---- the writer and the mover ---------------------------------------------------------------
def _windows(n: int = 5, seqlen: int = 3, hidden: int = 4) -> torch.Tensor:
    return torch.randn(n, seqlen, hidden, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("threads", [True, False])
def test_kept_states_are_the_files_bytes_and_the_file_waits_for_wait_durable(tmp_path: Path, threads: bool) -> None:
    data = _windows()
    mover = Mover(torch.device("cpu"), threads=threads)
    kept = HiddenFile(tmp_path / "kept.bin", *data.shape, torch.float32)
    plain = HiddenFile(tmp_path / "plain.bin", *data.shape, torch.float32)
    try:
        w = HiddenWriter(kept, mover, keep=torch.device("cpu"), defer=True)
        d = HiddenWriter(plain, mover)
        for start, count in batches(5, 2):
            w.write(data[start : start + count])
            d.write(data[start : start + count])
        d.commit()
        assert plain.path.is_file() and plain.memory is None
        w.commit()
        assert kept.memory is not None and torch.equal(kept.memory, data)
        # A view of memory, no file read: the next block's inputs do not touch the disk.
        assert kept.read(2, 2).data_ptr() == kept.memory[2].data_ptr()
        assert list(read_ahead(kept, batches(5, 2), mover.reader))[1][2].data_ptr() == kept.memory[2].data_ptr()
        assert kept.wait_durable() >= 0.0
        assert kept.path.read_bytes() == plain.path.read_bytes()
        assert not kept.path.with_name("kept.bin.partial").exists()
        kept.memory = None
        assert torch.equal(kept.read(0, 5), data)  # from the file once memory is let go
    finally:
        mover.close()


def test_deferred_commit_is_not_durable_until_waited(tmp_path: Path) -> None:
    """With `defer`, commit returns before the fsync and rename: the writer thread does them."""
    data = _windows()
    mover = Mover(torch.device("cpu"), threads=True)
    try:
        target = HiddenFile(tmp_path / "x.bin", *data.shape, torch.float32)
        w = HiddenWriter(target, mover, keep=torch.device("cpu"), defer=True)
        hold = threading.Event()
        mover.writer.submit(hold.wait)  # the writer thread is busy: nothing of this file is written yet
        w.write(data)
        w.commit()
        assert not target.path.exists() and torch.equal(target.memory, data)
        hold.set()
        target.wait_durable()
        assert target.path.read_bytes() == data.numpy().tobytes()
        assert target.wait_durable() == 0.0  # once only
    finally:
        mover.close()


def test_a_failed_write_behind_surfaces_at_wait_durable(tmp_path: Path) -> None:
    data = _windows()
    mover = Mover(torch.device("cpu"), threads=True)
    try:
        target = HiddenFile(tmp_path / "x.bin", *data.shape, torch.float32)
        w = HiddenWriter(target, mover, keep=torch.device("cpu"), defer=True)
        w.f.close()  # every write to it now fails
        w.write(data)
        w.commit()
        with pytest.raises(ValueError):
            target.wait_durable()
        assert not target.path.exists()
    finally:
        mover.close()


def test_abort_keeps_nothing(tmp_path: Path) -> None:
    data = _windows()
    mover = Mover(torch.device("cpu"), threads=True)
    try:
        target = HiddenFile(tmp_path / "x.bin", *data.shape, torch.float32)
        w = HiddenWriter(target, mover, keep=torch.device("cpu"), defer=True)
        w.write(data[:2])
        w.abort()
        assert target.memory is None and not list(tmp_path.iterdir())
    finally:
        mover.close()


# ---- where the states go ----------------------------------------------------------------------
def test_activation_budgets_default_to_a_share_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resources.activation_budgets("cpu", 150) == {"host": 150}
    assert resources.activation_budgets("cuda:0", 150) == {"host": 150, "device": 150}
    # Without a budget: an eighth of the available RAM, shared by the node's ranks.
    monkeypatch.setattr(resources.psutil, "virtual_memory", lambda: type("VM", (), {"available": 8000})())
    assert resources.activation_budgets("cpu") == {"host": 1000}
    assert resources.activation_budgets("cpu", ranks_per_node=2) == {"host": 500}
    # CUDA: a quarter of the free device memory as well.
    monkeypatch.setattr(resources.torch.cuda, "mem_get_info", lambda device=None: (4000, 8000))
    assert resources.activation_budgets("cuda:0") == {"host": 1000, "device": 1000}


CONFIG = tiny_llama_config()
STREAMS = [("calib", 4, 32), ("eval", 2, 16)]
RESIDENT = resources.resident_states_bytes([(4, 32), (2, 16)], 64, torch.float32)
ACTIVATIONS = 2 * resources.window_bytes(CONFIG, 32, torch.float32)  # a micro-batch of the longest windows


def _plan(streams: list[tuple[str, int, int]], budgets: dict[str, int], **kw: Any) -> resources.MemoryPlan:
    return resources.memory_plan(streams, 64, torch.float32, config=CONFIG, batch_size=2, seqlen=32,
                                 budgets=budgets, **kw)


def test_states_go_where_the_budget_holds_them_beside_the_activations() -> None:
    Plan = resources.MemoryPlan
    assert _plan(STREAMS, {"host": RESIDENT + ACTIVATIONS}) == Plan("host", RESIDENT)
    assert _plan(STREAMS, {"host": RESIDENT + ACTIVATIONS - 1}) == Plan("disk", 0)
    # CUDA: the device first, beside the activations; else the host, where the activations are not.
    assert _plan(STREAMS, {"device": RESIDENT + ACTIVATIONS, "host": 0}) == Plan("device", RESIDENT)
    assert _plan(STREAMS, {"device": RESIDENT + ACTIVATIONS - 1, "host": RESIDENT}) == Plan("host", RESIDENT)
    assert _plan(STREAMS, {"device": RESIDENT + ACTIVATIONS - 1, "host": RESIDENT - 1}) == Plan("disk", 0)
    # A sweep's runs keep their states side by side: each gets its share of the budget.
    assert _plan(STREAMS, {"host": 2 * (RESIDENT + ACTIVATIONS)}, runs=2) == Plan("host", RESIDENT)
    assert _plan(STREAMS, {"host": 2 * (RESIDENT + ACTIVATIONS) - 1}, runs=2) == Plan("disk", 0)
    assert _plan(STREAMS, {"host": 10**9}, states_on_disk=True) == Plan("disk", 0)
    assert _plan([], {"host": 10**9}) == Plan("disk", 0)  # nothing to keep


def test_a_calibration_stream_not_run_keeps_nothing() -> None:
    """Without calibration the calib stream takes no memory and sets no window length."""
    eval_only = resources.resident_states_bytes([(2, 16)], 64, torch.float32)
    short = 2 * resources.window_bytes(CONFIG, 16, torch.float32)
    assert _plan(STREAMS, {"host": eval_only + short}, calibration=False) == resources.MemoryPlan("host", eval_only)
    assert _plan(STREAMS, {"host": eval_only + short - 1}, calibration=False).states == "disk"


def test_resident_bytes_count_two_sets_per_stream() -> None:
    assert resources.resident_states_bytes([(4, 32), (2, 16)], 64, torch.float32) == 2 * (4 * 32 + 2 * 16) * 64 * 4


def _rank_plans(model: Path, out: Path, runs: int, *extra: str, budget: int | None = None
                ) -> tuple[list[resources.MemoryPlan], list[resources.MemoryPlan]]:
    """The preflight's plans of 2 ranks (from the config) and the plans their runs make from the windows
    each holds (PruneRun.my_streams, PruneRun.plan_memory), for `runs` runs of a sweep and a block
    streaming its experts; no rank is launched."""
    from types import SimpleNamespace

    from wanda_stream import commands
    from wanda_stream.cli import build_parser
    from wanda_stream.run.dist import World
    from wanda_stream.run.prune import PruneRun

    cfg, (_, sk, _) = commands.build_prune_config(build_parser().parse_args(prune_args(model, out, *extra)), 2)
    cfg = dataclasses.replace(cfg, activation_budget=budget)
    toks = {"calib": torch.zeros(cfg.nsamples, cfg.seqlen, dtype=torch.long),
            "eval": torch.zeros(cfg.eval_windows, cfg.eval_seqlen or cfg.seqlen, dtype=torch.long)}
    ran: list[resources.MemoryPlan] = []
    for rank in range(2):
        run = SimpleNamespace(cfg=cfg, sk=sk, world=World(rank, 2, rank, 2), sweep_runs=runs, streamed={1: "plan"},
                              st=SimpleNamespace(hidden=sk.hidden_size(), device=torch.device("cpu")))
        ran.append(PruneRun.plan_memory(run, PruneRun.my_streams(run, toks)))
    return commands.preflight_plans(cfg, sk, cfg.eval_windows, 2, runs, streamed=True), ran


def test_the_preflight_plans_what_each_rank_of_a_sweep_plans(model: Path, tmp_path: Path) -> None:
    """5 calibration windows in micro-batches of 2 make 2 and 3 windows on 2 ranks (not 3 each), beside 2 of
    the 4 evaluation windows each, under a budget that holds one run's states beside the activations but
    not two runs' of a sweep: the preflight plans what each rank's run plans."""
    hidden, el = 64, 4
    per_window = 2 * 32 * hidden * el  # two sets of a window's float32 states
    activations = 2 * resources.window_bytes(tiny_llama_config(), 32, torch.float32)
    extra = ("--nsamples", "5", "--eval-windows", "4")
    plans: dict[int, list[resources.MemoryPlan]] = {}
    for runs in (1, 2):
        preflight, ran = _rank_plans(model, tmp_path / "out", runs, *extra, budget=5 * per_window + activations)
        assert preflight == ran, runs
        plans[runs] = preflight
    tokens = [2 * 2 * 32 + 2 * 32, 2 * 3 * 32 + 2 * 32]  # calibration tokens twice (dense and pruned passes)
    assert [p.buffers_bytes for p in plans[1]] == [3 * t * hidden * el for t in tokens]
    assert [(p.states, p.resident_bytes) for p in plans[1]] == [("host", 4 * per_window), ("host", 5 * per_window)]
    assert [p.states for p in plans[2]] == ["disk", "disk"]


def test_the_preflight_leaves_out_a_share_a_rank_does_not_get(model: Path, tmp_path: Path) -> None:
    """2 evaluation windows of 64 tokens make one micro-batch, the second rank's: the first holds none, so
    its plan has neither their bytes nor their length's activations, in the preflight as in the run."""
    extra = ("--eval-windows", "2", "--eval-seqlen", "64")
    first = 2 * 2 * 32 * 64 * 4  # its 2 calibration windows' states
    budget = first + 2 * resources.window_bytes(tiny_llama_config(), 32, torch.float32)  # beside 32-token windows
    preflight, ran = _rank_plans(model, tmp_path / "out", 1, *extra, budget=budget)
    assert preflight == ran
    assert [(p.states, p.resident_bytes) for p in ran] == [("host", first), ("disk", 0)]


# ---- whole runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("states") / "model")


def _core(out: Path) -> dict[str, Any]:
    rep = report_core(out)
    rep.pop("hidden_states")
    for k in ("states_on_disk", "activation_budget"):  # how to hold the states, not what they are
        rep["config"].pop(k)
    return rep


def _same(out: Path, ref: Path, card: bool = True) -> None:
    got, want = checkpoint_files(out), checkpoint_files(ref)
    if not card:  # the model card shows the command line, which differs
        got.pop("README.md"), want.pop("README.md")
    assert got == want
    assert _core(out) == _core(ref)


@pytest.fixture(scope="module")
def on_disk(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: hidden states read back from their files every block."""
    out = tmp_path_factory.mktemp("disk") / "out"
    assert main(prune_args(model, out, "--states-on-disk", "--quiet")) == 0
    assert json.loads((out / REPORT).read_text())["hidden_states"] == {"placement": "disk", "resident_bytes": 0}
    return out


@pytest.mark.parametrize("extra", [(), ("--sparsity-profile", "owl", "--method", "sparsegpt")],
                         ids=["wanda", "sparsegpt-owl"])
def test_states_in_memory_give_the_bytes_of_states_on_disk(model: Path, tmp_path: Path, extra: tuple[str, ...],
                                                           on_disk: Path) -> None:
    ref = on_disk
    if extra:
        ref = tmp_path / "disk"
        assert main(prune_args(model, ref, *extra, "--states-on-disk", "--quiet")) == 0
    out = tmp_path / "memory"
    assert main(prune_args(model, out, *extra, "--quiet")) == 0
    placed = json.loads((out / REPORT).read_text())["hidden_states"]
    # calibration 4 x 32 and evaluation 2 x 32 windows of the tiny model's 64-wide states, float32, two sets
    assert placed == {"placement": "host", "resident_bytes": 2 * (4 + 2) * 32 * 64 * 4}
    _same(out, ref)


def test_budget_too_small_for_the_states_keeps_them_on_disk(model: Path, tmp_path: Path, on_disk: Path) -> None:
    out = tmp_path / "out"
    assert main(prune_args(model, out, "--max-activation-memory", "10KB", "--quiet")) == 0
    assert json.loads((out / REPORT).read_text())["hidden_states"]["placement"] == "disk"
    _same(out, on_disk, card=False)


def _kill(model: Path, out: Path, point: str, *extra: str) -> None:
    r = run_cli(*prune_args(model, out, *extra, "--resume", "--quiet"), env={state_mod.KILL_ENV: point})
    assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])


def test_killed_after_a_block_with_states_in_memory_resumes_to_the_same_bytes(model: Path, tmp_path: Path,
                                                                             on_disk: Path) -> None:
    """Kills while a file written behind the compute is held back 2 s before its rename (block 1's
    calibration inputs: the main thread, at block 1's save by then, must wait for it, or the saved
    state would name a block whose inputs are not there), right after a block is recorded, and
    mid-way through a block's outputs."""
    out = tmp_path / "out"
    for point, resumes_at in (("hidden_commit:3:KILL:2", 0), ("block_done:1", 1), ("hidden_write:2", 1)):
        _kill(model, out, point)
        saved = json.loads((out / ".wanda-stream" / "state.json").read_text())
        assert saved["next_block"] == resumes_at, point
        for name in ("calib", "eval"):
            assert (out / ".wanda-stream" / f"{name}_{resumes_at:05d}.bin").is_file(), (point, name)
    r = run_cli(*prune_args(model, out, "--resume", "--quiet"))
    assert r.returncode == 0, r.stderr
    _same(out, on_disk)


def test_resume_may_switch_between_memory_and_disk(model: Path, tmp_path: Path, on_disk: Path) -> None:
    out = tmp_path / "out"
    _kill(model, out, "block_done:1", "--states-on-disk")
    _kill(model, out, "block_done:1")
    assert main(prune_args(model, out, "--resume", "--states-on-disk", "--quiet")) == 0
    _same(out, on_disk)


# ---- CUDA: device memory and page-locked host memory ------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_cuda_placements_give_the_same_bytes(model: Path, tmp_path: Path, placement: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--device", "cuda"]
    ref = tmp_path / "ref"
    assert main(prune_args(model, ref, *args, "--states-on-disk", "--quiet")) == 0
    # Budgets that leave the states room only in the memory asked for (in none for disk).
    budgets = {"device": {"device": 10**9, "host": 0}, "host": {"device": 0, "host": 10**9},
               "disk": {"device": 0, "host": 0}}[placement]
    monkeypatch.setattr(prune_mod, "activation_budgets", lambda *a, **k: budgets)
    out = tmp_path / "out"
    assert main(prune_args(model, out, *args, "--quiet")) == 0
    assert json.loads((out / REPORT).read_text())["hidden_states"]["placement"] == placement
    _same(out, ref)


@cuda
def test_cuda_pinned_reads_and_side_stream_writes(tmp_path: Path) -> None:
    data = _windows().cuda()
    for keep in (torch.device("cuda"), torch.device("cpu"), None):
        mover = Mover(torch.device("cuda"), threads=True)
        try:
            target = HiddenFile(tmp_path / f"{keep}.bin", *data.shape, torch.bfloat16)
            w = HiddenWriter(target, mover, keep=keep, defer=keep is not None)
            for start, count in batches(5, 2):
                w.write(data[start : start + count] * 1)  # a temporary, freed at once by the caller
            w.commit()
            target.wait_durable()
            want = data.to(torch.bfloat16).cpu()
            assert torch.equal(HiddenFile(target.path, *data.shape, torch.bfloat16).read(0, 5), want)
            if keep is not None:
                assert target.memory.device.type == keep.type and torch.equal(target.memory.cpu(), want)
                assert keep.type == "cuda" or target.memory.is_pinned()
            else:
                assert target.read(0, 2, pin=True).is_pinned()
        finally:
            mover.close()


# ---- a block's weights: the stored tensors, widened per call ---------------------------------------
def test_a_narrow_block_computes_what_its_wide_copy_does(tmp_path: Path) -> None:
    """bf16 weights computed on in float32: the block's linears hold the very bf16 tensors read, and
    widen them only during their call; outputs are bit-identical to a block materialized in float32."""
    from torch import nn

    from wanda_stream.model.skeleton import materialize
    from wanda_stream.model.stream import Streamer, _DictCheckpoint, open_model

    model_dir = write_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    st = Streamer(*open_model(model_dir), "cpu", torch.float32, prefetch=False)
    try:
        stored, _ = st.block_tensors(0)
        x = torch.randn(2, 16, st.hidden, generator=torch.Generator().manual_seed(1))
        kwargs = st.block_kwargs(2, 16)[0]
        layer = st.load_block(0, stored)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        ptrs = {t.data_ptr() for t in stored.values()}
        assert linears and all(m.weight.dtype == torch.bfloat16 and m.weight.data_ptr() in ptrs
                               for m in linears.values())
        seen = []
        handles = [m.register_forward_hook(lambda m, a, o: seen.append(m.weight.dtype)) for m in linears.values()]
        with torch.no_grad():
            narrow = layer(x, **kwargs)
        for h in handles:
            h.remove()
        assert all(m.weight.dtype == torch.bfloat16 for m in linears.values())  # narrow again after the call
        view = _DictCheckpoint(st.ckpt.root, st.sk.layout.to_params(stored))
        materialize(layer, st.sk.block_prefix(0), view, st.device, torch.float32, {}, st.sk.model)
        assert all(m.weight.dtype == torch.float32 for m in linears.values())
        with torch.no_grad():
            wide = layer(x, **kwargs)
        narrow, wide = (o[0] if isinstance(o, tuple) else o for o in (narrow, wide))
        assert narrow.dtype == torch.float32 and torch.equal(narrow, wide)
        # The wide copy is gone before later forward hooks (the observers') run.
        assert seen == [torch.bfloat16] * len(linears)
    finally:
        st.close()


def test_the_embedding_stays_narrow_and_block_0_inputs_are_the_wide_tables(tmp_path: Path) -> None:
    """bf16 embedding computed on in float32: the table is the bf16 tensor read (a float32 copy of
    llama-3-70b's is 4.2 GB) and the rows looked up are cast; block 0's inputs are bit-identical to
    transformers' with the whole model loaded in float32."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from wanda_stream.model.stream import Streamer, open_model

    model_dir = write_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    st = Streamer(*open_model(model_dir), "cpu", torch.float32, prefetch=False)
    try:
        table = st.sk.model.get_input_embeddings()
        assert type(table) is nn.Embedding
        seen: list[tuple[torch.dtype, torch.dtype]] = []
        handle = table.register_forward_hook(lambda m, a, o: seen.append((m.weight.dtype, o.dtype)))
        ids = torch.randint(0, st.sk.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
        out = HiddenFile(tmp_path / "h0.bin", 3, 16, st.hidden, torch.float32)
        assert st.embed_windows(ids, out, batch=2)
        handle.remove()
        # The hook that casts runs after this one: the table was bf16 during the lookup, the output float32.
        assert seen and all(w == torch.bfloat16 for w, _ in seen)
        got = out.read(0, 3)
    finally:
        st.close()
    wide = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        want = wide(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)
