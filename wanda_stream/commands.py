"""The subcommands: turn parsed arguments into a RunConfig and call the core."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import psutil
import torch
from transformers import PretrainedConfig

from wanda_stream.run import calib
from wanda_stream.model import experts
from wanda_stream.run import resources
from wanda_stream.model import shrink
from wanda_stream.run.card import CardFacts, base_model_id, card_command
from wanda_stream.storage.checkpoint import Checkpoint
from wanda_stream.run.config import RunConfig, parse_pattern, resolve_compute_dtype, resolve_device
from wanda_stream.run.dist import World, window_share
from wanda_stream.errors import InputError, Interrupted
from wanda_stream.methods import build as build_method
from wanda_stream.methods import dataclass_flags, option_flags
from wanda_stream.model.families import family_of
from wanda_stream.model.skeleton import Skeleton
from wanda_stream.storage.outputs import SWEEP_NAME, input_card, own_files, shard_names
from wanda_stream.storage.checkpoint import atomic_write_json
from wanda_stream.methods.profiles import Owl
from wanda_stream.run.report import PEAK_KEYS, Progress
from wanda_stream.run.resources import (
    BUFFERS_ON_DISK, MemoryPlan, activation_budgets, auto_batch, check_disk, check_seqlen, hidden_states_bytes,
    human_bytes, memory_plan, parse_size,
)
from wanda_stream.storage.state import (
    REPORT_NAME, RUN_FILE, RunLock, StopFlag, WorkDir, checkpoint_fingerprint, resume_command,
)

if TYPE_CHECKING:
    from wanda_stream.run.expert_groups import Streamed
    from wanda_stream.run.prune import PruneRun
    from wanda_stream.run.sweep import Entry


def build_prune_config(args: argparse.Namespace, world_size: int = 1
                       ) -> tuple[RunConfig, tuple[dict[str, Any], Skeleton, Checkpoint]]:
    """Validate the prune arguments against the checkpoint; returns the config and (fingerprint, skeleton, checkpoint)."""
    from wanda_stream.model.stream import checkpoint_dtype, open_model

    model_dir, work_dir = args.model_dir.resolve(), _work_dir(args)
    probe = _probe_config(args)
    if probe.needs_calibration and args.nsamples < world_size:
        raise InputError(f"--nsamples {args.nsamples}: fewer calibration windows than the {world_size} ranks; "
                         f"raise --nsamples to at least {world_size} or start fewer ranks")
    ckpt, sk = open_model(model_dir, probe.output_dtype)
    if probe.shrink.active:
        shrink.check(probe.shrink, sk.model.config, probe.nm if probe.masks else None)
    check_pattern(ckpt, sk, probe.nm, args.pattern)
    fp = checkpoint_fingerprint(ckpt)
    config = sk.model.config
    seqlen = args.seqlen if args.seqlen is not None else default_seqlen(args, config)
    if probe.needs_calibration or (args.eval_data and args.eval_seqlen is None):
        check_seqlen(config, seqlen, "--seqlen")  # magnitude reads no calibration windows
    if args.eval_seqlen is not None:
        check_seqlen(config, args.eval_seqlen, "--eval-seqlen")
    device = resolve_device(args.device)
    dtype_name = resolve_compute_dtype(args.compute_dtype, device, checkpoint_dtype(ckpt, sk))
    saved = _saved_config(work_dir, args.output_dir.resolve()) if args.resume else None
    if saved is not None and args.batch_size is None and args.max_activation_memory is None:
        batch = saved.batch_size  # the same micro-batches make a resumed run's bytes identical
    else:
        streamed = bool(streamed_blocks(ckpt, sk, args.expert_group, device, _dtype(dtype_name)))
        batch = _batch(args, config, seqlen, _dtype(dtype_name), args.nsamples, device, world_size, streamed)
    cfg = _run_config(args, seqlen, device, dtype_name, batch, world_size,
                      calib.spec_fingerprint(args.calib) if probe.needs_calibration else "",
                      calib.spec_fingerprint(args.eval_data) if args.eval_data else "")
    return cfg, (fp, sk, ckpt)


def chosen_options(args: argparse.Namespace) -> tuple[dict[str, float | int], dict[str, float]]:
    """The chosen method's options and the sparsity profile's, defaults filled in, from their flags.

    A flag of another method or profile than the one chosen is refused rather than silently ignored.
    """
    given: dict[str, dict[str, float | int]] = {}
    owned = {flag: (m, f.name) for flag, (m, f) in option_flags().items()}
    owned.update({flag: ("owl", f.name) for flag, f in dataclass_flags(Owl).items()})
    chosen = {"method": args.method, "profile": args.sparsity_profile}
    for flag, (owner, name) in owned.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if owner not in chosen.values():
            what = "--sparsity-profile" if owner == "owl" else "--method"
            raise InputError(f"{flag}: applies to {what} {owner} only; drop it or add {what} {owner}")
        given.setdefault(owner, {})[name] = value
    method = asdict(build_method(args.method, given.get(args.method, {})))
    profile = asdict(Owl(**given.get("owl", {}))) if args.sparsity_profile == "owl" else {}
    return method, profile


def reconstruct_options(args: argparse.Namespace) -> dict[str, float | int]:
    """--reconstruct's options, defaults filled in (empty without --reconstruct); one of its flags without
    --reconstruct is refused rather than silently ignored."""
    from wanda_stream.methods.reconstruct import Reconstruct

    given = {f.name: getattr(args, flag[2:].replace("-", "_"), None) for flag, f in dataclass_flags(Reconstruct).items()}
    if not getattr(args, "reconstruct", False):
        for flag in dataclass_flags(Reconstruct):
            if getattr(args, flag[2:].replace("-", "_"), None) is not None:
                raise InputError(f"{flag}: applies to --reconstruct only; drop it or add --reconstruct")
        return {}
    return Reconstruct(**{k: v for k, v in given.items() if v is not None}).to_json()


def check_pattern(ckpt: Checkpoint, sk: Skeleton, nm: tuple[int, int] | None, pattern: str) -> None:
    """Refuse an N:M pattern that some pruned matrix's input size is not a multiple of, before any work."""
    if nm is None:
        return
    for key, matrices in sorted(experts.pruned_matrices(sk).items()):
        shape = ckpt.tensors[key].shape
        width = shape[-2] if matrices[0].transposed else shape[-1]
        if width % nm[1]:
            raise InputError(f"--pattern {pattern}: '{key}' has {width} inputs, not a multiple of {nm[1]}; "
                             f"choose an M that divides the input sizes (2:4 and 4:8 fit most models)")


def _batch(args: argparse.Namespace, config: PretrainedConfig, seqlen: int, dtype: torch.dtype, n: int,
           device: str, ranks: int = 1, streamed: bool = False) -> int:
    """The micro-batch from --batch-size or --max-activation-memory (or the free memory); one that gives
    each of `ranks` ranks work unless --batch-size says otherwise. `streamed`: the MoE blocks stream their
    experts (resources.window_bytes)."""
    return auto_batch(config, seqlen, dtype, n, device, args.batch_size, _budget(args), ranks, streamed)


def _budget(args: argparse.Namespace) -> int | None:
    """--max-activation-memory in bytes, None when not given."""
    if getattr(args, "max_activation_memory", None) is None:
        return None
    return parse_size(args.max_activation_memory, "--max-activation-memory")


def default_seqlen(args: argparse.Namespace, config: PretrainedConfig) -> int:
    """min(2048, the model's context), as the Wanda paper's code sets it; said on stderr unless --quiet."""
    _say(args, resources.seqlen_note(config))
    return resources.default_seqlen(config)


def _probe_config(args: argparse.Namespace) -> RunConfig:
    """The arguments' checks that need no checkpoint (paths, method, profile, pattern), as a RunConfig."""
    method_options, profile_options = chosen_options(args)
    return RunConfig(
        str(args.model_dir.resolve()), str(args.output_dir.resolve()), str(_work_dir(args)), sparsity=_sparsity(args),
        pattern=args.pattern, **_shrink_fields(args), method=args.method, method_options=method_options,
        reconstruct=reconstruct_options(args),
        sparsity_profile=args.sparsity_profile, profile_options=profile_options, nsamples=args.nsamples,
        seqlen=resources.DEFAULT_SEQLEN if args.seqlen is None else args.seqlen,
        eval_windows=args.eval_windows, save_dtype=args.save_dtype).validate()


def _run_config(args: argparse.Namespace, seqlen: int, device: str, compute_dtype: str, batch: int, world_size: int,
                calib_fp: str, eval_fp: str) -> RunConfig:
    """The validated RunConfig of the prune arguments, given what the checkpoint or an earlier run settles."""
    model_dir, output_dir = args.model_dir.resolve(), args.output_dir.resolve()
    nm = parse_pattern(args.pattern)
    method_options, profile_options = chosen_options(args)
    return RunConfig(
        str(model_dir), str(output_dir), str(_work_dir(args)),
        sparsity=nm[0] / nm[1] if nm else _sparsity(args),  # N:M fixes the sparsity; record the real one
        pattern=args.pattern, **_shrink_fields(args), method=args.method, method_options=method_options,
        reconstruct=reconstruct_options(args),
        sparsity_profile=args.sparsity_profile, profile_options=profile_options, calib=args.calib,
        nsamples=args.nsamples, seqlen=seqlen, seed=args.seed, device=device, compute_dtype=compute_dtype,
        batch_size=batch, eval_data=args.eval_data, eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen,
        keep_work_dir=args.keep_work_dir, prefetch=not args.no_prefetch, states_on_disk=args.states_on_disk,
        expert_group=args.expert_group, activation_budget=_budget(args), world_size=world_size,
        calib_fingerprint=calib_fp, eval_fingerprint=eval_fp, chat_template=args.chat_template,
        calib_field=args.calib_field, save_dtype=args.save_dtype, **_task_fields(args),
    ).validate()


def _shrink_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields of structured pruning (--drop-blocks, --block-score, --drop-ffn, --drop-heads,
    --no-refit, --drop-experts)."""
    return {"drop_blocks": args.drop_blocks, "block_score": args.block_score, "drop_ffn": args.drop_ffn,
            "drop_heads": args.drop_heads, "refit": not args.no_refit, "drop_experts": args.drop_experts}


def _structural(args: argparse.Namespace) -> bool:
    return bool(args.drop_blocks or args.drop_ffn or args.drop_heads or args.drop_experts)


def _sparsity(args: argparse.Namespace) -> float:
    """--sparsity; unset, 0.5 as the paper, but none at all beside a --drop-* flag (no silent masks on top)."""
    if args.sparsity is not None:
        return args.sparsity
    return 0.0 if _structural(args) else 0.5


def _task_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields of prune --eval-tasks (checked here: lm-eval is an optional extra)."""
    if not args.eval_tasks:
        return {}
    from wanda_stream.eval.task_eval import check_suite_args, require_lm_eval

    require_lm_eval()
    check_suite_args(args.eval_num_fewshot, args.eval_limit)
    tasks = ",".join(t.strip() for t in args.eval_tasks.split(",") if t.strip())
    limit = _count_or_fraction(args.eval_limit)
    include = str(args.eval_include_path.resolve()) if args.eval_include_path else ""
    return {"eval_tasks": tasks, "eval_include_path": include, "eval_num_fewshot": args.eval_num_fewshot,
            "eval_limit": limit}


def _requested_config(args: argparse.Namespace, saved: RunConfig) -> RunConfig:
    """The configuration the prune arguments ask for, read without the input checkpoint.

    What only the checkpoint could settle (an automatic device, compute dtype or batch size, and the
    content of calibration files deleted with it) is taken from `saved`, the finished run's.
    """
    return _run_config(
        args, saved.seqlen if args.seqlen is None else args.seqlen, saved.device if args.device == "auto" else args.device,
        saved.compute_dtype if args.compute_dtype == "auto" else args.compute_dtype,
        saved.batch_size if args.batch_size is None else args.batch_size, saved.world_size,
        _spec_fp(args.calib, saved.calib, saved.calib_fingerprint) if saved.needs_calibration else "",
        _spec_fp(args.eval_data, saved.eval_data, saved.eval_fingerprint))


def _spec_fp(spec: str | None, saved_spec: str | None, saved_fp: str) -> str:
    if not spec:
        return ""
    # A local file deleted along with the input is judged by its path, as the checkpoint is.
    return saved_fp if spec == saved_spec and not Path(spec).exists() else calib.spec_fingerprint(spec)


def _finished_without_input(args: argparse.Namespace) -> bool:
    """--resume whose input checkpoint is gone: True when the output is this command's finished run.

    Batch users requeue finished jobs after deleting their inputs; the finished output's report holds
    the configuration to compare with. Raises InputError, naming the differences, when the output holds
    a finished run of other settings; False when it holds none (the input is then needed).
    """
    from wanda_stream.run.prune import output_is_finished, prepare

    report = _read_report(args.output_dir.resolve())
    try:
        saved = RunConfig.from_json(report["config"])
        model_fp = {"sha256": report["model_fingerprint"]}
    except (KeyError, TypeError, AttributeError):
        return False
    cfg = _requested_config(args, saved)
    if output_is_finished(cfg):
        # The same decision as with the input present: locks, leftovers of an interrupted clean-up, the
        # run.json of a --keep-work-dir run. The input is taken to be the one the report names.
        return not prepare(cfg, model_fp, resume=True, overwrite=False)
    diffs = saved.differences(cfg)
    if not diffs:
        return False
    raise InputError(
        f"{cfg.model_dir}: model directory not found, and {cfg.output_dir} holds a finished run with other "
        f"settings ({'; '.join(diffs)}); restore the input, or give the finished run's own arguments"
    )


def _read_report(output_dir: Path) -> Any:
    """The parsed report of a finished output, or None."""
    try:
        return json.loads((output_dir / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None


def _dtype(name: str) -> torch.dtype:
    from wanda_stream.run.config import DTYPE_NAMES

    return DTYPE_NAMES[name]


def _saved_config(work_dir: Path, output_dir: Path) -> RunConfig | None:
    """The configuration of an earlier run: from its work dir, or from the report of a finished output.

    The report matters once the work dir is gone: the automatic batch size depends on free memory,
    and a requeued --resume of a finished run must recognise it rather than see a different run.
    """
    if (work_dir / RUN_FILE).is_file():
        return RunConfig.from_json(WorkDir(work_dir).load_run()["config"])
    try:
        return RunConfig.from_json(_read_report(output_dir)["config"])
    except (KeyError, TypeError, AttributeError):
        return None


def disk_needs(cfg: RunConfig, sk: Skeleton, total_bytes: int, eval_windows: int, spilled: int = 0
               ) -> list[tuple[Path, int, str]]:
    """What the run still writes: the pruned checkpoint (less the shards already there) and its hidden states,
    with `spilled` bytes of a streamed block's per-token buffers beside them."""
    hidden = sk.hidden_size()
    states = 0
    if cfg.needs_calibration:
        states += hidden_states_bytes(cfg.nsamples, cfg.seqlen, hidden, cfg.dtype)
    if cfg.eval_data:
        states += hidden_states_bytes(eval_windows, cfg.eval_seqlen or cfg.seqlen, hidden, cfg.dtype)
    out = Path(cfg.output_dir)
    existing = sum((out / n).stat().st_size for n in shard_names(sk.n_layers - cfg.drop_blocks) if (out / n).is_file())
    what = f"hidden states and {BUFFERS_ON_DISK}" if spilled else "hidden states"
    work = (Path(cfg.work_dir), states + spilled, what)
    return [(out, max(total_bytes - existing, 0), "the pruned checkpoint"), work]


def check_resources(cfg: RunConfig, sk: Skeleton, total_bytes: int, block_tensor_bytes: list[list[int]],
                    eval_windows: int, ranks_per_node: int = 1, streamed: bool = False, runs: int = 1) -> None:
    """Refuse early, with numbers, when disk or memory cannot hold what the run needs (every rank of this
    node holds its own blocks, pinned on CUDA; the hidden states are shared out, so all ranks together
    need what one would). `block_tensor_bytes`: every block's tensor sizes held at once; `streamed`: some
    block streams its experts, whose per-token buffers count in RAM when the activation budget keeps them in
    host memory, on the work dir's disk when it leaves them no room (as the run then does); `runs`: the
    configurations of a sweep that run side by side in this process (see preflight_plans)."""
    el = torch.empty(0, dtype=cfg.dtype).element_size()
    hidden = sk.hidden_size()
    block = max((resources.block_host_bytes(b, cfg.device, el) for b in block_tensor_bytes), default=0)
    need_ram = resources.host_ram_needed(block, cfg.batch_size, cfg.seqlen, hidden, el, ranks_per_node)
    # The rank with the most tokens sizes every rank's buffers: which ranks share this node is not known here.
    plan = max(preflight_plans(cfg, sk, eval_windows, ranks_per_node, runs, streamed=True),
               key=lambda p: p.buffers_bytes) if streamed else MemoryPlan()
    if plan.buffers == "host":
        need_ram += ranks_per_node * plan.buffers_bytes
    spilled = cfg.world_size * plan.buffers_bytes if plan.buffers == "disk" else 0
    check_disk(disk_needs(cfg, sk, total_bytes, eval_windows, spilled))
    avail = psutil.virtual_memory().available
    if need_ram > avail:
        pinned = " (pinned for the GPU, each tensor rounded up to a power of two)" if cfg.device != "cpu" else ""
        raise InputError(
            f"these settings need about {human_bytes(need_ram)} of RAM{pinned} on this node, "
            f"{human_bytes(avail)} is available; lower --batch-size or --max-activation-memory, run fewer "
            "ranks per node, or use a bigger machine"
        )


def preflight_plans(cfg: RunConfig, sk: Skeleton, eval_windows: int, ranks_per_node: int = 1, runs: int = 1,
                    streamed: bool = False) -> list[MemoryPlan]:
    """Every rank's memory plan (resources.memory_plan), made before the run starts: from the config's window
    counts shared out as the ranks will share them (whole micro-batches, dist.window_share), for `runs`
    configurations of a sweep side by side. `eval_windows`: the evaluation windows asked for (0 when not
    capped: their number is known once the text is read); lm-eval's requests, built in the run, are not counted."""
    streams = [("calib", cfg.nsamples, cfg.seqlen)] if cfg.needs_calibration else []
    streams += [("eval", eval_windows, cfg.eval_seqlen or cfg.seqlen)] if cfg.eval_data else []
    budgets = activation_budgets(cfg.device, cfg.activation_budget, ranks_per_node)
    plans: list[MemoryPlan] = []
    for rank in range(cfg.world_size):
        shares = [(name, window_share(n, cfg.batch_size, rank, cfg.world_size)[1], seqlen)
                  for name, n, seqlen in streams]
        # A rank without a micro-batch of a stream holds none of it (PruneRun.my_streams); an uncapped
        # evaluation stream, of windows not yet counted, is kept with none, its length sizing the activations.
        shares = [(name, n, s) for name, n, s in shares if n or (name == "eval" and not eval_windows)]
        plans.append(memory_plan(shares, sk.hidden_size(), cfg.dtype, config=sk.model.config,
                                 batch_size=cfg.batch_size, seqlen=cfg.seqlen, budgets=budgets, runs=runs,
                                 states_on_disk=cfg.states_on_disk, calibration=cfg.needs_calibration,
                                 streamed=streamed))
    return plans


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune, resume, or do nothing for a finished run; refuses early when disk or memory cannot fit.

    Under torchrun every rank runs this; rank 0 alone decides about the output and writes it.
    """
    # Installed first: a SIGTERM during start-up must also end in exit 75, which schedulers retry.
    stop = StopFlag().install()
    world = World.from_env(args.device, args.dist_timeout)
    try:
        return _prune(args, stop, world)
    finally:
        stop.restore()
        world.close()


def resolve_model_arg(args: argparse.Namespace) -> str | None:
    """Turn args.model_dir into a local directory (a hub id is fetched or found in the cache); returns the id."""
    from wanda_stream.storage.hub import resolve_model

    resolved = resolve_model(args.model_dir, args.revision)
    args.model_dir = resolved.path
    return resolved.hub_id


def _prune(args: argparse.Namespace, stop: StopFlag, world: World) -> int:
    _resolve_model(args, world)
    if args.sweep is not None:
        return _sweep(args, stop, world)
    lock, cfg = _open_run(args, world)
    if cfg is None:
        _say(args, f"{args.output_dir.resolve()}: this run is already complete; nothing to do", world)
        return 0
    try:
        return _run_locked(args, stop, cfg, world)
    finally:
        if lock is not None:
            lock.release()


def _resolve_model(args: argparse.Namespace, world: World) -> None:
    if world.size > 1:
        # Rank 0 fetches a hub id first; the others then find it in the cache.
        world.on_main(lambda: resolve_model_arg(argparse.Namespace(**vars(args))), setup=True)
    args.hub_id = resolve_model_arg(args)


def _open_run(args: argparse.Namespace, world: World, runs: int = 1) -> tuple[RunLock | None, RunConfig | None]:
    """The run's lock (rank 0's; None elsewhere, or when there is nothing to do) and its config, which
    rank 0 decides for every rank (its automatic micro-batch); None when the run is already complete.
    `runs`: the configurations of a sweep that will run beside it in this process."""
    held: list[RunLock] = []

    def lock_and_prepare() -> RunConfig | None:
        # The lock comes before anything is read from the run or written: of processes started at once
        # on one output, one wins and the others are refused with the lock message.
        lock = _lock(args)
        try:
            cfg = _prepare_locked(args, world, runs)
        except BaseException:
            lock.release_unused()
            raise
        if cfg is None:
            lock.release_unused()
        else:
            held.append(lock)
        return cfg

    cfg = world.on_main(lock_and_prepare, setup=True)
    return (held[0] if held else None), cfg


def _sweep(args: argparse.Namespace, stop: StopFlag, world: World) -> int:
    """`prune --sweep`: every configuration prepared (or found complete) first, then all run in one pass."""
    from wanda_stream.run.sweep import parse_sweep

    if args.work_dir is not None:
        raise InputError("--work-dir: not with --sweep (each configuration keeps its work dir in "
                         "OUTPUT_DIR/NAME/.wanda-stream); leave it out")
    subs = [_entry_args(args, e) for e in parse_sweep(args.sweep)]
    runs = world.on_main(lambda: _check_sweep_disk(subs, world), setup=True)  # a refusal ends every rank
    opened: list[tuple[argparse.Namespace, RunLock | None, RunConfig]] = []
    try:
        for sub in subs:
            lock, cfg = _open_run(sub, world, runs)
            if cfg is None:
                _say(args, f"{sub.output_dir.resolve()}: already complete", world)
            else:
                opened.append((sub, lock, cfg))
        reports, reads = _run_sweep(args, stop, opened, world)
    finally:
        for _, lock, _ in opened:
            if lock is not None:
                lock.release()
    if world.main:
        _sweep_summary(args, subs, dict(zip((sub.sweep_name for sub, _, _ in opened), reports)), reads)
    return 0


def _sweep_summary(args: argparse.Namespace, subs: list[argparse.Namespace], reports: dict[str, dict | None],
                   reads: int) -> None:
    """OUTPUT_DIR/wanda_stream_sweep.json and the table of every configuration (those finished earlier too)."""
    from wanda_stream.run.sweep import sweep_table

    rows = []
    for sub in subs:
        report = reports.get(sub.sweep_name) or _read_report(sub.output_dir)
        rows.append({"name": sub.sweep_name, "output_dir": str(sub.output_dir), "command": card_command(sub.argv),
                     "method": report["method"]["name"], "total_sparsity": report["total_sparsity"],
                     "perplexity": report.get("eval", {}).get("perplexity")})
    atomic_write_json(args.output_dir / SWEEP_NAME, {"sweep": args.sweep, "blocks_read_this_process": reads,
                                                     "configurations": rows})
    if not args.quiet and args.log_format != "json":
        print(sweep_table(rows))


def _entry_args(args: argparse.Namespace, entry: "Entry") -> argparse.Namespace:
    """The arguments of one sweep configuration: its single `prune` command line (`entry_argv`), parsed
    as that command would be."""
    from wanda_stream.cli import build_parser
    from wanda_stream.run.sweep import entry_argv

    argv = entry_argv(args.argv, args.output_dir, entry)
    sub = build_parser().parse_args(argv)
    sub.argv, sub.sweep_name = argv, entry.name
    sub.model_dir, sub.hub_id = args.model_dir, args.hub_id  # resolved once, for the whole sweep
    return sub


def _check_sweep_disk(subs: list[argparse.Namespace], world: World) -> int:
    """Refuse a sweep whose configurations together cannot fit on the disk, before any is created; returns
    how many will run (those not finished already), whose hidden states then share this process's memory."""
    needs: list[tuple[Path, int, str]] = []
    runs = 0
    for sub in subs:
        if _done_without_input(sub):
            continue
        cfg, (_, sk, ckpt) = build_prune_config(sub, world.size)
        if _will_write(sub, cfg):
            runs += 1
            needs += [(p, n, f"{what} of the sweep's {len(subs)} configurations")
                      for p, n, what in disk_needs(cfg, sk, ckpt.total_bytes(), cfg.eval_windows or 0)]
    check_disk(needs)
    return max(runs, 1)  # never 0: one judged finished here that runs after all runs alone


def _run_sweep(args: argparse.Namespace, stop: StopFlag,
               opened: list[tuple[argparse.Namespace, RunLock | None, RunConfig]], world: World
               ) -> tuple[list[dict | None], int]:
    from wanda_stream.run.sweep import blocks_read, run_lockstep

    resume = shlex.join(["wanda-stream", *args.argv, *([] if args.resume else ["--resume"])])
    saved = f"the sweep's state is saved in each configuration's work dir. Resume with: {resume}"
    reports, runs = _run_prunes([(sub, cfg, f"prune {sub.sweep_name}") for sub, _, cfg in opened], stop, world,
                                saved, run_lockstep)
    return reports, blocks_read(runs)


def _work_dir(args: argparse.Namespace) -> Path:
    return (args.work_dir or args.output_dir.resolve() / ".wanda-stream").resolve()


def _lock(args: argparse.Namespace) -> RunLock:
    """The run's lock, taken once the paths are known not to overlap the input (the lock file is written)."""
    work, out = _work_dir(args), args.output_dir.resolve()
    _probe_config(args)
    try:
        return WorkDir(work).lock()
    except OSError as e:
        what = f"{out}: output directory" if work.parent == out else f"--work-dir {work}"
        raise InputError(f"{what} is not writable ({e.strerror}); choose another directory") from None


def _done_without_input(args: argparse.Namespace) -> bool:
    """A --resume of a run whose output is finished and whose input is gone: nothing to read or do."""
    return args.resume and not args.overwrite and not args.model_dir.exists() and _finished_without_input(args)


def _will_write(args: argparse.Namespace, cfg: RunConfig) -> bool:
    """Whether this command writes the run's output (not a --resume of a finished one)."""
    from wanda_stream.run.prune import output_is_finished

    return args.overwrite or not (args.resume and output_is_finished(cfg))


def streamed_blocks(ckpt: Checkpoint, sk: Skeleton, expert_group: int | None, device: str, dtype: torch.dtype
                    ) -> dict[int, Streamed]:
    """The blocks whose experts stream (expert_groups.plan_streaming) under --expert-group `expert_group` on
    `device` (a --device value) computing in `dtype`."""
    from wanda_stream.model.shrink import structure_of
    from wanda_stream.run.expert_groups import plan_streaming

    return plan_streaming(ckpt, sk, structure_of(family_of(sk.model.config)).experts, expert_group,
                          torch.device("cuda" if device.startswith("cuda") else "cpu"), dtype)


def _held_blocks(cfg: RunConfig, sk: Skeleton, ckpt: Checkpoint) -> tuple[list[list[int]], bool]:
    """Every block's stored tensor sizes held at once (a block streaming its experts holds a part), and
    whether any block streams."""
    from wanda_stream.run.expert_groups import held_tensor_bytes

    streamed = streamed_blocks(ckpt, sk, cfg.expert_group, cfg.device, cfg.dtype)
    return [held_tensor_bytes(ckpt, sk, i, streamed.get(i)) for i in range(sk.n_layers)], bool(streamed)


def _prepare_locked(args: argparse.Namespace, world: World, runs: int = 1) -> RunConfig | None:
    """Validate, check resources (for `runs` configurations of a sweep side by side) and create or reopen
    the run; None when it is already finished."""
    from wanda_stream.run.prune import prepare

    if _done_without_input(args):
        return None
    cfg, (fp, sk, ckpt) = build_prune_config(args, world.size)
    if _will_write(args, cfg):
        # Before prepare() creates the run: a refusal here leaves nothing behind to --resume or --overwrite.
        blocks, streamed = _held_blocks(cfg, sk, ckpt)
        check_resources(cfg, sk, ckpt.total_bytes(), blocks, cfg.eval_windows or 0, world.local_size, streamed,
                        runs=runs)
    card = card_facts(args.hub_id, Path(cfg.model_dir), card_command(args.argv))
    own = own_files(Path(cfg.model_dir), sk.n_layers - cfg.drop_blocks)
    if not prepare(cfg, fp, args.resume, args.overwrite, own, card):
        return None
    return cfg


def card_facts(hub_id: str | None, model_dir: Path, command: str) -> CardFacts:
    """The model card's facts of this input: its base model id (see card.base_model_id) and its name."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return {"base_model": base_model_id(hub_id, input_card(model_dir), config), "name": hub_id or model_dir.name,
            "command": command}


def _run_locked(args: argparse.Namespace, stop: StopFlag, cfg: RunConfig, world: World) -> int:
    saved = f"state saved in {cfg.work_dir}. Resume with: {resume_command(cfg)}"
    _run_prunes([(args, cfg, "prune")], stop, world, saved, lambda runs: [runs[0].run()])
    return 0


def _run_prunes(jobs: list[tuple[argparse.Namespace, RunConfig, str]], stop: StopFlag, world: World, saved: str,
                go: Callable[[list[PruneRun]], list[dict | None]]) -> tuple[list[dict | None], list[PruneRun]]:
    """The prepared runs `jobs` (arguments, config, progress label) run by `go`, and a summary of each that
    finished. An interruption says `saved` (where the state is, how to resume); a refusal discards the
    runs that had not started, so that nothing is left to --resume."""
    from wanda_stream.run.prune import PruneRun

    progresses = [_progress(sub, cfg, world, desc) for sub, cfg, desc in jobs]
    try:
        if world.any(stop.requested):
            raise Interrupted("stopped before the first block")
        runs = [PruneRun(cfg, progress, stop, world) for (_, cfg, _), progress in zip(jobs, progresses)]
        reports = go(runs)
    except Interrupted as e:
        raise Interrupted(f"{e}; {saved}") from None
    except InputError:
        if world.main:
            for _, cfg, _ in jobs:
                WorkDir(Path(cfg.work_dir)).discard_if_unstarted(Path(cfg.output_dir))
        raise
    finally:
        for progress in progresses:
            progress.close()
    for (sub, cfg, _), report in zip(jobs, reports):
        if report is not None:
            _summary(sub, cfg, report)
    return reports, runs


def _progress(args: argparse.Namespace, cfg: RunConfig, world: World, desc: str) -> Progress:
    """The run's progress output: one step per block of each pass over the model."""
    from wanda_stream.model.skeleton import load_config

    blocks = load_config(Path(cfg.model_dir)).get_text_config().num_hidden_layers
    # OWL's or --drop-blocks' pass over the dense model, then the pruning pass
    passes = 2 if cfg.owl is not None or cfg.drop_blocks else 1
    mode = "quiet" if args.quiet or (args.log_format != "json" and not world.main) else args.log_format
    name = getattr(args, "sweep_name", None)
    if mode == "bar" and name is not None:
        mode = "lines"  # several bars, advanced in turn, would overwrite each other
    return Progress(mode, passes * blocks, desc, run=name)


def _say(args: argparse.Namespace, text: str, world: World = World()) -> None:
    if not getattr(args, "quiet", False) and world.main:
        print(text, file=sys.stderr)


def _summary(args: argparse.Namespace, cfg: RunConfig, report: dict) -> None:
    if args.quiet:
        return
    if args.log_format == "json":
        name = getattr(args, "sweep_name", None)
        print(json.dumps({"event": "done", **({"run": name} if name else {}), "output_dir": cfg.output_dir, "total_sparsity": report["total_sparsity"],
                          "perplexity": report.get("eval", {}).get("perplexity"),
                          **_peaks(report)}), flush=True)
        return
    print(f"pruned {cfg.model_dir} -> {cfg.output_dir}")
    if "structure" in report:
        st, params = report["structure"], report["parameters"]
        print(f"  structure: {st['drop_blocks']} blocks removed {st['dropped_blocks']}, sizes {st['sizes']}; "
              f"parameters {params['before']:,} -> {params['after']:,}")
    if cfg.masks:
        profile = f", {cfg.sparsity_profile} profile" if cfg.sparsity_profile != "uniform" else ""
        print(f"  method {cfg.method}{profile}, pattern {cfg.pattern}, "
              f"sparsity of decoder linears {report['total_sparsity']:.4f}")
    if "eval" in report:
        ev = report["eval"]
        print(f"  perplexity {ev['perplexity']:.4f} on {ev['windows']} x {ev['seqlen']} tokens of {ev['data']}")
    if "eval_tasks" in report:
        from wanda_stream.eval.task_eval import results_table

        print(results_table(report["eval_tasks"]))
    print(f"  {_peak_text(report)}")


def _peaks(report: dict) -> dict[str, int]:
    return {k: report[k] for k in PEAK_KEYS if k in report}


def _peak_text(report: dict) -> str:
    """'peak RSS 871 MiB' (ru_maxrss), plus the CUDA allocator's peak on a GPU run."""
    text = f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB"
    if "peak_cuda_bytes" in report:
        text += (f", peak CUDA {report['peak_cuda_bytes'] / 2**20:.0f} MiB allocated, "
                 f"{report.get('peak_cuda_reserved_bytes', 0) / 2**20:.0f} MiB reserved")
    return text


def cmd_eval(args: argparse.Namespace) -> int:
    from wanda_stream.eval.evaluate import evaluate

    resolve_model_arg(args)
    if args.tasks is not None:
        return cmd_eval_tasks(args)
    device = resolve_device(args.device)
    if args.max_windows is not None and args.max_windows <= 0:
        raise InputError(f"--max-windows {args.max_windows}: must be a positive integer")
    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="wanda-stream-eval-")
        work = Path(tmp)
    try:
        batch = lambda config, seqlen, dtype, n: _batch(args, config, seqlen, dtype, n, device)  # noqa: E731
        mode = "quiet" if args.quiet or args.json else args.log_format
        result = evaluate(args.model_dir.resolve(), args.data, args.seqlen, args.max_windows, device,
                          args.compute_dtype, work, batch, mode, say=lambda text: _say(args, text))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        rows = [("perplexity", f"{result['perplexity']:.4f}"), ("tokens", result["tokens"]),
                ("windows", result["windows"]), ("seqlen", result["seqlen"]), ("seconds", result["seconds"]),
                ("peak memory", _peak_text(result))]
        for k, v in rows:
            print(f"{k:<16}{v}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from wanda_stream.eval.inspect import format_summary, format_table, inspect_checkpoint, summarize

    if args.plot is not None:
        from wanda_stream.eval.plot import load_report, plot_report

        plot_report(load_report(args.model_dir), args.plot)
        print(f"wrote {args.plot}")
        return 0
    resolve_model_arg(args)
    result = inspect_checkpoint(args.model_dir, args.pattern)
    if args.summary:
        summary = summarize(result)
        print(json.dumps(summary) if args.json else format_summary(summary))
    else:
        print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from wanda_stream.eval.inspect import format_status, run_status

    result = run_status(args.path.resolve())
    print(json.dumps(result) if args.json else format_status(result))
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """`eval --tasks`: lm-eval tasks on the streamed model; its results table, or its results object with --json."""
    from wanda_stream.eval.task_eval import TaskRun, evaluate_tasks, require_lm_eval, results_table, save_results

    require_lm_eval()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise InputError("--tasks: give at least one task name, e.g. --tasks arc_easy")
    batch = args.batch_size
    if batch is not None and batch <= 0:
        raise InputError(f"--batch-size {batch}: must be a positive integer")
    if args.max_activation_memory is not None:
        raise InputError("--max-activation-memory: not used with --tasks (requests come in buckets of many lengths); "
                         "set rows per micro-batch with --batch-size")
    limit = _count_or_fraction(args.limit)
    run = TaskRun(args.model_dir.resolve(), tasks, args.include_path, args.num_fewshot, limit,
                  resolve_device(args.device), args.compute_dtype, batch,
                  "quiet" if args.quiet or args.json else args.log_format, args.work_dir,
                  log_samples=args.output_path is not None)
    stop = StopFlag().install()
    try:
        results = evaluate_tasks(run, stop)
    finally:
        stop.restore()
    if args.output_path is not None:
        save_results(results, args.output_path, run.model_dir)
    results.pop("samples", None)
    print(json.dumps(results) if args.json else results_table(results))
    return 0


def _count_or_fraction(limit: float | None) -> float | None:
    """lm-eval's --limit: a document count when 1 or more (an int, as lm-eval expects), else a fraction."""
    return int(limit) if limit is not None and limit >= 1 else limit
