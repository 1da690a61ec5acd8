"""Peak host memory of this process (Linux /proc), resettable so each candidate gets its own peak."""

from __future__ import annotations

import contextlib
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0). False where unsupported."""
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
        return True
    return False


class PeakRssTracker:
    """Peak RSS growth from ``start()``: what loading and running one model costs on the host.

    Uses the kernel's high-water mark when it can be reset; otherwise falls back to RSS samples taken by
    ``sample()`` (called by the measurement loop), which can miss short spikes.
    """

    def __init__(self) -> None:
        self.baseline = 0
        self._exact = False
        self._peak_sampled = 0

    def start(self) -> None:
        self._exact = reset_peak_rss()
        self.baseline = current_rss_bytes() or 0
        self._peak_sampled = self.baseline

    def sample(self) -> None:
        self._peak_sampled = max(self._peak_sampled, current_rss_bytes() or 0)

    def peak_delta_bytes(self) -> int | None:
        self.sample()
        peak = peak_rss_bytes() if self._exact else self._peak_sampled
        if peak is None or not self.baseline:
            return None
        return max(0, peak - self.baseline)
