"""Mixture-of-experts blocks: which tensors get pruned, routers, and per-expert inputs.

transformers 5 holds a MoE block's experts as 3D parameters ([experts, out, in], e.g. Mixtral's
`gate_up_proj` of experts x 2*intermediate x hidden), fused on load from the checkpoint's
per-expert tensors (see layout.py). A forward hook on nn.Linear sees none of them. But the eager
experts forward of transformers runs `F.linear(x_e, W[e])` on exactly the tokens routed to expert
e, so watching F.linear calls whose weight is a slice of a 3D block parameter gives every expert's
inputs: the routed hidden states for gate/up, that expert's intermediate activations
for down. Routing is transformers' own; nothing here re-implements it.

Routers are never pruned: the router of transformers 5 is not an nn.Linear (MixtralTopKRouter and
the like hold a bare weight), and any nn.Linear sitting directly in a module that holds experts
(Qwen2-MoE's `shared_expert_gate`, an older-style `gate` router) is a gate, not an expert matrix.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from wanda_stream.errors import InputError

EAGER = "eager"


def expert_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The block's fused expert parameters (3D: [experts, out, in], or [experts, in, out] where the family
    stores them transposed), by name relative to the block. A convolution's 3D kernel (Qwen3-Next's
    linear attention) is not one."""
    out = {}
    for mname, mod in layer.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() == 3:
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def router_names(layer: nn.Module) -> set[str]:
    """Names of the block's nn.Linear gates: the direct nn.Linear children of a module holding experts."""
    holders = {n.rpartition(".")[0] for n in expert_params(layer)}
    moe_blocks = {h.rpartition(".")[0] for h in holders}
    out = set()
    for name, mod in layer.named_modules():
        parent = name.rpartition(".")[0]
        if isinstance(mod, nn.Linear) and parent in moe_blocks:
            out.add(name)
    return out


def prunable_keys(sk: Any, i: int, layer: nn.Module, stored: dict[str, torch.Tensor],
                  linears: dict[str, nn.Linear]) -> dict[str, str]:
    """Block i's checkpoint keys that get pruned, each with the name its statistics are kept under.

    Dense linears: their module name. Per-expert tensors: `param[e]`, the fused parameter (relative to
    the block) and the expert index, as `ExpertStats` records them.
    """
    prefix = sk.block_prefix(i)
    fused = expert_params(layer)
    out: dict[str, str] = {}
    for name in linears:
        key = sk.layout.source_key(prefix + name + ".weight", {}) or prefix + name + ".weight"
        out[key] = name
    for key in sorted(stored):
        slot = sk.layout.slots.get(key)
        if slot is None or slot.expert is None:
            continue
        rel = slot.param[len(prefix):]
        if rel not in fused:
            raise InputError(f"'{key}' feeds '{slot.param}', which is not a 3D expert parameter; "
                             f"model_type '{sk.model.config.model_type}' is not supported for pruning")
        p = fused[rel]
        if stored[key].dim() != 2 or stored[key].shape[-1] != p.shape[-1]:
            raise InputError(f"'{key}' of shape {list(stored[key].shape)} is not an [out, in] slice of "
                             f"'{slot.param}' {list(p.shape)}; this expert layout is not supported")
        out[key] = f"{rel}[{slot.expert}]"
    covered = {sk.layout.slots[k].param for k in stored if k in sk.layout.slots}
    for rel in fused:
        if prefix + rel in covered and not any(v.startswith(rel + "[") for v in out.values()):
            # Stored already fused (3D) under the parameter's own name: no per-expert matrices to mask.
            raise InputError(f"'{prefix + rel}' is stored as one fused {list(fused[rel].shape)} tensor; pruning "
                             "needs the per-expert layout that save_pretrained and the hub checkpoints use")
    return out


def pruned_keys(sk: Any) -> set[str]:
    """Every checkpoint key a prune masks (dense linears but routers, and per-expert tensors), read from names only."""
    out: set[str] = set()
    for i, layer in enumerate(sk.layers):
        prefix = sk.block_prefix(i)
        routers = router_names(layer)
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and name not in routers:
                out.add(sk.layout.source_key(prefix + name + ".weight", {}) or prefix + name + ".weight")
        fused = {prefix + n for n in expert_params(layer)}
        out.update(k for k, s in sk.layout.slots.items() if s.expert is not None and s.param in fused)
    return out


class ExpertStats(TorchFunctionMode):
    """Hands every expert's inputs to `record(name, x)` while a block runs, and counts its tokens.

    Use as a context manager around the block's forward passes; it switches the model's experts to
    transformers' eager (per-expert) implementation for the duration. Names are `param[e]`: the
    fused parameter (relative to the block) and the expert index.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, record: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.model = model
        self.params = expert_params(layer)
        self.record = record
        self.tokens = {n: torch.zeros(p.shape[0], dtype=torch.int64) for n, p in self.params.items()}
        self._previous: str | None = None

    def __enter__(self) -> "ExpertStats":
        if self.params:
            self._previous = self.model.config._experts_implementation
            if self._previous != EAGER:
                self.model.set_experts_implementation(EAGER)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self.params and self._previous not in (None, EAGER):
            self.model.set_experts_implementation(self._previous)

    def _expert_of(self, w: Any) -> tuple[str, int] | None:
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        for name, p in self.params.items():
            if (w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                    and tuple(w.shape) == tuple(p.shape[1:]) and w.stride() == p.stride()[1:]):
                e, rem = divmod(w.storage_offset() - p.storage_offset(), p.stride(0))
                if rem == 0 and 0 <= e < p.shape[0]:
                    return name, e
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and self.params:
            hit = self._expert_of(args[1] if len(args) > 1 else kwargs.get("weight"))
            if hit is not None:
                x = args[0]
                self.record(f"{hit[0]}[{hit[1]}]", x)
                self.tokens[hit[0]][hit[1]] += x.numel() // x.shape[-1]
        return func(*args, **kwargs)

    def check_observed(self) -> None:
        """Raise InputError when no expert of a parameter saw a token.

        The experts forward then does not call F.linear on per-expert slices, so statistics cannot be
        observed (rather than silently pruning every expert by magnitude).
        """
        for n, t in self.tokens.items():
            if int(t.sum()) == 0:
                raise InputError(
                    f"model_type '{self.model.config.model_type}': no per-expert input was seen for '{n}'; its "
                    "experts forward does not run F.linear on expert slices, so calibration statistics are "
                    "unavailable (use --method magnitude)")

    def token_counts(self) -> dict[str, int]:
        """Calibration tokens routed to every expert, named `param[e]`; 0 for a starved expert.

        Counted from the rows each expert's F.linear received, so they are transformers' own routing:
        per parameter, they sum to tokens x experts per token.
        """
        return {f"{n}[{e}]": int(c) for n, t in self.tokens.items() for e, c in enumerate(t.tolist())}
