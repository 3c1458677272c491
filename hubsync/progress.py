"""Progress of the stages hubsync owns (compare, write, hash, the verification steps): never silent, never in
the way.

On a terminal each stage draws a bar with bytes and ETA through huggingface_hub's own tqdm class, so the
switches that hide the download bars hide ours too (`HF_HUB_DISABLE_PROGRESS_BARS=1`,
`huggingface_hub.utils.disable_progress_bars()`). Without a terminal (CI logs, pipes) or with bars switched
off, a stage logs one line when it ends, plus one line every ~10 s while a long stage runs, so a log never
goes quiet for minutes. `-q` (the `hubsync` logger above INFO) silences both. Everything goes to stderr:
stdout stays data.

A stage inside another (a verification step, the hashing inside it) draws its bar under its parent's; in a log
only the outermost stage writes, and its periodic line names the inner stage running: one line per stage the
user asked for, not one per inner step.

Stdlib only at import; tqdm comes in with huggingface_hub, and only once a bar is drawn.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

log = logging.getLogger("hubsync")

INTERVAL_S = 10.0  # between two log lines of a running stage
_REFRESH_S = 1.0  # between two redraws of a bar that received no bytes (keeps its clock moving)
_TRUE = ("1", "true", "yes", "on")
_active: list[Stage] = []  # the open stages, outermost first
_active_lock = threading.Lock()

Mode = Literal["bar", "log", "off"]


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as the Hub and tqdm's unit_scale count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def bars_disabled() -> bool:
    """huggingface_hub's switches: the environment variable, or `disable_progress_bars()` once it is loaded."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in _TRUE:
        return True
    hub_tqdm = sys.modules.get("huggingface_hub.utils.tqdm")
    if hub_tqdm is not None:
        return bool(hub_tqdm.are_progress_bars_disabled("hubsync"))
    return False


def choose_mode() -> Mode:
    if not log.isEnabledFor(logging.INFO):
        return "off"
    stream = sys.stderr
    if stream is not None and stream.isatty() and not bars_disabled():
        return "bar"
    return "log"


class Stage:
    """One stage's progress: `advance(n)` after each piece of work (bytes, unless `unit` says otherwise)."""

    def __init__(
        self,
        name: str,
        total: int | None,
        *,
        unit: str = "B",
        mode: Mode = "log",
        nested: bool = False,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL_S,
    ) -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.mode = mode
        self.nested = nested
        self.done = 0
        self._clock = clock
        self._interval = interval
        self._started = clock()
        self._last_line = self._started
        self._bar: Any = self._open_bar() if mode == "bar" else None

    def _open_bar(self) -> Any:
        from huggingface_hub.utils import tqdm

        return tqdm(
            total=self.total,
            unit=self.unit,
            unit_scale=self.unit == "B",
            desc=self.name,
            leave=not self.nested,
            # a stage that counts nothing (a verification step) shows its name and clock only
            bar_format=None if self.total else "{desc} [{elapsed}]",
            name=f"hubsync.{self.name.split(':')[0]}",
        )

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def tick(self, inner: Stage | None = None) -> None:
        """Called about once a second while the stage runs: redraw the bar, or log a line every `interval`
        (naming `inner`, the innermost stage running inside this one)."""
        if self._bar is not None:
            self._bar.refresh()
        elif self.mode == "log" and not self.nested and self._clock() - self._last_line >= self._interval:
            self._last_line = self._clock()
            log.info("%s", self.running_line(inner))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and not self.nested:
            log.info("%s", self.end_line())

    # ---- the lines, pure
    def _amount(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else f"{n:,.0f} {self.unit}"

    def running_line(self, inner: Stage | None = None) -> str:
        now = f"; now {inner.name}: {inner._progress()}" if inner is not None and inner is not self else ""
        return f"{self.name}: {self._progress()}{now}"

    def _progress(self) -> str:
        elapsed = self.elapsed
        if not self.total:
            done = f"{self._amount(self.done)} so far, " if self.done else ""
            return f"{done}running for {elapsed:.0f} s"
        share = self.done / self.total
        left = f", about {elapsed / share - elapsed:.0f} s left" if share > 0 else ""
        return (
            f"{self._amount(self.done)} of {self._amount(self.total)} ({share:.0%}) in {elapsed:.0f} s{left}"
        )

    def end_line(self) -> str:
        elapsed = self.elapsed
        rate = f" ({human_bytes(self.done / elapsed)}/s)" if self.unit == "B" and elapsed > 0.05 else ""
        amount = f"{self._amount(self.done)} " if self.done or self.total else ""
        return f"{self.name}: {amount}done in {elapsed:.1f} s{rate}"


def _ticker(current: Stage, stop: threading.Event) -> None:
    while not stop.wait(_REFRESH_S):
        with _active_lock:
            inner = _active[-1] if _active else None
        current.tick(inner)


@contextmanager
def stage(name: str, total: int | None = None, *, unit: str = "B") -> Iterator[Stage]:
    """Show the progress of one stage for the time of the `with` block."""
    with _active_lock:
        nested = bool(_active)
        current = Stage(name, total, unit=unit, mode=choose_mode(), nested=nested)
        _active.append(current)
    stop = threading.Event()
    ticker = None
    if current.mode != "off":
        ticker = threading.Thread(target=_ticker, args=(current, stop), daemon=True, name=f"progress {name}")
        ticker.start()
    try:
        yield current
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        with _active_lock:
            _active.remove(current)
        current.close()
