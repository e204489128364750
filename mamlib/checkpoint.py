"""Atomic, versioned checkpoints with strict, explained loading."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            torch.save(payload, tmp_file)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, expected_kind: str | tuple[str, ...] | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = " (pass the file, e.g. <run dir>/checkpoints/last.pt)" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # corrupted or not a torch file
        raise CheckpointError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} was not written by this project (no format_version field)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload['format_version']}, this code reads {FORMAT_VERSION}")
    if expected_kind is not None:
        kinds = (expected_kind,) if isinstance(expected_kind, str) else expected_kind
        if payload.get("kind") not in kinds:
            raise CheckpointError(f"{path} is a '{payload.get('kind')}' checkpoint, expected one of {list(kinds)}")
    return payload


def check_same_data(saved: dict, current: dict, path) -> None:
    """Fail with both values when a checkpoint was trained on other data (name, K, D or alphabet)."""
    for key in ("name", "K", "D", "alphabet"):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {path} was trained with dataset {key}={saved.get(key)!r}, "
                                  f"but this run uses {key}={current.get(key)!r}; pick the matching dataset or checkpoint")


def load_model_state(model: torch.nn.Module, state: dict, path, allowed_missing_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load strictly, except that keys under ``allowed_missing_prefixes`` may be absent. Returns the missing keys."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"checkpoint {path} does not fit the model (were arch.* and the dataset the same?): {error}") from error
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing_prefixes)] if allowed_missing_prefixes else list(result.missing_keys)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {result.unexpected_keys[:8]}; were the architecture options (arch.*) the same?")
    return list(result.missing_keys)
