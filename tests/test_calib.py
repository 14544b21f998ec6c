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
from wanda_stream.run import calib
from wanda_stream.errors import InputError, Interrupted
from wanda_stream.storage.state import StopFlag


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


def _paper_sampler(ids: list[list[int]], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The Wanda paper's C4 loop on documents tokenized beforehand: draw until one is long enough."""
    import random

    rng, rows = random.Random(seed), []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(ids) - 1)
            if len(ids[i]) > seqlen:
                break
        j = rng.randint(0, len(ids[i]) - seqlen - 1)
        rows.append(ids[i][j : j + seqlen])
    return torch.tensor(rows)


def test_only_drawn_documents_are_tokenized_and_the_windows_are_the_papers(tok) -> None:
    """C4-like data (few documents longer than the window): the windows of the paper's loop over all
    documents tokenized first, from tokenizing only the documents drawn."""
    docs = [" ".join(f"w{d}x{k}" for k in range(200 if d % 25 == 0 else 5)) for d in range(400)]
    seen: list[str] = []

    def counting(text: str, **kw: Any) -> Any:
        seen.append(text)
        return tok(text, **kw)

    w = calib.calibration_windows(docs, counting, 6, 64, 0, "x")
    assert torch.equal(w.tokens, _paper_sampler([calib.tokenize(tok, d) for d in docs], 6, 64, 0))
    assert len(seen) == len(set(seen)) < len(docs) // 2  # each drawn once, most never
    with pytest.raises(InputError, match=r"no document has more than 64 tokens \(longest: \d+\)"):
        calib.calibration_windows(docs[1:25], tok, 2, 64, 0, "x")  # none long: all tokenized, then refused


def test_too_short_data_is_refused(tok, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("only a few words")
    with pytest.raises(InputError, match="too short"):
        calib.sample_windows(calib.documents(str(path)), tok, 2, 64, 0, str(path))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="too short"):
        calib.sample_windows(calib.documents(str(empty)), tok, 2, 64, 0, str(empty))


def test_windows_count_the_distinct_tokens_they_cover(tok) -> None:
    docs = [" ".join(f"w{i}" for i in range(30)), " ".join(f"x{i}" for i in range(20)), "short"]
    w = calib.calibration_windows(docs, tok, 12, 16, 0, "x")
    ids = [calib.tokenize(tok, d) for d in docs]
    rows = [r.tolist() for r in w.tokens]
    # Brute force: every (document, position) that some window starting there holds.
    covered = {(d, j + k) for d, t in enumerate(ids) for j in range(len(t) - 16) if t[j : j + 16] in rows
               for k in range(16)}
    assert w.distinct == len(covered) and w.asked == 12 * 16
    assert torch.equal(w.tokens, calib.sample_windows(docs, tok, 12, 16, 0, "x"))


def test_short_calibration_text_is_said_and_recorded(tiny_model: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text(" ".join(f"w{i}" for i in range(60)))  # one document of a few hundred tokens
    n_ids = len(calib.tokenize(calib.load_tokenizer(tiny_model), notes.read_text()))
    out = tmp_path / "out"
    r = run_cli("prune", str(tiny_model), str(out), "--calib", str(notes), "--nsamples", "16", "--seqlen", "64",
                "--device", "cpu", "--log-format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "wanda_stream.json").read_text())
    distinct = report["calibration"]["distinct_tokens"]
    assert report["calibration"]["tokens"] == 16 * 64 and 64 < distinct <= n_ids < 16 * 64 // 2
    lines = [json.loads(x)["text"] for x in r.stderr.splitlines() if '"message"' in x]
    assert lines == [f"calibration data '{notes}': the 16 x 64 windows cover only {distinct:,} distinct tokens of "
                     "the 1,024 asked for (they overlap); give more text for statistics over more tokens"]
    assert f"cover only {distinct:,} distinct tokens of the 1,024 asked for |" in (out / "README.md").read_text()
    # Text enough for the windows asked: nothing said, the figures still in the report.
    big = run_cli("prune", str(tiny_model), str(tmp_path / "big"), "--calib", "pydoc", "--nsamples", "4",
                  "--seqlen", "64", "--device", "cpu", "--log-format", "json")
    assert big.returncode == 0 and '"message"' not in big.stderr, big.stderr[-2000:]
    assert json.loads((tmp_path / "big" / "wanda_stream.json").read_text())["calibration"]["distinct_tokens"] == 256
    # Too short for one window: the one-line refusal, exit 2.
    notes.write_text("w0 w1 w2 w3")
    short = run_cli("prune", str(tiny_model), str(tmp_path / "short"), "--calib", str(notes), "--seqlen", "64",
                    "--nsamples", "2", "--device", "cpu")
    assert short.returncode == 2 and "is too short: no document has more than 64 tokens" in short.stderr
    assert "Traceback" not in short.stderr


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
    """SIGTERM while documents are tokenized (many seconds for C4): Interrupted after the current one, not all."""
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


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _conversations(n: int) -> list[list[dict[str, str]]]:
    from tests.helpers import small_text

    words = small_text().split()
    return [[{"role": "user", "content": " ".join(words[i * 60:i * 60 + 30])},
             {"role": "assistant", "content": " ".join(words[i * 60 + 30:i * 60 + 60])}] for i in range(n)]


@pytest.fixture(scope="module")
def chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a small chat template in its tokenizer."""
    import shutil

    model = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model, model)
    tokenizer = calib.load_tokenizer(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(model))
    return model


def test_chat_records_are_rendered_with_the_template_and_packed(chat_model: Path, tmp_path: Path) -> None:
    convs = _conversations(12)
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in convs))
    docs = calib.documents(str(path), field=None)
    assert docs == convs
    tok = calib.load_tokenizer(chat_model)
    windows = calib.sample_windows(docs, tok, 4, 64, 0, str(path))
    rendered = "".join(tok.apply_chat_template(c, tokenize=False) for c in convs)
    assert "<|assistant|>" in rendered
    packed = tok(rendered, add_special_tokens=False)["input_ids"]
    for row in windows.tolist():
        assert any(packed[j:j + 64] == row for j in range(len(packed) - 64)), "a window of the rendered chats"
    # The same records as parquet give the same windows.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in convs]), tmp_path / "chat.parquet")
    as_parquet = calib.documents(str(tmp_path / "chat.parquet"), field=None)
    assert torch.equal(calib.sample_windows(as_parquet, tok, 4, 64, 0, "p"), windows)


def test_chat_calibration_on_the_command_line(chat_model: Path, tiny_model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from wanda_stream.cli import main

    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": c} for c in _conversations(12)]))
    args = ["--calib", str(path), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert main(["prune", str(chat_model), str(tmp_path / "out"), *args]) == 0
    report = json.loads((tmp_path / "out" / "wanda_stream.json").read_text())
    assert report["config"]["chat_template"] == "auto"

    def refused(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    err = refused(["prune", str(tiny_model), str(tmp_path / "o2"), *args])
    assert "the model's tokenizer has no chat template" in err and "--chat-template never" in err
    err = refused(["prune", str(chat_model), str(tmp_path / "o3"), *args, "--chat-template", "never"])
    assert f"{path}: record 0 has no a string field 'text'" in err
    assert "--calib-field messages needs the chat template" in refused(
        ["prune", str(chat_model), str(tmp_path / "o4"), *args, "--chat-template", "never", "--calib-field", "messages"])
    for out in ("o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


def test_run_identity_covers_the_chat_options() -> None:
    from wanda_stream.run.config import RunConfig

    base = RunConfig("/m", "/o", "/o/.wanda-stream")
    never = RunConfig("/m", "/o", "/o/.wanda-stream", chat_template="never")
    field = RunConfig("/m", "/o", "/o/.wanda-stream", calib_field="text")
    assert len({base.fingerprint(), never.fingerprint(), field.fingerprint()}) == 3
    assert never.differences(base) == ["chat_template: 'never' -> 'auto'"]
    # Runs made before the options existed keep their fingerprint.
    assert "chat_template" not in base.result_fields() and "calib_field" not in base.result_fields()


def test_hub_spec_parsing_and_the_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    assert calib.parse_hub_spec("hub:HuggingFaceH4/ultrachat_200k@train_sft") == calib.HubSpec(
        "HuggingFaceH4/ultrachat_200k", None, "train_sft")
    assert calib.parse_hub_spec("hub:allenai/c4:en@validation") == calib.HubSpec("allenai/c4", "en", "validation")
    assert calib.parse_hub_spec("hub:org/name") == calib.HubSpec("org/name", None, "train")
    assert calib.parse_hub_spec("c4") is None and calib.parse_hub_spec("./data.jsonl") is None
    for bad in ("hub:noslash", "hub:a/b@", "hub:a/b:c:d"):
        with pytest.raises(InputError, match=r"use hub:ORG/NAME\[:CONFIG\]\[@SPLIT\]"):
            calib.parse_hub_spec(bad)
    assert calib.spec_fingerprint("hub:org/name@train") == "hub:org/name@train"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"^cannot load 'hub:acme/chats@train_sft' from the Hugging Face hub "
                                         r"\(.*OfflineModeIsEnabled"):
        calib.documents("hub:acme/chats@train_sft", field="messages")
