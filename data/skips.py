"""Bookkeeping for samples that a reader skipped or repaired, so bad data never goes unnoticed.

A reader calls `skip(key, reason)` for a sample it dropped (corrupt image, unsupported mode, ...)
and `repair(key, reason)` for one it fixed and kept (a non-UTF-8 caption decoded with
replacement characters, a missing caption). Each event is logged right away with its key
(rate-limited) and `log_summary` emits one line per epoch.
"""

from __future__ import annotations

import logging
from collections import Counter

LOGGER = logging.getLogger("data")


class SkipCounter:
    """Counts skipped and repaired samples by reason and remembers (up to `max_keys`) their keys."""

    def __init__(self, max_keys: int = 20, max_warnings: int = 20, logger: logging.Logger | None = None):
        self.max_keys = max_keys
        self.max_warnings = max_warnings
        self.logger = logger or LOGGER
        self.reset()

    def reset(self) -> None:
        """Forget all counts (e.g. at the start of an epoch)."""
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.skipped_keys: dict[str, list[str]] = {}
        self.repaired_keys: dict[str, list[str]] = {}
        self._warned = 0

    @property
    def total(self) -> int:
        """Number of skipped samples (repairs are not skips)."""
        return sum(self.skipped.values())

    @property
    def total_repaired(self) -> int:
        return sum(self.repaired.values())

    def skip(self, key: str, reason: str, detail: str = "") -> None:
        """Record that sample `key` was dropped because of `reason` (a short category name)."""
        self.skipped[reason] += 1
        self._remember(self.skipped_keys, reason, key)
        self._warn(f"skipping sample {key!r}: {reason}" + (f" ({detail})" if detail else ""))

    def repair(self, key: str, reason: str, detail: str = "") -> None:
        """Record that sample `key` was kept after fixing a problem of kind `reason`."""
        self.repaired[reason] += 1
        self._remember(self.repaired_keys, reason, key)
        self._warn(f"repaired sample {key!r}: {reason}" + (f" ({detail})" if detail else ""))

    def merge(self, other: SkipCounter) -> None:
        """Add the counts and keys of `other` (e.g. from another worker) to this counter."""
        self.skipped.update(other.skipped)
        self.repaired.update(other.repaired)
        for mine, theirs in (
            (self.skipped_keys, other.skipped_keys),
            (self.repaired_keys, other.repaired_keys),
        ):
            for reason, keys in theirs.items():
                for key in keys:
                    self._remember(mine, reason, key)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """JSON-friendly counts: {"skipped": {reason: n}, "repaired": {reason: n}}."""
        return {"skipped": dict(self.skipped), "repaired": dict(self.repaired)}

    def summary(self, epoch: int | None = None) -> str:
        """One line like `skipped 3 samples in epoch 0: corrupt=2 (keys: a, b), mode=1 (keys: c)`."""
        where = f" in epoch {epoch}" if epoch is not None else ""
        line = f"skipped {self.total} samples{where}"
        if self.skipped:
            line += ": " + self._describe(self.skipped, self.skipped_keys)
        if self.repaired:
            line += f"; repaired {self.total_repaired}: " + self._describe(self.repaired, self.repaired_keys)
        return line

    def log_summary(self, logger: logging.Logger | None = None, epoch: int | None = None) -> None:
        """Emit the summary as one warning (only when something was skipped or repaired)."""
        if self.skipped or self.repaired:
            (logger or self.logger).warning(self.summary(epoch))

    @staticmethod
    def _describe(counts: Counter[str], known_keys: dict[str, list[str]]) -> str:
        parts = []
        for reason, n in sorted(counts.items()):
            keys = known_keys.get(reason, [])
            more = ", ..." if n > len(keys) else ""
            parts.append(f"{reason}={n} (keys: {', '.join(keys)}{more})")
        return ", ".join(parts)

    def _remember(self, store: dict[str, list[str]], reason: str, key: str) -> None:
        keys = store.setdefault(reason, [])
        if len(keys) < self.max_keys:
            keys.append(key)

    def _warn(self, message: str) -> None:
        self._warned += 1
        if self._warned <= self.max_warnings:
            self.logger.warning(message)
        elif self._warned == self.max_warnings + 1:
            self.logger.warning("further skip/repair warnings suppressed; see the epoch summary")
