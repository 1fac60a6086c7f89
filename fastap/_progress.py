"""Progress display for every long loop (training stages, extraction, downloads).

On a terminal it is a tqdm bar. When the stream is not a terminal (a log file, a pipe, CI), a
bar's carriage returns would leave hundreds of overwritten lines in the log, so
:func:`progress_bar` returns a :class:`LineProgress` instead: one line when the stage ends (count,
time, rate and the last postfix), and one line per ``interval`` seconds while it runs, so a long
stage does not look hung.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Optional, Union

from tqdm.auto import tqdm

__all__ = ["LineProgress", "is_terminal", "progress_bar"]

#: Seconds between the intermediate lines of a :class:`LineProgress`.
LINE_INTERVAL = 60.0


def is_terminal(stream: IO) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, StringIO)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _amount(n: float, unit: str) -> str:
    if unit == "B":  # downloads count bytes
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if n >= scale:
                return f"{n / scale:.1f} {name}"
        return f"{int(n)} B"
    return f"{int(n)} {unit}"


class LineProgress:
    """The part of tqdm's interface this package uses, writing whole lines.

    ``update(n)``, ``set_postfix(**values)``, ``close()`` and use as a context manager. Lines
    read ``<desc>: <done>/<total> <unit> in <s> s (<rate> <unit>/s)[, key=value ...]``.
    """

    def __init__(self, total: Optional[float], desc: str, file: IO, unit: str = "it",
                 initial: float = 0, interval: float = LINE_INTERVAL):
        self.total, self.desc, self.file, self.unit = total, desc, file, unit
        self.n, self.start_n, self.interval = initial, initial, interval
        self.postfix: dict = {}
        self.start = self.last_line = time.perf_counter()
        self.closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = dict(ordered_dict or {}, **values)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._line(now, "")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.perf_counter(), "")

    def _line(self, now: float, suffix: str) -> None:
        seconds = now - self.start
        rate = (self.n - self.start_n) / seconds if seconds > 0 else 0.0
        if self.unit == "B":
            count = _amount(self.n, "B") + (f" of {_amount(self.total, 'B')}"
                                            if self.total is not None else "")
            rate_text = f"{_amount(rate, 'B')}/s"
        else:
            count = f"{int(self.n)}" + (f"/{int(self.total)}" if self.total is not None
                                        else "") + f" {self.unit}"
            rate_text = f"{rate:.3g} {self.unit}/s"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {count} in {seconds:.1f} s ({rate_text}){extra}{suffix}",
              file=self.file, flush=True)


def progress_bar(total: Optional[float], desc: str, *, enabled: bool = True, unit: str = "it",
                 initial: float = 0, file: Optional[IO] = None, leave: bool = False,
                 unit_scale: bool = False, unit_divisor: int = 1000
                 ) -> Union[tqdm, LineProgress]:
    """A progress display on ``file`` (default stderr): a tqdm bar on a terminal, else a
    :class:`LineProgress`; ``enabled=False`` shows nothing (a disabled tqdm)."""
    stream = file if file is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, leave=leave,
                    unit_scale=unit_scale, unit_divisor=unit_divisor, dynamic_ncols=True)
    return LineProgress(total, desc, stream, unit=unit, initial=initial)
