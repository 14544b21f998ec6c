"""Mixture-of-experts blocks: which tensors get pruned, routers, and per-expert inputs.

transformers 5 holds a MoE block's experts as 3D parameters: [experts, out, in] (Mixtral's
`gate_up_proj` of experts x 2*intermediate x hidden, Qwen, DeepSeek-V3, GLM-4.5), or [experts, in,
out] (gpt-oss, Llama 4). Most checkpoints store them per expert and transformers fuses them on load
(see layout.py); gpt-oss and Llama 4 store the fused tensor itself, which is then pruned one expert
slice at a time (`Matrix`). A forward hook on nn.Linear sees none of them. But the eager experts
forward of transformers runs `F.linear(x_e, W[e])` (or `x_e @ W[e]`, gpt-oss) on exactly the tokens
routed to expert e, so watching those calls, where the weight is a slice of a 3D block parameter,
gives every expert's inputs: the routed hidden states for gate/up, that expert's intermediate
activations for down. Llama 4 runs `bmm` over all experts at once, every token scaled by its router
score, so an expert's tokens there are its nonzero rows. Routing is transformers' own; nothing here
re-implements it.

Routers are never pruned: the router of transformers 5 is not an nn.Linear (MixtralTopKRouter and
the like hold a bare weight), and any nn.Linear sitting directly in a module that holds experts
(Qwen2-MoE's `shared_expert_gate`, Llama 4's `router`, an older-style `gate` router) is a gate, not
an expert matrix.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from wanda_stream.errors import InputError
from wanda_stream.model.families import EXPERTS_IN_OUT, family_of

EAGER = "eager"
_replaying = threading.local()  # set while a probe re-runs an experts module: ExpertStats records nothing then


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


def moe_modules(layer: nn.Module) -> dict[str, int]:
    """The block's experts modules (the modules holding fused expert parameters), by name relative to the
    block, with their number of routed experts."""
    return {n.rpartition(".")[0]: p.shape[0] for n, p in expert_params(layer).items()}


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """The model's experts run transformers' eager (per-expert) implementation in this context."""
    previous = model.config._experts_implementation
    if previous != EAGER:
        model.set_experts_implementation(EAGER)
    try:
        yield
    finally:
        if previous not in (None, EAGER):
            model.set_experts_implementation(previous)


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Expert calls made in this context (a probe re-running an experts module) are not statistics."""
    before = getattr(_replaying, "on", False)
    _replaying.on = True
    try:
        yield
    finally:
        _replaying.on = before


@dataclass(frozen=True)
class ExpertTensors:
    """One experts module's stored tensors, by what removing an expert does to them: `per_expert` lists, per
    fused parameter part, its checkpoint keys in expert order (a removed expert's key goes, the kept ones
    take the first indices' names); `stacked` are tensors with the experts along dim 0 (fused experts stored
    as such, their biases, the router's rows, bias and score-correction bias)."""

    per_expert: tuple[tuple[str, ...], ...]
    stacked: tuple[str, ...]


def expert_tensors(sk: Any, i: int, holder: str, router: str, keys: Iterable[str]) -> ExpertTensors:
    """The tensors of block i's experts module `holder` and of its sibling router `router`, among `keys`
    (checkpoint keys of the block), through the checkpoint's layout."""
    prefix = sk.block_prefix(i)
    parent = holder.rpartition(".")[0]
    inside, routed = f"{prefix}{holder}.", f"{prefix}{parent}.{router}." if parent else f"{prefix}{router}."
    groups: dict[tuple[str, str], dict[int, str]] = {}
    stacked = []
    for key in sorted(keys):
        slot = sk.layout.slots[key]
        if slot.param.startswith(inside) and slot.expert is not None:
            groups.setdefault(sk.layout.expert_group(key), {})[slot.expert] = key
        elif slot.param.startswith(inside) or slot.param.startswith(routed):
            stacked.append(key)
    per_expert = tuple(tuple(g[e] for e in sorted(g)) for _, g in sorted(groups.items()))
    return ExpertTensors(per_expert, tuple(stacked))


def keep_experts(stored: dict[str, torch.Tensor], tensors: ExpertTensors, keep: list[int]) -> dict[str, torch.Tensor]:
    """`stored` with only the experts `keep` (ascending), renumbered 0.. in that order; InputError naming a
    stacked tensor whose first dimension is not the experts'."""
    out = dict(stored)
    n = len(tensors.per_expert[0]) if tensors.per_expert else None
    for key in tensors.stacked:
        t = stored[key]
        n = t.shape[0] if n is None else n
        if t.dim() == 0 or t.shape[0] != n:
            raise InputError(f"'{key}' of shape {list(t.shape)} is not indexed by the {n} experts; --drop-experts "
                             "does not support this expert layout")
        out[key] = t.index_select(0, torch.tensor(keep, device=t.device)).contiguous()
    for group in tensors.per_expert:
        moved = {group[j]: stored[group[e]] for j, e in enumerate(keep)}
        for key in group:
            del out[key]
        out.update(moved)
    return out


def renumber_experts(named: dict[str, Any], holder: str, keep: list[int]) -> dict[str, Any]:
    """Per-expert entries (`holder.param[e]`, as ExpertStats names them) of the kept experts under their new
    indices; the removed experts' entries dropped, others untouched."""
    new = {e: j for j, e in enumerate(keep)}
    out: dict[str, Any] = {}
    for name, v in named.items():
        base, bracket, rest = name.rpartition("[")
        if not bracket or not base.startswith(holder + ".") or not rest.endswith("]"):
            out[name] = v
            continue
        e = int(rest[:-1])
        if e in new:
            out[f"{base}[{new[e]}]"] = v
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


@dataclass(frozen=True)
class Matrix:
    """One prunable [out, in] matrix: a 2D checkpoint tensor, or one expert's slice of a stored 3D one.

    `stat` is the name its statistics are kept under: a dense linear's module name, or `param[e]` (the
    fused parameter relative to the block and the expert index), as `ExpertStats` records them.
    `transposed`: the stored slice is [in, out] (gpt-oss's and Llama 4's fused experts). `label`: the expert's
    index in the block when the stored tensor holds only some experts' rows (a group read alone), else None
    (`expert` is then both the row and the index).
    """

    key: str
    stat: str
    expert: int | None = None
    transposed: bool = False
    label: int | None = None

    @property
    def name(self) -> str:
        """The matrix's name in reports: the key, with the expert index for a slice of a fused tensor."""
        if self.expert is None:
            return self.key
        return f"{self.key}[{self.expert if self.label is None else self.label}]"

    def view(self, stored: torch.Tensor) -> torch.Tensor:
        """The [out, in] matrix inside the stored tensor (a view: writing it writes the tensor)."""
        w = stored if self.expert is None else stored[self.expert]
        return w.T if self.transposed else w


def _transposed(model: nn.Module, layer: nn.Module, rel: str) -> bool:
    """Whether the fused expert parameter `rel` is [experts, in, out]: as its experts module says
    (transformers' `use_experts_implementation(is_transposed=...)`), else as the family table says."""
    holder = layer.get_submodule(rel.rpartition(".")[0])
    marked = getattr(holder, "is_transposed", None)
    if marked is not None:
        return bool(marked)
    return family_of(model.config) in EXPERTS_IN_OUT


def stored_fused(sk: Any, key: str, rows: Sequence[int] | None = None) -> list[Matrix] | None:
    """The per-expert matrices of `key` when it is a whole fused expert parameter stored 3D (gpt-oss,
    Llama 4), else None. Read from names and the skeleton only. `rows`: the experts (block indices) that the
    stored tensor's rows hold, when it holds only a group of them."""
    slot = sk.layout.slots.get(key)
    i = sk.block_of(key)
    if slot is None or slot.expert is not None or i is None:
        return None
    layer = sk.layers[i]
    rel = slot.param[len(sk.block_prefix(i)):]
    p = expert_params(layer).get(rel)
    if p is None:
        return None
    t = _transposed(sk.model, layer, rel)
    if rows is None:
        return [Matrix(key, f"{rel}[{e}]", e, t) for e in range(p.shape[0])]
    return [Matrix(key, f"{rel}[{e}]", r, t, label=e) for r, e in enumerate(rows)]


def prunable_keys(sk: Any, i: int, layer: nn.Module, stored: dict[str, torch.Tensor],
                  linears: dict[str, nn.Linear], rows: Sequence[int] | None = None) -> dict[str, Matrix]:
    """Block i's matrices that get pruned, by report name.

    Dense linears; per-expert tensors of a checkpoint in the hub's per-expert layout (fused on load);
    and every expert's slice of a fused 3D tensor stored as such (`rows`: the experts its rows hold when
    `stored` has only a group of them).
    """
    prefix = sk.block_prefix(i)
    fused = expert_params(layer)
    out: dict[str, Matrix] = {}
    for name in linears:
        key = sk.layout.source_key(prefix + name + ".weight", {}) or prefix + name + ".weight"
        out[key] = Matrix(key, name)
    for key in sorted(stored):
        whole = stored_fused(sk, key, rows)
        if whole is not None:
            out.update((m.name, m) for m in whole)
            continue
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
        out[key] = Matrix(key, f"{rel}[{slot.expert}]")
    return out


def pruned_matrices(sk: Any) -> dict[str, list[Matrix]]:
    """Every checkpoint key a prune masks (dense linears but routers, per-expert and fused expert tensors),
    with its matrices; read from names only."""
    out: dict[str, list[Matrix]] = {}
    for i, layer in enumerate(sk.layers):
        prefix = sk.block_prefix(i)
        routers = router_names(layer)
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and name not in routers:
                key = sk.layout.source_key(prefix + name + ".weight", {}) or prefix + name + ".weight"
                out[key] = [Matrix(key, name)]
        fused = {prefix + n for n in expert_params(layer)}
        for k, s in sk.layout.slots.items():
            if s.param not in fused:
                continue
            whole = stored_fused(sk, k)
            out[k] = whole if whole is not None else [Matrix(k, s.param[len(prefix):] + f"[{s.expert}]")]
    return out


MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class ExpertStats(TorchFunctionMode):
    """Hands every expert's inputs to `record(name, x)` while a block runs, and counts its tokens.

    Use as a context manager around the block's forward passes; it switches the model's experts to
    transformers' eager (per-expert) implementation for the duration. Names are `param[e]`: the
    fused parameter (relative to the block) and the expert index.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, record: Callable[[str, torch.Tensor], None],
                 index: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.params = expert_params(layer)
        self.record = record
        # The index each expert of the fused parameters is named by: its own, or (a group of a block's experts
        # held alone, see run/expert_groups.py) its index in the block.
        self.index = list(index) if index is not None else None
        self.tokens = {n: torch.zeros(p.shape[0], dtype=torch.int64) for n, p in self.params.items()}
        self._eager = contextlib.ExitStack()

    def __enter__(self) -> "ExpertStats":
        if self.params:
            self._eager.enter_context(eager(self.model))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._eager.close()
        # The observer that records holds this mode and this mode its `record`: a reference cycle, freed only
        # by the garbage collector, which would keep a streamed group's parameters (1 GB) alive for groups.
        self.params = {}

    def _experts_of(self, w: Any, dims: int) -> tuple[str, int] | None:
        """(fused parameter, expert) when `w` is one expert's matrix in it (`dims` 2), or (parameter, first
        expert) when it is a run of its experts [e:e+n] (`dims` 3; the whole parameter included)."""
        if not isinstance(w, torch.Tensor) or w.dim() != dims:
            return None
        n = 1 if dims == 2 else w.shape[0]
        for name, p in self.params.items():
            if (w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                    and tuple(w.shape[-2:]) == tuple(p.shape[1:]) and w.stride()[-2:] == p.stride()[1:]
                    and (n == 1 or w.stride(0) == p.stride(0))):
                e, rem = divmod(w.storage_offset() - p.storage_offset(), p.stride(0))
                if rem == 0 and 0 <= e and e + n <= p.shape[0]:
                    return name, e
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.params and len(args) >= 1 and not getattr(_replaying, "on", False):
            if func is torch.nn.functional.linear:  # F.linear(x_e, W[e]), W [experts, out, in]
                self._slice_call(args[0], args[1] if len(args) > 1 else kwargs.get("weight"))
            elif func in MATMULS and len(args) >= 2:  # x_e @ W[e], W [experts, in, out] (gpt-oss)
                self._slice_call(args[0], args[1])
            elif func is torch.bmm and len(args) >= 2:  # bmm(x [experts, tokens, in], W) (Llama 4)
                self._batched_call(args[0], args[1])
        return func(*args, **kwargs)

    def _slice_call(self, x: Any, w: Any) -> None:
        hit = self._experts_of(w, 2)
        if hit is not None:
            self._record(hit[0], hit[1], x)

    def _batched_call(self, x: Any, w: Any) -> None:
        """Every expert sees every token there, the unrouted ones as zero rows (their router score is 0):
        the expert's tokens are its nonzero rows. `w` is every expert, or a run of them (a streamed group's
        expert held alone)."""
        hit = self._experts_of(w, 3)
        if hit is None or not isinstance(x, torch.Tensor) or x.dim() != 3:
            return
        name, first = hit
        for j in range(x.shape[0]):
            rows = x[j][x[j].ne(0).any(dim=-1)]
            if rows.shape[0]:
                self._record(name, first + j, rows)

    def _name(self, e: int) -> int:
        return self.index[e] if self.index is not None else e

    def _record(self, name: str, e: int, x: torch.Tensor) -> None:
        self.record(f"{name}[{self._name(e)}]", x)
        self.tokens[name][e] += x.numel() // x.shape[-1]

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
        return {f"{n}[{self._name(e)}]": int(c) for n, t in self.tokens.items() for e, c in enumerate(t.tolist())}
