"""An in-memory reference of structured pruning, written for the tests independently of the package.

The whole model is loaded with transformers; statistics are float64 sums over per-window forwards of the
full model (hooks, no KV cache). While the loop runs, removed FFN channels and heads are *zeroed* in the
full-size model (a zero gate/up row and down column contribute nothing; a zero o_proj column removes a
head's output), and removed blocks are skipped; the output state dict is sliced and renumbered at the end.
The package instead slices tensors and loads them into a narrower skeleton, so the two meet only in the
numbers. Llama-like module names (FFNS below, self_attn.q/k/v/o_proj).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.reference import _layers, capture_block_inputs, ref_mask


# The MLPs whose channels go: a dense MLP, a Qwen2-MoE block's shared expert, and a Llama 4 dense block's MLP.
FFNS = [("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
        ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")]


@dataclass
class RefResult:
    state_dict: dict[str, torch.Tensor]  # the output's tensors, sliced and renumbered (float32)
    model: nn.Module  # the full-size reference model, zeroed, removed blocks taken out
    dropped: list[int]
    influence: list[float]
    angular: list[float]
    removal_error: list[float]
    removed_channels: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # block -> down proj -> removed
    removed_heads: dict[int, list[int]] = field(default_factory=dict)


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


def _stable_lowest(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores, stable=True).indices[:k].tolist())


def _inputs_of(layer: nn.Module, names: list[str], xs: list[torch.Tensor], kws: list[dict]) -> dict[str, torch.Tensor]:
    """Each named linear's inputs over all windows, as one float64 [tokens, in] matrix."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [layer.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for x, kw in zip(xs, kws):
            layer(x, **kw)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _refit(w: torch.Tensor, x: torch.Tensor, keep: list[int], damp: float) -> torch.Tensor:
    """argmin ||X_K W'^T - X W^T|| with G_KK dampened: W' = W G[:, K] (G_KK + damp mean diag I)^-1 (float64)."""
    g = x.t() @ x
    d = torch.diagonal(g)
    g[d == 0, d == 0] = 1.0
    gkk = g[keep][:, keep]
    gkk += damp * torch.mean(torch.diagonal(gkk)) * torch.eye(len(keep), dtype=torch.float64)
    return (w.double() @ g[:, keep]) @ torch.linalg.inv(gkk)


def _dense_scores(layers: nn.ModuleList, xs: list[torch.Tensor], kwargs: dict, n: int
                  ) -> tuple[list[float], list[float], list[float]]:
    """ShortGPT's block influence of every block, angles[l] = mean arccos(cos(h_l, h_{l+n})) / pi, and each
    block's relative output error when removed, ||h_in - h_out|| / ||h_out||."""
    hs = [xs]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hs.append([_out(layer(x, **kw)) for x, kw in zip(hs[-1], kwargs[i])])

    def mean_cos(a: list[torch.Tensor], b: list[torch.Tensor], angle: bool) -> float:
        c = torch.cat([nn.functional.cosine_similarity(u.double(), v.double(), dim=-1).flatten() for u, v in zip(a, b)])
        return float((torch.arccos(c.clamp(-1, 1)) / math.pi).mean() if angle else c.mean())

    influence = [1 - mean_cos(hs[i], hs[i + 1], False) for i in range(len(layers))]
    angular = [mean_cos(hs[l], hs[l + n], True) for l in range(len(layers) - n + 1)] if n else []
    removal = [math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(hs[i], hs[i + 1]))
                         / sum(float((b.double() ** 2).sum()) for b in hs[i + 1])) for i in range(len(layers))]
    return influence, angular, removal


def reference_structured(model_dir: Path, tokens: torch.Tensor, drop_blocks: int = 0, score: str = "bi",
                         drop_ffn: float = 0.0, drop_heads: float = 0.0, refit: bool = True, damp: float = 0.01,
                         wanda: float | None = None, nm: tuple[int, int] | None = None) -> RefResult:
    """The structured prune of the whole model in memory; `wanda` / `nm`: Wanda masks on what remains."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers = _layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    xs, kwargs = capture_block_inputs(model, layers, tokens)
    influence, angular, removal = _dense_scores(layers, xs, kwargs, drop_blocks) if drop_blocks else ([], [], [])
    if drop_blocks and score == "bi":
        dropped = _stable_lowest(torch.tensor(influence, dtype=torch.float64), drop_blocks)
    elif drop_blocks:
        start = _stable_lowest(torch.tensor(angular, dtype=torch.float64), 1)[0]
        dropped = list(range(start, start + drop_blocks))
    else:
        dropped = []
    res = RefResult({}, model, dropped, influence, angular, removal)
    slices: dict[int, dict[str, tuple[list[int] | None, list[int] | None]]] = {}  # linear -> (rows, cols) kept
    for i, layer in enumerate(layers):
        if i in dropped:
            continue
        keep: dict[str, tuple[list[int] | None, list[int] | None]] = {}
        lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        x_all = _inputs_of(layer, list(lin), xs, kwargs[i])  # the dense block's inputs, all linears
        for gate_name, up_name, down_name in FFNS if drop_ffn else ():
            if down_name not in lin:
                continue
            down = lin[down_name]
            x = x_all[down_name]
            s = torch.sqrt((x * x).sum(0)) * torch.linalg.vector_norm(down.weight.double(), dim=0)
            removed = _stable_lowest(s, round(drop_ffn * s.numel()))
            kept = [j for j in range(s.numel()) if j not in set(removed)]
            res.removed_channels.setdefault(i, {})[down_name] = removed
            with torch.no_grad():
                w = _refit(down.weight, x, kept, damp) if refit else down.weight.double()[:, kept]
                down.weight.zero_()
                down.weight[:, kept] = w.float()
                for name in (gate_name, up_name):
                    lin[name].weight[removed] = 0
            keep.update({gate_name: (kept, None), up_name: (kept, None), down_name: (None, kept)})
        if drop_heads:
            o = layer.self_attn.o_proj
            x = x_all["self_attn.o_proj"]
            col = torch.sqrt((x * x).sum(0)) * torch.linalg.vector_norm(o.weight.double(), dim=0)
            hs = col.reshape(n_heads, hd).sum(1)
            d, group = round(drop_heads * n_heads), n_heads // n_kv
            if d % n_kv == 0 and d // n_kv < group:
                rm = [g * group + h for g in range(n_kv) for h in _stable_lowest(hs.reshape(n_kv, group)[g], d // n_kv)]
                rm_kv: list[int] = []
            else:
                rm_kv = _stable_lowest(hs.reshape(n_kv, group).sum(1), d // group)
                rm = [g * group + h for g in rm_kv for h in range(group)]
            res.removed_heads[i] = rm
            q_keep = [h * hd + j for h in range(n_heads) if h not in rm for j in range(hd)]
            kv_keep = [h * hd + j for h in range(n_kv) if h not in rm_kv for j in range(hd)]
            with torch.no_grad():
                w = _refit(o.weight, x, q_keep, damp) if refit else o.weight.double()[:, q_keep]
                o.weight.zero_()
                o.weight[:, q_keep] = w.float()
            keep.update({"self_attn.q_proj": (q_keep, None), "self_attn.k_proj": (kv_keep, None),
                         "self_attn.v_proj": (kv_keep, None), "self_attn.o_proj": (None, q_keep)})
        if wanda is not None or nm is not None:
            for n, m in lin.items():
                rows, cols = keep.get(n, (None, None))
                w = m.weight.detach()
                sub = w[rows] if rows is not None else w
                sub = sub[:, cols] if cols is not None else sub
                x = x_all[n]
                sq = (x * x).sum(0)
                mask = ref_mask(sub, sq[cols] if cols is not None else sq, wanda or 0.0, nm, per_matrix=False)
                sub = sub.masked_fill(mask, 0)
                with torch.no_grad():
                    r = torch.arange(w.shape[0]) if rows is None else torch.tensor(rows)
                    c = torch.arange(w.shape[1]) if cols is None else torch.tensor(cols)
                    m.weight[r.unsqueeze(1), c.unsqueeze(0)] = sub
        slices[i] = keep
        with torch.no_grad():
            xs = [_out(layer(x, **kw)) for x, kw in zip(xs, kwargs[i])]
    sd = model.state_dict()
    kept_blocks = [i for i in range(len(layers)) if i not in dropped]
    for key, t in sd.items():
        if not key.startswith(prefix + "."):
            res.state_dict[key] = t
            continue
        i_str, rest = key[len(prefix) + 1:].split(".", 1)
        i = int(i_str)
        if i in dropped:
            continue
        rows, cols = slices[i].get(rest.rsplit(".", 1)[0], (None, None))
        if rows is not None:
            t = t[rows]
        if cols is not None and t.dim() == 2:
            t = t[:, cols]
        res.state_dict[f"{prefix}.{kept_blocks.index(i)}.{rest}"] = t.contiguous()
    for i in sorted(dropped, reverse=True):
        del layers[i]
    model.config.num_hidden_layers = len(layers)
    return res
