"""preset=paper is the paper's setting: every entry script composes to the values of the table in
docs/reference-numbers.md ("Paper settings by entry script"), so a change to one of them in configs/ fails here."""
import re

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from composition import ROOT, SCRIPT_DATASETS, compose

TABLE_PAGE = ROOT / "docs" / "reference-numbers.md"
HEADING = "## Paper settings by entry script (checked by tests/test_paper_settings.py)"
# the scripts with a paper setting (ao_arm_seq and mam_seq are this project's own)
ENTRY_CONFIGS = ("ao_arm_image", "ao_arm_text", "ao_arm_mol", "mam_image", "mam_text", "mam_mol", "ising_eb",
                 "mol_property_eb")
SOURCE = re.compile(r"^\[(P|C|P, C)\]")


def paper_table() -> list[tuple[str, str, object, str]]:
    """(entry config, dotted key, value, source) for every script a row names; values parsed as Hydra parses
    `key=value` on the command line."""
    section = TABLE_PAGE.read_text().split(HEADING, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[0].replace(" ", "") == "|entryconfig|key|value|source|", lines[0]
    parser = OverridesParser.create()
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"a row has four cells: {line}"
        scripts = re.findall(r"`([a-z_]+)`", cells[0])
        key, value = cells[1].strip("`"), cells[2].strip("`")
        assert scripts and cells[1] == f"`{key}`" and cells[2] == f"`{value}`", f"malformed row: {line}"
        assert SOURCE.match(cells[3]), f"the source is [P] or [C]: {line}"
        parsed = parser.parse_override(f"{key}={value}").value()
        rows += [(script, key, parsed, cells[3]) for script in scripts]
    return rows


ROWS = paper_table()


def differences(script: str, *extra: str) -> list[str]:
    """The table's rows for `script` that its composition at preset=paper (plus `extra` overrides) does not match."""
    config = OmegaConf.create(compose(script, None, "paper", *extra))
    found = []
    for _, key, expected, source in [row for row in ROWS if row[0] == script]:
        actual = OmegaConf.select(config, key, default="<missing>")
        if OmegaConf.is_config(actual):
            actual = OmegaConf.to_container(actual, resolve=True)
        same = actual == expected and isinstance(actual, bool) == isinstance(expected, bool) \
            and isinstance(actual, str) == isinstance(expected, str)
        if not same:
            found.append(f"{script}: {key} composes to {actual!r}, the paper's is {expected!r} {source}")
    return found


def test_the_table_covers_every_entry_script_once_per_key():
    assert set(SCRIPT_DATASETS) - {"ao_arm_seq", "mam_seq"} == set(ENTRY_CONFIGS)
    assert {row[0] for row in ROWS} == set(ENTRY_CONFIGS), "every row names entry configs with a paper setting"
    pairs = [(script, key) for script, key, _, _ in ROWS]
    assert len(pairs) == len(set(pairs)), {pair for pair in pairs if pairs.count(pair) > 1}
    for script in ENTRY_CONFIGS:
        assert sum(row[0] == script for row in ROWS) >= 10, f"{script} has too few pinned settings"


@pytest.mark.parametrize("script", ENTRY_CONFIGS)
def test_preset_paper_composes_to_the_paper_settings(script):
    found = differences(script)
    assert not found, "configs/ no longer give the paper's settings (docs/reference-numbers.md):\n" + "\n".join(found)


def test_a_changed_setting_is_caught():
    """The comparison is exact: a different value, a different type (true vs 1) and a missing key each fail."""
    assert differences("mam_text", "arch.marginal_head=sum") == [
        "mam_text: arch.marginal_head composes to 'sum', the paper's is 'pooled' [C] one MLP on the whole input"]
    assert len(differences("ising_eb", "alpha=4.5", "train.lr=1e-3")) == 2
    assert differences("mam_image", "include_onpolicy=1")
    assert differences("ising_eb", "~ising_model.sigma")
