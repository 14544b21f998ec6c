"""An in-memory reference implementation of the pruning methods (Wanda, magnitude, RIA, SparseGPT, ALPS, and
OWL's layer-wise sparsity), written for the tests.

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
    # get_decoder() of Llama 4's text model is the model itself: its blocks are one level further down.
    return next(m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n)


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


def ria_ref_mask(w: torch.Tensor, norm_sq: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                 alpha: float = 0.5) -> torch.Tensor:
    """RIA as its paper's code writes it, whole matrix at once."""
    a = w.float().abs()
    score = (a / a.sum(dim=0) + a / a.sum(dim=1).reshape(-1, 1)) * torch.sqrt(norm_sq.float()).reshape(1, -1) ** alpha
    if nm:
        return _lowest(score.reshape(score.shape[0], -1, nm[1]), nm[0], 2).reshape(score.shape)
    return _lowest(score, int(score.shape[1] * sparsity), 1)


def sparsegpt_ref(w: torch.Tensor, xtx: torch.Tensor, tokens: int, sparsity: float, nm: tuple[int, int] | None,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT in float64 as the paper's algorithm reads: H = 2 X^T X / n, dampened, U = chol(H^-1) upper;
    per column block the adaptive mask, then the column-by-column OBS update. Returns (weight, mask)."""
    W = w.double().clone()
    H = 2 * xtx.double() / tokens
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    rows, cols = W.shape
    M = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:
            tmp = W1 ** 2 / torch.diag(U1).reshape(1, -1) ** 2
            M1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / torch.diag(U1)[i:i + nm[1]].reshape(1, -1) ** 2
                M1.scatter_(1, i + torch.topk(tmp, nm[0], dim=1, largest=False)[1], True)
            q = W1[:, i].clone()
            q[M1[:, i]] = 0
            Q1[:, i] = q
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
        M[:, i1:i2] = M1
    return W, M


def alps_ref(w: torch.Tensor, xtx: torch.Tensor, tokens: int, sparsity: float, nm: tuple[int, int] | None,
             damp: float = 0.01, rho: float = 0.1, max_iter: int = 300, cg_steps: int = 10
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPS in float64 as the paper describes it, with explicit inverses (no eigendecomposition):
    H = 2 X^T X / n dampened and scaled to a unit diagonal, ADMM with the support-driven rho schedule,
    then conjugate gradients on the support. Masks by plain sorts. Returns (weight, mask)."""
    W = w.double().clone()
    H = 2 * xtx.double() / tokens
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    s = torch.sqrt(torch.diag(H))
    Hn = H / torch.outer(s, s)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    B0 = W * s
    Y = B0 @ Hn

    def proj(z: torch.Tensor) -> torch.Tensor:
        if nm:
            return _lowest(z.abs().reshape(z.shape[0], -1, nm[1]), nm[0], 2).reshape(z.shape)
        return _lowest(z.abs().reshape(1, -1), int(z.numel() * sparsity), 1).reshape(z.shape)

    M0 = proj(B0)
    kept = M0.numel() - int(M0.sum())
    D, V, B, prev, grown = B0.masked_fill(M0, 0), torch.zeros_like(B0), B0.clone(), M0, False
    for it in range(max_iter):
        B = (Y - V + rho * D) @ torch.linalg.inv(Hn + rho * eye)
        M = proj(B + V / rho)
        D = (B + V / rho).masked_fill(M, 0)
        V = V + rho * (B - D)
        if (it + 1) % 3 == 0:
            change = int((M != prev).sum())
            prev = M
            if change / kept > 0.1:
                rho, grown = rho * 1.3, True
            elif change / kept > 0.005:
                rho, grown = rho * 1.2, True
            elif change > 0 and grown:
                rho *= 1.1
            elif grown:
                break
            else:
                rho /= 5
                if change > 0:
                    D, V = B0.masked_fill(M0, 0), torch.zeros_like(B0)
            rho = min(rho, 1e6)
            if it >= 30 and change / kept < 3e-4:
                break
    M = proj(B)
    keep = ~M
    for r in range(B.shape[0]):  # the kept weights of each row: CG on the support's own system
        S = keep[r]
        A, b = Hn[S][:, S], Y[r, S]
        x = B[r, S].clone()
        res = b - A @ x
        p, rr = res.clone(), res @ res
        for _ in range(cg_steps):
            if rr <= 1e-8 * (b @ b):
                break
            Ap = A @ p
            alpha = rr / (p @ Ap)
            x, res = x + alpha * p, res - alpha * Ap
            rr, rr_old = res @ res, rr
            p = res + rr / rr_old * p
        B[r] = 0
        B[r, S] = x
    return B / s, M


def owl_ref_sparsities(ratios: list[float], sparsity: float, lmbda: float) -> list[float]:
    """OWL's allocation as its reference code computes it (numpy)."""
    import numpy as np

    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lmbda * 2)
    r = r - np.mean(r) + (1 - sparsity)
    return [float(1 - x) for x in r]


def _gram_sums(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor],
               kwargs: list[dict[str, Any]]) -> dict[str, tuple[torch.Tensor, int]]:
    grams = {n: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64), 0] for n, m in linears.items()}

    def hook(n: str) -> Any:
        def add(mod: nn.Module, args: tuple, out: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[n][0] += x.t() @ x
            grams[n][1] += x.shape[0]
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for x, kw in zip(inputs, kwargs):
            layer(x, **kw)
    for h in handles:
        h.remove()
    return {n: (g, c) for n, (g, c) in grams.items()}


def _outlier_ratio(layer: nn.Module, sums: dict[str, torch.Tensor], m: float) -> float:
    scores = torch.cat([(mod.weight.float().abs() * torch.sqrt(sums[n].float()).reshape(1, -1)).flatten()
                        for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)])
    return float((scores > torch.mean(scores) * m).sum()) / scores.numel() * 100


def reference_prune(model_dir: Path, tokens: torch.Tensor | None, method: str, sparsity: float,
                    nm: tuple[int, int] | None, owl: tuple[float, float] | None = None,
                    propagate: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Pruned state dict (stored dtype) of the model, computed with the whole model in memory.

    `owl` = (M, lambda): OWL's layer-wise sparsities from a first pass over the dense model.
    `propagate`: the pruned weights that compute the next block's inputs instead of this reference's own
    (for ALPS, whose support moves with rounding-level changes of its inputs; see its test).
    """
    from transformers import AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    layers = _layers(model)
    stored_sd = stored.state_dict()
    prefix = next(n for n, m in model.named_modules() if m is layers)
    inputs: list[torch.Tensor] = []
    layer_kwargs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(layers))}
    if tokens is not None:
        inputs, layer_kwargs = capture_block_inputs(model, layers, tokens)
    targets = [sparsity] * len(layers)
    if owl is not None:
        ratios, dense = [], inputs
        for i, layer in enumerate(layers):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            ratios.append(_outlier_ratio(layer, linear_input_sums(layer, linears, dense, layer_kwargs[i]), owl[0]))
            with torch.no_grad():
                dense = [o[0] if isinstance(o, tuple) else o for o in
                         (layer(x, **kw) for x, kw in zip(dense, layer_kwargs[i]))]
        targets = owl_ref_sparsities(ratios, sparsity, owl[1])
    result = dict(stored_sd)
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        if method in ("sparsegpt", "alps"):
            grams = _gram_sums(layer, linears, inputs, layer_kwargs[i])
        else:
            sums = linear_input_sums(layer, linears, inputs, layer_kwargs[i])
        for n, m in linears.items():
            key = f"{prefix}.{i}.{n}.weight"
            w = stored_sd[key]
            if method in ("sparsegpt", "alps"):
                new, mask = (sparsegpt_ref if method == "sparsegpt" else alps_ref)(w, *grams[n], targets[i], nm)
                result[key] = new.to(w.dtype).masked_fill(mask, 0)
            else:
                if method == "ria":
                    mask = ria_ref_mask(w, sums[n], targets[i], nm)
                else:
                    mask = ref_mask(w, sums[n] if method == "wanda" else None, targets[i], nm,
                                    per_matrix=(method == "magnitude"))
                result[key] = w.masked_fill(mask, 0)
            with torch.no_grad():
                m.weight.copy_(result[key] if propagate is None else propagate[key])
        with torch.no_grad():
            outs = [layer(x, **kw) for x, kw in zip(inputs, layer_kwargs[i])]
            inputs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return result
