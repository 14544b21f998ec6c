"""The errors the report records, against independent computations: every block's relative output error
||Y_pruned - Y_dense|| / ||Y_dense|| from both models held whole in memory by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.reference import _layers, capture_block_inputs
from tests.test_prune_tiny import CALIB_ARGS, _tokens
from wanda_stream.cli import main
from wanda_stream.methods.fidelity import OutputError, relative_output_error


def test_relative_output_error_by_hand() -> None:
    err = OutputError()
    err.add(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]))  # diff^2 4, dense^2 1
    err.add(torch.tensor([[0.0]]), torch.tensor([[2.0]]))  # diff^2 4, dense^2 4
    assert err.value == pytest.approx((8 / 5) ** 0.5)
    assert relative_output_error(0.0, 0.0) == 0.0


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reported_block_errors_equal_an_independent_computation(tiny_model: Path, tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *CALIB_ARGS, "--method", method, "--sparsity", "0.5",
                 "--batch-size", "4"]) == 0
    report = json.loads((out / "wanda_stream.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    # Block i's calibration inputs are the pruned model's hidden states entering it.
    inputs, kwargs = capture_block_inputs(pruned, _layers(pruned), _tokens(tiny_model))
    want = []
    with torch.no_grad():
        for i, (d, p) in enumerate(zip(_layers(dense), _layers(pruned))):
            outs = [(p(x, **kw), d(x, **kw)) for x, kw in zip(inputs, kwargs[i])]
            outs = [tuple(o[0] if isinstance(o, tuple) else o for o in pair) for pair in outs]
            diff = sum(float(((yp.double() - yd.double()) ** 2).sum()) for yp, yd in outs)
            ref = sum(float((yd.double() ** 2).sum()) for _, yd in outs)
            want.append((diff / ref) ** 0.5)
            inputs = [yp for yp, _ in outs]
    got = [b["output_error"] for b in report["blocks"]]
    assert got == pytest.approx(want, rel=1e-3)
    assert all(0 < e < 1 for e in got)


def test_magnitude_records_no_block_error(tiny_model: Path, tmp_path: Path) -> None:
    """Without calibration there are no calibration outputs to compare: the field is absent, not made up."""
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), "--device", "cpu", "--quiet", "--method", "magnitude"]) == 0
    report = json.loads((out / "wanda_stream.json").read_text())
    assert all("output_error" not in b for b in report["blocks"])


def test_inspect_plot_without_matplotlib_is_one_line_and_exit_2(tiny_model: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import builtins

    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *CALIB_ARGS, "--method", "wanda"]) == 0
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    capsys.readouterr()
    assert main(["inspect", str(out), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "matplotlib" in err and "wanda-stream[plot]" in err and "\n" not in err
    assert not (tmp_path / "p.png").exists()


def test_inspect_plot_of_a_directory_without_report_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "wanda_stream.json" in err and "\n" not in err


def test_inspect_plot_draws_an_owl_run(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model), str(out), *CALIB_ARGS, "--method", "sparsegpt", "--sparsity", "0.6",
                 "--sparsity-profile", "owl"]) == 0
    png = tmp_path / "p.png"
    assert main(["inspect", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
