"""What a person sees on the terminal besides the results, all of it on stderr: a progress bar with the
time left for every long loop (`bar`: the folder scan, the latent cache, sampling, quality runs,
training) and adapterkit's log records (`configure_logging`).

    configure_logging()            INFO records of every `adapterkit.*` logger, our format (once a process)
    configure_logging(WARNING)     warnings only, and no bars (`adapterkit -q`; accelerate launch's other
                                   processes, so a machine shows one bar)
    for x in bar(items, desc="scan", unit="img"): ...

Bars and INFO records go together: a bar is drawn unless the `adapterkit` logger was set above INFO.
Records are written with `tqdm.write`, above the bars rather than through them, to the stderr of the
moment (pytest swaps it per test). The loggers propagate as usual, so a caller's own handlers (or
pytest's caplog) still get every record.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

LOGGER = "adapterkit"          # the parent of every module logger (logging.getLogger(__name__))


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:          # logging's contract: a failing handler reports, never raises
            self.handleError(record)


class _Format(logging.Formatter):
    """INFO as the message itself (the job's own lines read the same), "warning: ..." / "error: ...",
    and DEBUG with the logger's name (who said it matters there)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {message}"
        return message


def configure_logging(level: int | None = None) -> None:
    """Our handler on the `adapterkit` logger, added once a process. `level` sets the logger's level;
    None sets INFO where no level is set and keeps one an earlier call set (the command line's -q/-v
    come before a job's own call)."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Handler) for h in log.handlers):
        handler = _Handler()
        handler.setFormatter(_Format("%(message)s"))
        log.addHandler(handler)
    if level is None and log.level == logging.NOTSET:
        level = logging.INFO
    if level is not None:
        log.setLevel(level)


def quiet() -> bool:
    """True when the `adapterkit` logger was set above INFO: no bars then."""
    return logging.getLogger(LOGGER).level > logging.INFO


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "img",
        leave: bool | None = True, show: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr (count, rate, time left), off under `quiet()` or when not `show`. leave=None
    keeps it on screen only when it is the outermost bar (a sampling bar under the training bar goes
    when it is done)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=quiet() or not show,
                initial=initial, dynamic_ncols=True, file=sys.stderr)
