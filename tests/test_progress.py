"""Progress bars: normal redraws on a terminal, sparse updates in a log file."""
import io
import re
import time

import pytest
import tqdm.std

from mamlib.progress import LOG_FILE_INTERVAL_SECONDS, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_sparse_updates(monkeypatch):
    monkeypatch.delenv("MAM_PROGRESS_SECONDS", raising=False)
    log_file = io.StringIO()
    bar = progress(total=2000, file=log_file)
    assert bar.mininterval == LOG_FILE_INTERVAL_SECONDS
    for _ in range(2000):
        bar.update(1)
    bar.close()
    # a fast loop: the opening draw and the closing one only, not one line per few steps
    assert log_file.getvalue().count("\r") <= 3, log_file.getvalue()
    monkeypatch.setenv("MAM_PROGRESS_SECONDS", "5")
    assert progress(total=1, file=io.StringIO()).mininterval == 5.0


class Clock:
    """Stands in for time.time: it moves only when the test moves it."""

    def __init__(self):
        self.now = time.time()  # ahead of the real clock from the first step on, so nothing real-time can fire early

    def __call__(self):
        return self.now


def redrawn_counts(monkeypatch, stream, steps):
    """Drive a bar through ``steps`` updates one simulated second apart; the count shown by each redraw, in order."""
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # every bar reads its clock from here (bound when the bar is made)
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)  # no helper thread redrawing on the real clock
    bar = progress(total=steps, file=stream)
    for _ in range(steps):
        clock.now += 1.0
        bar.update(1)
    bar.close()
    return [int(count) for count in re.findall(rf"(\d+)/{steps} \[", stream.getvalue())]


@pytest.mark.parametrize("setting", [None, "5", "20"])
def test_a_log_file_is_redrawn_once_per_interval_of_its_setting(monkeypatch, setting):
    """60 updates, one per simulated second, into a log file: drawn when opened, then every MAM_PROGRESS_SECONDS
    (30 when unset) and once more when closed. A terminal, whatever the setting, is redrawn at every update (tqdm's own
    0.1 s minimum is below the step), so a throttle that is off, or applied to terminals, fails one of the two checks."""
    if setting is None:
        monkeypatch.delenv("MAM_PROGRESS_SECONDS", raising=False)
    else:
        monkeypatch.setenv("MAM_PROGRESS_SECONDS", setting)
    interval = int(setting or LOG_FILE_INTERVAL_SECONDS)
    steps = 60
    assert redrawn_counts(monkeypatch, io.StringIO(), steps) == list(range(0, steps + 1, interval)) + [steps]
    assert redrawn_counts(monkeypatch, Terminal(), steps) == list(range(steps + 1)) + [steps]
