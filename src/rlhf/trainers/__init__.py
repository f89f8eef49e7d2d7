"""The algorithms, one file each (`Config`, loss function, `train(cfg) -> run directory`): sft, reward (rm), dpo
(the DPO family, SimPO, ORPO), kto, ppo, grpo (GRPO, RLOO, REINFORCE++ and their variants). `rlhf.cli.ALGORITHMS`
maps each `rlhf train` name to its module."""
