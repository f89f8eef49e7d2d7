"""Gold evaluation: batched, left-padded greedy answers equal unbatched ones; the score is their mean gold score."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.evaluation.gold import gold_eval, greedy_responses
from rlhf.tasks.sorting import gold_score, prompt_rows


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_batched_greedy_answers_equal_one_row_at_a_time(tiny_dirs, style):
    rows = prompt_rows(6, seed=1)  # prompts of 3-6 letters: different lengths, so left padding is exercised
    texts, _ = greedy_responses(tiny_dirs[style], rows, max_new_tokens=8, batch_size=6)
    tok = AutoTokenizer.from_pretrained(tiny_dirs[style])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style]).eval()
    for row, text in zip(rows, texts, strict=True):
        rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(rendered, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text


def test_gold_eval_is_mean_gold_score_of_greedy_answers(tiny_dirs):
    rows = prompt_rows(5, seed=2)
    texts, _ = greedy_responses(tiny_dirs["llama"], rows, max_new_tokens=8)
    got = gold_eval(tiny_dirs["llama"], rows, "rlhf.tasks.sorting:gold_reward", max_new_tokens=8)
    want = sum(gold_score(r["letters"], t) for r, t in zip(rows, texts, strict=True)) / len(rows)
    assert got["gold/score"] == pytest.approx(want)
    assert got["response/length"] == pytest.approx(sum(len(t) for t in texts) / len(texts))
