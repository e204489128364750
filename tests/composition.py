"""Composing the Hydra configs in-process: every entry script with each of its datasets and presets."""
from __future__ import annotations

import itertools
from pathlib import Path

import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# entry config -> the datasets it is meant for (None: the script builds its own target)
SCRIPT_DATASETS = {
    "ao_arm_image": ["mnist_bin", "mnist_offline"], "ao_arm_text": ["text8", "text8_sotu"], "ao_arm_mol": ["moses"],
    "ao_arm_seq": ["array"], "mam_image": ["mnist_bin", "mnist_offline"], "mam_text": ["text8", "text8_sotu"],
    "mam_mol": ["moses"], "mam_seq": ["array"], "ising_eb": [None], "mol_property_eb": [None],
}
PRESETS = ("paper", "cpu", "tiny")
COMBINATIONS = [(script, dataset, preset) for script, datasets in SCRIPT_DATASETS.items()
                for dataset, preset in itertools.product(datasets, PRESETS)]


def overrides(dataset, preset, *extra) -> list[str]:
    return [f"preset={preset}", *([f"dataset={dataset}"] if dataset else []), *extra]


def compose(script: str, dataset=None, preset: str = "paper", *extra: str) -> dict:
    from mamlib.cli import compose_config

    return OmegaConf.to_container(compose_config(script, overrides(dataset, preset, *extra)), resolve=False)


def leaf_keys(node, prefix: str = ""):
    """Dotted keys of every leaf (lists are leaves) of a nested dict."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaf_keys(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def files_setting_each_key(script: str, dataset=None, preset: str = "paper") -> dict[str, list[str]]:
    """Dotted key -> the config files (relative to configs/, in composition order) that set it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        defaults = GlobalHydra.instance().config_loader().compute_defaults_list(
            config_name=script, overrides=overrides(dataset, preset), run_mode=RunMode.RUN).defaults
    found: dict[str, list[str]] = {}
    for default in defaults:
        if default.config_path is None or default.config_path.startswith("hydra/"):
            continue
        content = yaml.safe_load((CONFIGS / f"{default.config_path}.yaml").read_text()) or {}
        content = {key: value for key, value in content.items() if key not in ("defaults", "hydra")}
        prefix = f"{default.package}." if default.package else ""
        for key in leaf_keys(content):
            found.setdefault(prefix + key, []).append(default.config_path)
    return found
