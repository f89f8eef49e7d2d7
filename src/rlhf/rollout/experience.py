"""The experience maker of the online trainers (PPO, GRPO, RLOO): prompts in, scored completions out.

    prompts x group_size -> generate -> policy (and critic) / reference log-probs -> decode -> score

`make_experience` does it for one batch of prompt examples, in chunks of `rollout.forward_batch_size` rows:
one `generate` call per chunk, then, per chunk of similar-length rows, one no-grad pass of the actor (policy
log-probs and entropy; values too when the actor is a `PolicyWithValue`) and one of the reference, both on the
same padding-free layout where the models allow it (`rlhf.models.forward.Unpadded`); finally the decoded text
is scored by the reward source. What the algorithms do with it (PPO: KL-shaped rewards and GAE; GRPO: group
advantages) is theirs.

Rows are laid out group by group: row r answers prompt r // group_size, so `scores.view(-1, group_size)` row g
holds the group of prompt g (`rlhf.advantages`' convention).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rlhf.data import collate_prompts
from rlhf.losses.reduce import masked_mean
from rlhf.models.forward import Unpadded, causal_lm_logprobs
from rlhf.models.value import PolicyWithValue
from rlhf.rollout.batch import RolloutBatch, score_in_chunks
from rlhf.rollout.config import RolloutConfig
from rlhf.rollout.generation import HFGenerationBackend, generate_rollout, token_ids
from rlhf.rollout.rewards import EnsembleReward, Prompt, RewardSource, checked_scores, source_name


@dataclass
class Experience:
    """N = prompts x group_size sampled completions with everything the losses and the metrics need.

    All (N, T) tensors are 0 at padding (after each response's first EOS); T is the widest response.
    """

    sequences: RolloutBatch[tuple[()]]  # input_ids, attention_mask (N, P+T); response_mask (N, T)
    logprobs: Tensor | None  # (N, T) log-probs of the sampled tokens under the sampling policy (at its
    # temperature); None when the actor pass was skipped (`actor_pass=False`)
    entropy: Tensor | None  # (N, T) entropy of the sampling policy at each response position; likewise
    ref_logprobs: Tensor | None  # (N, T) under the reference; None when there is no reference model
    values: Tensor | None  # (N, T) the critic's values; None when the actor has no critic
    scores: Tensor  # (N,) float32 sequence scores of the reward source, on the CPU
    score_spread: Tensor | None  # (N,) the std of an ensemble's member scores (a hacking signal); else None
    completions: list[str]  # (N,) decoded responses (policy tokenizer, special tokens skipped)
    ended_with_eos: Tensor  # (N,) bool: the response stopped at EOS (else it hit max_new_tokens)
    group_size: int
    generation_s: float  # wall-clock seconds of generation
    scoring_s: float  # wall-clock seconds of the no-grad passes and the reward

    @property
    def mask(self) -> Tensor:
        """(N, T) float response mask, a prefix of ones per row."""
        return self.sequences.response_mask

    @property
    def lengths(self) -> Tensor:
        """(N,) response lengths in tokens (EOS included)."""
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return len(self.completions)

    def stats(self) -> dict[str, Tensor]:
        """Scalar means over these rows, as every online trainer logs them (see docs/metrics.md)."""
        scores, mask = self.scores, self.mask
        stats = {
            "reward/score": scores.mean(),
            "reward/score_std": scores.std() if len(scores) > 1 else scores.new_zeros(()),
            "response/length": mask.sum(-1).mean(),
            "response/eos_fraction": self.ended_with_eos.float().mean(),
        }
        if self.entropy is not None:
            stats["objective/entropy"] = masked_mean(self.entropy, mask)
        return stats


def make_experience(
    actor: nn.Module,
    reference: nn.Module | None,
    reward: RewardSource,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    cfg: RolloutConfig,
    *,
    group_size: int = 1,
    actor_pass: bool = True,
    keys: Tensor | None = None,
) -> Experience:
    """Sample `group_size` completions of each prompt example and score them (see the module docstring).

    `actor`: the policy (a causal LM), or a `PolicyWithValue` whose values come with the log-probs in one pass.
    `reference`: the frozen reference policy, or None (no KL to it: nothing is computed for it).
    `examples`: tokenized prompt examples (`prompt_ids`, `prompt`, `extra`), this process's share.
    `actor_pass=False` skips the actor's no-grad pass: for a caller whose one update step starts from these very
    weights, so that the update's own forward gives the same log-probs.
    `keys`: (len(examples) * group_size,) the rows' sampling keys (`rollout.generation.KeyedDraw`; the
    trainers' come from `runtime.online.share_of_iteration`); None: fresh ones from torch's global RNG.
    """
    policy = actor.policy if isinstance(actor, PolicyWithValue) else actor
    device = next(policy.parameters()).device
    rows = [ex for ex in examples for _ in range(group_size)]
    prompts = collate_prompts(rows, tokenizer.pad_token_id)
    ids = token_ids(tokenizer, policy)
    t0 = time.perf_counter()
    rollout = generate_rollout(
        HFGenerationBackend(policy, **ids),
        prompts["input_ids"].to(device),
        prompts["attention_mask"].to(device),
        cfg.sampling,
        chunk_size=cfg.forward_batch_size,
        keys=keys,
        **ids,
    )
    t1 = time.perf_counter()
    sequences = RolloutBatch.from_rollout(rollout)

    def passes(ids: Tensor, att: Tensor, T: int) -> tuple[Tensor | None, ...]:
        """Per chunk: one actor pass (log-probs, entropy, values) and one reference pass, on one layout."""
        flat = Unpadded.of(att, ids, prompt_len=ids.shape[1] - T)  # rows of one prompt share it
        kw = {"response_len": T, "temperature": cfg.temperature, "flat": flat}
        logprobs = entropy = values = None
        if isinstance(actor, PolicyWithValue):
            out = actor(ids, att, with_entropy=True, **kw)
            logprobs, entropy, values = out.logprobs, out.entropy, out.values
        elif actor_pass:
            logprobs, entropy, _ = causal_lm_logprobs(actor, ids, att, with_entropy=True, **kw)
        ref = causal_lm_logprobs(reference, ids, att, **kw).logprobs if reference is not None else None
        return logprobs, entropy, values, ref

    logprobs, entropy, values, ref_logprobs = score_in_chunks(passes, sequences, cfg.forward_batch_size)
    completions = decode_responses(tokenizer, rollout.response_ids, rollout.response_mask)
    prompt_texts, extras = [ex["prompt"] for ex in rows], [ex.get("extra", {}) for ex in rows]
    spread = None
    if isinstance(reward, EnsembleReward):
        scores, spread = reward.score_and_spread(prompt_texts, completions, extras)
        scores = checked_scores(scores, len(completions), "ensemble")
    else:
        scores = score_responses(reward, prompt_texts, completions, extras)
    return Experience(
        sequences,
        logprobs,
        entropy,
        ref_logprobs,
        values,
        scores,
        spread,
        completions,
        rollout.ended_with_eos,
        group_size,
        generation_s=t1 - t0,
        scoring_s=time.perf_counter() - t1,
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: Tensor, response_mask: Tensor) -> list[str]:
    """Each response's text, up to and including its first EOS, special tokens skipped."""
    lengths = response_mask.sum(-1).long().tolist()
    rows = response_ids.tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(rows, lengths, strict=True)], skip_special_tokens=True)


@torch.no_grad()
def score_responses(
    source: RewardSource, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[dict[str, Any]]
) -> Tensor:
    """The sequence score of each completion, (B,) float32 on the CPU; `RewardError` (naming the source) when
    the source returns the wrong number of scores or a non-finite one."""
    return checked_scores(source.score(prompts, completions, extras), len(completions), source_name(source))
