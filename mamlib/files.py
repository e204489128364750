"""Atomic file writes and safe reads: every output of the project goes through ``atomic_write``.

A write goes to a temporary file in the target's folder (normal permissions: 0666 minus the umask, like any
file), is flushed and fsynced, then renamed over the target. A failed write (full disk, read-only folder)
removes the temporary file and raises :class:`OutputError`, so no half file ever looks like a result.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, IO

import numpy as np

from .errors import ConfigError, OutputError, UserError

TEMP_SUFFIX = ".tmp"
NPY_MAGIC = b"\x93NUMPY"


def temp_path_for(path: Path) -> Path:
    """``<name>.<pid>-<random>.tmp`` next to ``path`` (same file system, so the rename is atomic)."""
    return path.parent / f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def stale_temp_files(path: Path) -> list[Path]:
    """Temporary files a killed writer of ``path`` left behind."""
    return sorted(path.parent.glob(f"{path.name}.*{TEMP_SUFFIX}"))


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def check_regular_target(path: Path) -> None:
    """Outputs replace regular files only: renaming over /dev/full or a folder would be wrong."""
    if path.exists() and not path.is_file():
        raise OutputError(f"cannot write {path}: it exists and is not a regular file; give a file path")


def check_output_path(path) -> None:
    """Fail before long work when its output could not be written (not a regular file, or an unwritable folder)."""
    path = Path(path)
    check_regular_target(path)
    check_writable(path.parent)


def atomic_write(path, write: Callable[[IO], object], text: bool = False) -> Path:
    """Call ``write(handle)`` on a temporary file, then rename it to ``path``. Raises OutputError on any OS failure."""
    path = Path(path)
    check_regular_target(path)
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_for(path)
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(descriptor, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        if temp is not None:
            temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(f"could not write {path}: {error.strerror or error}; "
                              "free disk space or choose a writable folder") from error
        raise
    _fsync_folder(path.parent)
    return path


def write_text_atomic(path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), text=True)


def write_json_atomic(path, payload, **options) -> Path:
    return write_text_atomic(path, json.dumps(payload, **{"indent": 1, **options}) + "\n")


def save_npy_atomic(path, array) -> Path:
    return atomic_write(path, lambda handle: np.save(handle, np.asarray(array)))


def save_npz_atomic(path, **arrays) -> Path:
    return atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def check_writable(folder) -> None:
    """Fail now, not after hours of training, when ``folder`` cannot take new files."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(folder / ".write-probe")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise OutputError(f"cannot write into {folder}: {error.strerror or error}; choose a writable folder") from error


def read_npy(path, what: str) -> np.ndarray:
    """A numeric .npy file, never unpickled; anything else is a ConfigError naming ``what`` and the fix."""
    fix = "save it with np.save(path, array.astype(np.int64))"
    try:
        with open(path, "rb") as handle:
            if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise ConfigError(f"{what}={path} is not a .npy file (no NumPy header); {fix}")
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        if isinstance(error, ConfigError):
            raise
        reason = "it holds Python objects" if "pickle" in str(error) else (str(error).splitlines() or [""])[0]
        raise ConfigError(f"{what}={path} is not a numeric .npy file ({reason}); {fix}") from error
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = getattr(array, "dtype", type(array).__name__)
        raise ConfigError(f"{what}={path} holds {kind} values, not numbers; {fix}")
    return array


def file_digest(path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def pid_lock(path, what: str):
    """Hold an exclusive lock on ``path`` (which records our pid) while the block runs.

    The kernel drops the lock when its process dies, so the lock of a killed run is simply taken over;
    a live holder is refused with its pid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{what} is in use by another live run (process {holder}, lock {path}); "
                            "wait for it to finish, or use another hydra.run.dir") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock; the file stays so that no second inode can be locked
