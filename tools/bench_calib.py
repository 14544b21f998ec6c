"""Time from calibration text to token windows: every document tokenized first, or only those drawn.

    python tools/bench_calib.py MODEL_DIR --calib c4 --nsamples 128 --seqlen 2048
    python tools/bench_calib.py MODEL_DIR --synthetic-from ../shared/data/wikitext2/wiki.valid.tokens

The paper's sampler draws a random document until one is longer than the window; wanda-stream
tokenizes a document when it is first drawn (`calib.calibration_windows`). The other row tokenizes
every document first, as wanda-stream did before, then draws the same windows (the table says so;
tests/test_calib.py checks them against the paper's loop). `--synthetic-from FILE` builds a C4-like
corpus offline: 20000 documents of whole paragraphs of FILE, a geometric number of them each
(mean 2.3), so that a few are longer than the window, as in C4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from wanda_stream.run import calib


def synthetic_corpus(source: Path, docs: int, out: Path, seed: int = 0) -> Path:
    """`docs` documents of consecutive paragraphs of `source` (cycled), written as JSON lines."""
    paras = [p.strip() for p in source.read_text(encoding="utf-8").split("\n \n") if p.strip()]
    rng, at = random.Random(seed), 0
    with out.open("w", encoding="utf-8") as f:
        for _ in range(docs):
            k = 1
            while rng.random() < 1 - 1 / 2.3:
                k += 1
            f.write(json.dumps({"text": "\n\n".join(paras[(at + i) % len(paras)] for i in range(k))}) + "\n")
            at += k
    return out


def tokenized_first(docs: list[str], tokenizer: object, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Every document tokenized, then the same sampler over the ids (the tokenizer it sees looks them up)."""
    ids = {d: calib.tokenize(tokenizer, d) for d in docs}
    return calib.calibration_windows(docs, lambda text, **kw: {"input_ids": ids[text]}, nsamples, seqlen, seed,
                                     "tokenized first").tokens


class Counting:
    """The tokenizer, counting the documents it is asked to tokenize."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, text: str, **kw: object) -> object:
        self.calls += 1
        return self.tokenizer(text, **kw)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} vCPUs, {datetime.date.today().isoformat()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="the checkpoint whose tokenizer is used")
    ap.add_argument("--calib", default="c4", help="calibration SPEC, as for prune --calib")
    ap.add_argument("--synthetic-from", type=Path, help="build a C4-like corpus from this text file instead")
    ap.add_argument("--docs", type=int, default=calib.C4_DOCS, help="documents of the synthetic corpus")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = calib.load_tokenizer(a.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        spec = (str(synthetic_corpus(a.synthetic_from, a.docs, Path(tmp) / "corpus.jsonl"))
                if a.synthetic_from else a.calib)
        t0 = time.monotonic()
        docs = [d for d in calib.documents(spec, "calibration") if isinstance(d, str)]
        read_s = time.monotonic() - t0
    t0 = time.monotonic()
    first = tokenized_first(docs, tok, a.nsamples, a.seqlen, a.seed)
    first_s = time.monotonic() - t0
    counting = Counting(tok)
    t0 = time.monotonic()
    drawn = calib.calibration_windows(docs, counting, a.nsamples, a.seqlen, a.seed, spec).tokens
    drawn_s = time.monotonic() - t0
    chars = sum(map(len, docs))
    print(f"machine: {machine()}")
    print(f"data: {a.synthetic_from.name + ' (synthetic, C4-like)' if a.synthetic_from else a.calib}, "
          f"{len(docs)} documents, {chars / 1e6:.1f} M characters (read in {read_s:.1f} s); "
          f"tokenizer of {a.model_dir.name}; {a.nsamples} x {a.seqlen} windows, seed {a.seed}")
    print("| windows from | documents tokenized | seconds |\n| --- | ---: | ---: |")
    print(f"| every document tokenized first | {len(docs)} | {first_s:.1f} |")
    print(f"| the documents drawn (wanda-stream) | {counting.calls} | {drawn_s:.1f} |")
    print(f"same windows: {torch.equal(first, drawn)}")


if __name__ == "__main__":
    main()
