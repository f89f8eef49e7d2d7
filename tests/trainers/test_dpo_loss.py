"""The DPO trainer's loss is the math core applied to log-probs computed independently.

The trainer's loss for a batch (one concatenated, padded forward over [chosen; rejected], logits only from the
first response column on) is compared with `rlhf.losses.preference` applied to `plain_logps`: one unpadded row
at a time, a full forward, log_softmax + gather written in the test. Both tiny families are used: llama (own
pad token) and gpt2 (pad == eos, so padding must be found by length, not by id), and both batch layouts: the
prompt encoded once for both responses (a KV cache, `share_prompt`), full [chosen; rejected] rows, and each
pair as one padding-free tree sequence (`collate_flat`, what training runs by default).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _dpo_helpers import (
    examples,
    load_model,
    make_config,
    metrics,
    pair_logps,
    task_files,
    tokenizer_of,
)

from rlhf.config import ConfigError
from rlhf.losses.preference import dpo_loss, orpo_odds_ratio_loss, simpo_loss
from rlhf.models import padding_free
from rlhf.models.reference import Reference
from rlhf.runtime.data_order import DataOrder
from rlhf.tasks.tiny import make_tiny_checkpoint
from rlhf.trainers import dpo

B = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dpo_loss")
    files = task_files(root / "data", n_train=64, n_eval=16)
    out: dict[str, Any] = {"files": files}
    for style in ("llama", "gpt2"):
        policy_dir = make_tiny_checkpoint(root / f"{style}_policy", style, hidden_size=32, seed=3)
        ref_dir = make_tiny_checkpoint(root / f"{style}_ref", style, hidden_size=32, seed=4)
        tok = tokenizer_of(policy_dir)
        out[style] = {
            "policy": policy_dir,
            "ref": ref_dir,
            "tok": tok,
            "train": examples(files["preference"], "preference", tok),
        }
    return out


def expected_losses(
    cfg: dpo.Config, pol: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict]:
    """The math core on independently computed log-probs, per pair."""
    if cfg.loss_type == "simpo":
        return simpo_loss(pol["chosen_avg"], pol["rejected_avg"], beta=cfg.beta_value, gamma=cfg.simpo_gamma)
    if cfg.loss_type == "orpo":
        or_losses, m = orpo_odds_ratio_loss(pol["chosen_avg"], pol["rejected_avg"])
        sft_token_mean = -pol["chosen"].sum() / pol["chosen_n"].sum()  # NLL per chosen token over the batch
        return sft_token_mean + cfg.orpo_lambda * or_losses, {"rewards/accuracy": m["accuracy"], "loss/or": or_losses}
    key = "{}_avg" if cfg.loss_type == "ipo" and cfg.ipo_average else "{}"
    return dpo_loss(
        *(d[key.format(side)] for d in (pol, ref) for side in ("chosen", "rejected")),
        beta=cfg.beta_value,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
    )


CASES = [
    ("llama", {"loss_type": "sigmoid"}),
    ("llama", {"loss_type": "sigmoid", "share_prompt": False}),
    ("gpt2", {"loss_type": "sigmoid", "beta": 0.3}),
    ("gpt2", {"loss_type": "sigmoid", "beta": 0.3, "share_prompt": False}),
    ("llama", {"loss_type": "sigmoid", "label_smoothing": 0.2}),
    ("llama", {"loss_type": "ipo"}),
    ("gpt2", {"loss_type": "ipo", "ipo_average": True}),
    ("llama", {"loss_type": "hinge", "beta": 0.5}),
    ("llama", {"loss_type": "robust", "label_smoothing": 0.1}),
    ("llama", {"loss_type": "simpo", "simpo_gamma": 0.5}),
    ("gpt2", {"loss_type": "orpo", "orpo_lambda": 0.5}),
]


FLAT_CASES = [
    ("llama", {"loss_type": "sigmoid"}),
    ("gpt2", {"loss_type": "sigmoid", "beta": 0.3}),
    ("gpt2", {"loss_type": "ipo", "ipo_average": True}),
    ("llama", {"loss_type": "simpo", "simpo_gamma": 0.5}),
    ("gpt2", {"loss_type": "orpo", "orpo_lambda": 0.5}),
]
LAYOUTS = [(*c, False) for c in CASES] + [(*c, True) for c in FLAT_CASES]


@pytest.mark.parametrize(
    ("style", "values", "flat"),
    LAYOUTS,
    ids=[f"{s}-{'-'.join(map(str, v.values()))}{'-flat' if f else ''}" for s, v, f in LAYOUTS],
)
def test_batch_loss_equals_the_math_core_on_plain_log_probs(style: str, values: dict, flat: bool, setup: dict) -> None:
    s = setup[style]
    cfg = make_config(dpo, **values)
    policy, ref = load_model(s["policy"]), load_model(s["ref"])
    plain_policy, plain_ref = load_model(s["policy"]), load_model(s["ref"])  # the independent computation's
    exs = s["train"]
    idx = list(range(B))
    scale = B / sum(len(exs[i]["chosen_ids"]) for i in idx)
    reference = None if cfg.reference_free else Reference(model=ref)
    if flat:
        assert padding_free.enable(policy) and padding_free.enable(ref)
    collate = dpo.pair_collator(cfg, s["tok"].pad_token_id, flat)
    batch = dpo.make_batch(
        exs, idx, split="train", collate=collate, device=torch.device("cpu"), reference=reference, sft_scale=scale
    )
    if flat:  # every pair as one tree sequence, back to back in one row
        assert batch["input_ids"].shape[0] == 1 and batch["response_tokens"].shape[0] == 2 * B
    elif cfg.share_prompt:  # each prompt once (B rows), both responses after it (2B rows)
        assert batch["prompt_ids"].shape[0] == B and batch["response_ids"].shape[0] == 2 * B
    else:  # 2B full rows, logits only from the first response column on
        assert batch["input_ids"].shape[0] == 2 * B and batch["response_start"] > 1
    loss_sum, units, got = dpo.loss_fn(cfg, policy, batch)

    pol = pair_logps(plain_policy, [exs[i] for i in idx])
    ref_logps = None if cfg.reference_free else pair_logps(plain_ref, [exs[i] for i in idx])
    want, want_metrics = expected_losses(cfg, pol, ref_logps)
    assert units == B
    torch.testing.assert_close(loss_sum.double() / B, want.mean(), rtol=1e-5, atol=1e-5)
    for k, v in want_metrics.items():
        if k in got:
            torch.testing.assert_close(got[k].double() / B, v.double().mean(), rtol=1e-5, atol=1e-5, msg=k)
    torch.testing.assert_close(got["logps/chosen"].double() / B, pol["chosen"].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logps/rejected"].double() / B, pol["rejected"].mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_first_logged_loss_is_the_global_batch_loss_with_accumulation(
    loss_type: str, setup: dict, tmp_path: Path
) -> None:
    """Step 1 of a real run (a batch of 8 in two micro-batches of 4) logs the math-core loss of its global batch.

    ORPO's SFT term is a token mean over the chosen responses of the whole global batch, whatever the split.
    """
    s = setup["llama"]
    cfg = make_config(
        dpo,
        output_dir=tmp_path / "run",
        loss_type=loss_type,
        **{
            "model.path": s["policy"],
            **({} if loss_type == "orpo" else {"ref.path": s["ref"]}),
            "data.train": setup["files"]["preference"],
            "train.batch_size": 8,
            "train.micro_batch_size": 4,
            "train.max_steps": 1,
            "seed": 7,
        },
    )
    first = metrics(dpo.train(cfg))[0]
    idx = DataOrder(len(s["train"]), 8, seed=7).next_batch()
    pair_exs = [s["train"][i] for i in idx]
    pol = pair_logps(load_model(s["policy"]), pair_exs)
    ref = None if loss_type == "orpo" else pair_logps(load_model(s["ref"]), pair_exs)
    want, _ = expected_losses(cfg, pol, ref)
    assert first["train/loss"] == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
    assert first["train/units"] == 8


def test_reference_free_methods_never_load_a_reference(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SimPO and ORPO: no frozen copy, no second model loaded, no reference scoring, no ref_logps/ directory."""
    s = setup["llama"]
    loaded: list[bool] = []

    def load_causal_lm(model_cfg: Any, *, trainable: bool = True) -> Any:
        if not trainable:
            raise AssertionError("a reference model was loaded")
        loaded.append(trainable)
        return real_load(model_cfg, trainable=trainable)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("reference log-probs were computed")

    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", load_causal_lm)
    monkeypatch.setattr(dpo, "frozen_copy", refuse)
    monkeypatch.setattr(Reference, "score", refuse)
    for loss_type in ("simpo", "orpo"):
        cfg = make_config(
            dpo,
            output_dir=tmp_path / loss_type,
            loss_type=loss_type,
            **{
                "model.path": s["policy"],
                "data.train": setup["files"]["preference"],
                "data.eval": setup["files"]["preference_eval"],
                "train.batch_size": 8,
                "train.max_steps": 2,
            },
        )
        run_dir = dpo.train(cfg)
        assert (run_dir / "final" / "model.safetensors").is_file() and not (run_dir / "ref_logps").exists()
        assert "eval/rewards/accuracy" in metrics(run_dir)[-1]
    assert loaded == [True, True]  # the policies only


def test_lora_reference_is_the_base_model_under_the_adapters(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LoRA and no `ref`, no copy of the weights is made: the reference is the policy with its adapters off.

    At step 1 the fresh adapters add exactly 0 (LoRA's B starts at 0), so policy == reference and the sigmoid
    loss is log 2; the live and the cached reference give the same run.
    """
    monkeypatch.setattr(dpo, "frozen_copy", lambda *_: pytest.fail("a frozen copy was made"))
    runs = []
    for precompute in (False, True):
        cfg = make_config(
            dpo,
            output_dir=tmp_path / f"lora-{precompute}",
            precompute_ref=precompute,
            **{
                "model.path": setup["llama"]["policy"],
                "model.lora.r": 4,
                "data.train": setup["files"]["preference"],
                "train.batch_size": 8,
                "train.max_steps": 3,
                "optim.lr": 1e-2,
            },
        )
        runs.append(metrics(dpo.train(cfg)))
    for m in runs:
        assert m[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert abs(m[2]["train/loss"] - math.log(2)) > 1e-4  # the adapters moved, the reference did not
    for a, b in zip(*runs, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing: must be in"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing: must be in"),
        ({"loss_type": "simpo", "ref.path": "x"}, "ref: simpo is reference-free"),
        ({"loss_type": "orpo", "precompute_ref": True}, "precompute_ref: orpo has no reference model"),
        ({"beta": 0}, "beta: must be > 0"),
    ],
)
def test_config_rejects_inconsistent_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(dpo, **overrides)
    assert make_config(dpo, loss_type="simpo").beta_value == 2.0 and make_config(dpo).beta_value == 0.1
