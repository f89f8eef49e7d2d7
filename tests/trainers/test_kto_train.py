"""KTO: learns the task's preference from unpaired labels, computes exactly the math core's loss with the paper's
mismatched-pair KL reference point, and trains the same with the reference cache.

Learning is measured two ways on held-out data: the implied reward beta * (log pi - log pi_ref) of the final
policy must order the held-out PREFERENCE pairs (chosen above rejected) like DPO's accuracy does, and the
trainer's own `eval/rewards/accuracy` on the held-out UNPAIRED data - the probability that a desirable example
gets a higher implied reward than an undesirable one (ROC AUC; 0.5 is chance) - must be well above chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dpo_helpers import (
    examples,
    implied_reward_accuracy,
    load_model,
    make_config,
    metrics,
    quick_sft,
    task_files,
    tokenizer_of,
    unpaired_logps,
)
from safetensors.torch import load_file

from rlhf.losses.preference import kto_loss
from rlhf.runtime.data_order import DataOrder
from rlhf.tasks.tiny import make_tiny_checkpoint
from rlhf.trainers import kto


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return task_files(tmp_path_factory.mktemp("kto_task"), n_train=320)


def config(run_dir: Path, model: Path | str, data: dict[str, Path], **values: Any) -> kto.Config:
    return make_config(
        kto,
        output_dir=run_dir,
        **{
            "model.path": model,
            "data.train": data["unpaired"],
            "data.eval": data["unpaired_eval"],
            "train.batch_size": 16,
            "train.micro_batch_size": 8,
            **values,
        },
    )


def test_kto_learns_the_held_out_preference(tiny_dirs: dict[str, str], data: dict[str, Path], tmp_path: Path) -> None:
    sft = quick_sft(tiny_dirs["llama"], data["sft"], tmp_path / "sft")
    run_dir = kto.train(config(tmp_path / "run", sft, data, **{"train.max_steps": 40, "optim.lr": 1e-3}))
    pairs = examples(data["preference_eval"], "preference", tokenizer_of(sft))
    accuracy = implied_reward_accuracy(load_model(run_dir / "final"), load_model(sft), pairs)
    assert accuracy >= 0.7, accuracy
    last = metrics(run_dir)[-1]
    assert last["step"] == 40
    assert last["eval/rewards/accuracy"] >= 0.65
    assert last["eval/rewards/margin"] > 0


@pytest.mark.parametrize("padding_free", [True, False], ids=["flat", "padded"])
def test_first_step_loss_is_the_math_core_with_the_mismatched_kl(
    tmp_path: Path, data: dict[str, Path], padding_free: bool
) -> None:
    """Step 1 (a global batch of 8 in two micro-batches): loss, z and per-class rewards from plain log-probs, with
    the examples back to back in one padding-free row and in padded rows.

    z = mean over the batch of log pi - log pi_ref of prompt k with completion k+1 (cyclic), clamped at 0.
    """
    dirs = [make_tiny_checkpoint(tmp_path / f"m{s}", "llama", hidden_size=32, seed=s) for s in (3, 4)]
    exs = examples(data["unpaired"], "unpaired", tokenizer_of(dirs[0]))
    idx = DataOrder(len(exs), 8, seed=3).next_batch()
    batch = [exs[i] for i in idx]
    models = [load_model(d) for d in dirs]
    z = float((unpaired_logps(models[0], batch, shift=1) - unpaired_logps(models[1], batch, shift=1)).mean())
    if z <= 0:  # make the reference point non-trivial (not clamped to 0): swap policy and reference
        dirs, models, z = dirs[::-1], models[::-1], -z
    cfg = config(
        tmp_path / "run",
        dirs[0],
        data,
        **{
            "ref.path": dirs[1],
            "data.padding_free": padding_free,
            "train.batch_size": 8,
            "train.micro_batch_size": 4,
            "train.max_steps": 1,
            "seed": 3,
        },
    )
    first = metrics(kto.train(cfg))[0]

    pol, ref = unpaired_logps(models[0], batch), unpaired_logps(models[1], batch)
    labels = torch.tensor([ex["label"] for ex in batch])
    losses, m = kto_loss(pol, ref, labels, z, beta=cfg.beta)
    assert 0 < labels.sum() < len(labels)
    assert first["train/loss"] == pytest.approx(float(losses.mean()), rel=1e-5, abs=1e-6)
    assert first["kto/kl"] == pytest.approx(z, rel=1e-5, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(float(m["rewards"][labels].mean()), rel=1e-5, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(float(m["rewards"][~labels].mean()), rel=1e-5, abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(float(pol[labels].mean()), rel=1e-5, abs=1e-6)
    assert first["data/desirable_fraction"] == pytest.approx(float(labels.double().mean()))


def test_reference_cache_trains_like_the_live_reference(
    tiny_dirs: dict[str, str], data: dict[str, Path], tmp_path: Path
) -> None:
    values = {"train.max_steps": 6, "train.eval_every": 3, "optim.lr": 1e-3}
    live = kto.train(config(tmp_path / "live", tiny_dirs["llama"], data, **values))
    cached = kto.train(config(tmp_path / "cached", tiny_dirs["llama"], data, precompute_ref=True, **values))
    (cache,) = (cached / "ref_logps").iterdir()
    table = load_file(cache)
    assert table["train"].shape == (320, 1) and table["eval"].shape == (64, 1)
    exs = examples(data["unpaired_eval"], "unpaired", tokenizer_of(tiny_dirs["llama"]))
    torch.testing.assert_close(
        table["eval"][:, 0].double(), unpaired_logps(load_model(tiny_dirs["llama"]), exs), atol=2e-5, rtol=1e-5
    )
    a, b = load_file(live / "final" / "model.safetensors"), load_file(cached / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    for ma, mb in zip(metrics(live), metrics(cached), strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-5), k


def test_mismatched_pairs_shift_by_one_within_the_batch() -> None:
    exs = [{"prompt_ids": [1, k], "completion_ids": [10 + k] * (k + 1), "label": True} for k in range(3)]
    pairs = kto.mismatched(exs, max_length=4)
    assert [p["prompt_ids"] for p in pairs] == [[1, 0], [1, 1], [1, 2]]
    assert [p["completion_ids"] for p in pairs] == [[11, 11], [12, 12], [10]]  # [12, 12, 12] cut to 4 tokens
    assert not any(p["label"] for p in pairs)


def test_pairwise_accuracy_and_class_means_by_hand() -> None:
    # desirable rewards 3, 1; undesirable 2, 1: pairs (3>2) (3>1) (1<2) (1=1 -> half) = 2.5 / 4
    rewards, desirable = torch.tensor([3.0, 2.0, 1.0, 1.0]), torch.tensor([True, False, True, False])
    assert kto.pairwise_accuracy(rewards, desirable) == 0.625
    assert kto.pairwise_accuracy(rewards, torch.ones(4, dtype=torch.bool)) == 0.5
    sums = {
        "sum/desirable": 0.25,
        "sum/undesirable": 0.75,
        "sum/rewards/chosen": 0.5,
        "sum/rewards/rejected": -0.3,
        "sum/logps/chosen": -1.0,
        "sum/logps/rejected": -6.0,
        "kto/kl": 0.1,
    }
    assert kto.class_means(sums) == pytest.approx(
        {
            "kto/kl": 0.1,
            "rewards/chosen": 2.0,
            "rewards/rejected": -0.4,
            "rewards/margin": 2.4,
            "logps/chosen": -4.0,
            "logps/rejected": -8.0,
        }
    )
