"""Run logging: wandb (offline by default), a local metrics.jsonl beside it, and Python logging."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("mamlib")

LOGGER_MODES = ("offline", "online", "disabled")


class RunLogger:
    """Only the main process writes. ``mode``: offline | online | disabled (disabled still writes metrics.jsonl)."""

    def __init__(self, run_dir, cfg=None, mode: str = "offline", project: str = "mam", enabled: bool = True, name: str | None = None):
        if mode not in LOGGER_MODES:
            raise ValueError(f"logger.mode={mode!r} is unknown; use one of {LOGGER_MODES}")
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb_run = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        drop_partial_last_line(self.metrics_path)
        if mode != "disabled":
            # keep wandb's caches out of ~/.cache unless the user chose a place (the run itself goes to dir= below)
            os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir / "wandb" / "cache"))
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            config = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None
            self.wandb_run = wandb.init(project=project, mode=mode, dir=str(self.run_dir), config=config, name=name, reinit=True)

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v) for k, v in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **clean}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, default=_json_default) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=int(step))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def drop_partial_last_line(path: Path) -> None:
    """A kill during an append can leave a last line without its newline; cut it so that a resumed run's records
    start on a line of their own instead of being glued to half a record."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":  # the usual case: only the last byte is read
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
