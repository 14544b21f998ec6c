"""The `wanda-stream` model of lm-evaluation-harness: log-likelihoods streamed one decoder block at a time.

Importing this module registers the model under the name `wanda-stream` (lm-eval 0.4 finds models
only through its own registry, not entry points): `wanda-stream-lm-eval --model wanda-stream ...`
(or `python -m wanda_stream.eval.lm_eval_backend ...`) is lm-eval's own command line with it registered.

Tokenization is lm-eval's HF model's (`TemplateLM` splits context and continuation; `tok_encode` and
`max_length` follow `HFLM`); all requests of a call go through the blocks together, so a whole suite
of multiple-choice tasks costs one read of the weights.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import lm_eval.models  # noqa: F401 - lm-eval's own models, registered lazily before ours (see get_model)
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import DEFAULT_MAX_LENGTH, _add_special_kwargs, has_bos_prefix, resolve_max_length

from wanda_stream.run import calib
from wanda_stream.run.config import DTYPE_NAMES, resolve_compute_dtype, resolve_device
from wanda_stream.errors import InputError
from wanda_stream.eval.loglik import Request, rolling_windows
from wanda_stream.eval.loglik_stream import MAX_AUTO_ROWS, Batching, streamed_loglikelihoods
from wanda_stream.run.report import Progress
from wanda_stream.storage.state import StopFlag
from wanda_stream.model.skeleton import load_config
from wanda_stream.model.stream import Streamer, checkpoint_dtype, open_model

MODEL_NAME = "wanda-stream"


class TokenizedLM(TemplateLM):
    """lm-eval's requests tokenized as its HF model does, for a checkpoint directory; `score` is the subclass's."""

    def __init__(self, model_dir: Path, max_length: int | None = None, add_bos_token: bool | None = None) -> None:
        super().__init__()
        self.tokenizer = calib.load_tokenizer(model_dir)
        self.add_bos_token = add_bos_token
        self._max_length = max_length or resolve_max_length(load_config(model_dir), self.tokenizer,
                                                            default=DEFAULT_MAX_LENGTH)

    def score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of every request, in order."""
        raise NotImplementedError

    # ---- what lm-eval's TemplateLM needs ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        """HFLM's encoding: the tokenizer's special tokens unless the string already starts with BOS."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = self.score([Request(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probabilities of each whole string, over disjoint max_length windows (as HFLM)."""
        per_req = [rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length)
                   for req in requests]
        scores = self.score([w for windows in per_req for w in windows])
        out, k = [], 0
        for req, windows in zip(requests, per_req):
            total = sum(s for s, _ in scores[k : k + len(windows)])
            k += len(windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        raise InputError(refusal_of_generation(sorted({str(r.task_name) for r in requests})))



@register_model(MODEL_NAME)
class WandaStreamLM(TokenizedLM):
    """A checkpoint directory scored block by block; model_args: pretrained, device, dtype, batch_size, ..."""

    def __init__(
        self, pretrained: str, device: str = "auto", dtype: str = "auto", batch_size: int | str | None = None,
        max_batch_size: int | None = None, max_length: int | None = None, add_bos_token: bool | None = None,
        work_dir: str | None = None, progress: str = "quiet", stop: StopFlag | None = None,
    ) -> None:
        model_dir = Path(pretrained)
        super().__init__(model_dir, max_length, add_bos_token)
        ckpt, sk = open_model(model_dir)
        device_name = resolve_device(device)
        compute = DTYPE_NAMES[resolve_compute_dtype(dtype, device_name, checkpoint_dtype(ckpt, sk))]
        self.st = Streamer(ckpt, sk, device_name, compute)
        self.batching = batching(batch_size, max_batch_size)
        self.work_dir = Path(work_dir) if work_dir else None
        self.progress_mode = progress
        self.stop = stop

    def score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of every request, in one pass over the blocks."""
        progress = Progress(self.progress_mode, self.st.sk.n_layers, "eval")
        scratch = (nullcontext(str(self.work_dir)) if self.work_dir is not None
                   else tempfile.TemporaryDirectory(prefix="wanda-stream-lm-eval-"))
        try:
            with scratch as work:
                return streamed_loglikelihoods(self.st, requests, self.max_length, Path(work), self.batching,
                                               self.stop, progress)
        finally:
            progress.close()


def refusal_of_generation(tasks: list[str]) -> str:
    """The one line that says which tasks cannot run on this backend."""
    return (f"task(s) {', '.join(tasks)}: free generation (generate_until) is not supported by the streamed "
            "backend, which scores log-likelihoods only; drop these tasks or use lm_eval --model hf")


def batching(batch_size: int | str | None, max_batch_size: int | None = None) -> Batching:
    """Micro-batches from lm-eval's batch_size: a number of rows, or None / 'auto' (per bucket, at most max_batch_size)."""
    cap = max_batch_size or MAX_AUTO_ROWS
    if batch_size is None or str(batch_size).startswith("auto"):
        return Batching(None, cap)
    try:
        rows = int(batch_size)
    except ValueError:
        raise InputError(f"batch_size '{batch_size}': use a positive integer or auto") from None
    if rows <= 0:
        raise InputError(f"batch_size {rows}: must be a positive integer")
    return Batching(rows, cap)


def main() -> None:
    """lm-eval's own command line, with the `wanda-stream` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
