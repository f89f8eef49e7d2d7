"""Models: loading (policy, reference, reward, critic; dtype; LoRA), forward passes (token log-probs, scores,
values), padding-free layouts, response log-probs of the preference trainers and their reference (with cache)."""
