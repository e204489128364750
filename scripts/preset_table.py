"""The preset=cpu settings of every entry script as markdown tables, written into README.md and docs/configuration.md.

Each table sits between `<!-- preset-table:SCRIPTS -->` and `<!-- /preset-table -->` (SCRIPTS: comma-separated entry
configs, or `all`); `python scripts/preset_table.py` rewrites them from the composed configs, and tests/test_docs.py
fails when a page disagrees with the configs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "configuration.md"]
SCRIPTS = {"ao_arm_image": "ao_arm/image_main.py", "ao_arm_text": "ao_arm/text_main.py", "ao_arm_mol": "ao_arm/mol_main.py",
           "ao_arm_seq": "ao_arm/seq_main.py", "mam_image": "mam/image_main.py", "mam_text": "mam/text_main.py",
           "mam_mol": "mam/mol_main.py", "mam_seq": "mam/seq_main.py", "ising_eb": "mam/ising_eb_main.py",
           "mol_property_eb": "mam/mol_property_eb_main.py"}
BLOCK = re.compile(r"(<!-- preset-table:([\w,]+) -->\n)(.*?)(<!-- /preset-table -->)", re.S)
SKIPPED_GROUPS = ("train", "eval", "generate", "logger", "hydra", "dataset", "score", "export", "grad_variance")


def composed(config_name: str, preset: str) -> dict:
    from mamlib.cli import compose_config

    return OmegaConf.to_container(compose_config(config_name, [f"preset={preset}"]), resolve=False)


def flat(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def override(key: str, value) -> str:
    """``key=value`` as typed on the command line (true / null, not True / None)."""
    if value is None or isinstance(value, bool):
        value = {None: "null", True: "true", False: "false"}[value]
    return f"`{key}={value}`"


def row(config_name: str) -> str:
    cpu, paper = composed(config_name, "cpu"), composed(config_name, "paper")
    train = cpu["train"]
    changed = {key: value for key, value in flat(cpu) if dict(flat(paper)).get(key) != value}
    network = [override(key, value) for key, value in changed.items() if key.startswith("arch.")]
    method = [override(key, value) for key, value in changed.items() if not key.startswith(SKIPPED_GROUPS + ("arch",))]
    batch = train["batch_size"] if train.get("effective_batch") in (None, train["batch_size"]) else \
        f"{train['batch_size']} × {train['effective_batch'] // train['batch_size']}"
    return (f"| `{SCRIPTS[config_name]}` | {train['max_minutes']} min | {batch} | {train['lr']:g} {train['lr_schedule']} | "
            f"{' '.join(network) or 'paper'} | {' '.join(method) or '—'} |")


def table(names: str) -> str:
    chosen = list(SCRIPTS) if names == "all" else names.split(",")
    header = ["| script | budget | batch | lr, schedule | network (vs paper) | method switches (vs paper) |",
              "|---|---|---|---|---|---|"]
    return "\n".join(header + [row(name) for name in chosen]) + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda match: match.group(1) + table(match.group(2)) + match.group(4), text)


def main() -> None:
    for page in PAGES:
        text = page.read_text()
        if render(text) != text:
            page.write_text(render(text))
            print(f"updated {page.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
