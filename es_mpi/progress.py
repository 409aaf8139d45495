"""Progress of a long loop on stderr: a tqdm bar on a terminal, otherwise (a log file, SLURM
output, mpiexec's forwarded stderr) plain lines with done/total, rate and ETA, and one at the
end, so a log is neither silent for minutes nor flooded with carriage returns. The lines come
a tenth of the elapsed time apart, at least 5 s and at most 60 s (about 600 in 10 hours)."""
from __future__ import annotations

import sys
import time

LINE_GAP = (5.0, 60.0)  # least and most seconds between progress lines in a log


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """tqdm's update / set_postfix / close, written as rate-limited lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream=None,
                 gap: tuple[float, float] = LINE_GAP, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.gap, self.clock = stream or sys.stderr, gap, clock
        self.start_n, self.start = initial, clock()
        self.last, self.postfix = self.start, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= min(max(0.1 * (now - self.start), self.gap[0]), self.gap[1]):
            self.write()

    def set_postfix(self, refresh: bool = True, **items) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def line(self, final: bool = False) -> str:
        elapsed = self.clock() - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {format_seconds((self.total - self.n) / rate)}" \
            if rate > 0 and self.n < self.total and not final else ""
        post = f", {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} in "
                f"{format_seconds(elapsed)} ({rate:.3g} {self.unit}/s{eta}){post}")

    def write(self, final: bool = False) -> None:
        self.last = self.clock()
        print(self.line(final), file=self.stream, flush=True)

    def close(self) -> None:
        self.write(final=True)


def progress(total: int, desc: str, unit: str, initial: int = 0, stream=None):
    """A tqdm bar if `stream` (default stderr) is a terminal, else a LineProgress."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream)
    return LineProgress(total, desc, unit, initial, stream)
