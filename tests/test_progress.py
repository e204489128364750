"""Progress bars: normal redraws on a terminal, sparse updates in a log file."""
import io

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


def test_a_terminal_keeps_tqdm_defaults():
    bar = progress(total=10, file=Terminal())
    assert bar.mininterval < 1.0
    bar.close()
