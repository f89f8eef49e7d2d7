"""What every stage does at its end: the trained model saved as one plain `transformers` checkpoint.

`final/` is always loadable by `AutoModelForCausalLM` (or `AutoModelForSequenceClassification` for reward
models; for an architecture `transformers` has no such class for, once `rlhf.models.loading.register_scalar_class`
has run) with no adapter library and from any working directory: a LoRA model is merged into its weights
first. The adapter itself is kept beside it, in `final_adapter/`, with `base_model_name_or_path` made
absolute, so `PeftModel.from_pretrained` finds its base from anywhere too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rlhf.runtime.engine import Engine

ADAPTER_SUFFIX = "_adapter"


def save_final(engine: Engine, model: nn.Module, tokenizer: Any, *, base_path: str, subdir: str = "final") -> Path:
    """Save `model` (and the tokenizer) to `run_dir/<subdir>`, LoRA merged; the adapter to `<subdir>_adapter/`.

    `base_path` is the checkpoint the adapters were trained on (the stage's `model.path`). Merging changes
    `model` in place, so call this once training is over. Returns the `<subdir>` directory. A run that did
    not really train (`Engine.check_trained`) raises instead.
    """
    engine.check_trained()
    if hasattr(model, "merge_and_unload"):
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = str(Path(base_path).resolve())
        engine.save_final(model, tokenizer, subdir=subdir + ADAPTER_SUFFIX)
        model = model.merge_and_unload()
    return engine.save_final(model, tokenizer, subdir=subdir)
