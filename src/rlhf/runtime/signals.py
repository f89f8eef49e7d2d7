"""Stopping on SIGTERM/SIGINT: before the first step at once, afterwards between steps with a checkpoint.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread is, finalizers
(`__del__`) included; an exception raised there goes to `sys.unraisablehook` ("Exception ignored in ...") and no
further. So the loading-time handler also leaves a mark that the engine's `StopSignals.install` takes up: a
SIGTERM while loading always stops the run, at once or, where Python dropped the exit (quietly), at the first step
with a checkpoint.
Handlers can only be installed from the main thread; elsewhere these are inert.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from rlhf.errors import EXIT_INTERRUPTED

_LOADING_STOP: list[int] = []
"""Signals the loading-time handler got (kept for `StopSignals.install`, in case Python dropped its exit)."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop_while_loading(signum: int, frame: Any) -> NoReturn:
    _LOADING_STOP.append(signum)
    print(f"rlhf: got {signal.Signals(signum).name} while loading: stopping", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


@contextmanager
def stop_while_loading() -> Iterator[None]:
    """Within: SIGTERM stops with EXIT_INTERRUPTED (75) before anything is trained, as the engine's handler
    (installed once training starts) later does with a checkpoint."""
    if not _main_thread():
        yield
        return
    previous, previous_hook = signal.signal(signal.SIGTERM, _stop_while_loading), sys.unraisablehook

    def unraisable(info: Any) -> None:  # where Python drops our exit, say nothing: the engine takes it up
        if not (_LOADING_STOP and isinstance(info.exc_value, SystemExit)):
            previous_hook(info)

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        _LOADING_STOP.clear()


class StopSignals:
    """SIGTERM/SIGINT set a flag that the training loop checks between steps; a second signal stops at once."""

    def __init__(self, *, announce: bool) -> None:
        self.requested = False
        self.announce = announce
        self._prev: dict[int, Any] = {}

    def install(self) -> None:
        if _main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._prev[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
            if _LOADING_STOP:  # a SIGTERM while loading whose exit Python dropped
                self._handle(_LOADING_STOP.pop(), None)
                _LOADING_STOP.clear()

    def restore(self) -> None:
        if _main_thread():
            for sig, handler in self._prev.items():
                signal.signal(sig, handler)
            self._prev = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal: stop now, without a checkpoint
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested = True
        if self.announce:
            print(
                f"rlhf: got {signal.Signals(signum).name}; stopping after this step with a checkpoint "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
