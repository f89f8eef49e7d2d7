"""Policy evaluation on held-out prompts: greedy answers, their gold and proxy rewards, the KL to a reference,
win rates against a baseline, and the signals of reward hacking (length, repetition, EOS rate).

    answers  greedy answers (deterministic for a checkpoint), decoded, with their tokens
    gold     a Python reward function's scores of the answers (what the user really wants, when known)
    proxy    a reward model's scores of the same answers (what training optimised)
    kl       KL(pi || pi_ref) per prompt, estimated from the policy's own samples (temperature 1):
                 KL ~= (1 / S) sum_s sum_t [log pi(y_s,t | ...) - log pi_ref(y_s,t | ...)],   y_s ~ pi
             (the k1 estimator of the sequence KL: unbiased, reported with its standard error)
    win rate per-prompt credits against the baseline's answers, judged by gold, proxy, or a pairwise judge
             function (`stats.win_rate`: ties half, a 95% interval)

`evaluate_policy` works on a loaded model, so the online trainers evaluate their policy mid-run with it;
`evaluate_checkpoints` loads each checkpoint directory in turn (`rlhf eval --policy`, the demo).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rlhf.config import DataConfig, ModelConfig
from rlhf.data import collate_prompts, records_from_rows, tokenize_records
from rlhf.errors import UserError
from rlhf.evaluation.stats import WinRate, credits_from_scores, distinct_n, mean_and_se, repetition, win_rate
from rlhf.models.forward import Unpadded, causal_lm_logprobs
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.rollout.batch import RolloutBatch, score_in_chunks
from rlhf.rollout.experience import decode_responses, score_responses
from rlhf.rollout.generation import HFGenerationBackend, SamplingConfig, generate_rollout, token_ids
from rlhf.rollout.rewards import RewardSource

Judge = Callable[..., Sequence[float]]
"""judge(prompts, answers, baseline_answers, **columns) -> a credit in [0, 1] per prompt for the first answer."""


@dataclass
class Answers:
    """A policy's greedy answers to the prompts, in prompt order."""

    texts: list[str]  # decoded, special tokens skipped
    tokens: list[list[int]]  # response token ids up to and including the first EOS
    ended_with_eos: list[bool]


@dataclass
class PolicyEval:
    """One policy's evaluation; per-prompt lists in prompt order."""

    answers: Answers
    gold: list[float] | None = None
    proxy: list[float] | None = None
    kl: list[float] | None = None  # per prompt: the mean over its samples of the sequence log-ratio
    win: WinRate | None = None  # against the baseline, once compared
    path: str | None = None

    def summary(self) -> dict[str, Any]:
        """Flat figures of the evaluation (what the table and eval.json show)."""
        out: dict[str, Any] = {"path": self.path} if self.path else {}
        for name in ("gold", "proxy", "kl"):
            values = getattr(self, name)
            if values is not None:
                out[name], out[f"{name}_se"] = mean_and_se(values)
        tokens = self.answers.tokens
        out["length"] = sum(len(t) for t in tokens) / len(tokens)
        out["eos_rate"] = sum(self.answers.ended_with_eos) / len(tokens)
        out["distinct_2"] = distinct_n(tokens, 2)
        out["repetition"] = sum(repetition(t, 2) for t in tokens) / len(tokens)
        if self.win is not None:
            out["win_rate"] = vars(self.win) | {"n": self.win.n}
        return out


def prompt_examples(rows: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> list[Any]:
    """Prompt rows (kind `prompt`) tokenized for generation: `prompt_ids`, `prompt`, `extra`."""
    records, _ = records_from_rows(list(rows), "prompt")
    examples, _ = tokenize_records(records, "prompt", tokenizer, data)
    return examples


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for the block, then the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    show_progress: bool = False,
) -> Answers:
    """The most likely token at every step (`rollout.generation.decode`), `batch_size` prompts at a time, prompts
    of like length together (`generate_rollout`: the prompts stay on the host, each batch goes to the model's
    device); a progress bar over the batches where `show_progress`."""
    ids = token_ids(tokenizer, model)
    batch = collate_prompts(examples, tokenizer.pad_token_id)
    rollout = generate_rollout(
        HFGenerationBackend(model, **ids),
        batch["input_ids"],
        batch["attention_mask"],
        SamplingConfig(max_new_tokens, greedy=True),
        chunk_size=batch_size,
        progress_desc="answers" if show_progress else None,
        **ids,
    )
    lengths = rollout.response_lengths.tolist()
    tokens = [row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths, strict=True)]
    texts = decode_responses(tokenizer, rollout.response_ids, rollout.response_mask)
    return Answers(texts, tokens, rollout.ended_with_eos.tolist())


@torch.no_grad()
def sampled_kl(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    *,
    samples: int,
    max_new_tokens: int,
    batch_size: int = 64,
    show_progress: bool = False,
) -> list[float]:
    """Per prompt, the mean over `samples` completions y ~ pi (temperature 1) of
    sum_t [log pi(y_t) - log pi_ref(y_t)]: each an unbiased estimate of KL(pi(.|x) || pi_ref(.|x)). Sampled and
    scored `batch_size` rows at a time, rows of like length together (the rollout on the host, each batch moved
    to the policy's device); a progress bar over the sampling where `show_progress`."""
    rows = [ex for ex in examples for _ in range(samples)]
    ids = token_ids(tokenizer, policy)
    device = next(policy.parameters()).device
    batch = collate_prompts(rows, tokenizer.pad_token_id)
    rollout = generate_rollout(
        HFGenerationBackend(policy, **ids),
        batch["input_ids"],
        batch["attention_mask"],
        SamplingConfig(max_new_tokens),
        chunk_size=batch_size,
        progress_desc="KL samples" if show_progress else None,
        **ids,
    )
    sequences = RolloutBatch.from_rollout(rollout)

    def passes(ids: torch.Tensor, att: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, att = ids.to(device), att.to(device)
        flat = Unpadded.of(att, ids, prompt_len=ids.shape[1] - T)  # a prompt's samples share it
        logp = causal_lm_logprobs(policy, ids, att, response_len=T, flat=flat).logprobs
        return logp, causal_lm_logprobs(reference, ids, att, response_len=T, flat=flat).logprobs

    logp, ref = score_in_chunks(passes, sequences, batch_size)
    assert logp is not None and ref is not None  # `passes` returns both
    kl = ((logp - ref) * sequences.response_mask.to(logp.device)).sum(-1)
    return kl.view(-1, samples).mean(-1).tolist()


def evaluate_policy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    *,
    gold: RewardSource | None = None,
    proxy: RewardSource | None = None,
    reference: nn.Module | None = None,
    kl_samples: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    show_progress: bool = False,
) -> PolicyEval:
    """Greedy answers of `model` to `examples`, scored by `gold` and `proxy`; its KL to `reference` (when given,
    from `kl_samples` samples per prompt). Leaves the model's train/eval mode as it found it. `show_progress`:
    transient bars over the generation passes."""
    with evaluating(model):
        kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "show_progress": show_progress}
        answers = greedy_answers(model, tokenizer, examples, **kw)
        prompts, extras = [ex["prompt"] for ex in examples], [ex.get("extra", {}) for ex in examples]
        result = PolicyEval(answers)
        if gold is not None:
            result.gold = score_responses(gold, prompts, answers.texts, extras).tolist()
        if proxy is not None:
            result.proxy = score_responses(proxy, prompts, answers.texts, extras).tolist()
        if reference is not None and kl_samples > 0:
            result.kl = sampled_kl(model, reference, tokenizer, examples, samples=kl_samples, **kw)
    return result


def compare(
    policy: PolicyEval, baseline: PolicyEval, examples: Sequence[dict[str, Any]], judge: str | Judge
) -> WinRate:
    """The policy's win rate against the baseline on the same prompts, judged by "gold", "proxy" (higher score
    wins) or a pairwise judge function."""
    if callable(judge):
        columns = {k: [ex.get("extra", {}).get(k) for ex in examples] for k in examples[0].get("extra", {})}
        prompts = [ex["prompt"] for ex in examples]
        credits = [float(c) for c in judge(prompts, policy.answers.texts, baseline.answers.texts, **columns)]
        if len(credits) != len(examples):
            raise UserError(f"the judge returned {len(credits)} credits for {len(examples)} prompts")
        return win_rate(credits)
    mine, theirs = getattr(policy, judge), getattr(baseline, judge)
    if mine is None or theirs is None:
        raise UserError(f"a win rate judged by {judge} needs the {judge} scores of both policies")
    return win_rate(credits_from_scores(mine, theirs))


@dataclass
class Evaluation:
    """Several policies on the same prompts: each one's `PolicyEval`, win rates against the baseline."""

    examples: list[dict[str, Any]]
    policies: dict[str, PolicyEval] = field(default_factory=dict)
    baseline: str | None = None
    judge: str = "gold"

    def to_json(self, samples: int | None = 16) -> dict[str, Any]:
        """The figures of every policy and a sample table of the first `samples` prompts (None: all)."""
        table = []
        for i, ex in enumerate(self.examples[:samples]):
            answers = {}
            for name, ev in self.policies.items():
                answers[name] = {"text": ev.answers.texts[i]}
                for key in ("gold", "proxy"):
                    values = getattr(ev, key)
                    if values is not None:
                        answers[name][key] = values[i]
            table.append({"prompt": ex["prompt"], **ex.get("extra", {}), "answers": answers})
        return {
            "prompts": len(self.examples),
            "baseline": self.baseline,
            "judge": self.judge,
            "policies": {name: ev.summary() for name, ev in self.policies.items()},
            "samples": table,
        }


def evaluate_checkpoints(
    policies: dict[str, str | Path],
    rows: Sequence[dict[str, Any]],
    *,
    gold: RewardSource | None = None,
    proxy: RewardSource | None = None,
    reference: str | Path | None = None,
    baseline: str | None = None,
    judge: str | Judge = "gold",
    kl_samples: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    data: DataConfig | None = None,
    progress: bool = True,
) -> Evaluation:
    """`evaluate_policy` for each checkpoint directory (loaded one at a time, tokenized with its own tokenizer),
    then every policy's win rate against `baseline` (one of the names)."""
    if baseline is not None and baseline not in policies:
        raise UserError(f"baseline {baseline!r} is not one of the policies ({', '.join(policies)})")
    data = data or DataConfig()
    ref_model = load_causal_lm(ModelConfig(path=str(reference)), trainable=False) if reference else None
    ref_vocab = load_tokenizer(str(reference)).get_vocab() if reference else None
    evaluation = Evaluation([], baseline=baseline, judge=judge if isinstance(judge, str) else "judge")
    for name, path in tqdm(policies.items(), desc="eval", disable=not progress):
        tokenizer = load_tokenizer(str(path))
        if ref_vocab is not None and tokenizer.get_vocab() != ref_vocab:
            raise UserError(f"{name} ({path}): its tokenizer differs from the reference's {reference}; no KL")
        model = load_causal_lm(ModelConfig(path=str(path)), trainable=False)
        examples = prompt_examples(rows, tokenizer, data)
        if not evaluation.examples:
            evaluation.examples = examples
        result = evaluate_policy(
            model,
            tokenizer,
            examples,
            gold=gold,
            proxy=proxy,
            reference=ref_model,
            kl_samples=kl_samples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=progress,
        )
        result.path = str(path)
        evaluation.policies[name] = result
    if baseline is not None:
        for name, result in evaluation.policies.items():
            if name != baseline:
                result.win = compare(result, evaluation.policies[baseline], evaluation.examples, judge)
    return evaluation
