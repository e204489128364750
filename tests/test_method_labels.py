"""Every result names the method that trained its model (objective, warm start, alpha, preset; stage 2's marginal head
and level fit), and keep_chains follows the original: squared keeps its chains from a uniform start, KL re-draws them."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mamlib import arm
from mamlib.cli import compose_config, validate
from mamlib.energy.ising import IsingModel
from mamlib.nets import build_backbone
from mamlib.stages import energy

ROOT = Path(__file__).resolve().parents[1]


def run(script, run_dir, *overrides):
    command = [sys.executable, Path(script).name, "preset=tiny", "logger.mode=disabled", f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=ROOT / Path(script).parent, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stderr[-4000:]}"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (script, training overrides, expected method fields); evaluate runs without the overrides: the fields come from the
# checkpoint's training config, not from the evaluating command line
ENERGY_RUNS = {
    "KL": ("mam/ising_eb_main.py", ["objective=KL"],
           {"objective": "KL", "warm_start": None, "alpha": 4.0, "preset": "tiny", "method": "paper (MaM-KL)"}),
    "mcmc_mle": ("mam/ising_eb_main.py", ["objective=mcmc_mle", "alpha=0.5"],
                 {"objective": "mcmc_mle", "warm_start": None, "alpha": 0.5, "preset": "tiny",
                  "method": "mcmc_mle (not the paper's)"}),
    "warm start": ("mam/mol_property_eb_main.py", ["warm_start.objective=mcmc_mle", "alpha=0.25"],
                   {"objective": "KL", "warm_start": "mcmc_mle", "alpha": 0.25, "preset": "tiny",
                    "method": "warm start mcmc_mle -> KL (not the paper's)"}),
}


@pytest.mark.parametrize("name", list(ENERGY_RUNS))
def test_energy_results_name_their_method(name, tmp_path):
    script, overrides, expected = ENERGY_RUNS[name]
    run(script, tmp_path, *overrides)
    run(script, tmp_path, "mode=evaluate")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert {key: metrics.get(key) for key in expected} == expected
    assert {key: row.get(key) for key in expected} == expected and expected["method"] in (tmp_path / "results.md").read_text()
    if name == "warm start":  # generate's report too
        run(script, tmp_path, "mode=generate")
        report = json.loads((tmp_path / "generate_metrics.json").read_text())
        assert {key: report.get(key) for key in expected} == expected


def test_table5_labels_a_cpu_grid_with_its_recipe():
    table5 = load_script("table5")
    assert table5.recipe("cpu", ["MAM", "ARM"], []) == \
        "MAM: warm start mcmc_mle -> KL (not the paper's), alpha=0.25; ARM: paper (ARM baseline)"
    assert table5.recipe("paper", ["MAM"], []) == "MAM: paper (MaM-KL), alpha=4"
    assert table5.recipe("cpu", ["MAM"], ["warm_start.objective=null", "alpha=4"]) == "MAM: paper (MaM-KL), alpha=4"
    fields = {"objective": "KL", "warm_start": "mcmc_mle", "alpha": 0.25, "preset": "cpu", "method": "warm start"}
    generation = {"property_mean": 1.0, "property_std": 0.5, "validity": 1.0, "uniqueness": 0.9}
    row = table5.table_row("MAM", 4.0, 0.1, 7, {**fields, "table": {"KL - log Z (paper form)": 2.5}}, generation, 3.0)
    assert {key: row[key] for key in fields} == fields and row["KL - log Z (paper form)"] == 2.5
    assert "| warm start |" in table5.markdown([row])


def test_stage2_results_name_their_method(tmp_path):
    """The seq pipeline at preset=tiny: stage-2 eval (run without the training overrides) names the checkpoint's head,
    level fit and preset, and quickstart's REPORT header states them."""
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 3, size=(200, 8)))
    data = [f"dataset.path={tmp_path / 'tokens.npy'}", "dataset.K=3"]
    run("ao_arm/seq_main.py", tmp_path / "stage1", *data, "arch=mlp")
    run("mam/seq_main.py", tmp_path / "stage2", *data, "load_pretrain=True", "arch.marginal_head=sum", "level_fit_rows=64",
        "level_fit_split=val", f"loadpath_pretrain={tmp_path / 'stage1' / 'checkpoints' / 'last.pt'}")
    run("mam/seq_main.py", tmp_path / "stage2", *data, "mode=eval")
    metrics = json.loads((tmp_path / "stage2" / "metrics.json").read_text())
    expected = {"marginal_head": "sum", "marginal_init": "scratch", "level_fit_rows": 64, "level_fit_split": "val",
                "level_fit_cells": False, "level_fit_size_buckets": 0, "step_surprise_share": 0.0, "include_onpolicy": True,
                "preset": "tiny", "method": "MaM with marginal_head=sum, level_fit_rows=64 (not the paper's)"}
    assert {key: metrics.get(key) for key in expected} == expected
    tables = json.loads((tmp_path / "stage2" / "results.json").read_text())["tables"]
    assert [table["rows"] for title, table in tables.items() if title.startswith("Method")] == [[expected]]
    assert expected["method"] in (tmp_path / "stage2" / "results.md").read_text()
    title, _, method, _ = load_script("quickstart").header(metrics)
    assert "(preset=tiny)" in title and method.startswith(f"Stage-2 method: {expected['method']};")
    assert "marginal_head=sum" in method and "level_fit_split=val" in method and "include_onpolicy=True" in method


# -- keep_chains ----------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, keep, kept", [("squared", None, True), ("KL", None, False), ("mcmc_mle", None, True),
                                                   ("squared", False, False), ("KL", True, True), ("mcmc_mle", False, True)])
def test_keep_chains_null_is_the_originals_choice_for_the_objective(objective, keep, kept):
    cfg = compose_config("ising_eb", [f"objective={objective}", f"keep_chains={'null' if keep is None else keep}"])
    validate(cfg)  # null is a valid value
    assert energy.keeps_chains(cfg) is kept


def chains_over_two_epochs(objective: str, monkeypatch, *overrides):
    """(chains at the first epoch's start, after its steps, at the second epoch's start, ancestral draws made)."""
    draws = []
    sample = arm.sample_unconditional
    monkeypatch.setattr(arm, "sample_unconditional", lambda *args, **kwargs: draws.append(1) or sample(*args, **kwargs))
    cfg = compose_config("ising_eb", ["ising_model.dim=3", "arch.hidden=16", "arch.num_layers=1", "train.batch_size=8",
                                      f"objective={objective}", *overrides])
    net = build_backbone(cfg.arch, 2, 9, marginal=True)
    chains = energy.MaMEnergyObjective(net, IsingModel(3, sigma=0.1, bias=0.2), cfg, torch.device("cpu"))
    torch.manual_seed(0)
    chains.on_epoch_start(0)
    start = chains.samples
    for _ in range(2):
        chains.loss(None)
    after_steps = chains.samples
    chains.on_epoch_start(1)
    return start, after_steps, chains.samples, len(draws)


def test_squared_keeps_chains_from_a_uniform_start_and_kl_redraws_them(monkeypatch):
    start, after_steps, second, draws = chains_over_two_epochs("squared", monkeypatch)
    torch.manual_seed(0)
    assert draws == 0 and torch.equal(start, torch.randint(2, (8, 9)))  # the uniform start, no ancestral draw
    assert second is after_steps and not torch.equal(after_steps, start)  # kept: refreshed by censor-and-resample only
    start, after_steps, second, draws = chains_over_two_epochs("KL", monkeypatch)
    assert draws == 2 and second is not after_steps and not torch.equal(second, after_steps)  # re-drawn every epoch
    start, after_steps, second, draws = chains_over_two_epochs("squared", monkeypatch, "keep_chains=false")
    assert draws == 2 and second is not after_steps  # forced off: re-drawn like KL
