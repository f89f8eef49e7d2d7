"""Calibration of a reward model's preference probabilities: reliability bins and expected calibration error.

Under the Bradley-Terry model a reward model predicts that the chosen response is preferred with probability
p = sigmoid(r_c - r_r). It is calibrated when, among pairs it gives probability p, a fraction p really is
preferred. A held-out pair only ever says "chosen wins", so each pair enters twice, once in each order:
(p, observed 1) and (1 - p, observed 0), which is what a pair shown in a random order would give. The
bins are then symmetric (bin i mirrors bin n-1-i) and the figure covers [0, 1].

    ECE = sum_b (n_b / N) |observed_b - predicted_b|        (Guo et al. 2017, "On Calibration of Modern
                                                              Neural Networks", Sec. 2)

with N = 2 * pairs, n_b the entries in bin b, predicted_b their mean probability and observed_b the
fraction of them that were preferred. A perfectly ranking but overconfident model has accuracy 1 and a
large ECE; a model at chance that always says 0.5 has ECE 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def preference_calibration(chosen: torch.Tensor, rejected: torch.Tensor, *, n_bins: int = 10) -> dict[str, Any]:
    """Reliability bins and ECE of p = sigmoid(chosen - rejected), each pair counted in both orders.

    Shapes: chosen, rejected (B,) rewards. Bins split [0, 1] into `n_bins` equal intervals, the last one
    closed ([0.9, 1.0]). Returns plain Python numbers, for a JSON file:
        {"ece": float, "pairs": B, "bins": [{"lower", "upper", "count", "predicted", "observed"}, ...]}
    where `predicted` and `observed` are None for an empty bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = torch.sigmoid(chosen.double() - rejected.double())  # (B,)
    probs = torch.cat([p, 1 - p])  # (2B,)
    observed = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2B,)
    index = (probs * n_bins).long().clamp(0, n_bins - 1)  # (2B,)
    count = torch.bincount(index, minlength=n_bins).double()  # (n_bins,)
    predicted_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, probs)
    observed_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, observed)
    total = max(probs.numel(), 1)
    ece = ((observed_sum - predicted_sum).abs().sum() / total).item()  # sum_b n_b/N |o_b - p_b|
    bins = []
    for b in range(n_bins):
        n = int(count[b].item())
        bins.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": n,
                "predicted": predicted_sum[b].item() / n if n else None,
                "observed": observed_sum[b].item() / n if n else None,
            }
        )
    return {"ece": ece, "pairs": int(p.numel()), "bins": bins}


def preference_agreement(
    source: Any, rows: Sequence[dict[str, Any]], gold: Callable[[dict[str, Any], str], float] | None = None
) -> dict[str, float]:
    """How often a reward source ranks held-out preference pairs as their labels do (`accuracy`), and, with a
    `gold(row, text)` score, as gold does (`gold_accuracy`, over the pairs gold is not indifferent to). Rows are
    preference rows whose `chosen` / `rejected` are strings or one assistant message each."""

    def text(value: Any) -> str:
        return value[-1]["content"] if isinstance(value, list) else str(value)

    prompts = [r["prompt"] for r in rows]
    extras = [{k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")} for r in rows]
    chosen = source.score(prompts, [text(r["chosen"]) for r in rows], extras)
    rejected = source.score(prompts, [text(r["rejected"]) for r in rows], extras)
    out = {"accuracy": float((chosen > rejected).float().mean())}
    if gold is not None:
        order = [gold(r, text(r["chosen"])) - gold(r, text(r["rejected"])) for r in rows]
        agree = [(float(c - j) > 0) == (d > 0) for c, j, d in zip(chosen, rejected, order, strict=True) if d != 0]
        out["gold_accuracy"] = sum(agree) / max(1, len(agree))
    return out
