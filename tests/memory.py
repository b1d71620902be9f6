"""Measuring the memory a piece of code really allocates: the process's *anonymous* resident memory (``RssAnon`` in
/proc/self/status). Memory-mapped safetensors are file pages (``RssFile``) the kernel can drop at any time, so they do
not count; tensors created in RAM (dtype casts, copies) do. Used in child processes (a fresh interpreter, so the
test process's own memory does not blur the figures): ``with Peak() as p: ...; p.delta`` is the peak increase in
bytes, sampled every millisecond by a thread."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

MB = 2**20


def anon() -> int:
    """The process's anonymous resident memory in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+) kB", f.read()).group(1)) * 1024


class Peak:
    """The peak of :func:`anon` while the ``with`` block runs, relative to its value at the start (``delta``)."""

    def __enter__(self) -> "Peak":
        self.base = self.peak = anon()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, anon())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anon())

    @property
    def delta(self) -> int:
        return self.peak - self.base
