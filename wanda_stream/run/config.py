"""The run configuration: one frozen dataclass, validated once, saved with the run."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from wanda_stream import methods
from wanda_stream.errors import InputError
from wanda_stream.methods import Method, Stat
from wanda_stream.methods.profiles import PROFILES, Owl
from wanda_stream.methods.reconstruct import Reconstruct
from wanda_stream.model.shrink import ShrinkSpec

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields that do not change the result: they may differ between a run and its resumption.
NON_RESULT_FIELDS = ("work_dir", "keep_work_dir", "prefetch", "world_size", "activation_budget", "states_on_disk",
                     "expert_group")
LATER_FIELDS = {"chat_template": "auto", "calib_field": None, "save_dtype": None, "drop_blocks": 0, "block_score": "bi",
                "drop_ffn": 0.0, "drop_heads": 0.0, "refit": True, "drop_experts": 0.0, "reconstruct": {}}


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise InputError(f"--pattern '{pattern}': use unstructured or N:M with 0 < N < M, e.g. 2:4")
    return int(m[1]), int(m[2])


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; checks that a named CUDA device exists."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available here; use --device cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise InputError(f"--device '{device}': use auto, cpu, cuda or cuda:N")


def device_type(device: str) -> str:
    """'cuda:1' -> 'cuda': what decides a run's bits (the kernels), unlike the card's index."""
    return device.split(":", 1)[0]


def resolve_compute_dtype(name: str, device: str, checkpoint_dtype: torch.dtype) -> str:
    """'auto' -> the checkpoint's dtype on GPU, float32 on CPU; a float16 checkpoint computes in
    bfloat16 on a GPU that has it (float16's range overflows in the activations of some families)."""
    if name == "auto":
        if device == "cpu" or checkpoint_dtype not in DTYPE_NAMES.values():
            return "float32"
        if checkpoint_dtype == torch.float16 and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return next(k for k, v in DTYPE_NAMES.items() if v == checkpoint_dtype)
    if name not in DTYPE_NAMES:
        raise InputError(f"--compute-dtype '{name}': use auto, float32, bfloat16 or float16")
    return name


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pruning run. Paths are absolute strings."""

    model_dir: str
    output_dir: str
    work_dir: str
    sparsity: float = 0.5
    pattern: str = "unstructured"
    method: str = "wanda"
    method_options: dict[str, float | int] = field(default_factory=dict)
    sparsity_profile: str = "uniform"
    profile_options: dict[str, float] = field(default_factory=dict)
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    compute_dtype: str = "float32"
    batch_size: int = 1
    eval_data: str | None = None
    eval_windows: int | None = None
    eval_seqlen: int | None = None
    keep_work_dir: bool = False
    prefetch: bool = True
    activation_budget: int | None = None  # --max-activation-memory in bytes (None: a share of free memory)
    states_on_disk: bool = False  # never hold hidden states in memory between blocks (their files only)
    # Routed experts held at once in a MoE block (--expert-group): 0 whole blocks, None as memory requires.
    expert_group: int | None = None
    world_size: int = 1  # ranks of a torchrun launch: the same output, but a resume needs as many
    calib_fingerprint: str = ""
    eval_fingerprint: str = ""
    chat_template: str = "auto"
    calib_field: str | None = None
    eval_tasks: str = ""  # lm-eval tasks, comma-separated (prune --eval-tasks)
    eval_include_path: str = ""
    eval_num_fewshot: int | None = None
    eval_limit: float | None = None
    save_dtype: str | None = None  # the output's float dtype (None: as stored; dequantized tensors bfloat16)
    # Structured pruning (--drop-blocks, --drop-ffn, --drop-heads, --drop-experts); sparsity 0 then means no
    # masks on top.
    drop_blocks: int = 0
    block_score: str = "bi"
    drop_ffn: float = 0.0
    drop_heads: float = 0.0
    refit: bool = True
    drop_experts: float = 0.0
    # --reconstruct's options, every one recorded (empty: no reconstruction), so that a changed default
    # never changes what a resumed run computes.
    reconstruct: dict[str, float | int] = field(default_factory=dict)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def effective_sparsity(self) -> float:
        nm = self.nm
        return nm[0] / nm[1] if nm else self.sparsity

    @property
    def shrink(self) -> ShrinkSpec:
        """What structured pruning removes (inactive when no --drop-* flag was given)."""
        return ShrinkSpec(self.drop_blocks, self.block_score, self.drop_ffn, self.drop_heads, self.refit,
                          self.drop_experts)

    @property
    def masks(self) -> bool:
        """Whether matrices get unstructured or N:M masks (always, unless structured pruning alone was asked for)."""
        return self.nm is not None or self.sparsity > 0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.compute_dtype]

    @property
    def output_dtype(self) -> torch.dtype | None:
        """--save-dtype as a dtype (None: every tensor as stored, dequantized ones bfloat16)."""
        return DTYPE_NAMES[self.save_dtype] if self.save_dtype else None

    @property
    def pruning_method(self) -> Method[Any]:
        """The method object, with its options."""
        return methods.build(self.method, self.method_options)

    @property
    def owl(self) -> Owl | None:
        """OWL's parameters when the profile is owl, else None."""
        return Owl(**self.profile_options) if self.sparsity_profile == "owl" else None

    @property
    def reconstruction(self) -> Reconstruct | None:
        """--reconstruct's options when it was asked for, else None."""
        return Reconstruct(**self.reconstruct) if self.reconstruct else None

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration windows run through the model: for the method's statistics, the profile's,
        structured pruning's, or the block-output reconstruction's."""
        return self.masks_observe or self.owl is not None or self.shrink.active or bool(self.reconstruct)

    @property
    def masks_observe(self) -> bool:
        """Whether the method's masks need the statistics of the calibration inputs."""
        return self.masks and self.pruning_method.stat is not Stat.NONE

    @property
    def record_field(self) -> str | None:
        """What a calibration record's document is: --calib-field, or whichever it has (None) unless
        --chat-template never rules conversations out."""
        return self.calib_field or ("text" if self.chat_template == "never" else None)

    def validate(self) -> "RunConfig":
        """Raise InputError naming the flag for any invalid value; returns self."""
        nm = parse_pattern(self.pattern)
        self.shrink.check_flags()
        structural_only = self.shrink.active and self.sparsity == 0.0
        if nm is None and not 0.0 < self.sparsity < 1.0 and not structural_only:
            raise InputError(f"--sparsity {self.sparsity}: must be strictly between 0 and 1, e.g. 0.5")
        if not self.masks and self.owl is not None:
            raise InputError("--sparsity-profile owl: shapes the sparsity of masks; add --sparsity (or drop the profile)")
        self.pruning_method.check(nm)
        if self.sparsity_profile not in PROFILES:
            raise InputError(f"--sparsity-profile '{self.sparsity_profile}': use {' or '.join(PROFILES)}")
        if self.owl is not None:
            self.owl.check(self.effective_sparsity, nm)
        for flag, v in (("--nsamples", self.nsamples), ("--seqlen", self.seqlen), ("--batch-size", self.batch_size)):
            if v <= 0:
                raise InputError(f"{flag} {v}: must be a positive integer")
        if self.chat_template not in ("auto", "never"):
            raise InputError(f"--chat-template '{self.chat_template}': use auto or never")
        if self.calib_field not in (None, "text", "messages"):
            raise InputError(f"--calib-field '{self.calib_field}': use text or messages")
        if self.chat_template == "never" and self.calib_field == "messages":
            raise InputError("--calib-field messages needs the chat template; drop --chat-template never")
        if self.save_dtype is not None and self.save_dtype not in DTYPE_NAMES:
            raise InputError(f"--save-dtype '{self.save_dtype}': use {', '.join(DTYPE_NAMES)}")
        if self.reconstruct:
            self.reconstruction.check(self.nsamples)  # type: ignore[union-attr]
        if self.eval_windows is not None and self.eval_windows <= 0:
            raise InputError(f"--eval-windows {self.eval_windows}: must be a positive integer")
        out, model = Path(self.output_dir), Path(self.model_dir)
        if out == model or model in out.parents:
            raise InputError(f"{out}: the output directory must not be the model directory or inside it")
        if out in model.parents:
            raise InputError(f"{out}: the output directory must not contain the model directory")
        # The work dir is deleted after success and by --overwrite: it must never hold the input or
        # the output, or a finished run would delete what it just wrote.
        work = Path(self.work_dir)
        if work == model or model in work.parents or work in model.parents:
            raise InputError(f"--work-dir {work}: must not be, contain or be inside the model directory")
        if work == out or work in out.parents:
            raise InputError(f"--work-dir {work}: must not be or contain the output directory; use a directory "
                             "of its own (default OUTPUT_DIR/.wanda-stream)")
        return self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def result_fields(self) -> dict:
        """The fields that determine the output bytes."""
        # Fields added after runs were made are left out at their defaults: those runs keep their fingerprints.
        out = {k: v for k, v in asdict(self).items()
               if k not in NON_RESULT_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
        # The device type, not the card: a run started on cuda (--device auto) resumes on cuda:1.
        out["device"] = device_type(self.device)
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: "RunConfig") -> list[str]:
        """Result-relevant fields whose values differ, as 'name: old -> new'."""
        a, b = self.result_fields(), other.result_fields()
        keys = [*a, *(k for k in b if k not in a)]
        old, new = ({k: d.get(k, LATER_FIELDS.get(k)) for k in keys} for d in (a, b))
        return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys if old[k] != new[k]]
