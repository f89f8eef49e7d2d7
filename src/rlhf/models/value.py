"""The actor and the critic as one `nn.Module`, so the step engine trains both with one optimizer (and one DDP
wrapper), and one call gives everything a PPO update needs: log-probs, entropy and values of the response tokens.

The critic is either

* a separate one-label `AutoModelForSequenceClassification` (initialised from the reward model, as in
  InstructGPT, or from the policy), whose head is read at every position (`token_scores`); or
* a value head, `nn.Linear(hidden, 1)`, on the policy's own last hidden state: one forward for actor and critic,
  half the memory, at the price of the two objectives sharing a backbone.

Value of response token t: the critic's output at the position *before* t (the state in which token t is chosen),
the same position whose logits give the log-prob of token t. For a rollout `[left-padded prompt | response]` of
response width T these are positions -(T+1) .. -2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor, nn
from torch.nn.utils import skip_init
from transformers import PreTrainedTokenizerBase

from rlhf.config import ModelConfig
from rlhf.errors import UserError
from rlhf.models import padding_free
from rlhf.models.forward import Unpadded, causal_lm_logprobs, token_scores


class ActorCriticOutput(NamedTuple):
    logprobs: Tensor  # (B, T) log-prob of each response token under the policy (at the sampling temperature)
    entropy: Tensor | None  # (B, T) entropy of each prediction, when asked for
    values: Tensor | None  # (B, T) value of the state before each response token, when asked for


class PolicyWithValue(nn.Module):
    """`policy` (a causal LM) and its critic: `critic` (a one-label sequence-classification model) or, with
    `value_head=True`, a linear head on the policy's last hidden state (zero-initialised, so the first values are
    0 and no random number is drawn)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None, *, value_head: bool = False) -> None:
        super().__init__()
        if (critic is None) == (not value_head):
            raise ValueError("give exactly one critic: a `critic` model or `value_head=True`")
        self.policy = policy
        self.critic = critic
        self.value_head: nn.Linear | None = None
        if value_head:
            config = getattr(policy, "config", None)
            hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
            if hidden is None:
                raise ValueError(f"{type(policy).__name__}: cannot tell the hidden size for a value head")
            weight = next(policy.parameters())
            self.value_head = skip_init(nn.Linear, hidden, 1, dtype=weight.dtype, device=weight.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        response_len: int,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_values: bool = True,
        flat: Unpadded | None = None,
    ) -> ActorCriticOutput:
        """Log-probs (and optionally entropy and values) of the last `response_len` tokens. (B, T) each.

        Only the last T+1 positions go through the LM head. Position ids come from the mask, so a left-padded
        prompt is scored exactly as it was generated. `flat`: the batch's padding-free layout, used by the models
        that can (`rlhf.models.forward`).
        """
        T = response_len
        head_values = with_values and self.value_head is not None
        out = causal_lm_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            response_len=T,
            with_entropy=with_entropy,
            temperature=temperature,
            flat=flat,
            hidden=head_values,
        )
        values = None
        if head_values:
            assert self.value_head is not None and out.hidden is not None
            values = self.value_head(out.hidden).squeeze(-1).float()  # (B, T)
        elif with_values:
            values = self.values(input_ids, attention_mask, response_len=T, flat=flat)
        return ActorCriticOutput(out.logprobs, out.entropy, values)

    def values(
        self, input_ids: Tensor, attention_mask: Tensor, *, response_len: int, flat: Unpadded | None = None
    ) -> Tensor:
        """Values of the last `response_len` tokens' states, (B, T), from the separate critic or the value head."""
        T = response_len
        if self.critic is not None:
            return token_scores(self.critic, input_ids, attention_mask, flat=flat)[:, -(T + 1) : -1]  # (B, T)
        return self.forward(input_ids, attention_mask, response_len=T, flat=flat).values  # type: ignore[return-value]

    @property
    def separate_critic(self) -> bool:
        return self.critic is not None

    @property
    def padding_free(self) -> bool:
        """Whether the policy and the critic (if separate) both run padding-free batches (`padding_free.enable`)."""
        return padding_free.enabled(self.policy, self.critic)


@dataclass
class ValueConfig:
    init: Literal["policy", "reward"] = "policy"
    """Weights of the separate critic: the policy's with a fresh scalar head, or the (first) reward model's, as in
    InstructGPT (the reward model must share the policy's tokenizer)."""
    head_on_policy: bool = False
    """Instead of a separate critic, a linear value head on the policy's last hidden state (one forward for actor
    and critic, less memory; `init` is ignored)."""


def load_critic(
    cfg: ValueConfig, policy_cfg: ModelConfig, reward_paths: list[str], policy_tokenizer: PreTrainedTokenizerBase
) -> tuple[nn.Module | None, PreTrainedTokenizerBase | None]:
    """The separate critic (trainable, dropout off) and its tokenizer; (None, None) for a value head on the policy.

    The critic reads the policy's token ids, so one initialised from a reward model must share the policy's
    vocabulary (checked: `UserError` otherwise). A fresh scalar head is drawn from torch's global RNG.
    """
    from rlhf.models.loading import disable_dropout, load_scalar_model, load_tokenizer

    if cfg.head_on_policy:
        return None, None
    path = policy_cfg.path
    if cfg.init == "reward":
        if not reward_paths:
            raise UserError("value.init: reward needs a reward model (reward.model); or use value.init: policy")
        path = reward_paths[0]
    critic_cfg = ModelConfig(
        path=path,
        dtype=policy_cfg.dtype,
        trust_remote_code=policy_cfg.trust_remote_code,
        gradient_checkpointing=policy_cfg.gradient_checkpointing,
    )
    critic = load_scalar_model(critic_cfg, trainable=True)
    tokenizer = load_tokenizer(path, trust_remote_code=policy_cfg.trust_remote_code)
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise UserError(f"value.init: reward: {path} has another tokenizer than the policy; use value.init: policy")
    disable_dropout(critic)
    return critic, tokenizer
