"""rlhf train rm: it learns the built-in preferences, reads scores at the last real token, adds margin and
centering by the formula, and saves a final/ that transformers loads with the same scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.config import DataConfig, ModelConfig, load_config
from rlhf.data import collate_pairs, load_records, pad_sequences, tokenize_records
from rlhf.models import padding_free
from rlhf.models.loading import load_scalar_model, load_tokenizer
from rlhf.tasks.sorting import write_task_files
from rlhf.trainers import reward

DATA = DataConfig(max_length=64, max_prompt_length=32)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("task"), n_train=2048, n_eval=256)


def make_cfg(model: str, task: dict[str, Path], out: Path, **overrides: object) -> reward.Config:
    values = {
        "output_dir": str(out),
        "model.path": model,
        "data.train": str(task["preference"]),
        "data.eval": str(task["preference_eval"]),
        "data.max_length": 64,
        "data.max_prompt_length": 32,
        "optim.lr": 3e-3,
        "schedule.warmup_steps": 10,
        "train.batch_size": 32,
        "train.micro_batch_size": 32,
        "train.max_steps": 300,
        "train.eval_every": 150,
        "logging.every": 10,
        "logging.progress": False,
        "checkpoint.resume": "never",
        **overrides,
    }
    return load_config(reward.Config, None, [f"--{k}={v}" for k, v in values.items()])


def pairs(model_dir: str, path: Path, n: int) -> list[dict]:
    records, _ = load_records(path, "preference")
    return tokenize_records(records[:n], "preference", load_tokenizer(model_dir), DATA)[0]


def test_rm_learns_the_sorting_preferences_and_final_loads(
    tiny_dirs: dict[str, str], task: dict, tmp_path: Path
) -> None:
    """(a) 300 steps of 32 pairs on a hidden-32 llama: held-out accuracy from chance (the random head) to > 0.65
    (measured 0.74-0.77 over seeds 0-3; eval loss 0.52-0.57, from ln 2 = 0.69). final/ loads with
    AutoModelForSequenceClassification and gives the logged eval numbers again; for llama (pad != eos)
    transformers' own pooling agrees too."""
    base = tiny_dirs["llama"]
    cfg = make_cfg(base, task, tmp_path / "run")
    held_out = pairs(base, task["preference_eval"], 256)
    pad_id = load_tokenizer(base).pad_token_id
    torch.manual_seed(cfg.seed)  # the head's initialisation, as in train()
    init_model = reward.SequenceScorer(load_scalar_model(ModelConfig(path=base)))
    c0, r0, _ = reward.score_pairs(init_model, held_out, pad_id, 64, torch.device("cpu"))
    init_accuracy = (c0 > r0).float().mean().item()

    run = reward.train(cfg)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/accuracy" in line]
    assert [line["step"] for line in evals] == [150, 300]
    last = evals[-1]
    assert init_accuracy < 0.6 and last["eval/accuracy"] > 0.65, (init_accuracy, last["eval/accuracy"])
    assert last["eval/loss"] < math.log(2) - 0.08 and last["eval/margin"] > 0.3
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["step"] == 300 and calibration["ece"] == last["eval/ece"]
    assert sum(b["count"] for b in calibration["bins"]) == 2 * 256

    loaded = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert loaded.config.num_labels == 1
    scorer = reward.SequenceScorer(loaded)
    chosen, rejected, _ = reward.score_pairs(scorer, held_out, pad_id, 64, torch.device("cpu"), share_prompt=True)
    assert (chosen > rejected).float().mean().item() == last["eval/accuracy"]
    assert (chosen - rejected).mean().item() == pytest.approx(last["eval/margin"], rel=1e-5)
    batch = collate_pairs(held_out[:8], pad_id)
    native = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(native, torch.cat([chosen[:8], rejected[:8]]))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_score_is_read_at_the_last_real_token_on_either_padding_side(tiny_dirs: dict[str, str], style: str) -> None:
    """The trainer's scoring path on a right- and a left-padded batch gives each sequence's score alone (no
    padding), and reads it where `transformers`' own pooling does: with gpt2's pad == eos, the token before EOS."""
    torch.manual_seed(0)
    model = load_scalar_model(ModelConfig(path=tiny_dirs[style]), trainable=False)
    scorer = reward.SequenceScorer(model)
    eos = load_tokenizer(tiny_dirs[style]).eos_token_id
    seqs = [[11, 40, 41, 42, 43, 44, eos], [12, 50, 51, eos], [13, 60, eos]]
    alone = torch.stack([scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    for left in (False, True):
        ids = pad_sequences(seqs, model.config.pad_token_id, left=left)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0, left=left)
        torch.testing.assert_close(scorer(ids, mask), alone, rtol=1e-5, atol=1e-5)
    ids = pad_sequences(seqs, model.config.pad_token_id)
    native = model(input_ids=ids, attention_mask=pad_sequences([[1] * len(s) for s in seqs], 0)).logits[:, 0]
    torch.testing.assert_close(native, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_shared_prompt_rows_give_the_two_row_scores_and_gradients(
    tiny_dirs: dict[str, str], task: dict, style: str
) -> None:
    """One row [prompt | chosen | rejected] with the tree mask and restarted positions scores each response as
    its own row does, and the loss has the same gradient; the rows are shorter than the two-row layout. The
    same rows back to back (padding-free, the tree mask inside each attention block) too, with no pads."""
    torch.manual_seed(0)
    model = load_scalar_model(ModelConfig(path=tiny_dirs[style])).eval()  # gpt2 has dropout: no random masks
    scorer = reward.SequenceScorer(model)
    exs = pairs(tiny_dirs[style], task["preference"], 12)
    pad_id = load_tokenizer(tiny_dirs[style]).pad_token_id
    loss_fn = reward.make_loss_fn(use_margin=True, center_coef=0.1)
    results = []
    for share, flat, round_to in ((False, False, 1), (True, False, 1), (True, True, 1), (True, True, 16)):
        batch = reward.make_collate(share, flat, round_to)(exs, pad_id)
        model.zero_grad()
        chosen, rejected = reward.pair_rewards(scorer, batch)
        loss, _, _ = loss_fn(scorer, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((chosen.detach(), rejected.detach(), loss.detach(), grads, batch["input_ids"].numel()))
    (c2, r2, l2, g2, n2), *shared = results
    for c1, r1, l1, g1, _ in shared:
        torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    (_, _, _, _, n1), (_, _, _, _, n_flat), (_, _, _, _, n_filled) = shared
    assert n1 < 0.8 * n2
    assert n_flat == sum(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in exs) < n1
    assert n_filled % 16 == 0 and 0 <= n_filled - n_flat < 16
    assert reward.supports_shared_prompt(model) and padding_free.enabled(model)


def test_shared_prompt_mask_by_hand() -> None:
    """P=2, C=2, R=1 padded to 6: positions 0 1 2 3 2 0; the rejected token (column 4) sees the prompt and
    itself, not the chosen columns 2-3; the pad column 5 sees itself only; scores at columns 3 and 4."""
    ex = {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "margin": 0.5}
    longer = {"prompt_ids": [5], "chosen_ids": [7, 8, 9], "rejected_ids": [4, 3], "margin": None}
    batch = reward.collate_shared_prompt([ex, longer], pad_id=0)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 0]
    assert batch["score_index"].tolist() == [[3, 4], [3, 5]]
    assert batch["margin"].tolist() == [0.5, 0.0]
    sees = batch["attention_mask"][0, 0].int().tolist()
    assert sees == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    flat = reward.collate_shared_prompt_flat([ex, longer], pad_id=0)  # the same rows back to back, no pad
    assert flat["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 5, 7, 8, 9, 4, 3]
    assert flat["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 0, 1, 2, 3, 1, 2]
    assert flat["score_index"].tolist() == [[3, 4], [5 + 3, 5 + 5]]
    (block,) = flat["flat_layout"].blocks  # one attention block, the longer pair first, the other padded to 6
    assert flat["flat_layout"].gather.tolist() == [5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 0]
    assert block.mask[1, 0].int().tolist() == sees
    assert block.mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]


class FixedScores(torch.nn.Module):
    """Stands in for the scorer: returns the given (2B,) scores whatever the batch."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.scores


def test_margin_and_centering_change_the_loss_by_the_hand_computed_amount() -> None:
    """Rewards chosen [1, 0], rejected [0, 1], margins [0.5, 0]:
    plain BT  = log(1 + e^-1) + log(1 + e^1) = 0.3132617 + 1.3132617 = 1.6265234
    margin    : the first pair becomes log(1 + e^-0.5) = 0.4740770, so +0.1608153
    centering : (1 + 0)^2 + (0 + 1)^2 = 2, times center_coef 0.1 = +0.2
    The loss is a sum over pairs with one unit per pair; the metrics are sums too."""
    fake = FixedScores([1.0, 0.0, 0.0, 1.0])
    batch = {"input_ids": torch.zeros(4, 3), "attention_mask": torch.ones(4, 3), "margin": torch.tensor([0.5, 0.0])}
    losses = {}
    for use_margin in (False, True):
        for coef in (0.0, 0.1):
            loss, units, metrics = reward.make_loss_fn(use_margin, coef)(fake, batch)
            assert units == 2
            losses[use_margin, coef] = loss.item()
    assert losses[False, 0.0] == pytest.approx(1.6265234, abs=1e-6)
    assert losses[True, 0.0] - losses[False, 0.0] == pytest.approx(0.1608153, abs=1e-6)
    assert losses[False, 0.1] - losses[False, 0.0] == pytest.approx(0.2, abs=1e-6)
    assert losses[True, 0.1] - losses[False, 0.0] == pytest.approx(0.3608153, abs=1e-6)
    assert metrics["loss/centering"].item() == pytest.approx(2.0)
    assert metrics["rewards/accuracy"].item() == 1.0 and metrics["rewards/margin"].item() == pytest.approx(0.0)


def test_use_margin_without_margins_is_a_user_error(tiny_dirs: dict[str, str], tmp_path: Path) -> None:
    from rlhf.errors import UserError

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"preference": path, "preference_eval": path}
    cfg = make_cfg(
        tiny_dirs["llama"],
        task,
        tmp_path / "run",
        use_margin=True,
        **{"train.batch_size": 2, "train.micro_batch_size": 2},
    )
    with pytest.raises(UserError, match="no training row .* has a `margin` field"):
        reward.train(cfg)


def test_lora_reward_model_saves_a_merged_plain_checkpoint(
    tiny_dirs: dict[str, str], task: dict, tmp_path: Path
) -> None:
    """LoRA (SEQ_CLS: the score head trains fully) on gpt2, where pad == eos: final/ loads as a plain
    one-label model without adapter keys and reproduces the logged held-out accuracy."""
    overrides = {"model.lora.r": 4, "train.max_steps": 4, "train.eval_every": 0, "train.batch_size": 8}
    overrides["train.micro_batch_size"] = 8
    run = reward.train(make_cfg(tiny_dirs["gpt2"], task, tmp_path / "run", **overrides))
    final = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert not any("lora" in k or "modules_to_save" in k for k in final.state_dict())
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    held_out = pairs(tiny_dirs["gpt2"], task["preference_eval"], 256)
    pad_id = load_tokenizer(tiny_dirs["gpt2"]).pad_token_id
    scorer = reward.SequenceScorer(final)
    chosen, rejected, _ = reward.score_pairs(scorer, held_out, pad_id, 64, torch.device("cpu"), share_prompt=True)
    assert (chosen - rejected).mean().item() == pytest.approx(last["eval/margin"], rel=1e-4, abs=1e-6)
