"""Run state in the work directory: what run this is, how far it got, and stopping cleanly.

Files (every change is a temp file, fsync and rename, so a crash leaves the old or the new):
  run.json    the configuration and the input checkpoint's fingerprint (written once)
  state.json  next block to do, per-block records, and the stage ('profile' for OWL's pass, 'blocks', 'done')
  tokens.safetensors, calib_*.bin / eval_*.bin / owl_*.bin   token windows and hidden states
  dense_*.bin  block i's dense outputs on the calibration inputs (dense_i, while block i is pruned)
  spill-*.bin  scratch of a block streaming its experts whose per-token buffers do not fit memory (storage/spill.py)
  lock        flock'ed by the process working on the run (the kernel drops it when that process dies)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from wanda_stream.run.card import CardFacts
from wanda_stream.storage.checkpoint import Checkpoint, atomic_write_json
from wanda_stream.run.config import RunConfig
from wanda_stream.errors import InputError

RUN_FILE = "run.json"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
LOCK_TRIES = 20
TOKENS_FILE = "tokens.safetensors"
REPORT_NAME = "wanda_stream.json"
EX_TEMPFAIL = 75
KILL_ENV = "WANDA_STREAM_KILL_AT"

# Everything a run writes in its work dir (temporaries included, as a kill may leave them).
_OWN_NAME = re.compile(
    r"lock|(run\.json|state\.json|rank\d+\.json|tokens\.safetensors|(calib|eval|owl|dense|tasks_\d{5})_\d{5}(\.r\d+)?\.bin"
    r"|spill-(calib|eval|dense|tasks_\d{5})-\d{5}(\.r\d+)?\.bin)(\.tmp|\.partial)?")
_RANK_HIDDEN = re.compile(r"\.r\d+\.bin")  # a rank's own hidden-state file of a run on several ranks
_kill_counts: dict[str, int] = {}


def killpoint(name: str) -> None:
    """Test hook: signal this process at a named point when WANDA_STREAM_KILL_AT=name[:k[:SIG[:DELAY]]] says so.

    The k-th time the point is reached (default the first) the process sends itself SIG (KILL by
    default; TERM or INT exercise the clean-stop path at an exact point instead of a racy moment),
    after sleeping DELAY seconds: a delay on the writer thread lets the main thread run ahead to
    where it waits for the write, the moment an ordering bug would record unwritten work as done.
    """
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, rest = rest.partition(":")
    sig, _, delay = rest.partition(":")
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] == int(nth or 1):
        time.sleep(float(delay or 0))
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


@dataclass
class RunState:
    """Progress of a run; saved after every completed block."""

    next_block: int = 0
    stage: str = "blocks"
    blocks: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"next_block": self.next_block, "stage": self.stage, "blocks": self.blocks, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "RunState":
        return cls(d["next_block"], d["stage"], list(d["blocks"]), dict(d.get("extra", {})))


class WorkDir:
    """The work directory of one run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    def foreign_files(self) -> list[str]:
        """Names in the directory that no run writes: a sign that --work-dir points at someone's data.

        The work dir is deleted after success and by --overwrite, so it must hold nothing else.
        """
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not _OWN_NAME.fullmatch(p.name))

    def file(self, name: str) -> Path:
        return self.path / name

    def hidden_file(self, stream: str, block: int, rank_suffix: str = "") -> Path:
        """Stream `stream`'s hidden states entering `block` (with `rank_suffix`: one rank's share of them)."""
        return self.path / f"{stream}_{block:05d}{rank_suffix}.bin"

    def spill_file(self, name: str, block: int, rank_suffix: str = "") -> Path:
        """Scratch of block `block`'s pass `name` (a stream's, or 'dense'), while the block runs. Dashes, not
        underscores: `block_inputs` must never take it for a stream's states."""
        return self.path / f"spill-{name}-{block:05d}{rank_suffix}.bin"

    def block_inputs(self, block: int, rank_suffix: str = "") -> list[Path]:
        """Every stream's hidden-state file entering `block` (of the rank with `rank_suffix`)."""
        return sorted(self.path.glob(f"*_{block:05d}{rank_suffix}.bin"))

    def rank_note(self, rank: int) -> Path:
        """Where rank `rank` of a run on several ranks notes its last finished block (for `status`)."""
        return self.path / f"rank{rank}.json"

    def stale(self, rank: int, rank_suffix: str, keep: set[str]) -> list[Path]:
        """What rank `rank` deletes before it (re)starts: its half-written hidden states, its own that
        are not in `keep`, its half-written progress note; rank 0 also the run's other temporaries.

        Never another rank's hidden states or progress note: that rank may be writing them now.
        """
        note_tmp = self.rank_note(rank).name + ".tmp"
        found = []
        for p in self.path.iterdir():
            name = p.name.removesuffix(".partial")
            if name.endswith(".bin") and (not rank_suffix or name.endswith(f"{rank_suffix}.bin")):
                if p.name != name or name not in keep:
                    found.append(p)
            elif p.name == note_tmp or (rank == 0 and (
                    (p.suffix == ".tmp" and not p.name.startswith("rank"))
                    or (p.name != name and not _RANK_HIDDEN.search(name)))):
                found.append(p)
        return found

    def lock(self) -> "RunLock":
        """Hold the run's lock for the life of this process; refuse if another process holds it.

        Two processes on one run (a requeued job while the old one still finishes, a double submit)
        would delete each other's half-written files. flock is released by the kernel on any exit,
        SIGKILL included, so a crash never leaves a stale lock behind. Taken before anything of the
        run is written or deleted.
        """
        foreign = self.foreign_files()
        if foreign:
            raise InputError(
                f"--work-dir {self.path}: holds files no run wrote ({', '.join(foreign[:3])}); the work dir is "
                "deleted after the run, so choose an empty or new directory"
            )
        created = [d for d in [self.path, *self.path.parents] if not d.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_FILE
        # A `status` probe holds a shared lock for microseconds: retry briefly before calling it busy.
        for attempt in range(LOCK_TRIES):
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                if attempt == LOCK_TRIES - 1:
                    raise self._busy(holder) from None
                time.sleep(0.05)
                continue
            if _same_file(f, path):
                break
            # The holder removed the work dir (a finished run) after we opened the file: the lock
            # we got is on a deleted file that no later process would see; take the current one.
            f.close()
            self.path.mkdir(parents=True, exist_ok=True)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        return RunLock(f, path, created)

    def locked_by(self) -> str | None:
        """The pid of the process working on this run, or None; reads only, so `status` may call it."""
        try:
            f = open(self.path / LOCK_FILE)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "unknown"
        return None

    def clear(self) -> None:
        """Delete the run's files (--overwrite), keeping the lock file this process holds."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():  # only the run's own files: foreign_files() refused any other
            if p.name != LOCK_FILE:
                p.unlink()

    def _busy(self, holder: str) -> InputError:
        return InputError(
            f"{self.path}: another wanda-stream process (pid {holder}) is working on this run; "
            "wait for it to exit or stop it, then rerun with --resume"
        )

    def load_run(self) -> dict:
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{self.path / RUN_FILE}: unreadable run file ({e}); start over with --overwrite")

    def load_state(self) -> RunState:
        p = self.path / STATE_FILE
        if not p.is_file():
            return RunState()
        try:
            return RunState.from_json(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{p}: unreadable run state ({e}); start over with --overwrite")

    def create(self, cfg: RunConfig, model_fp: dict[str, Any], card: CardFacts | None = None) -> None:
        """Start a run: the configuration, input fingerprint and model-card facts, written once.

        The card's facts (base model, name, command line) are kept from the start so that a resumed run,
        however its command was spelled, writes the same card.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / RUN_FILE, {"config": cfg.to_json(), "model_fingerprint": model_fp,
                                                 "card": card or {}})

    def save_state(self, state: RunState) -> None:
        """Record progress (atomically: a crash leaves the old state or the new one)."""
        atomic_write_json(self.path / STATE_FILE, state.to_json())

    def discard_if_unstarted(self, output_dir: Path) -> None:
        """Remove a run that failed before doing anything, so the corrected command starts afresh.

        Without this, a typo in --calib would leave a run that only --overwrite could clear.
        """
        if (self.path / STATE_FILE).exists() or (self.path / TOKENS_FILE).exists():
            return
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            output_dir.rmdir()  # only when empty: it was created for this run
        except OSError:
            pass


def _same_file(f: IO[str], path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLock:
    """The held lock of a run, and the directories taking it created."""

    def __init__(self, f: IO[str], path: Path, created: list[Path]) -> None:
        self.file = f
        self.path = path
        self.created = created

    def release(self) -> None:
        self.file.close()

    def release_unused(self) -> None:
        """Release, removing the lock file and the directories taking it created when no run was started.

        A refused command (a typo, a missing --resume) must leave nothing behind. The file is removed
        while still locked: a process waiting on it then sees it gone and takes a fresh one.
        """
        work = self.path.parent
        if work in self.created and work.is_dir() and [p.name for p in work.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            for d in self.created:  # deepest first
                try:
                    d.rmdir()
                except OSError:
                    break
        self.release()


def checkpoint_fingerprint(ckpt: Checkpoint) -> dict[str, Any]:
    """What identifies the input checkpoint: a digest plus, per file, its size and header hash.

    The per-file part lets a refusal name the file that changed, not just say that something did.
    """
    files = {
        name: {"size": (ckpt.root / name).stat().st_size,
               "header_sha256": hashlib.sha256(json.dumps(ckpt.headers[name], sort_keys=True).encode()).hexdigest()}
        for name in ckpt.files
    }
    files["config.json"] = {"size": (ckpt.root / "config.json").stat().st_size,
                            "sha256": hashlib.sha256((ckpt.root / "config.json").read_bytes()).hexdigest()}
    return {"sha256": ckpt.fingerprint(), "files": files}


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two checkpoint fingerprints, file by file."""
    a, b = old.get("files", {}), new.get("files", {})
    out = [f"{n} is missing" for n in sorted(set(a) - set(b))]
    out += [f"{n} is new" for n in sorted(set(b) - set(a))]
    for n in sorted(set(a) & set(b)):
        if a[n].get("size") != b[n].get("size"):
            out.append(f"{n} size {a[n].get('size')} -> {b[n].get('size')} bytes")
        elif a[n] != b[n]:
            out.append(f"{n} {'content' if n == 'config.json' else 'safetensors header'} changed")
    if not out and old.get("sha256") != new.get("sha256"):
        out.append("the file list or headers changed")
    return out


def check_same_run(saved: dict, cfg: RunConfig, model_fp: dict[str, Any], where: Path) -> None:
    """Refuse to resume a run whose configuration or input checkpoint changed, naming what differs."""
    try:
        old = RunConfig.from_json(saved["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{where / RUN_FILE}: unreadable run file ({e}); start over with --overwrite") from None
    if old.world_size != cfg.world_size:
        raise InputError(
            f"{where}: this run was started on {old.world_size} rank(s) and is resumed on {cfg.world_size}; each rank "
            f"keeps its own share of the hidden states, so resume it on {old.world_size} (torchrun --nproc-per-node), "
            "or --overwrite to start over")
    diffs = old.differences(cfg)
    if diffs:
        raise InputError(
            f"{where}: holds a run with a different configuration ({'; '.join(diffs)}); "
            "use the original arguments, or --overwrite to start over"
        )
    saved_fp = saved.get("model_fingerprint")
    if not isinstance(saved_fp, dict) or saved_fp.get("sha256") != model_fp.get("sha256"):
        what = fingerprint_differences(saved_fp, model_fp) if isinstance(saved_fp, dict) else ["unknown"]
        raise InputError(
            f"{where}: the input checkpoint {cfg.model_dir} changed since this run started ({'; '.join(what)}); "
            "restore it, or --overwrite to start over"
        )


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to stop at the next safe point."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def resume_command(cfg: RunConfig) -> str:
    """The command line that continues this run, rebuilt from its saved configuration."""
    import shlex

    from wanda_stream.methods import dataclass_flags
    from wanda_stream.methods.profiles import Owl

    args = ["wanda-stream", "prune", cfg.model_dir, cfg.output_dir]
    if cfg.nm is None:
        args += ["--sparsity", repr(cfg.sparsity)]
    else:
        args += ["--pattern", cfg.pattern]
    args += ["--method", cfg.method]
    args += _shrink_args(cfg)
    options = [(dataclass_flags(type(cfg.pruning_method)), cfg.method_options)]
    if cfg.owl is not None:
        args += ["--sparsity-profile", cfg.sparsity_profile]
        options.append((dataclass_flags(Owl), cfg.profile_options))
    if cfg.reconstruct:
        from wanda_stream.methods.reconstruct import Reconstruct

        args += ["--reconstruct"]
        options.append((dataclass_flags(Reconstruct), cfg.reconstruct))
    for flags, values in options:
        for flag, f in flags.items():
            args += [flag, repr(values[f.name])]
    # All of them even for magnitude: they are part of the saved configuration a resume must match.
    args += ["--calib", cfg.calib, "--nsamples", str(cfg.nsamples), "--seqlen", str(cfg.seqlen), "--seed", str(cfg.seed)]
    if cfg.calib_field:
        args += ["--calib-field", cfg.calib_field]
    if cfg.chat_template != "auto":
        args += ["--chat-template", cfg.chat_template]
    if cfg.eval_data:
        args += ["--eval-data", cfg.eval_data]
        if cfg.eval_windows is not None:
            args += ["--eval-windows", str(cfg.eval_windows)]
        if cfg.eval_seqlen is not None:
            args += ["--eval-seqlen", str(cfg.eval_seqlen)]
    args += _task_args(cfg)
    if Path(cfg.work_dir) != Path(cfg.output_dir) / ".wanda-stream":
        args += ["--work-dir", cfg.work_dir]
    if cfg.keep_work_dir:
        args += ["--keep-work-dir"]
    args += ["--device", cfg.device, "--compute-dtype", cfg.compute_dtype, "--batch-size", str(cfg.batch_size),
             "--resume"]
    if cfg.world_size > 1:  # the same torchrun launch as the run's (with its node and rendezvous flags)
        return f"torchrun <the run's launch flags, {cfg.world_size} ranks in all> -m wanda_stream {shlex.join(args[1:])}"
    return shlex.join(args)


def profile_blocks_done(record: dict[str, Any]) -> int:
    """Blocks the pass over the dense model has finished, from its record in the run state (OWL's outlier
    ratios, or the blocks' influence for --drop-blocks)."""
    return len(record["outlier_ratios"] if "outlier_ratios" in record else record["influence"])


def _shrink_args(cfg: RunConfig) -> list[str]:
    """The structured-pruning flags of a run's configuration (none when it has none)."""
    spec = cfg.shrink
    if not spec.active:
        return []
    args = ["--drop-blocks", str(spec.drop_blocks), "--block-score", spec.block_score, "--drop-ffn",
            repr(spec.drop_ffn), "--drop-heads", repr(spec.drop_heads)]
    args += [] if spec.refit else ["--no-refit"]
    return args + (["--drop-experts", repr(spec.drop_experts)] if spec.drop_experts else [])


def _task_args(cfg: RunConfig) -> list[str]:
    """The --eval-tasks flags of a run's configuration."""
    if not cfg.eval_tasks:
        return []
    flags = {"--eval-tasks": cfg.eval_tasks, "--eval-include-path": cfg.eval_include_path or None,
             "--eval-num-fewshot": cfg.eval_num_fewshot, "--eval-limit": cfg.eval_limit}
    return [arg for flag, value in flags.items() if value is not None for arg in (flag, str(value))]
