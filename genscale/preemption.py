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

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None
