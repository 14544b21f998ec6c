"""The layer streamer: a model opened lazily, its blocks materialized one at a time.

`Streamer` owns the checkpoint, the meta skeleton and the compute device; it turns token
windows into block-0 hidden states, runs a block over a hidden-state file in micro-batches,
and applies the final norm and head. Pruning and evaluation are both loops over it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from wanda_stream.storage.activations import HiddenFile, HiddenWriter, Mover, batches, bind_device, device_pool, read_ahead
from wanda_stream.storage.checkpoint import Checkpoint
from wanda_stream.model.skeleton import Skeleton, load_config, materialize, release, run_base_with_recorders, stored_state
from wanda_stream.run.resources import HELD_BLOCKS, pinned_bytes
from wanda_stream.storage.state import StopFlag, killpoint

# Logits cap some families apply after the head (transformers does it in the causal-LM forward).
LOGIT_SOFTCAP_ATTR = "final_logit_softcapping"
LOGIT_CHUNK_BYTES = 32 * 1024 * 1024  # logits computed at once on the CPU (cache-sized)
# On CUDA: logits of as many rows at once as this fraction of the free memory holds. The head runs
# after the blocks, so this stays below the block loop's peak (a block and the activation budget).
LOGIT_FREE_FRACTION = 8


def open_model(model_dir: Path, save_dtype: torch.dtype | None = None) -> tuple[Checkpoint, Skeleton]:
    """Open a checkpoint (quantized weights presented as float, see Checkpoint), build its skeleton and
    check every tensor against the config."""
    ckpt = Checkpoint(model_dir, save_dtype)
    config = load_config(model_dir)
    sk = Skeleton.from_config(config)
    sk.bind(ckpt.keys())
    check_tensors(ckpt, sk)
    return ckpt, sk


def check_tensors(ckpt: Checkpoint, sk: Skeleton) -> None:
    """Every parameter of the skeleton is in the checkpoint with the right shape, and no block key is unknown.

    Checked through the checkpoint layout (renamed keys, per-expert tensors fused on load), on shapes only.
    """
    params = stored_state(sk.model)
    sk.layout.check(ckpt.tensors, params, sk.tied, sk.is_block_key, ckpt.root)


def checkpoint_dtype(ckpt: Checkpoint, sk: Skeleton) -> torch.dtype:
    """The dtype of the decoder blocks' floating-point weights (the first one found)."""
    for key in ckpt.keys():
        info = ckpt.tensors[key]
        if sk.is_block_key(key) and info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


class Streamer:
    """One model, one device, one compute dtype."""

    def __init__(self, ckpt: Checkpoint, sk: Skeleton, device: str, dtype: torch.dtype, prefetch: bool = True) -> None:
        self.ckpt = ckpt
        self.sk = sk
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden = sk.hidden_size()
        # Blocks whose routed experts are read a group at a time (run/expert_groups.py): a read of the block
        # leaves these keys out.
        self.streamed: dict[int, frozenset[str]] = {}
        bind_device(self.device)
        largest = max((sum(pinned_bytes(ckpt.tensors[k].nbytes) for k in self.block_keys(i))
                       for i in range(sk.n_layers)), default=0)
        self._pins = PinBudget(HELD_BLOCKS * largest)
        self._reader = device_pool("prefetch", self.device) if prefetch else None
        # Hidden states move in micro-batches beside the compute: the next one read, the last one written.
        self.mover = Mover(self.device, threads=prefetch)
        # Where the hidden states a block computes are kept besides their file (None: the file only),
        # and whether the file's fsync may wait for the writer thread; see `keep_states`.
        self.keep: torch.device | None = None
        self.defer = False
        self.hidden_wait_s = 0.0  # seconds the compute waited on hidden-state reads and writes, in total
        self._pending: dict[int, Future] = {}
        self._kwargs: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
        embed = sk.model.get_input_embeddings()
        self.embed_name = next(n for n, m in sk.base.named_children() if m is embed)
        # Width of the base model's inputs_embeds: OPT-350m projects 512-wide embeddings to 1024 (project_in).
        self.embed_dim = int(embed.weight.shape[1])
        self.layers_name = sk.layers_prefix[len(sk.base_prefix) + 1 :]
        self.narrow: Skeleton | None = None  # the blocks at structured pruning's widths, when they change
        self.shared: SharedBlocks | None = None  # a sweep's one read of each block, when it has several runs

    # ---- reading blocks -------------------------------------------------------------------
    def block_keys(self, i: int) -> list[str]:
        """Block i's checkpoint keys, but the routed experts of a block that streams them."""
        prefix = self.sk.block_key_prefix(i)
        apart = self.streamed.get(i, frozenset())
        return [k for k in self.ckpt.keys() if k.startswith(prefix) and k not in apart]

    def read_parts(self, parts: list[tuple[str, tuple[int, int] | None]]) -> Future:
        """These tensors (CPU, presented dtype; a group of a streamed block's experts), read in the background
        with prefetch, else now: (key, None) whole, (key, (start, stop)) those rows of its first dimension;
        several row ranges of one key come joined in the order given."""
        if self._reader is not None:
            return self._reader.submit(self._read_parts, parts)
        done: Future = Future()
        done.set_result(self._read_parts(parts))
        return done

    def _read_parts(self, parts: list[tuple[str, tuple[int, int] | None]]) -> dict[str, torch.Tensor]:
        got: dict[str, list[torch.Tensor]] = {}
        for key, rows in parts:
            got.setdefault(key, []).append(self.ckpt.get(key, rows=rows))
        return {k: ts[0] if len(ts) == 1 else torch.cat(ts) for k, ts in got.items()}

    def _read_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        t0, c0 = time.perf_counter(), time.thread_time()
        keys = self.block_keys(i)
        pin = self.device.type == "cuda" and self._pins.take([self.ckpt.tensors[k].nbytes for k in keys])
        out = {k: self.ckpt.get(k, pin=pin) for k in keys}
        if pin:
            self._pins.track(out.values())
        # Wall and CPU seconds of the reading thread: on a small host the CPU part competes with the compute.
        return out, {"read_s": time.perf_counter() - t0, "read_cpu_s": time.thread_time() - c0}

    def prefetch(self, i: int, after: Future | None = None) -> None:
        """Start reading block i in the background (no-op without prefetch or past the end), once `after`
        (the previous block's shard write) has finished, successfully or not.

        The read then never holds a block beside the one still being written: with the block computed
        on and its compute-dtype copy that would be a fourth block-sized allocation (0.4 GB for a 7B
        block) at the start of every block. Both still run behind the computation.
        """
        if self._reader is None or not 0 <= i < self.sk.n_layers:
            return
        if self.shared is not None:
            self.shared.prefetch(i, self._reader, lambda: self._read_block_after(i, after))
        elif i not in self._pending:
            self._pending[i] = self._reader.submit(self._read_block_after, i, after)

    def _read_block_after(self, i: int, after: Future | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if after is not None:
            wait([after])  # its error, if any, is the main thread's to report
        return self._read_block(i)

    def block_tensors(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Block i's stored tensors (CPU, stored dtype), from the prefetch if one was started, and timings.

        Timings: read_s and read_cpu_s of the read itself, read_wait_s that this call waited for it
        (the whole read without prefetch, only what the compute did not hide with it).
        """
        t0 = time.perf_counter()
        if self.shared is not None:
            out, timing = self.shared.take(i, lambda: self._read_block(i))
        else:
            fut = self._pending.pop(i, None)
            out, timing = fut.result() if fut is not None else self._read_block(i)
        return out, {**timing, "read_wait_s": time.perf_counter() - t0}

    def load_block(self, i: int, stored: dict[str, torch.Tensor], narrow: bool = False,
                   exclude: tuple[str, ...] = ()) -> nn.Module:
        """Materialize block i on the device, in the compute dtype, from its stored tensors; `narrow`: into
        the skeleton of structured pruning's new widths (`self.narrow`), for a block whose tensors shrank;
        the modules named in `exclude` (relative names: a streamed block's experts) stay on the meta device."""
        sk = self.skeleton(narrow)
        layer = sk.layers[i]
        view = _DictCheckpoint(self.ckpt.root, sk.layout.to_params(stored))
        materialize(layer, sk.block_prefix(i), view, self.device, self.dtype, {}, sk.model, exclude=exclude,
                    narrow_linears=True)
        layer.eval()
        return layer

    def skeleton(self, narrow: bool = False) -> Skeleton:
        """The skeleton blocks load into: the narrow one (structured pruning's new widths) when asked and made."""
        return self.narrow if narrow and self.narrow is not None else self.sk

    def release_block(self, i: int) -> None:
        """Free block i's weights, in both skeletons."""
        release(self.sk.layers[i])
        if self.narrow is not None:
            release(self.narrow.layers[i])

    def keep_states(self, on: torch.device | None, defer: bool) -> None:
        """From now on, keep the hidden states `embed_windows` and `run_block` write in memory on `on`
        too (None: in their files only); with `defer`, their files are made durable by the writer
        thread behind the computation, and the caller waits with `HiddenFile.wait_durable`."""
        self.keep, self.defer = on, defer

    def writer(self, dst: HiddenFile) -> HiddenWriter:
        """A writer of hidden states into `dst`, kept in memory as `keep_states` says."""
        return HiddenWriter(dst, self.mover, self.keep, self.defer)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        self.mover.close()

    # ---- the parts around the blocks ------------------------------------------------------
    def _stem(self, with_embedding: bool) -> None:
        exclude = (self.layers_name,) if with_embedding else (self.layers_name, self.embed_name)
        # The embedding table stays in the stored dtype (the rows looked up are cast): see `materialize`.
        materialize(self.sk.base, self.sk.base_prefix + ".", self.ckpt, self.device, self.dtype,
                    self.sk.sources, self.sk.model, exclude=exclude, narrow_embeddings=with_embedding)
        self.sk.base.eval()

    def _release_stem(self) -> None:
        for name, child in self.sk.base.named_children():
            if name != self.layers_name:
                release(child)

    def embed_windows(self, tokens: torch.Tensor, out: HiddenFile, batch: int, stop: StopFlag | None = None) -> bool:
        """Block-0 inputs of `tokens` [n, seqlen], as the base model computes them, into `out`."""
        self._stem(with_embedding=True)
        writer = self.writer(out)
        try:
            for start, count in batches(tokens.shape[0], batch):
                if stop is not None and stop.requested:
                    writer.abort()
                    return False
                ids = tokens[start : start + count].to(self.device)
                sink, _ = run_base_with_recorders(self.sk, ids, None)
                writer.write(sink.first_hidden)
            writer.commit()
        finally:
            self._release_stem()
        return True

    def block_kwargs(self, batch: int, seqlen: int) -> dict[int, dict[str, Any]]:
        """What the base model passes every block for a batch of this shape (masks, positions, ...)."""
        key = (batch, seqlen)
        if key not in self._kwargs:
            self._stem(with_embedding=False)
            try:
                dummy = torch.zeros(batch, seqlen, self.embed_dim, device=self.device, dtype=self.dtype)
                sink, _ = run_base_with_recorders(self.sk, None, dummy)
                self._kwargs[key] = sink.kwargs
            finally:
                self._release_stem()
        return self._kwargs[key]

    def run_block(
        self, i: int, layer: nn.Module, src: HiddenFile, batch: int,
        dst: HiddenFile | None = None, stop: StopFlag | None = None,
        on_output: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> bool:
        """Run block i over every window of `src`, writing the outputs to `dst` when given, and passing
        each micro-batch's (start, count, outputs) to `on_output` when given.

        Returns False (and writes nothing) when a stop was requested midway.
        """
        writer = self.writer(dst) if dst is not None else None
        try:
            for start, count, h, waited in self._read(src, batch):
                self.hidden_wait_s += waited
                if stop is not None and stop.requested:
                    if writer is not None:
                        writer.abort()
                    return False
                kwargs = self.block_kwargs(count, src.shape[1])[i]
                with torch.no_grad():
                    out = layer(h.to(self.device, non_blocking=True), **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if on_output is not None:
                    on_output(start, count, out)
                if writer is not None:
                    writer.write(out)
                    killpoint("hidden_write")
            if writer is not None:
                writer.commit()
        finally:
            if writer is not None:
                self.hidden_wait_s += writer.waited_s
        return True

    def _read(self, src: HiddenFile, batch: int) -> Iterator[tuple[int, int, torch.Tensor, float]]:
        """`src` in micro-batches, read ahead; from page-locked memory when they go to CUDA."""
        return read_ahead(src, batches(src.shape[0], batch), self.mover.reader, pin=self.device.type == "cuda")

    def _tail(self, src: HiddenFile, batch: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Per micro-batch of the last block's outputs: (start, count, final hidden states).

        The final norm runs through the base model's own forward (every block a stand-in); the head
        stays materialized while the batches are consumed, for `_logits`.
        """
        head = self.sk.model.get_output_embeddings()
        head_name = next(n for n, m in self.sk.model.named_modules() if m is head)
        self._stem(with_embedding=False)
        materialize(head, head_name + ".", self.ckpt, self.device, self.dtype, self.sk.sources, self.sk.model)
        try:
            for start, count, h, _ in self._read(src, batch):
                h = h.to(self.device)
                dummy = torch.zeros(*h.shape[:-1], self.embed_dim, device=h.device, dtype=h.dtype)
                _, normed = run_base_with_recorders(self.sk, None, dummy, inject=h)
                yield start, count, normed
        finally:
            self._release_stem()
            release(head)

    def final_states(self, src: HiddenFile, batch: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, count, final-norm outputs) per micro-batch of the last block's outputs `src`; see `head_logits`."""
        return self._tail(src, batch)

    def head_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of final-norm outputs `rows` [m, hidden]; only while `final_states` is being consumed."""
        return _logits(self.sk.model.get_output_embeddings(), rows, self._softcap())

    def logit_rows(self) -> int:
        """Rows of logits computed at once; see logit_chunk_rows. Call once per micro-batch."""
        head = self.sk.model.get_output_embeddings()
        return logit_chunk_rows(int(head.weight.shape[0]), self.device, self.dtype)

    def _softcap(self) -> float | None:
        return getattr(self.sk.model.config.get_text_config(), LOGIT_SOFTCAP_ATTR, None)

    def final_nll(self, src: HiddenFile, tokens: torch.Tensor, batch: int) -> tuple[list[float], int]:
        """The next-token negative log-likelihood sum of every micro-batch of `tokens` given the last block's
        outputs `src`, in order (their total in that order is one process's, however ranks split the
        windows), and the number of tokens scored.

        The head runs on chunks of tokens, so no tokens x vocabulary tensor for the whole set is ever held.
        """
        head, cap = self.sk.model.get_output_embeddings(), self._softcap()
        sums, count_tokens = [], 0
        for start, count, normed in self._tail(src, batch):
            labels = tokens[start : start + count, 1:].to(self.device)
            s, n = _chunked_nll(head, normed[:, :-1, :], labels, cap, self.logit_rows())
            sums.append(s)
            count_tokens += n
        return sums, count_tokens

    def final_logits(self, src: HiddenFile, batch: int) -> torch.Tensor:
        """Logits [n, seqlen, vocab] (float32, CPU) from the last block's outputs `src`, as final_nll computes them.

        Holds every window's logits at once: for checking the streamer on a few windows, not for evaluation.
        """
        head, cap = self.sk.model.get_output_embeddings(), self._softcap()
        return torch.cat([_logits(head, normed, cap).cpu() for _, _, normed in self._tail(src, batch)])


def _logits(head: nn.Module, rows: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The head's float32 logits, softcapped as the family's causal-LM forward does."""
    with torch.no_grad():
        out = head(rows).float()
    return torch.tanh(out / cap) * cap if cap else out


def logit_chunk_rows(vocab: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows of logits computed at once: LOGIT_CHUNK_BYTES of them on the CPU; on CUDA as many as a
    LOGIT_FREE_FRACTION of the free memory holds (the head's output, its float32 copy and the
    log-softmax), rounded down to a power of two: on a large card a whole micro-batch at once,
    where 32 MB chunks made 65-row matmuls of a 128K vocabulary."""
    if device.type != "cuda":
        return max(1, LOGIT_CHUNK_BYTES // (vocab * 4))
    per_row = vocab * (torch.empty(0, dtype=dtype).element_size() + 3 * 4)
    rows = max(1, torch.cuda.mem_get_info(device)[0] // LOGIT_FREE_FRACTION // per_row)
    return 1 << (rows.bit_length() - 1)


def _chunked_nll(head: nn.Module, h: torch.Tensor, labels: torch.Tensor, cap: float | None,
                 chunk: int) -> tuple[float, int]:
    """Sum of the next-token NLLs of rows `h` (`chunk` rows of logits at a time); one synchronisation."""
    rows = h.reshape(-1, h.shape[-1])
    flat = labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for s in range(0, rows.shape[0], chunk):
        logits = _logits(head, rows[s : s + chunk], cap)
        total += torch.nn.functional.cross_entropy(logits, flat[s : s + chunk], reduction="sum").double()
    return float(total), int(flat.numel())


class PinBudget:
    """At most `limit` bytes of block tensors in pinned host memory at once, counted as the pinned
    allocator takes them (rounded up to a power of two); a block read past it goes to pageable memory
    (slower copies to the GPU, same values). The allocator keeps what it freed for reuse, so the pool
    then stays at the limit for blocks of one shape instead of growing with every tensor ever pinned.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live = 0
        self._lock = threading.Lock()

    def take(self, tensor_bytes: list[int]) -> bool:
        """Whether tensors of these sizes may be pinned now; if so they are counted as live until `track`ed ones die."""
        need = sum(pinned_bytes(n) for n in tensor_bytes)
        with self._lock:
            if self.live + need > self.limit:
                return False
            self.live += need
            return True

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give back each tensor's share when it is freed (the tensors a `take` was granted for)."""
        for t in tensors:
            weakref.finalize(t, self._give, pinned_bytes(t.nbytes))

    def _give(self, n: int) -> None:
        with self._lock:
            self.live -= n



class SharedBlocks:
    """One read of each block for the runs of a sweep, which take the blocks in lockstep.

    The first run to ask for block i reads it (or finds its prefetch); the others get a copy of the
    same tensors instead of a second read. Every taker gets tensors of its own, since pruning writes
    into them, except the last, to whom the sweep's scheduler hands the read itself (`hand_over`):
    so the block's bytes are held once more than in a single run only while several runs still
    need it. A run asking for another block than the one held drops it first.
    """

    def __init__(self) -> None:
        self.pending: dict[int, Future] = {}
        self.block: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.hand_over = True  # set by the scheduler before each step: no other run will take this block
        self.reads = 0  # blocks read from the checkpoint, for the sweep's report

    def prefetch(self, i: int, reader: ThreadPoolExecutor, read: Callable[[], tuple[dict[str, torch.Tensor],
                                                                                   dict[str, float]]]) -> None:
        """Start reading block i on `reader` unless it is held or already being read."""
        if i != self.block and i not in self.pending:
            self.pending[i] = reader.submit(read)

    def take(self, i: int, read: Callable[[], tuple[dict[str, torch.Tensor], dict[str, float]]]
             ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Block i's stored tensors and the timings of their read (zero for a copy of a block held)."""
        if self.block != i:
            self.block, self.tensors = None, {}  # the block held is freed before the next comes in
            fut = self.pending.pop(i, None)
            self.tensors, timing = fut.result() if fut is not None else read()
            self.block, self.reads = i, self.reads + 1
        else:
            timing = {"read_s": 0.0, "read_cpu_s": 0.0}
        if self.hand_over:
            out, self.block, self.tensors = self.tensors, None, {}
            return out, timing
        return {k: v.clone() for k, v in self.tensors.items()}, timing


class _DictCheckpoint:
    """Tensors already read, behind the small part of Checkpoint's interface `materialize` uses."""

    def __init__(self, root: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.root = root
        self._t = tensors
        self.tensors = {k: _Info(tuple(v.shape)) for k, v in tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]


class _Info:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.file = "(prefetched)"


def run_in_background(pool: ThreadPoolExecutor, fn: Callable[[], Any]) -> Future:
    return pool.submit(fn)
