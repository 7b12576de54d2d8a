"""Turn SIGTERM / SIGUSR1 / SIGINT into a flag the training loop polls.

The handler only records the signal: the loop makes every rank agree (one small all-reduce)
and then every rank saves and exits together, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import signal


class StopRequest:
    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back (once the step loop is over nothing polls the flag: a Ctrl-C
        during the final measurements must interrupt them, not be recorded and ignored)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None
