"""rlhf.losses.reduce: masked statistics and the aggregation modes, incl. micro-batch equivalence."""

from __future__ import annotations

import pytest
import torch

from rlhf.losses.reduce import (
    AGGREGATE_MODES,
    aggregate,
    aggregate_parts,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    upcast,
)

from _shards import run_sharded  # isort: skip

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_mean_by_hand() -> None:
    """Valid entries 1, 2 | 4: overall (1 + 2 + 4) / 3 = 7/3; per row 1.5 and 4."""
    assert masked_mean(LOSS, MASK).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_mean(LOSS, MASK, dim=1), torch.tensor([1.5, 4.0]))
    assert masked_sum(LOSS, MASK).item() == pytest.approx(7.0)


def test_masked_mean_ignores_inf_and_nan_in_padding() -> None:
    """Padding holding inf / NaN changes neither the value (7/3) nor the gradient (1/3 on valid entries)."""
    x = LOSS.clone()
    x[0, 2] = float("inf")
    x[1, 1] = float("nan")
    x.requires_grad_(True)
    out = masked_mean(x, MASK)
    out.backward()
    assert out.item() == pytest.approx(7 / 3)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, MASK / 3)


def test_masked_mean_bool_mask_and_empty() -> None:
    """A bool mask works like a float one; an all-zero mask gives 0, not NaN; an empty row gives 0."""
    assert masked_mean(LOSS, MASK.bool()).item() == pytest.approx(7 / 3)
    assert masked_mean(LOSS, torch.zeros_like(MASK)).item() == 0.0
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_mean(LOSS, mask, dim=1), torch.tensor([2.0, 0.0]))


def test_masked_var_by_hand() -> None:
    """Values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 14/3;
    unbiased var = (14/3) / 2 = 7/3, biased var = (14/3) / 3 = 14/9."""
    assert masked_var(LOSS, MASK).item() == pytest.approx(7 / 3)
    assert masked_var(LOSS, MASK, unbiased=False).item() == pytest.approx(14 / 9)


def test_masked_var_degenerate_counts() -> None:
    """One valid value: variance 0 (not inf / NaN); no valid value: 0."""
    one = torch.tensor([[3.0, 9.0]])
    assert masked_var(one, torch.tensor([[1.0, 0.0]])).item() == 0.0
    assert masked_var(one, torch.tensor([[0.0, 0.0]])).item() == 0.0


def test_masked_whiten() -> None:
    """Whitened valid values have mean 0 and unbiased variance 1; padding is 0; shift_mean=False keeps the
    mean (7/3) and still rescales to unit variance."""
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 2
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 5 + [0.0], [1.0] + [0.0] * 5])
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[mask == 0] == 0)
    w2 = masked_whiten(LOSS, MASK, shift_mean=False)
    assert masked_mean(w2, MASK).item() == pytest.approx(7 / 3, abs=1e-6)
    assert masked_var(w2, MASK).item() == pytest.approx(1.0, abs=1e-5)


def test_aggregate_modes_by_hand() -> None:
    """Rows: [1, 2 | 3 masked] and [4 | 5, 6 masked].
    token_mean = (1 + 2 + 4) / 3 = 7/3; seq_mean_token_mean = mean(1.5, 4) = 2.75;
    seq_mean_token_sum = mean(3, 4) = 3.5."""
    assert aggregate(LOSS, MASK).item() == pytest.approx(7 / 3)
    assert aggregate(LOSS, MASK, mode="seq_mean_token_mean").item() == pytest.approx(2.75)
    assert aggregate(LOSS, MASK, mode="seq_mean_token_sum").item() == pytest.approx(3.5)


def test_aggregate_parts_by_hand() -> None:
    """token_mean: (7, 3 tokens); seq modes: (1.5 + 4 = 5.5, 2 rows) and (3 + 4 = 7, 2 rows)."""
    num, den = aggregate_parts(LOSS, MASK, mode="token_mean")
    assert (num.item(), den.item()) == pytest.approx((7.0, 3.0))
    num, den = aggregate_parts(LOSS, MASK, mode="seq_mean_token_mean")
    assert (num.item(), den.item()) == pytest.approx((5.5, 2.0))
    num, den = aggregate_parts(LOSS, MASK, mode="seq_mean_token_sum")
    assert (num.item(), den.item()) == pytest.approx((7.0, 2.0))


@pytest.mark.parametrize("mode", AGGREGATE_MODES)
def test_aggregate_empty_rows_give_zero(mode: str) -> None:
    """All-masked batch: 0 for every mode. One empty row in seq_mean_token_mean contributes 0 and still counts:
    rows [1, 2, 3] (all valid) and an empty row -> mean(2, 0) = 1.0; seq_mean_token_sum -> mean(6, 0) = 3."""
    assert aggregate(LOSS, torch.zeros_like(MASK), mode=mode).item() == 0.0
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    expected = {"token_mean": 2.0, "seq_mean_token_mean": 1.0, "seq_mean_token_sum": 3.0}[mode]
    out = aggregate(LOSS, mask, mode=mode)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", AGGREGATE_MODES)
def test_micro_batches_reproduce_full_batch(mode: str) -> None:
    """Gradient accumulation: sum of micro-batch numerators / sum of denominators equals the full-batch
    aggregate, in value and in gradient, for micro-batches of sizes 3, 1, 4 (one of them with an empty row)."""
    torch.manual_seed(1)
    loss = torch.randn(8, 7, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3, 0, 5, 1, 7, 2, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).to(torch.float64)

    full = aggregate(loss, mask, mode=mode)
    (full_grad,) = torch.autograd.grad(full, loss)

    parts = [aggregate_parts(loss[a:b], mask[a:b], mode=mode) for a, b in ((0, 3), (3, 4), (4, 8))]
    total_den = sum(den for _, den in parts)
    assert isinstance(total_den, torch.Tensor)
    accumulated = sum(num / total_den.clamp(min=1) for num, _ in parts)
    assert isinstance(accumulated, torch.Tensor)
    (acc_grad,) = torch.autograd.grad(accumulated, loss)

    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(acc_grad, full_grad)
    # and the naive mean of per-micro-batch aggregates does NOT match for token_mean (unequal token counts)
    if mode == "token_mean":
        naive = sum(aggregate(loss[a:b], mask[a:b], mode=mode) for a, b in ((0, 3), (3, 4), (4, 8))) / 3
        assert isinstance(naive, torch.Tensor)
        assert abs(naive.item() - full.item()) > 1e-3


def test_aggregate_rejects_unknown_mode_and_bad_shape() -> None:
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum"):
        aggregate(LOSS, MASK, mode="sum")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        aggregate(LOSS.flatten(), MASK.flatten(), mode="seq_mean_token_mean")
    assert aggregate(LOSS.flatten(), MASK.flatten()).item() == pytest.approx(7 / 3)


def test_half_precision_reduces_in_float32() -> None:
    """bf16 input: the sum of 4096 copies of 1 + 2^-7 (exact in bf16) is 4128 in float32; a bf16 accumulator
    (spacing 32 at 4096) could not even represent it."""
    x = torch.full((1, 4096), 1.0 + 2**-7, dtype=torch.bfloat16)
    mask = torch.ones(1, 4096)
    out = masked_sum(x, mask)
    assert out.dtype == torch.float32
    assert out.item() == 4128.0
    assert upcast(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert upcast(torch.ones(2, dtype=torch.float16)).dtype == torch.float32


def test_whitening_with_sum_over_uses_the_global_batch_of_every_shard():
    """Three shards (as three processes) whitened with `sum_over` give exactly the slices of the whole batch
    whitened at once; without it each shard is whitened on its own statistics, which differ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g) * 3 + 1
    mask = (torch.rand(9, 5, generator=g) > 0.3).float()
    shards = [(x[i : i + 3], mask[i : i + 3]) for i in range(0, 9, 3)]
    together = masked_whiten(x, mask)
    sharded = torch.cat(run_sharded(masked_whiten, shards))
    torch.testing.assert_close(sharded, together, rtol=0, atol=1e-6)
    alone = torch.cat([masked_whiten(*shard) for shard in shards])
    assert (alone - together).abs().max() > 0.05
