"""--reconstruct (block-output reconstruction): the streamed fit against a small in-memory implementation of the
same optimisation on a tiny checkpoint (masks preserved exactly), the pure kernel's pieces by hand, determinism,
kill-and-resume to the same bytes, two ranks against one process, the report's errors before and after, after
structural pruning, and the refusals."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers import checkpoint_files, load_state_dict, run_cli, tiny_llama_config, write_tiny_model
from tests.reference import _layers, capture_block_inputs, ref_mask
from wanda_stream.cli import main
from wanda_stream.methods.reconstruct import Reconstruct, cosine_lr, fit_block, step_windows
from wanda_stream.run import calib
from wanda_stream.storage import state as state_mod

ARGS = ["--calib", "pydoc", "--nsamples", "6", "--seqlen", "32", "--device", "cpu", "--quiet"]
REPORT = "wanda_stream.json"
FIT = ["--reconstruct", "--reconstruct-epochs", "2", "--reconstruct-lr", "1e-3", "--reconstruct-batch", "4"]


def _tokens(model: Path) -> torch.Tensor:
    tok = calib.load_tokenizer(model)
    return calib.sample_windows(calib.documents("pydoc"), tok, 6, 32, 0, "pydoc")


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / REPORT).read_text())


# ---- the pure pieces ---------------------------------------------------------------------------------
def test_step_windows_are_strided_and_cover_every_window_once() -> None:
    assert step_windows(6, 4) == [[0, 2, 4], [1, 3, 5]]
    assert step_windows(8, 4) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert step_windows(5, 1) == [[0], [1], [2], [3], [4]]
    assert step_windows(3, 3) == [[0, 1, 2]]
    for n, b in ((32, 4), (7, 3), (10, 10)):
        got = sorted(j for s in step_windows(n, b) for j in s)
        assert got == list(range(n)) and max(len(s) for s in step_windows(n, b)) <= b


def test_cosine_schedule_by_hand() -> None:
    assert cosine_lr(1e-3, 0, 10) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 5, 10) == pytest.approx(5e-4)
    assert cosine_lr(1e-3, 10, 10) == pytest.approx(0.0, abs=1e-15)


def test_fit_of_a_masked_linear_map_holds_the_mask_and_lowers_the_error() -> None:
    """A masked linear fitted to a dense one's outputs: removed entries stay exact zeros, the error falls, and a
    second fit gives the same bits."""
    torch.manual_seed(0)
    dense = torch.randn(8, 16)
    mix = torch.randn(4, 16)  # inputs of rank 4: the kept half of each row can make up for the removed half
    xs = [torch.randn(1, 5, 4) @ mix for _ in range(6)]
    ys = [x @ dense.T for x in xs]
    mask = torch.rand(8, 16) < 0.5

    def run() -> tuple[torch.Tensor, Any]:
        w = dense.masked_fill(mask, 0).clone().requires_grad_(True)
        rec = fit_block(lambda x: x @ w.T, [w], [mask], 6, range(6), lambda j: (xs[j], ys[j]),
                        Reconstruct(epochs=20, lr=5e-2, batch=2))
        return w.detach(), rec

    w, rec = run()
    assert bool((w[mask] == 0).all()) and bool((w[~mask] != 0).all())
    assert rec is not None and rec.steps == 20 * 3 and rec.epoch_mse[-1] < 0.5 * rec.epoch_mse[0]
    assert torch.equal(w, run()[0])
    stopped = fit_block(lambda x: x @ w.T, [w.clone().requires_grad_(True)], [mask], 6, range(6),
                        lambda j: (xs[j], ys[j]), Reconstruct(), stop=lambda: True)
    assert stopped is None


def test_fit_sums_the_ranks_parts_in_window_order() -> None:
    """fit_block on one of two disjoint shares, the other's parts coming through the exchange, applies the
    single-process update, and the exchange is asked for every window of each step in window order."""
    torch.manual_seed(1)
    dense = torch.randn(4, 6)
    xs = [torch.randn(1, 3, 6) for _ in range(4)]
    ys = [x @ dense.T for x in xs]
    mask = torch.rand(4, 6) < 0.5
    opts = Reconstruct(epochs=3, lr=1e-2, batch=4)

    def weight() -> torch.Tensor:
        return dense.masked_fill(mask, 0).clone().requires_grad_(True)

    single = weight()
    fit_block(lambda x: x @ single.T, [single], [mask], 4, range(4), lambda j: (xs[j], ys[j]), opts)
    # Rank 0 holds windows 0-1; its exchange computes rank 1's parts (windows 2-3) with the same weights.
    from wanda_stream.methods import reconstruct as r

    w = weight()
    asked: list[tuple[int, bool]] = []

    def exchange(j: int, part: Any) -> Any:
        asked.append((j, part is not None))
        return part if part is not None else r._window_grad(j, lambda x: x @ w.T, [w], xs[j], ys[j], 4)  # noqa: SLF001
    fit_block(lambda x: x @ w.T, [w], [mask], 4, range(0, 2), lambda j: (xs[j], ys[j]), opts, exchange)
    assert torch.equal(w.detach(), single.detach())
    assert asked == [(0, True), (1, True), (2, False), (3, False)] * 3


# ---- against an in-memory implementation -------------------------------------------------------------
def _adam_fit(layer: nn.Module, kw: list[dict[str, Any]], xs: list[torch.Tensor], ys: list[torch.Tensor],
              weights: list[nn.Parameter], masks: list[torch.Tensor], epochs: int, lr: float, batch: int) -> None:
    """Adam written out (Kingma & Ba), cosine learning rate, steps of strided windows, mask held."""
    n = len(xs)
    s = math.ceil(n / batch)
    steps = [list(range(k, n, s)) for k in range(s)]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    t, total = 0, epochs * len(steps)
    for _ in range(epochs):
        for windows in steps:
            grads = [torch.zeros_like(w) for w in weights]
            for j in windows:
                out = _first(layer(xs[j], **kw[j]))
                loss = ((out - ys[j]) ** 2).mean() / len(windows)
                for g, d in zip(grads, torch.autograd.grad(loss, weights)):
                    g += d
            rate = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            t += 1
            with torch.no_grad():
                for w, g, mm, vv, mask in zip(weights, grads, m, v, masks):
                    g[mask] = 0
                    mm.mul_(0.9).add_(0.1 * g)
                    vv.mul_(0.999).add_(0.001 * g * g)
                    mhat, vhat = mm / (1 - 0.9 ** t), vv / (1 - 0.999 ** t)
                    w -= rate * mhat / (vhat.sqrt() + 1e-8)
                    w[mask] = 0


def _first(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


def reference_reconstruct(model_dir: Path, tokens: torch.Tensor, epochs: int, lr: float, batch: int
                          ) -> tuple[dict[str, torch.Tensor], list[tuple[float, float]]]:
    """Magnitude 50% masks, then every block's kept weights fitted to the dense block's outputs on the pruned
    model's inputs, the whole model in memory; the state dict and per block (error before, error after)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    layers = _layers(model)
    xs, kwargs = capture_block_inputs(model, layers, tokens)
    errors = []
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            p.requires_grad_(False)
        linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        with torch.no_grad():
            ys = [_first(layer(x, **kw)) for x, kw in zip(xs, kwargs[i])]
        masks = []
        for mod in linears.values():
            mask = ref_mask(mod.weight.detach(), None, 0.5, None, per_matrix=True)
            with torch.no_grad():
                mod.weight.masked_fill_(mask, 0)
            masks.append(mask)

        def err() -> float:
            with torch.no_grad():
                outs = [_first(layer(x, **kw)) for x, kw in zip(xs, kwargs[i])]
            return math.sqrt(sum(float(((o - y).double() ** 2).sum()) for o, y in zip(outs, ys))
                             / sum(float((y.double() ** 2).sum()) for y in ys))
        before = err()
        weights = [mod.weight for mod in linears.values()]
        for w in weights:
            w.requires_grad_(True)
        _adam_fit(layer, kwargs[i], xs, ys, weights, masks, epochs, lr, batch)
        for w in weights:
            w.requires_grad_(False)
        errors.append((before, err()))
        with torch.no_grad():
            xs = [_first(layer(x, **kw)) for x, kw in zip(xs, kwargs[i])]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, errors


def test_streamed_fit_matches_the_in_memory_reference(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--batch-size", "1", "--method", "magnitude", *FIT]) == 0
    want, errors = reference_reconstruct(tiny_model, _tokens(tiny_model), epochs=2, lr=1e-3, batch=4)
    got = load_state_dict(out)
    dense = load_state_dict(tiny_model)
    fitted = [k for k in got if k.endswith("proj.weight")]
    assert len(fitted) == 3 * 7
    for k in fitted:
        # The mask is magnitude's and is held exactly: zeros where the reference pruned, nowhere else.
        assert torch.equal(got[k] == 0, want[k] == 0), k
        assert not torch.equal(got[k], dense[k].masked_fill(want[k] == 0, 0)), f"{k} was not fitted"
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=2e-5), (k, float((got[k] - want[k]).abs().max()))
    for k in got:
        if k not in fitted:
            assert torch.equal(got[k], dense[k]), k  # norms, embeddings and head untouched
    rep = _report(out)
    for b, (before, after) in zip(rep["blocks"], errors):
        assert b["reconstruct"]["output_error_before"] == pytest.approx(before, rel=1e-4)
        assert b["reconstruct"]["output_error_after"] == pytest.approx(after, rel=1e-3)
        assert b["output_error"] == b["reconstruct"]["output_error_after"] < b["reconstruct"]["output_error_before"]
        assert b["reconstruct"]["steps"] == 2 * 2 and not b["reconstruct"]["reverted"]
    assert rep["reconstruct"]["lr"] == 1e-3 and rep["config"]["reconstruct"] == {"epochs": 2, "lr": 1e-3, "batch": 4}


# ---- the run: bytes, resume, ranks, structure ----------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recon") / "ref"
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--batch-size", "2", "--method", "wanda", *FIT,
                 "--eval-data", "pydoc", "--eval-windows", "2"]) == 0
    return out


def test_two_runs_write_the_same_bytes(tiny_model: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--batch-size", "2", "--method", "wanda", *FIT,
                 "--eval-data", "pydoc", "--eval-windows", "2"]) == 0
    assert checkpoint_files(out) == checkpoint_files(reference_run)
    a, b = _report(out), _report(reference_run)
    assert a["eval"] == b["eval"]
    assert [x["reconstruct"]["epoch_mse"] for x in a["blocks"]] == [x["reconstruct"]["epoch_mse"] for x in b["blocks"]]


def test_error_after_is_at_most_before_and_the_model_improves(tiny_model: Path, reference_run: Path,
                                                               tmp_path: Path) -> None:
    rep = _report(reference_run)
    for b in rep["blocks"]:
        rec = b["reconstruct"]
        assert rec["output_error_after"] <= rec["output_error_before"], b["block"]
        assert b["output_error"] == rec["output_error_after"]
    plain = tmp_path / "plain"
    assert main(["prune", str(tiny_model), str(plain), *ARGS, "--batch-size", "2", "--method", "wanda",
                 "--eval-data", "pydoc", "--eval-windows", "2"]) == 0
    base = _report(plain)
    # The first block sees the same inputs with and without the fit: the same error before it.
    assert rep["blocks"][0]["reconstruct"]["output_error_before"] == pytest.approx(base["blocks"][0]["output_error"])
    assert "reconstruct" not in base and "reconstruct" not in base["blocks"][0]
    assert "--reconstruct" in (reference_run / "README.md").read_text()


def test_a_fit_that_makes_the_block_worse_is_undone(tiny_model: Path, tmp_path: Path) -> None:
    """A learning rate far too high: every block whose error rose falls back to the method's weights."""
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *ARGS, "--batch-size", "2", "--method", "magnitude",
                 "--reconstruct", "--reconstruct-lr", "10", "--reconstruct-epochs", "1"]) == 0
    plain = tmp_path / "plain"
    assert main(["prune", str(tiny_model), str(plain), *ARGS, "--batch-size", "2", "--method", "magnitude"]) == 0
    rep = _report(out)
    assert any(b["reconstruct"]["reverted"] for b in rep["blocks"])
    for b in rep["blocks"]:
        assert b["reconstruct"]["output_error_after"] <= b["reconstruct"]["output_error_before"]
    first = rep["blocks"][0]
    if first["reconstruct"]["reverted"]:  # block 0's inputs are the same: its tensors equal the plain run's
        got, want = load_state_dict(out), load_state_dict(plain)
        for k in (k for k in want if ".layers.0." in k):
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("point", ["reconstruct_step:3", "reconstruct_step:7:TERM", "hidden_write:5"])
def test_killed_during_the_fit_resumes_to_the_same_bytes(tiny_model: Path, reference_run: Path, tmp_path: Path,
                                                         point: str) -> None:
    out = tmp_path / "out"
    args = ["prune", str(tiny_model), str(out), *ARGS, "--batch-size", "2", "--method", "wanda", *FIT,
            "--eval-data", "pydoc", "--eval-windows", "2"]
    r = run_cli(*args, env={state_mod.KILL_ENV: point})
    want = 75 if point.endswith("TERM") else -signal.SIGKILL
    assert r.returncode == want, (r.returncode, r.stderr[-2000:])
    assert not (out / REPORT).exists()
    assert main([*args, "--resume"]) == 0
    assert checkpoint_files(out) == checkpoint_files(reference_run)
    assert _report(out)["eval"] == _report(reference_run)["eval"]


def test_two_ranks_write_the_single_process_bytes(tiny_model: Path, tmp_path: Path) -> None:
    from tests.test_dist import finish, launch

    args = [*ARGS[:3], "8", *ARGS[4:], "--batch-size", "2", "--method", "wanda", *FIT]
    single = tmp_path / "single"
    r = run_cli("prune", str(tiny_model), str(single), *args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    results = finish(launch(["prune", str(tiny_model), str(tmp_path / "two"), *args]))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    assert checkpoint_files(tmp_path / "two") == checkpoint_files(single)


def test_after_structured_pruning_the_narrow_block_is_fitted(tmp_path: Path) -> None:
    """--drop-ffn with no masks on top: every weight of the narrower block is fitted (none is zero), the error
    falls, and the output loads in transformers with no missing or unexpected keys."""
    from transformers import AutoModelForCausalLM

    model = write_tiny_model(tmp_path / "model", tiny_llama_config(num_attention_heads=4, num_key_value_heads=2))
    out, plain = tmp_path / "out", tmp_path / "plain"
    assert main(["prune", str(model), str(plain), *ARGS, "--batch-size", "2", "--drop-ffn", "0.25"]) == 0
    assert main(["prune", str(model), str(out), *ARGS, "--batch-size", "2", "--drop-ffn", "0.25", "--reconstruct",
                 "--reconstruct-lr", "1e-5", "--reconstruct-epochs", "3", "--reconstruct-batch", "2"]) == 0
    rep = _report(out)
    for b in rep["blocks"]:  # the refit left small errors: a small learning rate still lowers them
        assert b["reconstruct"]["output_error_after"] < b["reconstruct"]["output_error_before"], b["reconstruct"]
    got, base = load_state_dict(out), load_state_dict(plain)
    assert sorted(got) == sorted(base)
    k = "model.layers.0.mlp.down_proj.weight"
    assert got[k].shape == base[k].shape == (64, 96) and not torch.equal(got[k], base[k])
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("flags,message", [
    (["--reconstruct-lr", "1e-3"], "--reconstruct-lr: applies to --reconstruct only"),
    (["--reconstruct", "--reconstruct-lr", "0"], "--reconstruct-lr 0.0: must be a positive number"),
    (["--reconstruct", "--reconstruct-lr", "nan"], "--reconstruct-lr nan: must be a positive number"),
    (["--reconstruct", "--reconstruct-epochs", "0"], "--reconstruct-epochs 0: must be a positive integer"),
    (["--reconstruct", "--reconstruct-batch", "7"], "--reconstruct-batch 7: more than the 6 calibration windows"),
    (["--reconstruct", "--reconstruct-epochs", "two"], "--reconstruct-epochs: invalid int value"),
])
def test_bad_flags_exit_2_with_one_line(tiny_model: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    r = run_cli("prune", str(tiny_model), str(tmp_path / "out"), *ARGS, *flags)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_fit_lowers_the_block_errors(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M, SparseGPT 2:4 and the fit on 8 x 128 tokens of pydoc: no block's error rises (a fit that
    would raise it is reverted) and most fall."""
    out = tmp_path / "out"
    assert main(["prune", str(smollm2), str(out), "--calib", "pydoc", "--nsamples", "8", "--seqlen", "128",
                 "--device", "cpu", "--quiet", "--method", "sparsegpt", "--pattern", "2:4", "--reconstruct",
                 "--reconstruct-epochs", "1"]) == 0
    fits = [b["reconstruct"] for b in _report(out)["blocks"]]
    for k, f in enumerate(fits):
        assert f["output_error_after"] <= f["output_error_before"], k
        assert f.get("reverted", False) == (f["output_error_after"] == f["output_error_before"]), k
    assert sum(f["output_error_after"] < f["output_error_before"] for f in fits) >= 0.8 * len(fits)
