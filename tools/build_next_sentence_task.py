"""Build the local lm-eval task `wikitext_next_sentence` from WikiText-2's raw test text.

Each item: a sentence of an article as the context, and four candidate next sentences: the true one
and three drawn from other paragraphs. Deterministic for a given text, --items and --seed.

    python tools/build_next_sentence_task.py ../shared/data/wikitext2/wiki.test.raw OUT_DIR
    wanda-stream eval MODEL --tasks wikitext_next_sentence --include-path OUT_DIR

Writes OUT_DIR/wikitext_next_sentence.jsonl and OUT_DIR/wikitext_next_sentence.yaml (the repository's
tools/tasks/ YAML with data_files made absolute). The text is CC BY-SA 3.0; it is generated, not committed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

TASK = "wikitext_next_sentence"
YAML = Path(__file__).resolve().parent / "tasks" / f"{TASK}.yaml"
MIN_WORDS, MAX_WORDS = 6, 40


def paragraphs(text: str) -> list[list[str]]:
    """Sentences of each body paragraph (headings ' = ... = ' and short lines dropped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        sents = [s.strip() + " ." for s in re.split(r" \. ", line.rstrip(" .")) if s.strip()]
        sents = [s for s in sents if MIN_WORDS <= len(s.split()) <= MAX_WORDS]
        if len(sents) >= 2:
            out.append(sents)
    return out


def build_items(paras: list[list[str]], n: int, seed: int) -> list[dict]:
    """n items from distinct paragraphs: (context sentence, 4 choices, index of the true next one)."""
    rng = random.Random(seed)
    if len(paras) < n + 3:
        raise SystemExit(f"only {len(paras)} usable paragraphs for {n} items; lower --items")
    chosen = rng.sample(range(len(paras)), n)
    items = []
    for p in chosen:
        k = rng.randrange(len(paras[p]) - 1)
        others = rng.sample([q for q in range(len(paras)) if q != p], 3)
        choices = [paras[p][k + 1]] + [rng.choice(paras[q]) for q in others]
        rng.shuffle(choices)
        items.append({"context": paras[p][k], "choices": choices, "label": choices.index(paras[p][k + 1])})
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", type=Path, help="wiki.test.raw")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    items = build_items(paragraphs(args.text.read_text(encoding="utf-8")), args.items, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = args.out_dir / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    yaml = YAML.read_text().replace(f"test: {TASK}.jsonl", f"test: {data.resolve()}")
    (args.out_dir / f"{TASK}.yaml").write_text(yaml)
    print(f"{len(items)} items -> {data}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
