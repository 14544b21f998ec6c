"""The pruning run: collect statistics, score, mask and propagate, one decoder block at a time.

Per block i: the dense block runs over the calibration hidden states with a hook on every
nn.Linear summing x**2 per input column; every linear is masked by the pure kernel; the pruned
block runs again to produce block i+1's inputs (and, with --eval-data, the evaluation stream's);
the block's tensors are written as one output shard while the next block computes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wanda_stream.run import calib
from wanda_stream.model import experts
from wanda_stream.methods import plans
from wanda_stream.model import shrink
from wanda_stream.model import widths
from wanda_stream.storage.activations import HiddenFile
from wanda_stream.storage.checkpoint import (
    INDEX_NAME, atomic_write_bytes, atomic_write_json, fsync_dir, read_header, write_shard,
)
from wanda_stream.run.config import RunConfig
from wanda_stream.run.dist import World, assign_by_cost, window_share
from wanda_stream.methods.fidelity import OutputError
from wanda_stream.methods.reconstruct import PAPERS as RECONSTRUCT_PAPERS
from wanda_stream.methods.reconstruct import Exchange, Part, fit_attention, fit_block, held_here
from wanda_stream.errors import InputError, Interrupted
from wanda_stream.run.card import CardFacts, render_card
from wanda_stream.eval.loglik import hidden_streams
from wanda_stream.methods import Stat
from wanda_stream.model.families import family_of
from wanda_stream.model.skeleton import Skeleton, release
from wanda_stream.methods.observe import BlockStats, DepthProbe, ExpertSaliency
from wanda_stream.storage.outputs import CARD_NAME, input_card, shard_count, shard_name, shard_names, side_files
from wanda_stream.methods.profiles import OWL_PAPER, outlier_ratio, owl_sparsities
from wanda_stream.run.report import Progress, io_bytes, peak_figures, reset_peaks, versions
from wanda_stream.run.resources import (
    BUFFERS_ON_DISK, MemoryPlan, activation_budgets, check_disk, hidden_states_bytes, memory_plan,
)
from wanda_stream.storage.state import (
    REPORT_NAME, RunState, StopFlag, WorkDir, killpoint, profile_blocks_done, resume_command,
)
from wanda_stream.model.stream import Streamer, open_model
from wanda_stream.run.block import Watch, linear_modules, observe_all, prune_block, width_inputs
from wanda_stream.run.expert_groups import plan_streaming
from wanda_stream.run.streamed_block import profile_streamed, prune_streamed
from wanda_stream.run.streamed_block import refusal as streamed_refusal

PROFILE_STAGE = "profile"  # the run's stage during the dense pass (OWL, --drop-blocks), and where its results live
DISTINCT_KEY = "calib_distinct_tokens"  # tokens.safetensors metadata: distinct tokens the calibration windows cover
CONFIG_NAME = "config.json"
STRUCTURE_PAPERS = {
    "bi": "Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
    "angular": "Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers",
    "ffn_heads": "An et al. 2024, Fluctuation-based Adaptive Structured Pruning (FLAP), its Wanda-sp score",
    "experts": "Lasby et al. 2025, REAP: Router-weighted Expert Activation Pruning",
}


class Position(NamedTuple):
    """Where a run goes next: the pass (0 the pass over the dense model, 1 the pruning pass, 2 the
    evaluation after it) and the block it reads there."""

    stage: int
    block: int


class PruneRun:
    """One pruning run over a work directory; resumable from its state."""

    def __init__(self, cfg: RunConfig, progress: Progress, stop: StopFlag, world: World = World()) -> None:
        self.cfg = cfg
        self.progress = progress
        self.stop = stop
        self.world = world
        # Several ranks agree on stopping at block boundaries only: one rank leaving mid-block
        # would leave the others waiting in the block's collective.
        self.midblock_stop = stop if world.size == 1 else None
        self.out = Path(cfg.output_dir)
        self.work = WorkDir(Path(cfg.work_dir))
        self.ckpt, self.sk = open_model(Path(cfg.model_dir), cfg.output_dtype)
        self.st = Streamer(self.ckpt, self.sk, world.device(cfg.device), cfg.dtype, prefetch=cfg.prefetch)
        reset_peaks(str(self.st.device))
        self.rank_peaks: list[dict[str, int]] = []  # the other ranks' peaks, when they are done
        self.n = self.sk.n_layers
        self.spec = cfg.shrink
        self.structure = shrink.structure_of(family_of(self.sk.model.config))
        self.shape = shrink.Shape.of(self.sk.model.config, self.structure)
        if self.spec.widths:
            narrow = Skeleton.from_config(shrink.width_config(self.sk.model.config, self.spec))
            narrow.bind(self.ckpt.keys())
            self.st.narrow = narrow
        self.n_out = self.n - self.spec.drop_blocks
        mtp = [k for k in self.ckpt.keys()
               if k.startswith(self.sk.stored_layers_prefix + ".") and not self.sk.is_block_key(k)]
        self.drops_mtp = bool(mtp) and shrink.drops_mtp(self.spec, self.structure)
        self.total_shards = shard_count(self.n_out)
        self.dropped: list[int] = []  # known once the pass over the dense model has chosen them
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="writer")
        self.t0 = time.monotonic()
        self.loop_seconds = 0.0
        self.method = cfg.pruning_method
        self.owl = cfg.owl
        # A pass over the dense model first: OWL's outlier ratios, the blocks' scores for --drop-blocks.
        self.profiled = self.owl is not None or self.spec.drop_blocks > 0
        # The pruning pass observes the calibration inputs: for the method's masks or the width plans.
        self.observes = cfg.masks_observe or self.spec.widths or bool(cfg.reconstruct)
        self.calib_total = self.calib_start = 0  # the run's calibration windows, and the first of this rank's share
        # The hidden-state files of this process, by (stream, block): one object per file, so that the
        # memory holding its windows, and its write still in flight, are found again by whoever reads it.
        self._files: dict[tuple[str, int], HiddenFile] = {}
        # Where the hidden states and a streamed block's per-token buffers live (see _place_states).
        self.memory = MemoryPlan()
        self.sweep_runs = 1  # runs of a sweep in this process, which share the memory for hidden states
        # MoE blocks too large to hold, whose routed experts go a group at a time (run/streamed_block.py).
        self.streamed = plan_streaming(self.ckpt, self.sk, self.structure.experts, cfg.expert_group,
                                       self.st.device, cfg.dtype)
        self.streamed_notes: dict[int, dict[str, Any]] = {}
        if self.streamed:
            refused = streamed_refusal(self)
            if refused:
                i, p = next(iter(self.streamed.items()))
                raise InputError(f"block {i}'s {p.n_experts} routed experts are streamed {p.group} at a time "
                                 f"(--expert-group), which does not combine with {refused} yet; hold whole blocks "
                                 "with --expert-group 0 if memory allows")
            self.st.streamed = {i: p.all_keys() for i, p in self.streamed.items()}

    # ---- files in the work directory -------------------------------------------------------
    def hidden(self, stream: str, i: int, n: int, seqlen: int) -> HiddenFile:
        """Stream `stream`'s hidden states entering block i (this rank's share of them)."""
        key = (stream, i)
        if key not in self._files:
            path = self.work.hidden_file(stream, i, self.world.suffix)
            self._files[key] = HiddenFile(path, n, seqlen, self.st.hidden, self.cfg.dtype)
        return self._files[key]

    def _release(self, i: int) -> None:
        """Free the memory of every stream's states entering block i (their files stay, for a resume)."""
        for (_, block), f in self._files.items():
            if block == i:
                f.memory = None

    def _durable(self, i: int) -> float:
        """Wait until every stream's file of states entering block i is complete; seconds waited.

        Called before a state naming block i as the next one is saved: those files are where it resumes.
        """
        return sum(f.wait_durable() for (_, block), f in self._files.items() if block == i)

    def _forget(self, i: int) -> None:
        """Drop the file objects of states entering block i, once their files are deleted."""
        for key in [k for k in self._files if k[1] == i]:
            del self._files[key]

    def plan_memory(self, streams: dict[str, torch.Tensor]) -> MemoryPlan:
        """Where this rank keeps the hidden states of `streams` (its share, see my_streams) and a streamed
        block's per-token buffers: resources.memory_plan over the windows it holds, beside the states of
        every run of a sweep (which share this process's memory)."""
        budgets = activation_budgets(str(self.st.device), self.cfg.activation_budget, self.world.local_size)
        return memory_plan([(name, *t.shape) for name, t in streams.items()], self.st.hidden, self.cfg.dtype,
                           config=self.sk.model.config, batch_size=self.cfg.batch_size, seqlen=self.cfg.seqlen,
                           budgets=budgets, runs=self.sweep_runs, states_on_disk=self.cfg.states_on_disk,
                           calibration=self.cfg.needs_calibration, streamed=bool(self.streamed))

    def _place_states(self, streams: dict[str, torch.Tensor]) -> None:
        """Keep the hidden states in memory between blocks when they fit the activation budget (plan_memory),
        and a streamed block's per-token buffers too where they fit beside them, else in scratch files.

        Single-process runs also leave each file's fsync to the writer thread, waited for only before
        the state that names the file is saved. Under torchrun the files are durable when a block's
        run over them returns, as on disk: rank 0 saves the state after collectives that only order
        the other ranks' work up to that point.
        """
        self.memory = self.plan_memory(streams)
        on = {"device": self.st.device, "host": torch.device("cpu")}.get(self.memory.states)
        self.st.keep_states(on, defer=self.world.size == 1)

    def my_streams(self, toks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The token windows this rank carries: a contiguous share of the calibration windows and of the
        perplexity windows (whole micro-batches; with few windows a rank may have no perplexity share),
        and whole lm-eval request buckets, balanced over the ranks by their tokens."""
        out = {}
        named = hidden_streams(toks)
        buckets = assign_by_cost({n: float(t.numel()) for n, t in named.items() if n not in ("calib", "eval")},
                                 self.world.size)
        for name, t in named.items():
            if name in ("calib", "eval"):
                start, count = self.world.share(t.shape[0], self.cfg.batch_size, allow_empty=name == "eval")
                if count:
                    out[name] = t[start : start + count]
                if name == "calib":
                    self.calib_total, self.calib_start = t.shape[0], start
            elif buckets[name] == self.world.rank:
                out[name] = t
        return out

    def tokens(self) -> dict[str, torch.Tensor]:
        """Every window of the run: made by rank 0, then read by every rank from the file."""
        self.world.on_main(self._make_tokens, setup=True)  # C4 or lm-eval windows: minutes to hours
        return self.saved_tokens()

    def saved_tokens(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.work.file("tokens.safetensors")))

    def calibration_coverage(self) -> dict[str, int] | None:
        """Tokens asked for and distinct tokens the calibration windows cover, as saved with them
        (None without calibration, or for windows saved before the count was)."""
        header = read_header(self.work.file("tokens.safetensors"))
        distinct = header.get("__metadata__", {}).get(DISTINCT_KEY)
        if "calib" not in header or distinct is None:
            return None
        return {"tokens": math.prod(header["calib"]["shape"]), "distinct_tokens": int(distinct)}

    def _make_tokens(self) -> None:
        """Calibration and evaluation windows, made once and saved so a resumed run uses the same.

        Raises Interrupted on a stop request while the text is read or tokenized (C4 is streamed from the hub);
        the file is written only once complete, so a resumed run starts the windows over.
        """
        path = self.work.file("tokens.safetensors")
        if path.is_file():
            return
        toks: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {}
        tokenizer = None
        if self.cfg.needs_calibration or self.cfg.eval_data:
            tokenizer = calib.load_tokenizer(Path(self.cfg.model_dir))
        if self.cfg.needs_calibration:
            docs = calib.documents(self.cfg.calib, "calibration", self.stop, self.cfg.record_field)
            windows = calib.calibration_windows(docs, tokenizer, self.cfg.nsamples, self.cfg.seqlen,
                                                self.cfg.seed, self.cfg.calib, self.stop)
            toks["calib"], meta[DISTINCT_KEY] = windows.tokens, str(windows.distinct)
            if windows.sparse_coverage:
                self.progress.message(calib.coverage_note(windows, self.cfg.calib))
        if self.cfg.eval_data:
            text = "\n\n".join(calib.documents(self.cfg.eval_data, "evaluation", self.stop))
            toks["eval"] = calib.eval_windows(text, tokenizer, self.cfg.eval_seqlen or self.cfg.seqlen,
                                              self.cfg.eval_windows, self.cfg.eval_data, self.stop)
        if self.cfg.eval_tasks:
            from wanda_stream.run.task_prune import task_spec, task_tokens

            toks.update(task_tokens(Path(self.cfg.model_dir), task_spec(self.cfg)))
        killpoint("tokens")
        tmp = path.with_name(path.name + ".partial")
        save_file(toks, str(tmp), metadata=meta or None)
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """Run (or continue) the prune; returns the report on rank 0, None on the other ranks."""
        steps = self.steps()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def steps(self) -> Generator[Position, None, dict[str, Any] | None]:
        """The run, one block at a time: yields where it goes next, before it reads that block (`Position`),
        and returns what `run` returns. A sweep steps several runs in lockstep, so that each block is read
        once for all; closed at a yield (GeneratorExit), the run first records its last block as done."""
        state = self.world.on_main(self.work.load_state)
        toks = self.tokens()
        streams = self.my_streams(toks)
        self._place_states(streams)
        if state.next_block == 0 and "stem_written" not in state.extra:
            self._check_disk(toks)
            self._start(streams, state)
        self._clean_stale(state, streams)
        if state.stage == PROFILE_STAGE:
            self.progress.begin(profile_blocks_done(state.extra[PROFILE_STAGE]))
            yield from self._profile_pass(state, streams["calib"])
            self._clean_stale(state, streams)  # the dense pass's last hidden states
        done_before = self.n if self.profiled else 0  # the dense pass counts as a first pass over the blocks
        self.progress.begin(done_before + state.next_block)
        self.dropped = state.extra.get(PROFILE_STAGE, {}).get("dropped", [])
        self.st.prefetch(self._next_kept(state.next_block))
        pending: Future | None = None
        pending_state: RunState | None = None
        loop_start = time.perf_counter()
        for i in range(state.next_block, self.n):
            try:
                yield Position(1, i)
            except GeneratorExit:
                self._finish_pending(pending, pending_state)
                raise
            if i in self.dropped:
                self._finish_pending(pending, pending_state)
                pending = pending_state = None
                state = self._skip_block(i, state, streams)
                self.progress.update(done_before + i + 1, block=i, **self.log_fields)
                if self._at_boundary("blocks", i, streams):
                    raise Interrupted(f"stopped after block {i}")
                continue
            stored, timing = self.st.block_tensors(i)
            self.st.prefetch(self._next_kept(i + 1), after=pending)  # block i-1's shard write, submitted last
            compute_start, hidden_wait = time.perf_counter(), self.st.hidden_wait_s
            target = self.block_sparsity(state, i)
            result = self._block(i, stored, streams, target)
            if result is None:
                self._finish_pending(pending, pending_state)
                raise Interrupted(f"stopped during block {i}")
            out, records, plan, output_error, fit = result
            timing["compute_s"] = time.perf_counter() - compute_start
            timing["hidden_wait_s"] = self.st.hidden_wait_s - hidden_wait  # part of compute_s
            entry = {"block": i, "matrices": records, "sparsity": _weighted_sparsity(records),
                     "seconds": round(timing["read_wait_s"] + timing["compute_s"], 3), "timing": _rounded(timing)}
            if plan:
                entry["structure"] = plan
            if output_error is not None:
                entry["output_error"] = output_error
            if fit is not None:
                entry["reconstruct"] = fit
            if i in self.streamed_notes:
                entry["streamed_experts"] = self.streamed_notes.pop(i)
            if self.owl is not None:
                entry.update(target_sparsity=target,
                             outlier_ratio=state.extra[PROFILE_STAGE]["outlier_ratios"][i])
            new_state = RunState(i + 1, "blocks", state.blocks + [entry], state.extra)
            self._finish_pending(pending, pending_state)
            submitted = time.perf_counter()
            if self.world.main:
                write = out if isinstance(out, Future) else self.writer.submit(self._write_block_shard, i, out)
                pending, pending_state = write, new_state
            # Only the writer may hold block i's tensors now: kept here, they would stay resident
            # through block i+1 (a third block in RAM, beside block i+1 and the prefetch of i+2).
            del out, result, stored
            if not self.cfg.prefetch or i in self.streamed:
                # --no-prefetch: read, compute and write strictly in turn, the baseline the overlap beats. A block
                # streaming its experts wrote its shard while it computed: recorded as done now, not after the
                # next block (minutes of DeepSeek-V3 work a kill would otherwise redo). Without prefetch the
                # loop waits from the submission: the writer may be well into the shard before this line runs.
                self._finish_pending(pending, pending_state, since=None if i in self.streamed else submitted)
                pending = pending_state = None
            state = new_state
            self.progress.update(done_before + i + 1, block=i, bytes_written=io_bytes()["write_bytes"],
                                 **self.log_fields)
            if self._at_boundary("blocks", i, streams):
                self._finish_pending(pending, pending_state)
                raise Interrupted(f"stopped after block {i}")
        self._finish_pending(pending, pending_state)
        self.loop_seconds = time.perf_counter() - loop_start
        yield Position(2, 0)
        evaluated = self.world.gather(self._evaluate_share(streams))
        # Every rank is done with the work dir before rank 0 finalizes (and removes it), its evaluation included.
        self.rank_peaks = self.world.gather(peak_figures(str(self.st.device)))[1:]
        return self._finalize(state, evaluated) if self.world.main else None

    def _evaluate_share(self, streams: dict[str, torch.Tensor]) -> dict[str, Any]:
        """This rank's share of the evaluations on the pruned model: the NLL sum of each micro-batch of its
        perplexity windows, and the scores of its lm-eval requests."""
        part: dict[str, Any] = {}
        if "eval" in streams:
            t = streams["eval"]
            part["nll"] = self.st.final_nll(self.hidden("eval", self.n, *t.shape), t, self.cfg.batch_size)
        if self.cfg.eval_tasks:
            from wanda_stream.run.task_prune import task_answers

            names = [n for n in streams if n not in ("calib", "eval")]
            part["answers"] = task_answers(self.st, self.saved_tokens(), names,
                                           lambda name: self.hidden(name, self.n, *streams[name].shape),
                                           self.cfg.batch_size)
        return part

    @property
    def log_fields(self) -> dict[str, int]:
        """What every progress line of this rank carries."""
        return {"rank": self.world.rank} if self.world.size > 1 else {}

    def _at_boundary(self, stage: str, i: int, streams: dict[str, torch.Tensor]) -> bool:
        """After block i: whether any rank was asked to stop (a barrier of all ranks).

        Past it, rank 0 has saved the state through block i-1, so the other ranks drop their inputs
        of block i-1, which no resume can need any more (rank 0 drops its own when it saves).
        """
        stopping = self.world.any(self.stop.requested)
        if self.world.size > 1:
            self._note_progress(stage, i)
            if not self.world.main and i > 0:
                if stage == PROFILE_STAGE:
                    old = self._profile_unneeded(i - 1)
                    if old is not None:
                        self.hidden("owl", old, *streams["calib"].shape).path.unlink(missing_ok=True)
                        self._forget(old)
                else:
                    for name, t in streams.items():
                        self.hidden(name, i - 1, *t.shape).path.unlink(missing_ok=True)
                    self._forget(i - 1)
        return stopping

    def _note_progress(self, stage: str, i: int) -> None:
        """This rank's last finished block, for `status`."""
        atomic_write_json(self.work.rank_note(self.world.rank),
                          {"rank": self.world.rank, "world_size": self.world.size, "stage": stage, "block": i,
                           "pid": os.getpid(), "host": socket.gethostname()})

    def block_sparsity(self, state: RunState, i: int) -> float:
        """Block i's target: the profile's when it has one, else the run's sparsity."""
        profile = state.extra.get(PROFILE_STAGE, {}).get("block_sparsity")
        return profile[i] if profile else self.cfg.sparsity

    def _profile_pass(self, state: RunState, calib: torch.Tensor) -> Generator[Position, None, None]:
        """The pass over the dense model: every block's OWL outlier ratio and, for --drop-blocks, its block
        influence and the angular distances; then the blocks' sparsities and the blocks to remove.

        The dense blocks carry the calibration states forward in files of their own (owl_*), so the
        pruning pass still starts from block 0's. Progress is saved after every block.
        """
        record = state.extra[PROFILE_STAGE]
        done = profile_blocks_done(record)
        self.st.prefetch(done)
        for i in range(done, self.n):
            yield Position(0, i)  # each block's progress is saved when done: nothing is pending here
            stored, _ = self.st.block_tensors(i)
            self.st.prefetch(i + 1 if i + 1 < self.n else 0)
            if i in self.streamed:
                try:
                    got = profile_streamed(self, i, stored, calib, self._depth_probe(i, calib))
                finally:
                    self.st.release_block(i)
                if got is None:
                    raise Interrupted(f"stopped during block {i} of the pass over the dense model")
                found = got
            else:
                layer = self.st.load_block(i, stored)
                try:
                    found = self._profile_block(i, layer, stored, calib)
                finally:
                    release(self.sk.layers[i])
            for key, value in found.items():
                record[key].append(value)
            # Block 0's calibration states too: the pruning pass reads them back from their file.
            self._release(i)
            if i + 1 == self.n:
                self._conclude_profile(record)
                state.stage = "blocks"
            self.st.hidden_wait_s += self._durable(i + 1)
            if self.world.main:
                self.work.save_state(state)
                old = self._profile_unneeded(i)
                if old is not None:
                    self.hidden("owl", old, *calib.shape).path.unlink(missing_ok=True)
                    self._forget(old)
            killpoint("profile_block_done")
            self.progress.update(i + 1, block=i, **found, **self.log_fields)
            if self._at_boundary(PROFILE_STAGE, i, {"calib": calib}) and i + 1 < self.n:
                raise Interrupted(f"stopped after block {i} of the pass over the dense model")

    def _dense_state(self, j: int, calib: torch.Tensor) -> HiddenFile:
        """The dense model's calibration states entering block j, in the dense pass."""
        return self.hidden("calib" if j == 0 else "owl", j, *calib.shape)

    def _profile_block(self, i: int, layer: nn.Module, stored: dict[str, torch.Tensor], calib: torch.Tensor
                       ) -> dict[str, float]:
        """Run dense block i over the calibration states; what the dense pass records of it."""
        src = self._dense_state(i, calib)
        dst = self._dense_state(i + 1, calib) if i + 1 < self.n else None
        probe = self._depth_probe(i, calib)
        watches: list[Watch] = [(Stat.SQ_SUM, linear_modules(layer), True)] if self.owl is not None else []
        got = observe_all(self.st, i, layer, watches, src, self.cfg.batch_size, self.midblock_stop, dst, self.world,
                          hooks=[probe.on(layer)] if probe is not None else [])
        if got is None:
            raise Interrupted(f"stopped during block {i} of the pass over the dense model")
        found: dict[str, float] = {}
        if self.owl is not None:
            keys = experts.prunable_keys(self.sk, i, layer, stored, linear_modules(layer))
            stats = got[0]
            found["outlier_ratios"] = outlier_ratio(((m.view(stored[m.key]).to(self.st.device), stats.obs[m.stat].stat)
                                                     for m in keys.values() if m.stat in stats.obs), self.owl.m)
        if probe is not None:
            found.update(probe.results(self.world))
        return found

    def _depth_probe(self, i: int, calib: torch.Tensor) -> DepthProbe | None:
        """--drop-blocks' observer of dense block i (with the states N-1 blocks back for the angular score)."""
        n = self.spec.drop_blocks
        if not n:
            return None
        back = i + 1 - n if self.spec.block_score == "angular" else -1
        return DepthProbe(self._dense_state(back, calib) if back >= 0 else None)

    def _profile_unneeded(self, i: int) -> int | None:
        """The dense pass's state file no longer needed once block i is done (None: keep them all).

        Block i+1 reads owl_{i+1}; the angular distance of block i+1 also reads the states N-1 blocks back.
        """
        j = i + 1 - self.spec.drop_blocks if self.spec.block_score == "angular" and self.spec.drop_blocks else i
        return j if j >= 1 else None

    def _conclude_profile(self, record: dict[str, Any]) -> None:
        """After the dense pass: the blocks to remove, and OWL's sparsities of the blocks that stay."""
        n = self.spec.drop_blocks
        if n:
            record["dropped"] = (plans.blocks_by_angle(record["angular"], n) if self.spec.block_score == "angular"
                                 else plans.blocks_by_influence(record["influence"], n))
        if self.owl is not None:
            kept = [i for i in range(self.n) if i not in record.get("dropped", [])]
            sparsities = owl_sparsities([record["outlier_ratios"][i] for i in kept], self.cfg.sparsity, self.owl.lmbda)
            full = [0.0] * self.n
            for i, value in zip(kept, sparsities):
                full[i] = value
            record["block_sparsity"] = full

    def _next_kept(self, i: int) -> int:
        """The first block from i on that is not removed (n past the end)."""
        while i in self.dropped:
            i += 1
        return i

    def _skip_block(self, i: int, state: RunState, streams: dict[str, torch.Tensor]) -> RunState:
        """A removed block: its inputs are the next block's (a second name for each file), and no shard."""
        for name, t in streams.items():
            if name == "calib" and (not self.observes or i == self.n - 1):
                continue
            src, dst = self.hidden(name, i, *t.shape), self.hidden(name, i + 1, *t.shape)
            src.wait_durable()  # the file written behind the computation is complete before it gets a second name
            _link(src.path, dst.path)
            dst.memory = src.memory  # states kept in memory move on with it
        self._release(i)
        record = state.extra[PROFILE_STAGE]
        # Its output error: of its input in place of its output, on the dense model's calibration states.
        entry: dict[str, Any] = {"block": i, "dropped": True, "block_influence": record["influence"][i],
                                 "output_error": record["removal_error"][i]}
        if self.spec.block_score == "angular":
            entry["angular_distance_from_here"] = record["angular"][i] if i < len(record["angular"]) else None
        new_state = RunState(i + 1, "blocks", state.blocks + [entry], state.extra)
        if self.world.main:
            self.work.save_state(new_state)
            for p in self.work.block_inputs(i, self.world.suffix):
                p.unlink(missing_ok=True)
        killpoint("block_done")
        return new_state

    def _check_disk(self, toks: dict[str, torch.Tensor]) -> None:
        """Refuse a run whose hidden states and checkpoint cannot fit, before the first is written.

        The command's preflight cannot count what is only known now: lm-eval's request buckets, and
        every evaluation window when their number was not capped. Every rank checks the whole run.
        """
        streams = hidden_streams(toks).values()
        states = sum(hidden_states_bytes(*t.shape, self.st.hidden, self.cfg.dtype) for t in streams)
        if self.observes and "calib" in toks:
            # Dense block outputs: this block's, and the previous block's until its shard is durable.
            # A file object of its own: the rank's cached ones (self.hidden) have the rank's share of windows.
            dense = HiddenFile(self.work.hidden_file("dense", 0), *toks["calib"].shape, self.st.hidden, self.cfg.dtype)
            states += 2 * dense.nbytes
        # The windows are saved by now (lm-eval's can take long to build): the fix is to resume, not restart.
        what = "hidden states (calibration, evaluation and lm-eval windows)"
        if self.memory.buffers == "disk" and self.streamed:
            # One rank's share of the windows: every rank's scratch, in a work dir they may share.
            states += self.world.size * self.memory.buffers_bytes
            what += f" and {BUFFERS_ON_DISK}"
        check_disk([(self.out, self.ckpt.total_bytes(), "the pruned checkpoint"), (self.work.path, states, what)],
                   f"free space, then resume with: {resume_command(self.cfg)}")

    def _start(self, streams: dict[str, torch.Tensor], state: RunState) -> None:
        """Write the non-block tensors' shard (rank 0) and the block-0 hidden states (every rank its own)."""
        if self.world.main:
            self._write_stem_shard()
        for name, t in streams.items():
            if name == "calib" and not self.cfg.needs_calibration:
                continue
            ok = self.st.embed_windows(t, self.hidden(name, 0, *t.shape), self.cfg.batch_size, self.midblock_stop)
            if not ok:
                raise Interrupted("stopped while computing the first hidden states")
        if self.world.any(self.stop.requested):
            raise Interrupted("stopped after computing the first hidden states")
        self.st.hidden_wait_s += self._durable(0)
        state.extra["stem_written"] = True
        if self.profiled:
            state.stage = PROFILE_STAGE
            record: dict[str, list] = {"outlier_ratios": []} if self.owl is not None else {}
            if self.spec.drop_blocks:
                record.update(influence=[], angular=[], removal_error=[])
            state.extra[PROFILE_STAGE] = record
        if self.world.main:
            self.work.save_state(state)

    def _clean_stale(self, state: RunState, streams: dict[str, torch.Tensor]) -> None:
        """Remove this rank's half-written and unused hidden states; rank 0 also the run's other temporaries."""
        keep = {self.hidden(name, state.next_block, *t.shape).path.name for name, t in streams.items()}
        if state.stage == PROFILE_STAGE:
            done = profile_blocks_done(state.extra[PROFILE_STAGE])
            back = self.spec.drop_blocks - 1 if self.spec.block_score == "angular" else 0
            for j in range(max(1, done - back), done + 1):
                keep.add(self.hidden("owl", j, *streams["calib"].shape).path.name)
        for p in self.work.stale(self.world.rank, self.world.suffix, keep):
            p.unlink()
        if self.world.main:
            for pattern in ("*.partial", "*.tmp"):
                for p in self.out.glob(pattern):
                    p.unlink()

    def _block(
        self, i: int, stored: dict[str, torch.Tensor], streams: dict[str, torch.Tensor], sparsity: float,
    ) -> tuple[dict[str, torch.Tensor] | Future, list[dict[str, Any]], dict[str, Any], float | None,
               dict[str, Any] | None] | None:
        """Block i observed, shrunk by its width plan, masked, with --reconstruct fitted, and run to make
        the next block's inputs; returns its output tensors, the matrices' records, the plan's record, the
        block's relative output error against the dense block on the calibration inputs (None without
        calibration) and the fit's record (None without --reconstruct); None when stopped midway.

        A block whose experts stream returns its shard's write, in flight, in place of its tensors."""
        if i in self.streamed:
            try:
                return prune_streamed(self, i, stored, streams, sparsity)
            finally:
                self._release(i)
                self.st.release_block(i)
        layer = self.st.load_block(i, stored)
        b = self.cfg.batch_size
        try:
            stats, consumers = None, {}
            error = OutputError()
            moe = experts.moe_modules(layer) if self.spec.drop_experts else {}
            saliency = ExpertSaliency(moe) if moe else None
            dense: HiddenFile | None = None
            if self.observes:
                watches: list[Watch] = []
                if self.cfg.masks_observe:
                    watches.append((self.method.stat, linear_modules(layer), True))
                watches += self._width_watches(layer)
                # The dense outputs, kept (dense_i) for the block's output error; deleted with block i's inputs.
                dense = self.hidden("dense", i, *streams["calib"].shape)
                got = observe_all(self.st, i, layer, watches, self.hidden("calib", i, *streams["calib"].shape),
                                  b, self.midblock_stop, dst=dense, world=self.world,
                                  hooks=[saliency.on(layer)] if saliency is not None else ())
                if got is None:
                    return None
                stats = got.pop(0) if self.cfg.masks_observe else None
                consumers = width_inputs(got)
                del got  # the width plan's Gram matrices are the consumers' alone, freed as each is refit
            plan: dict[str, Any] = {}
            if self.spec.widths:
                release(layer)  # its compute copy is not needed to plan: rebuilt from the shrunk tensors
                stored, kept, plan = widths.shrink_block(self.spec, self.structure, self.shape, stored,
                                                         self._keys(i, stored), consumers)
                if stats is not None:
                    for name, keep in kept.items():
                        stats.obs[name] = widths.narrow_observation(stats.obs[name], keep)
                if saliency is not None:
                    stored, stats, plan["experts"] = self._drop_experts(i, stored, stats, saliency)
            del consumers
            out, records, layer = prune_block(self.method, sparsity if self.cfg.masks else 0.0, self.cfg.nm, self.st,
                                              i, layer, stored, stats, narrow=self.spec.widths, world=self.world)
            del stats  # a block's Gram matrices are freed before the pruned block runs
            fit: dict[str, Any] | None = None
            if self.cfg.reconstruct:
                fitted = self._reconstruct(i, layer, out, streams["calib"].shape)
                if fitted is None:
                    return None
                layer, fit, unfitted = fitted
            if not self._propagate(i, layer, streams, error, dense):
                return None
            after = self._total_error(error) if self.observes else None
            if fit is not None:
                if after is not None and after > fit["output_error_before"]:
                    # The fit made this block's outputs worse (too high a learning rate): the pruned weights
                    # as the method left them, and their outputs, instead.
                    for key, w in unfitted.items():
                        out[key].copy_(w)
                    self.st.hidden_wait_s += self._durable(i + 1)  # the first propagation's writes are done
                    release(layer)
                    layer = self.st.load_block(i, out, narrow=self.spec.widths)
                    error = OutputError()
                    if not self._propagate(i, layer, streams, error, dense):
                        return None
                    after = self._total_error(error)
                    fit["reverted"] = True
                fit["output_error_after"] = after
                del unfitted
            self._release(i)
        finally:
            self.st.release_block(i)
        return out, records, plan, after, fit

    def _propagate(self, i: int, layer: nn.Module, streams: dict[str, torch.Tensor], error: OutputError,
                   dense: HiddenFile | None) -> bool:
        """Run the pruned block i over every stream's states into block i+1's, folding the calibration
        outputs' error against `dense` into `error`; False when stopped midway."""
        for name, t in streams.items():
            if name == "calib" and not self.observes:
                continue
            src = self.hidden(name, i, *t.shape)
            # The last block's pruned calibration outputs feed no block: computed for the error only.
            dst = None if name == "calib" and i == self.n - 1 else self.hidden(name, i + 1, *t.shape)
            compare = _comparer(error, dense) if name == "calib" and dense is not None else None
            if not self.st.run_block(i, layer, src, self.cfg.batch_size, dst=dst, stop=self.midblock_stop,
                                     on_output=compare):
                return False
        return True

    def _total_error(self, error: OutputError) -> float:
        """The relative output error over every rank's windows, their sums added in rank order."""
        total = OutputError()
        for part in self.world.gather((error.sq_diff, error.sq_dense)):
            total.merge(OutputError(*part))
        return total.value

    def _reconstruct(self, i: int, layer: nn.Module, out: dict[str, torch.Tensor], shape: tuple[int, ...]
                     ) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]] | None:
        """--reconstruct on pruned block i (`layer`, its tensors `out`): its kept weights fitted so that its
        outputs match the dense block's on the calibration inputs, written into `out` (stored dtype, exact
        zeros kept); returns the block rebuilt from them, the fit's record, and the matrices as they were
        before the fit (to fall back to); None when stopped midway.

        Fitted: every linear of the block whose weight is one stored [out, in] tensor (fused MoE experts
        are not); the norms stay. A kill during the fit resumes at the start of the block (its inputs and
        the dense outputs are still on disk), which computes the same bytes again.
        """
        opts = self.cfg.reconstruction
        assert opts is not None
        src, dense = self.hidden("calib", i, *shape), self.hidden("dense", i, *shape)
        before = OutputError()
        if not self.st.run_block(i, layer, src, self.cfg.batch_size, stop=self.midblock_stop,
                                 on_output=_comparer(before, dense)):
            return None
        record: dict[str, Any] = {"output_error_before": self._total_error(before), "reverted": False}
        keys = self._keys(i, out)
        linears = {n: m for n, m in linear_modules(layer).items()
                   if keys(n)[0] in out and out[keys(n)[0]].dim() == 2
                   and tuple(out[keys(n)[0]].shape) == tuple(m.weight.shape)}
        unfitted = {keys(n)[0]: out[keys(n)[0]].clone() for n in linears}
        # The fit computes in float32 whatever the compute dtype: Adam's small steps vanish in bfloat16.
        layer.float()
        wide = {n: m.__dict__.get("_wide_dtype") for n, m in linears.items()}
        weights, removed = [], []
        for n, m in linears.items():
            w = out[keys(n)[0]].to(device=self.st.device, dtype=torch.float32, copy=True)
            mask = w == 0
            m._parameters["weight"] = nn.Parameter(w, requires_grad=True)
            if wide[n] is not None:
                m.__dict__["_wide_dtype"] = torch.float32  # the narrow-weight hooks leave float32 weights alone
            weights.append(m._parameters["weight"])
            removed.append(mask if bool(mask.any()) else None)
        kwargs = _as_float32(self.st.block_kwargs(1, shape[1])[i])
        start = self.calib_start

        def forward(x: torch.Tensor) -> torch.Tensor:
            o = layer(x, **kwargs)
            return o[0] if isinstance(o, tuple) else o

        def fetch(j: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (src.read(j - start, 1).to(self.st.device, torch.float32),
                    dense.read(j - start, 1).to(self.st.device, torch.float32))

        def stopping() -> bool:
            killpoint("reconstruct_step")  # before every optimiser step
            return self.midblock_stop is not None and self.midblock_stop.requested

        try:
            with fit_attention(self.st.device):  # CUDA's fused attention backward is not deterministic
                held = range(start, start + shape[0])
                done = fit_block(forward, weights, removed, self.calib_total, held, fetch, opts,
                                 self._exchange(weights), stopping)
        finally:
            for n, m in linears.items():
                if wide[n] is not None:
                    m.__dict__["_wide_dtype"] = wide[n]
        if done is None:
            return None
        record.update(done.to_json())
        with torch.no_grad():
            for (n, m), mask in zip(linears.items(), removed):
                dst = out[keys(n)[0]]
                dst.copy_(m.weight.detach())  # cast to the stored dtype, then the removed weights exact zeros
                if mask is not None:
                    dst.masked_fill_(mask.to(dst.device), 0)
        del weights, removed
        release(layer)
        return self.st.load_block(i, out, narrow=self.spec.widths), record, unfitted

    def _exchange(self, like: list[torch.Tensor]) -> Exchange:
        """How the fit's ranks share a window's part: its owner broadcasts (loss, gradients) as one float32
        buffer on the data group (NCCL on GPUs: the gradients stay on the cards), one window at a time.
        The owner of each calibration window is the rank whose share (dist.window_share, as my_streams
        cut them) holds it.

        Not the agreement group's pickled gathers: those copied every window's whole-block gradients through
        the host to every rank on every step (about 0.8 GB per window for a 7B block).
        """
        if self.world.size == 1:
            return held_here
        shares = [window_share(self.calib_total, self.cfg.batch_size, r, self.world.size)
                  for r in range(self.world.size)]
        sizes = [w.numel() for w in like]

        def exchange(j: int, part: Part | None) -> Part:
            owner = next(r for r, (lo, n) in enumerate(shares) if lo <= j < lo + n)
            if part is None:
                flat = torch.empty(1 + sum(sizes), dtype=torch.float32, device=like[0].device)
            else:
                loss = torch.tensor([part[1]], dtype=torch.float32, device=like[0].device)
                flat = torch.cat([loss, *(g.reshape(-1).to(loss.device) for g in part[2])])
            self.world.broadcast_(flat, owner)
            grads = [g.view_as(w) for g, w in zip(flat[1:].split(sizes), like)]
            return j, float(flat[0]), grads

        return exchange

    def _drop_experts(self, i: int, stored: dict[str, torch.Tensor], stats: BlockStats | None,
                      saliency: ExpertSaliency) -> tuple[dict[str, torch.Tensor], BlockStats | None, dict[str, Any]]:
        """Block i without its lowest-saliency routed experts (REAP), the method's statistics renumbered to
        the kept experts, and the plan's record per experts module."""
        assert self.structure.experts is not None  # shrink.check refused the flag otherwise
        record: dict[str, Any] = {}
        for holder, (sums, counts) in saliency.results(self.world).items():
            scores = plans.reap_saliency(sums, counts)
            n = scores.shape[0]
            dropped = plans.experts_to_drop(scores, shrink.expert_drop(self.spec, n), self.shape.groups)
            keep = plans.kept(n, dropped).tolist()
            tensors = experts.expert_tensors(self.sk, i, holder, self.structure.experts.router, stored)
            stored = experts.keep_experts(stored, tensors, keep)
            if stats is not None:
                stats = BlockStats(experts.renumber_experts(stats.obs, holder, keep),
                                   experts.renumber_experts(stats.tokens, holder, keep))
            record[holder] = {"experts": n, "kept": keep, "dropped": dropped,
                              "saliency": [float(f"{float(v):.6g}") for v in scores],
                              "tokens": [int(c) for c in counts]}
        return stored, stats, record

    def _width_watches(self, layer: nn.Module) -> list[Watch]:
        """What a width plan observes: the inputs of the matrices that read the removed channels and heads
        (their sums of squares for the scores; their Gram matrices for the refit)."""
        if not self.spec.widths:
            return []
        linears = linear_modules(layer)
        names = {n: linears[n] for n in widths.consumers(self.spec, self.structure) if n in linears}
        return [(Stat.SQ_SUM, names, False)] + ([(Stat.GRAM, names, False)] if self.spec.refit else [])

    def _keys(self, i: int, stored: dict[str, torch.Tensor]) -> widths.Keys:
        """A linear of block i (relative name) -> the checkpoint keys of its weight and bias (None: no bias)."""
        prefix = self.sk.block_prefix(i)

        def keys(name: str) -> tuple[str, str | None]:
            w, b = (self.sk.layout.source_key(prefix + name + part, {}) or prefix + name + part
                    for part in (".weight", ".bias"))
            return w, b if b in stored else None
        return keys

    def _write_block_shard(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """Write block i's output shard (as the output's block j, past removed blocks); returns its wall and
        writing-thread CPU seconds."""
        t0, c0 = time.perf_counter(), time.thread_time()
        j = shrink.new_index(i, self.dropped)
        tensors = shrink.renumber(tensors, self.sk.block_key_prefix(i), self.sk.block_key_prefix(j))
        items = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        write_shard(self.out / shard_name(j + 1, self.total_shards), items, tensors.__getitem__,
                    before_rename=lambda: killpoint("shard_write"))
        return {"write_s": time.perf_counter() - t0, "write_cpu_s": time.thread_time() - c0}

    def _write_stem_shard(self) -> None:
        keys = [k for k in self.ckpt.keys() if not self.sk.is_block_key(k)
                and not (self.drops_mtp and k.startswith(self.sk.stored_layers_prefix + "."))]
        items = [(k, self.ckpt.tensors[k].dtype, self.ckpt.tensors[k].shape) for k in keys]
        self.out.mkdir(parents=True, exist_ok=True)
        write_shard(self.out / shard_name(0, self.total_shards), items, self.ckpt.get,
                    before_rename=lambda: killpoint("shard_write"))

    def _finish_pending(self, fut: Future | None, state: RunState | None, since: float | None = None) -> None:
        """Wait for the block shard in flight, then record the block as done (rank 0's job); the wait is
        counted from `since` (perf_counter seconds) when given, else from now."""
        if fut is None or state is None:
            return
        t0 = time.perf_counter() if since is None else since
        timing = fut.result()
        timing["write_wait_s"] = time.perf_counter() - t0
        # The hidden states the state resumes from, written behind the computation when kept in memory.
        timing["states_wait_s"] = self._durable(state.next_block)
        state.blocks[-1]["timing"].update(_rounded(timing))
        self.work.save_state(state)
        for p in self.work.block_inputs(state.next_block - 1, self.world.suffix):
            p.unlink(missing_ok=True)  # every stream's input to that block
        self._forget(state.next_block - 1)
        killpoint("block_done")

    def _finalize(self, state: RunState, evaluated: list[dict[str, Any]]) -> dict[str, Any]:
        weight_map, total, params = self._output_index()
        report = self._report(state, evaluated, params)
        copy_side_files(Path(self.cfg.model_dir), self.out, {CONFIG_NAME: self._output_config()})
        self._write_card(report)
        killpoint("finalize")
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

    def _output_index(self) -> tuple[dict[str, str], int, dict[str, int]]:
        """The output's weight map and byte total from its shards' headers, and its parameter counts beside
        the input's (all tensors, and the decoder blocks')."""
        weight_map: dict[str, str] = {}
        total = 0
        after = decoder_after = 0
        for name in shard_names(self.n_out):
            for k, v in read_header(self.out / name).items():
                if k != "__metadata__":
                    weight_map[k] = name
                    total += v["data_offsets"][1] - v["data_offsets"][0]
                    after += math.prod(v["shape"])
                    decoder_after += math.prod(v["shape"]) if self.sk.is_block_key(k) else 0
        infos = self.ckpt.tensors
        before = sum(math.prod(t.shape) for t in infos.values())
        decoder_before = sum(math.prod(t.shape) for k, t in infos.items() if self.sk.is_block_key(k))
        return weight_map, total, {"before": before, "after": after, "decoder_before": decoder_before,
                                   "decoder_after": decoder_after}

    def _output_config(self) -> bytes:
        """config.json as the output's tensors are: no quantization_config once dequantized, their dtype, and
        the smaller numbers of structured pruning; the input's own bytes when nothing changes."""
        from wanda_stream.storage.quant import output_config

        raw = (Path(self.cfg.model_dir) / CONFIG_NAME).read_bytes()
        source = json.loads(raw)
        config = output_config(source, self.ckpt.dequantized, self.cfg.output_dtype)
        if self.spec.active:
            config = shrink.output_config(config, self.sk.model.config, self.spec, self.dropped)
        return raw if config == source else (json.dumps(config, indent=2) + "\n").encode()

    def _write_card(self, report: dict[str, Any]) -> None:
        """README.md: our model card, with the input's own card below it."""
        facts = self.work.load_run().get("card") or {}
        text = render_card(report, facts.get("base_model"), facts.get("name") or Path(self.cfg.model_dir).name,
                           facts.get("command") or resume_command(self.cfg), input_card(Path(self.cfg.model_dir)))
        atomic_write_bytes(self.out / CARD_NAME, text.encode())

    def _report(self, state: RunState, evaluated: list[dict[str, Any]], params: dict[str, int]) -> dict[str, Any]:
        report: dict[str, Any] = {
            "config": self.cfg.to_json(), "config_fingerprint": self.cfg.fingerprint(),
            "model_fingerprint": self.ckpt.fingerprint(), "versions": versions(),
            "blocks": state.blocks, "io": io_bytes(),
            "hidden_states": {"placement": self.memory.states, "resident_bytes": self.memory.resident_bytes},
            "seconds_this_process": round(time.monotonic() - self.t0, 3),
            "block_loop_seconds_this_process": round(self.loop_seconds, 3),
        }
        report["total_sparsity"] = _weighted_sparsity([m for b in state.blocks for m in b.get("matrices", [])])
        report["parameters"] = params
        if self.spec.active:
            record = state.extra.get(PROFILE_STAGE, {})
            report["structure"] = {"drop_blocks": self.spec.drop_blocks, "block_score": self.spec.block_score,
                                   "drop_ffn": self.spec.drop_ffn, "drop_heads": self.spec.drop_heads,
                                   "drop_experts": self.spec.drop_experts, "experts_key": self.shape.experts_key,
                                   "mtp_dropped": self.drops_mtp,
                                   "refit": self.spec.refit, "papers": STRUCTURE_PAPERS,
                                   "dropped_blocks": self.dropped,
                                   **{k: record[k] for k in ("influence", "angular", "removal_error") if k in record},
                                   "sizes": shrink.new_sizes(self.spec, self.shape)}
        coverage = self.calibration_coverage()
        if coverage is not None:
            report["calibration"] = coverage
        if self.ckpt.dequantized:
            qc = self.ckpt.quantization_config or {}
            report["dequantized"] = {"quant_method": qc.get("quant_method"),
                                     "to": str(self.cfg.output_dtype or torch.bfloat16).removeprefix("torch.")}
        report["method"] = {"name": self.method.name, "paper": self.method.paper, **self.cfg.method_options}
        if self.cfg.reconstruct:
            report["reconstruct"] = {"papers": RECONSTRUCT_PAPERS, "optimizer": "adam", "schedule": "cosine",
                                     "fitted": "every linear of the block, as a whole, mask held",
                                     **self.cfg.reconstruct}
        if self.owl is not None:
            report["sparsity_profile"] = {"name": "owl", "paper": OWL_PAPER, **self.cfg.profile_options,
                                          **state.extra[PROFILE_STAGE]}
        shares = [p["nll"] for p in evaluated if "nll" in p]  # rank order: window order
        if shares:
            nll = sum(s for sums, _ in shares for s in sums)  # micro-batch by micro-batch, as one process adds them
            count = sum(n for _, n in shares)
            windows, seqlen = read_header(self.work.file("tokens.safetensors"))["eval"]["shape"]
            report["eval"] = {"perplexity": math.exp(nll / count), "tokens": count, "windows": windows,
                              "seqlen": seqlen, "data": self.cfg.eval_data}
        if self.cfg.eval_tasks:
            from wanda_stream.run.task_prune import task_results, task_spec

            answers = {k: v for p in evaluated for k, v in p.get("answers", {}).items()}
            report["eval_tasks"] = task_results(Path(self.cfg.model_dir), task_spec(self.cfg), answers)
        report.update(peak_figures(str(self.st.device), self.rank_peaks))  # last: the evaluation included
        return report


def _comparer(error: OutputError, dense: HiddenFile) -> Callable[[int, int, torch.Tensor], None]:
    """A run_block callback folding each micro-batch of pruned outputs, against the same windows of `dense`, into `error`."""
    def compare(start: int, count: int, out: torch.Tensor) -> None:
        error.add(out, dense.read(start, count).to(out.device))
    return compare


def _as_float32(obj: Any) -> Any:
    """A block's keyword arguments with every floating tensor in float32 (rotary tables, masks), for the fit."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _as_float32(v) for k, v in obj.items()}
    return obj


def _weighted_sparsity(records: list[dict[str, Any]]) -> float:
    """Zeros over weights of the matrices recorded."""
    total = sum(math.prod(m["shape"]) for m in records)
    return sum(m["sparsity"] * math.prod(m["shape"]) for m in records) / max(total, 1)


def _rounded(timing: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timing.items()}


def copy_side_files(src: Path, dst: Path, overrides: dict[str, bytes] | None = None) -> None:
    """Copy config, generation config, tokenizer and other non-weight files, atomically each; a file named
    in `overrides` is written with those bytes instead (the smaller model's config.json)."""
    overrides = overrides or {}
    for name in side_files(src):
        atomic_write_bytes(dst / name, overrides[name] if name in overrides else (src / name).read_bytes())
    fsync_dir(dst)


def _link(src: Path, dst: Path) -> None:
    """`dst` as a second name of the complete file `src` (a copy where the file system has no hard links)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    fsync_dir(dst.parent)


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


def prepare(cfg: RunConfig, model_fp: dict[str, Any], resume: bool, overwrite: bool,
            own: Sequence[str] = (), card: CardFacts | None = None) -> bool:
    """Decide between a new run, a resumed one and nothing to do; returns False when already finished.

    Refuses (InputError) to touch an existing run or output unless --resume or --overwrite says how.
    The caller holds the run's lock. --overwrite deletes the output files named in `own` (what this
    run writes, outputs.own_files) and nothing else; `card` is recorded for the model card.
    """
    from wanda_stream.errors import InputError
    from wanda_stream.storage.state import check_same_run

    out, work = Path(cfg.output_dir), WorkDir(Path(cfg.work_dir))
    if overwrite:
        work.clear()
        for name in own:  # in order: report and index before the shards they name
            (out / name).unlink(missing_ok=True)
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
    work.create(cfg, model_fp, card)
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
