"""The benchmarks' longer sequences (`--context`): filler before every prompt, nothing else changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import lengths, write_data  # noqa: E402
from rlhf.tasks.tiny import build_tokenizer  # noqa: E402


def test_context_puts_that_many_tokens_before_every_prompt_and_keeps_the_rest(tmp_path):
    plain = write_data(tmp_path / "plain", n_train=16, n_eval=4)
    padded = write_data(tmp_path / "padded", n_train=16, n_eval=4, context=40)
    assert plain.keys() == padded.keys()
    tok = build_tokenizer("llama")
    for kind in plain:
        before = [json.loads(x) for x in plain[kind].read_text().splitlines()]
        after = [json.loads(x) for x in padded[kind].read_text().splitlines()]
        assert len(before) == len(after) > 0
        for b, a in zip(before, after, strict=True):
            filler, _, rest = a["prompt"][0]["content"].partition(" ")
            assert len(filler) == 40 and filler.isalpha() and rest == b["prompt"][0]["content"]
            assert {k: v for k, v in a.items() if k != "prompt"} == {k: v for k, v in b.items() if k != "prompt"}
            ids = [tok.apply_chat_template(r["prompt"], tokenize=True)["input_ids"] for r in (b, a)]
            assert len(ids[1]) - len(ids[0]) == 41  # byte-level: one token per letter, and the space
    assert lengths(40) == (64 + 40, 32 + 40)
