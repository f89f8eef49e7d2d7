"""rlhf: align language models with human preferences (SFT, reward models, PPO, the DPO family)."""

__version__ = "0.1.0"
