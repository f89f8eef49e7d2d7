"""Loading errors name the path and what is missing, in one line."""

from __future__ import annotations

import pytest

from rlhf.config import ModelConfig


def test_missing_or_empty_model_directory_is_a_one_line_user_error(tmp_path):
    from rlhf.errors import UserError
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    with pytest.raises(UserError, match="missing is not a local directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"has no tokenizer files \(tokenizer.json, tokenizer_config.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="has no config.json"):
        load_causal_lm(ModelConfig(path=str(tmp_path)))


def test_a_model_directory_without_tokenizer_files_names_them(tiny_dirs, tmp_path):
    """A checkpoint saved without its tokenizer: not transformers' "sentencepiece or tiktoken" message."""
    import shutil

    from rlhf.errors import UserError
    from rlhf.models.loading import load_tokenizer

    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_dirs['llama']}/{name}", weights_only)
    with pytest.raises(UserError, match=f"tokenizer: {weights_only} has no tokenizer files .*model.tokenizer"):
        load_tokenizer(str(weights_only))


def test_a_hub_style_name_is_not_fetched_unless_asked(monkeypatch):
    """`org/name` that is no local directory: one line saying nothing is downloaded, instead of ten retries."""
    from rlhf.errors import UserError
    from rlhf.models.loading import HUB_OPT_IN, load_causal_lm

    monkeypatch.delenv(HUB_OPT_IN, raising=False)
    with pytest.raises(UserError, match=f"org/name is not a local directory .*unless {HUB_OPT_IN}=1"):
        load_causal_lm(ModelConfig(path="org/name"))
    with pytest.raises(UserError, match=r"^model.path: no model given"):
        load_causal_lm(ModelConfig(path=""))


@pytest.mark.parametrize("tokenizer", [None, "tok"])
def test_a_trainer_names_the_key_of_a_missing_tokenizer_directory(tmp_path, capsys, tokenizer):
    """The tokenizer comes from model.path unless model.tokenizer is set: the error names that key, so a mistyped
    model.path is not reported as a tokenizer problem."""
    from rlhf.cli import main

    args = ["train", "sft", f"--model.path={tmp_path / 'model'}", f"--data.train={tmp_path / 'sft.jsonl'}"]
    key, missing = ("model.path", tmp_path / "model") if tokenizer is None else ("model.tokenizer", tmp_path / "tok")
    if tokenizer is not None:
        args.append(f"--model.tokenizer={missing}")
    assert main(args) == 1
    assert capsys.readouterr().err.startswith(f"rlhf: error: {key}: {missing} is not a local directory")


def test_lora_adapters_are_added_without_a_deprecation_warning(tiny_dirs):
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, which printed a
    FutureWarning at every LoRA run; the adapters are there, the warning is not."""
    import warnings

    from rlhf.config import LoraConfig
    from rlhf.models.loading import apply_lora, load_causal_lm

    model = load_causal_lm(ModelConfig(path=tiny_dirs["llama"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        wrapped = apply_lora(model, LoraConfig(r=4))
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())
