"""Calibration and evaluation sources: local files, the built-in corpus, hub loaders on local data."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_cli
from wanda_stream import calib
from wanda_stream.errors import InputError, Interrupted
from wanda_stream.state import StopFlag


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return calib.load_tokenizer(tiny_model)


def test_pydoc_is_one_long_document() -> None:
    docs = calib.documents("pydoc")
    assert len(docs) == 1 and len(docs[0]) > 400_000 and "the" in docs[0]


def test_windows_reproducible_from_seed(tok) -> None:
    docs = calib.documents("pydoc")
    a = calib.sample_windows(docs, tok, 5, 64, 0, "pydoc")
    b = calib.sample_windows(docs, tok, 5, 64, 0, "pydoc")
    c = calib.sample_windows(docs, tok, 5, 64, 1, "pydoc")
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = calib.tokenize(tok, docs[0])
    first = a[0].tolist()
    assert any(ids[j : j + 64] == first for j in range(len(ids) - 64)), "a window is a slice of the document"


def test_windows_only_from_long_documents(tok, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    long_doc = "word " * 400
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["short", long_doc, "tiny too"]))
    docs = calib.documents(str(path))
    assert len(docs) == 3
    w = calib.sample_windows(docs, tok, 4, 32, 0, str(path))
    long_ids = calib.tokenize(tok, long_doc)
    for row in w.tolist():
        assert any(long_ids[j : j + 32] == row for j in range(len(long_ids) - 32))


def test_too_short_data_is_refused(tok, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("only a few words")
    with pytest.raises(InputError, match="too short"):
        calib.sample_windows(calib.documents(str(path)), tok, 2, 64, 0, str(path))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="too short"):
        calib.sample_windows(calib.documents(str(empty)), tok, 2, 64, 0, str(empty))


def test_file_formats_and_directory(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("alpha text")
    (d / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    (d / "c.json").write_text(json.dumps([{"text": "delta"}]))
    pq.write_table(pa.table({"text": ["epsilon", "zeta"]}), d / "d.parquet")
    (d / "ignored.bin").write_bytes(b"\x00")
    assert calib.documents(str(d)) == ["alpha text", "beta", "gamma", "delta", "epsilon", "zeta"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}))
    with pytest.raises(InputError, match="field 'text'"):
        calib.documents(str(bad))


def test_eval_windows_are_consecutive(tok) -> None:
    text = calib.documents("pydoc")[0][:20000]
    ids = calib.tokenize(tok, text)
    w = calib.eval_windows(text, tok, 100, None, "x")
    assert w.shape[0] == len(ids) // 100
    assert w.reshape(-1).tolist() == ids[: w.numel()]
    assert calib.eval_windows(text, tok, 100, 3, "x").shape == (3, 100)


def test_a_stop_ends_tokenizing_between_documents(tok) -> None:
    """SIGTERM while documents are tokenized (minutes for C4): Interrupted after the current one, not all."""
    calls = []

    def tokenizer(text: str, **kw: Any) -> Any:
        calls.append(text)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # through the real handler, as a scheduler's signal arrives
        return tok(text, **kw)

    stop = StopFlag().install()
    try:
        with pytest.raises(Interrupted, match="stopped while tokenizing the calibration data"):
            calib.sample_windows(["word " * 100] * 5, tokenizer, 2, 32, 0, "x", stop)
        assert len(calls) == 2
        # Requested before the text is reached: not tokenized at all.
        with pytest.raises(Interrupted, match="stopped while tokenizing the evaluation data"):
            calib.eval_windows("word " * 100, tokenizer, 32, None, "x", stop)
        assert len(calls) == 2
    finally:
        stop.restore()
    # Without a request (or a flag) nothing changes.
    assert torch.equal(calib.sample_windows(["word " * 100] * 5, tok, 2, 32, 0, "x", StopFlag()),
                       calib.sample_windows(["word " * 100] * 5, tok, 2, 32, 0, "x"))


def test_c4_loader_streams_local_shard(tmp_path: Path) -> None:
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(shard, "wt") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"document {i} " * 10, "url": "u", "timestamp": "t"}) + "\n")
    docs = calib.c4_documents(repo="json", data_file=str(shard), limit=12)
    assert len(docs) == 12 and docs[3].startswith("document 3 ")
    # A stop while streaming is a stop, not a hub failure to report as bad input.
    stop = StopFlag()
    stop.signal = signal.SIGTERM
    with pytest.raises(Interrupted, match="stopped while reading c4"):
        calib.c4_documents(repo="json", data_file=str(shard), limit=12, stop=stop)


def test_wikitext2_loader_joins_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [" = Title = \n", "", " Body line .\n"]}), tmp_path / "test.parquet")
    assert calib.wikitext2_text("test", repo=str(tmp_path), name=None) == " = Title = \n\n\n\n\n Body line .\n"


def test_unreachable_hub_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    r = run_cli("prune", str(tiny_model), str(tmp_path / "o"), "--calib", "c4", "--nsamples", "2", "--seqlen", "16",
                "--device", "cpu", "--quiet", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "c4" in lines[0] and "pydoc" in lines[0] and "Traceback" not in r.stderr
