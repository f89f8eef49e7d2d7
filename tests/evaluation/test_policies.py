"""Policy evaluation: greedy answers, the KL estimate from samples against the exact KL, the proxy against plain
`transformers`, win rates by a pairwise judge, and `rlhf eval --policy` end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.cli import main as rlhf_main
from rlhf.config import DataConfig, ModelConfig
from rlhf.evaluation.policies import compare, evaluate_policy, greedy_answers, prompt_examples, sampled_kl
from rlhf.models.loading import load_scalar_model, load_tokenizer
from rlhf.rollout.rewards import RewardModelReward
from rlhf.tasks.sorting import gold_score, prompt_rows
from rlhf.tasks.tiny import make_tiny_checkpoint


def examples_of(model_dir: str, n: int, seed: int = 1) -> list[dict]:
    return prompt_examples(prompt_rows(n, seed=seed), load_tokenizer(model_dir), DataConfig())


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_batched_greedy_answers_equal_one_row_at_a_time(tiny_dirs, style):
    """Prompts of 3-6 letters (left padding exercised) answered in batches of 4 (the longest prompts first, then
    put back in order) equal `generate` row by row."""
    rows = prompt_rows(6, seed=1)
    tok = AutoTokenizer.from_pretrained(tiny_dirs[style])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[style]).eval()
    answers = greedy_answers(model, tok, prompt_examples(rows, tok, DataConfig()), max_new_tokens=8, batch_size=4)
    for row, text, tokens in zip(rows, answers.texts, answers.tokens, strict=True):
        rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(rendered, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()  # fmt: skip
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        assert tokens == out and tok.decode(out, skip_special_tokens=True) == text


def test_the_generation_passes_draw_a_bar_only_when_asked(tiny_dirs, capsys):
    """`show_progress`: a transient bar over the batches of the greedy answers (6 prompts in batches of 2: 3) and
    one over the KL samples (6 x 2 rows: 6); none without it."""
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    examples = prompt_examples(prompt_rows(6, seed=1), tok, DataConfig())
    for shown in (True, False):
        evaluate_policy(model, tok, examples, reference=model, kl_samples=2, max_new_tokens=3, batch_size=2,
                        show_progress=shown)  # fmt: skip
        err = capsys.readouterr().err
        assert ("answers:" in err and "/3 [" in err and "KL samples:" in err and "/6 [" in err) == shown, err


def test_sampled_kl_matches_the_exact_kl_of_one_token_answers(tiny_dirs, tmp_path):
    """With one-token answers the sequence KL is that of the next-token distributions p, q at the prompt's last
    position: sum_v p_v (log p_v - log q_v), computed exactly from the logits. The estimate from 3000 samples per
    prompt lies within 4 standard errors of it; a policy's KL to itself is exactly 0."""
    other = make_tiny_checkpoint(tmp_path / "other", "llama", hidden_size=32, seed=7)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    reference = AutoModelForCausalLM.from_pretrained(other).eval()
    tok = load_tokenizer(tiny_dirs["llama"])
    examples = examples_of(tiny_dirs["llama"], 2)
    torch.manual_seed(0)
    got = sampled_kl(policy, reference, tok, examples, samples=3000, max_new_tokens=1, batch_size=1000)
    for ex, estimate in zip(examples, got, strict=True):
        ids = torch.tensor([ex["prompt_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(policy(input_ids=ids).logits[0, -1].double(), -1)
            logq = torch.log_softmax(reference(input_ids=ids).logits[0, -1].double(), -1)
        p = logp.exp()
        exact = float((p * (logp - logq)).sum())
        sd = float((p * (logp - logq - exact) ** 2).sum().sqrt())  # the sd of one sample's log-ratio
        assert abs(estimate - exact) < 4 * sd / 3000**0.5, (estimate, exact)
    assert sampled_kl(policy, policy, tok, examples, samples=3, max_new_tokens=4) == [0.0, 0.0]


def test_proxy_scores_are_what_plain_transformers_scores(tiny_dirs, tmp_path):
    """The reward model's score of each greedy answer equals AutoModelForSequenceClassification on the chat
    template's rendering of (prompt, answer), one unpadded row at a time (llama style: pad != eos, so its pooling
    at the last non-pad token is the answer's EOS); the gold column is the gold function of the same text."""
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    load_scalar_model(ModelConfig(path=tiny_dirs["llama"]), trainable=False).save_pretrained(rm_dir)
    load_tokenizer(tiny_dirs["llama"]).save_pretrained(rm_dir)
    tok = load_tokenizer(tiny_dirs["llama"])
    proxy = RewardModelReward(load_scalar_model(ModelConfig(path=str(rm_dir)), trainable=False), tok)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).train()
    rows = prompt_rows(5, seed=4)
    examples = prompt_examples(rows, tok, DataConfig())
    from rlhf.rollout.rewards import FunctionReward, load_reward_function

    gold = FunctionReward(load_reward_function("rlhf.tasks.sorting:gold_reward"))
    result = evaluate_policy(policy, tok, examples, gold=gold, proxy=proxy, max_new_tokens=6)
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    for row, text, score, g in zip(rows, result.answers.texts, result.proxy, result.gold, strict=True):
        rendered = tok.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": text}], tokenize=False)
        ids = torch.tensor([tok(rendered, add_special_tokens=False).input_ids])
        with torch.no_grad():
            assert score == pytest.approx(hf(input_ids=ids).logits[0, 0].item(), abs=1e-5)
        assert g == pytest.approx(gold_score(row["letters"], text))
    assert policy.training  # evaluation puts the model back in the mode it found it in


def test_a_pairwise_judge_decides_the_win_rate(tiny_dirs):
    """A judge that prefers the longer answer (ties half) against a policy whose answers are all shorter: win
    rate 1; the reverse comparison 0; a judge returning the wrong number of credits is a user error."""
    from rlhf.evaluation.policies import Answers, PolicyEval

    examples = examples_of(tiny_dirs["llama"], 3)
    long = PolicyEval(Answers(["abcd", "abc", "ab"], [[1]] * 3, [True] * 3))
    short = PolicyEval(Answers(["a", "a", "a"], [[1]] * 3, [True] * 3))

    def longer(prompts, answers, baseline, **columns):
        assert len(columns["letters"]) == 3  # the rows' extra fields reach the judge
        return [
            1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0 for a, b in zip(answers, baseline, strict=True)
        ]

    assert compare(long, short, examples, longer).rate == 1.0
    assert compare(short, long, examples, longer).rate == 0.0
    with pytest.raises(Exception, match="2 credits for 3 prompts"):
        compare(long, short, examples, lambda p, a, b, **c: [1.0, 1.0])


def test_rlhf_eval_policies_end_to_end(tiny_dirs, tmp_path, capsys):
    """Two policies (the same weights under two names), gold and KL: equal gold, KL 0, win rate exactly 1/2 (every
    prompt a tie); the table on stdout, the JSON file with every field; a baseline that is not a policy is a
    one-line error."""
    twin = tmp_path / "twin"
    shutil.copytree(tiny_dirs["llama"], twin)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(6, seed=2)))
    argv = ["eval", "--policy", f"a={tiny_dirs['llama']}", "--policy", f"b={twin}", "--prompts", str(prompts),
            "--gold", "rlhf.tasks.sorting:gold_reward", "--reference", tiny_dirs["llama"], "--baseline", "a",
            "--max-new-tokens", "6", "--kl-samples", "2", "--out", str(tmp_path / "eval.json")]  # fmt: skip
    assert rlhf_main(argv) == 0
    out = capsys.readouterr().out
    assert "win rate" in out and out.splitlines()[2].startswith("b ")
    result = json.loads((tmp_path / "eval.json").read_text())
    a, b = result["policies"]["a"], result["policies"]["b"]
    assert result["prompts"] == 6 and result["baseline"] == "a" and len(result["samples"]) == 6
    assert a["gold"] == b["gold"] and a["kl"] == b["kl"] == 0.0
    assert b["win_rate"]["rate"] == 0.5 and b["win_rate"]["ties"] == 6 and "win_rate" not in a
    assert rlhf_main([*argv[:-2], "--baseline", "c"]) == 1
    assert capsys.readouterr().err.strip().endswith("baseline 'c' is not one of the policies (a, b)")
    assert rlhf_main(["eval", "--policy", f"a={twin}"]) == 2
