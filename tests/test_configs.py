"""Every entry script composes at every preset, each setting is found in at most three files, and CPU presets have budgets."""
import subprocess
import sys

import pytest

from composition import COMBINATIONS, ROOT, SCRIPT_DATASETS, compose, files_setting_each_key

SCRIPTS = [f"ao_arm/{name}_main.py" for name in ("image", "text", "mol", "seq")] + \
          [f"mam/{name}_main.py" for name in ("image", "text", "mol", "seq", "ising_eb", "mol_property_eb")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_script_prints_its_config(script):
    """The command-line path (`--cfg job`) composes too: the check_command_line wrapper and Hydra's own parser."""
    result = subprocess.run([sys.executable, script, "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mode: train" in result.stdout and "arch:" in result.stdout


@pytest.mark.parametrize("script,dataset,preset", COMBINATIONS)
def test_each_setting_is_found_in_at_most_three_files(script, dataset, preset):
    """base -> the script's config (its stage-common file, dataset and arch) -> the preset files: a reader looking
    for where a value comes from opens at most three files."""
    too_many = {key: files for key, files in files_setting_each_key(script, dataset, preset).items() if len(files) > 3}
    assert not too_many, f"{script} dataset={dataset} preset={preset}: {too_many}"


@pytest.mark.parametrize("script,dataset", [(s, d) for s, datasets in SCRIPT_DATASETS.items() for d in datasets])
def test_cpu_and_tiny_presets_are_bounded(script, dataset):
    """preset=cpu trains within a wall-clock budget on every dataset; preset=tiny within a few steps."""
    cpu = compose(script, dataset, "cpu")
    assert cpu["train"]["max_minutes"] and cpu["train"]["max_minutes"] <= 30, (script, dataset)
    tiny = compose(script, dataset, "tiny")
    assert tiny["train"]["max_steps"] and tiny["train"]["max_steps"] <= 5, (script, dataset)


def test_presets_change_sizes():
    paper = compose("ao_arm_image")
    tiny = compose("ao_arm_image", None, "tiny")
    cpu = compose("ao_arm_text", None, "cpu")
    assert paper["arch"]["channels"] == 256 and paper["arch"]["num_res_blocks"] == 4  # the paper's U-Net
    assert tiny["arch"]["channels"] < paper["arch"]["channels"]
    assert cpu["arch"]["d_model"] < 768
    assert compose("ising_eb", None, "tiny")["ising_model"]["dim"] <= 4
    # a swapped backbone takes its own preset sizes, not the default backbone's
    assert compose("ao_arm_seq", None, "cpu", "arch=transformer")["arch"]["d_model"] < 768


def test_unknown_option_is_rejected():
    result = subprocess.run([sys.executable, "ao_arm/image_main.py", "--cfg", "job", "preset=huge"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "huge" in result.stderr


def test_training_switches_stay_few():
    """Stage 2 and energy-based training keep only the switches the paper or a preset uses (variants measured and not
    kept are deleted; docs/experiments.md keeps their rows)."""
    import yaml

    not_switches = {"stage", "mode", "load_pretrain", "loadpath_pretrain", "train", "eval", "generate", "score",
                    "grad_variance", "hydra", "defaults"}
    for name, limit in (("mam_common", 10), ("eb_common", 12)):
        switches = set(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())) - not_switches
        assert len(switches) <= limit, (name, sorted(switches))
