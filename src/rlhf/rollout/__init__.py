"""Online experience: sampling responses (a generation backend), scoring them (reward models, Python functions,
ensembles), shaping the scores, and the rollout batch the online trainers' losses read."""
