"""Streamed perplexity: the block loop without the kernel, hidden states on disk."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PretrainedConfig

from wanda_stream.run import calib
from wanda_stream.storage.activations import HiddenFile
from wanda_stream.run.config import DTYPE_NAMES, resolve_compute_dtype
from wanda_stream.errors import Interrupted
from wanda_stream.model.skeleton import release
from wanda_stream.run.report import Progress, peak_figures, reset_peaks
from wanda_stream.run.resources import check_seqlen, default_seqlen, seqlen_note
from wanda_stream.storage.state import StopFlag
from wanda_stream.model.stream import Streamer, checkpoint_dtype, open_model

# (model config, window length, compute dtype, number of windows) -> windows per micro-batch
BatchRule = Callable[[PretrainedConfig, int, torch.dtype, int], int]


def run_dense(
    st: Streamer, tokens: torch.Tensor, files: list[HiddenFile], batch: int,
    stop: StopFlag | None = None, progress: Progress | None = None,
) -> HiddenFile:
    """Carry `tokens` through every block (no pruning), ping-ponging between two hidden-state files.

    Returns the file holding the last block's outputs; raises Interrupted when a stop was requested.
    """
    if not st.embed_windows(tokens, files[0], batch, stop):
        raise Interrupted("evaluation stopped")
    st.prefetch(0)
    for i in range(st.sk.n_layers):
        stored, _ = st.block_tensors(i)
        st.prefetch(i + 1)
        layer = st.load_block(i, stored)
        ok = st.run_block(i, layer, files[i % 2], batch, dst=files[(i + 1) % 2], stop=stop)
        release(st.sk.layers[i])
        if not ok:
            raise Interrupted("evaluation stopped")
        if progress is not None:
            progress.update(i + 1, block=i)
    return files[st.sk.n_layers % 2]


def evaluate(
    model_dir: Path, data: str, seqlen: int | None, max_windows: int | None, device: str, compute_dtype: str,
    work_dir: Path, batch: BatchRule | None = None, progress_mode: str = "quiet",
    say: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Perplexity of the model on non-overlapping `seqlen` windows of `data`, one block at a time.

    `seqlen` None is min(2048, the model's context); `batch(config, seqlen, dtype, windows)` gives the
    micro-batch (default 1); `say` gets the line naming a default window length.
    """
    t0 = time.monotonic()
    ckpt, sk = open_model(model_dir)
    if seqlen is None:
        seqlen = default_seqlen(sk.model.config)
        say(seqlen_note(sk.model.config))
    check_seqlen(sk.model.config, seqlen, "--seqlen")
    dtype_name = resolve_compute_dtype(compute_dtype, device, checkpoint_dtype(ckpt, sk))
    dtype = DTYPE_NAMES[dtype_name]
    tokenizer = calib.load_tokenizer(model_dir)
    tokens = calib.eval_windows("\n\n".join(calib.documents(data, "evaluation")), tokenizer, seqlen, max_windows, data)
    micro = batch(sk.model.config, seqlen, dtype, tokens.shape[0]) if batch is not None else 1
    st = Streamer(ckpt, sk, device, dtype)
    reset_peaks(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    n, hidden = tokens.shape[0], st.hidden
    files = [HiddenFile(work_dir / f"eval_{i % 2}.bin", n, seqlen, hidden, dtype) for i in range(2)]
    progress = Progress(progress_mode, sk.n_layers, "eval")
    stop = StopFlag().install()
    try:
        last = run_dense(st, tokens, files, micro, stop, progress)
        sums, count = st.final_nll(last, tokens, micro)
        nll = sum(sums)  # in micro-batch order
    finally:
        stop.restore()
        progress.close()
        st.close()
        for f in files:
            f.path.unlink(missing_ok=True)
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n, "seqlen": seqlen,
            "seconds": round(time.monotonic() - t0, 3), **peak_figures(device),
            "model_dir": str(model_dir), "data": data}


def streamed_logits(model_dir: Path, tokens: torch.Tensor, device: str, work_dir: Path,
                    dtype: torch.dtype = torch.float32, batch: int = 2) -> tuple[torch.Tensor, float]:
    """Logits [n, seqlen, vocab] of token windows and their mean next-token NLL, streamed one block at a time.

    The dense forward of the streamer, for checking it against the whole model held in transformers.
    """
    ckpt, sk = open_model(model_dir)
    st = Streamer(ckpt, sk, device, dtype, prefetch=False)
    work_dir.mkdir(parents=True, exist_ok=True)
    n, seqlen = tokens.shape
    files = [HiddenFile(work_dir / f"logits_{i}.bin", n, seqlen, st.hidden, dtype) for i in range(2)]
    try:
        last = run_dense(st, tokens, files, batch)
        sums, count = st.final_nll(last, tokens, batch)
        nll = sum(sums)
        logits = st.final_logits(last, batch)
    finally:
        st.close()
        for f in files:
            f.path.unlink(missing_ok=True)
    return logits, nll / count
