"""Every entry script composes its config (--cfg job), and presets resolve to the intended sizes."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [f"ao_arm/{name}_main.py" for name in ("image", "text", "mol", "seq")] + \
          [f"mam/{name}_main.py" for name in ("image", "text", "mol", "seq", "ising_eb", "mol_property_eb")]


def compose(script, *overrides):
    result = subprocess.run([sys.executable, script, "--cfg", "job", *overrides], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_script_composes(script):
    cfg = compose(script)
    assert cfg["mode"] == "train" and cfg["logger"]["mode"] == "offline" and "arch" in cfg


def test_presets_change_sizes():
    paper = compose("ao_arm/image_main.py")
    tiny = compose("ao_arm/image_main.py", "preset=tiny")
    cpu = compose("ao_arm/text_main.py", "preset=cpu")
    assert paper["arch"]["channels"] == 256 and paper["arch"]["num_res_blocks"] == 4  # the paper's U-Net
    assert tiny["arch"]["channels"] < paper["arch"]["channels"] and tiny["train"]["max_steps"] <= 5
    assert cpu["arch"]["d_model"] < 768
    ising = compose("mam/ising_eb_main.py", "preset=tiny")
    assert ising["ising_model"]["dim"] <= 4


def test_unknown_option_is_rejected():
    result = subprocess.run([sys.executable, "ao_arm/image_main.py", "--cfg", "job", "preset=huge"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "huge" in result.stderr


def test_documentation_stands_alone():
    """Every relative link in README.md and docs/ names a file inside the repository; nothing points to ../shared."""
    import re

    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "data" / "README.md"]
    for page in [p for p in pages if p.is_file()]:
        text = page.read_text()
        assert "../shared" not in text, page
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            resolved = (page.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(root) and resolved.exists(), f"{page.name}: link {target} leaves the repository or is broken"
