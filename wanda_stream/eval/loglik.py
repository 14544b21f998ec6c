"""Log-likelihood requests as fixed-shape token buckets, and the scoring kernel over the head's logits.

Pure: no checkpoint, no lm-eval. A request is a context and a continuation, already tokenized;
its model input is lm-eval's causal one, (context + continuation)[-(max_length + 1):][:-1], and its
score is the sum of the continuation's log-probabilities at the input's last positions, with a flag
for "every continuation token is the argmax". Requests are packed one per row into buckets of a few
fixed lengths, right-padded: under causal attention, padding after a position cannot change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MIN_BUCKET = 16
PAD_ID = 0  # any token id: right padding is never attended by the positions that are scored
TARGETS, META = ".targets", ".meta"  # suffixes of a saved bucket's side tensors


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair in token ids; both non-empty, as lm-eval guarantees."""

    context: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class Bucket:
    """Requests padded to one length, one per row.

    tokens [n, seqlen]: the model inputs; targets [n, seqlen]: the token each position predicts;
    meta [n, 3] int64: (request index, input length, continuation length) per row. All tensors, so a
    bucket can be saved and scored by a later process.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    meta: torch.Tensor

    @property
    def seqlen(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def members(self) -> list[int]:
        return self.meta[:, 0].tolist()


def model_input(req: Request, max_length: int) -> list[int]:
    """The tokens the model sees: truncated from the left to max_length, the last token dropped."""
    return _window(req, max_length)[:-1]


def _window(req: Request, max_length: int) -> list[int]:
    if not req.context or not req.continuation:
        raise ValueError("a request needs a non-empty context and continuation")
    if len(req.continuation) > max_length:
        raise ValueError(f"continuation of {len(req.continuation)} tokens is longer than max_length {max_length}")
    return (req.context + req.continuation)[-(max_length + 1):]


def bucket_length(n: int, max_length: int) -> int:
    """The smallest power of two >= n (at least MIN_BUCKET), capped at max_length."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, max_length)


def plan_buckets(requests: list[Request], max_length: int) -> list[Bucket]:
    """Every request in exactly one bucket, buckets in increasing length, requests in their order."""
    rows: dict[int, list[int]] = {}
    for idx, req in enumerate(requests):
        rows.setdefault(bucket_length(len(_window(req, max_length)) - 1, max_length), []).append(idx)
    out = []
    for seqlen in sorted(rows):
        tokens = torch.full((len(rows[seqlen]), seqlen), PAD_ID, dtype=torch.long)
        targets = torch.full_like(tokens, PAD_ID)
        meta = torch.zeros(len(rows[seqlen]), 3, dtype=torch.long)
        for r, idx in enumerate(rows[seqlen]):
            window = torch.tensor(_window(requests[idx], max_length), dtype=torch.long)
            n = len(window) - 1
            tokens[r, :n], targets[r, :n] = window[:-1], window[1:]
            meta[r] = torch.tensor([idx, n, len(requests[idx].continuation)])
        out.append(Bucket(tokens, targets, meta))
    return out


def scored_positions(bucket: Bucket, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """For rows [start, start+count) of a bucket: which (row, position) predicts which continuation token.

    Returns row indices (relative to `start`), positions, target tokens, and the number of
    continuation tokens of each row (to sum the per-token scores back per request).
    """
    rows, pos = [], []
    for r in range(start, start + count):
        _, end, cont = bucket.meta[r].tolist()
        rows += [r - start] * cont
        pos += range(end - cont, end)
    rows_t, pos_t = torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
    return rows_t, pos_t, bucket.targets[rows_t + start, pos_t], bucket.meta[start : start + count, 2].tolist()


def bucket_tensors(name: str, bucket: Bucket) -> dict[str, torch.Tensor]:
    """A bucket as named tensors (for a safetensors file): `name` holds the model inputs, the stream."""
    return {name: bucket.tokens, name + TARGETS: bucket.targets, name + META: bucket.meta}


def bucket_from_tensors(toks: dict[str, torch.Tensor], name: str) -> Bucket:
    return Bucket(toks[name], toks[name + TARGETS], toks[name + META])


def hidden_streams(toks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The token tensors that are streams of model inputs (not a bucket's targets or meta)."""
    return {n: t for n, t in toks.items() if not n.endswith((TARGETS, META))}


def request_key(bucket: Bucket, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row r's (model input, continuation) as tuples: what identifies a request's score across processes."""
    _, end, cont = bucket.meta[r].tolist()
    return tuple(bucket.tokens[r, :end].tolist()), tuple(bucket.targets[r, end - cont : end].tolist())


def token_scores(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                 chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `hidden` [m, h]: log p(target) under log_softmax(logits_fn(row)) and whether target is the argmax.

    The head runs on `chunk_rows` rows at a time, so no rows x vocabulary tensor for all rows is held.
    Log-probabilities are float32, as lm-eval's HF model computes them. The results stay on the
    device until the last chunk and come back in one copy: one synchronisation per call, not two per chunk.
    """
    logp, greedy = [], []
    for s in range(0, hidden.shape[0], chunk_rows):
        logits = logits_fn(hidden[s : s + chunk_rows]).float()
        t = targets[s : s + chunk_rows].to(logits.device)
        lp = torch.log_softmax(logits, dim=-1)
        logp.append(lp.gather(1, t[:, None])[:, 0])
        greedy.append((lp.argmax(dim=-1) == t).float())  # 0/1, exact in float32
    if not logp:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    both = torch.stack([torch.cat(logp), torch.cat(greedy)]).cpu()
    return both[0], both[1] > 0.5


def per_request(logp: torch.Tensor, greedy: torch.Tensor, sizes: list[int]) -> list[tuple[float, bool]]:
    """Token scores summed per request (in float64: the order of a float32 sum would show in the 7th digit)."""
    out, s = [], 0
    for n in sizes:
        out.append((float(logp[s : s + n].double().sum()), bool(greedy[s : s + n].all())))
        s += n
    return out


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Request]:
    """Disjoint windows scoring every token of `tokens` once, as lm-eval's rolling log-likelihood makes them.

    The first window is conditioned on `prefix`; each later one on the tokens just before it.
    """
    out = []
    predicted = 0
    while predicted < len(tokens):
        n = min(max_length, len(tokens) - predicted)
        if predicted == 0:
            out.append(Request([prefix], tokens[:n]))
        else:
            # lm-eval's window: max_length inputs ending just before the last predicted token.
            end = predicted + n
            ctx = tokens[max(end - max_length - 1, 0) : end - 1]
            out.append(Request(ctx[: len(ctx) - (n - 1)], tokens[predicted:end]))
        predicted += n
    return out
