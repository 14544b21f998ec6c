"""Log-likelihood requests through the streamer: every bucket of requests through each block, one read of the weights.

Each bucket (requests of one padded length) is a stream of fixed-shape windows with two hidden-state
files on disk, ping-ponged block after block; the final norm and head then score the continuation
positions of each micro-batch in chunks (see `loglik`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wanda_stream.storage.activations import HiddenFile
from wanda_stream.errors import Interrupted
from wanda_stream.eval.loglik import Bucket, Request, per_request, plan_buckets, scored_positions, token_scores
from wanda_stream.model.skeleton import release
from wanda_stream.run.report import Progress
from wanda_stream.storage.state import StopFlag
from wanda_stream.model.stream import Streamer

STOPPED = "task evaluation stopped; it cannot be resumed: rerun the command"
# Rows per micro-batch when none is given: about this many tokens, whatever the bucket's length.
AUTO_BATCH_TOKENS = 8192
MAX_AUTO_ROWS = 64


@dataclass(frozen=True)
class Batching:
    """Rows of a bucket computed together: `rows` when set, else about AUTO_BATCH_TOKENS tokens, at most `max_rows`."""

    rows: int | None = None
    max_rows: int = MAX_AUTO_ROWS

    def rows_for(self, seqlen: int) -> int:
        if self.rows is not None:
            return self.rows
        return max(1, min(self.max_rows, AUTO_BATCH_TOKENS // seqlen))


def bucket_files(work_dir: Path, buckets: list[Bucket], hidden: int, dtype: torch.dtype) -> list[list[HiddenFile]]:
    """Two hidden-state files per bucket (a block's input and output)."""
    return [[HiddenFile(work_dir / f"loglik_{b.seqlen:06d}_{k}.bin", *b.tokens.shape, hidden, dtype)
             for k in range(2)] for b in buckets]


def run_buckets(st: Streamer, buckets: list[Bucket], files: list[list[HiddenFile]], batching: Batching,
                stop: StopFlag | None, progress: Progress | None) -> list[HiddenFile]:
    """Carry every bucket through every block, each block read once; returns each bucket's last-block outputs.

    Raises Interrupted when a stop was requested.
    """
    for b, (first, _) in zip(buckets, files):
        if not st.embed_windows(b.tokens, first, batching.rows_for(b.seqlen), stop):
            raise Interrupted(STOPPED)
    st.prefetch(0)
    for i in range(st.sk.n_layers):
        stored, _ = st.block_tensors(i)
        st.prefetch(i + 1)
        layer = st.load_block(i, stored)
        try:
            for b, pair in zip(buckets, files):
                ok = st.run_block(i, layer, pair[i % 2], batching.rows_for(b.seqlen),
                                  dst=pair[(i + 1) % 2], stop=stop)
                if not ok:
                    raise Interrupted(STOPPED)
        finally:
            release(st.sk.layers[i])
        if progress is not None:
            progress.update(i + 1, block=i)
    return [pair[st.sk.n_layers % 2] for pair in files]


def score_bucket(st: Streamer, bucket: Bucket, last: HiddenFile,
                 batching: Batching) -> list[tuple[int, tuple[float, bool]]]:
    """(request index, (log-likelihood, greedy)) for every request of a bucket, from its last-block outputs."""
    out = []
    for start, count, normed in st.final_states(last, batching.rows_for(bucket.seqlen)):
        rows, pos, targets, sizes = scored_positions(bucket, start, count)
        logp, greedy = token_scores(st.head_logits, normed[rows.to(normed.device), pos.to(normed.device)],
                                    targets, st.logit_rows())
        out += zip(bucket.members[start : start + count], per_request(logp, greedy, sizes))
    return out


def streamed_loglikelihoods(
    st: Streamer, requests: list[Request], max_length: int, work_dir: Path, batching: Batching = Batching(),
    stop: StopFlag | None = None, progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probabilities, greedy) per request, in order; one pass over the blocks.

    Hidden states live in `work_dir` (created if needed) and are removed afterwards.
    """
    if not requests:
        return []
    buckets = plan_buckets(requests, max_length)
    work_dir.mkdir(parents=True, exist_ok=True)
    files = bucket_files(work_dir, buckets, st.hidden, st.dtype)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    try:
        lasts = run_buckets(st, buckets, files, batching, stop, progress)
        for b, last in zip(buckets, lasts):
            for idx, score in score_bucket(st, b, last, batching):
                results[idx] = score
    finally:
        for f in (f for pair in files for f in pair):
            f.path.unlink(missing_ok=True)
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"requests {missing[:5]} were in no bucket")  # a bug in plan_buckets
    return results  # type: ignore[return-value]
