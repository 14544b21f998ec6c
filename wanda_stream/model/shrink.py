"""Structured pruning's options and their reflection in the output: the smaller config, renumbered block keys.

`ShrinkSpec` is what `--drop-blocks`, `--drop-ffn`, `--drop-heads` and `--drop-experts` ask for. The family table
(`families.STRUCTURE`) says which linears make a family's FFN channels and heads and which config keys
count them; this module turns that and the run's plans into the output's config.json and key names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wanda_stream.errors import InputError
from wanda_stream.model.families import STRUCTURE, Structure, family_of
from wanda_stream.methods.plans import head_counts

if TYPE_CHECKING:
    from transformers import PretrainedConfig

BLOCK_SCORES = ("bi", "angular")
# Config attributes that look per-layer (a list of num_hidden_layers entries) but are not.
_NOT_PER_LAYER = ("architectures",)


@dataclass(frozen=True)
class ShrinkSpec:
    """What structured pruning removes: whole blocks, a fraction of every MLP's channels, of every
    attention's query heads and of every MoE block's routed experts, and whether the consuming matrices
    are refit."""

    drop_blocks: int = 0
    block_score: str = "bi"
    drop_ffn: float = 0.0
    drop_heads: float = 0.0
    refit: bool = True
    drop_experts: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.drop_blocks or self.drop_ffn or self.drop_heads or self.drop_experts)

    @property
    def widths(self) -> bool:
        """Whether blocks change shape (channels, heads or experts), not only in number."""
        return bool(self.drop_ffn or self.drop_heads or self.drop_experts)

    def check_flags(self) -> None:
        """The options' own ranges (no checkpoint needed)."""
        if self.drop_blocks < 0:
            raise InputError(f"--drop-blocks {self.drop_blocks}: must be 0 or a positive number of blocks")
        if self.block_score not in BLOCK_SCORES:
            raise InputError(f"--block-score '{self.block_score}': use {' or '.join(BLOCK_SCORES)}")
        for flag, r in (("--drop-ffn", self.drop_ffn), ("--drop-heads", self.drop_heads),
                        ("--drop-experts", self.drop_experts)):
            if not 0.0 <= r < 1.0:
                raise InputError(f"{flag} {r}: a fraction to remove, 0 <= R < 1, e.g. 0.25")


@dataclass(frozen=True)
class Shape:
    """The sizes structured pruning changes, read from a transformers (text) config."""

    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn_widths: dict[str, int]
    n_experts: int = 0  # routed experts per MoE block (0: no MoE, or a family --drop-experts does not know)
    top_k: int = 0
    groups: int = 1  # expert groups of a group-limited router, and the groups a token may reach
    reach: int = 1
    experts_key: str = ""  # the config key of n_experts

    @classmethod
    def of(cls, config: PretrainedConfig, structure: Structure) -> "Shape":
        c = config.get_text_config()
        heads = int(c.num_attention_heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        widths = {f.width_key: int(getattr(c, f.width_key)) for f in structure.ffn if getattr(c, f.width_key, None)}
        ex = structure.experts
        if ex is None or not getattr(c, ex.count_key, None):
            return cls(int(c.num_hidden_layers), heads, kv, head_dim, widths)
        groups = int(getattr(c, ex.groups_key, None) or 1) if ex.groups_key else 1
        reach = int(getattr(c, ex.reach_key, None) or groups) if ex.reach_key else groups
        return cls(int(c.num_hidden_layers), heads, kv, head_dim, widths, int(getattr(c, ex.count_key)),
                   int(c.num_experts_per_tok), groups, reach, ex.count_key)


def structure_of(model_type: str) -> Structure:
    return STRUCTURE.get(model_type, Structure())


def check(spec: ShrinkSpec, config: PretrainedConfig, nm: tuple[int, int] | None = None) -> None:
    """Refuse, before any work, what this family or these sizes cannot serve (naming the flag); with an N:M
    pattern, also new widths it does not divide."""
    spec.check_flags()
    mt = family_of(config)
    structure = structure_of(mt)
    shape = Shape.of(config, structure)
    if spec.drop_blocks >= shape.n_layers:
        raise InputError(f"--drop-blocks {spec.drop_blocks}: the model has {shape.n_layers} blocks; keep at least one")
    for flag, asked in (("--drop-ffn", spec.drop_ffn), ("--drop-heads", spec.drop_heads)):
        if asked and mt not in STRUCTURE:
            raise InputError(f"{flag}: model_type '{mt}' is not in the structured-pruning table "
                             f"({', '.join(STRUCTURE)}); drop the flag (--drop-blocks works for every model)")
    if spec.drop_ffn:
        if not shape.ffn_widths:
            raise InputError(f"--drop-ffn: model_type '{mt}' has no dense MLP whose channels can be removed "
                             "(its MLPs are experts); drop the flag")
        for key, width in shape.ffn_widths.items():
            n = ffn_drop(spec, width)
            if not 0 < n < width:
                raise InputError(f"--drop-ffn {spec.drop_ffn}: removes {n} of the {width} channels ({key}); "
                                 "choose a fraction that removes at least one and keeps at least one")
    if spec.drop_heads:
        if structure.heads is None:
            raise InputError(f"--drop-heads: model_type '{mt}' cannot lose attention heads (its head size is "
                             "derived from hidden_size, or its q/k norms span all heads); drop the flag")
        n = head_drop(spec, shape.n_heads)
        try:
            if n == 0:
                raise ValueError("removes no head")
            head_counts(shape.n_heads, shape.n_kv, n)
        except ValueError as e:
            raise InputError(f"--drop-heads {spec.drop_heads}: {round(spec.drop_heads * shape.n_heads)} of "
                             f"{shape.n_heads} query heads; {e}") from None
    if spec.drop_experts:
        check_experts(spec, shape, mt)
    if nm is not None:
        sizes = new_sizes(spec, shape)
        widths = {k: v for k, v in sizes.items() if k in shape.ffn_widths}
        if spec.drop_heads:
            widths["the attention output's inputs"] = sizes["num_attention_heads"] * shape.head_dim
        for what, width in widths.items():
            if width % nm[1]:
                raise InputError(f"--pattern {nm[0]}:{nm[1]}: after structured pruning {what} is {width}, not a "
                                 f"multiple of {nm[1]}; choose another --drop-ffn/--drop-heads or pattern")


def check_experts(spec: ShrinkSpec, shape: Shape, model_type: str) -> None:
    """Refuse an expert ratio the router cannot serve: fewer experts than it picks per token, a count
    that does not split evenly over a group-limited router's groups, or groups too small to route."""
    flag = f"--drop-experts {spec.drop_experts}"
    if not shape.n_experts:
        raise InputError(f"--drop-experts: model_type '{model_type}' has no routed experts this tool can remove; "
                         "drop the flag")
    n = expert_drop(spec, shape.n_experts)
    left = shape.n_experts - n
    if n == 0:
        raise InputError(f"{flag}: int({shape.n_experts} x {spec.drop_experts}) removes no expert; choose a larger "
                         "fraction")
    if left < shape.top_k:
        raise InputError(f"{flag}: leaves {left} of {shape.n_experts} experts, fewer than the {shape.top_k} every "
                         "token is routed to; choose a smaller fraction")
    if shape.groups > 1:
        per = shape.n_experts // shape.groups
        if n % shape.groups:
            raise InputError(f"{flag}: removes {n} experts, which the router's {shape.groups} expert groups cannot "
                             f"share equally; choose a fraction whose int({shape.n_experts} x R) is a multiple of "
                             f"{shape.groups}")
        kept = per - n // shape.groups
        # Both group-limited routers of transformers (DeepSeek-V3, GLM-4.5) rank a group by its two best experts.
        if kept < 2 or kept * shape.reach < shape.top_k:
            raise InputError(f"{flag}: leaves {kept} experts per group; the router ranks groups by their best two "
                             f"and reaches {shape.reach} groups for {shape.top_k} experts per token; choose a "
                             "smaller fraction")


def expert_drop(spec: ShrinkSpec, n_experts: int) -> int:
    """Routed experts removed from every MoE block: int(E x R), the same in every block."""
    return int(n_experts * spec.drop_experts)


def ffn_drop(spec: ShrinkSpec, width: int) -> int:
    """Channels removed from every MLP of `width` channels: round(R x width)."""
    return round(spec.drop_ffn * width)


def head_drop(spec: ShrinkSpec, n_heads: int) -> int:
    """Query heads removed from every attention: round(R x heads)."""
    return round(spec.drop_heads * n_heads)


def new_heads(spec: ShrinkSpec, shape: Shape) -> tuple[int, int]:
    """(query heads, key/value heads) of every block after --drop-heads."""
    if not spec.drop_heads:
        return shape.n_heads, shape.n_kv
    per_group, whole = head_counts(shape.n_heads, shape.n_kv, head_drop(spec, shape.n_heads))
    group = shape.n_heads // shape.n_kv
    return shape.n_heads - per_group * shape.n_kv - whole * group, shape.n_kv - whole


def new_sizes(spec: ShrinkSpec, shape: Shape) -> dict[str, int]:
    """The config numbers every kept block has after the width changes."""
    out = {key: w - ffn_drop(spec, w) for key, w in shape.ffn_widths.items()} if spec.drop_ffn else {}
    if spec.drop_heads:
        heads, kv = new_heads(spec, shape)
        out.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=shape.head_dim)
    if spec.drop_experts and shape.n_experts:
        out[shape.experts_key] = shape.n_experts - expert_drop(spec, shape.n_experts)
    return out


def width_config(config: PretrainedConfig, spec: ShrinkSpec) -> PretrainedConfig:
    """A copy of `config` whose blocks have the new widths (same number of blocks): the skeleton of shrunk blocks."""
    out = copy.deepcopy(config)
    text = out.get_text_config()
    shape = Shape.of(config, structure_of(family_of(config)))
    for key, value in new_sizes(spec, shape).items():
        setattr(text, key, value)
    return out


def per_layer_keys(config: PretrainedConfig, structure: Structure) -> list[str]:
    """The text config's per-layer lists (one entry per block: layer_types, ...), which follow the kept blocks."""
    text = config.get_text_config()
    n = text.num_hidden_layers
    skip = set(_NOT_PER_LAYER) | set(structure.moe_step or ()) | set(structure.layer_lists)
    return sorted(k for k, v in vars(text).items()
                  if isinstance(v, (list, tuple)) and len(v) == n and k not in skip and not k.startswith("_"))


def _moe_layers(text: PretrainedConfig, structure: Structure) -> list[bool] | None:
    """Per block, whether it is an MoE block, by the family's every-k-th rule (None: no such rule)."""
    if structure.moe_step is None:
        return None
    step_key, dense_key = structure.moe_step
    step, dense = int(getattr(text, step_key)), set(getattr(text, dense_key) or ())
    return [i not in dense and (i + 1) % step == 0 for i in range(text.num_hidden_layers)]


def output_config(raw: dict[str, Any], config: PretrainedConfig, spec: ShrinkSpec, dropped: list[int]) -> dict[str, Any]:
    """config.json of the output: `raw` (the input's own file) with the new block count, per-layer lists
    and widths. Keys the input did not state are written only where the old value can no longer be derived."""
    out = copy.deepcopy(raw)
    target = out["text_config"] if "num_hidden_layers" in out.get("text_config", {}) else out
    text = config.get_text_config()
    structure = structure_of(family_of(config))
    keep = [i for i in range(text.num_hidden_layers) if i not in set(dropped)]
    if dropped:
        target["num_hidden_layers"] = len(keep)
        for key in per_layer_keys(config, structure):
            target[key] = [getattr(text, key)[i] for i in keep]
        kinds = _moe_layers(text, structure)
        if kinds is not None:
            step_key, dense_key = structure.moe_step  # type: ignore[misc]
            target[step_key] = 1
            target[dense_key] = [j for j, i in enumerate(keep) if not kinds[i]]
        for key in structure.layer_lists:  # stated or derived (moe_layers from interleave_moe_layer_step)
            listed = set(getattr(text, key) or ())
            target[key] = [j for j, i in enumerate(keep) if i in listed]
        if structure.dense_first:
            target[structure.dense_first] = sum(1 for i in keep if i < int(getattr(text, structure.dense_first)))
    aliases = dict(getattr(text, "attribute_map", {}) or {})
    for key, value in new_sizes(spec, Shape.of(config, structure)).items():
        target[_stated_key(target, key, aliases)] = value
    if spec.active and structure.mtp_key and target.get(structure.mtp_key):
        target[structure.mtp_key] = 0  # its layers are not written: see `drops_mtp`
    return out


def _stated_key(raw: dict[str, Any], key: str, aliases: dict[str, str]) -> str:
    """The name under which config.json states the attribute `key`: a config class maps some names to others
    (Qwen3-MoE's num_experts is stored as num_local_experts), and the file may use either."""
    names = [key, aliases.get(key, key), *(a for a, b in aliases.items() if b == key)]
    return next((n for n in names if n in raw), aliases.get(key, key))


def drops_mtp(spec: ShrinkSpec, structure: Structure) -> bool:
    """Whether the multi-token-prediction layers stored past the last block are left out of the output.

    They are not part of the transformers model, so a run can neither calibrate nor shrink them: once the
    blocks change (their number, widths or experts) they would no longer fit the model they predict for.
    A masks-only run copies them untouched.
    """
    return spec.active and bool(structure.mtp_key)


def new_index(i: int, dropped: list[int]) -> int:
    """Block i's index in the output (i itself kept)."""
    return i - sum(1 for d in dropped if d < i)


def renumber(tensors: dict[str, Any], old_prefix: str, new_prefix: str) -> dict[str, Any]:
    """The block's tensors under the output's block prefix (model.layers.7. -> model.layers.5.)."""
    if old_prefix == new_prefix:
        return tensors
    return {new_prefix + k[len(old_prefix):] if k.startswith(old_prefix) else k: v for k, v in tensors.items()}
