"""Sizing a run to the machine: sizes in flags, the micro-batch of hidden states, the context limit."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import PretrainedConfig

from wanda_stream.errors import InputError
from wanda_stream.model.families import STRUCTURE, Structure

MAX_AUTO_BATCH = 8
DEFAULT_SEQLEN = 2048  # the Wanda paper's window, cut to the model's context where that is shorter
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'2GB', '512MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].upper() not in UNITS:
        raise InputError(f"{flag} '{text}': use a size such as 2GB, 512MiB or a number of bytes")
    return int(float(m[1]) * UNITS[m[2].upper()])


def window_bytes(config: PretrainedConfig, seqlen: int, dtype: torch.dtype, streamed: bool = False) -> int:
    """Rough activation memory of one window through one block (states, MLP, attention scores, and the
    stacked experts' values where a family's whole MoE block runs every expert on every token; not when the
    MoE blocks stream their experts, `streamed`: a streamed Llama 4 block copies its inputs once, not once
    per expert; every MoE block of a model is one size, so they all stream or none does)."""
    c = config.get_text_config()
    el = torch.empty(0, dtype=dtype).element_size()
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    heads = getattr(c, "num_attention_heads", 1)
    stacked = 0 if streamed else _stacked_values(c)
    return seqlen * (8 * c.hidden_size + 3 * inter + stacked) * el + heads * seqlen * seqlen * 4


def _stacked_values(c: PretrainedConfig) -> int:
    """Values per token that a whole MoE block holds at once when its experts module takes every expert's
    inputs stacked (`Experts.stacked`, Llama 4): per expert the inputs twice (copied, then scaled), the
    gate/up outputs, the activation and its product with up, and the expert's output. 0 for other families."""
    experts = STRUCTURE.get(getattr(c, "model_type", ""), Structure()).experts
    if experts is None or not experts.stacked:
        return 0
    return int(getattr(c, experts.count_key)) * (3 * c.hidden_size + 4 * c.intermediate_size)


def auto_batch(config: PretrainedConfig, seqlen: int, dtype: torch.dtype, n: int, device: str,
               batch_size: int | None = None, budget: int | None = None, ranks: int = 1, streamed: bool = False) -> int:
    """Windows per micro-batch: `batch_size` when given, else as many as `budget` bytes (default: an
    eighth of the free RAM, and a quarter of the free GPU memory on CUDA) hold, at most MAX_AUTO_BATCH,
    and few enough that each of `ranks` ranks gets at least one micro-batch of the `n` windows; `streamed`:
    as window_bytes."""
    if batch_size is not None:
        if batch_size <= 0:
            raise InputError(f"--batch-size {batch_size}: must be a positive integer")
        return batch_size
    if budget is None:
        budget = psutil.virtual_memory().available // 8
        if device.startswith("cuda"):
            # The micro-batch is computed on the GPU: its free memory (less room for a block's
            # weights and the allocator's slack) bounds it as well as the host's.
            budget = min(budget, torch.cuda.mem_get_info(torch.device(device))[0] // 4)
    return max(1, min(MAX_AUTO_BATCH, n // ranks, budget // window_bytes(config, seqlen, dtype, streamed)))


def resident_states_bytes(streams: list[tuple[int, int]], hidden: int, dtype: torch.dtype) -> int:
    """Memory a run's hidden states take when held in memory: per stream of (windows, seqlen), two
    sets (a block's inputs and its outputs)."""
    el = torch.empty(0, dtype=dtype).element_size()
    return 2 * sum(n * seqlen * hidden * el for n, seqlen in streams)


def activation_budgets(device: str, budget: int | None = None, ranks_per_node: int = 1) -> dict[str, int]:
    """The activation budget of each memory a run may keep activations in: "host" (RAM, page-locked on
    CUDA hosts) and, on CUDA, "device" (GPU memory).

    `budget` bytes (--max-activation-memory) for each when given, else a quarter of the free GPU memory
    for the device and an eighth of the available RAM (shared by the node's ranks) for the host.
    """
    out = {"host": budget if budget is not None else psutil.virtual_memory().available // 8 // ranks_per_node}
    if device.startswith("cuda"):
        out["device"] = budget if budget is not None else torch.cuda.mem_get_info(torch.device(device))[0] // 4
    return out


def place(need: int, activations: int, budgets: dict[str, int], taken: dict[str, int] | None = None) -> str:
    """Where `need` bytes of activations go under `budgets` (see activation_budgets): "device" when there is
    one and they fit it beside what the micro-batch's activations (`activations` bytes) take there, else
    "host" when they fit its budget (beside the activations too on a CPU run, where those live), else
    "disk". `taken`: bytes of each memory's budget already given to something else."""
    taken = taken or {}
    if "device" in budgets and need + activations + taken.get("device", 0) <= budgets["device"]:
        return "device"
    on_host = need + taken.get("host", 0) + (0 if "device" in budgets else activations)
    return "host" if on_host <= budgets["host"] else "disk"


# What the disk checks call a streamed block's per-token buffers when they go to the work dir.
BUFFERS_ON_DISK = "a streamed block's per-token buffers (over what the activation budget leaves them in memory)"


@dataclass(frozen=True)
class MemoryPlan:
    """Where one rank keeps its activations between blocks (see memory_plan).

    `states`: the hidden states' place, "device" (CUDA memory), "host" (RAM, page-locked on CUDA hosts) or
    "disk" (read back from their files every block); `resident_bytes`: what they take there (0 on disk).
    `buffers`: where a block streaming its experts keeps its per-token buffers, "device", "host" or "disk"
    (scratch files in the work dir, storage/spill.py); `buffers_bytes`: their size (0 when no block streams).
    """

    states: str = "disk"
    resident_bytes: int = 0
    buffers: str = "disk"
    buffers_bytes: int = 0


def memory_plan(streams: Sequence[tuple[str, int, int]], hidden: int, dtype: torch.dtype, *,
                config: PretrainedConfig, batch_size: int, seqlen: int, budgets: dict[str, int], runs: int = 1,
                states_on_disk: bool = False, calibration: bool = True, streamed: bool = False) -> MemoryPlan:
    """Where a rank keeps the hidden states of its `streams` (name, windows, seqlen: its share of each) and
    a streamed block's per-token buffers, under `budgets` (activation_budgets). The run decides with it from
    the windows it holds, the preflight from the config's (commands.check_resources): one rule for both.

    The states go where they fit beside what the micro-batch's activations (`batch_size` windows of the
    longest stream's length, `seqlen` when there is none) take on that memory, the device first; with
    `states_on_disk`, or nothing to keep, on disk. The `runs` of a sweep keep their states side by side in
    one process, so each run's states get a `runs`-th of a budget; their blocks run one at a time, so a
    streamed block's buffers (every calibration token twice, dense and pruned, every other stream's once)
    go where they fit beside all runs' states kept in that memory. `calibration`: whether the "calib"
    stream runs through the blocks (RunConfig.needs_calibration); without it a "calib" stream counts for nothing.
    """
    kept = [(name, n, s) for name, n, s in streams if name != "calib" or calibration]
    resident = resident_states_bytes([(n, s) for _, n, s in kept], hidden, dtype)
    activations = batch_size * window_bytes(config, max((s for _, _, s in kept), default=seqlen), dtype, streamed)
    per_run = {memory: b // runs for memory, b in budgets.items()}
    states = "disk" if states_on_disk or not kept else place(resident, activations, per_run)
    resident = resident if states != "disk" else 0
    if not streamed:
        return MemoryPlan(states, resident)
    tokens = sum(n * s * (2 if name == "calib" else 1) for name, n, s in kept)
    buffers = streamed_buffers_bytes(tokens, hidden, dtype)
    where = place(buffers, activations, budgets, {states: runs * resident} if states != "disk" else None)
    return MemoryPlan(states, resident, where, buffers)


def streamed_buffers_bytes(tokens: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes a block streaming its experts keeps for `tokens` tokens of its passes through the core (a
    calibration token counts twice when observed: the dense and the pruned pass): the experts' inputs, the
    core's outputs and the experts' sums, `hidden` values each in `dtype`. The routing's top-k index and
    weights, a few dozen bytes a token against several KiB, are left out."""
    return 3 * tokens * hidden * torch.empty(0, dtype=dtype).element_size()


def check_seqlen(config: PretrainedConfig, seqlen: int, flag: str) -> None:
    """Refuse a window length that is not positive or exceeds the model's context."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if seqlen <= 0:
        raise InputError(f"{flag} {seqlen}: must be a positive integer")
    if limit is not None and seqlen > limit:
        raise InputError(f"{flag} {seqlen}: beyond the model's context of {limit} tokens; use at most {limit}")


def default_seqlen(config: PretrainedConfig) -> int:
    """min(2048, the model's context), as the Wanda paper's code sets it."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(DEFAULT_SEQLEN, limit) if limit else DEFAULT_SEQLEN


def seqlen_note(config: PretrainedConfig) -> str:
    """The line that tells the user which default window length was taken, and why."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return f"--seqlen {default_seqlen(config)} (min of {DEFAULT_SEQLEN} and the model's context of {limit} tokens)"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes in refusals are read by people deciding what to free."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Blocks a rank holds in host memory at once: the one computed on, the next read ahead, the last being written.
HELD_BLOCKS = 3


def pinned_bytes(nbytes: int) -> int:
    """Host memory the CUDA pinned allocator takes for a tensor of `nbytes`: rounded up to a power of
    two (and kept in its cache once freed); nothing for an empty tensor."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def block_host_bytes(tensor_bytes: list[int], device: str, compute_el: int) -> int:
    """Host memory one block's tensors take: pinned (rounded) for a CUDA run; on the CPU with the
    compute-dtype copies of 2-byte weights (`compute_el` bytes per element)."""
    if device.startswith("cuda"):
        return sum(pinned_bytes(n) for n in tensor_bytes)
    return sum(tensor_bytes) * max(1, compute_el // 2)


def host_ram_needed(block_bytes: int, batch: int, seqlen: int, hidden: int, el: int, ranks_per_node: int) -> int:
    """Host RAM the ranks of one node need: HELD_BLOCKS blocks each (`block_bytes`, see block_host_bytes),
    and four micro-batches of hidden states (the input computed on, the next one read ahead, the
    output and the previous output still being written)."""
    return ranks_per_node * (HELD_BLOCKS * block_bytes + batch * 4 * seqlen * hidden * el)


def hidden_states_bytes(windows: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    """Disk a stream of `windows` x `seqlen` tokens holds at its peak: three sets of its hidden states
    (a block's input, its output, and the previous block's input, kept until that block's shard is durable)."""
    return 3 * windows * seqlen * hidden * torch.empty(0, dtype=dtype).element_size()


def check_disk(needs: list[tuple[Path, int, str]],
               fix: str = "free space or choose another --work-dir / output directory") -> None:
    """Refuse, naming the path, both sizes and `fix`, when a file system lacks room for what a run will
    write there: `needs` holds (directory, bytes, what); the needs of directories on one file system add up."""
    anchors = [next((p for p in [path, *path.parents] if p.exists()), Path("/")) for path, _, _ in needs]
    devices = [a.stat().st_dev for a in anchors]
    for (path, _, what), anchor, dev in zip(needs, anchors, devices):
        total = sum(n for (_, n, _), d in zip(needs, devices) if d == dev)
        free = shutil.disk_usage(anchor).free
        if total > free:
            raise InputError(
                f"{path}: needs about {human_bytes(total)} free for {what}, has {human_bytes(free)}; {fix}")

