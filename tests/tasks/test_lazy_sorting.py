"""The demo's task by its stated formulas: the labellers' Bradley-Terry noise, the demonstrators' laziness, the
labels' agreement with gold, determinism."""

from __future__ import annotations

import math
import random

import pytest

from rlhf.tasks import lazy_sorting as task


def test_labeller_preference_is_bradley_terry_on_gold_plus_length_by_hand():
    """letters "cab": "abc" has gold 1, "ab" gold 2/3. Temperature 0.1: P = sigmoid((1/3) / 0.1) = sigmoid(10/3);
    with a length bias of 0.05 per character the complete answer gains 0.05 more: sigmoid((1/3 + 0.05) / 0.1)."""
    assert task.Labeller(0.1).prefers("cab", "abc", "ab") == pytest.approx(1 / (1 + math.exp(-10 / 3)))
    biased = task.Labeller(0.1, length_bias=0.05)
    assert biased.prefers("cab", "abc", "ab") == pytest.approx(1 / (1 + math.exp(-(1 / 3 + 0.05) / 0.1)))
    assert biased.prefers("cab", "ab", "abc") == pytest.approx(1 - biased.prefers("cab", "abc", "ab"))


def test_labels_follow_the_labellers_probabilities():
    """Over 3000 pairs, the labels agree with gold as often as the labellers' formula says they should: the mean
    of P_j(gold's better answer wins) over the pairs, within 4 standard errors; `gold_agrees` is gold's verdict."""
    expected, rows = [], task.preference_rows(3000, seed=3)
    for i, row in enumerate(rows):
        c, r = row["chosen"][0]["content"], row["rejected"][0]["content"]
        better, worse = (c, r) if row["gold_agrees"] else (r, c)
        assert (task.gold_score(row["letters"], better) > task.gold_score(row["letters"], worse)) is True
        assert row["labeller"] == i % len(task.LABELLERS)
        expected.append(task.LABELLERS[row["labeller"]].prefers(row["letters"], better, worse))
    mean_p = sum(expected) / len(expected)
    se = math.sqrt(sum(p * (1 - p) for p in expected)) / len(expected)
    assert abs(task.labeller_agreement(rows) - mean_p) < 4 * se
    assert 0.85 < mean_p < 0.97  # noisy, but mostly right


def test_a_judge_labels_instead_when_given():
    """The RLAIF case: judge(letters, a, b) = 0.8 always: the first candidate wins 80% of the time (4 se)."""
    firsts: list[str] = []

    def judge(letters: str, a: str, b: str) -> float:
        firsts.append(a)
        return 0.8

    rows = task.preference_rows(2000, seed=5, judge=judge)
    won = sum(row["chosen"][0]["content"] == a for row, a in zip(rows, firsts, strict=True)) / len(rows)
    assert abs(won - 0.8) < 4 * math.sqrt(0.8 * 0.2 / len(rows))
    assert {row["labeller"] for row in rows} == {"judge"}


def test_demonstrators_are_lazy_at_the_stated_rate():
    """LAZINESS of the demonstrations stop one letter short (4 se), a few more swap; the rest are the sorted
    letters, so the best a copy of them can do is the sorted answer a minority of the time."""
    rows = task.sft_rows(4000, seed=1)
    short = sum(len(r["completion"][0]["content"]) == len(r["letters"]) - 1 for r in rows) / len(rows)
    assert abs(short - task.LAZINESS) < 4 * math.sqrt(task.LAZINESS * (1 - task.LAZINESS) / len(rows))
    exact = sum(r["completion"][0]["content"] == "".join(sorted(r["letters"])) for r in rows) / len(rows)
    assert exact == pytest.approx((1 - task.LAZINESS) * (1 - task.SLIP), abs=0.03)
    rng = random.Random(0)
    assert all(len(task.demonstration("dcba", rng)) in (3, 4) for _ in range(100))


def test_rows_are_deterministic_for_a_seed(tmp_path):
    assert task.preference_rows(50, seed=9) == task.preference_rows(50, seed=9)
    assert task.sft_rows(20, seed=2) != task.sft_rows(20, seed=3)
    files = task.write_task_files(tmp_path, n_train=16, n_eval=4)
    assert set(files) == {f"{k}{s}" for k in ("sft", "preference", "unpaired", "prompt") for s in ("", "_eval")}
    assert len(files["preference_eval"].read_text().splitlines()) == 4
