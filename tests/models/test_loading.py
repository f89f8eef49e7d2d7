"""Loading errors name the path and what is missing, in one line."""

from __future__ import annotations

import pytest

from rlhf.config import ModelConfig


def test_missing_or_empty_model_directory_is_a_one_line_user_error(tmp_path):
    from rlhf.errors import UserError
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    with pytest.raises(UserError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"has no tokenizer_config.json or tokenizer.json or config.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="has no config.json"):
        load_causal_lm(ModelConfig(path=str(tmp_path)))
