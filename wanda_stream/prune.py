"""The pruning run: collect statistics, score, mask and propagate, one decoder block at a time.

Per block i: the dense block runs over the calibration hidden states with a hook on every
nn.Linear summing x**2 per input column; every linear is masked by the pure kernel; the pruned
block runs again to produce block i+1's inputs (and, with --eval-data, the evaluation stream's);
the block's tensors are written as one output shard while the next block computes.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wanda_stream import calib, experts, kernel
from wanda_stream.activations import HiddenFile
from wanda_stream.checkpoint import (
    INDEX_NAME, atomic_write_bytes, atomic_write_json, fsync_dir, read_header, write_shard,
)
from wanda_stream.config import RunConfig
from wanda_stream.errors import Interrupted
from wanda_stream.loglik import hidden_streams
from wanda_stream.report import Progress, io_bytes, peak_rss_bytes, versions
from wanda_stream.model import release
from wanda_stream.state import REPORT_NAME, RunState, StopFlag, WorkDir, killpoint
from wanda_stream.stream import Streamer, open_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
SKIP_FILES = (INDEX_NAME, "pytorch_model.bin.index.json", REPORT_NAME)


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard naming: model-00001-of-00031.safetensors (1-based)."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block but MoE routers/gates, by relative name: the dense matrices that get pruned."""
    routers = experts.router_names(layer)
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in routers}


def collect_stats(
    st: Streamer, i: int, layer: nn.Module, src: HiddenFile, batch: int, stop: StopFlag
) -> experts.BlockStats | None:
    """Per-input-column sums of squares of every linear's inputs over all calibration tokens.

    Fused MoE experts get one entry per expert that received tokens, over the tokens routed to it,
    and a count of those tokens for every expert.
    """
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in linear_modules(layer).items():
        sums[name] = torch.zeros(mod.in_features, dtype=torch.float64, device=st.device)

        def hook(m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            sums[name] += kernel.column_sq_sum(args[0])

        handles.append(mod.register_forward_hook(hook))
    per_expert = experts.ExpertStats(st.sk.model, layer)
    try:
        # The function mode costs Python overhead on every op: enter it only for blocks with experts.
        with per_expert if per_expert.params else contextlib.nullcontext():
            finished = st.run_block(i, layer, src, batch, dst=None, stop=stop)
    finally:
        for h in handles:
            h.remove()
    if not finished:
        return None
    sums.update(per_expert.results())
    return experts.BlockStats(sums, per_expert.token_counts())


def prune_block(
    cfg: RunConfig, st: Streamer, i: int, layer: nn.Module, stored: dict[str, torch.Tensor],
    stats: experts.BlockStats | None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Mask every linear and expert matrix of block i; returns the output tensors (stored dtype) and records.

    Per-expert tensors are masked in the checkpoint's own layout, and their records carry the number of
    calibration tokens routed to the expert; an expert that got none falls back to magnitude, and its
    record says so.
    """
    out = dict(stored)
    records = []
    linears = linear_modules(layer)
    for key, name in experts.prunable_keys(st.sk, i, layer, stored, linears).items():
        w = stored[key]
        wd = w.to(st.device)
        fallback = cfg.method == "wanda" and name not in stats.sums
        if cfg.method == "wanda" and not fallback:
            mask = kernel.wanda_mask(wd, stats.sums[name], cfg.sparsity, cfg.nm)
        else:
            mask = kernel.magnitude_mask(wd, cfg.sparsity, cfg.nm)
        # On the CPU the stored copy is masked in place: a second copy of the block's matrices would
        # add its whole size (400 MB for a 7B block) to the peak.
        out[key] = wd.masked_fill_(mask, 0) if wd is w else kernel.apply_mask(wd, mask).to("cpu")
        if name in linears:
            with torch.no_grad():
                linears[name].weight.masked_fill_(mask, 0)
        zeros = w.numel() - int(torch.count_nonzero(out[key]))  # (x == 0).sum() is 10x slower on CPU
        record = {"name": key, "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                  "sparsity": zeros / w.numel()}
        if stats is not None and name in stats.tokens:
            record["calib_tokens"] = stats.tokens[name]
        if fallback:
            record["fallback"] = "magnitude: no calibration token was routed to this expert"
        records.append(record)
    if experts.expert_params(layer):
        # The fused expert parameters are rebuilt from the pruned per-expert tensors, as transformers loads them.
        st.load_block(i, out)
    return out, records


class PruneRun:
    """One pruning run over a work directory; resumable from its state."""

    def __init__(self, cfg: RunConfig, progress: Progress, stop: StopFlag) -> None:
        self.cfg = cfg
        self.progress = progress
        self.stop = stop
        self.out = Path(cfg.output_dir)
        self.work = WorkDir(Path(cfg.work_dir))
        self.ckpt, self.sk = open_model(Path(cfg.model_dir))
        self.st = Streamer(self.ckpt, self.sk, cfg.device, cfg.dtype, prefetch=cfg.prefetch)
        self.n = self.sk.n_layers
        self.total_shards = self.n + 1
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="writer")
        self.t0 = time.monotonic()
        self.loop_seconds = 0.0

    # ---- files in the work directory -------------------------------------------------------
    def hidden(self, stream: str, i: int, n: int, seqlen: int) -> HiddenFile:
        return HiddenFile(self.work.file(f"{stream}_{i:05d}.bin"), n, seqlen, self.st.hidden, self.cfg.dtype)

    def tokens(self) -> dict[str, torch.Tensor]:
        """Calibration and evaluation windows, made once and saved so a resumed run uses the same.

        Raises Interrupted on a stop request while the text is read or tokenized (minutes for C4);
        the file is written only once complete, so a resumed run starts the windows over.
        """
        path = self.work.file("tokens.safetensors")
        if path.is_file():
            return load_file(str(path))
        toks: dict[str, torch.Tensor] = {}
        tokenizer = None
        if self.cfg.needs_calibration or self.cfg.eval_data:
            tokenizer = calib.load_tokenizer(Path(self.cfg.model_dir))
        if self.cfg.needs_calibration:
            docs = calib.documents(self.cfg.calib, "calibration", self.stop)
            toks["calib"] = calib.sample_windows(docs, tokenizer, self.cfg.nsamples, self.cfg.seqlen,
                                                 self.cfg.seed, self.cfg.calib, self.stop)
        if self.cfg.eval_data:
            text = "\n\n".join(calib.documents(self.cfg.eval_data, "evaluation", self.stop))
            toks["eval"] = calib.eval_windows(text, tokenizer, self.cfg.eval_seqlen or self.cfg.seqlen,
                                              self.cfg.eval_windows, self.cfg.eval_data, self.stop)
        if self.cfg.eval_tasks:
            from wanda_stream.task_prune import task_spec, task_tokens

            toks.update(task_tokens(Path(self.cfg.model_dir), task_spec(self.cfg)))
        tmp = path.with_name(path.name + ".partial")
        save_file(toks, str(tmp))
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
        return toks

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        state = self.work.load_state()
        self.progress.begin(state.next_block)
        toks = self.tokens()
        streams = hidden_streams(toks)  # lm-eval request buckets bring targets and meta beside their inputs
        if state.next_block == 0 and "stem_written" not in state.extra:
            self._start(streams, state)
        self._clean_stale(state, streams)
        self.st.prefetch(state.next_block)
        pending: Future | None = None
        pending_state: RunState | None = None
        loop_start = time.perf_counter()
        for i in range(state.next_block, self.n):
            stored, timing = self.st.block_tensors(i)
            self.st.prefetch(i + 1)
            compute_start, hidden_wait = time.perf_counter(), self.st.hidden_wait_s
            result = self._block(i, stored, streams)
            if result is None:
                self._finish_pending(pending, pending_state)
                raise Interrupted(f"stopped during block {i}")
            out, records = result
            timing["compute_s"] = time.perf_counter() - compute_start
            timing["hidden_wait_s"] = self.st.hidden_wait_s - hidden_wait  # part of compute_s
            new_state = RunState(i + 1, "blocks", state.blocks + [{
                "block": i, "matrices": records, "seconds": round(timing["read_wait_s"] + timing["compute_s"], 3),
                "timing": _rounded(timing)}], state.extra)
            self._finish_pending(pending, pending_state)
            pending = self.writer.submit(self._write_block_shard, i, out)
            pending_state = new_state
            # Only the writer may hold block i's tensors now: kept here, they would stay resident
            # through block i+1 (a third block in RAM, beside block i+1 and the prefetch of i+2).
            del out, result
            if not self.cfg.prefetch:
                # --no-prefetch: read, compute and write strictly in turn, the baseline the overlap beats.
                self._finish_pending(pending, pending_state)
                pending = pending_state = None
            state = new_state
            self.progress.update(i + 1, block=i, bytes_written=io_bytes()["write_bytes"])
            if self.stop.requested:
                self._finish_pending(pending, pending_state)
                raise Interrupted(f"stopped after block {i}")
        self._finish_pending(pending, pending_state)
        self.loop_seconds = time.perf_counter() - loop_start
        return self._finalize(state, streams)

    def _start(self, streams: dict[str, torch.Tensor], state: RunState) -> None:
        """Write the non-block tensors' shard and the block-0 hidden states."""
        self._write_stem_shard()
        for name, t in streams.items():
            if name == "calib" and not self.cfg.needs_calibration:
                continue
            ok = self.st.embed_windows(t, self.hidden(name, 0, *t.shape), self.cfg.batch_size, self.stop)
            if not ok:
                raise Interrupted("stopped while computing the first hidden states")
        state.extra["stem_written"] = True
        self.work.save_state(state)

    def _clean_stale(self, state: RunState, streams: dict[str, torch.Tensor]) -> None:
        """Remove half-written files and hidden states that the saved state does not use."""
        keep = {self.hidden(name, state.next_block, *t.shape).path.name for name, t in streams.items()}
        for p in self.work.path.iterdir():
            if p.name.endswith((".partial", ".tmp")) or (p.suffix == ".bin" and p.name not in keep):
                p.unlink()
        for pattern in ("*.partial", "*.tmp"):
            for p in self.out.glob(pattern):
                p.unlink()

    def _block(
        self, i: int, stored: dict[str, torch.Tensor], streams: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]] | None:
        layer = self.st.load_block(i, stored)
        b = self.cfg.batch_size
        try:
            sums = None
            if self.cfg.needs_calibration:
                sums = collect_stats(self.st, i, layer, self.hidden("calib", i, *streams["calib"].shape), b, self.stop)
                if sums is None:
                    return None
            out, records = prune_block(self.cfg, self.st, i, layer, stored, sums)
            for name, t in streams.items():
                last_calib = name == "calib" and i == self.n - 1
                if name == "calib" and (not self.cfg.needs_calibration or last_calib):
                    continue
                src, dst = self.hidden(name, i, *t.shape), self.hidden(name, i + 1, *t.shape)
                if not self.st.run_block(i, layer, src, b, dst=dst, stop=self.stop):
                    return None
        finally:
            release(self.sk.layers[i])
        return out, records

    def _write_block_shard(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """Write block i's output shard; returns its wall and writing-thread CPU seconds."""
        t0, c0 = time.perf_counter(), time.thread_time()
        items = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        write_shard(self.out / shard_name(i + 1, self.total_shards), items, tensors.__getitem__,
                    before_rename=lambda: killpoint("shard_write"))
        return {"write_s": time.perf_counter() - t0, "write_cpu_s": time.thread_time() - c0}

    def _write_stem_shard(self) -> None:
        keys = [k for k in self.ckpt.keys() if not self.sk.is_block_key(k)]
        items = [(k, self.ckpt.tensors[k].dtype, self.ckpt.tensors[k].shape) for k in keys]
        self.out.mkdir(parents=True, exist_ok=True)
        write_shard(self.out / shard_name(0, self.total_shards), items, self.ckpt.get,
                    before_rename=lambda: killpoint("shard_write"))

    def _finish_pending(self, fut: Future | None, state: RunState | None) -> None:
        """Wait for the block shard in flight, then record the block as done."""
        if fut is None or state is None:
            return
        t0 = time.perf_counter()
        timing = fut.result()
        timing["write_wait_s"] = time.perf_counter() - t0
        state.blocks[-1]["timing"].update(_rounded(timing))
        self.work.save_state(state)
        for p in self.work.path.glob(f"*_{state.next_block - 1:05d}.bin"):  # every stream's input to that block
            p.unlink(missing_ok=True)
        killpoint("block_done")

    def _finalize(self, state: RunState, streams: dict[str, torch.Tensor]) -> dict[str, Any]:
        report = self._report(state, streams)
        copy_side_files(Path(self.cfg.model_dir), self.out)
        killpoint("finalize")
        weight_map = {}
        total = 0
        for f in sorted(self.out.glob("model-*-of-*.safetensors")):
            for k, v in read_header(f).items():
                if k != "__metadata__":
                    weight_map[k] = f.name
                    total += v["data_offsets"][1] - v["data_offsets"][0]
        atomic_write_json(self.out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        killpoint("finalize_index")
        atomic_write_json(self.out / REPORT_NAME, report)
        state.stage = "done"
        self.work.save_state(state)
        self.st.close()
        self.writer.shutdown()
        if not self.cfg.keep_work_dir:
            shutil.rmtree(self.work.path, ignore_errors=True)
        return report

    def _report(self, state: RunState, streams: dict[str, torch.Tensor]) -> dict[str, Any]:
        report: dict[str, Any] = {
            "config": self.cfg.to_json(), "config_fingerprint": self.cfg.fingerprint(),
            "model_fingerprint": self.ckpt.fingerprint(), "versions": versions(),
            "blocks": state.blocks, "peak_rss_bytes": peak_rss_bytes(), "io": io_bytes(),
            "seconds_this_process": round(time.monotonic() - self.t0, 3),
            "block_loop_seconds_this_process": round(self.loop_seconds, 3),
        }
        mats = [m for b in state.blocks for m in b["matrices"]]
        total = sum(math.prod(m["shape"]) for m in mats)
        report["total_sparsity"] = sum(m["sparsity"] * math.prod(m["shape"]) for m in mats) / max(total, 1)
        if "eval" in streams:
            t = streams["eval"]
            nll, count = self.st.final_nll(self.hidden("eval", self.n, *t.shape), t, self.cfg.batch_size)
            report["eval"] = {"perplexity": math.exp(nll / count), "tokens": count, "windows": t.shape[0],
                              "seqlen": t.shape[1], "data": self.cfg.eval_data}
        if self.cfg.eval_tasks:
            from wanda_stream.task_prune import task_results, task_spec

            report["eval_tasks"] = task_results(
                self.st, Path(self.cfg.model_dir), task_spec(self.cfg), self.tokens(),
                lambda name: self.hidden(name, self.n, *streams[name].shape), self.cfg.batch_size)
        return report


def _rounded(timing: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timing.items()}


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, generation config, tokenizer and other non-weight files, atomically each."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in SKIP_FILES or p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"):
            continue
        atomic_write_bytes(dst / p.name, p.read_bytes())
    fsync_dir(dst)


def output_is_finished(cfg: RunConfig) -> bool:
    """The output directory holds this configuration's finished checkpoint (its report is written last)."""
    import json

    report = Path(cfg.output_dir) / REPORT_NAME
    if not (report.is_file() and (Path(cfg.output_dir) / INDEX_NAME).is_file()):
        return False
    try:
        return json.loads(report.read_text()).get("config_fingerprint") == cfg.fingerprint()
    except (OSError, ValueError):
        return False


def prepare(cfg: RunConfig, model_fp: dict[str, Any], resume: bool, overwrite: bool) -> bool:
    """Decide between a new run, a resumed one and nothing to do; returns False when already finished.

    Refuses (InputError) to touch an existing run or output unless --resume or --overwrite says how.
    """
    from wanda_stream.errors import InputError
    from wanda_stream.state import check_same_run

    out, work = Path(cfg.output_dir), WorkDir(Path(cfg.work_dir))
    foreign = work.foreign_files()
    if foreign:
        raise InputError(
            f"--work-dir {work.path}: holds files no run wrote ({', '.join(foreign[:3])}); the work dir is deleted "
            "after the run, so choose an empty or new directory"
        )
    work.check_unlocked()  # before anything below deletes or continues another process's run
    if overwrite:
        shutil.rmtree(work.path, ignore_errors=True)
        if out.exists():
            # Report and index first: a kill midway must not leave an index naming deleted shards.
            for name in (REPORT_NAME, INDEX_NAME):
                (out / name).unlink(missing_ok=True)
            for p in out.iterdir():
                if p.is_file() and p.name.startswith("model-"):
                    p.unlink()
    elif work.exists():
        if not resume:
            raise InputError(
                f"{work.path}: an earlier run is there; add --resume to continue it, or --overwrite to start over"
            )
        check_same_run(work.load_run(), cfg, model_fp, work.path)
        if output_is_finished(cfg):
            # Killed while removing the work dir after success: the output is complete, finish the cleanup.
            if not cfg.keep_work_dir:
                shutil.rmtree(work.path, ignore_errors=True)
            return False
        return True
    elif output_is_finished(cfg):
        if resume:
            return False
        raise InputError(f"{out}: already holds this finished run; nothing to do (use --overwrite to redo it)")
    elif out.exists() and any(p.name != work.path.name for p in out.iterdir()):
        raise InputError(f"{out}: exists and is not empty; choose a new directory or add --overwrite")
    _check_writable(out)
    work.create(cfg, model_fp)
    return True


def _check_writable(out: Path) -> None:
    from wanda_stream.errors import InputError

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".wanda-stream-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{out}: output directory is not writable ({e.strerror}); choose another --output dir")
