"""Transient progress bars for the passes that run beside the training bar: evaluations and the reference cache.

A pass over a large held-out split or training set (scoring 60k preference pairs for the reference cache) can take
minutes; the bar shows it moving, and leaves no line behind when the pass ends. Only where `show` is true: the main
process with `logging.progress` on (`Engine.shows_progress`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, *, show: bool) -> Iterable[T]:
    """`items`, under a bar named `desc` on stderr when `show`; as they are otherwise."""
    if not show:
        return items
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)
