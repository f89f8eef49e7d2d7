"""Models that pass information along the sequence by more than attention (a linear-attention layer here:
Qwen3.5's gated delta rule, as Mamba's, Jamba's and LFM2's state-space and convolution layers do): neither an
attention mask nor a KV cache says who sees whom in them, so the shared-prompt layouts are not theirs and they
train on plain rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _dpo_helpers import make_config, task_files
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf.config import DataConfig, ModelConfig
from rlhf.data import load_records, tokenize_records
from rlhf.errors import ConfigError
from rlhf.models.forward import mixes_by_attention_alone, sequence_scores
from rlhf.models.loading import load_scalar_model, load_tokenizer
from rlhf.rollout.generation import decodes_itself
from rlhf.tasks.tiny import build_tokenizer
from rlhf.trainers import dpo, reward, sft


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3.5 text checkpoint: a linear-attention layer, then an attention layer."""
    out = tmp_path_factory.mktemp("qwen3_5")
    tok = build_tokenizer("llama")
    config = AutoConfig.for_model(
        "qwen3_5_text", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"], pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_attention_alone_is_told_from_the_cache_layers(tiny_dirs: dict[str, str], hybrid: Path) -> None:
    """Llama and GPT-2 mix tokens by attention alone and sample through our KV-cache `decode`; the Qwen3.5 hybrid and
    Mamba do not, and sample through `generate` (under `decode`, RecurrentGemma's tokens left `generate`'s)."""
    for style in ("llama", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style])
        assert mixes_by_attention_alone(model) and decodes_itself(model)
    model = AutoModelForCausalLM.from_pretrained(hybrid)
    assert not mixes_by_attention_alone(model) and not decodes_itself(model)
    mamba = AutoConfig.for_model("mamba", vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    model = AutoModelForCausalLM.from_config(mamba)
    assert not mixes_by_attention_alone(model) and not decodes_itself(model)


def test_reward_pairs_of_a_hybrid_score_as_each_response_alone(hybrid: Path, tmp_path: Path) -> None:
    """With `share_prompt` where the model allows it, the trainer's pair scores are each [prompt | response] row's
    own (one row [prompt | chosen | rejected] let the linear attention carry the chosen into the rejected)."""
    files = task_files(tmp_path, n_train=8, n_eval=4)
    records, _ = load_records(files["preference"], "preference")
    data = DataConfig(max_length=48, max_prompt_length=24)
    pairs = tokenize_records(records, "preference", load_tokenizer(str(hybrid)), data)[0]
    model = load_scalar_model(ModelConfig(path=str(hybrid)), trainable=False)
    pad_id = model.config.pad_token_id
    share = reward.supports_shared_prompt(model)
    scorer = reward.SequenceScorer(model)
    chosen, rejected, _ = reward.score_pairs(scorer, pairs, pad_id, 4, torch.device("cpu"), share_prompt=share)
    with torch.no_grad():
        for i, ex in enumerate(pairs):
            for key, got in (("chosen_ids", chosen[i]), ("rejected_ids", rejected[i])):
                ids = torch.tensor([ex["prompt_ids"] + ex[key]])
                torch.testing.assert_close(got, sequence_scores(model, ids, torch.ones_like(ids))[0])


def test_dpo_trains_a_hybrid_with_its_prompts_repeated(hybrid: Path, tmp_path: Path) -> None:
    """`share_prompt` on (the default) ran each prompt through a KV cache for its responses to continue from: the
    linear attention's state, updated in place there, broke the backward pass. Two steps now train."""
    files = task_files(tmp_path / "data", n_train=16, n_eval=4)
    cfg = make_config(
        dpo,
        output_dir=tmp_path / "run",
        **{
            "model.path": hybrid,
            "data.train": files["preference"],
            "train.batch_size": 4,
            "train.micro_batch_size": 4,
            "train.max_steps": 2,
        },
    )
    assert cfg.share_prompt
    run = dpo.train(cfg)
    assert (run / "final" / "model.safetensors").exists()


def test_sft_packing_of_a_hybrid_is_refused(hybrid: Path, tmp_path: Path) -> None:
    """Packed examples are kept apart by restarting positions, which linear attention does not read: the second of
    two examples in a packed row scored 5% off its own logits on such a model (Qwen3.5, relative)."""
    files = task_files(tmp_path / "data", n_train=8, n_eval=4)
    values = {"model.path": hybrid, "data.train": files["sft"], "data.packing": True}
    values |= {"train.batch_size": 2, "train.micro_batch_size": 2}
    with pytest.raises(ConfigError, match=r"^data\.packing: Qwen3_5ForCausalLM carries state"):
        sft.train(make_config(sft, output_dir=tmp_path / "run", **values))
