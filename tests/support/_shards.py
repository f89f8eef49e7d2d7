"""Run a function on shards of a batch as if each shard were one process of a data-parallel run.

Each shard runs in its own thread; the `sum_over` those threads get (an `rlhf.losses.reduce.SumOver`) waits for
every shard to bring its tensor and hands each the elementwise sum, as an all-reduce does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def run_sharded(fn: Callable[..., Any], shards: Sequence[tuple[Any, ...]]) -> list[Any]:
    """[fn(*shard, sum_over=...) for each shard], run concurrently with a shared thread all-reduce."""
    world = len(shards)
    barrier = threading.Barrier(world, timeout=30)
    board: list[Any] = [None] * world
    local = threading.local()

    def sum_over(x: torch.Tensor) -> torch.Tensor:
        board[local.rank] = x
        barrier.wait()
        total = torch.stack(board).sum(0)
        barrier.wait()  # nobody writes the next call's tensor before every shard has read this one
        return total

    def run(rank: int) -> Any:
        local.rank = rank
        return fn(*shards[rank], sum_over=sum_over)

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(run, range(world)))
