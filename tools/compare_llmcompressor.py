#!/usr/bin/env python3
"""Cross-check wanda-stream's Wanda or SparseGPT against a peer implementation: llm-compressor.

`--method wanda` (default) compares with WandaPruningModifier as described below; `--method
sparsegpt` with SparseGPTModifier (sparsity 0.5 or 2:4, dampening_frac 0.01, block_size 128, the
same targets and ignore list, the same oneshot settings). For SparseGPT the script compares masks
and the weights both sides kept (SparseGPT updates them), the drift of the two sides' Hessian
diagonals (the peer's captured by wrapping its sparsify_weight, whose dampened Hessian is also
checked to factor: llm-compressor 0.14 silently falls back to the identity when it does not), and
times both prunes with /usr/bin/time -v next to `uptime`. The differences it neutralizes and the
recorded results are in docs/peer_comparison.md, section "SparseGPT".

Not part of the test suite and not run in CI: it needs a second virtual environment with
`llmcompressor` installed (kept apart from the project's, because llmcompressor pins its own
transformers range), and a few CPU-minutes per pattern on SmolLM2-135M.

What it does, per pattern (unstructured 50 % and 2:4 by default):

1. **Our side.** ``wanda-stream prune MODEL OUT --keep-work-dir ...`` (skipped when OUT already
   holds a finished run). The calibration windows it drew (``OUT/.wanda-stream/tokens.safetensors``,
   key ``calib``, ``[nsamples, seqlen]``) are the single source of calibration data for both sides.
2. **Peer side.** This same file, run by the llmcompressor venv's interpreter (``peer`` subcommand),
   loads the model with transformers, wraps exactly those token windows in a plain
   ``torch.utils.data.DataLoader`` (batch 1, sequential sampler, no padding, no truncation, no
   attention mask, no shuffling) and calls ``llmcompressor.oneshot`` with a
   ``WandaPruningModifier``. It saves the pruned model as one ``model.safetensors`` next to a copy
   of the config/tokenizer files, and the per-column activation statistics llm-compressor used
   (captured by wrapping, not copying, its ``sparsify_weight``).
3. **Oracle statistics for our side.** With transformers in the project venv, our pruned model runs
   over the calibration windows; before each (pruned) decoder block runs, the *dense* block runs
   on the same inputs with hooks summing ``x**2`` per input column in float64. These are, by the
   paper's definition, the statistics our masks should have been computed from.
4. **Comparison**, matrix by matrix, of the masks (``weight == 0`` in each output; the SmolLM2
   checkpoint holds 33,483 exact zeros in its decoder linears, which score 0 and are removed by
   both rules; a zero either side kept would look removed, but it is the same zero in both outputs):

   * ``diff``: entries pruned by one side and kept by the other (per matrix, per block, total).
   * self-consistency: each side's mask against an independent float64 re-implementation of the
     paper's rule (score ``|W_ij| * ||X_j||_2``; unstructured: per output row remove the
     ``floor(in * s)`` lowest, stable sort; N:M: the N lowest of every M consecutive inputs),
     fed our oracle statistics (our side) or the statistics llm-compressor itself used (peer).
   * near-tie classification of every differing entry: its score's relative distance to the
     pruning boundary of its row (unstructured) or group (N:M), under our statistics. If both
     sides apply the paper's rule to statistics that differ by a relative factor of at most
     ``d`` per column (``drift``, measured per matrix between our oracle statistics and the
     peer's), a flip is only possible for entries within about ``2 d`` of the boundary; an entry
     further away than ``rtol + 2.5 d`` means one side does not follow the rule.
   * perplexity (``wanda-stream eval``, same evaluator for dense, ours and peer) when
     ``--eval-windows`` > 0.

   The run exits 1 when a differing entry is not a near-tie, when either side is not
   self-consistent beyond near-ties, when the statistics of block 0 (identical inputs on both
   sides) drift by more than ``--block0-drift`` or either side touched a tensor it should not.

Semantic differences between llm-compressor 0.14 and the paper/wanda-stream, and how they are
neutralized here (read from llmcompressor/modifiers/pruning/wanda/{base,wanda_sparsify}.py,
.../sparsegpt/sgpt_base.py, pipelines/sequential/pipeline.py, datasets/utils.py):

* **Which modules.** The modifier's default ``targets=["Linear"]`` matches every nn.Linear in the
  model, ``lm_head`` included (it only logs a warning); with SmolLM2's tied embeddings that would
  also prune the token embeddings. wanda-stream prunes only the linears inside decoder blocks.
  Neutralized: ``ignore=["re:.*lm_head"]``; the script checks that both sides pruned the same set
  of matrices and left every other tensor bit-identical.
* **Activation statistics.** llm-compressor keeps a running *mean over samples* (sequences, not
  tokens) of the per-column squared L2 norm, in float32 (``WANDA_PRECISION``): every batch
  rescales the accumulator by ``n / (n + b)`` and adds ``||X_batch||^2 / (n + b)``. wanda-stream
  sums ``x**2`` over all tokens in float64. A per-matrix constant factor leaves every row's order
  unchanged; only float32 rounding differs (near-ties). The captured peer statistics are
  multiplied back by llm-compressor's own sample count before they are compared with ours.
* **Score and unstructured mask.** Same as the paper: ``|W| * sqrt(S)`` in float32, per row,
  ``torch.sort(stable=True)``, ``int(in * sparsity)`` lowest removed. No difference.
* **N:M mask.** llm-compressor takes ``torch.topk(largest=False)`` over each group of M, which is
  not stable: exactly equal scores inside a group may be broken differently from the stable sort
  (lower index first) that wanda-stream uses. Only exact ties are affected; counted as near-ties.
* **Pipeline / order.** ``oneshot``'s default pipeline is ``independent``, which infers
  ``sequential`` for Wanda; the script passes ``pipeline="sequential"`` explicitly, with
  ``sequential_targets=["LlamaDecoderLayer"]`` (one subgraph per decoder block,
  ``sequential_targets_per_subgraph=1``) and ``propagate_error=True``: per block, every batch
  runs through the dense block with the calibration hooks (statistics of all linears of the
  block from the dense block, none pruned in between), then all the block's linears are pruned
  (``sequential_epoch_end``), then the pruned block runs again to produce the next block's
  inputs. That is the paper's (and wanda-stream's) order. Note that llm-compressor does *not*
  prune sequentially within a block.
* **Data.** ``oneshot`` would by default shuffle (``RandomSampler``), cap at 512 samples and
  truncate/pad in its collator. A ready ``DataLoader`` is used as is, so the script builds one
  over our windows (sequential order, batch 1, tensors of exactly ``seqlen`` tokens, no
  attention mask — as wanda-stream, which runs the blocks with the model's own causal mask) and
  also sets ``shuffle_calibration_samples=False`` and ``num_calibration_samples=nsamples``.
  No BOS is prepended by either side: the windows are fed as they are.
* **Numerics of the forward pass.** llm-compressor forces eager attention during calibration
  (``use_eager_attention``) and runs batch 1; wanda-stream uses the model's default (SDPA) with
  micro-batches of several windows. Both in float32 on CPU here; the hidden states differ in the
  last bits, which only matters for near-ties. Once one near-tie has flipped in an early block,
  the inputs of later blocks differ a little more between the two sides, so later blocks show
  more (still near-tie) differences: ``drift`` makes this visible per block.

Usage (from the repository root; the project venv runs the orchestrator, the llmcompressor venv
the peer side)::

    python3 -m venv /work/venv-llmc && . /work/venv-llmc/bin/activate
    echo torch==2.13.0 > /tmp/c.txt && pip install -c /tmp/c.txt llmcompressor
    HF_HUB_OFFLINE=1 .venv/bin/python tools/compare_llmcompressor.py \\
        --model /work/models/smollm2-135m --calib /work/shared/data/wikitext2/wiki.valid.tokens \\
        --nsamples 32 --seqlen 512 --seed 0 --workdir /tmp/peer \\
        --llmc-python /work/venv-llmc/bin/python \\
        --eval-data /work/shared/data/wikitext2/wiki.test.raw --eval-windows 16

Runs are reused from ``--workdir`` (our output when it holds wanda_stream.json, the peer's when it
holds peer_info.json, oracle statistics and perplexities when cached); the comparison itself is
recomputed every time. Results of the recorded run: docs/peer_comparison.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BLOCK_PREFIX = "model.layers."
PATTERNS = {"unstructured": None, "2:4": (2, 4)}
METHODS = ("wanda", "sparsegpt")
TIME = "/usr/bin/time"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def tensor_sha256(t: Any) -> str:
    """SHA-256 of a token tensor's int64 bytes: proves both sides calibrated on the same windows."""
    import hashlib

    import torch

    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ============================================================================================
# Peer side: runs inside the llmcompressor venv. Imports nothing from wanda_stream.
# ============================================================================================

def peer_modifier(method: str, pattern: str) -> tuple[Any, Any]:
    """llm-compressor's modifier for `method` and the module whose `sparsify_weight` it calls.

    Both get the same targets: every Linear inside the model except the (tied) lm_head.
    SparseGPT: the paper's (and wanda-stream's) defaults, 1 % dampening, column blocks of 128.
    """
    nm = PATTERNS[pattern]
    common: dict[str, Any] = dict(sparsity=0.5, mask_structure=f"{nm[0]}:{nm[1]}" if nm else "0:0",
                                  targets=["Linear"], ignore=["re:.*lm_head"])
    if method == "sparsegpt":
        import llmcompressor.modifiers.pruning.sparsegpt.base as sgpt_base
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(**common, dampening_frac=0.01, block_size=128), sgpt_base
    import llmcompressor.modifiers.pruning.wanda.base as wanda_base
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    return WandaPruningModifier(**common), wanda_base


def peer_column_sums(method: str, modifier: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The float64 per-column sums of x**2 over all calibration tokens that llm-compressor holds for
    the module being pruned (called with `sparsify_weight`'s keyword arguments), and notes on it.

    Wanda keeps a running mean over samples of ||x_j||^2; SparseGPT a running mean over samples of
    2 X^T X, whose diagonal is 2 sum x_j^2 / samples. Both times the sample count = the plain sum,
    comparable with wanda-stream's. For SparseGPT the notes also say whether the dampened Hessian
    factors: when it does not, llm-compressor silently prunes that matrix with the identity
    (magnitude pruning) where wanda-stream raises the dampening.
    """
    import torch

    module = kwargs["module"]
    count = int(modifier._num_samples[module])
    if method == "wanda":
        return kwargs["row_scalars_dict"][module].detach().to(torch.float64).cpu() * count, {}
    h = kwargs["hessians_dict"][module].detach().to(torch.float64).cpu()
    diag = torch.diagonal(h).clone()
    sums = diag * count / 2
    # The same dampening and first factorization as sgpt_sparsify.sparsify_weight, on a copy.
    hd = kwargs["hessians_dict"][module].detach().clone()
    d = torch.diagonal(hd)
    d[d == 0] = 1
    d += kwargs["dampening_frac"] * torch.mean(d)
    info = int(torch.linalg.cholesky_ex(hd).info)
    return sums, {"dead_inputs": int((diag == 0).sum()), "cholesky_ok": info == 0}


def run_peer(model_dir: Path, tokens_file: Path, pattern: str, out_dir: Path, method: str = "wanda") -> None:
    """Prune `model_dir` with llm-compressor's WandaPruningModifier or SparseGPTModifier on the
    windows in `tokens_file`.

    Writes `out_dir/model.safetensors` (the whole pruned model, tied head dropped), the side files,
    `peer_stats.safetensors` (per-module float64 sums of x**2 over all calibration tokens, as
    llm-compressor accumulated them) and `peer_info.json` (versions, settings, pruned modules).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader, Dataset, SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot

    calib = load_file(str(tokens_file))["calib"].to(torch.long)
    tokens_sha256 = tensor_sha256(calib)
    nsamples, seqlen = calib.shape

    class Windows(Dataset):
        """Our calibration windows, one sample each, exactly `seqlen` tokens."""

        def __len__(self) -> int:
            return nsamples

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": calib[i]}

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack([it["input_ids"] for it in items])}

    loader = DataLoader(Windows(), batch_size=1, sampler=SequentialSampler(range(nsamples)),
                        collate_fn=collate)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    names = {m: n for n, m in model.named_modules()}
    layer_cls = type(model.model.layers[0]).__name__

    modifier, base = peer_modifier(method, pattern)

    # Record the statistics llm-compressor prunes with: wrap (not copy) its sparsify_weight.
    stats: dict[str, torch.Tensor] = {}
    samples: dict[str, int] = {}
    notes: dict[str, dict[str, Any]] = {}
    original = base.sparsify_weight

    def recording_sparsify_weight(**kwargs: Any) -> Any:
        module = kwargs["module"]
        name = names.get(module, modifier._module_names.get(module, "?"))
        samples[name] = int(modifier._num_samples[module])
        stats[name], note = peer_column_sums(method, modifier, kwargs)
        if note:
            notes[name] = note
        return original(**kwargs)

    base.sparsify_weight = recording_sparsify_weight
    settings = dict(
        pipeline="sequential", sequential_targets=[layer_cls], propagate_error=True,
        batch_size=1, num_calibration_samples=nsamples, shuffle_calibration_samples=False,
        max_seq_length=seqlen, pad_to_max_length=False,
    )
    t0 = time.monotonic()
    try:
        model = oneshot(model=model, processor=tokenizer, dataset=loader, recipe=[modifier], **settings)
    finally:
        base.sparsify_weight = original
    seconds = time.monotonic() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    keep = {}
    with open(model_dir / "model.safetensors.index.json") as f:
        wanted = set(json.load(f)["weight_map"])
    for k, v in state.items():
        if k in wanted:
            keep[k] = v.detach().to("cpu").contiguous().clone()
    missing = sorted(wanted - set(keep))
    if missing:
        raise SystemExit(f"peer: pruned model lacks tensors {missing[:5]}")
    save_file(keep, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out_dir / "peer_stats.safetensors"))

    import compressed_tensors
    import transformers
    info = {
        "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "compressed_tensors": compressed_tensors.__version__},
        "method": method, "pattern": pattern, "nsamples": nsamples, "seqlen": seqlen, "tokens_sha256": tokens_sha256,
        "modifier": {"class": type(modifier).__name__, **modifier.model_dump(
            include={"sparsity", "mask_structure", "targets", "ignore", "dampening_frac", "block_size"})},
        "hessian_notes": {k: v for k, v in notes.items() if v != {"dead_inputs": 0, "cholesky_ok": True}},
        "oneshot": settings, "pruned_modules": sorted(stats), "samples_per_module": sorted(set(samples.values())),
        "seconds": round(seconds, 1),
    }
    (out_dir / "peer_info.json").write_text(json.dumps(info, indent=2))


# ============================================================================================
# Orchestrator and comparison: run with the project venv's interpreter.
# ============================================================================================

def uptime() -> str:
    """`uptime`'s line (the load averages), for the record next to every timing."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timing_files(side_dir: Path) -> tuple[Path, Path]:
    """Where the `/usr/bin/time -v` report and the `uptime` lines of the run writing `side_dir` go."""
    return side_dir.parent / f"time_{side_dir.name}.txt", side_dir.parent / f"load_{side_dir.name}.txt"


def run_cmd(cmd: list[str], log: Path, timed: Path | None = None) -> None:
    """Run `cmd` (in the repository root, so that `python -m wanda_stream` is this checkout's) with its
    output appended to `log`; raise SystemExit with the log's tail on failure.

    With `timed` (the output directory the command writes), it runs under `/usr/bin/time -v` when
    that exists, and `uptime` is recorded before and after: the host's load is part of a timing.
    """
    if timed is not None and Path(TIME).is_file():
        time_file, load_file = timing_files(timed)
        load_file.write_text(uptime() + "\n")
        cmd = [TIME, "-v", "-o", str(time_file)] + cmd
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if timed is not None and Path(TIME).is_file():
        with open(load_file, "a") as f:
            f.write(uptime() + "\n")
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n{tail}")


def load_weights(ckpt_dir: Path) -> dict[str, Any]:
    """All tensors of a safetensors checkpoint directory (single file or shards)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        if f.name.startswith("model"):
            out.update(load_file(str(f)))
    return out


def block_linear_keys(weights: dict[str, Any]) -> list[str]:
    """Weight keys of the 2-D matrices inside decoder blocks, in block then name order."""
    keys = [k for k, v in weights.items() if k.startswith(BLOCK_PREFIX) and k.endswith(".weight") and v.dim() == 2]
    return sorted(keys, key=lambda k: (int(k[len(BLOCK_PREFIX):].split(".")[0]), k))


def oracle_stats(model_dir: Path, pruned_dir: Path, tokens: Any, batch: int) -> dict[str, Any]:
    """Per-column float64 sums of x**2 of every block linear's inputs, as the paper defines them.

    The pruned model runs over `tokens`; before each pruned block runs, the dense block runs on the
    same inputs (hidden states and the model's own keyword arguments) with the hooks.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(str(pruned_dir), dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for i, (dl, pl) in enumerate(zip(dense.model.layers, pruned.model.layers)):
        for n, m in dl.named_modules():
            if isinstance(m, torch.nn.Linear):
                key = f"{BLOCK_PREFIX}{i}.{n}.weight"
                sums[key] = torch.zeros(m.in_features, dtype=torch.float64)

                def lin_hook(mod: torch.nn.Module, args: tuple, key: str = key) -> None:
                    x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
                    sums[key] += (x * x).sum(0)

                handles.append(m.register_forward_pre_hook(lin_hook))

        def pre(mod: torch.nn.Module, args: tuple, kwargs: dict, dl: torch.nn.Module = dl) -> None:
            dl(*args, **kwargs)

        handles.append(pl.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            for s in range(0, tokens.shape[0], batch):
                pruned.model(input_ids=tokens[s:s + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


def paper_mask(score: Any, sparsity: float, nm: tuple[int, int] | None) -> Any:
    """The paper's rule on a float64 score [out, in]: True = removed (stable sort, lower index first)."""
    import torch

    rows, cols = score.shape
    if nm:
        n, m = nm
        g = score.reshape(rows, cols // m, m)
        idx = torch.sort(g, dim=2, stable=True).indices[:, :, :n]
        mask = torch.zeros_like(g, dtype=torch.bool)
        mask.scatter_(2, idx, True)
        return mask.reshape(rows, cols)
    k = int(cols * sparsity)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


def boundary_gaps(score: Any, where: Any, sparsity: float, nm: tuple[int, int] | None) -> Any:
    """Relative distance of score[where] to the pruning boundary of its row / N:M group.

    The boundary is the midpoint between the last removed and the first kept score under `score`.
    """
    import torch

    rows, cols = score.shape
    r, c = where.nonzero(as_tuple=True)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    if nm:
        n, m = nm
        srt = torch.sort(score.reshape(rows, cols // m, m), dim=2).values
        mid = (srt[:, :, n - 1] + srt[:, :, n]) / 2
        b = mid[r, c // m]
    else:
        k = int(cols * sparsity)
        srt = torch.sort(score, dim=1).values
        mid = (srt[:, k - 1] + srt[:, k]) / 2
        b = mid[r]
    return (score[r, c] - b).abs() / b.clamp_min(torch.finfo(torch.float64).tiny)


def kept_weight_difference(wo: Any, wp: Any, keep: Any) -> dict[str, float]:
    """Differences of the weights both sides kept (SparseGPT updates them): the largest absolute
    difference, that over the largest kept weight, and the relative Frobenius norm ||wo - wp|| / ||wo||."""
    import torch

    a, b = wo[keep].to(torch.float64), wp[keep].to(torch.float64)
    if a.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "fro_rel": 0.0, "d2": 0.0, "a2": 0.0}
    d = (a - b).abs()
    # d2 / a2: squared norms, so that blocks and the whole model can be summed up exactly.
    return {"max_abs": float(d.max()), "max_rel": float(d.max() / a.abs().max().clamp_min(1e-300)),
            "fro_rel": float(d.norm() / a.norm().clamp_min(1e-300)),
            "d2": float((d * d).sum()), "a2": float((a * a).sum())}


def compare_pattern(
    pattern: str, original: dict[str, Any], ours_dir: Path, peer_dir: Path, ours_stats: dict[str, Any],
    rtol: float, method: str = "wanda",
) -> dict[str, Any]:
    """Matrix-by-matrix comparison of the two sides' masks; returns a JSON-able record.

    Wanda keeps the weights it does not remove, so both sides must leave them bit-identical, and its
    mask is a function of the column statistics alone (self-check and near-tie classification).
    SparseGPT's mask depends on the weights it has already updated, column block by column block, so
    neither applies; instead the weights both sides kept are compared (`kept_weight_difference`).
    The statistics drift is computed for both methods: for SparseGPT it is the drift of the diagonal
    of the two sides' Hessians, i.e. how far apart the inputs each side saw are.
    """
    import torch
    from safetensors.torch import load_file

    nm = PATTERNS[pattern]
    sparsity = nm[0] / nm[1] if nm else 0.5
    ours_w, peer_w = load_weights(ours_dir), load_weights(peer_dir)
    peer_stats = load_file(str(peer_dir / "peer_stats.safetensors"))
    keys = block_linear_keys(original)
    peer_keys = sorted(k + ".weight" if not k.endswith(".weight") else k for k in peer_stats)
    peer_stats = {(k if k.endswith(".weight") else k + ".weight"): v for k, v in peer_stats.items()}
    problems: list[str] = []
    if sorted(keys) != peer_keys:
        problems.append(f"pruned sets differ: only ours {sorted(set(keys) - set(peer_keys))[:5]}, "
                        f"only peer {sorted(set(peer_keys) - set(keys))[:5]}")
    for side, w in (("ours", ours_w), ("peer", peer_w)):
        if set(w) != set(original):
            problems.append(f"{side}: tensor set differs from the input checkpoint")
        for k, v in original.items():
            if k in keys or k not in w:
                continue
            if not torch.equal(w[k], v):
                problems.append(f"{side}: non-block tensor {k} changed")

    rows = []
    for k in keys:
        W = original[k]
        mo, mp = ours_w[k] == 0, peer_w[k] == 0
        rec: dict[str, Any] = {"name": k, "numel": W.numel(), "orig_zeros": int((W == 0).sum())}
        if method == "wanda":
            for side, w, mask in (("ours", ours_w[k], mo), ("peer", peer_w[k], mp)):
                if not torch.equal(w[~mask], W[~mask]):
                    problems.append(f"{side}: kept weights of {k} changed")
        diff = mo ^ mp
        rec["diff"] = int(diff.sum())
        rec["ours_pruned"], rec["peer_pruned"] = int(mo.sum()), int(mp.sum())
        # drift: the largest relative difference between the two sides' column norms.
        ratio = (ours_stats[k] / peer_stats[k].clamp_min(1e-300)).sqrt()
        drift = float((ratio - 1).abs().max())
        rec["drift"] = drift
        if method != "wanda":
            rec["weights"] = kept_weight_difference(ours_w[k], peer_w[k], ~mo & ~mp)
            rows.append(rec)
            continue
        absw = W.to(torch.float64).abs()
        so = absw * ours_stats[k].sqrt().reshape(1, -1)
        sp = absw * peer_stats[k].sqrt().reshape(1, -1)
        # self-consistency: each side's mask against the paper's rule on its own statistics.
        self_o = paper_mask(so, sparsity, nm) ^ mo
        self_p = paper_mask(sp, sparsity, nm) ^ mp
        rec["self_ours"], rec["self_peer"] = int(self_o.sum()), int(self_p.sum())
        g_so = boundary_gaps(so, self_o, sparsity, nm)
        g_sp = boundary_gaps(sp, self_p, sparsity, nm)
        rec["self_ours_max_gap"] = float(g_so.max()) if g_so.numel() else 0.0
        rec["self_peer_max_gap"] = float(g_sp.max()) if g_sp.numel() else 0.0
        # cross: the differing entries' distance to the boundary under our statistics.
        g = boundary_gaps(so, diff, sparsity, nm)
        tol = rtol + 2.5 * drift
        rec["max_gap"] = float(g.max()) if g.numel() else 0.0
        rec["tol"] = tol
        rec["not_near_tie"] = int((g > tol).sum())
        rows.append(rec)
        if rec["self_ours_max_gap"] > rtol:
            problems.append(f"ours: {k} is not the paper's mask of its own statistics "
                            f"({rec['self_ours']} entries, gap up to {rec['self_ours_max_gap']:.2e})")
        if rec["self_peer_max_gap"] > rtol:
            problems.append(f"peer: {k} is not the paper's mask of its own statistics "
                            f"({rec['self_peer']} entries, gap up to {rec['self_peer_max_gap']:.2e})")
        if rec["not_near_tie"]:
            problems.append(f"{k}: {rec['not_near_tie']} differing entries are not near-ties "
                            f"(gap up to {rec['max_gap']:.2e} > tol {tol:.2e})")
    total = sum(r["numel"] for r in rows)
    peer_info = json.loads((peer_dir / "peer_info.json").read_text())
    for name, note in peer_info.get("hessian_notes", {}).items():
        if not note.get("cholesky_ok", True):
            problems.append(f"peer: the Hessian of {name} did not factor; llm-compressor pruned it with the identity")
    return {"method": method, "pattern": pattern, "matrices": rows, "total_weights": total,
            "total_diff": sum(r["diff"] for r in rows), "problems": problems, "peer_info": peer_info}


def perplexity(wanda_stream: list[str], model_dir: Path, data: str, seqlen: int, windows: int, log: Path) -> float:
    """Perplexity by `wanda-stream eval` (the same evaluator for every model compared).

    Cached in `log`'s directory (ppl.json), keyed by model directory, data, seqlen and windows.
    """
    cache_file = log.parent / "ppl.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = f"{model_dir}|{data}|{seqlen}|{windows}"
    if key in cache:
        return float(cache[key])
    cmd = [*wanda_stream, "eval", str(model_dir), "--data", data, "--seqlen", str(seqlen),
           "--max-windows", str(windows), "--device", "cpu", "--json", "--quiet"]
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    with open(log, "a") as f:
        f.write(res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"eval failed: {res.stderr[-2000:]}")
    value = float(json.loads(res.stdout.strip().splitlines()[-1])["perplexity"])
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cache[key] = value
    cache_file.write_text(json.dumps(cache, indent=1))
    return value


def ours_version(runs: dict[str, Path]) -> str:
    """wanda-stream's version and the repository commit its runs came from (dirty: uncommitted changes).

    `runs`: pattern -> our output directory.
    """
    parts = []
    for pattern, ours in runs.items():
        report = ours / "wanda_stream.json"
        if report.is_file():
            v = json.loads(report.read_text()).get("versions", {})
            parts.append(f"{pattern}: wanda_stream {v.get('wanda_stream')} transformers {v.get('transformers')}")
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "wanda_stream"],
                               capture_output=True, text=True).stdout.strip()
        parts.append(f"repository now at {head}{' (wanda_stream/ dirty)' if dirty else ''}")
    except OSError:
        pass
    return "; ".join(parts)


def timing(side_dir: Path) -> dict[str, Any]:
    """The `/usr/bin/time -v` figures of the run that wrote `side_dir` (empty when not timed)."""
    time_file, load_file = timing_files(side_dir)
    # /usr/bin/time creates its file when the command starts and fills it when it ends.
    text = time_file.read_text() if time_file.is_file() else ""
    if "Elapsed" not in text:
        return {"run": side_dir.name}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        fields[key] = value
    h_m_s = [float(x) for x in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
    wall = sum(v * 60 ** i for i, v in enumerate(reversed(h_m_s)))
    loads = [line.split("load average:")[-1].strip() for line in load_file.read_text().splitlines()] \
        if load_file.is_file() else []
    return {"run": side_dir.name, "user_s": float(fields["User time (seconds)"]),
            "sys_s": float(fields["System time (seconds)"]), "wall_s": wall,
            "max_rss_gib": int(fields["Maximum resident set size (kbytes)"]) / 2 ** 20,
            "exit": int(fields.get("Exit status", "0")), "load_before": loads[0] if loads else "?",
            "load_after": loads[1] if len(loads) > 1 else "?",
            "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(time_file.stat().st_mtime))}


def machine() -> str:
    """CPU model, logical CPUs and memory of this host: the context of every timing."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem_kib / 2 ** 20:.1f} GiB RAM"


def timing_lines(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the timed runs (both sides, every pattern), with the host and its load."""
    lines = ["", f"Timing (`/usr/bin/time -v`; machine: {machine()}; now {uptime()}):", "",
             "| run | CPU s (user + sys) | wall s | max RSS GiB | load avg before (1/5/15 min) | after | finished (UTC) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for t in r.get("timing", []):
            if "user_s" not in t:
                lines.append(f"| {t['run']} | not timed (run reused or no {TIME}) | | | | | |")
                continue
            lines.append(f"| {t['run']} | {t['user_s'] + t['sys_s']:.1f} ({t['user_s']:.1f} + {t['sys_s']:.1f}) | "
                         f"{t['wall_s']:.1f} | {t['max_rss_gib']:.2f} | {t['load_before']} | {t['load_after']} | "
                         f"{t['finished_utc']} |")
    return lines


def block_of(key: str) -> int:
    return int(key[len(BLOCK_PREFIX):].split(".")[0])


def _weights_rel(xs: list[dict[str, Any]]) -> float:
    """||ours - peer|| / ||ours|| over the weights both sides kept in the matrices `xs` (SparseGPT)."""
    a2 = sum(x["weights"]["a2"] for x in xs)
    return (sum(x["weights"]["d2"] for x in xs) / a2) ** 0.5 if a2 else 0.0


def _columns(method: str) -> dict[str, list[tuple[str, Any]]]:
    """The method-specific columns of the tables: (header, cell of a list of matrix records).

    Wanda: how far differing entries lie from their row's boundary and each side's self-check;
    SparseGPT: how far the weights both sides kept are apart.
    """
    if method == "wanda":
        return {
            "summary": [("not near-tie", lambda m: sum(x["not_near_tie"] for x in m)),
                        ("self-check ours / peer (entries)",
                         lambda m: f"{sum(x['self_ours'] for x in m)} / {sum(x['self_peer'] for x in m)}")],
            "block": [("max gap", lambda m: f"{max(x['max_gap'] for x in m):.1e}"),
                      ("not near-tie", lambda m: sum(x["not_near_tie"] for x in m))],
            "matrix": [("max gap", lambda m: f"{m[0]['max_gap']:.1e}"), ("tol", lambda m: f"{m[0]['tol']:.1e}"),
                       ("self ours", lambda m: m[0]["self_ours"]), ("self peer", lambda m: m[0]["self_peer"])],
        }
    weight_cols = [("kept weights: max abs diff", lambda m: f"{max(x['weights']['max_abs'] for x in m):.1e}"),
                   ("max abs diff / max abs weight", lambda m: f"{max(x['weights']['max_rel'] for x in m):.1e}"),
                   ("relative L2 diff", lambda m: f"{_weights_rel(m):.1e}")]
    return {"summary": [("block 0 differing", lambda m: sum(x["diff"] for x in m if block_of(x["name"]) == 0)),
                        *weight_cols],
            "block": weight_cols, "matrix": weight_cols}


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def print_tables(results: list[dict[str, Any]], ppl: dict[str, float], verbose: bool) -> str:
    """Print (and return as markdown) the summary, per-block, per-kind, per-matrix and timing tables."""
    lines: list[str] = []
    for r in results:
        m, cols = r["matrices"], _columns(r.get("method", "wanda"))
        lines += _table(
            ["method", "pattern", "differing mask entries", "of weights", "fraction",
             *[h for h, _ in cols["summary"]], "ppl ours", "ppl peer"],
            [[r.get("method", "wanda"), r["pattern"], r["total_diff"], r["total_weights"],
              f"{r['total_diff'] / r['total_weights']:.2e}", *[f(m) for _, f in cols["summary"]],
              f"{ppl.get('ours_' + r['pattern'], float('nan')):.3f}",
              f"{ppl.get('peer_' + r['pattern'], float('nan')):.3f}"]])
    if "dense" in ppl:
        lines.append(f"\nDense perplexity (same evaluator): {ppl['dense']:.3f}")
    for r in results:
        cols = _columns(r.get("method", "wanda"))
        lines += ["", f"Per block, {r['pattern']} (diff = differing mask entries; drift = max relative "
                  "difference of the two sides' column norms ||X_j||, i.e. of their inputs):", ""]
        blocks: dict[int, list[dict[str, Any]]] = {}
        for x in r["matrices"]:
            blocks.setdefault(block_of(x["name"]), []).append(x)
        lines += _table(["block", "diff", "max drift", *[h for h, _ in cols["block"]]],
                        [[b, sum(x["diff"] for x in xs), f"{max(x['drift'] for x in xs):.1e}",
                          *[f(xs) for _, f in cols["block"]]] for b, xs in sorted(blocks.items())])
        kinds: dict[str, list[dict[str, Any]]] = {}
        for x in r["matrices"]:
            kinds.setdefault(x["name"].split(".", 3)[3], []).append(x)
        lines += ["", f"Per matrix kind, {r['pattern']}:", ""]
        lines += _table(["matrix", "diff", "weights"],
                        [[kind, sum(x["diff"] for x in xs), sum(x["numel"] for x in xs)]
                         for kind, xs in sorted(kinds.items())])
        if verbose:
            lines += ["", f"Per matrix, {r['pattern']}:", ""]
            lines += _table(["matrix", "diff", "drift", *[h for h, _ in cols["matrix"]]],
                            [[x["name"], x["diff"], f"{x['drift']:.1e}", *[f([x]) for _, f in cols["matrix"]]]
                             for x in r["matrices"]])
    lines += timing_lines(results)
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point: `peer` (inside the llmcompressor venv) or the whole comparison (default)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        p = argparse.ArgumentParser(prog="compare_llmcompressor.py peer")
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--tokens", type=Path, required=True)
        p.add_argument("--pattern", choices=sorted(PATTERNS), required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--method", choices=METHODS, default="wanda")
        a = p.parse_args(argv[1:])
        run_peer(a.model, a.tokens, a.pattern, a.out, a.method)
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("/work/models/smollm2-135m"))
    p.add_argument("--calib", default="/work/shared/data/wikitext2/wiki.valid.tokens")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patterns", default="unstructured,2:4", help="comma-separated: unstructured,2:4")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/wanda-peer-compare"),
                   help="outputs: ours_<pattern>/, peer_<pattern>/, logs, results.json (reused when finished)")
    p.add_argument("--method", choices=METHODS, default="wanda",
                   help="wanda: WandaPruningModifier; sparsegpt: SparseGPTModifier (outputs in *_sparsegpt_*)")
    p.add_argument("--wanda-stream", default=f"{sys.executable} -m wanda_stream",
                   help="command running wanda-stream, in the repository root (default: this interpreter, "
                        "so this checkout's code)")
    p.add_argument("--llmc-python", default="/work/venv-llmc/bin/python",
                   help="interpreter of the venv with llmcompressor installed")
    p.add_argument("--eval-data", default="/work/shared/data/wikitext2/wiki.test.raw")
    p.add_argument("--eval-windows", type=int, default=16, help="0 = no perplexities")
    p.add_argument("--oracle-batch", type=int, default=8)
    p.add_argument("--rtol", type=float, default=1e-4, help="near-tie tolerance on top of 2.5 x drift")
    p.add_argument("--block0-drift", type=float, default=1e-4,
                   help="largest allowed drift of block 0's statistics (identical inputs on both sides)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    p.add_argument("--verbose", action="store_true", help="also print the per-matrix table")
    a = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    model = a.model.resolve()
    original = load_weights(model)
    ws = shlex.split(a.wanda_stream)
    results, ppl, runs = [], {}, {}
    for pattern in a.patterns.split(","):
        # Wanda keeps the directory names of its earlier recorded runs; other methods are prefixed.
        tag = (f"{a.method}_" if a.method != "wanda" else "") + pattern.replace(":", "of")
        ours, peer = work / f"ours_{tag}", work / f"peer_{tag}"
        runs[pattern] = ours
        if not (ours / "wanda_stream.json").is_file():
            shutil.rmtree(ours, ignore_errors=True)
            run_cmd([*ws, "prune", str(model), str(ours), "--method", a.method, "--calib", a.calib,
                     "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
                     "--device", "cpu", "--pattern", pattern, "--keep-work-dir", "--quiet"], log, timed=ours)
        tokens_file = ours / ".wanda-stream" / "tokens.safetensors"
        tokens = load_file(str(tokens_file))["calib"]
        if tuple(tokens.shape) != (a.nsamples, a.seqlen):
            raise SystemExit(f"{tokens_file}: calib windows {tuple(tokens.shape)}, expected {(a.nsamples, a.seqlen)}")
        if not (peer / "peer_info.json").is_file():
            shutil.rmtree(peer, ignore_errors=True)
            run_cmd([a.llmc_python, str(HERE), "peer", "--model", str(model), "--tokens", str(tokens_file),
                     "--pattern", pattern, "--out", str(peer), "--method", a.method], log, timed=peer)
        stats_file = work / f"oracle_ours_{tag}.safetensors"
        if stats_file.is_file():
            stats = load_file(str(stats_file))
        else:
            print(f"oracle statistics of our {pattern} run ...", flush=True)
            from safetensors.torch import save_file
            stats = oracle_stats(model, ours, tokens, a.oracle_batch)
            save_file(stats, str(stats_file))
        r = compare_pattern(pattern, original, ours, peer, stats, a.rtol, a.method)
        r["timing"] = [timing(d) for d in (ours, peer)]
        peer_sha = r["peer_info"].get("tokens_sha256")
        if peer_sha is not None and peer_sha != tensor_sha256(tokens):
            r["problems"].append("the peer calibrated on other windows than ours (tokens_sha256 differs)")
        b0 = max(x["drift"] for x in r["matrices"] if block_of(x["name"]) == 0)
        if b0 > a.block0_drift:
            r["problems"].append(f"block 0 statistics drift {b0:.2e} > {a.block0_drift:.0e} with identical inputs")
        results.append(r)
        if a.eval_windows > 0:
            for side, d in (("ours", ours), ("peer", peer)):
                ppl[f"{side}_{pattern}"] = perplexity(ws, d, a.eval_data, a.seqlen, a.eval_windows, log)
    if a.eval_windows > 0:
        ppl["dense"] = perplexity(ws, model, a.eval_data, a.seqlen, a.eval_windows, log)
    text = print_tables(results, ppl, a.verbose)
    info = results[0]["peer_info"]["versions"] if results else {}
    print(f"\npeer versions: {info}")
    print(f"ours: {ours_version(runs)}")
    (work / "results.json").write_text(json.dumps({"results": results, "perplexity": ppl}, indent=1))
    if a.markdown:
        a.markdown.write_text(text + "\n")
    problems = [f"{r['pattern']}: {p}" for r in results for p in r["problems"]]
    for p_ in problems[:50]:
        print("PROBLEM " + p_)
    if problems:
        print(f"{len(problems)} problem(s): masks differ beyond near-ties or a side broke the rules")
        return 1
    print("masks agree up to near-ties" if a.method == "wanda" else
          "no structural problem (same matrices pruned, other tensors untouched, same windows, block 0 inputs equal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
