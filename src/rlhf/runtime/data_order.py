"""A seeded, resumable order of global batches of dataset indices.

Why not a DataLoader with a sampler: the order must be a pure function of (seed, epoch, position) so that a
resumed run draws exactly the batches the interrupted one would have drawn, on any number of processes.
Every process builds the same `DataOrder` and draws the same global batch; `Engine.local_indices` then
gives each process its share. Loading the examples for those indices is the trainer's business.
"""

from __future__ import annotations

from typing import Any

import torch


class DataOrder:
    """Global batches of `batch_size` indices into a dataset of `num_samples` examples, forever.

    Epoch e uses the permutation drawn by a `torch.Generator` seeded with `seed * 1_000_003 + e` (independent
    of the global RNG, so model code that draws random numbers cannot shift the data order). The last
    `num_samples % batch_size` indices of each epoch's permutation are dropped, so every optimizer step sees
    a full batch (equal work per step, and the gradient-accumulation arithmetic stays exact); because each
    epoch is reshuffled, a different remainder is dropped each epoch.

    `shuffle=False` walks 0..num_samples-1 in order (still dropping the remainder).
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_samples < batch_size:
            raise ValueError(
                f"the dataset has {num_samples} examples, fewer than one batch ({batch_size}); "
                "lower train.batch_size or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches already drawn in the current epoch
        self._perm: list[int] | None = None
        self._perm_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch: num_samples // batch_size."""
        return self.num_samples // self.batch_size

    def _permutation(self) -> list[int]:
        if self._perm is None or self._perm_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
                self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                self._perm = list(range(self.num_samples))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> list[int]:
        """The next global batch of `batch_size` dataset indices (moves to the next epoch when one is used up)."""
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.batch_size
        batch = self._permutation()[start : start + self.batch_size]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state saved for a different dataset size or batch size."""
        for key in ("num_samples", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint was saved with {key}={state[key]}, "
                    f"this run has {key}={getattr(self, key)} (changed data or batch size?)"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._perm = None
