"""The CUDA path's own logic, checked here on the CPU: torch.cuda and torch.distributed calls are
replaced by recorders where a card or NCCL would be needed, and everything else runs for real.

Agreements ride on a gloo group beside NCCL and only timeouts or lost connections become exit 75;
each rank binds its own card (the only visible one under SLURM --gpus-per-task), also in the
background threads; a run resumes on another card index; float16 checkpoints compute in bfloat16
where the card has it, and non-finite statistics stop the run naming the block; the report's CUDA
peaks are reset at the start, read at the end, allocated and reserved, the maximum over ranks; the
RAM preflight counts pinned blocks as the allocator rounds them, and the pinned pool is bounded;
the head's chunks are sized from free device memory and come back in one copy. And the code written
since, where the compute device and the host differ (the meta device stands in for the card): structured
plans computed where the statistics are, ranks without observations reducing on the compute device,
REAP's sums made on the host, --reconstruct's fit under deterministic attention.
"""

from __future__ import annotations

import datetime
import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import tiny_llama_config, write_tiny_model
from wanda_stream import commands
from wanda_stream.run import config as config_mod
from wanda_stream.run import dist as dist_mod
from wanda_stream.eval import loglik
from wanda_stream.run import report
from wanda_stream.model import stream
from wanda_stream.cli import main
from wanda_stream.run.config import RunConfig, resolve_compute_dtype
from wanda_stream.run.dist import PeerLost, World, is_peer_loss, rank_cuda_index
from wanda_stream.errors import InputError
from wanda_stream.run.resources import block_host_bytes, pinned_bytes
from wanda_stream.storage.state import check_same_run


# ---- item 3 and 4: agreements on gloo, and which errors are a lost peer ---------------------
@pytest.mark.parametrize("message", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40217",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation",
    "Read error [127.0.0.1]:6000: Connection reset by peer",
    "[Rank 1] Work WorkNCCL(SeqNum=7, OpType=ALLREDUCE) timed out in blocking wait (TORCH_NCCL_BLOCKING_WAIT=1)",
    "NCCL error in: ProcessGroupNCCL.cpp:1971, remote process exited or there was a network error, NCCL version 2.21.5",
])
def test_lost_peers_and_timeouts_are_peer_loss(message: str) -> None:
    assert is_peer_loss(RuntimeError(message))
    with pytest.raises(PeerLost, match="another rank stopped answering"):
        World(rank=0, size=2)._collective(lambda: (_ for _ in ()).throw(RuntimeError(message)))


@pytest.mark.parametrize("message", [
    "NCCL error in: ProcessGroupNCCL.cpp:1971, invalid usage (run with NCCL_DEBUG=WARN for details)",
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB",
    "NCCL error in: ProcessGroupNCCL.cpp:1971, unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
])
def test_other_collective_errors_stay_errors(message: str) -> None:
    """A configuration error or an OOM is no lost peer: exit 1 with the traceback, never 75 (a requeue loop)."""
    assert not is_peer_loss(RuntimeError(message))
    with pytest.raises(RuntimeError, match="NCCL error|out of memory") as info:
        World(rank=0, size=2)._collective(lambda: (_ for _ in ()).throw(RuntimeError(message)))
    assert not isinstance(info.value, PeerLost)
    assert is_peer_loss(dist.DistNetworkError("anything"))


def test_rank_cuda_index() -> None:
    assert [rank_cuda_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert rank_cuda_index(5, 1) == 0  # SLURM --gpus-per-task: each rank sees its one card as cuda:0
    with pytest.raises(InputError, match="LOCAL_RANK 3: only 2 CUDA device"):
        rank_cuda_index(3, 2)


class _Recorder:
    """torch.distributed and torch.cuda calls of a 2-rank CUDA launch, recorded instead of made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        rec = self.calls.append
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: rec(("set_device", d)))
        monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: rec(("init", backend, timeout)))
        monkeypatch.setattr(dist, "new_group", lambda backend, timeout: (rec(("group", backend, timeout)),
                                                                         f"gloo-{timeout.total_seconds():g}")[1])

        def all_reduce(t: torch.Tensor, op: object = None, group: object = None, async_op: bool = False) -> object:
            rec(("all_reduce", t.device.type, group))
            return type("Work", (), {"wait": lambda self: True})() if async_op else None

        def all_gather_object(out: list, obj: object, group: object = None) -> None:
            out[:] = [obj] * len(out)
            rec(("all_gather_object", group))

        def broadcast_object_list(box: list, src: int, group: object = None) -> None:
            box[0] = ("ok", 1)  # rank 0's answer
            rec(("broadcast", group))

        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
        monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)


def test_cuda_ranks_agree_on_gloo_and_bind_their_card(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder(monkeypatch)
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    world = World.from_env("cuda", timeout_s=60)
    assert world.backend == "nccl" and world.device("cuda") == "cuda:0"  # the one card this rank sees
    assert dist_mod.os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    minute, day = datetime.timedelta(seconds=60), datetime.timedelta(seconds=dist_mod.SETUP_TIMEOUT_S)
    assert rec.calls == [("set_device", 0), ("init", "nccl", minute), ("group", "gloo", minute),
                         ("group", "gloo", day)]
    rec.calls.clear()
    world.any(True)
    world.gather({"x": 1})
    world.on_main(lambda: 1)
    world.on_main(lambda: 1, setup=True)
    world.sum_(torch.zeros(3))
    assert rec.calls == [("all_reduce", "cpu", "gloo-60"), ("all_gather_object", "gloo-60"), ("broadcast", "gloo-60"),
                         ("broadcast", f"gloo-{dist_mod.SETUP_TIMEOUT_S:g}"), ("all_reduce", "cpu", None)]


# ---- item 8: every thread of a rank on its own card --------------------------------------
def test_streamer_binds_its_card_in_every_thread(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append((threading.current_thread().name, d)))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)  # the Mover's side streams, on a CPU host
    ckpt, sk = stream.open_model(tiny_model)
    st = stream.Streamer(ckpt, sk, "cuda:1", torch.float32)
    try:
        for pool in (st._reader, st.mover.reader, st.mover.writer):
            pool.submit(lambda: None).result()
    finally:
        st.close()
    names = sorted(name.split("_")[0] for name, _ in bound)
    assert names == ["MainThread", "hidden-read", "hidden-write", "prefetch"], bound
    assert {d for _, d in bound} == {torch.device("cuda:1")}


def test_cpu_streamer_touches_no_card(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device on a CPU run"))
    ckpt, sk = stream.open_model(tiny_model)
    st = stream.Streamer(ckpt, sk, "cpu", torch.float32)
    st._reader.submit(lambda: None).result()
    st.close()


# ---- item 9: the device type, not the card, is part of the run ---------------------------
def test_a_cuda_run_resumes_on_another_card(tmp_path: Path) -> None:
    base = dict(model_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "o"), work_dir=str(tmp_path / "o" / "w"))
    auto, card1, cpu = (RunConfig(**base, device=d) for d in ("cuda", "cuda:1", "cpu"))
    assert auto.fingerprint() == card1.fingerprint() != cpu.fingerprint()
    check_same_run({"config": auto.to_json(), "model_fingerprint": {"sha256": "x"}}, card1, {"sha256": "x"}, tmp_path)
    with pytest.raises(InputError, match="device: 'cuda' -> 'cpu'"):
        check_same_run({"config": auto.to_json(), "model_fingerprint": {"sha256": "x"}}, cpu, {"sha256": "x"}, tmp_path)
    # CPU runs keep the fingerprints they always had: the field's value is unchanged for them.
    assert cpu.result_fields()["device"] == "cpu"


# ---- item 11: float16 checkpoints and non-finite statistics ------------------------------
def test_auto_compute_dtype_of_float16_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod.torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_compute_dtype("auto", "cuda", torch.float16) == "bfloat16"
    assert resolve_compute_dtype("auto", "cuda:1", torch.bfloat16) == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu", torch.float16) == "float32"
    assert resolve_compute_dtype("float16", "cuda", torch.float16) == "float16"  # asked for: kept
    monkeypatch.setattr(config_mod.torch.cuda, "is_bf16_supported", lambda: False)  # a V100
    assert resolve_compute_dtype("auto", "cuda", torch.float16) == "float16"


def _overflowing_model(tmp_path: Path) -> Path:
    """A tiny float16 Llama whose block-0 MLP activations overflow float16 (gate and up weights x3000:
    each ~500, their product ~2.5e5 > 65504)."""
    model = write_tiny_model(tmp_path / "fp16", tiny_llama_config(), dtype=torch.float16)
    keys = {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"}
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            if not keys & set(f.keys()):
                continue
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        for key in keys & set(tensors):
            tensors[key] = tensors[key] * 3000
        save_file(tensors, str(shard), metadata=meta)
    return model


def test_non_finite_statistics_stop_naming_the_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, out = _overflowing_model(tmp_path), tmp_path / "out"
    capsys.readouterr()
    args = ["prune", str(model), str(out), "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
            "--batch-size", "2", "--quiet"]
    assert main([*args, "--compute-dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("wanda-stream: error: block 0: the calibration statistics of 'mlp.down_proj' are not finite (the "
                   "activations overflow float16); rerun with --compute-dtype float32 (or bfloat16) and --overwrite"), err
    assert main([*args, "--compute-dtype", "float32", "--overwrite"]) == 0  # the fix the message names works


# ---- item 10: CUDA peaks ------------------------------------------------------------------
def test_cuda_peaks_allocated_reserved_and_max_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    resets: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 300)
    report.reset_peaks("cuda:1")
    report.reset_peaks("cpu")
    assert resets == [torch.device("cuda:1")]
    got = report.peak_figures("cuda:1", [{"peak_rss_bytes": 1, "peak_cuda_bytes": 500, "peak_cuda_reserved_bytes": 200}])
    assert got["peak_cuda_bytes"] == 500 and got["peak_cuda_reserved_bytes"] == 300 and got["peak_rss_bytes"] > 1
    assert set(report.peak_figures("cpu")) == {"peak_rss_bytes"}


def test_report_peaks_are_read_after_the_evaluation(tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The peaks come last: a figure read before the final evaluation would miss the head's logits."""
    from wanda_stream.run import prune

    order: list[str] = []
    real_nll, real_peaks = stream.Streamer.final_nll, prune.peak_figures
    monkeypatch.setattr(stream.Streamer, "final_nll", lambda *a: (order.append("eval"), real_nll(*a))[1])
    monkeypatch.setattr(prune, "peak_figures", lambda *a: (order.append("peaks"), real_peaks(*a))[1])
    assert main(["prune", str(tiny_model), str(tmp_path / "out"), "--calib", "pydoc", "--nsamples", "2", "--seqlen",
                 "32", "--device", "cpu", "--batch-size", "2", "--eval-data", "pydoc", "--eval-windows", "2",
                 "--quiet"]) == 0
    # Every peak read (each rank's, gathered; rank 0's for the report) comes after the evaluation.
    assert "eval" in order and "peaks" not in order[: order.index("eval")] and order[-1] == "peaks"


# ---- item 7: host RAM of pinned blocks -----------------------------------------------------
def test_pinned_sizes_are_the_allocators() -> None:
    assert [pinned_bytes(n) for n in (0, 1, 3, 4, 5, 90_177_536)] == [0, 1, 4, 4, 8, 134_217_728]
    # A 7B MLP matrix (11008 x 4096 bf16, 86 MiB) takes 128 MiB pinned; the CPU path counts float32 copies.
    assert block_host_bytes([90_177_536], "cuda:0", 2) == 134_217_728
    assert block_host_bytes([90_177_536], "cpu", 4) == 2 * 90_177_536


def test_ram_preflight_on_cuda_counts_pinned_blocks(tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    ckpt, sk = stream.open_model(tiny_model)
    blocks = [[t.nbytes for k, t in ckpt.tensors.items() if k.startswith(sk.block_prefix(i))] for i in range(sk.n_layers)]
    cfg = RunConfig(str(tiny_model), str(tmp_path / "o"), str(tmp_path / "o" / "w"), device="cuda", seqlen=32,
                    batch_size=1, calib="pydoc", nsamples=2, compute_dtype="bfloat16")
    pinned = 3 * max(sum(pinned_bytes(n) for n in b) for b in blocks)
    states = 4 * 32 * sk.hidden_size() * 2
    vm = namedtuple("vm", "available total")
    monkeypatch.setattr(commands.psutil, "virtual_memory", lambda: vm(2 * (pinned + states) - 1, 10**12))
    with pytest.raises(InputError, match=r"RAM \(pinned for the GPU.*on this node.*run fewer ranks per node"):
        commands.check_resources(cfg, sk, ckpt.total_bytes(), blocks, 0, ranks_per_node=2)
    commands.check_resources(cfg, sk, ckpt.total_bytes(), blocks, 0, ranks_per_node=1)


def test_pin_budget_bounds_the_pinned_pool() -> None:
    budget = stream.PinBudget(3 * 1024)
    first, second = [torch.zeros(150), torch.zeros(100)], [torch.zeros(150), torch.zeros(100)]  # 600 + 400 bytes
    for block in (first, second):
        assert budget.take([t.nbytes for t in block])  # 1024 + 512 as the allocator rounds them: two fit
        budget.track(block)
    assert budget.live == 2 * 1536
    assert not budget.take([600, 400])  # a third would pass the limit: read into pageable memory
    del first  # the oldest block is written and dropped: its share comes back
    gc.collect()
    assert budget.live == 1536 and budget.take([600, 400])


# ---- the head: chunks from free memory, one copy back ---------------------------------------
def test_logit_chunks_from_free_cuda_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    free = 120 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free, 141 * 2**30))
    vocab = 128_256
    rows = stream.logit_chunk_rows(vocab, torch.device("cuda:0"), torch.bfloat16)
    assert rows & (rows - 1) == 0 and rows * vocab * 14 <= free // 8 < 2 * rows * vocab * 14
    assert rows >= 8192  # a micro-batch of 4 x 2048 in one matmul, where 32 MB chunks took 65 rows
    assert stream.logit_chunk_rows(vocab, torch.device("cpu"), torch.float32) == 32 * 2**20 // (vocab * 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1000, 141 * 2**30))
    assert stream.logit_chunk_rows(vocab, torch.device("cuda:0"), torch.bfloat16) == 1


def test_token_scores_copy_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    hidden, targets = torch.randn(10, 7, generator=g), torch.randint(0, 7, (10,), generator=g)
    whole = loglik.token_scores(lambda h: h * 3, hidden, targets, chunk_rows=10)
    copies: list[int] = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (copies.append(1), real_cpu(self, *a, **k))[1])
    logp, greedy = loglik.token_scores(lambda h: h * 3, hidden, targets, chunk_rows=3)
    assert len(copies) == 1  # four chunks, one synchronisation
    assert torch.equal(logp, whole[0]) and torch.equal(greedy, whole[1]) and greedy.dtype == torch.bool
    assert torch.equal(logp, torch.log_softmax(hidden * 3, -1).gather(1, targets[:, None])[:, 0])


# ---- the newer code (structured plans, REAP, ranks, --reconstruct): device of the statistics vs the host --
# On a CPU run the statistics and the stored tensors share one device; on CUDA the statistics are on the card
# and the stored tensors on the host. The meta device stands in for the card here: an op that mixes it with a
# CPU tensor raises as CUDA would, and the host syncs that read a value (float(t), int(t)) get a placeholder.
@pytest.fixture
def meta_scalars(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("__float__", 1.0), ("__int__", 0)):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real, value=value: value if self.is_meta else real(self))


def test_structured_plans_compute_on_the_statistics_device(meta_scalars: None) -> None:
    """--drop-ffn/--drop-heads: the scores and the refit run where the observations are (the card), on the
    stored weight read on the host; the refit comes back on the card for widths to move home."""
    from wanda_stream.methods import plans

    w = torch.randn(3, 6)  # the stored consumer weight, on the host
    assert plans.channel_scores(torch.ones(6, device="meta"), w).device.type == "meta"
    assert plans.head_scores(torch.ones(6, device="meta"), w, 2).device.type == "meta"
    stats = plans.InputStats(torch.ones(6, device="meta"), torch.ones(6, 6, device="meta"))
    fit = plans.fit_consumer(w, stats, torch.tensor([0, 2, 3, 5]))
    assert fit.weight.device.type == "meta" and tuple(fit.weight.shape) == (3, 4)


def test_a_rank_without_observations_reduces_on_the_compute_device() -> None:
    """A rank none of whose tokens reached a streamed group's experts has no observation: its share of the
    sums (NCCL needs CUDA tensors) and the totals it prunes with are on the compute device all the same."""
    from wanda_stream.methods import Observation, Stat
    from wanda_stream.methods.observe import BlockStats, reduce_stats

    other = [{"groups": {"e[0]": "e[0]", "e[1]": "e[1]"}, "kinds": {"e[0]": "sq_sum", "e[1]": "gram"},
              "widths": {"e[0]": 4, "e[1]": 4}, "tokens": {"e[0]": 3, "e[1]": 5}, "experts": {}},
             {"e[0]": [torch.ones(1, 4, dtype=torch.float64)]}]
    summed: list[torch.device] = []

    class Ranks(World):
        def gather(self, obj: object) -> list:
            return [obj, other.pop(0)]

        def sum_(self, t: torch.Tensor) -> torch.Tensor:
            summed.append(t.device)
            return t

    got = reduce_stats(Ranks(rank=0, size=2), BlockStats({}), torch.device("meta"))
    assert {n: o.stat.device.type for n, o in got.obs.items()} == {"e[0]": "meta", "e[1]": "meta"}
    assert [d.type for d in summed] == ["meta"] and got.obs["e[1]"].tokens == 5
    assert isinstance(got.obs["e[0]"], Observation) and got.obs["e[0]"].kind is Stat.SQ_SUM


def test_reap_sums_are_made_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """REAP's per-window sums of contribution norms: added on the host, in slot order, not by CUDA's float
    index_add_, whose atomics add a slot's tokens in no fixed order (other bits on every run and resume)."""
    from wanda_stream.methods.observe import ExpertSaliency

    added: list[str] = []
    real_add, real_cpu = torch.Tensor.index_add_, torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "index_add_", lambda self, *a: (added.append(self.device.type), real_add(self, *a))[1])
    # The card's tensors arrive as zeros: only where the additions run is checked here.
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: torch.zeros(self.shape, dtype=self.dtype) if self.is_meta
                        else real_cpu(self))
    sal = ExpertSaliency({"mlp.experts": 4})
    meta = {"device": "meta"}
    sal._add("mlp.experts", torch.ones(6, 2, dtype=torch.float64, **meta), torch.zeros(6, 2, dtype=torch.int64, **meta),
             torch.zeros(6, 2, dtype=torch.int64, **meta), 2, 4)
    assert added == ["cpu", "cpu"]
    assert sal.sums["mlp.experts"][0].device.type == "cpu" and tuple(sal.counts["mlp.experts"][0].shape) == (2, 4)


def test_reconstruct_fits_under_deterministic_attention(tiny_model: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--reconstruct on CUDA: the fit's forward and backward run attention by the math kernel (the fused
    kernels' backward adds by atomics: other fitted bytes on every run); the CPU's kernels stay as they are."""
    import contextlib

    from wanda_stream.methods import reconstruct
    from wanda_stream.run import prune

    cuda = torch.backends.cuda
    with reconstruct.fit_attention(torch.device("cuda", 1)):
        assert cuda.math_sdp_enabled() and not (cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled()
                                                or cuda.cudnn_sdp_enabled())
    assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()  # restored after the fit
    with reconstruct.fit_attention(torch.device("cpu")):
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
    inside: list[torch.device] = []  # the device of the fit_attention context entered, while in it
    fits: list[torch.device] = []

    @contextlib.contextmanager
    def recorded(device: torch.device) -> Iterator[None]:
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    def fit(*args: Any, **kwargs: Any) -> Any:
        assert inside, "fit_block ran outside fit_attention"
        fits.append(inside[-1])
        return real_fit(*args, **kwargs)

    real_fit = prune.fit_block
    monkeypatch.setattr(prune, "fit_attention", recorded)
    monkeypatch.setattr(prune, "fit_block", fit)
    assert main(["prune", str(tiny_model), str(tmp_path / "out"), "--calib", "pydoc", "--nsamples", "2", "--seqlen",
                 "32", "--device", "cpu", "--batch-size", "1", "--reconstruct", "--reconstruct-epochs", "1",
                 "--quiet"]) == 0
    assert fits and {d.type for d in fits} == {"cpu"}  # every block's fit, under the run's device
