"""A reward model trained here scores in plain `transformers` what it scored in training, on three tiny families:
llama (pad != eos), gpt2 (pad == eos) and qwen2 (ChatML: the template writes a newline after <|im_end|>).

The rule (`rlhf.models.forward.score_index`, docs/data.md): a conversation is the chat template's rendering
(`apply_chat_template(messages, tokenize=True)`, text after the EOS included), read at the rightmost token that
is not the pad id, which is where `AutoModelForSequenceClassification` pools. The same rule reads third-party
reward models the way they were trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config import DataConfig, ModelConfig, load_config
from rlhf.data import collate_pairs, records_from_rows, tokenize_records
from rlhf.models.loading import load_scalar_model
from rlhf.rollout.rewards import RewardModelReward
from rlhf.tasks import lazy_sorting
from rlhf.tasks.tiny import make_tiny_checkpoint
from rlhf.trainers import reward


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return lazy_sorting.write_task_files(tmp_path_factory.mktemp("pairs"), n_train=64, n_eval=12)


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen2"])
def test_the_trained_reward_model_scores_the_same_in_plain_transformers(style, data, tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", style, hidden_size=32)
    cfg = load_config(
        reward.Config,
        None,
        [f"--output_dir={tmp_path / 'rm'}", f"--model.path={base}", f"--data.train={data['preference']}",
         "--train.max_steps=6", "--train.batch_size=8", "--train.micro_batch_size=8", "--optim.lr=1e-3",
         "--logging.progress=false"],
    )  # fmt: skip
    final = reward.train(cfg) / "final"
    tok = AutoTokenizer.from_pretrained(final)
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    rows = [json.loads(line) for line in data["preference_eval"].read_text().splitlines()]
    conversations = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    with torch.no_grad():
        plain = torch.tensor([
            hf(input_ids=torch.tensor([tok.apply_chat_template(c, tokenize=True)["input_ids"]])).logits[0, 0].item()
            for c in conversations
        ])  # fmt: skip

    # what `rlhf eval`, PPO and GRPO score (RewardModelReward re-tokenizes the decoded text)
    source = RewardModelReward(load_scalar_model(ModelConfig(path=str(final)), trainable=False), tok, batch_size=5)
    prompts = [r["prompt"] for r in rows] * 2
    texts = [c[-1]["content"] for c in conversations]
    torch.testing.assert_close(source.score(prompts, texts, [{}] * len(texts)), plain, atol=1e-4, rtol=0)

    # what training scored: the trainer's own tokenization and both of its batch layouts
    records, _ = records_from_rows(rows, "preference")
    examples, _ = tokenize_records(records, "preference", tok, DataConfig(), whole_turns=True)
    scorer = reward.SequenceScorer(load_scalar_model(ModelConfig(path=str(final)), trainable=False))
    with torch.no_grad():
        for layout in (collate_pairs, reward.collate_shared_prompt):
            chosen, rejected = reward.pair_rewards(scorer, layout(examples, tok.pad_token_id))
            torch.testing.assert_close(torch.cat([chosen, rejected]), plain, atol=1e-4, rtol=0)
    if style == "qwen2":  # the template's newline after <|im_end|> is part of what is scored
        assert tok.apply_chat_template(conversations[0], tokenize=False).endswith("<|im_end|>\n")
