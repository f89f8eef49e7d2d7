"""rlhf.evaluation.calibration: reliability bins and ECE of sigmoid(r_c - r_r), each pair in both orders."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.evaluation.calibration import preference_calibration


def test_by_hand() -> None:
    """Gaps [0, ln 3] give p = [0.5, 0.75]. Entries (p, observed): (0.5, 1), (0.75, 1), (0.5, 0), (0.25, 0).
    Bin [0.5, 0.6): two entries, predicted 0.5, observed 0.5 -> gap 0. Bin [0.7, 0.8): (0.75, 1) -> 0.25.
    Bin [0.2, 0.3): (0.25, 0) -> 0.25. ECE = 1/4 * 0.25 + 1/4 * 0.25 = 0.125."""
    chosen = torch.tensor([1.0, math.log(3.0) + 2.0])
    rejected = torch.tensor([1.0, 2.0])
    report = preference_calibration(chosen, rejected)
    assert report["ece"] == pytest.approx(0.125)
    assert report["pairs"] == 2
    bins = report["bins"]
    assert [b["count"] for b in bins] == [0, 0, 1, 0, 0, 2, 0, 1, 0, 0]
    assert bins[5]["predicted"] == pytest.approx(0.5) and bins[5]["observed"] == pytest.approx(0.5)
    assert bins[7]["predicted"] == pytest.approx(0.75) and bins[7]["observed"] == 1.0
    assert bins[2]["observed"] == 0.0 and bins[0]["predicted"] is None
    assert bins[9]["lower"] == pytest.approx(0.9) and bins[9]["upper"] == pytest.approx(1.0)


def test_limits() -> None:
    """An uninformative model (all gaps 0) is perfectly calibrated; a confidently right one has ECE ~ 0 too;
    a confidently wrong one (gap -20) has ECE ~ 1. p = 1 falls in the last, closed bin."""
    zeros = torch.zeros(5)
    assert preference_calibration(zeros, zeros)["ece"] == 0.0
    right = preference_calibration(torch.full((5,), 20.0), zeros)
    assert right["ece"] == pytest.approx(0.0, abs=1e-8) and right["bins"][9]["count"] == 5
    assert preference_calibration(torch.full((5,), -20.0), zeros)["ece"] == pytest.approx(1.0, abs=1e-8)
    with pytest.raises(ValueError):
        preference_calibration(zeros, zeros, n_bins=0)
