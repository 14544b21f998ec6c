"""Run state in the work directory: what run this is, how far it got, and stopping cleanly.

Files (every change is a temp file, fsync and rename, so a crash leaves the old or the new):
  run.json    the configuration and the input checkpoint's fingerprint (written once)
  state.json  next block to do, per-block records, and the stage ('blocks', 'done')
  tokens.safetensors, calib_*.bin / eval_*.bin   token windows and hidden states
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from wanda_stream.checkpoint import atomic_write_json
from wanda_stream.config import RunConfig
from wanda_stream.errors import InputError

RUN_FILE = "run.json"
STATE_FILE = "state.json"
REPORT_NAME = "wanda_stream.json"
EX_TEMPFAIL = 75
KILL_ENV = "WANDA_STREAM_KILL_AT"

_kill_counts: dict[str, int] = {}


def killpoint(name: str) -> None:
    """Test hook: SIGKILL this process at the named point when WANDA_STREAM_KILL_AT=name[:k] says so."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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

    def file(self, name: str) -> Path:
        return self.path / name

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

    def create(self, cfg: RunConfig, model_fp: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / RUN_FILE, {"config": cfg.to_json(), "model_fingerprint": model_fp})

    def save_state(self, state: RunState) -> None:
        atomic_write_json(self.path / STATE_FILE, state.to_json())


def check_same_run(saved: dict, cfg: RunConfig, model_fp: str, where: Path) -> None:
    """Refuse to resume a run whose configuration or input checkpoint changed, naming what differs."""
    old = RunConfig.from_json(saved["config"])
    diffs = old.differences(cfg)
    if diffs:
        raise InputError(
            f"{where}: holds a run with a different configuration ({'; '.join(diffs)}); "
            "use the original arguments, or --overwrite to start over"
        )
    if saved.get("model_fingerprint") != model_fp:
        raise InputError(
            f"{where}: the input checkpoint {cfg.model_dir} changed since this run started (files, sizes or headers "
            "differ); restore it, or --overwrite to start over"
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
