"""Stopping on SIGTERM/SIGINT: while loading at once, while training between steps with a checkpoint.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread is, finalizers
(`__del__`) included; an exception raised there goes to `sys.unraisablehook` ("Exception ignored in ...") and no
further, and library code it lands in may turn it into another error (an import that fails). So the loading-time
handler also leaves a mark: the engine's `StopSignals.install` takes it up, and `stop_while_loading` turns any
error that follows it into the same stop. A SIGTERM while loading always stops the run with EXIT_INTERRUPTED (75):
at once, or, where Python dropped the exit (quietly), at the first step with a checkpoint. Once the engine has
finished, a SIGTERM changes nothing: the run is saved, and the command returns its status.
Handlers can only be installed from the main thread; elsewhere these are inert.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rlhf.errors import EXIT_INTERRUPTED


@dataclass
class _Loading:
    """Where the run is, for the loading-time handler (`stop_while_loading`)."""

    stopped: bool = False  # it got SIGTERM (for `StopSignals.install`, in case Python dropped the exit)
    ended: bool = False  # an engine has trained and put the handler back


_LOADING = _Loading()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop_while_loading(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _LOADING.ended:
        print(f"rlhf: got {name} after the run ended; it is saved", file=sys.stderr, flush=True)
        return
    _LOADING.stopped = True
    print(f"rlhf: got {name} while loading: stopping", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


@contextmanager
def stop_while_loading() -> Iterator[None]:
    """Within: SIGTERM stops with EXIT_INTERRUPTED (75) before anything is trained, as the engine's handler
    (installed once training starts) later does with a checkpoint; after the engine's end it is noted and ignored."""
    if not _main_thread():
        yield
        return
    _LOADING.stopped = _LOADING.ended = False
    previous, previous_hook = signal.signal(signal.SIGTERM, _stop_while_loading), sys.unraisablehook

    def unraisable(info: Any) -> None:  # where Python drops our exit, say nothing: the engine takes it up
        if not (_LOADING.stopped and isinstance(info.exc_value, SystemExit)):
            previous_hook(info)

    sys.unraisablehook = unraisable
    try:
        yield
    except BaseException:
        if _LOADING.stopped:  # our exit, turned into another error by the code it landed in
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        _LOADING.stopped = _LOADING.ended = False


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
            if _LOADING.stopped:  # a SIGTERM while loading whose exit Python dropped
                _LOADING.stopped = False
                self._handle(signal.SIGTERM, None)

    def restore(self) -> None:
        """Put back the handlers from before `install`: the run has ended."""
        self._uninstall()
        _LOADING.ended = True

    def _uninstall(self) -> None:
        if _main_thread():
            for sig, handler in self._prev.items():
                signal.signal(sig, handler)
            self._prev = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal: stop now, without a checkpoint
            self._uninstall()
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
