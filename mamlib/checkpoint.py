"""Atomic, versioned, checksummed checkpoints that hold only tensors and plain containers, loaded safely.

Format 2: ``torch.save`` of a dict of tensors, numbers, strings, None, lists and dicts (no Python objects),
read back with ``torch.load(weights_only=True)`` so that a crafted file cannot run code. ``checksum`` is a
SHA-256 over every entry in a fixed key order (tensor bytes, dtype and shape included), verified on load.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_write
from .nets.base import ARCH_DEFAULTS

FORMAT_VERSION = 2
REMOVED_ARCH_OPTIONS = {"marginal_encoder": "shared"}  # arch options no longer offered: the value the code still builds


class CheckpointError(UserError, RuntimeError):
    pass


def payload_checksum(payload: dict) -> str:
    """SHA-256 over the payload (without its ``checksum`` entry), walking dict keys in sorted order."""
    digest = hashlib.sha256()

    def visit(value, where: str) -> None:
        digest.update(where.encode())
        if torch.is_tensor(value):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {flat.dtype} {tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}".encode())
            for index, item in enumerate(value):
                visit(item, f"{where}[{index}]")
        else:  # numbers, strings, None, bools: their repr is exact
            digest.update(f"{type(value).__name__} {value!r}".encode())

    visit({key: value for key, value in payload.items() if key != "checksum"}, "")
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    payload["checksum"] = payload_checksum(payload)
    return atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike, expected_kind: str | tuple[str, ...] | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = " (pass the file, e.g. <run dir>/checkpoints/last.pt)" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():  # garbage rather than a pickle of Python objects
            raise CheckpointError(f"{path} is not a readable checkpoint (not a torch file, or damaged)") from error
        # weights_only refused a global (a class or function): only tensors and plain containers are loaded
        raise CheckpointError(f"{path} holds Python objects besides tensors, so it is not loaded (loading could run code); "
                              "convert your own format-1 checkpoints with scripts/upgrade_checkpoint.py") from error
    except Exception as error:  # corrupted or not a torch file
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} is not a readable checkpoint: {reason}") from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} was not written by this project (no format_version field)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload['format_version']}, this code reads {FORMAT_VERSION}; "
                              "retrain with this version")
    if payload.get("checksum") != payload_checksum(payload):
        raise CheckpointError(f"{path} is damaged (its checksum does not match its contents); "
                              "use another copy or retrain")
    if expected_kind is not None:
        kinds = (expected_kind,) if isinstance(expected_kind, str) else expected_kind
        if payload.get("kind") not in kinds:
            raise CheckpointError(f"{path} is a '{payload.get('kind')}' checkpoint, expected one of {list(kinds)}")
    if isinstance(payload.get("arch"), dict):
        payload["arch"] = without_removed_options(payload["arch"], path)
    return payload


def without_removed_options(arch: dict, path) -> dict:
    """``arch`` without the removed options, which a checkpoint may store at the value still built; another value fails."""
    for key, kept in REMOVED_ARCH_OPTIONS.items():
        if arch.get(key, kept) != kept:
            raise CheckpointError(f"checkpoint {path} was trained with arch.{key}={arch[key]!r}, an option that was removed "
                                  f"(only {kept!r} remains): retrain it, or load it with a checkout from before the removal")
    return {key: value for key, value in arch.items() if key not in REMOVED_ARCH_OPTIONS}


DATA_FINGERPRINT_KEYS = ("name", "K", "D", "alphabet", "data_sha256")


def check_same_data(saved: dict, current: dict, path) -> None:
    """Fail with both values when a checkpoint was trained on other data (name, K, D, alphabet or array contents)."""
    for key in DATA_FINGERPRINT_KEYS:
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {path} was trained with dataset {key}={saved.get(key)!r}, "
                                  f"but this run uses {key}={current.get(key)!r}; pick the matching dataset or checkpoint")


def check_same_arch(saved: dict, current: dict, path, purpose: str = "resume") -> None:
    """Fail with both values when the architecture options differ (resuming or a warm start needs the very same network)."""
    saved, current = {**ARCH_DEFAULTS, **saved}, {**ARCH_DEFAULTS, **current}
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {path} was trained with arch.{key}={saved.get(key)!r}, "
                                  f"but this run uses arch.{key}={current.get(key)!r}; use the same arch.* options to {purpose}")


def load_model_state(model: torch.nn.Module, state: dict, path, allowed_missing_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load strictly, except that keys under ``allowed_missing_prefixes`` may be absent. Returns the missing keys."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"checkpoint {path} does not fit the model (were arch.* and the dataset the same?): {reason}") from error
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing_prefixes)] if allowed_missing_prefixes else list(result.missing_keys)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {result.unexpected_keys[:8]}; were the architecture options (arch.*) the same?")
    return list(result.missing_keys)
