"""What the online trainers share: stop rules, the hacking signals, the evaluation during training (which never
changes what training samples), and an early stop that still saves final/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import ConfigError, load_config
from rlhf.rollout.batch import RolloutBatch
from rlhf.rollout.experience import Experience
from rlhf.runtime.online import HackingMonitor, StopRule, check_stop_rules, stop_reason
from rlhf.trainers import grpo

from _ppo_helpers import read_jsonl, write_prompts  # isort: skip


def test_stop_rules_parse_and_hold():
    assert StopRule.parse("hacking/length_drift>1.5") == StopRule("hacking/length_drift", ">", 1.5)
    assert StopRule.parse(" eval/gold <= 0.25 ").holds({"eval/gold": 0.25})
    assert not StopRule.parse("eval/gold<0.25").holds({"eval/gold": 0.25})
    assert not StopRule.parse("eval/gold<1").holds({})  # a metric not logged this iteration never stops a run
    assert stop_reason(["a>1", "b<0"], {"a": 0.5, "b": -1.0}) == "b < 0 (b = -1)"
    with pytest.raises(ConfigError, match=r"stop_when\[1\]: 'len above 2': expected METRIC>VALUE"):
        check_stop_rules(["a>1", "len above 2"])


def test_hacking_signals_by_hand():
    """Responses of lengths 2 and 4 (mean 3), then 6 and 6 (mean 6): drift 1, then 2. Tokens [5, 5, 5, 5] repeat
    bigram (5, 5): seq-rep-2 = 1 - 1/3; [7, 8] has none: the mean over the two is (2/3) / 2 = 1/3."""

    def exp(rows: list[list[int]], T: int) -> Experience:
        ids = torch.tensor([[1] + r + [0] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows])
        att = torch.cat([torch.ones(len(rows), 1, dtype=torch.long), mask.long()], dim=1)
        n, spread, ended = len(rows), torch.tensor([0.5, 1.5]), torch.ones(len(rows), dtype=torch.bool)
        return Experience(RolloutBatch(ids, att, mask, ()), None, None, None, None, torch.zeros(n), spread,
                          ["x"] * n, ended, 1, 0.0, 0.0)  # fmt: skip

    monitor = HackingMonitor()
    first = monitor.stats(exp([[7, 8], [5, 5, 5, 5]], 4))
    assert first["hacking/length_drift"].item() == 1.0
    assert first["hacking/repetition"].item() == pytest.approx(1 / 3)
    assert first["hacking/ensemble_std"].item() == 1.0
    later = monitor.stats(exp([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], 6))
    assert later["hacking/length_drift"].item() == 2.0 and later["hacking/repetition"].item() == 0.0
    resumed = HackingMonitor()
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.first_length == 3.0


def run(tiny_dirs: dict[str, str], tmp_path: Path, name: str, *extra: str) -> Path:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 64)
    held_out = write_prompts(tmp_path / "held_out.jsonl", 8, seed=9)
    cfg = load_config(
        grpo.Config,
        None,
        [f"--output_dir={tmp_path / name}", f"--model.path={tiny_dirs['llama']}", f"--data.train={prompts}",
         f"--data.eval={held_out}", "--reward.function=rlhf.tasks.sorting:gold_reward", "--rollout.batch_size=4",
         "--group_size=2", "--rollout.max_new_tokens=6", "--train.batch_size=8", "--train.micro_batch_size=8",
         "--total_episodes=48", "--optim.lr=1e-3", "--logging.progress=false", *extra],
    )  # fmt: skip
    return grpo.train(cfg)


def test_evaluation_during_training_changes_nothing_training_samples(tiny_dirs, tmp_path):
    """eval.every 2 over 6 iterations logs eval/* at iterations 2, 4, 6 (gold, proxy, KL, length ...); every other
    metric, and the final weights, equal a run without evaluation: its samples come from a forked RNG."""
    gold = "--eval.gold=rlhf.tasks.sorting:gold_reward"
    watched = read_jsonl(
        run(tiny_dirs, tmp_path, "watched", "--eval.every=2", gold, "--eval.kl_samples=2") / "metrics.jsonl"
    )
    plain = read_jsonl(run(tiny_dirs, tmp_path, "plain") / "metrics.jsonl")
    assert [int(m["grpo/iteration"]) for m in watched if "eval/gold" in m] == [2, 4, 6]
    assert {"eval/gold", "eval/proxy", "eval/kl", "eval/length", "eval/eos_rate", "eval/repetition"} <= set(watched[1])
    assert watched[1]["eval/gold"] == watched[1]["eval/proxy"]  # the training reward is the gold function here
    assert [{k: v for k, v in m.items() if not k.startswith("eval/")} for m in watched] == plain
    w, p = (
        load_file(tmp_path / "watched/final/model.safetensors"),
        load_file(tmp_path / "plain/final/model.safetensors"),
    )
    assert all(torch.equal(w[k], p[k]) for k in w)


def test_a_stop_rule_ends_the_run_early_with_a_final_model(tiny_dirs, tmp_path, capsys):
    run_dir = run(tiny_dirs, tmp_path, "stopped", "--stop_when=grpo/iteration>=2")
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["grpo/iteration"] for m in lines] == [1.0, 2.0]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert "rlhf: stopping at iteration 2: grpo/iteration >= 2 (grpo/iteration = 2)" in capsys.readouterr().err
    with pytest.raises(Exception, match="eval.every: no held-out prompts"):
        prompts = write_prompts(tmp_path / "p.jsonl", 80)
        cfg = load_config(grpo.Config, None, [f"--model.path={tiny_dirs['llama']}", f"--data.train={prompts}",
                                               "--reward.function=rlhf.tasks.sorting:gold_reward", "--eval.every=1",
                                               f"--output_dir={tmp_path / 'x'}"])  # fmt: skip
        grpo.train(cfg)


def test_an_iteration_in_which_the_minutes_passed_ends_with_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """`checkpoint_if_due` after an iteration of two steps: none while checkpoint.every_minutes have not passed;
    after an iteration during which they did, a checkpoint at its last step (not at the step where they passed)."""
    from _toy import TokenModel, make_engine, split, token_batches, token_loss

    from rlhf.runtime.online import checkpoint_if_due

    clock = [0.0]
    monkeypatch.setattr("rlhf.runtime.engine.time.monotonic", lambda: clock[0])
    batches = iter(token_batches(4))
    with make_engine(TokenModel(), tmp_path, ckpt_every_minutes=1.0) as engine:
        for minutes in (0.5, 0.6):  # 0.5 minutes into the first iteration, 1.1 into the second
            before = engine.step
            clock[0] += 60 * minutes
            for _ in range(2):
                engine.train_step(split(next(batches), 4), token_loss)
            checkpoint_if_due(engine, before)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4"]


class _Steps:
    """What `run_updates` reads of an engine and a batch, recording the rows of every optimizer step."""

    def __init__(self, n: int) -> None:
        self.n, self.steps = n, []
        self.train_cfg = type("TrainCfg", (), {"micro_batch_size": n})()

    def __len__(self) -> int:
        return self.n

    def micro_batches_per_step(self) -> int:
        return 1

    def micro_batches(self, rows, size, *, flat):  # one micro-batch per step, carrying its rows
        return [type("Micro", (), {"rows": rows, "attention_mask": torch.ones(len(rows), 1)})()]

    def train_step(self, micro_batches, loss_fn):
        self.steps.append(micro_batches[0].rows.tolist())
        return {"policy/approx_kl": 0.0}


def test_updates_shuffle_whole_groups_so_a_group_shares_its_minibatch():
    """16 rows in groups of 4 (a prompt's completions, consecutive), 2 minibatches, 2 epochs: every minibatch holds
    whole groups and every row comes once an epoch, in another order each epoch. Rows alone (group_size 1, PPO)
    are shuffled as torch.randperm of the same seed shuffles them."""
    from rlhf.runtime.online import run_updates

    steps = _Steps(16)
    run_updates(steps, steps, None, epochs=2, minibatches=2, seed=3, iteration=5, flat=True, group_size=4)
    assert len(steps.steps) == 4 and all(len(rows) == 8 for rows in steps.steps)
    for rows in steps.steps:
        assert sorted(rows) == sorted({r // 4 * 4 + j for r in rows for j in range(4)})  # whole groups
    assert sorted(steps.steps[0] + steps.steps[1]) == list(range(16)) == sorted(steps.steps[2] + steps.steps[3])
    assert steps.steps[:2] != steps.steps[2:]
    rows_alone = _Steps(16)
    run_updates(rows_alone, rows_alone, None, epochs=1, minibatches=2, seed=3, iteration=5, flat=True)
    g = torch.Generator().manual_seed((3 * 1_000_003 + 5 * 1_009 + 0) % 2**63)
    assert rows_alone.steps == [r.tolist() for r in torch.randperm(16, generator=g).tensor_split(2)]
