"""The documentation stays true: it names only options that exist, quotes preset values generated from the configs,
links only inside the repository, and speaks of the project alone (no process words)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from composition import COMBINATIONS, ROOT, compose, leaf_keys

sys.path.insert(0, str(ROOT / "scripts"))
import preset_table  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
# Process words: how the work was organised, not what the project is. Built from parts so this file does not match.
PROCESS_WORDS = re.compile("|".join([
    r"\bsess" r"ions?\b",
    r"\biss" r"ues?\s*#?\s*\d",
    r"\b(?:fast|faster|slow|slower)\s+(?:mach" r"ines?|kind)\b",
    r"\bthis\s+mach" r"ine\b",
    r"\bspec\s*§",
]), re.I)
PYTEST_SCOPE = re.compile(r"""scope\s*=\s*["']sess""" r"""ion["']""")
OPTION = re.compile(r"^\+?([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(?!=)\S*$")  # not a pin such as molsets==0.3.1
STAGE_PREFIX = re.compile(r"^stage[12]\.")  # scripts/quickstart.py routes stage1./stage2. overrides to one stage


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return [ROOT / name for name in listed.stdout.splitlines()]
    skip = {".git", ".venv", "outputs", "data", "checkpoints", "__pycache__"}
    return [path for path in ROOT.rglob("*") if path.is_file() and not skip & set(path.relative_to(ROOT).parts)]


def test_no_process_words_in_tracked_files():
    found = []
    for path in tracked_files():
        if not path.is_file() or path.suffix in (".png", ".npz", ".npy", ".pt", ".tgz", ".whl"):
            continue
        text = PYTEST_SCOPE.sub("", path.read_text(errors="ignore"))
        for number, line in enumerate(text.splitlines(), 1):
            if PROCESS_WORDS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "process words (name the project, the command and the hardware instead):\n" + "\n".join(found)


def test_process_word_check_catches_them():
    for line in ["as in is" "sue 8", "on the fast mach" "ine", "spec " "§11", "this sess" "ion's run"]:
        assert PROCESS_WORDS.search(line), line
    assert not PROCESS_WORDS.search(PYTEST_SCOPE.sub("", 'pytest.fixture(scope="session")'))


def documented_options(text: str) -> set[str]:
    """Hydra overrides named in inline code and shell blocks: spans with no parentheses or quotes (not Python calls)."""
    spans = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    keys = set()
    for span in spans:
        if re.search(r"[()'\"]", span):
            continue
        for token in span.split():
            match = OPTION.match(STAGE_PREFIX.sub("", token))
            if match:
                keys.add(match.group(1))
    return keys


def test_documented_options_exist():
    known = set()
    for script, dataset, preset in COMBINATIONS:
        config = compose(script, dataset, preset)
        known |= set(leaf_keys(config))
        known |= {key.rsplit(".", 1)[0] for key in list(known) if "." in key}  # a group given whole, e.g. warm_start=
    allowed_prefixes = ("hydra.", "dataset.")  # Hydra's own keys; a dataset group's keys differ by dataset
    removed = removed_options()
    assert removed and not removed & known, f"options listed as removed still exist: {removed & known}"
    missing = {}
    for page in PAGES:
        history = removed if page.name == "experiments.md" else set()  # ablation rows keep the options they measured
        for key in documented_options(page.read_text()):
            if key not in known | history and not key.startswith(allowed_prefixes) and key not in ("dataset", "arch", "preset", "key"):
                missing.setdefault(page.relative_to(ROOT).as_posix(), []).append(key)
    assert not missing, f"options named in docs that no config has: {missing}"


def removed_options() -> set[str]:
    """The options docs/experiments.md lists under "Removed options" (its rows name the commit that last had them)."""
    text = (ROOT / "docs" / "experiments.md").read_text()
    paragraph = text.split("**Removed options.**", 1)[1].split("\n\n", 1)[0]
    return {name for name in re.findall(r"`([a-z_][a-z0-9_.]*)`", paragraph) if "." not in name or name.startswith("arch.")}


def test_option_check_reads_commands_and_inline_code():
    text = "Run `python image_main.py preset=cpu train.lr=1e-3` or\n```bash\npython seq_main.py level_fit_rows=8\n```\n" \
           "but not `mamlib.load(path, device=\"cpu\")`."
    assert documented_options(text) == {"preset", "train.lr", "level_fit_rows"}


@pytest.mark.parametrize("page", preset_table.PAGES, ids=lambda page: page.name)
def test_preset_tables_match_the_configs(page):
    """Preset values quoted in README.md and docs/configuration.md are generated from the composed configs."""
    text = page.read_text()
    assert preset_table.BLOCK.search(text), f"{page.name} has no generated preset table"
    assert preset_table.render(text) == text, f"{page.name} is out of date: run python scripts/preset_table.py"


def test_documentation_stands_alone():
    """Every relative link names a file inside the repository; nothing points outside it."""
    for page in [p for p in PAGES if p.is_file()]:
        text = page.read_text()
        assert "../shared" not in text, page
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            resolved = (page.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: link {target} is broken"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350
