"""Build progress: a one-line bar on a terminal, plain lines otherwise (CI logs, pipes)."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.active: dict[str, float] = {}
        self.lock = threading.Lock()

    def _bar(self) -> str:
        n = 24
        fill = int(n * self.done / max(self.total, 1))
        running = ", ".join(sorted(self.active))[:60]
        return f"\r[{'#' * fill}{'.' * (n - fill)}] {self.done}/{self.total} {running}\x1b[K"

    def start(self, name: str) -> None:
        with self.lock:
            self.active[name] = time.monotonic()
            if not self.enabled:
                return
            self.stream.write(self._bar() if self.tty else f"jitkiln: compiling {name}\n")
            self.stream.flush()

    def finish(self, name: str, status: str, seconds: float) -> None:
        with self.lock:
            self.active.pop(name, None)
            self.done += 1
            if not self.enabled:
                return
            if self.tty:
                self.stream.write(self._bar())
                if self.done == self.total:
                    self.stream.write("\n")
            else:
                self.stream.write(f"jitkiln: [{self.done}/{self.total}] {status} {name} ({seconds:.1f} s)\n")
            self.stream.flush()

    def note(self, msg: str) -> None:
        if self.enabled:
            with self.lock:
                self.stream.write(("\n" if self.tty else "") + f"jitkiln: {msg}\n")
                self.stream.flush()
