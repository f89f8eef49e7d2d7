"""Loading errors name the path and what is missing, in one line."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.models.loading import load_scalar_model


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


@pytest.mark.parametrize(
    ("model_type", "backbone", "kwargs"), [("granite", "model", {}), ("mamba", "backbone", {"state_size": 8})]
)
def test_an_architecture_without_a_scalar_class_gets_transformers_generic_one(tmp_path, model_type, backbone, kwargs):
    """Granite and Mamba have a causal LM but no `AutoModelForSequenceClassification` class in `transformers`: they
    get the generic one over their backbone (Mamba's kept under `backbone`). The backbone keeps the checkpoint's
    weights, the score is the new head on the last hidden state of the last token, and a saved reward model loads
    back with the same scores."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.models.forward import sequence_scores
    from rlhf.tasks.tiny import build_tokenizer

    tok = build_tokenizer("llama")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        **kwargs,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm = load_scalar_model(ModelConfig(path=str(tmp_path / "lm")), trainable=False)
    assert type(rm).__name__ == type(lm).__name__.replace("ForCausalLM", "ForSequenceClassification")
    for name, weight in getattr(lm, backbone).state_dict().items():
        assert torch.equal(getattr(rm, backbone).state_dict()[name], weight), name
    ids = torch.tensor([[5, 70, 71, tok.eos_token_id]])
    with torch.no_grad():
        want = getattr(lm, backbone)(input_ids=ids).last_hidden_state[0, -1] @ rm.score.weight[0]
        got = sequence_scores(rm, ids, torch.ones_like(ids))
    torch.testing.assert_close(got, want[None])
    rm.save_pretrained(tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits[:, 0], got)


def test_a_checkpoint_without_some_backbone_weights_is_refused(tiny_dirs, tmp_path):
    """A reward model or critic whose backbone would start partly from random values (a checkpoint that lacks
    weights, or an architecture whose backbone the generic head looks for elsewhere: Llama 4's) is a one-line
    error, not a warning in the log: only the new scalar head may be fresh."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rlhf.models.loading import ModelLoadError

    shutil.copytree(tiny_dirs["llama"], tmp_path / "lm")
    weights = load_file(tmp_path / "lm" / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "lm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 weights of the LlamaForSequenceClassification backbone \(e\.g\. "
                       r"model\.layers\.0\.mlp\.up_proj\.weight\)"):  # fmt: skip
        load_scalar_model(ModelConfig(path=str(tmp_path / "lm")), trainable=False)


def test_modules_peft_cannot_adapt_are_a_config_error(tiny_dirs):
    """A target the model lacks, or one peft refuses (Mamba's out_proj), names the key to change, not a traceback."""
    from rlhf.config import LoraConfig
    from rlhf.errors import ConfigError
    from rlhf.models.loading import apply_lora, load_causal_lm

    model = load_causal_lm(ModelConfig(path=tiny_dirs["llama"]))
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: peft cannot add LoRA adapters here: .*nope"):
        apply_lora(model, LoraConfig(r=4, target_modules=["nope"]))


@pytest.mark.parametrize("remote", [True, False])
def test_custom_code_or_an_unknown_architecture_is_a_one_line_error(tiny_dirs, tmp_path, remote):
    """A checkpoint with code of its own (its config's auto_map) asks for model.trust_remote_code, with no prompt on
    the terminal; one of a model type this `transformers` lacks says so. Both for a policy and for a reward model."""
    import json
    import shutil

    from rlhf.models.loading import ModelLoadError, load_causal_lm

    shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "mymodel"
    if remote:
        config["auto_map"] = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    want = (
        "holds code of its own .*set model.trust_remote_code true" if remote else "does not recognize this architecture"
    )
    for load in (load_causal_lm, load_scalar_model):
        with pytest.raises(ModelLoadError, match=f"^model: {tmp_path / 'm'}.*{want}"):
            load(ModelConfig(path=str(tmp_path / "m")), trainable=False)
