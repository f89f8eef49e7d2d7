"""Load the four models of RLHF (policy, reference, reward, value) and their tokenizer from local checkpoints.

All loading goes through `transformers` `from_pretrained`, so any causal-LM checkpoint directory works.
`trust_remote_code` is passed through from the config and is off by default.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import ConfigError, UserError
from rlhf.models import cpu_linear, padding_free
from rlhf.models.forward import sequence_scores

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""A tokenizer directory holds at least one of these (a fast tokenizer's file, or a slow one's vocabulary)."""

HUB_OPT_IN = "RLHF_ALLOW_HUB"
"""Set to 1 to let a path that is not a local directory be fetched from the Hugging Face hub (with HF_HUB_OFFLINE
unset); by default nothing is downloaded."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError):
    """A model or tokenizer directory that cannot be used."""


def _check_dir(path: str, what: str, name: str | None = None) -> None:
    """Fail early, with the path in the message, on what `from_pretrained` would answer with a long traceback (or
    with ten retries against the hub). `what`: "model" or "tokenizer"; `name`: what the message calls the path (the
    config key it came from), `what` by default."""
    name = name or what
    if not path:
        raise ModelLoadError("model.path: no model given (a Hugging Face checkpoint directory, e.g. a run's final/)")
    p = Path(path).expanduser()
    if not p.exists():
        if os.environ.get(HUB_OPT_IN) == "1" and not path.startswith(("/", ".", "~")):
            return  # a hub id, for from_pretrained to fetch
        raise ModelLoadError(
            f"{name}: {path} is not a local directory (nothing is downloaded from the Hugging Face hub unless "
            f"{HUB_OPT_IN}=1 is set and HF_HUB_OFFLINE is not)"
        )
    if not p.is_dir():
        raise ModelLoadError(f"{name}: {path} is not a directory")
    if what == "tokenizer" and not any((p / file).exists() for file in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{name}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): give a tokenizer directory "
            "with model.tokenizer"
        )
    if what == "model" and not (p / "config.json").exists():
        raise ModelLoadError(f"model: {path} has no config.json (not a Hugging Face model directory)")


@contextmanager
def _loading(path: str, what: str) -> Iterator[None]:
    """Turn `from_pretrained`'s OSError (missing files, no network for a hub id), and its ValueErrors for a checkpoint
    with code of its own or of an architecture `transformers` does not know, into one-line user errors."""
    try:
        yield
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot load {path}: {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{what}: {path} holds code of its own (its config's auto_map): set model.trust_remote_code true "
                "to run it, if you trust it"
            ) from None
        if "does not recognize this architecture" in str(exc):
            first = str(exc).split(". ")[0]
            raise ModelLoadError(f"{what}: {path}: {first} (transformers {transformers.__version__})") from None
        raise


def load_tokenizer(path: str, *, trust_remote_code: bool = False, name: str = "tokenizer") -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token guaranteed (EOS is used, with a warning, when the tokenizer has none).
    `name`: what errors call the path (the config key it came from: `load_model_tokenizer`)."""
    _check_dir(path, "tokenizer", name)
    with _loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer {path}: has neither a pad nor an EOS token")
        logger.warning("tokenizer %s has no pad token; using EOS (%r) for padding", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a trainer's `model` section: `model.tokenizer`, else `model.path`, and errors name that key
    (the trainers load it first, so a mistyped model.path is not reported as a tokenizer problem)."""
    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    return load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code, name=key)


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap `model` with LoRA adapters (peft) when `lora.r > 0`; return it unchanged otherwise."""
    if lora.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=task_type
    )
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as exc:  # modules peft cannot adapt (Mamba's out_proj, conv1d) or names the model lacks
            raise ConfigError(f"peft cannot add LoRA adapters here: {exc}", key="model.lora.target_modules") from None


def _finish(model: PreTrainedModel, cfg: ModelConfig, trainable: bool) -> PreTrainedModel:
    """Frozen or trainable as asked; attention through `padding_free.attention` where the model allows (sdpa:
    padding-free batches when a caller passes a layout, short half-precision attention on the CPU in fp32); fp32
    linear layers on the CPU through oneDNN where it is the faster library (`cpu_linear`)."""
    padding_free.enable(model)
    cpu_linear.enable(model)
    if trainable:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()
    return model


def load_causal_lm(cfg: ModelConfig, *, trainable: bool = True) -> PreTrainedModel:
    """A causal LM from `cfg.path` in `cfg.dtype`; frozen and in eval mode unless `trainable`."""
    _check_dir(cfg.path, "model")
    cpu_linear.bound_primitive_caches()
    with _loading(cfg.path, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    return _finish(model, cfg, trainable)


def load_scalar_model(cfg: ModelConfig, *, trainable: bool = True) -> PreTrainedModel:
    """A one-label `AutoModelForSequenceClassification` (reward model or critic) from any causal-LM or RM checkpoint.

    From a causal LM, the backbone is kept and a fresh scalar head (`score`) is initialised; the pad token id is
    copied into the config so the model is usable by `transformers` pipelines too.
    """
    _check_dir(cfg.path, "model")
    cpu_linear.bound_primitive_caches()
    with _loading(cfg.path, "model"):
        if not cfg.trust_remote_code:
            register_scalar_class(AutoConfig.from_pretrained(cfg.path, trust_remote_code=False))
        model, info = AutoModelForSequenceClassification.from_pretrained(
            cfg.path,
            num_labels=1,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
        )
    backbone = [k for k in info["missing_keys"] if k.startswith(f"{model.base_model_prefix}.")]
    if backbone:  # only the new head may start from random weights
        raise ModelLoadError(
            f"model: {cfg.path} lacks {len(backbone)} weights of the {type(model).__name__} backbone (e.g. "
            f"{backbone[0]}): they would start from random values"
        )
    if model.config.pad_token_id is None:
        tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, cfg, trainable)


def register_scalar_class(config: PretrainedConfig) -> None:
    """Give `AutoModelForSequenceClassification` a class for a causal-LM architecture that `transformers` ships
    without one (Granite, Cohere, OLMoE, ERNIE 4.5, ...): its backbone under `transformers`' own scalar head
    (`GenericForSequenceClassification`, the class its Llama-family models are built from), named as that
    architecture's would be (`GraniteForSequenceClassification`). A checkpoint saved from it loads again with
    `AutoModelForSequenceClassification` in a process where this has run (`load_scalar_model` runs it). Nothing
    for an architecture that has its class; a one-line error for one that has no causal LM either."""
    from transformers.modeling_layers import GenericForSequenceClassification

    kind = type(config)
    if kind in AutoModelForSequenceClassification._model_mapping:
        return
    if kind not in AutoModelForCausalLM._model_mapping:
        raise ModelLoadError(f"model: a {config.model_type} model is no causal LM that transformers knows of")
    causal = AutoModelForCausalLM._model_mapping[kind]
    pretrained = next(c for c in causal.__mro__[1:] if issubclass(c, PreTrainedModel))
    scalar = type(
        causal.__name__.replace("ForCausalLM", "") + "ForSequenceClassification",
        (GenericForSequenceClassification, pretrained),
        {
            "__module__": causal.__module__,  # built of transformers' own parts: padding-free attention applies
            "config_class": kind,  # a text model's base class may name its multimodal parent's config
            "base_model_prefix": causal.base_model_prefix,  # the backbone where the checkpoint keeps it
            "forward": _scalar_forward,
        },
    )
    AutoModelForSequenceClassification.register(kind, scalar, exist_ok=True)  # else skipped for a config of theirs


def _scalar_forward(
    self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
) -> SequenceClassifierOutputWithPast:
    """The forward of `register_scalar_class`'s classes: each row's score, read where `transformers` reads it
    (`forward.sequence_scores`), as (B, 1) logits. `GenericForSequenceClassification`'s own needs a backbone output
    with attention weights, which Mamba's lacks."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return SequenceClassifierOutputWithPast(logits=sequence_scores(self, input_ids, mask)[:, None])


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen, eval-mode deep copy (the reference policy when no separate path is given)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


class AdaptersOff(nn.Module):
    """A LoRA (peft) model run with its adapters switched off: the frozen base model, without a second copy of
    its weights (the reference policy of a LoRA run). Only for no-grad passes."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    def get_base_model(self) -> nn.Module:
        return self.peft_model.get_base_model()  # type: ignore[operator,no-any-return]

    def forward(self, *args: object, **kwargs: object) -> object:
        with self.peft_model.disable_adapter():  # type: ignore[operator]
            return self.peft_model(*args, **kwargs)


def reference_policy(policy: nn.Module, ref: ModelConfig | None) -> nn.Module:
    """The frozen reference of an online run, dropout off: `ref` when given; else the initial policy, as a frozen
    copy or, when `policy` carries LoRA adapters, as that model with its adapters off (no copy). Build it before
    the first update."""
    if ref is not None:
        model: nn.Module = load_causal_lm(ref, trainable=False)
    elif hasattr(policy, "disable_adapter"):
        model = AdaptersOff(policy)
    else:
        model = frozen_copy(policy)  # type: ignore[arg-type]
    disable_dropout(model)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: RL ratios and KL terms assume the same network scores and samples."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
