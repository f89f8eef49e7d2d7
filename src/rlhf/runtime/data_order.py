"""A seeded, resumable order of global batches of dataset indices.

Why not a DataLoader with a sampler: the order must be a pure function of (seed, epoch, position) so that a
resumed run draws exactly the batches the interrupted one would have drawn, on any number of processes.
Every process builds the same `DataOrder` and draws the same global batch; `Engine.local_indices` then
gives each process its share. Loading the examples for those indices is the trainer's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf.data import example_tokens


class DataOrder:
    """Global batches of `batch_size` indices into a dataset of `num_samples` examples, forever.

    Epoch e uses the permutation drawn by a `torch.Generator` seeded with `seed * 1_000_003 + e` (independent
    of the global RNG, so model code that draws random numbers cannot shift the data order). The last
    `num_samples % batch_size` indices of each epoch's permutation are dropped, so every optimizer step sees
    a full batch (equal work per step, and the gradient-accumulation arithmetic stays exact); because each
    epoch is reshuffled, a different remainder is dropped each epoch.

    `shuffle=False` walks 0..num_samples-1 in order (still dropping the remainder).

    `lengths`: each example's tokens (`of_examples`), which `Engine.local_indices` cuts padded micro-batches by.
    With `group_by_length` (`data.group_by_length`), batches of like length, as `transformers`' `group_by_length`
    draws them. The epoch's kept permutation is cut into groups of `GROUP_BATCHES` batches, each
    group sorted longest first (stably) and cut into batches, and the batches of the epoch shuffled by the same
    generator. Every epoch still sees each kept example once, in batches that change from epoch to epoch; a padded
    batch then pads little, where random ones of a long-tailed length distribution hold up to ~2.5x their tokens.
    It changes which examples share a step, hence the run (an option, off by default).
    """

    GROUP_BATCHES = 50
    """Batches per group of `lengths` ordering: a random sample large enough that its sorted cut gives batches of
    nearly equal lengths (`transformers` groups 50 batches too)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
    ) -> None:
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
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} examples")
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the examples' lengths")
        self.lengths, self.group_by_length = lengths, group_by_length
        self.epoch = 0
        self.position = 0  # batches already drawn in the current epoch
        self._perm: list[int] | None = None
        self._perm_epoch = -1

    @classmethod
    def of_examples(
        cls, examples: Sequence[dict[str, Any]], batch_size: int, *, seed: int, group_by_length: bool
    ) -> DataOrder:
        """The order of these tokenized examples, with their `lengths` (`rlhf.data.example_tokens`)."""
        lengths = [example_tokens(e) for e in examples]
        return cls(len(examples), batch_size, seed=seed, lengths=lengths, group_by_length=group_by_length)

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch: num_samples // batch_size."""
        return self.num_samples // self.batch_size

    def _permutation(self) -> list[int]:
        if self._perm is None or self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
            if self.shuffle:
                self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                self._perm = list(range(self.num_samples))
            if self.group_by_length:
                self._perm = self._grouped(self._perm, g)
            self._perm_epoch = self.epoch
        return self._perm

    def _grouped(self, perm: list[int], g: torch.Generator) -> list[int]:
        """The kept part of `perm` as batches of like length, in a shuffled order (see the class docstring)."""
        lengths, size = self.lengths, self.batch_size
        assert lengths is not None
        kept = perm[: self.steps_per_epoch * size]
        group = size * self.GROUP_BATCHES
        ordered = [
            i for s in range(0, len(kept), group) for i in sorted(kept[s : s + group], key=lambda i: -lengths[i])
        ]
        batches = [ordered[s : s + size] for s in range(0, len(ordered), size)]
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]

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
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state saved for a different dataset size or batch size."""
        here = {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "group_by_length": self.group_by_length,
        }
        for key, value in here.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"cannot resume the data order: the checkpoint was saved with {key}={state[key]}, "
                    f"this run has {key}={value} (changed data, batch size or data.group_by_length?)"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._perm = None
