"""Run logging: metrics.jsonl always, wandb offline by default, unknown modes refused."""
import json

import pytest

from mamlib.runlog import RunLogger


def test_offline_logger_writes_metrics_and_a_wandb_run(tmp_path):
    logger = RunLogger(tmp_path, cfg=None, mode="offline")
    logger.log({"train/loss": 1.5, "note": "text"}, step=3)
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 3 and record["train/loss"] == 1.5 and record["note"] == "text"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_disabled_logger_still_writes_metrics_and_bad_mode_fails(tmp_path):
    logger = RunLogger(tmp_path, mode="disabled")
    logger.log({"x": 1}, step=1)
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="logger.mode='loud'"):
        RunLogger(tmp_path, mode="loud")
    silent = RunLogger(tmp_path / "other", mode="offline", enabled=False)  # non-main ranks write nothing
    silent.log({"x": 1}, step=1)
    assert not (tmp_path / "other").exists()


def test_a_record_cut_short_by_a_kill_is_dropped_not_glued_to_the_next(tmp_path):
    from mamlib.plots import read_metrics_jsonl
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # killed during the second append
    assert read_metrics_jsonl(path)["train/loss"][1].tolist() == [2.0]  # readable as it is
    logger = RunLogger(tmp_path, mode="disabled")  # a resumed run
    logger.log({"train/loss": 1.0}, step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
