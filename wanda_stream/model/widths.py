"""One block's width plan (the FFN channels and attention heads it loses), made from the dense block's
observations and applied to its stored tensors.

The family table (`families.Structure`) names the linears; `keys` maps a linear's relative name to the
checkpoint keys of its weight and bias. Tensors in, smaller tensors out: the loop loads the result into
a skeleton of the new widths and writes it in the checkpoint's own layout.
"""

from __future__ import annotations

from typing import Callable

import torch

from wanda_stream.methods import plans
from wanda_stream.model.families import Attention, Ffn, Structure
from wanda_stream.methods import Observation, Stat
from wanda_stream.model.shrink import Shape, ShrinkSpec, ffn_drop, head_drop

Keys = Callable[[str], tuple[str, str | None]]  # linear name -> (weight key, bias key or None)


def consumers(spec: ShrinkSpec, structure: Structure) -> list[str]:
    """The linears whose inputs a width plan observes: MLP down projections, attention output projections."""
    out = [f.consumer for f in structure.ffn] if spec.drop_ffn else []
    if spec.drop_heads and structure.heads is not None:
        out.append(structure.heads.o)
    return out


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, rows.to(t.device)).contiguous()


def _cols(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return t.index_select(1, cols.to(t.device)).contiguous()


def _consume(out: dict[str, torch.Tensor], key: str, keep: torch.Tensor, obs: plans.InputStats, spec: ShrinkSpec,
             record: dict) -> None:
    """The consuming matrix on its kept input columns, refit by least squares unless --no-refit (the Gram
    matrix, observed only for the refit, is consumed)."""
    w = out[key]
    if obs.gram is None:
        out[key] = _cols(w, keep)
        return
    fit = plans.fit_consumer(w, obs, keep, refit=spec.refit)  # takes the Gram matrix out of `obs`
    record.update(layer_error=fit.error, layer_error_no_refit=fit.error_as_is)
    if fit.dampening is not None:
        record["refit_dampening"] = fit.dampening
    out[key] = fit.weight.to(device=w.device, dtype=w.dtype)  # computed on the Gram matrix's device


def _rounded(scores: torch.Tensor, idx: list[int]) -> list[float]:
    return [float(f"{float(scores[i]):.6g}") for i in idx]


def shrink_ffn(ffn: Ffn, spec: ShrinkSpec, stored: dict[str, torch.Tensor], keys: Keys, obs: plans.InputStats
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Remove round(R x width) channels of one MLP: the lowest Wanda-sp scores; returns the tensors, the kept
    channels and the record (removed channels with their scores, the layer error of the consumer)."""
    out = dict(stored)
    w_key, _ = keys(ffn.consumer)
    width = stored[w_key].shape[1]
    # On the statistics' device, then on the host: the plan and its record index the scores element by element.
    scores = plans.channel_scores(obs.sq_sum, stored[w_key]).cpu()
    removed = plans.lowest(scores, ffn_drop(spec, width))
    keep = plans.kept(width, removed)
    rows = torch.cat([keep + part * width for part in range(ffn.parts)])
    for name in ffn.producers:
        for key in keys(name):
            if key is not None:
                out[key] = _rows(stored[key], rows)
    record: dict = {"width": width, "kept": int(keep.numel()), "removed": removed,
                    "removed_scores": _rounded(scores, removed)}
    _consume(out, w_key, keep, obs, spec, record)
    return out, keep, record


def shrink_heads(att: Attention, spec: ShrinkSpec, shape: Shape, stored: dict[str, torch.Tensor], keys: Keys,
                 obs: plans.InputStats) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Remove the lowest-scoring query heads (within every KV group alike, or whole groups with their
    key/value heads); returns the tensors, the kept o_proj input columns and the record."""
    out = dict(stored)
    o_key, _ = keys(att.o)
    hd = shape.head_dim
    scores = plans.head_scores(obs.sq_sum, stored[o_key], shape.n_heads).cpu()  # see shrink_ffn
    plan = plans.plan_heads(scores, shape.n_kv, head_drop(spec, shape.n_heads))
    keep_q = plans.kept(shape.n_heads * hd, plans.head_rows(plan.q_removed, hd))
    keep_kv = plans.kept(shape.n_kv * hd, plans.head_rows(plan.kv_removed, hd))
    if att.qkv:
        q_width, kv_width = shape.n_heads * hd, shape.n_kv * hd
        rows = torch.cat([keep_q, q_width + keep_kv, q_width + kv_width + keep_kv])
        parts = [(att.qkv, rows)]
    else:
        parts = [(att.q, keep_q), (att.k, keep_kv), (att.v, keep_kv)]
    for name, rows in parts:
        for key in keys(name):
            if key is not None:
                out[key] = _rows(stored[key], rows)
    record: dict = {"heads": shape.n_heads, "kv_heads": shape.n_kv, "removed_heads": plan.q_removed,
                    "removed_kv_heads": plan.kv_removed, "head_scores": _rounded(scores, range(shape.n_heads))}
    _consume(out, o_key, keep_q, obs, spec, record)
    return out, keep_q, record


def narrow_observation(ob: Observation, keep: torch.Tensor) -> Observation:
    """A method's observation of a consumer's input, on the kept columns only (what the smaller matrix reads)."""
    k = keep.to(ob.stat.device)
    stat = ob.stat.index_select(0, k) if ob.kind is Stat.SQ_SUM else ob.stat.index_select(0, k).index_select(1, k)
    return Observation(ob.kind, stat.contiguous(), ob.tokens)


def shrink_block(spec: ShrinkSpec, structure: Structure, shape: Shape, stored: dict[str, torch.Tensor], keys: Keys,
                 observed: dict[str, plans.InputStats]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Block's tensors with its width plan applied; the kept input columns of every consumer; the block's record.

    An MLP the block does not have (an MoE block's dense-MLP slot) is skipped.
    """
    out = dict(stored)
    kept_cols: dict[str, torch.Tensor] = {}
    record: dict = {}
    if spec.drop_ffn:
        for ffn in structure.ffn:
            if ffn.consumer in observed:
                out, kept_cols[ffn.consumer], record[ffn.consumer] = shrink_ffn(ffn, spec, out, keys,
                                                                                observed[ffn.consumer])
    if spec.drop_heads and structure.heads is not None:
        att = structure.heads
        out, kept_cols[att.o], record[att.o] = shrink_heads(att, spec, shape, out, keys, observed[att.o])
    return out, kept_cols, record
