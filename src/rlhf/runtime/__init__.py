"""What every trainer runs on and never re-implements: the step engine (optimizer, exact accumulation, clipping,
non-finite guard, logging), atomic checkpoints with exact resume, the run directory, the data order, and the
shared set-up (data splits, step counts) and finish (the final checkpoint, LoRA merged)."""
