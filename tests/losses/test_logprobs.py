"""rlhf.losses.logprobs: token log-probs and entropy from logits, computed row by row."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses.logprobs import entropy_from_logits, token_logprobs


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def test_by_hand() -> None:
    """logits [0, ln 3] -> p = [0.25, 0.75]: label 1 gives ln 0.75 = -0.2876821, label 0 gives ln 0.25."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], dtype=torch.float64)
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_log_softmax_gather(dtype: torch.dtype) -> None:
    """Random (3, 5, 11) logits of scale 5: equal to log_softmax + gather, values and gradients."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11, dtype=dtype) * 5).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 5))
    out = token_logprobs(logits, labels)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_out, g_ref)


def test_ignore_labels_read_as_token_zero() -> None:
    """Labels -100 give the log-prob of token 0 (finite; the caller masks them)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[-100, 2, 1], [3, -100, -100]])
    out = token_logprobs(logits, labels)
    torch.testing.assert_close(out, _reference_logprobs(logits, labels).float())
    torch.testing.assert_close(out[0, 0], torch.log_softmax(logits[0, 0], -1)[0])


def test_bf16_upcast() -> None:
    """bf16 logits: float32 result equal to the float64 computation on the same bf16 values (to 1e-5)."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 50) * 10).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 4))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_logprobs(logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_finite(dtype: torch.dtype) -> None:
    """Logits of +-1e4: the label at -1e4 next to a +1e4 logit has log-prob -2e4, finite; grads finite."""
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]], dtype=dtype, requires_grad=True)
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(-2e4, rel=1e-2)
    assert out[0, 1].item() == pytest.approx(-math.log(3.0), rel=1e-2)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_shape_checks() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_by_hand_and_uniform() -> None:
    """Uniform over V = 8: ln 8 = 2.0794415; [0.25, 0.75]: 0.5623351; one-hot (other logits -inf): 0."""
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8.0), rel=1e-6)
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    assert entropy_from_logits(two).item() == pytest.approx(0.5623351, rel=1e-6)
    one_hot = torch.tensor([[[5.0, float("-inf"), float("-inf")]]])
    assert entropy_from_logits(one_hot).item() == 0.0


def test_entropy_matches_categorical() -> None:
    """Random logits (2, 3, 17): equal to torch.distributions.Categorical(logits=...).entropy()."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 17, dtype=torch.float64) * 3
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ref)


def test_entropy_masked_vocab_no_nan_gradient() -> None:
    """Half the vocabulary at -inf: entropy is ln 2 of the two remaining equal logits, the gradient is
    finite everywhere and 0 on the -inf entries."""
    logits = torch.tensor([[[1.0, 1.0, float("-inf"), float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(logits)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 2:].abs().sum().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_extreme_logits(dtype: torch.dtype) -> None:
    """Logits of +-1e4 (a near one-hot): entropy ~0, finite, with finite gradients; bf16 returns float32."""
    logits = torch.tensor([[[1e4, -1e4, 0.0, 1e4]]], dtype=dtype, requires_grad=True)
    h = entropy_from_logits(logits)
    h.sum().backward()
    assert h.dtype == torch.float32
    assert h.item() == pytest.approx(math.log(2.0), rel=1e-3)  # two equal top logits
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_chunked_rows_equal_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking over batch rows (forced to 1 and 2 rows per chunk) changes nothing but memory."""
    from rlhf.losses import logprobs as lp

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 4, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (5, 4), generator=gen)
    whole = (lp.token_logprobs(logits, labels), lp.entropy_from_logits(logits))
    for budget in (1, 2 * 4 * 11):
        monkeypatch.setattr(lp, "CHUNK_ELEMENTS", budget)
        assert len(lp._row_chunks(logits)) == (5 if budget == 1 else 3)
        torch.testing.assert_close(lp.token_logprobs(logits, labels), whole[0], rtol=0, atol=0)
        torch.testing.assert_close(lp.entropy_from_logits(logits), whole[1], rtol=0, atol=0)
