"""What a family's training steps report, held where it was computed until it is needed.

A family returns its log values as 0-dim tensors (or plain numbers). Reading a GPU tensor on the
host (``.item()``, ``float()``) waits for every kernel queued before it, so a loop that read each
step's loss would drain the GPU's queue once per step and let it idle while the host prepares the
next step. The trainer therefore keeps the values here and reads them in one device-to-host copy
when it needs them anyway: at a log step, before a checkpoint, an evaluation or a sample grid.
"""
from __future__ import annotations

import math

import torch


class StepLogs:
    """Per-micro-batch log rows since the last read: tensors stay on their device until ``read``."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, dict]] = []  # (optimizer step, row) not yet read
        self.rows: list[tuple[int, dict[str, float]]] = []  # read since the last ``clear``
        self.warning = ""

    def add(self, step: int, logs: dict) -> None:
        """Keep one micro-batch's logs; a "warning" string is kept apart, other non-numbers dropped."""
        row = {}
        for key, value in logs.items():
            if key == "warning":
                self.warning = str(value) if value else self.warning
            elif torch.is_tensor(value):
                row[key] = value.detach().reshape(())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = float(value)
        self._pending.append((step, row))

    def read(self) -> list[tuple[int, dict[str, float]]]:
        """Bring every pending row to the host (one copy for all its tensors) and return them."""
        tensors = [v for _, row in self._pending for v in row.values() if torch.is_tensor(v)]
        values = iter(torch.stack([t.float() for t in tensors]).tolist() if tensors else [])
        new = [(step, {k: next(values) if torch.is_tensor(v) else v for k, v in row.items()})
               for step, row in self._pending]
        self._pending.clear()
        self.rows.extend(new)
        return new

    def first_non_finite(self) -> int | None:
        """The optimizer step of the first read row with a NaN or infinite value, if any."""
        for step, row in self.rows:
            if not all(math.isfinite(v) for v in row.values()):
                return step
        return None

    def means(self) -> dict[str, float]:
        """Each key's mean over the rows read since the last ``clear`` (keys in first-seen order)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _, row in self.rows:
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    def clear(self) -> None:
        """Start a new logging window (pending rows, if any, stay pending)."""
        self.rows.clear()
        self.warning = ""
