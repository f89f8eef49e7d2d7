"""Evaluation of trained models: gold-reward scores of a policy's answers, reward-model calibration, `rlhf eval`."""
