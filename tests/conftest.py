"""Shared fixtures: tiny checkpoints built once per session on local disk (no hub access)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Test helpers shared by several folders (`from _resume import ...`): tests/support is importable everywhere.
sys.path.insert(0, str(Path(__file__).parent / "support"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `rlhf.cli.main` does before transformers is imported: no per-load progress bars or load reports on stderr,
# so the in-process runs print what the command prints.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models spend more on thread hand-offs than on arithmetic: one thread is fastest, and CI has two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny checkpoint directory per architecture family: {"llama": dir, "gpt2": dir}."""
    from rlhf.tasks.tiny import STYLES, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {style: str(make_tiny_checkpoint(root / style, style, hidden_size=32)) for style in STYLES}


# Hypothesis draws the same examples on every run: a test suite must not pass or fail by the luck of the draw.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.load_profile("deterministic")
