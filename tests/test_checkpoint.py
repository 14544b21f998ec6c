"""The checkpoint reader: every tensor read equals safetensors' own loader, and is read in full, into owned memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanda_stream.storage.checkpoint import Checkpoint


def _write(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.scalar": torch.tensor(3.25),
        "c.mask": torch.rand(4, 3, generator=g) > 0.5,
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
        "f.half": torch.randn(2, 3, 4, generator=g).half(),
    }
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file(tensors, str(model / "model.safetensors"))
    return model, tensors


def test_get_equals_safetensors_loader(tmp_path: Path) -> None:
    model, tensors = _write(tmp_path)
    ckpt = Checkpoint(model)
    reference = load_file(str(model / "model.safetensors"))
    assert sorted(ckpt.keys()) == sorted(tensors)
    for key, expected in reference.items():
        got = ckpt.get(key)
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.equal(got, expected), key


def test_get_reads_everything_before_returning(tmp_path: Path) -> None:
    """Overwriting the file after get() must not change the tensor: its bytes were read, not mapped.

    A memory-mapped tensor would pick up the new bytes on first touch (the prefetch thread would
    have read nothing, leaving the disk reads to the compute).
    """
    model, tensors = _write(tmp_path)
    ckpt = Checkpoint(model)
    got = ckpt.get("a.weight")
    path = model / "model.safetensors"
    size = path.stat().st_size
    header_end = size - sum(t.numel() * t.element_size() for t in tensors.values())
    with open(path, "r+b") as f:
        f.seek(header_end)
        f.write(b"\xff" * (size - header_end))
    assert torch.equal(got, tensors["a.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_get_pinned_on_cuda_hosts(tmp_path: Path) -> None:
    model, tensors = _write(tmp_path)
    ckpt = Checkpoint(model)
    for key, expected in load_file(str(model / "model.safetensors")).items():
        got = ckpt.get(key, pin=True)
        # An empty tensor has no memory to pin (the pinned allocator returns none for 0 bytes).
        assert got.is_pinned() == (got.numel() > 0) and torch.equal(got, expected), key


def test_empty_tensors_are_never_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What get() asks the allocator for, on any host: pinned memory for every tensor but the empty ones."""
    import wanda_stream.storage.checkpoint as checkpoint

    model, _ = _write(tmp_path)
    asked: dict[tuple[int, ...], bool] = {}
    real_empty = torch.empty

    def empty(shape: Any, dtype: torch.dtype | None = None, pin_memory: bool = False, **kw: Any) -> torch.Tensor:
        if isinstance(shape, (tuple, list, torch.Size)):  # the reads' buffers (not scalars made elsewhere)
            asked[tuple(shape)] = pin_memory
        return real_empty(shape, dtype=dtype, **kw)

    monkeypatch.setattr(checkpoint.torch, "empty", empty)
    ckpt = Checkpoint(model)
    for key in ckpt.keys():
        ckpt.get(key, pin=True)
    assert asked.pop((0, 4)) is False and all(asked.values()) and len(asked) == 5


def test_rows_of_the_first_dimension_are_read_alone(tmp_path: Path) -> None:
    """get(rows=(start, stop)) reads those rows of the first dimension (a group of fused experts) and nothing
    else: equal to the loader's tensor sliced, for every dtype and for an empty range; a range past the end
    is refused."""
    model, tensors = _write(tmp_path)
    ckpt = Checkpoint(model)
    reference = load_file(str(model / "model.safetensors"))
    for key, expected in reference.items():
        if expected.dim() == 0:
            continue
        n = expected.shape[0]
        for rows in ((0, n), (n // 2, n), (min(1, n), min(1, n))):
            got = ckpt.get(key, rows=rows)
            assert got.dtype == expected.dtype and torch.equal(got, expected[rows[0]:rows[1]]), (key, rows)
    with pytest.raises(ValueError, match="rows 2:8 of 7"):
        ckpt.get("a.weight", rows=(2, 8))
