"""Shared configuration: typed dataclasses composed by nesting, one top-level config per algorithm.

Each field is documented once, by the string literal under it; that text is the `--help` and the docs.
Algorithm configs (in `rlhf/trainers/<algo>.py`) nest the shared sections below and add their own fields.
Derived values are properties; algorithm code never mutates its config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains all weights (no adapter)."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or `all-linear`) that receive adapters."""


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face checkpoint directory of the model to train (or to start from)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`."""
    dtype: str = "float32"
    """Weight dtype when loading: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow code shipped with the checkpoint to run. Off unless you trust the checkpoint."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (peft)."""

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a .jsonl, .json, .parquet or .csv file, or a `datasets.save_to_disk` directory."""
    eval: str | None = None
    """Held-out data in the same format; if unset, `eval_fraction` of `train` is held out."""
    eval_fraction: float = 0.0
    """Fraction of the training rows held out for evaluation when `eval` is unset."""
    max_length: int = 512
    """Maximum tokens of prompt + response."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; longer prompts keep their end (the part nearest the response)."""
    truncation_side: str = "keep_end"
    """Prompt truncation: keep_end (drop the start of long prompts) or keep_start."""
    skip_bad_rows: bool = False
    """Skip invalid rows (each skip counted by reason) instead of stopping at the first one."""
    packing: bool = False
    """Pack several examples into one sequence (SFT only)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.999
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Learning-rate schedule after warmup: constant, linear or cosine."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (linear and cosine)."""


@dataclass
class TrainConfig:
    batch_size: int = 8
    """Global batch: examples per optimizer step, summed over processes and accumulation."""
    micro_batch_size: int = 8
    """Examples per forward pass on one process."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives them from `epochs`."""
    mixed_precision: str = "no"
    """Autocast precision through accelerate: no, bf16 or fp16 (fp16 on GPU only)."""
    max_consecutive_nonfinite: int = 10
    """Abort after this many optimizer steps in a row skipped for a non-finite loss or gradient."""
    eval_every: int = 0
    """Evaluate on the held-out split every N optimizer steps (0: only at the end)."""


@dataclass
class LoggingConfig:
    every: int = 1
    """Write metrics every N optimizer steps."""
    trackers: list[str] = field(default_factory=list)
    """Extra accelerate trackers: tensorboard, wandb."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: none during training)."""
    keep_last: int = 2
    """Resumable checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in the run directory; never; or a checkpoint path."""
