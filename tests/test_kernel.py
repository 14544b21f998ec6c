"""Golden, hand-computed masks for the pure kernel."""

import pytest
import torch

from wanda_stream.methods import kernel


def test_column_sq_sum_sums_over_all_tokens():
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]], [[0.0, 2.0], [1.0, 1.0]]])  # 2 x 2 tokens, 2 features
    assert kernel.column_sq_sum(x).tolist() == [11.0, 10.0]
    assert kernel.column_sq_sum(x).dtype == torch.float64


def _float64_sq_sum(x: torch.Tensor) -> torch.Tensor:
    """The whole input in float64, squared and summed at once: what column_sq_sum must equal in bits."""
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return (x64 * x64).sum(dim=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_column_sq_sum_same_bits_as_a_whole_float64_copy(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # Magnitudes from 1e-3 to 1e2 per column; float16 also at its extremes (65504, subnormals).
    x = torch.randn(3, 37, 64, generator=g) * torch.logspace(-3, 2, 64)
    if dtype == torch.float16:
        x[0, 0, :4] = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8])
    x = x.to(dtype)
    got = kernel.column_sq_sum(x)
    assert got.dtype == torch.float64 and torch.equal(got, _float64_sq_sum(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_column_sq_sum_in_chunks_bounds_its_copy(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past one chunk, the chunks' float64 sums are added in order: the same bits for the same shape
    on every call, within float64 rounding of the whole sum, and never a float64 copy of the whole input."""
    monkeypatch.setattr(kernel, "SCORE_CHUNK_ELEMENTS", 64 * 10)  # 10 rows of 64 per chunk
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 25, 64, generator=g) * 3).to(dtype)
    rows = x.reshape(-1, 64)
    chunked = sum((_float64_sq_sum(rows[r : r + 10]) for r in range(10, 100, 10)), _float64_sq_sum(rows[:10]))
    got = kernel.column_sq_sum(x)
    assert torch.equal(got, chunked)
    assert torch.allclose(got, _float64_sq_sum(x), rtol=1e-14, atol=0)
    copies: list[int] = []
    real_to = torch.Tensor.to

    def counting_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = real_to(self, *args, **kwargs)
        if out.dtype == torch.float64:
            copies.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    kernel.column_sq_sum(x)
    assert copies and max(copies) <= 640


def test_column_sq_sum_leaves_a_float64_input_alone() -> None:
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    assert kernel.column_sq_sum(x).tolist() == [1.0, 4.0] and x.tolist() == [[1.0, -2.0]]


def test_wanda_unstructured_golden():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0],
                      [4.0, 3.0, -2.0, 1.0]])
    sq = torch.tensor([16.0, 1.0, 1.0, 0.25])  # norms 4, 1, 1, 0.5
    # scores row 0: 4, 2, 3, 2   row 1: 16, 3, 2, 0.5 ; 50% removes 2 per row
    mask = kernel.wanda_mask(w, sq, 0.5)
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]


def test_unstructured_floor_and_stable_ties():
    w = torch.ones(2, 5)
    sq = torch.ones(5)
    # floor(5 * 0.5) = 2; all scores tie, so the stable sort removes the first two inputs
    assert kernel.wanda_mask(w, sq, 0.5).tolist() == [[True, True, False, False, False]] * 2
    # floor(5 * 0.3) = 1
    assert kernel.wanda_mask(w, sq, 0.3).sum(1).tolist() == [1, 1]


def test_wanda_2_4_golden():
    w = torch.tensor([[1.0, 5.0, 2.0, 4.0, -8.0, 1.0, 1.0, 7.0]])
    sq = torch.ones(8)
    mask = kernel.wanda_mask(w, sq, 0.5, (2, 4))
    # group 1: 1,5,2,4 -> drop 1,2 ; group 2: 8,1,1,7 -> drop the two 1s (ties: both)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]


def test_wanda_4_8_golden_uses_activations():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    sq = torch.tensor([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]) ** 2
    mask = kernel.wanda_mask(w, sq, 0.5, (4, 8))
    assert mask.tolist() == [[False, True, False, True, False, True, False, True]]


def test_nm_ties_prefer_lower_index():
    w = torch.full((1, 4), 2.0)
    assert kernel.wanda_mask(w, torch.ones(4), 0.5, (2, 4)).tolist() == [[True, True, False, False]]


def test_magnitude_uses_one_threshold_per_matrix():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                      [5.0, 6.0, 7.0, 8.0]])
    # the 4 smallest of the whole matrix are all in row 0: a per-row rule would differ
    mask = kernel.magnitude_mask(w, 0.5)
    assert mask.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_magnitude_nm_is_per_row_group():
    w = torch.tensor([[0.1, -0.4, 0.3, 0.2, 9.0, 8.0, -1.0, 2.0]])
    assert kernel.magnitude_mask(w, 0.5, (2, 4)).tolist() == [[True, False, False, True, False, False, True, True]]


def test_scores_in_float32_from_half_weights():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float16)
    assert kernel.wanda_score(w, torch.ones(4)).dtype == torch.float32


def test_satisfies_nm():
    assert kernel.satisfies_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), (2, 4))
    assert not kernel.satisfies_nm(torch.tensor([[0.0, 1.0, 3.0, 2.0]]), (2, 4))


def test_selection_equals_stable_sort_under_heavy_ties():
    # The masks come from a selection, not a sort; ties must still go to the lower index exactly.
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows, cols = torch.randint(1, 7, (2,), generator=g).tolist()
        score = torch.randint(0, 3, (rows, cols), generator=g).float()
        sparsity = torch.randint(0, cols + 1, (), generator=g).item() / cols
        k = int(cols * sparsity)
        ref = torch.zeros_like(score, dtype=torch.bool)
        ref.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(kernel.row_mask(score, sparsity), ref)
        flat, kf = score.reshape(-1), int(score.numel() * sparsity)
        ref_m = torch.zeros(flat.numel(), dtype=torch.bool)
        ref_m[torch.sort(flat, stable=True).indices[:kf]] = True
        assert torch.equal(kernel.matrix_mask(score, sparsity), ref_m.reshape(score.shape))


@pytest.mark.parametrize("width", [5, 128, 300, 4100])
def test_gram_upper_tiles_then_symmetrize_equal_the_full_product(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    xs = [torch.randn(2, 7, width, generator=gen) for _ in range(2)]
    gram = torch.zeros(width, width)
    for x in xs:
        kernel.add_gram(gram, x)
    # Only the diagonal band of tiles and above is computed until symmetrized.
    assert (gram.tril(-kernel.gram_tile(width)) == 0).all() and (width <= 128 or gram.tril(-1).any())
    full = sum(x.reshape(-1, width).double().t() @ x.reshape(-1, width).double() for x in xs)
    kernel.symmetrize(gram)
    assert torch.equal(gram, gram.t())
    assert torch.allclose(gram.double(), full, rtol=1e-5, atol=1e-4)


def test_statistics_are_checked_for_finiteness_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-tensor isfinite of a 70B down_proj Gram matrix (3.3 GB) takes 5.7 GB of temporaries: the
    check looks at SCORE_CHUNK_ELEMENTS entries at a time, and still finds a NaN or inf anywhere."""
    from wanda_stream.errors import InputError
    from wanda_stream.methods import Observation, Stat
    from wanda_stream.methods.observe import BlockStats, check_finite

    gram = torch.zeros(5000, 5000)  # 25 M entries, more than one slice
    assert gram.numel() > kernel.SCORE_CHUNK_ELEMENTS
    largest: list[int] = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: (largest.append(t.numel()), isfinite(t))[1])
    stats = BlockStats({"mlp.down_proj": Observation(Stat.GRAM, gram, tokens=8)})
    check_finite(stats, 0, torch.float32)
    assert largest and max(largest) <= kernel.SCORE_CHUNK_ELEMENTS
    for bad in (float("nan"), float("inf")):
        gram[-1, -1] = bad
        with pytest.raises(InputError, match="not finite"):
            check_finite(stats, 0, torch.float32)
        assert not kernel.all_finite(gram)
    assert kernel.all_finite(torch.ones(3)) and kernel.all_finite(torch.empty(0))
