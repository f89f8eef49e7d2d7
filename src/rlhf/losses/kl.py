"""Per-token KL estimators (k1, k2, k3) and the KL-coefficient controllers used by PPO.

The estimators follow Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
With samples y ~ pi (the policy that generated them) and d = log pi(y) - log pi_ref(y):

    k1 = d                       unbiased for KL(pi || pi_ref), high variance, can be negative per token
    k2 = d^2 / 2                 biased, low variance, >= 0
    k3 = exp(-d) - 1 + d         unbiased for KL(pi || pi_ref), low variance, >= 0 everywhere

The controllers hold the coefficient beta of the reward penalty  r_t - beta * kl_t  (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences", Sec. 2).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from rlhf.losses.reduce import upcast

KL_ESTIMATORS = ("k1", "k2", "k3")

K3_LOGRATIO_MIN = -20.0
"""k3 clamps d at this value from below: exp(-d) would overflow float32 at d < -88 (and exp(500) overflows
every dtype). Beyond the clamp k3 saturates at exp(20) - 21 (about 4.85e8) with zero gradient."""


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the sampling policy and the reference, not reduced.

    With d = logprobs - ref_logprobs (log-probabilities of the sampled tokens under pi and pi_ref):

        k1 = d
        k2 = d^2 / 2
        k3 = exp(-d) - 1 + d          computed as expm1(-d) + d, with d clamped to >= K3_LOGRATIO_MIN

    Reference: Schulman (2020), "Approximating KL Divergence" (a blog note, no equation numbers). k1 and k3
    are unbiased for KL(pi || pi_ref) when the tokens are sampled from pi; k3 is also >= 0 token by token
    (clamped at 0 against rounding). Shapes: (B, T) in, (B, T) out; half precision is computed and returned
    in float32. Mask and reduce with `reduce.masked_mean` / `reduce.aggregate`.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    d = upcast(logprobs) - upcast(ref_logprobs)
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d.square()
    else:
        d = d.clamp(min=K3_LOGRATIO_MIN)
        kl = (torch.expm1(-d) + d).clamp(min=0.0)
    return kl


class KLController(Protocol):
    """What the trainers use: the current coefficient, an update rule, and state for exact resume."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class AdaptiveKLController:
    """Log-space proportional controller that steers the measured KL towards a target.

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + e * n_steps / horizon)

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2 (e_t and
    beta_{t+1} = beta_t (1 + K_beta e_t)); K_beta = n_steps / horizon as in their released code
    (openai/lm-human-preferences). `current_kl` is the mean per-sequence KL of the last batch (nats),
    `n_steps` the number of samples (or steps) that batch represents.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move `value` one step towards the target. Takes python numbers (call `.item()` outside)."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient, as a plain float (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant coefficient; same interface as `AdaptiveKLController`, `update` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
