"""Per-device sliding windows for models that take a window of readings but receive one reading per message."""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np


class WindowStore:
    """One bounded window per device key; the least recently seen device is dropped beyond ``max_devices``."""

    def __init__(self, window: int, channels: int, max_devices: int = 10_000) -> None:
        self.window = window
        self.channels = channels
        self.max_devices = max_devices
        self._windows: OrderedDict[str, deque[np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def push(self, key: str, reading: np.ndarray) -> np.ndarray | None:
        """Append a reading; return the full window (window, channels) once there are enough readings."""
        readings = self._windows.get(key)
        if readings is None:
            readings = self._windows[key] = deque(maxlen=self.window)
            if len(self._windows) > self.max_devices:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        readings.append(reading)
        if len(readings) < self.window:
            return None
        return np.stack(readings)
