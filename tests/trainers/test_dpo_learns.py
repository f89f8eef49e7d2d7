"""Every DPO-family method learns the built-in task's preference: held-out implied-reward accuracy well above 50%.

Each run starts from the session's random-init tiny llama (hidden 32, 2 layers) and takes 40 steps of 16 pairs
from the sorting task (chosen = the answer with the higher gold score). The accuracy is recomputed here from
the final weights by `plain_logps` (unpadded, one row at a time) and must agree with the trainer's own
`eval/rewards/accuracy`. For the DPO family the initial accuracy is 0 by construction (policy == reference,
every pair a tie); for SimPO and ORPO, whose reward is the policy's own average log-prob, it is that of the
random init, and the test also checks the gain over it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _dpo_helpers import (
    examples,
    implied_reward_accuracy,
    load_model,
    make_config,
    metrics,
    task_files,
    tokenizer_of,
)

from rlhf.trainers import dpo

METHODS = {
    "sigmoid": {"optim.lr": 1e-3},
    "ipo": {"optim.lr": 1e-3},
    "hinge": {"optim.lr": 1e-3},
    "robust": {"optim.lr": 1e-3, "label_smoothing": 0.1},
    "simpo": {"optim.lr": 2e-3},
    "orpo": {"optim.lr": 3e-3, "orpo_lambda": 1.0},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return task_files(tmp_path_factory.mktemp("task"), n_train=320)


@pytest.mark.parametrize("loss_type", list(METHODS))
def test_method_learns_the_held_out_preference(
    loss_type: str, tiny_dirs: dict[str, str], data: dict[str, Path], tmp_path: Path
) -> None:
    cfg = make_config(
        dpo,
        output_dir=tmp_path / "run",
        loss_type=loss_type,
        **{
            "model.path": tiny_dirs["llama"],
            "data.train": data["preference"],
            "data.eval": data["preference_eval"],
            "train.batch_size": 16,
            "train.micro_batch_size": 16,
            "train.max_steps": 40,
            **METHODS[loss_type],
        },
    )
    run_dir = dpo.train(cfg)
    held_out = examples(data["preference_eval"], "preference", tokenizer_of(tiny_dirs["llama"]))
    init, final = load_model(tiny_dirs["llama"]), load_model(run_dir / "final")
    if cfg.reference_free:
        before = implied_reward_accuracy(init, None, held_out, average=True)
        after = implied_reward_accuracy(final, None, held_out, average=True)
        assert after >= before + 0.1, (before, after)
    else:
        after = implied_reward_accuracy(final, init, held_out)
    assert after >= 0.7, after
    last = metrics(run_dir)[-1]
    assert last["step"] == 40
    assert last["eval/rewards/accuracy"] == pytest.approx(after, abs=1 / len(held_out) + 1e-9)
    assert last["eval/rewards/margin"] > 0
