"""The model skeleton on the meta device, and materializing one part of it at a time.

The decoder-only causal LMs of transformers share one shape: a base model holding the token
embedding, a ModuleList of decoder blocks, position modules and a final norm, under a head.
The parts are discovered from the model itself; block inputs (attention masks, position
embeddings, ...) are produced by transformers' own forward of the base model, with the
blocks swapped for recorders, so they are right for whatever version is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wanda_stream.storage.checkpoint import Checkpoint
from wanda_stream.errors import InputError
from wanda_stream.model.families import FAMILIES, TESTED_FAMILIES  # noqa: F401 - the family table


def load_config(model_dir: Path) -> Any:
    """The model's transformers config, with a clear error for unknown families."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(f"{model_dir / 'config.json'}: transformers cannot read it ({first})") from None


def build_skeleton(config: Any) -> nn.Module:
    """The whole model on the meta device: shapes and structure, no memory. A causal LM; for a multimodal
    config (a text config beside a vision tower: Llama 4 as the hub ships it) the image-text model, whose
    parameters are the checkpoint's keys: its language model is pruned, the rest is copied."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if config.get_text_config() is config else AutoModelForImageTextToText
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except ValueError as e:
        raise InputError(
            f"model_type '{config.model_type}' has no {auto.__name__.removeprefix('AutoModelFor')} class in "
            f"transformers ({str(e).splitlines()[0]}); supported and tested: {', '.join(TESTED_FAMILIES)}"
        ) from None


def _find_layers(base: nn.Module, n_layers: int, model_type: str) -> tuple[str, nn.ModuleList]:
    """The base model's ModuleList of decoder blocks: the one of length num_hidden_layers."""
    found = [(n, m) for n, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise InputError(
            f"model_type '{model_type}' is not supported: its base model {type(base).__name__} has no single list of "
            f"{n_layers} decoder blocks as a direct child (an encoder or nested layout); supported and tested: "
            f"{', '.join(TESTED_FAMILIES)}"
        )
    return found[0]


def _base_model(model: nn.Module) -> nn.Module:
    """The decoder: `get_decoder()`, or, while that is still a model with a head (Llama 4's text model, whose
    `base_model_prefix` names no attribute, which is also what the multimodal model's gives), its one direct
    child that is a transformers model."""
    from transformers import PreTrainedModel

    base = model.get_decoder()
    while isinstance(base, PreTrainedModel) and base.get_output_embeddings() is not None:  # still an LM
        inner = [m for m in base.children() if isinstance(m, PreTrainedModel)]
        if len(inner) != 1:
            break
        base = inner[0]
    return base


@dataclass
class Skeleton:
    """A meta-device model plus the names that tie its parts to checkpoint keys.

    `tied` maps tied parameters to the parameter they share (transformers' all_tied_weights_keys);
    after `bind`, `layout` maps checkpoint keys to parameters and `sources` names the checkpoint key
    of every parameter stored under another name (tied, or renamed by transformers' conversion mapping).
    """

    model: nn.Module
    base: nn.Module
    layers: nn.ModuleList
    base_prefix: str
    layers_prefix: str
    tied: dict[str, str] = field(default_factory=dict)
    layout: Any = None
    sources: dict[str, str] = field(default_factory=dict)
    # The blocks' ModuleList among checkpoint keys: `layers_prefix`, or the hub's prefix when transformers
    # renames it on load (Gemma 3's `language_model.model.layers`); found by `bind`.
    stored_layers_prefix: str = ""

    @classmethod
    def from_config(cls, config: Any) -> "Skeleton":
        model = build_skeleton(config)
        base = _base_model(model)
        base_prefix = next((n for n, m in model.named_modules() if m is base), None)
        if base_prefix is None or base_prefix == "":
            raise InputError(f"model_type '{config.model_type}': no decoder inside the causal LM; not supported")
        text_config = config.get_text_config()
        lname, layers = _find_layers(base, text_config.num_hidden_layers, config.model_type)
        tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
        prefix = f"{base_prefix}.{lname}"
        return cls(model, base, layers, base_prefix, prefix, tied, sources=dict(tied), stored_layers_prefix=prefix)

    def bind(self, keys: list[str]) -> None:
        """Tie the skeleton to a checkpoint's keys: its layout, and where each parameter is read from."""
        from wanda_stream.storage.layout import Layout

        self.layout = Layout(self.model, keys)
        self.sources = {}
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            src = self.layout.source_key(name, self.tied)
            if src is not None and src != name:
                self.sources[name] = src
        self.stored_layers_prefix = _stored_prefix(self.layout.slots, self.layers_prefix)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def block_prefix(self, i: int) -> str:
        """Block i's prefix among the model's parameter names."""
        return f"{self.layers_prefix}.{i}."

    def block_key_prefix(self, i: int) -> str:
        """Block i's prefix among the checkpoint's keys: the parameters' one, or the one the hub's layout
        stores it under when transformers renames it on load (Gemma 3's `language_model.model.layers`,
        loaded as `model.language_model.layers`)."""
        return f"{self.stored_layers_prefix}.{i}."

    def is_block_key(self, key: str) -> bool:
        """Whether `key` belongs to one of the model's decoder blocks.

        Keys under the blocks' prefix with an index past the last block (DeepSeek-V3's and GLM-4.5's
        multi-token-prediction layer, `model.layers.{num_hidden_layers}`) are not: transformers' model
        has no such block, so they travel with the non-block tensors (copied, not pruned).
        """
        head = self.stored_layers_prefix + "."
        if not key.startswith(head):
            return False
        index = key[len(head):].partition(".")[0]
        return index.isdigit() and int(index) < self.n_layers

    def block_of(self, key: str) -> int | None:
        """The index of the decoder block checkpoint key `key` belongs to, or None (see `is_block_key`)."""
        if not self.is_block_key(key):
            return None
        return int(key[len(self.stored_layers_prefix) + 1 :].partition(".")[0])

    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)


def _stored_prefix(slots: dict[str, Any], layers_prefix: str) -> str:
    """The prefix the checkpoint stores the blocks under: the one before block i's index shared by every key
    that feeds a parameter of block i. The parameters' own prefix when no key is renamed across it."""
    head = layers_prefix + "."
    common: set[str] | None = None
    for key, slot in slots.items():
        if not slot.param.startswith(head):
            continue
        if key.startswith(head):
            return layers_prefix
        index = slot.param[len(head):].partition(".")[0]
        found = {key[:at] for at in range(len(key)) if key.startswith(f".{index}.", at)}
        common = found if common is None else common & found
    return min(common, key=len) if common else layers_prefix


def _source_key(name: str, ckpt: Checkpoint, tied: dict[str, str]) -> str:
    """Checkpoint key for a parameter name, following tied weights when the target is not stored."""
    if name in ckpt.tensors:
        return name
    return tied.get(name, name)


def materialize(
    module: nn.Module,
    prefix: str,
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    tied: dict[str, str],
    skeleton_model: nn.Module,
    exclude: tuple[str, ...] = (),
    narrow_linears: bool = False,
    narrow_embeddings: bool = False,
) -> None:
    """Load `module`'s parameters (named `prefix + name` in the checkpoint) onto `device` in `dtype`.

    With `narrow_linears`, the weights of nn.Linear modules stored in another floating dtype stay in it
    (on the CPU, the very tensors read) and are cast to `dtype` on each call of the module: the same
    computation, with one matrix's `dtype` copy alive at a time instead of the whole block's (a 7B
    block in float32 is 0.8 GB beside its 0.4 GB in bf16).

    With `narrow_embeddings`, plain nn.Embedding tables stay in the stored dtype too and the rows
    looked up are cast to `dtype`: a lookup is a copy, so the values are the ones a `dtype` table
    gives, without the `dtype` table itself (llama-3-70b's 128256 x 8192 embedding is 4.2 GB in
    float32 beside its 2.1 GB in bf16: the largest allocation of a CPU run's start).

    Parameters under `exclude` (relative names) stay on the meta device. Non-persistent buffers
    (rotary frequencies and the like) are recomputed by the model's own `_init_weights`.
    """
    state: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)} if narrow_linears else {}
    # Exactly nn.Embedding: a subclass may compute on its weight inside forward (Gemma scales it in the
    # weight's dtype), and max_norm renormalizes the table in place.
    tables = ({n: m for n, m in module.named_modules() if type(m) is nn.Embedding and m.max_norm is None}
              if narrow_embeddings else {})
    for name, p in stored_state(module).items():
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        key = _source_key(prefix + name, ckpt, tied)
        info = ckpt.tensors.get(key)
        if info is None:
            raise InputError(f"{ckpt.root}: tensor '{key}' is missing; the checkpoint does not match its config.json")
        if tuple(info.shape) != tuple(p.shape):
            raise InputError(
                f"{ckpt.root / info.file}: tensor '{key}' has shape {list(info.shape)}, config.json implies "
                f"{list(p.shape)}; the weights and config do not match"
            )
        t = ckpt.get(key)
        owner_name, _, pname = name.rpartition(".")
        narrow = False
        if not t.is_floating_point() or _keeps_float32(skeleton_model, prefix + name):
            keep = t.dtype
        else:
            narrow = pname == "weight" and (owner_name in linears or owner_name in tables) and t.dtype != dtype
            keep = t.dtype if narrow else dtype
        state[name] = t.to(device=device, dtype=keep)
        if narrow and owner_name in linears:
            _widen_on_call(linears[owner_name], dtype)
        elif pname == "weight" and owner_name in tables:
            _widen_lookups(tables[owner_name], dtype if narrow else None)
    _assign(module, state)
    _init_nonpersistent_buffers(module, device, dtype, skeleton_model, exclude)


def stored_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of `module`: its parameters and persistent buffers (DeepSeek-V3's router
    `e_score_correction_bias` is a buffer), by relative name."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    for mname, sub in module.named_modules():
        for b, buf in sub._buffers.items():
            if buf is not None and b not in sub._non_persistent_buffers_set:
                out[f"{mname}.{b}" if mname else b] = buf
    return out


def _keeps_float32(model: nn.Module, name: str) -> bool:
    """Whether transformers keeps `name` in float32 whatever the model's dtype (`_keep_in_fp32_modules_strict`:
    routers and their score-correction biases), so the streamed block routes as the loaded model does."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    return any(k in name for k in keep)


def _widen_on_call(linear: nn.Linear, dtype: torch.dtype) -> None:
    """Make `linear` compute with its weight cast to `dtype` for the call (hooks installed once per module)."""
    linear.__dict__["_wide_dtype"] = dtype
    if "_widen_hooks" not in linear.__dict__:
        linear.__dict__["_widen_hooks"] = (linear.register_forward_pre_hook(_widen),
                                           linear.register_forward_hook(_narrow))


def _widen_lookups(table: nn.Embedding, dtype: torch.dtype | None) -> None:
    """Make `table`'s output rows `dtype` (None: as its weight is); the hook is installed once per module."""
    table.__dict__["_wide_dtype"] = dtype
    if "_widen_hooks" not in table.__dict__:
        table.__dict__["_widen_hooks"] = (table.register_forward_hook(_widen_rows),)


def _widen_rows(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    dtype = m.__dict__.get("_wide_dtype")
    return out if dtype is None else out.to(dtype)


def _widen(m: nn.Module, args: tuple) -> None:
    w = m._parameters["weight"]
    if w is not None and w.dtype != m.__dict__["_wide_dtype"]:
        m.__dict__["_narrow_weight"] = w  # beside the module's parameters, not one of them
        m._parameters["weight"] = nn.Parameter(w.to(m.__dict__["_wide_dtype"]), requires_grad=False)


def _narrow(m: nn.Module, args: tuple, out: object) -> None:
    w = m.__dict__.pop("_narrow_weight", None)
    if w is not None:
        m._parameters["weight"] = w


def _assign(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, t in state.items():
        owner_name, _, pname = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if pname in owner._buffers:
            owner._buffers[pname] = t
        else:
            owner._parameters[pname] = nn.Parameter(t, requires_grad=False)


def _init_nonpersistent_buffers(
    module: nn.Module, device: torch.device, dtype: torch.dtype, skeleton_model: nn.Module, exclude: tuple[str, ...]
) -> None:
    for mname, sub in module.named_modules():
        if any(mname == e or mname.startswith(e + ".") for e in exclude):
            continue
        names = [b for b in sub._non_persistent_buffers_set if sub._buffers.get(b) is not None]
        if not names or not any(sub._buffers[b].is_meta for b in names):
            continue
        for b in names:
            sub._buffers[b] = torch.empty_like(sub._buffers[b], device=device)
        # transformers recomputes these (e.g. rotary inv_freq) in the model's own init. That init also
        # re-draws the module's own parameters (Gemma's scaled embedding holds a buffer and a weight),
        # so it sees meta stand-ins for them and the loaded weights are put back afterwards.
        loaded = dict(sub._parameters)
        for pname, p in loaded.items():
            if p is not None:
                sub._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        try:
            with torch.no_grad():
                skeleton_model._init_weights(sub)
        finally:
            sub._parameters.update(loaded)
    for mname, sub in module.named_modules():
        for b, buf in sub._buffers.items():
            if buf is not None and buf.is_meta and b not in sub._non_persistent_buffers_set:
                if not any(mname == e or mname.startswith(e + ".") for e in exclude):
                    raise InputError(f"buffer '{mname}.{b}' is neither in the checkpoint nor computable; not supported")


def release(module: nn.Module) -> None:
    """Send a materialized module's parameters back to the meta device, freeing their memory."""
    module.to_empty(device="meta")
    _trim_heap()


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc): without it, block after block of same-sized
    allocations fragments the heap and the resident set creeps up by megabytes per block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _load_libc()


class _Recorder(nn.Module):
    """Stands in for decoder block i: records what the base model passes to it."""

    def __init__(self, index: int, sink: "BlockInputs", inject: torch.Tensor | None = None) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.inject = inject

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError(f"decoder block {self.index} got positional arguments; not supported")
        self.sink.record(self.index, hidden_states, kwargs)
        return hidden_states if self.inject is None else self.inject


class BlockInputs:
    """What the base model hands each block: the hidden states of block 0 and every block's kwargs."""

    def __init__(self) -> None:
        self.first_hidden: torch.Tensor | None = None
        self.kwargs: dict[int, dict[str, Any]] = {}

    def record(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if index == 0:
            self.first_hidden = hidden
        self.kwargs[index] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}
        self.kwargs[index]["use_cache"] = False


def run_base_with_recorders(
    sk: Skeleton, input_ids: torch.Tensor | None, embeds: torch.Tensor | None, inject: torch.Tensor | None = None
) -> tuple[BlockInputs, torch.Tensor]:
    """Run the base model's own forward with every block replaced by a recorder.

    Returns what the blocks would receive and the base output. With `inject`, the last block's
    stand-in returns `inject`, so the output is the final norm (and whatever follows the blocks)
    applied to it.
    """
    sink = BlockInputs()
    original = list(sk.layers)
    n = len(original)
    for i in range(n):
        sk.layers[i] = _Recorder(i, sink, inject if i == n - 1 else None)
    try:
        with torch.no_grad():
            out = sk.base(input_ids=input_ids, inputs_embeds=embeds, use_cache=False)
    finally:
        for i, layer in enumerate(original):
            sk.layers[i] = layer
    return sink, out.last_hidden_state
