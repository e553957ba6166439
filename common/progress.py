"""Progress that suits where it goes: tqdm's bar on a terminal; in a log file (a cluster job, nohup, CI: the
stream is not a terminal) plain newline-ended lines with the same facts, at most one every ``LOG_EVERY_S``
seconds or each tenth of the work, and the last one when the work ends. Never a carriage return in a file: a bar
redrawn twice a second wrote 1.3 MB of them into a 50-minute study's log.

tqdm has no such mode (its ``mininterval`` still redraws in place, and ``set_postfix`` redraws at once), hence
this subclass; everything else (rates, ETA, postfix, ``disable``) is tqdm's.
"""

from __future__ import annotations

import io
import math
import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0  # seconds between lines in a log file (a tenth of the work also prints one)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress(tqdm):
    """``tqdm(...)`` with log-file lines where the stream is not a terminal (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self._lines = not _is_terminal(stream)
        self._last_t, self._last_tenth, self._last_n, self._closing = -math.inf, -1, None, False
        if self._lines:
            kwargs.setdefault("mininterval", 0.0)  # display() decides when a line is due
            kwargs["dynamic_ncols"] = False  # and no width: a log line is never cut (a study's postfix is long)
            kwargs.setdefault("bar_format", "{l_bar}{r_bar}")  # the facts without the drawn bar
        super().__init__(*args, **kwargs)
        if self._lines and not self.disable:
            self.sp = lambda s: None  # tqdm's in-place printer ('\r' + line) is never used in a file

    def _line(self):
        self.fp.write(self.__str__().replace("\r", "").rstrip() + "\n")
        self.fp.flush()
        self._last_t, self._last_n = time.monotonic(), (self.n, self.postfix)
        self._last_tenth = self._tenth()

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else -1

    def display(self, msg=None, pos=None):
        if not self._lines:
            return super().display(msg, pos)
        if self._closing or msg == "":  # tqdm clearing its line: nothing to clear in a file
            return True
        if time.monotonic() - self._last_t >= LOG_EVERY_S or self._tenth() != self._last_tenth:
            self._line()
        return True

    def clear(self, nolock=False):
        if not self._lines:
            super().clear(nolock)

    def moveto(self, n):
        if not self._lines:
            super().moveto(n)

    def close(self):
        if not self._lines or self.disable:
            return super().close()
        if self._last_n != (self.n, self.postfix):  # the state at the end, once
            self._line()
        self._closing, fp = True, self.fp
        self.fp = io.StringIO()  # tqdm's own closing writes ('\n', a last redraw) go nowhere
        try:
            super().close()
        finally:
            self.fp = fp
