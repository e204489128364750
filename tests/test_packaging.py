"""pyproject.toml declares the runtime packages of requirements.txt, as ranges that hold its exact pins."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = {"pytest"}


def exact_pins() -> dict[str, str]:
    """requirements.txt as {normalized name: pinned version}; every line must be an exact ``==`` pin."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"requirements.txt should pin exactly: {line}"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def declared(requirements: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(text) for text in requirements]
    by_name = {canonicalize_name(requirement.name): requirement for requirement in parsed}
    assert len(by_name) == len(parsed), f"a package is declared twice: {requirements}"
    return by_name


def test_pyproject_declares_the_pinned_runtime_packages_as_ranges_that_hold_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = exact_pins()
    runtime = declared(project["dependencies"])
    test_extra = declared(project["optional-dependencies"]["test"])

    assert set(runtime) == set(pins) - TEST_ONLY
    assert set(test_extra) == TEST_ONLY
    for name, requirement in {**runtime, **test_extra}.items():
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
        assert requirement.marker is None and not requirement.extras and requirement.url is None, requirement
    assert (ROOT / project["readme"]).is_file()
