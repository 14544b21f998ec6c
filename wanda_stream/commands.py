"""The subcommands: turn parsed arguments into a RunConfig and call the core."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import torch

from wanda_stream import calib
from wanda_stream.config import RunConfig, parse_pattern, resolve_compute_dtype, resolve_device
from wanda_stream.errors import InputError, Interrupted
from wanda_stream.report import Progress
from wanda_stream.state import (
    REPORT_NAME, RUN_FILE, StopFlag, WorkDir, checkpoint_fingerprint, resume_command,
)

MAX_AUTO_BATCH = 8
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'2GB', '512MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].upper() not in UNITS:
        raise InputError(f"{flag} '{text}': use a size such as 2GB, 512MiB or a number of bytes")
    return int(float(m[1]) * UNITS[m[2].upper()])


def window_bytes(config: Any, seqlen: int, dtype: torch.dtype) -> int:
    """Rough activation memory of one window through one block (states, MLP, attention scores)."""
    c = config.get_text_config()
    el = torch.empty(0, dtype=dtype).element_size()
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    heads = getattr(c, "num_attention_heads", 1)
    return seqlen * (8 * c.hidden_size + 3 * inter) * el + heads * seqlen * seqlen * 4


def auto_batch(args: argparse.Namespace, config: Any, seqlen: int, dtype: torch.dtype, n: int) -> int:
    if args.batch_size is not None:
        if args.batch_size <= 0:
            raise InputError(f"--batch-size {args.batch_size}: must be a positive integer")
        return args.batch_size
    if args.max_activation_memory is not None:
        budget = parse_size(args.max_activation_memory, "--max-activation-memory")
    else:
        budget = psutil.virtual_memory().available // 8
        device = resolve_device(getattr(args, "device", "cpu"))
        if device.startswith("cuda"):
            # The micro-batch is computed on the GPU: its free memory (less room for a block's
            # weights and the allocator's slack) bounds it as well as the host's.
            budget = min(budget, torch.cuda.mem_get_info(torch.device(device))[0] // 4)
    return max(1, min(MAX_AUTO_BATCH, n, budget // window_bytes(config, seqlen, dtype)))


def _check_seqlen(config: Any, seqlen: int, flag: str) -> None:
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if seqlen <= 0:
        raise InputError(f"{flag} {seqlen}: must be a positive integer")
    if limit is not None and seqlen > limit:
        raise InputError(f"{flag} {seqlen}: beyond the model's context of {limit} tokens; use at most {limit}")


def build_prune_config(args: argparse.Namespace) -> tuple[RunConfig, Any]:
    """Validate the prune arguments against the checkpoint; returns the config and (fingerprint, skeleton, checkpoint)."""
    from wanda_stream.stream import checkpoint_dtype, open_model

    model_dir, output_dir = args.model_dir.resolve(), args.output_dir.resolve()
    work_dir = (args.work_dir or output_dir / ".wanda-stream").resolve()
    probe = RunConfig(str(model_dir), str(output_dir), str(work_dir), sparsity=args.sparsity, pattern=args.pattern,
                      method=args.method, nsamples=args.nsamples, seqlen=args.seqlen,
                      eval_windows=args.eval_windows)
    probe.validate()
    ckpt, sk = open_model(model_dir)
    fp = checkpoint_fingerprint(ckpt)
    config = sk.model.config
    _check_seqlen(config, args.seqlen, "--seqlen")
    if args.eval_seqlen is not None:
        _check_seqlen(config, args.eval_seqlen, "--eval-seqlen")
    device = resolve_device(args.device)
    dtype_name = resolve_compute_dtype(args.compute_dtype, device, checkpoint_dtype(ckpt, sk))
    saved = _saved_config(work_dir, output_dir) if args.resume else None
    if saved is not None and args.batch_size is None and args.max_activation_memory is None:
        batch = saved.batch_size  # the same micro-batches make a resumed run's bytes identical
    else:
        batch = auto_batch(args, config, args.seqlen, _dtype(dtype_name),
                           args.nsamples)
    cfg = _run_config(args, device, dtype_name, batch,
                      calib.spec_fingerprint(args.calib) if args.method == "wanda" else "",
                      calib.spec_fingerprint(args.eval_data) if args.eval_data else "")
    return cfg, (fp, sk, ckpt)


def _run_config(args: argparse.Namespace, device: str, compute_dtype: str, batch: int,
                calib_fp: str, eval_fp: str) -> RunConfig:
    """The validated RunConfig of the prune arguments, given what the checkpoint or an earlier run settles."""
    model_dir, output_dir = args.model_dir.resolve(), args.output_dir.resolve()
    nm = parse_pattern(args.pattern)
    return RunConfig(
        str(model_dir), str(output_dir), str((args.work_dir or output_dir / ".wanda-stream").resolve()),
        sparsity=nm[0] / nm[1] if nm else args.sparsity,  # N:M fixes the sparsity; record the real one
        pattern=args.pattern, method=args.method, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, device=device, compute_dtype=compute_dtype, batch_size=batch, eval_data=args.eval_data,
        eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, keep_work_dir=args.keep_work_dir,
        prefetch=not args.no_prefetch, calib_fingerprint=calib_fp, eval_fingerprint=eval_fp,
        **_task_fields(args),
    ).validate()


def _task_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields of prune --eval-tasks (checked here: lm-eval is an optional extra)."""
    if not args.eval_tasks:
        return {}
    from wanda_stream.task_eval import check_suite_args, require_lm_eval

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
        args, saved.device if args.device == "auto" else args.device,
        saved.compute_dtype if args.compute_dtype == "auto" else args.compute_dtype,
        saved.batch_size if args.batch_size is None else args.batch_size,
        _spec_fp(args.calib, saved.calib, saved.calib_fingerprint) if args.method == "wanda" else "",
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
    from wanda_stream.prune import output_is_finished, prepare

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
    from wanda_stream.config import DTYPE_NAMES

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


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': sizes in refusals are read by people deciding what to free."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_resources(cfg: RunConfig, sk: Any, total_bytes: int, largest_block: int, eval_windows: int) -> None:
    """Refuse early, with numbers, when disk or memory cannot hold what the run needs."""
    el = torch.empty(0, dtype=cfg.dtype).element_size()
    hidden = sk.hidden_size()
    # Three sets per stream coexist at the peak: a block's input, its output, and the previous block's
    # input, which is kept until that block's shard is durable (so a crash can redo it).
    states = 0
    if cfg.needs_calibration:
        states += 3 * cfg.nsamples * cfg.seqlen * hidden * el
    if cfg.eval_data:
        states += 3 * eval_windows * (cfg.eval_seqlen or cfg.seqlen) * hidden * el
    out = Path(cfg.output_dir)
    existing = sum(p.stat().st_size for p in out.glob("model-*.safetensors")) if out.exists() else 0
    need_out = max(total_bytes - existing, 0)
    for path, need, what in ((out, need_out, "the pruned checkpoint"), (Path(cfg.work_dir), states, "hidden states")):
        anchor = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
        free = shutil.disk_usage(anchor).free
        same_fs = anchor.stat().st_dev == next(p for p in [out, *out.parents] if p.exists()).stat().st_dev
        total_need = need_out + states if same_fs else need
        if total_need > free:
            raise InputError(
                f"{path}: needs about {human_bytes(total_need)} free for {what}, has {human_bytes(free)}; "
                "free space or choose another --work-dir / output directory"
            )
    scale = max(1, el // 2) if cfg.device == "cpu" else 1
    # Four micro-batches of hidden states: the input computed on, the next one read ahead, the
    # output and the previous output still being written.
    need_ram = 3 * largest_block * scale + cfg.batch_size * 4 * cfg.seqlen * hidden * el
    avail = psutil.virtual_memory().available
    if cfg.device == "cpu" and need_ram > avail:
        raise InputError(
            f"these settings need about {human_bytes(need_ram)} of RAM, {human_bytes(avail)} is available; "
            "lower --batch-size or --max-activation-memory, or use a bigger machine"
        )


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune, resume, or do nothing for a finished run; refuses early when disk or memory cannot fit."""
    # Installed first: a SIGTERM during start-up must also end in exit 75, which schedulers retry.
    stop = StopFlag().install()
    try:
        return _prune(args, stop)
    finally:
        stop.restore()


def _prune(args: argparse.Namespace, stop: StopFlag) -> int:
    from wanda_stream.prune import PruneRun, output_is_finished, prepare

    if args.resume and not args.overwrite and not args.model_dir.exists() and _finished_without_input(args):
        _say(args, f"{args.output_dir.resolve()}: this run is already complete; nothing to do")
        return 0
    cfg, (fp, sk, ckpt) = build_prune_config(args)
    if args.overwrite or not (args.resume and output_is_finished(cfg)):
        # Before prepare() creates the run: a refusal here leaves nothing behind to --resume or --overwrite.
        largest = max(sum(t.nbytes for k, t in ckpt.tensors.items() if k.startswith(sk.block_prefix(i)))
                      for i in range(sk.n_layers))
        check_resources(cfg, sk, ckpt.total_bytes(), largest, cfg.eval_windows or 0)
    if not prepare(cfg, fp, args.resume, args.overwrite):
        _say(args, f"{cfg.output_dir}: this run is already complete; nothing to do")
        return 0
    lock = WorkDir(Path(cfg.work_dir)).lock()
    progress = Progress("quiet" if args.quiet else args.log_format, sk.n_layers, "prune")
    try:
        if stop.requested:
            raise Interrupted("stopped before the first block")
        run = PruneRun(cfg, progress, stop)
        report = run.run()
    except Interrupted as e:
        raise Interrupted(f"{e}; state saved in {cfg.work_dir}. Resume with: {resume_command(cfg)}") from None
    except InputError:
        WorkDir(Path(cfg.work_dir)).discard_if_unstarted(Path(cfg.output_dir))
        raise
    finally:
        progress.close()
        lock.close()
    _summary(args, cfg, report)
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _summary(args: argparse.Namespace, cfg: RunConfig, report: dict) -> None:
    if args.quiet:
        return
    if args.log_format == "json":
        print(json.dumps({"event": "done", "output_dir": cfg.output_dir, "total_sparsity": report["total_sparsity"],
                          "perplexity": report.get("eval", {}).get("perplexity"),
                          "peak_rss_bytes": report["peak_rss_bytes"]}), flush=True)
        return
    print(f"pruned {cfg.model_dir} -> {cfg.output_dir}")
    print(f"  method {cfg.method}, pattern {cfg.pattern}, sparsity of decoder linears {report['total_sparsity']:.4f}")
    if "eval" in report:
        ev = report["eval"]
        print(f"  perplexity {ev['perplexity']:.4f} on {ev['windows']} x {ev['seqlen']} tokens of {ev['data']}")
    if "eval_tasks" in report:
        from wanda_stream.task_eval import results_table

        print(results_table(report["eval_tasks"]))
    print(f"  peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")


def cmd_eval(args: argparse.Namespace) -> int:
    from wanda_stream.evaluate import evaluate

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
        result = evaluate(args.model_dir.resolve(), args.data, args.seqlen, args.max_windows, device,
                          args.compute_dtype, work, args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        rows = [("perplexity", f"{result['perplexity']:.4f}"), ("tokens", result["tokens"]),
                ("windows", result["windows"]), ("seqlen", result["seqlen"]), ("seconds", result["seconds"]),
                ("peak RSS (MiB)", f"{result['peak_rss_bytes'] / 2**20:.0f}")]
        for k, v in rows:
            print(f"{k:<16}{v}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from wanda_stream.inspect import format_table, inspect_checkpoint

    result = inspect_checkpoint(args.model_dir.resolve(), args.pattern)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from wanda_stream.inspect import run_status

    result = run_status(args.path.resolve())
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<14}{v}")
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """`eval --tasks`: lm-eval tasks on the streamed model; its results table, or its results object with --json."""
    from wanda_stream.task_eval import TaskRun, evaluate_tasks, require_lm_eval, results_table, save_results

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
