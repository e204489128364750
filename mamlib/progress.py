"""Progress bars that a log file can hold.

On a terminal the bar redraws as usual. When stderr is not a terminal (CI, ``nohup``, cluster logs) every redraw would
become text in the file (one 2,000-step run wrote several hundred kilobytes of them), so there the bar updates at most
every ``MAM_PROGRESS_SECONDS`` seconds (default 30): a few hundred bytes per minute at most.
"""
from __future__ import annotations

import os
import sys

LOG_FILE_INTERVAL_SECONDS = 30.0


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` with a minimum update interval when stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not _is_terminal(kwargs.get("file") or sys.stderr):
        kwargs.setdefault("mininterval", float(os.environ.get("MAM_PROGRESS_SECONDS", LOG_FILE_INTERVAL_SECONDS)))
        kwargs.setdefault("maxinterval", kwargs["mininterval"])  # tqdm's own monitor may not force faster redraws
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
