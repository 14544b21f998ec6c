"""`prune --eval-tasks`: lm-eval tasks scored on the pruned model inside the pruning pass.

lm-eval's evaluator calls the model, so the run drives it twice, with models that never run a block:
first a recorder collects every log-likelihood request (tokenized as lm-eval's HF model does); the
requests, packed into buckets, become hidden-state streams of the pruning run (saved in
tokens.safetensors like the calibration and perplexity windows, so a resumed run carries the same
ones); after the last block the buckets are scored, and a replayer hands the scores back to a second
pass of the evaluator, which computes lm-eval's metrics and results object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from wanda_stream.storage.activations import HiddenFile
from wanda_stream.eval.lm_eval_backend import TokenizedLM
from wanda_stream.run.config import RunConfig
from wanda_stream.eval.loglik import (
    Request, bucket_from_tensors, bucket_tensors, model_input, plan_buckets, request_key,
)
from wanda_stream.eval.loglik_stream import Batching, score_bucket
from wanda_stream.model.stream import Streamer

STREAM = "tasks_"  # stream names: tasks_00064 (model inputs of the 64-token bucket)

Key = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class TaskSpec:
    """The lm-eval suite of a pruning run."""

    tasks: list[str]
    include_path: Path | None = None
    num_fewshot: int | None = None
    limit: float | None = None


class _Recorder(TokenizedLM):
    """Collects the requests; its answers are placeholders, and the first pass's metrics are discarded."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.requests: list[Request] = []

    def score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        self.requests += requests
        return [(0.0, False)] * len(requests)


class _Replayer(TokenizedLM):
    """Answers each request with the score computed in the pruning pass."""

    def __init__(self, model_dir: Path, answers: dict[Key, tuple[float, bool]]) -> None:
        super().__init__(model_dir)
        self.answers = answers

    def score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        return [self.answers[(tuple(model_input(r, self.max_length)), tuple(r.continuation))] for r in requests]


def _evaluate(lm: TokenizedLM, spec: TaskSpec) -> dict:
    from wanda_stream.eval.task_eval import run_suite

    return run_suite(lm, spec.tasks, spec.include_path, spec.num_fewshot, spec.limit)


def task_tokens(model_dir: Path, spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Every request of the suite as bucket tensors, named for tokens.safetensors."""
    rec = _Recorder(model_dir)
    _evaluate(rec, spec)
    out: dict[str, torch.Tensor] = {}
    for b in plan_buckets(rec.requests, rec.max_length):
        out.update(bucket_tensors(f"{STREAM}{b.seqlen:05d}", b))
    return out


def task_spec(cfg: RunConfig) -> TaskSpec:
    """The suite a run's configuration names (its --eval-tasks flags)."""
    return TaskSpec([t for t in cfg.eval_tasks.split(",") if t], Path(cfg.eval_include_path) if cfg.eval_include_path
                    else None, cfg.eval_num_fewshot, cfg.eval_limit)


def task_answers(st: Streamer, toks: dict[str, torch.Tensor], names: list[str], last: Callable[[str], HiddenFile],
                 batch: int) -> dict[Key, tuple[float, bool]]:
    """The scores of the requests of the buckets `names` (this rank's), from each bucket's last-block hidden
    states `last(stream name)`."""
    answers: dict[Key, tuple[float, bool]] = {}
    for name in sorted(names):
        bucket = bucket_from_tensors(toks, name)
        for r, (_, score) in enumerate(score_bucket(st, bucket, last(name), Batching(batch))):
            answers[request_key(bucket, r)] = score
    return answers


def task_results(model_dir: Path, spec: TaskSpec, answers: dict[Key, tuple[float, bool]]) -> dict:
    """lm-eval's results of the suite from every request's score (all ranks' answers)."""
    results = _evaluate(_Replayer(model_dir, answers), spec)
    return {k: results[k] for k in ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
            if k in results}
