"""PPO learns: a tiny policy, briefly supervised on the built-in sorting task, raises its mean gold reward
(`rlhf.tasks.sorting:gold_reward`, optimum 1.0: the sorted letters, then EOS) within 640 episodes, while the
adaptive controller steers the measured KL towards its target. Also checks what the run directory holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import DataConfig, LoggingConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from rlhf.rollout.config import KLConfig, RewardConfig, RolloutConfig
from rlhf.tasks.sorting import gold_score
from rlhf.trainers import ppo

from _ppo_helpers import read_jsonl, sft_warm_start, write_prompts  # isort: skip

BATCH, ITERATIONS, KL_TARGET, HORIZON = 32, 20, 1.0, 64.0


@pytest.fixture(scope="module")
def run(tiny_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ppo_learn")
    policy = sft_warm_start(tiny_dirs["llama"], root / "sft", steps=60)
    cfg = ppo.Config(
        output_dir=str(root / "run"),
        total_episodes=BATCH * ITERATIONS,
        model=ModelConfig(path=str(policy)),
        data=DataConfig(
            train=str(write_prompts(root / "prompts.jsonl", 256, seed=2)), max_length=40, max_prompt_length=24
        ),
        rollout=RolloutConfig(batch_size=BATCH, forward_batch_size=BATCH, max_new_tokens=10),
        reward=RewardConfig(function="rlhf.tasks.sorting:gold_reward"),
        kl=KLConfig(coef=0.05, target=KL_TARGET, horizon=HORIZON),
        optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(name="constant"),
        train=TrainConfig(batch_size=8, micro_batch_size=8),
        logging=LoggingConfig(progress=False),
        samples_every=5,
        num_samples=3,
    )
    return ppo.train(cfg)


def test_mean_gold_reward_rises(run: Path):
    lines = read_jsonl(run / "metrics.jsonl")
    scores = [m["reward/score"] for m in lines]
    curve = [sum(scores[i : i + 4]) / 4 for i in range(0, ITERATIONS, 4)]  # mean gold reward per 128 episodes
    print("mean gold reward per 128 episodes:", [round(c, 3) for c in curve])
    assert len(lines) == ITERATIONS and lines[-1]["ppo/episodes"] == BATCH * ITERATIONS
    # Iterations 8-19 against 0-3, a statistic over most of the run: over seeds 0-5 it was 0.081-0.110, and
    # -0.014-0.010 for a policy that does not learn (lr 1e-9, seeds 0-3). The last 5 iterations against the
    # first 5 (0.068-0.144 over seeds 0-5) and the last 4 against the first 4 held 0.08 on some seeds only.
    assert sum(curve[2:]) / len(curve[2:]) > curve[0] + 0.05


def test_adaptive_controller_holds_kl_near_its_target(run: Path):
    """Each iteration's coefficient follows beta' = beta (1 + clip(KL / target - 1, +-0.2) * 32 / 64) from the
    logged KL of the previous one (so the measured mean sequence KL is what steers it), and the KL of the second
    half of the run stays within a factor 2.5 of the target."""
    lines = read_jsonl(run / "metrics.jsonl")
    for prev, cur in zip(lines, lines[1:], strict=False):
        error = min(max(prev["objective/kl"] / KL_TARGET - 1, -0.2), 0.2)
        assert cur["objective/kl_coef"] == pytest.approx(prev["objective/kl_coef"] * (1 + error * BATCH / HORIZON))
    late = [m["objective/kl"] for m in lines[ITERATIONS // 2 :]]
    print("objective/kl, second half:", [round(k, 2) for k in late])
    assert KL_TARGET / 2.5 < sum(late) / len(late) < KL_TARGET * 2.5
    assert lines[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout is the reference itself


def test_step_metrics_are_finite_and_namespaced(run: Path):
    lines = read_jsonl(run / "metrics.jsonl")
    keys = {
        "reward/score", "reward/shaped", "objective/kl", "objective/entropy", "objective/kl_coef", "policy/loss",
        "policy/clipfrac", "policy/approx_kl", "value/loss", "value/clipfrac", "value/explained_variance",
        "response/length", "response/eos_fraction", "train/loss", "ppo/updates",
    }  # fmt: skip
    for m in lines:
        assert keys <= m.keys() and all(isinstance(v, float) and v == v for k, v in m.items() if k != "step")
        assert m["ppo/updates"] == 4 * BATCH // 8 and not any(k.startswith("perf/") for k in m)
    assert [m["step"] for m in lines] == [16 * (i + 1) for i in range(ITERATIONS)]
    perf = read_jsonl(run / "perf.jsonl")
    assert all(p["perf/generation_tokens_per_s"] > 0 and p["perf/train_tokens_per_s"] > 0 for p in perf)


def test_run_directory_holds_the_policy_the_critic_and_samples(run: Path):
    policy = AutoModelForCausalLM.from_pretrained(run / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(run / "final_value")
    assert critic.config.num_labels == 1 and policy.config.vocab_size == critic.config.vocab_size
    samples = read_jsonl(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [16 * 5] * 3 + [16 * 10] * 3 + [16 * 15] * 3 + [16 * 20] * 3
    for s in samples:
        letters = s["prompt"][0]["content"].removeprefix("sort: ")
        assert s["score"] == pytest.approx(gold_score(letters, s["response"]))
    assert "rlhf.tasks.sorting:gold_reward" in (run / "config.yaml").read_text()
