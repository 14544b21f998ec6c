"""An in-memory reference implementation of Wanda and magnitude pruning, written for the tests.

It loads the whole model with transformers, captures each block's inputs with forward
pre-hooks during a normal forward of the full model (not the streamer's recorders), and
follows the paper's loop: dense pass with hooks, masks, pruned pass. Masks use plain
per-row / per-matrix sorts written here, not the package's kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def _layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder()
    n = model.config.get_text_config().num_hidden_layers
    return next(m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n)


def capture_block_inputs(
    model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor
) -> tuple[list[torch.Tensor], dict[int, list[dict[str, Any]]]]:
    """Block 0's hidden-state inputs and every block's keyword arguments, one entry per window,
    caught by forward pre-hooks during ordinary forwards of the whole model (no KV cache)."""
    inputs: list[torch.Tensor] = []
    kwargs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(layers))}

    def grab(i: int) -> Any:
        def pre(mod: nn.Module, args: tuple, kw: dict) -> None:
            if i == 0:
                inputs.append(args[0] if args else kw["hidden_states"])
            kwargs[i].append(dict(kw))
        return pre

    hs = [lay.register_forward_pre_hook(grab(i), with_kwargs=True) for i, lay in enumerate(layers)]
    with torch.no_grad():
        for t in tokens:
            model(t.unsqueeze(0), use_cache=False)
    for h in hs:
        h.remove()
    return inputs, kwargs


def linear_input_sums(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor],
                      kwargs: list[dict[str, Any]], extra_hooks: list[Any] = ()) -> dict[str, torch.Tensor]:
    """Run the dense block over every window; per linear, the float64 sum of x**2 of its inputs per column.

    `extra_hooks` are handles of further hooks the caller registered for this pass; they are removed too.
    """
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

    def hook(n: str) -> Any:
        def add(mod: nn.Module, args: tuple, out: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[n] += (x * x).sum(0)
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()] + list(extra_hooks)
    with torch.no_grad():
        for x, kw in zip(inputs, kwargs):
            layer(x, **kw)
    for h in handles:
        h.remove()
    return sums


def _lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    idx = torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)
    return torch.zeros_like(score, dtype=torch.bool).scatter(dim, idx, True)


def ref_mask(w: torch.Tensor, norm_sq: torch.Tensor | None, sparsity: float, nm: tuple[int, int] | None,
             per_matrix: bool) -> torch.Tensor:
    score = w.float().abs()
    if norm_sq is not None:
        score = score * torch.sqrt(norm_sq.float()).reshape(1, -1)
    if nm:
        n, m = nm
        g = score.reshape(score.shape[0], -1, m)
        return _lowest(g, n, 2).reshape(score.shape)
    if per_matrix:
        return _lowest(score.reshape(-1), int(score.numel() * sparsity), 0).reshape(score.shape)
    return _lowest(score, int(score.shape[1] * sparsity), 1)


def reference_prune(model_dir: Path, tokens: torch.Tensor | None, method: str, sparsity: float,
                    nm: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Pruned state dict (stored dtype) of the model, computed with the whole model in memory."""
    from transformers import AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    layers = _layers(model)
    stored_sd = stored.state_dict()
    prefix = next(n for n, m in model.named_modules() if m is layers)
    inputs: list[torch.Tensor] = []
    layer_kwargs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(layers))}
    if method == "wanda":
        inputs, layer_kwargs = capture_block_inputs(model, layers, tokens)
    result = dict(stored_sd)
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        sums = linear_input_sums(layer, linears, inputs, layer_kwargs[i])
        for n, m in linears.items():
            key = f"{prefix}.{i}.{n}.weight"
            mask = ref_mask(stored_sd[key], sums[n] if method == "wanda" else None, sparsity, nm,
                            per_matrix=(method == "magnitude"))
            result[key] = stored_sd[key].masked_fill(mask, 0)
            with torch.no_grad():
                m.weight.masked_fill_(mask, 0)
        with torch.no_grad():
            outs = [layer(x, **kw) for x, kw in zip(inputs, layer_kwargs[i])]
            inputs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return result
