"""rlhf eval --reward-model: per-row scores equal the reward-model training path's scores; the summary."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from rlhf.cli import main as rlhf_main
from rlhf.config import DataConfig, ModelConfig
from rlhf.data import collate_pairs, records_from_rows, tokenize_records
from rlhf.evaluation.cli import main
from rlhf.models.loading import load_scalar_model, load_tokenizer
from rlhf.tasks.sorting import sft_rows
from rlhf.trainers.reward import SequenceScorer, pair_rewards


@pytest.fixture(scope="module")
def reward_model(tiny_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model directory as `rlhf train rm` writes it (a random head is enough to compare scores)."""
    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = load_scalar_model(ModelConfig(path=tiny_dirs["llama"]), trainable=False)
    model.save_pretrained(out)
    load_tokenizer(tiny_dirs["llama"]).save_pretrained(out)
    return out


def test_eval_scores_equal_the_training_path(reward_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The rows' scores are what the RM trainer gives the same (prompt, response) as a chosen response: built
    by tokenize_records(kind preference) + collate_pairs + the trainer's pair_rewards, in batches of another
    size. The printed summary is n, mean, std (population), min and max of those scores."""
    rows = sft_rows(21, seed=5)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    argv = ["--reward-model", str(reward_model), "--data", str(data), "--out", str(out), "--batch-size", "4"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["row"] for s in scored] == list(range(21))
    assert [s["letters"] for s in scored] == [r["letters"] for r in rows]
    assert scored[0]["completion"] == rows[0]["completion"][0]["content"]

    pref_rows = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "x"}]}
        for r in rows
    ]
    tokenizer = load_tokenizer(str(reward_model))
    records, _ = records_from_rows(pref_rows, "preference")
    examples, _ = tokenize_records(records, "preference", tokenizer, DataConfig())
    scorer = SequenceScorer(load_scalar_model(ModelConfig(path=str(reward_model)), trainable=False))
    with torch.no_grad():
        chosen, _ = pair_rewards(scorer, collate_pairs(examples, tokenizer.pad_token_id))
    torch.testing.assert_close(torch.tensor([s["reward"] for s in scored]), chosen, rtol=1e-5, atol=1e-5)

    values = [s["reward"] for s in scored]
    assert summary["n"] == 21
    assert summary["reward/mean"] == pytest.approx(statistics.fmean(values))
    assert summary["reward/std"] == pytest.approx(statistics.pstdev(values))
    assert (summary["reward/min"], summary["reward/max"]) == (min(values), max(values))


def test_eval_through_the_rlhf_command_and_its_errors(reward_model: Path, tmp_path: Path, capsys) -> None:
    """`rlhf eval` dispatches here; no evaluation asked is a usage error (2); text rows are a data error (1)."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "sort: cba", "completion": "abc"}) + "\n")
    assert rlhf_main(["eval", "--reward-model", str(reward_model), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["n"] == 1
    assert rlhf_main(["eval", "--data", str(data)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    assert rlhf_main(["eval", "--reward-model", str(reward_model), "--data", str(data)]) == 1
    assert "needs prompt + completion rows" in capsys.readouterr().err


def test_the_table_never_shows_minus_zero() -> None:
    """A policy equal to its reference up to float noise has a sampled KL of about -1e-7: "0.000", not "-0.000"; a
    real negative still shows its sign."""
    from rlhf.evaluation.cli import format_table

    result = {"prompts": 2, "policies": {"a": {"kl": -1e-7, "proxy": -0.25}, "b": {"kl": 0.0004, "proxy": 1.0}}}
    rows = format_table(result).splitlines()
    assert rows[1].split() == ["a", "-0.250", "0.000"] and rows[2].split() == ["b", "1.000", "0.000"]
