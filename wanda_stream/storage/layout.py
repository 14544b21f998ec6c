"""Checkpoint keys on disk versus the skeleton's parameters, through transformers' own conversion mapping.

transformers 5 renames some checkpoint keys when it loads them (GPT-NeoX's `embed_out` is the
`lm_head`, Mixtral's `block_sparse_moe` is `mlp`) and fuses the per-expert matrices of MoE
checkpoints into 3D parameters (`experts.E.w1` and `experts.E.w3` become `experts.gate_up_proj[E]`).
The streamer reads and writes the checkpoint's own keys. `Layout` says which parameter each key
feeds, and converts a block's stored tensors with the very operations transformers loads them with
(`transformers.conversion_mapping`), so whatever the installed version does, the streamer does too.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from wanda_stream.errors import InputError


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: a parameter, and its index along the expert dimension if fused."""

    param: str
    expert: int | None = None


class Layout:
    """The mapping between one model's checkpoint keys and its parameters."""

    def __init__(self, model: nn.Module, keys: Iterable[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
        )

        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._natural = dot_natural_key
        self.slots: dict[str, Slot] = {}
        self._pattern: dict[str, str] = {}
        counts: dict[tuple[str, str], int] = {}
        # Sorted like transformers sorts a state dict: the n-th key of a pattern is expert n of the fused stack.
        for key in sorted(keys, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, self._converters)
            if pattern is None:
                self.slots[key] = Slot(renamed)
            else:
                n = counts.get((renamed, pattern), 0)
                counts[(renamed, pattern)] = n + 1
                self.slots[key] = Slot(renamed, n)
                self._pattern[key] = pattern
        self.key_of = {s.param: k for k, s in self.slots.items() if s.expert is None}

    def expert_group(self, key: str) -> tuple[str, str]:
        """The fused parameter and source pattern a per-expert key belongs to: keys of one group are one part
        (Mixtral's w1, or w3) of one parameter, expert 0, 1, ... in key order."""
        return self.slots[key].param, self._pattern[key]

    def source_key(self, param: str, tied: dict[str, str]) -> str | None:
        """The checkpoint key a non-fused parameter is read from (following tied weights), or None."""
        if param in self.key_of:
            return self.key_of[param]
        if param in tied and tied[param] in self.key_of:
            return self.key_of[tied[param]]
        return None

    def to_params(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensors (checkpoint keys) as the skeleton's parameters, converted as transformers loads them.

        Works on meta tensors too, which is how shapes are checked without reading anything.
        """
        out: dict[str, torch.Tensor] = {}
        groups: dict[str, Any] = {}
        for key in sorted(stored, key=self._natural):
            slot = self.slots[key]
            if slot.expert is None:
                out[slot.param] = stored[key]
                continue
            pattern = self._pattern[key]
            conv = groups.get(slot.param)
            if conv is None:
                conv = groups[slot.param] = deepcopy(self._by_pattern[pattern])
            conv.add_tensor(slot.param, key, pattern, stored[key])
        for param, conv in groups.items():
            for name, t in conv.convert(param, model=self.model, config=self.model.config).items():
                out[name] = t[0] if isinstance(t, list) else t
        return out

    def check(self, infos: dict[str, Any], params: dict[str, nn.Parameter], tied: dict[str, str],
              is_block_key: Callable[[str], bool], root: Path) -> None:
        """Every parameter is fed by the checkpoint with the right shape; no block tensor goes unused.

        `infos` maps checkpoint keys to objects with `.shape`, `.dtype` and `.file` (the shard headers).
        """
        meta = {k: torch.empty(tuple(i.shape), dtype=i.dtype, device="meta") for k, i in infos.items()}
        try:
            shapes = {n: tuple(t.shape) for n, t in self.to_params(meta).items()}
        except (RuntimeError, ValueError) as e:  # stack/cat refusing the shapes: checkpoint and config disagree
            raise InputError(f"{root}: the per-expert tensors do not fit the model's fused layout ({e}); "
                             "the weights and config.json do not match") from None
        for name, p in params.items():
            got = shapes.get(name)
            if got is None and name in tied:
                got = shapes.get(tied[name])
            key = self.source_key(name, tied) or name
            if got is None:
                raise InputError(f"{root}: tensor '{key}' is missing; the checkpoint does not match its config.json")
            if got != tuple(p.shape):
                where = root / infos[key].file if key in infos else root
                raise InputError(
                    f"{where}: tensor '{key}' has shape {list(got)}, but config.json implies {list(p.shape)}; "
                    "the weights and config do not match"
                )
        for key, slot in self.slots.items():
            if is_block_key(key) and slot.param not in params:
                raise InputError(f"{root}: unexpected tensor '{key}' for this model type; the layout is not supported")
