"""An in-memory reference of REAP expert pruning (--drop-experts), written for the tests independently of the
package.

The whole model is loaded with transformers and its blocks run one window at a time (no KV cache). At each
MoE block, a pre-hook on the MoE module asks its router for every token's experts and combine weights and
computes each routed expert's output by hand from the fused weights (gate/up, activation, down: the
Mixtral / Qwen / DeepSeek / GLM expert), so the saliency S_j = mean over the tokens routed to j of
g_j(x) ||f_j(x)|| does not go through the package's replay of the experts module. The lowest experts are then
cut out of the module in place (parameters sliced, router rows and score-correction bias with them) and the
pruned block makes the next block's inputs, as the paper's sequential procedure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tests.reference import _layers, capture_block_inputs


@dataclass
class ReapResult:
    model: nn.Module  # the pruned reference model
    kept: dict[int, list[int]] = field(default_factory=dict)  # MoE block -> kept experts
    saliency: dict[int, list[float]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)


def _moe(layer: nn.Module) -> nn.Module | None:
    return next((m for m in layer.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj")), None)


def _to_drop(s: torch.Tensor, n_drop: int, groups: int) -> list[int]:
    size = s.numel() // groups
    out: list[int] = []
    for g in range(groups):
        members = list(range(g * size, (g + 1) * size))
        members.sort(key=lambda e: (float(s[e]), -e))  # lowest first; on ties the higher index
        out += members[: n_drop // groups]
    return sorted(out)


def _cut(moe: nn.Module, keep: list[int]) -> None:
    idx = torch.tensor(keep)
    ex, gate = moe.experts, moe.gate
    with torch.no_grad():
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj[idx].clone())
        ex.down_proj = nn.Parameter(ex.down_proj[idx].clone())
        gate.weight = nn.Parameter(gate.weight[idx].clone())
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias = gate.e_score_correction_bias[idx].clone()
    for mod in (ex, gate):
        if hasattr(mod, "num_experts"):
            mod.num_experts = len(keep)


def reference_reap(model_dir: str, tokens: torch.Tensor, ratio: float, count_key: str,
                   groups_key: str | None = None) -> ReapResult:
    """REAP at `ratio` over the windows `tokens` [windows, seqlen]; the config's `count_key` set to what remains."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = _layers(model)
    groups = int(getattr(model.config, groups_key)) if groups_key else 1
    xs, kwargs = capture_block_inputs(model, layers, tokens)
    res = ReapResult(model)
    for i, layer in enumerate(layers):
        moe = _moe(layer)
        if moe is not None:
            n = moe.experts.gate_up_proj.shape[0]
            sums = torch.zeros(n, dtype=torch.float64)
            counts = torch.zeros(n, dtype=torch.int64)

            def pre(mod: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                _, weights, index = mod.gate(x)
                w_gu, w_d, act = mod.experts.gate_up_proj, mod.experts.down_proj, mod.experts.act_fn
                for t in range(x.shape[0]):
                    for k in range(index.shape[1]):
                        e = int(index[t, k])
                        gate_, up = (w_gu[e] @ x[t]).chunk(2)
                        y = w_d[e] @ (act(gate_) * up)
                        sums[e] += float(weights[t, k]) * float(torch.linalg.vector_norm(y.double()))
                        counts[e] += 1

            handle = moe.register_forward_pre_hook(pre)
            with torch.no_grad():
                for x, kw in zip(xs, kwargs[i]):
                    layer(x, **kw)
            handle.remove()
            s = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
            dropped = _to_drop(s, int(n * ratio), groups)
            keep = [e for e in range(n) if e not in dropped]
            _cut(moe, keep)
            res.kept[i], res.saliency[i], res.tokens[i] = keep, s.tolist(), counts.tolist()
        with torch.no_grad():
            xs = [(lambda o: o[0] if isinstance(o, tuple) else o)(layer(x, **kw)) for x, kw in zip(xs, kwargs[i])]
    n_left = next(len(k) for k in res.kept.values())
    setattr(model.config, count_key, n_left)
    return res
