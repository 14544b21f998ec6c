"""Text sources to token windows: calibration (random windows) and evaluation (consecutive ones).

A SPEC is a local file (.txt, .jsonl/.json with a `text` field, .parquet), a directory of them,
`c4` or `wikitext2` (hub data sets, through `datasets`), `hub:ORG/NAME[:CONFIG][@SPLIT]` (any hub
data set, streamed), or `pydoc` (the documentation text that ships with CPython, so the tool runs
with no data set at all).

Records may hold a `messages` list (role/content) instead of text: calibration renders such
conversations with the checkpoint tokenizer's chat template and packs them into one token stream,
so that windows of any length fit however short each conversation is.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wanda_stream.errors import InputError, Interrupted
from wanda_stream.storage.state import StopFlag, killpoint

HUB_SPECS = ("c4", "wikitext2")
BUILTIN_SPECS = ("pydoc",)
FILE_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".json", ".parquet")
# The C4 shard the paper samples from; streamed, and only its first documents are read.
C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_DOCS = 20000
HUB_PREFIX = "hub:"
HUB_DOCS = 20000  # records read from the start of a hub data set's split, as for C4
FIELDS = ("text", "messages")
Conversation = list[dict[str, str]]
Document = str | Conversation  # a text, or a conversation to render with the chat template


def _record_document(where: str, i: int, r: Any, field: str | None) -> Document:
    """The text or conversation of one record; `field` None takes `messages` when there is a list, else `text`."""
    if isinstance(r, dict):
        if field in (None, "messages") and isinstance(r.get("messages"), list):
            return r["messages"]
        if field in (None, "text") and isinstance(r.get("text"), str):
            return r["text"]
    wanted = {None: "a string field 'text' or a list 'messages'", "text": "a string field 'text'",
              "messages": "a list field 'messages'"}[field]
    raise InputError(f"{where}: record {i} has no {wanted}; each record needs one (see --calib-field)")


def _records_text(path: Path, records: list[Any], field: str | None = "text") -> list[Document]:
    return [_record_document(str(path), i, r, field) for i, r in enumerate(records)]


def _file_documents(path: Path, field: str | None = "text") -> list[Document]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if field != "text" and "messages" in table.column_names:
                return _records_text(path, table.to_pylist(), field)
            if "text" not in table.column_names:
                raise InputError(f"{path}: no column 'text'; the parquet file needs one")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; convert it or pass another --calib/--data file") from None
    if suffix == ".jsonl":
        try:
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON line ({e.msg}, line {e.lineno}); fix the file") from None
        return _records_text(path, recs, field)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg}); fix the file") from None
        return _records_text(path, data if isinstance(data, list) else [data], field)
    return [text]


def _local_documents(path: Path, field: str | None = "text") -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no .txt/.jsonl/.json/.parquet files in the directory")
        return [d for f in files for d in _file_documents(f, field)]
    return _file_documents(path, field)


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    # One document: the topics are short, and windows may span topic boundaries as in a book.
    return ["\n\n".join(topics[k] for k in sorted(topics))]


def _hub_error(spec: str, e: Exception) -> InputError:
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
    return InputError(
        f"cannot load '{spec}' from the Hugging Face hub ({first}); pass a local .txt/.jsonl/.parquet file or 'pydoc'"
    )


def c4_documents(repo: str = C4_REPO, data_file: str = C4_FILE, limit: int = C4_DOCS,
                 stop: StopFlag | None = None) -> list[str]:
    """The first `limit` documents of the paper's C4 shard, streamed (not downloaded whole).

    Raises Interrupted when `stop` is requested: streaming 20000 documents can take minutes.
    """
    import datasets

    docs: list[str] = []
    try:
        ds = datasets.load_dataset(repo, data_files={"train": data_file}, split="train", streaming=True)
        for _, r in zip(range(limit), ds):
            _check_stop(stop, "reading c4")
            docs.append(r["text"])
    except Interrupted:
        raise
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one line for the user
        raise _hub_error("c4", e) from None
    return docs


def wikitext2_text(split: str, repo: str = "wikitext", name: str = "wikitext-2-raw-v1") -> str:
    """A WikiText-2 raw split with rows joined by blank lines, as the usual scripts do."""
    import datasets

    try:
        ds = datasets.load_dataset(repo, name, split=split)
        return "\n\n".join(ds["text"])
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one line for the user
        raise _hub_error("wikitext2", e) from None


@dataclass(frozen=True)
class HubSpec:
    """`hub:ORG/NAME[:CONFIG][@SPLIT]`: a data set on the hub, read as a stream."""

    repo: str
    config: str | None
    split: str


def parse_hub_spec(spec: str) -> HubSpec | None:
    """The parts of a `hub:` SPEC, None for any other SPEC; InputError for a malformed one."""
    if not spec.startswith(HUB_PREFIX):
        return None
    m = re.fullmatch(r"hub:([\w.-]+/[\w.-]+)(?::([\w.-]+))?(?:@([\w.-]+))?", spec)
    if not m:
        raise InputError(f"--calib '{spec}': use hub:ORG/NAME[:CONFIG][@SPLIT], e.g. "
                         "hub:HuggingFaceH4/ultrachat_200k@train_sft")
    return HubSpec(m[1], m[2], m[3] or "train")


def hub_documents(spec: str, field: str | None = None, limit: int = HUB_DOCS,
                  stop: StopFlag | None = None) -> list[Document]:
    """The first `limit` records of a `hub:` data set's split, streamed (never downloaded whole)."""
    import datasets

    hub = parse_hub_spec(spec)
    docs: list[Document] = []
    try:
        ds = datasets.load_dataset(hub.repo, hub.config, split=hub.split, streaming=True)
        for i, r in zip(range(limit), ds):
            _check_stop(stop, f"reading {spec}")
            docs.append(_record_document(spec, i, r, field))
    except (Interrupted, InputError):
        raise
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one line for the user
        raise _hub_error(spec, e) from None
    return docs


def documents(spec: str, purpose: str = "calibration", stop: StopFlag | None = None,
              field: str | None = "text") -> list[Document]:
    """The documents of a SPEC; raises Interrupted when `stop` is requested while C4 streams.

    `field` says what a record's document is: "text", "messages" (a conversation), or None for
    whichever the record has.
    """
    if parse_hub_spec(spec):
        return hub_documents(spec, field, stop=stop)
    if spec == "pydoc":
        return _pydoc_documents()
    if spec == "c4":
        return c4_documents(stop=stop)
    if spec == "wikitext2":
        return [wikitext2_text("train" if purpose == "calibration" else "test")]
    path = Path(spec)
    if not path.exists():
        flag = "--calib" if purpose == "calibration" else "--data/--eval-data"
        raise InputError(f"{spec}: no such file or directory; {flag} takes a file, directory, c4, wikitext2, "
                         "hub:ORG/NAME or pydoc")
    return _local_documents(path, field)


def spec_fingerprint(spec: str) -> str:
    """Identifies a SPEC's content: a hash for local files, the name for hub and built-in sources."""
    path = Path(spec)
    if spec in HUB_SPECS + BUILTIN_SPECS or spec.startswith(HUB_PREFIX) or not path.exists():
        return spec
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one document, with the tokenizer's usual special tokens (as the paper's code)."""
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def _check_stop(stop: StopFlag | None, doing: str) -> None:
    """Raise Interrupted when a stop was requested (nothing is written before the windows are complete)."""
    if stop is not None and stop.requested:
        raise Interrupted(f"stopped while {doing}")


class _DocumentIds:
    """Token ids of documents, each tokenized when first asked for (the sampler's draws).

    The paper's sampler tokenizes a document only when it draws it. Tokenizing all of C4's 20000
    documents first took 45 s before the first block on a 2-core host, where the 128 windows of
    2048 tokens drew 3928 of them in 8-10 s (tools/bench_calib.py, a C4-like corpus). The windows
    are the same either way: the draws depend only on whether each drawn document is longer than
    the window. A stop request is honoured before each new document (a single document is never
    split: splitting would change the tokens at the seams).
    """

    def __init__(self, texts: list[str], packed: list[int] | None, tokenizer: Any, stop: StopFlag | None,
                 what: str = "calibration") -> None:
        self.texts, self.tokenizer, self.stop, self.what = texts, tokenizer, stop, what
        self.ids: dict[int, list[int]] = {} if packed is None else {len(texts): packed}
        self.count = len(texts) + (packed is not None)
        self.longest_seen = len(packed) if packed is not None else 0

    def __getitem__(self, i: int) -> list[int]:
        if i not in self.ids:
            _check_stop(self.stop, f"tokenizing the {self.what} data")
            self.ids[i] = tokenize(self.tokenizer, self.texts[i])
            self.longest_seen = max(self.longest_seen, len(self.ids[i]))
            killpoint("tokenize")
        return self.ids[i]

    def longest(self) -> int | None:
        """The longest document's length in tokens, once every document is tokenized (else None)."""
        return self.longest_seen if len(self.ids) == self.count else None


def _chat_ids(conversations: list[Conversation], tokenizer: Any, where: str) -> list[int]:
    """The conversations rendered by the tokenizer's chat template, packed into one token stream.

    The rendered text carries the template's own special tokens, so none are added again.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"calibration data '{where}' holds conversations (messages), but the model's tokenizer has no chat "
            "template; give records a 'text' field and add --chat-template never, or use a chat model"
        )
    ids: list[int] = []
    for conv in conversations:
        try:
            text = tokenizer.apply_chat_template(conv, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template error is about the user's data
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"calibration data '{where}': the chat template cannot render a record ({first})") from None
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids


@dataclass(frozen=True)
class CalibWindows:
    """Calibration windows [nsamples, seqlen] and how many distinct document tokens they cover."""

    tokens: torch.Tensor
    distinct: int

    @property
    def asked(self) -> int:
        """The tokens asked for: nsamples x seqlen."""
        return self.tokens.numel()

    @property
    def sparse_coverage(self) -> bool:
        """Whether the windows overlap so much that they cover under half of the tokens asked for."""
        return 2 * self.distinct < self.asked


def calibration_windows(docs: list[Document], tokenizer: Any, nsamples: int, seqlen: int, seed: int, spec: str,
                        stop: StopFlag | None = None) -> CalibWindows:
    """`nsamples` random windows of `seqlen` tokens, as the paper samples C4, and the distinct tokens they cover.

    Repeatedly pick a random document until one is longer than `seqlen`, then a random window
    of it; Python's `random` seeded with `seed` makes the choice reproducible. Conversations are
    rendered and packed into one document after the texts. Windows may overlap (as the paper's
    sampler allows): on a short text many of them repeat the same tokens, which `distinct` tells.
    Raises Interrupted when `stop` is requested while the documents are tokenized.
    """
    texts = [d for d in docs if isinstance(d, str)]
    conversations = [d for d in docs if not isinstance(d, str)]
    _check_stop(stop, "tokenizing the calibration data")
    ids = _DocumentIds(texts, _chat_ids(conversations, tokenizer, spec) if conversations else None, tokenizer, stop)
    rng = random.Random(seed)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    covered: dict[int, torch.Tensor] = {}  # per document drawn from: which of its tokens some window holds
    for s in range(nsamples):
        i = _draw_long(ids, rng, seqlen, spec)
        j = rng.randint(0, len(ids[i]) - seqlen - 1)
        out[s] = torch.tensor(ids[i][j : j + seqlen])
        covered.setdefault(i, torch.zeros(len(ids[i]), dtype=torch.bool))[j : j + seqlen] = True
    _check_stop(stop, "tokenizing the calibration data")  # a request during the last document
    return CalibWindows(out, sum(int(c.sum()) for c in covered.values()))


def _draw_long(ids: _DocumentIds, rng: random.Random, seqlen: int, spec: str) -> int:
    """Random documents until one is longer than `seqlen` (the paper's loop); InputError when none is."""
    while True:
        if ids.count:
            i = rng.randint(0, ids.count - 1)
            if len(ids[i]) > seqlen:
                return i
        longest = ids.longest()
        if longest is not None and longest <= seqlen:
            raise InputError(
                f"calibration data '{spec}' is too short: no document has more than {seqlen} tokens "
                f"(longest: {longest}); give more text or a smaller --seqlen"
            )


def sample_windows(docs: list[Document], tokenizer: Any, nsamples: int, seqlen: int, seed: int, spec: str,
                   stop: StopFlag | None = None) -> torch.Tensor:
    """The windows of `calibration_windows` alone."""
    return calibration_windows(docs, tokenizer, nsamples, seqlen, seed, spec, stop).tokens


def coverage_note(windows: CalibWindows, spec: str) -> str:
    """The line that tells a user the windows repeat a short text rather than cover what was asked."""
    n, seqlen = windows.tokens.shape
    return (f"calibration data '{spec}': the {n} x {seqlen} windows cover only {windows.distinct:,} distinct tokens "
            f"of the {windows.asked:,} asked for (they overlap); give more text for statistics over more tokens")


def eval_windows(text: str, tokenizer: Any, seqlen: int, max_windows: int | None, spec: str,
                 stop: StopFlag | None = None) -> torch.Tensor:
    """Non-overlapping windows of the tokenized text (stride = seqlen, remainder dropped).

    Raises Interrupted when `stop` is requested before or while the text is tokenized.
    """
    ids = _DocumentIds([text], None, tokenizer, stop, "evaluation")[0]
    _check_stop(stop, "tokenizing the evaluation data")
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"evaluation data '{spec}' has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen)


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise InputError(f"{model_dir}: no usable tokenizer ({first}); copy the tokenizer files next to config.json")
