"""The model card (README.md) of a pruned checkpoint: Hub metadata and what was done, from the run's report.

Pure functions of the report and the run's recorded facts, with nothing of the clock in them: a run
killed and resumed writes the same bytes.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from typing import Any, TypedDict

from wanda_stream.storage.hub import is_hub_id

# Flags that say how to run, not what to compute: a resumed run's card must equal an uninterrupted one's.
_RUN_ONLY_FLAGS = ("--resume", "--overwrite", "--quiet", "--keep-work-dir", "--no-prefetch", "--states-on-disk")
_RUN_ONLY_WITH_VALUE = ("--log-format", "--work-dir")
_FRONT_MATTER = re.compile(r"\A---\n(.*?\n)---\n?", re.S)


class CardFacts(TypedDict):
    """What the card says of the input, settled when the run starts so that a resumed run writes the same card."""

    base_model: str | list[str] | None  # the front matter's model id(s); None: left out
    name: str  # what was pruned, as the body names it: the hub id or the input directory's name
    command: str


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


def _structural(config: dict[str, Any]) -> bool:
    return bool(config.get("drop_blocks") or config.get("drop_ffn") or config.get("drop_heads")
                or config.get("drop_experts"))


def _masked(config: dict[str, Any]) -> bool:
    return config["pattern"] != "unstructured" or config["sparsity"] > 0


def _tags(config: dict[str, Any]) -> list[str]:
    tags = ["pruned"] + (["structured"] if _structural(config) else [])
    if _masked(config):
        tags += [config["method"], f"sparsity-{round(100 * config['sparsity'])}"]
    if config["pattern"] != "unstructured":
        tags.append(config["pattern"])
    return [*tags, "wanda-stream"]


def _structure(report: dict[str, Any]) -> str:
    """What structured pruning removed, and the parameters before and after."""
    st, config, params = report["structure"], report["config"], report["parameters"]
    parts = []
    if st["drop_blocks"]:
        score = "block influence" if st["block_score"] == "bi" else "angular distance"
        parts.append(f"{st['drop_blocks']} decoder blocks (by {score}: {', '.join(map(str, st['dropped_blocks']))})")
    refit = " with a least-squares refit of the matrix that reads them" if st["refit"] else ""
    if st["drop_ffn"]:
        parts.append(f"{config['drop_ffn']:.0%} of every MLP's channels{refit}")
    if st["drop_heads"]:
        parts.append(f"{config['drop_heads']:.0%} of every attention's query heads{refit}")
    if st.get("drop_experts"):
        sizes = st["sizes"]
        left = sizes.get(st.get("experts_key", ""))
        parts.append(f"{config['drop_experts']:.0%} of every MoE block's routed experts (REAP saliency)"
                     + (f", {left} experts remain per MoE block" if left is not None else ""))
    return (f"removed {'; '.join(parts)}; parameters {params['before']:,} -> {params['after']:,} "
            f"(decoder blocks: {params['decoder_after'] / max(params['decoder_before'], 1):.1%} kept)")


def _calibration(config: dict[str, Any], coverage: dict[str, int] | None) -> str:
    if config["method"] == "magnitude" and config.get("sparsity_profile", "uniform") == "uniform" \
            and not _structural(config) and not config.get("reconstruct"):
        return "none (magnitude pruning reads no data)"
    text = f"`{config['calib']}`, {config['nsamples']} x {config['seqlen']} tokens, seed {config['seed']}"
    field = config.get("calib_field")
    text += f", field `{field}`" if field else ""
    if coverage and 2 * coverage["distinct_tokens"] < coverage["tokens"]:
        text += (f"; the windows overlap and cover only {coverage['distinct_tokens']:,} distinct tokens "
                 f"of the {coverage['tokens']:,} asked for")
    return text


def _original(card: str) -> str:
    """The base model's card, its metadata shown as a YAML block (two front matters cannot coexist)."""
    m = _FRONT_MATTER.match(card)
    if not m:
        return card.strip() + "\n"
    return f"```yaml\n{m[1]}```\n\n{card[m.end():].strip()}\n"


def base_model_id(hub_id: str | None, original: str | None, config: dict[str, Any]) -> str | list[str] | None:
    """What the card's `base_model` names, which the Hub reads as model ids: the hub id the input came
    from; else the input card's own `base_model`; else the config's `_name_or_path` when it is an
    ORG/NAME id; else None (a local directory's name would link to nothing, or to someone else's model)."""
    if hub_id:
        return hub_id
    own = _front_matter(original or "").get("base_model")
    if isinstance(own, str) and own.strip():
        return own.strip()
    if isinstance(own, list) and own and all(isinstance(b, str) and b.strip() for b in own):
        return [b.strip() for b in own]
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and is_hub_id(name) else None


def _front_matter(card: str) -> dict[str, Any]:
    """The card's YAML metadata; {} when it has none or it does not parse (the card is still copied below ours)."""
    import yaml

    m = _FRONT_MATTER.match(card)
    try:
        data = yaml.safe_load(m[1]) if m else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def render_card(report: dict[str, Any], base_model: str | list[str] | None, name: str, command: str,
                original: str | None = None) -> str:
    """README.md for the output directory: Hub front matter, what was done, and the input's own card below.

    `base_model` (None: left out) goes into the front matter; `name` says in the body what was pruned. The
    pipeline tag is the input card's (a multimodal model's image-text-to-text), else text-generation.
    """
    config = report["config"]
    version = report["versions"]["wanda_stream"]
    tag = _front_matter(original or "").get("pipeline_tag")
    front = ("---\n" + (_yaml("base_model", base_model) if base_model else "")
             + _yaml("library_name", "transformers")
             + _yaml("pipeline_tag", tag if isinstance(tag, str) and tag else "text-generation")
             + _yaml("tags", _tags(config)) + "---\n")
    rows = [("structure", _structure(report))] if "structure" in report else []
    if _masked(config):
        rows += [("method", config["method"]), ("pattern", config["pattern"]),
                 ("sparsity", f"{config['sparsity']:.2%} of each decoder linear layer "
                              f"(measured over all of them: {report['total_sparsity']:.4f})")]
    rec = config.get("reconstruct")
    if rec:
        rows.append(("reconstruction", f"kept weights of every block fitted to the dense block's outputs (Adam, "
                                       f"lr {rec['lr']:g}, {rec['epochs']} epochs, {rec['batch']} windows a step)"))
    rows.append(("calibration", _calibration(config, report.get("calibration"))))
    if "eval" in report:
        ev = report["eval"]
        rows.append(("perplexity", f"{ev['perplexity']:.4f} on `{ev['data']}`, {ev['windows']} x {ev['seqlen']} "
                                   "tokens, measured in the pruning run"))
    rows.append(("wanda-stream", version))
    table = "| | |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    what = ", ".join((["structured"] if "structure" in report else [])
                     + ([config["method"], config["pattern"]] if _masked(config) else []))
    done = ("made smaller (whole structures removed: a standard checkpoint of the same architecture)"
            if "structure" in report else "with the weights of its decoder linear layers pruned")
    body = (f"\n# {name.rsplit('/', 1)[-1]}, pruned ({what})\n\n"
            f"`{name}` {done} by wanda-stream {version}.\n\n"
            f"{table}\nMade with:\n\n```bash\n{command}\n```\n")
    if original and original.strip():
        body += f"\n## Original model card\n\n{_original(original)}"
    return front + body
