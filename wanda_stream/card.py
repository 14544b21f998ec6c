"""The model card (README.md) of a pruned checkpoint: Hub metadata and what was done, from the run's report.

Pure functions of the report and the run's recorded facts, with nothing of the clock in them: a run
killed and resumed writes the same bytes.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from typing import Any

# Flags that say how to run, not what to compute: a resumed run's card must equal an uninterrupted one's.
_RUN_ONLY_FLAGS = ("--resume", "--overwrite", "--quiet", "--keep-work-dir", "--no-prefetch", "--states-on-disk")
_RUN_ONLY_WITH_VALUE = ("--log-format", "--work-dir")
_FRONT_MATTER = re.compile(r"\A---\n(.*?\n)---\n?", re.S)


def _matches(token: str, flags: Sequence[str]) -> bool:
    """`token` names one of `flags`, in full or as an abbreviation argparse accepts."""
    name = token.split("=", 1)[0]
    return name.startswith("--") and len(name) > 3 and any(f.startswith(name) for f in flags)


def card_command(argv: Sequence[str]) -> str:
    """The prune command line as the card shows it: shell-quoted, without the flags that do not change the
    result (--resume, --overwrite, --quiet, --log-format, --work-dir, --keep-work-dir, --no-prefetch,
    --states-on-disk)."""
    kept: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
        elif _matches(token, _RUN_ONLY_WITH_VALUE):
            skip_value = "=" not in token
        elif not _matches(token, _RUN_ONLY_FLAGS):
            kept.append(token)
    return shlex.join(["wanda-stream", *kept])


def _yaml(key: str, value: str | list[str]) -> str:
    # JSON strings are YAML strings: quoting this way is safe for any name.
    if isinstance(value, list):
        return f"{key}:\n" + "".join(f"- {json.dumps(v)}\n" for v in value)
    return f"{key}: {json.dumps(value)}\n"


def _tags(config: dict[str, Any]) -> list[str]:
    tags = ["pruned", config["method"], f"sparsity-{round(100 * config['sparsity'])}"]
    if config["pattern"] != "unstructured":
        tags.append(config["pattern"])
    return [*tags, "wanda-stream"]


def _calibration(config: dict[str, Any]) -> str:
    if config["method"] != "wanda":
        return "none (magnitude pruning reads no data)"
    text = f"`{config['calib']}`, {config['nsamples']} x {config['seqlen']} tokens, seed {config['seed']}"
    field = config.get("calib_field")
    return text + (f", field `{field}`" if field else "")


def _original(card: str) -> str:
    """The base model's card, its metadata shown as a YAML block (two front matters cannot coexist)."""
    m = _FRONT_MATTER.match(card)
    if not m:
        return card.strip() + "\n"
    return f"```yaml\n{m[1]}```\n\n{card[m.end():].strip()}\n"


def render_card(report: dict[str, Any], base_model: str, command: str, original: str | None = None) -> str:
    """README.md for the output directory: Hub front matter, what was done, and the input's own card below."""
    config = report["config"]
    version = report["versions"]["wanda_stream"]
    front = ("---\n" + _yaml("base_model", base_model) + _yaml("library_name", "transformers")
             + _yaml("pipeline_tag", "text-generation") + _yaml("tags", _tags(config)) + "---\n")
    rows = [("method", config["method"]), ("pattern", config["pattern"]),
            ("sparsity", f"{config['sparsity']:.2%} of each decoder linear layer "
                         f"(measured over all of them: {report['total_sparsity']:.4f})"),
            ("calibration", _calibration(config))]
    if "eval" in report:
        ev = report["eval"]
        rows.append(("perplexity", f"{ev['perplexity']:.4f} on `{ev['data']}`, {ev['windows']} x {ev['seqlen']} "
                                   "tokens, measured in the pruning run"))
    rows.append(("wanda-stream", version))
    table = "| | |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    body = (f"\n# {base_model.rsplit('/', 1)[-1]}, pruned ({config['method']}, {config['pattern']})\n\n"
            f"`{base_model}` with the weights of its decoder linear layers pruned by wanda-stream {version}.\n\n"
            f"{table}\nMade with:\n\n```bash\n{command}\n```\n")
    if original and original.strip():
        body += f"\n## Original model card\n\n{_original(original)}"
    return front + body
