"""One MoE block of a pruning run with its routed experts streamed a group at a time (see expert_groups.py).

`prune_streamed` is the streamed counterpart of `PruneRun._block`: the same statistics, masks, REAP
choice, width plan, records and next-block inputs, with the block's shard written while its groups are
computed instead of after; `profile_streamed` is its counterpart in the pass over the dense model (OWL,
--drop-blocks). Supported: every method's masks, --drop-experts, --drop-ffn and --drop-heads (on the core:
attention, shared and dense MLPs), the evaluation streams and the block's output error; --reconstruct is
refused before any work (`refusal`).

Each pass through the block's core (the dense and the pruned calibration pass, every evaluation stream)
keeps per token the experts' inputs, the core's output and the experts' sums: 3 x tokens x hidden values
(45 GB in float32 for DeepSeek-V3 with 128 x 2048 calibration tokens). They stay in memory when they fit
the activation budget beside the hidden states (resources.memory_plan), else they go to scratch files in
the work dir (storage/spill.py), deleted when the block ends: then each group of experts reads every
pass's inputs and sums back, a micro-batch at a time in order, and writes the sums back, so a block with G
groups reads its buffers about G times and writes the sums G times (2 x G x tokens x hidden values of
reads per pass); the block's outputs are the same bytes either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wanda_stream.methods import plans
from wanda_stream.methods.fidelity import OutputError
from wanda_stream.methods import Stat
from wanda_stream.methods.observe import BlockObserver, BlockStats, DepthProbe, check_finite, reduce_stats
from wanda_stream.methods.profiles import count_above, score_sums
from wanda_stream.model import experts, shrink, widths
from wanda_stream.model.skeleton import Skeleton, release
from wanda_stream.run.block import Watch, linear_modules, observe_all, prune_matrices, width_inputs
from wanda_stream.run.expert_groups import Routes, Routing, ShardFeed, Streamed, contribution, holding
from wanda_stream.storage.activations import HiddenFile
from wanda_stream.storage.spill import BatchFile
from wanda_stream.storage.state import killpoint

if TYPE_CHECKING:
    from wanda_stream.run.prune import PruneRun

StreamedResult = tuple[Future | None, list[dict[str, Any]], dict[str, Any], float | None, None]


def refusal(run: "PruneRun") -> str:
    """Why this run cannot stream its blocks' experts ('' when it can): --reconstruct fits the whole block
    at once."""
    return "--reconstruct" if run.cfg.reconstruct else ""


def prune_streamed(run: "PruneRun", i: int, core: dict[str, torch.Tensor], streams: dict[str, torch.Tensor],
                   sparsity: float) -> StreamedResult | None:
    """Block i, its core tensors `core` read: observed, its experts scored (REAP), pruned group by group and
    written, and run to make every stream's next inputs. Returns the shard write's future (rank 0's; None
    on the others), the records, the plan's record, the output error (None without calibration) and no fit;
    None when stopped midway. The passes' buffers are freed, their scratch files deleted, when it returns."""
    with contextlib.ExitStack() as scratch:
        return _prune_streamed(run, i, core, streams, sparsity, scratch)


def _prune_streamed(run: "PruneRun", i: int, core: dict[str, torch.Tensor], streams: dict[str, torch.Tensor],
                    sparsity: float, scratch: contextlib.ExitStack) -> StreamedResult | None:
    plan: Streamed = run.streamed[i]
    st = run.st
    layer = st.load_block(i, core, exclude=(plan.holder,))
    linears = linear_modules(layer)
    dense: _Pass | None = None
    core_stats: BlockStats | None = None
    consumers: dict[str, plans.InputStats] = {}
    if run.observes:
        watches: list[Watch] = [(run.method.stat, linears, False)] if run.cfg.masks_observe else []
        watches += run._width_watches(layer)  # the core's: attention heads, shared and dense MLPs
        core_pass = _dense_core(run, i, layer, watches, run.hidden("calib", i, *streams["calib"].shape), scratch)
        if core_pass is None:
            return None
        dense, got = core_pass
        core_stats = got.pop(0) if run.cfg.masks_observe else None
        consumers = width_inputs(got)
        del got
    release(layer)
    every = list(range(plan.n_experts))
    kept, record = every, {}
    t_read = [0.0, 0]  # seconds waited on group reads, groups read
    if run.spec.drop_experts:
        assert dense is not None  # --drop-experts observes
        scored = _score(run, i, plan, dense, t_read)
        if scored is None:
            return None
        kept, record = scored
        router = experts.ExpertTensors((), experts.expert_tensors(run.sk, i, plan.holder, plan.router, core).stacked)
        core = experts.keep_experts(core, router, kept)
    width_record: dict[str, Any] = {}
    if run.spec.widths:  # the routed experts keep their widths: the plan changes only the core's tensors
        core, kept_cols, width_record = widths.shrink_block(run.spec, run.structure, run.shape, core,
                                                            run._keys(i, core), consumers)
        if core_stats is not None:
            for name, keep in kept_cols.items():
                core_stats.obs[name] = widths.narrow_observation(core_stats.obs[name], keep)
    del consumers
    narrow = run.spec.widths
    psk = st.skeleton(narrow)
    keys = experts.prunable_keys(psk, i, psk.layers[i], core, linears) if sparsity > 0 else {}
    records = prune_matrices(run.method, sparsity, run.cfg.nm, st.device, core, keys, core_stats, run.world)
    del core_stats
    pruned = st.load_block(i, core, narrow=narrow, exclude=(plan.holder,))
    passes = _pruned_core(run, i, pruned, streams, scratch)
    if passes is None:
        return None
    # Rank 0 writes the shard; the other ranks' tensors (the same bits) are dropped as they are done.
    feed = ShardFeed(2 * plan.expert_bytes(run.ckpt.tensors) * max(min(plan.group, len(kept)), 1),
                     enabled=run.world.main)
    future = run.writer.submit(_write_shard, run, i, _shard_items(run, plan, core, kept), feed) if feed.enabled else None
    try:
        for k in sorted(core):
            feed.put(k, core.pop(k))
        done = _prune_groups(run, i, plan, kept, dense, passes, sparsity, feed, records, t_read)
        if not done:
            feed.stop()
            return None
        error = _write_states(run, i, streams, passes, dense)
    except BaseException:
        feed.stop()
        raise
    run.streamed_notes[i] = {"expert_group": plan.group, "groups": len(plan.groups(kept)),
                             "expert_read_wait_s": round(t_read[0], 3), "groups_read": t_read[1],
                             "token_buffers": run.memory.buffers}
    plan_record = {**width_record, **({"experts": {plan.holder: record}} if record else {})}
    return future, records, plan_record, error, None


def profile_streamed(run: "PruneRun", i: int, core: dict[str, torch.Tensor], calib: torch.Tensor,
                     probe: DepthProbe | None) -> dict[str, float] | None:
    """The pass over the dense model for streamed block i (its core `core` read): the block's outputs into the
    next block's dense states, OWL's outlier ratio over the core's and every expert's Wanda scores, and
    --drop-blocks' `probe`; what the pass records of the block, None when stopped.

    OWL's threshold is m times the mean score of the whole block, known only once every expert is seen,
    so with OWL the experts are read a second time to count the scores above it."""
    with contextlib.ExitStack() as scratch:
        return _profile_streamed(run, i, core, calib, probe, scratch)


def _profile_streamed(run: "PruneRun", i: int, core: dict[str, torch.Tensor], calib: torch.Tensor,
                      probe: DepthProbe | None, scratch: contextlib.ExitStack) -> dict[str, float] | None:
    plan, st, owl = run.streamed[i], run.st, run.owl
    layer = st.load_block(i, core, exclude=(plan.holder,))
    linears = linear_modules(layer)
    src = run._dense_state(i, calib)
    core_pass = _dense_core(run, i, layer, [(Stat.SQ_SUM, linears, False)] if owl is not None else [], src, scratch)
    if core_pass is None:
        return None
    dense, got = core_pass
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if owl is not None:
        keys = experts.prunable_keys(run.sk, i, run.sk.layers[i], core, linears)
        pairs = [(m.view(core[m.key]).to(st.device), got[0].obs[m.stat].stat) for m in keys.values()
                 if m.stat in got[0].obs]
    release(layer)
    total, count = score_sums(pairs)
    expert_sq: dict[str, torch.Tensor] = {}  # an expert matrix's name -> its inputs' sums of squares
    seen: set[int] = set()  # the experts some token reached
    t_read = [0.0, 0]
    every = list(range(plan.n_experts))
    for group, stored in _groups(run, plan, every, t_read):
        if run.midblock_stop is not None and run.midblock_stop.requested:
            return None
        stats = _observe_group(run, i, plan, group, group, stored, dense, Stat.SQ_SUM if owl else None, True)
        if stats is not None:
            found = [(m, stats.obs[m.stat].stat) for m in _group_matrices(run.sk, i, plan, stored, group).values()
                     if m.stat in stats.obs]
            t, n = score_sums((m.view(stored[m.key]).to(st.device), sq) for m, sq in found)
            total, count = total + t, count + n
            expert_sq.update((m.name, sq) for m, sq in found)
            seen.update(plan.expert_of(m, group) for m, _ in found)
    _write_dense_states(run, i, calib, src, dense, probe)
    record: dict[str, float] = {}
    if owl is not None:
        threshold = owl.m * total / max(count, 1)
        above = count_above(pairs, threshold)
        for group, stored in _groups(run, plan, sorted(seen), t_read):
            above += count_above(((m.view(stored[m.key]).to(st.device), expert_sq[m.name])
                                  for m in _group_matrices(run.sk, i, plan, stored, group).values()
                                  if m.name in expert_sq), threshold)
        record["outlier_ratios"] = 100.0 * above / max(count, 1)
    if probe is not None:
        record.update(probe.results(run.world))
    return record


def _write_dense_states(run: "PruneRun", i: int, calib: torch.Tensor, src: HiddenFile, dense: "_Pass",
                        probe: DepthProbe | None) -> None:
    """The dense block's outputs into the dense pass's states entering block i+1 (none after the last block),
    each micro-batch with its inputs to --drop-blocks' probe."""
    dst = run._dense_state(i + 1, calib) if i + 1 < run.n else None
    writer = run.st.writer(dst) if dst is not None else None
    start = 0
    for out in dense.block_outputs():
        if probe is not None:
            probe.add(src.read(start, out.shape[0]).to(out.device), out)
        if writer is not None:
            writer.write(out)
            killpoint("hidden_write")
        start += out.shape[0]
    if writer is not None:
        writer.commit()


class _Pass:
    """One stream's pass through a block's core: per micro-batch the experts module's routing, the core's
    output and the routed experts' summed contributions (added group by group). Held in memory on `on`
    (the compute device; host memory for a CUDA run whose budget puts them there) or, with `spill`, in
    that scratch file, read back a micro-batch at a time and the sums written back behind each."""

    X, INDEX, WEIGHT, SUMS, OUTPUT = range(5)  # a micro-batch's tensors, in this order (a record of `spill`)

    def __init__(self, device: torch.device, on: torch.device, spill: BatchFile | None) -> None:
        self.device = device
        self.on = on
        self.spill = spill
        self.held: list[list[torch.Tensor]] = []
        self.shapes: list[torch.Size] = []  # the core's output shape per micro-batch
        self.scaled = False  # the routes' kind (Routes.scaled), the same for every micro-batch

    def record(self, calls: list[Routes], out: torch.Tensor) -> None:
        """A micro-batch's call of the experts module (taken from `calls`, what Routing recorded) and the
        core's output `out`; the experts' sums start at zero."""
        (r,) = calls  # the block calls its experts module once per forward
        calls.clear()
        self.scaled = r.scaled
        parts = [r.x, r.index, r.weight, torch.zeros_like(r.x), out]
        self.shapes.append(out.shape)
        if self.spill is not None:
            self.spill.append(parts)
        else:
            self.held.append([t.to(self.on) for t in parts])

    def batches(self, with_sums: bool) -> Iterator[tuple[int, Routes, torch.Tensor | None]]:
        """Per micro-batch in order: its index, its routing and, `with_sums`, the experts' sums, which the
        caller adds to in place before it asks for the next micro-batch (they are kept then)."""
        for mb, t in enumerate(self._records(range(self.SUMS + 1 if with_sums else self.SUMS))):
            sums = t[self.SUMS] if with_sums else None
            yield mb, Routes(t[self.X], t[self.INDEX], t[self.WEIGHT], self.scaled), sums
            if sums is not None:
                self._keep_sums(mb, sums)

    def block_outputs(self) -> Iterator[torch.Tensor]:
        """The block's outputs per micro-batch: the core's plus the routed experts'."""
        for s, z in self._records(range(self.SUMS, self.OUTPUT + 1)):
            yield z + s.view(z.shape)

    def delete(self) -> None:
        """Free the buffers (delete the scratch file)."""
        self.held.clear()
        if self.spill is not None:
            self.spill.delete()

    def _records(self, parts: range) -> Iterator[list[torch.Tensor]]:
        """Each micro-batch's tensors `parts`, on the compute device (the very tensors held there)."""
        got = self.spill.records(parts) if self.spill is not None else ([rec[k] for k in parts] for rec in self.held)
        for tensors in got:
            yield [t.to(self.device, non_blocking=True) for t in tensors]

    def _keep_sums(self, mb: int, sums: torch.Tensor) -> None:
        if self.spill is not None:
            self.spill.rewrite(mb, self.SUMS, sums)
        elif sums is not self.held[mb][self.SUMS]:  # held on the host: the caller summed into a device copy
            self.held[mb][self.SUMS].copy_(sums)


def _new_pass(run: "PruneRun", i: int, name: str, scratch: contextlib.ExitStack) -> _Pass:
    """An empty pass `name` (a stream's, or 'dense') through block i's core, its buffers where the run's
    activation budget puts them; deleted when `scratch` closes."""
    st = run.st
    spill = (BatchFile(run.work.spill_file(name, i, run.world.suffix), st.mover.reader, pin=st.device.type == "cuda")
             if run.memory.buffers == "disk" else None)
    p = _Pass(st.device, st.device if run.memory.buffers == "device" else torch.device("cpu"), spill)
    scratch.callback(p.delete)
    return p


def _routing(layer: nn.Module, plan: Streamed) -> Routing:
    """The recorder of the routes into block `layer`'s experts module (from its router beside it when the
    module takes its inputs stacked)."""
    parent = plan.holder.rpartition(".")[0]
    router = layer.get_submodule(f"{parent}.{plan.router}" if parent else plan.router) if plan.stacked else None
    return Routing(layer.get_submodule(plan.holder), router)


def _dense_core(run: "PruneRun", i: int, layer: nn.Module, watches: list[Watch], src: HiddenFile,
                scratch: contextlib.ExitStack) -> tuple[_Pass, list[BlockStats]] | None:
    """The dense core over the states `src`: the statistics `watches` ask of its linears, and its routing."""
    routing = _routing(layer, run.streamed[i])
    dense = _new_pass(run, i, "dense", scratch)
    with routing.recording() as calls:
        got = observe_all(run.st, i, layer, watches, src, run.cfg.batch_size, run.midblock_stop, world=run.world,
                          on_output=lambda s, c, out: dense.record(calls, out))
    return None if got is None else (dense, got)


def _pruned_core(run: "PruneRun", i: int, layer: nn.Module, streams: dict[str, torch.Tensor],
                 scratch: contextlib.ExitStack) -> dict[str, _Pass] | None:
    """The pruned core over every stream's states (the calibration's when observed)."""
    routing = _routing(layer, run.streamed[i])
    passes: dict[str, _Pass] = {}
    for name, t in streams.items():
        if name == "calib" and not run.observes:
            continue
        p = passes[name] = _new_pass(run, i, name, scratch)
        with routing.recording() as calls:
            ok = run.st.run_block(i, layer, run.hidden(name, i, *t.shape), run.cfg.batch_size,
                                  stop=run.midblock_stop, on_output=lambda s, c, out: p.record(calls, out))
        if not ok:
            return None
    return passes


def _group_params(run: "PruneRun", sk: Skeleton, i: int, holder: str, stored: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """A group's stored tensors as the experts module's fused parameters (relative names), in the compute
    dtype on the device, fused as transformers loads them."""
    inside = sk.block_prefix(i) + holder + "."
    return {name[len(inside):]: t.to(device=run.st.device, dtype=run.st.dtype)
            for name, t in sk.layout.to_params(stored).items()}


def _groups(run: "PruneRun", plan: Streamed, chosen: list[int], t_read: list[float]
            ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(experts, their stored tensors) per group of `chosen`, each group read behind the previous one's compute."""
    groups = plan.groups(chosen)
    ahead = run.st.read_parts(plan.parts(groups[0])) if groups else None
    for g, group in enumerate(groups):
        t0 = time.perf_counter()
        assert ahead is not None
        stored = ahead.result()
        t_read[0] += time.perf_counter() - t0
        t_read[1] += 1
        ahead = run.st.read_parts(plan.parts(groups[g + 1])) if g + 1 < len(groups) else None
        yield group, stored
        del stored


def _score(run: "PruneRun", i: int, plan: Streamed, dense: _Pass, t_read: list[float]
           ) -> tuple[list[int], dict[str, Any]] | None:
    """REAP over every expert, group by group, on the dense routing (their contributions summed into the
    dense outputs on the way): the kept experts and the plan's record; None when stopped."""
    n = plan.n_experts
    windows = sum(z[0] for z in dense.shapes)
    first = [0]  # each micro-batch's first window
    for z in dense.shapes[:-1]:
        first.append(first[-1] + z[0])
    sums = torch.zeros(windows, n, dtype=torch.float64)
    counts = torch.zeros(windows, n, dtype=torch.int64)
    mod = run.sk.layers[i].get_submodule(plan.holder)
    for group, stored in _groups(run, plan, list(range(n)), t_read):
        if run.midblock_stop is not None and run.midblock_stop.requested:
            return None
        params = _group_params(run, run.sk, i, plan.holder, stored)
        with holding(mod, params, len(group)), experts.eager(run.sk.model), torch.no_grad():
            for mb, e, y, token in _contributions(mod, dense, group, add=True):
                if y is None:
                    continue
                window = (token // dense.shapes[mb][1] + first[mb]).cpu()
                sums[:, e].index_add_(0, window, torch.linalg.vector_norm(y.double(), dim=-1).cpu())
                counts[:, e].index_add_(0, window, torch.ones_like(window))
        del params
    total_s, total_c = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
    for part_s, part_c in run.world.gather((sums, counts)):  # rank order, then window order: as a whole block adds
        for s, c in zip(part_s, part_c):
            total_s += s
            total_c += c
    scores = plans.reap_saliency(total_s, total_c)
    dropped = plans.experts_to_drop(scores, shrink.expert_drop(run.spec, n), run.shape.groups)
    kept = plans.kept(n, dropped).tolist()
    return kept, {"experts": n, "kept": kept, "dropped": dropped,
                  "saliency": [float(f"{float(v):.6g}") for v in scores], "tokens": [int(c) for c in total_c]}


def _prune_groups(run: "PruneRun", i: int, plan: Streamed, kept: list[int], dense: _Pass | None,
                  passes: dict[str, _Pass], sparsity: float, feed: ShardFeed, records: list[dict[str, Any]],
                  t_read: list[float]) -> bool:
    """Every group of the kept experts: observed on the dense routing (their contributions summed into the
    dense outputs unless REAP did it), pruned, run on the pruned routing, handed to the writer. False when
    stopped."""
    st, cfg = run.st, run.cfg
    new = {e: j for j, e in enumerate(kept)}
    psk = st.skeleton(run.spec.widths)
    pruned_mod = psk.layers[i].get_submodule(plan.holder)
    sum_dense = dense is not None and not run.spec.drop_experts
    for group, stored in _groups(run, plan, kept, t_read):
        if run.midblock_stop is not None and run.midblock_stop.requested:
            return False
        stats = None
        if dense is not None and (cfg.masks_observe or sum_dense):
            stats = _observe_group(run, i, plan, group, [new[e] for e in group], stored, dense,
                                   run.method.stat if cfg.masks_observe else None, sum_dense)
        out = plan.renamed(stored, group, new)
        del stored
        keys = _group_matrices(psk, i, plan, out, [new[e] for e in group]) if sparsity > 0 else {}
        records += prune_matrices(run.method, sparsity, cfg.nm, st.device, out, keys, stats, run.world)
        del stats
        if passes:
            params = _group_params(run, psk, i, plan.holder, out)
            with holding(pruned_mod, params, len(group)), experts.eager(psk.model), torch.no_grad():
                for p in passes.values():
                    _add_contributions(pruned_mod, p, [new[e] for e in group])
            del params
        pieces = plan.pieces(out, group, new)
        del out
        while pieces:
            k, first, t = pieces.pop(0)
            feed.put(k, t, first)
        killpoint("expert_group")
    return True


def _observe_group(run: "PruneRun", i: int, plan: Streamed, group: list[int], names: list[int],
                   stored: dict[str, torch.Tensor], dense: _Pass, kind: Stat | None, sum_dense: bool
                   ) -> BlockStats | None:
    """A group's experts (their stored tensors `stored`) run on the dense routing in the whole block's
    micro-batches: their `kind` statistics (None: none), named by the indices `names`, summed over the ranks;
    with `sum_dense`, their contributions summed into the dense outputs."""
    mod = run.sk.layers[i].get_submodule(plan.holder)
    params = _group_params(run, run.sk, i, plan.holder, stored)
    with holding(mod, params, len(group)), experts.eager(run.sk.model), torch.no_grad():
        observer = (BlockObserver(run.sk.model, run.sk.layers[i], {}, kind, run.st.device,
                                  keep_windows=run.world.size > 1, expert_index=names) if kind is not None else None)
        with observer if observer is not None else contextlib.nullcontext():
            for mb, e, y, token in _contributions(mod, dense, group, add=sum_dense):
                if observer is not None and e == group[-1]:  # the micro-batch's last expert: it ends
                    observer.close_batch()
    if observer is None:
        return None
    stats = reduce_stats(run.world, observer.results(check=False), run.st.device)
    check_finite(stats, i, run.st.dtype)
    return stats


def _contributions(mod: nn.Module, p: _Pass, group: list[int], add: bool
                   ) -> Iterator[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]:
    """Per micro-batch of pass `p` and expert e of `group` (held at local indices 0..): (micro-batch, e, its
    weighted outputs, their token rows), (mb, e, None, None) for an expert without a token; in expert order
    within a micro-batch, as the whole block's experts loop adds them, which it does into the pass's sums
    with `add`."""
    for mb, r, sums in p.batches(with_sums=add):
        for local, e in enumerate(group):
            got = contribution(mod, r, e, local)
            if got is None:
                yield mb, e, None, None
                continue
            y, token = got
            if sums is not None:
                sums.index_add_(0, token, y)
            yield mb, e, y, token


def _add_contributions(mod: nn.Module, p: _Pass, group: list[int]) -> None:
    """The group's contributions on pass `p`'s routing, summed into its sums."""
    for _ in _contributions(mod, p, group, add=True):
        pass  # the sums are what the loop is for


def _write_states(run: "PruneRun", i: int, streams: dict[str, torch.Tensor], passes: dict[str, _Pass],
                  dense: _Pass | None) -> float | None:
    """Every stream's block outputs into block i+1's states; the calibration outputs' relative error against
    the dense block's (None without calibration)."""
    error = OutputError()
    wanted = dense.block_outputs() if dense is not None else None  # read along with the calibration pass's
    for name, p in passes.items():
        last_calib = name == "calib" and i == run.n - 1  # feeds no block: computed for the error only
        writer = None if last_calib else run.st.writer(run.hidden(name, i + 1, *streams[name].shape))
        for out in p.block_outputs():
            if name == "calib" and wanted is not None:
                error.add(out, next(wanted))
            if writer is not None:
                writer.write(out)
                killpoint("hidden_write")
        if writer is not None:
            writer.commit()
    return run._total_error(error) if dense is not None else None


def _shard_items(run: "PruneRun", plan: Streamed, core: dict[str, torch.Tensor], kept: list[int]
                 ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The block shard's tensors: the core's and the kept experts' (under their new indices' names)."""
    return [(k, t.dtype, tuple(t.shape)) for k, t in core.items()] + plan.items(run.ckpt.tensors, kept)


def _group_matrices(sk: Skeleton, i: int, plan: Streamed, stored: dict[str, torch.Tensor], names: list[int]
                    ) -> dict[str, experts.Matrix]:
    """The prunable matrices of a group's stored tensors, named by the experts' indices `names` (the rows of
    a fused tensor hold those experts, in order)."""
    return experts.prunable_keys(sk, i, sk.layers[i], stored, {}, rows=names if plan.fused else None)


def _write_shard(run: "PruneRun", i: int, items: list[tuple[str, torch.dtype, tuple[int, ...]]], feed: ShardFeed
                 ) -> dict[str, float]:
    """The writer thread's part: block i's shard, its tensors taken from `feed` as they come."""
    from wanda_stream.storage.checkpoint import write_shard_pieces
    from wanda_stream.storage.outputs import shard_name

    t0, c0 = time.perf_counter(), time.thread_time()
    j = shrink.new_index(i, run.dropped)  # the output's block j, past removed blocks
    back = shrink.renumber({k: k for k, _, _ in items}, run.sk.block_key_prefix(i),  # new: old
                           run.sk.block_key_prefix(j))
    names = {old: new for new, old in back.items()}
    try:
        write_shard_pieces(run.out / shard_name(j + 1, run.total_shards), [(names[k], d, s) for k, d, s in items],
                           ((names[k], first, t) for k, first, t in feed.pieces()),
                           before_rename=lambda: killpoint("shard_write"))
    except BaseException as e:
        feed.fail(e)
        raise
    return {"write_s": time.perf_counter() - t0, "write_cpu_s": time.thread_time() - c0}
