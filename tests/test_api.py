"""mamlib.load over every checkpoint kind, its checks and errors, and mode=export: a pickle-free folder that loads the same.

Checkpoints are tiny randomly initialised transformers saved with the project's own save_checkpoint (nothing is trained).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mamlib
from mamlib import arm
from mamlib.api import CARD_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, ModelUsageError, export_model
from mamlib.checkpoint import CheckpointError, save_checkpoint
from mamlib.data.base import DiscreteDataset, tensor_dataset
from mamlib.data.text8 import TEXT_ALPHABET
from mamlib.errors import OutputError, UserError
from mamlib.marginal import log_normalizer, normalized_log_marginal
from mamlib.nets import build_backbone
from mamlib.orders import fixed_order

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"name": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "dropout": 0.0,
        "marginal_hidden": 16}
K, D = 3, 6


def describe(name="array", kind="array", K=K, D=D, alphabet=None, padding=None):
    rows = tensor_dataset(torch.zeros(2, D, dtype=torch.long))
    return DiscreteDataset(name=name, kind=kind, num_classes=K, num_positions=D, train=rows, val=rows, test=rows,
                           alphabet=alphabet, padding_symbol=padding).describe()


def make_checkpoint(path, info=None, kind="mam", marginal=True, config=None, step=7):
    info = info or describe()
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create(ARCH), info["K"], info["D"], marginal=marginal)
    save_checkpoint(path, {"kind": kind, "model": net.state_dict(), "dataset": info, "arch": ARCH, "has_marginal": marginal,
                           "config": config if config is not None else {"stage": kind}, "step": step})
    return path


@pytest.fixture
def mam_checkpoint(tmp_path):
    config = {"stage": "mam", "loadpath_pretrain": "/runs/stage1/checkpoints/last.pt", "seed": 0}
    return make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", config=config)


def partial_rows():
    rows = np.random.default_rng(0).integers(0, K, size=(5, D))
    rows[1, D // 2:] = -1
    rows[2, ::2] = -1
    rows[3] = -1
    return rows


def test_load_reports_what_the_model_is(mam_checkpoint):
    model = mamlib.load(mam_checkpoint)
    assert (model.kind, model.dataset, model.num_classes, model.num_positions, model.K, model.D) == ("mam", "array", K, D, K, D)
    assert model.alphabet is None and model.architecture == ARCH and model.step == 7 and model.order is None
    assert model.device == torch.device("cpu") and not model.net.training
    text = repr(model)
    assert "\n" not in text and "stage-2 MaM" in text and "D=6" in text and "K=3" in text and "marginal, chain" in text


def test_export_round_trips_exactly_and_loads_without_pickle(mam_checkpoint, tmp_path, monkeypatch):
    run_dir = mam_checkpoint.parent.parent
    metrics = {"table": [{"model": "MaM", "NLL (bpd)": 1.25, "spearman": 0.9, "pearson": 0.8}], "speedup_vs_AO-ARM-S": 12.5}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- dataset.path=tokens.npy\n- dataset.K=3\n- preset=tiny\n- mode=eval\n")
    folder = export_model(mam_checkpoint, tmp_path / "export")
    assert sorted(os.listdir(folder)) == sorted([WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE])
    assert not list(tmp_path.glob("export.*"))  # no temporary folder left
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert (config["kind"], config["architecture"], config["step"], config["dataset"]["K"]) == ("mam", ARCH, 7, K)
    assert config["training_config"]["loadpath_pretrain"] == "/runs/stage1/checkpoints/last.pt"
    assert json.loads((folder / METRICS_FILE).read_text()) == metrics
    card = (folder / CARD_FILE).read_text()
    assert "cd mam && python seq_main.py dataset.path=tokens.npy dataset.K=3 preset=tiny load_pretrain=True" in card
    assert "mode=eval" not in card and "12.5" in card and "| 1.25 |" in card and "mamlib.load(" in card

    original = mamlib.load(mam_checkpoint)

    def no_pickle(*args, **kwargs):
        raise AssertionError("an exported folder must load without torch.load / pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr("pickle.load", no_pickle)
    monkeypatch.setattr("pickle.loads", no_pickle)
    exported = mamlib.load(folder)
    assert (exported.kind, exported.step, exported.architecture, exported.dataset_info) == \
           (original.kind, original.step, original.architecture, original.dataset_info)
    rows = partial_rows()
    for method in ("marginal", "chain"):
        assert np.array_equal(original.log_prob(rows, method=method, orders=3, seed=1),
                              exported.log_prob(rows, method=method, orders=3, seed=1))
    assert np.array_equal(original.sample(3, seed=2), exported.sample(3, seed=2))


def test_damaged_export_is_refused(mam_checkpoint, tmp_path):
    folder = export_model(mam_checkpoint, tmp_path / "export")
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="damaged"):
        mamlib.load(folder)
    with pytest.raises(CheckpointError, match="neither|without config.json"):
        mamlib.load(tmp_path)


def test_log_prob_matches_the_library_functions(mam_checkpoint):
    model = mamlib.load(mam_checkpoint)
    x = torch.randint(0, K, (5, D))
    full = torch.ones_like(x, dtype=torch.bool)
    torch.manual_seed(3)
    expected = arm.chain_rule_log_prob(model.net, x)
    chain = model.log_prob(x, method="chain", orders=1, seed=3)
    assert chain.dtype == torch.float64 and torch.equal(chain, expected)
    marginal = torch.from_numpy(model.log_prob(x.numpy(), method="marginal"))
    # f(empty) is computed once per loaded model: exactly the cached-normaliser path, and the one-batch path to rounding
    assert torch.equal(marginal, normalized_log_marginal(model.net, x, full, log_normalizer(model.net)))
    assert torch.allclose(marginal, normalized_log_marginal(model.net, x, full).detach(), atol=1e-6)
    # the same question in both input forms; seed=None draws from (and advances) the global generator
    rows = partial_rows()
    mask = rows >= 0
    assert np.array_equal(model.log_prob(rows, seed=0), model.log_prob(np.where(mask, rows, 0), mask, seed=0))
    assert np.array_equal(model.log_prob(rows, method="chain", orders=2, seed=5), model.log_prob(rows, method="chain", orders=2, seed=5))
    assert model.log_prob(rows, method="chain")[3] == 0.0  # nothing observed: log p = 0
    assert model.log_prob(np.zeros((0, D), dtype=int)).shape == (0,)


def test_sample_infill_and_conditionals(mam_checkpoint):
    model = mamlib.load(mam_checkpoint)
    samples = model.sample(4, temperature=0.8, seed=0, batch_size=3)
    assert samples.shape == (4, D) and samples.dtype == np.int64 and samples.min() >= 0 and samples.max() < K
    assert np.array_equal(samples, model.sample(4, temperature=0.8, seed=0, batch_size=3))
    rows = partial_rows()
    filled = model.infill(rows, seed=0, batch_size=2)
    observed = rows >= 0
    assert np.array_equal(filled[observed], rows[observed]) and filled.min() >= 0 and filled.max() < K
    log_probs = model.log_conditionals(rows)
    assert log_probs.shape == (5, D, K) and log_probs.dtype == np.float64
    assert np.allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-6)
    assert np.array_equal(np.exp(log_probs[observed]), np.eye(K)[rows[observed]])  # an observed value is certain


def test_errors_are_one_line_user_errors(mam_checkpoint, tmp_path):
    model = mamlib.load(mam_checkpoint)
    cases = [
        (lambda: model.log_prob(np.zeros((2, 2, D), dtype=int)), r"shape \(2, 2, 6\).*\(B, 6\)"),
        (lambda: model.log_prob(np.zeros((2, D + 1), dtype=int)), r"\(B, 6\)"),
        (lambda: model.log_prob(np.full((1, D), K)), r"value 3; values must be 0\.\.2"),
        (lambda: model.log_prob(np.full((1, D), -2)), r"value -2"),
        (lambda: model.log_prob(np.full((1, D), -1), np.ones((1, D), dtype=bool)), r"observed value -1"),
        (lambda: model.log_prob(np.zeros((1, D), dtype=int), np.ones((1, 2), dtype=bool)), r"observed_mask"),
        (lambda: model.log_prob(np.full((1, D), 0.5)), r"integers"),
        (lambda: model.log_prob(np.zeros((1, D), dtype=int), method="exact"), r"method='exact' is unknown"),
        (lambda: model.sample(0), r"n=0"),
        (lambda: model.sample(2, seed=0, generator=torch.Generator()), r"seed= or generator="),
        (lambda: model.sample(2, return_tensors="tf"), r"return_tensors='tf'"),
        (lambda: model.log_prob(partial_rows(), given=np.ones((5, D), dtype=bool)), r"given marks position.*subset"),
        (lambda: model.log_prob(partial_rows(), given=np.ones((5, 2), dtype=bool)), r"given must be a bool array"),
        (lambda: model.set_precision("fp8"), r"precision='fp8'"),
        (lambda: model.infill(np.zeros((1, D), dtype=int), temperature=0), r"temperature"),
        (lambda: model.encode("abc"), r"no alphabet"),
    ]
    stage1 = mamlib.load(make_checkpoint(tmp_path / "s1.pt", kind="ao_arm", marginal=False))
    cases.append((lambda: stage1.log_prob(np.zeros((1, D), dtype=int)), r"method='marginal'.*stage-1.*method='chain'"))
    for call, message in cases:
        with pytest.raises(ModelUsageError, match=message) as error:
            call()
        assert isinstance(error.value, UserError) and "\n" not in str(error.value)
    assert stage1.log_prob(partial_rows(), method="chain").shape == (5,)


def test_arm_baseline_answers_only_prefixes_of_its_stored_order(tmp_path):
    info = {"name": "ising_2x3", "K": 2, "D": D, "alphabet": None, "target": {"kind": "ising", "height": 2, "width": 3}}
    path = make_checkpoint(tmp_path / "arm.pt", info, kind="energy", marginal=False, config={"stage": "eb", "arm_order": "backward"})
    model = mamlib.load(path)
    assert model.order == "backward" and model.methods == ("chain",) and "ARM baseline" in repr(model)
    x = torch.randint(0, 2, (3, D))
    suffix = torch.zeros(3, D, dtype=torch.bool)
    suffix[:, D - 2:] = True  # the backward order's first two positions
    expected = arm.chain_rule_log_prob(model.net, x, suffix, order=fixed_order(3, D, "backward"))
    assert torch.equal(model.log_prob(x, suffix, method="chain", orders=4), expected)
    filled = model.infill(x, suffix, seed=0)
    assert torch.equal(filled[:, D - 2:], x[:, D - 2:])
    log_probs = model.log_conditionals(x, suffix)
    assert torch.allclose(log_probs[:, D - 3].exp().sum(-1), torch.ones(3, dtype=torch.float64))
    assert log_probs[:, 0].isnan().all()  # only the next position is defined
    prefix = suffix.flip(1)
    for call in (lambda: model.log_prob(x, prefix, method="chain"), lambda: model.infill(x, prefix),
                 lambda: model.log_conditionals(x, prefix), lambda: model.log_prob(x, given=prefix, method="chain")):
        with pytest.raises(ModelUsageError, match="backward order.*prefix"):
            call()
    with pytest.raises(ModelUsageError, match="method='chain'"):
        model.log_prob(x, suffix, method="marginal")
    assert model.sample(2, seed=0).shape == (2, D)
    # sample_with_log_prob: the draw's own log-probability, here along the stored order, so the chain rule gives the same
    samples, log_prob = model.sample_with_log_prob(5, seed=0, batch_size=2)
    assert np.array_equal(samples, model.sample(5, seed=0, batch_size=2)) and log_prob.dtype == np.float64
    assert np.allclose(log_prob, model.log_prob(samples, method="chain"), atol=1e-5)


def test_encode_decode_round_trip_on_text_and_molecules(tmp_path):
    text = mamlib.load(make_checkpoint(tmp_path / "text.pt", describe("text8_sotu", "text", 27, 8, list(TEXT_ALPHABET))))
    rows = text.encode(["hello wo", "hi"])
    assert rows.shape == (2, 8) and (rows[1, 2:] == -1).all()  # a shorter string is a prompt
    assert text.decode(rows) == ["hello wo", "hi______"] and text.decode(rows[0]) == "hello wo"
    assert text.log_prob(rows, method="chain").shape == (2,) and text.decode(text.infill(rows, seed=0))[1].startswith("hi")
    with pytest.raises(ModelUsageError, match="'A'"):
        text.encode("Abc")

    smiles_alphabet = sorted(set("CNO()=1c") | {" "})  # MOSES descriptions do not store the padding symbol
    smiles = mamlib.load(make_checkpoint(tmp_path / "smiles.pt", describe("moses_smiles", "molecule", len(smiles_alphabet), 10,
                                                                          smiles_alphabet, padding=" ")))
    rows = smiles.encode(["CCO", "c1ccc1", "C[?]O"])
    assert (rows[0, 3:] == smiles_alphabet.index(" ")).all() and rows[2, 1] == -1
    assert smiles.decode(rows) == ["CCO", "c1ccc1", "C[?]O"]

    selfies_alphabet = ["[C]", "[O]", "[N]", "[nop]"]  # an energy-based run: the target names the padding
    info = {"name": "molecule_selfies_L5", "K": 4, "D": 5, "alphabet": selfies_alphabet,
            "target": {"target": "molecule_property", "string_type": "SELFIES", "padding_symbol": "[nop]"}}
    selfies = mamlib.load(make_checkpoint(tmp_path / "selfies.pt", info, kind="energy"))
    assert selfies.decode(selfies.encode("[C][O]")) == ["[C][O]"] and selfies.encode("[C]")[0, 1] == 3


def compose(config_name, *overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def test_mode_export_writes_the_folder_and_refuses_to_overwrite(mam_checkpoint, tmp_path):
    from mamlib.cli import validate
    from mamlib.stages import mam_mle

    folder = tmp_path / "shared"

    def export(*extra):
        cfg = compose("mam_seq", "preset=tiny", "logger.mode=disabled", "device=cpu", "dataset.path=unused.npy",
                      "dataset.K=3", "mode=export", f"loadpath={mam_checkpoint}", f"export.dir={folder}", *extra)
        validate(cfg)
        return mam_mle.run(cfg, tmp_path / "export_run")

    assert export() == folder and mamlib.load(folder).kind == "mam"
    with pytest.raises(OutputError, match="not empty; pass overwrite=true"):
        export()
    (folder / "extra.txt").write_text("kept?")
    export("overwrite=true")  # an earlier export is replaced as a whole
    assert not (folder / "extra.txt").exists() and mamlib.load(folder).step == 7
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        export_model(mam_checkpoint, own, overwrite=True)
    assert (own / "notes.txt").read_text() == "mine"


def test_mode_export_from_the_command_line_is_one_error_line(mam_checkpoint, tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "file").write_text("x")
    command = [sys.executable, "seq_main.py", "preset=tiny", "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}",
               "dataset.path=unused.npy", "dataset.K=3", "mode=export", f"loadpath={mam_checkpoint}", f"export.dir={folder}"]
    result = subprocess.run(command, cwd=ROOT / "mam", capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: export.dir=" in result.stderr and "overwrite=true" in result.stderr


def test_the_readme_example_runs(mam_checkpoint, tmp_path):
    script = ROOT / "docs" / "api_example.py"
    result = subprocess.run([sys.executable, str(script), str(mam_checkpoint)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Model: stage-2 MaM" in result.stdout and "one marginal pass" in result.stdout and "infilled" in result.stdout
    folder = export_model(mam_checkpoint, tmp_path / "export")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MAM_MODEL": str(folder)})
    assert result.returncode == 0 and "chain rule" in result.stdout, result.stderr[-3000:]


def test_readme_example_is_the_tested_script():
    """The README's Python example is docs/api_example.py verbatim, so the test above runs what users copy."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code == (ROOT / "docs" / "api_example.py").read_text()


def test_save_pretrained_is_the_export_format_and_loads_by_hub_id_from_the_local_cache(mam_checkpoint, tmp_path):
    """save_pretrained writes exactly what mode=export writes; from_pretrained and mamlib.load read a folder or a Hub id,
    here from a huggingface_hub cache populated by hand (models--owner--name/snapshots/<rev>/ + refs/main), offline."""
    from mamlib.api import Model

    exported = export_model(mam_checkpoint, tmp_path / "export")
    model = mamlib.load(mam_checkpoint)
    assert model.save_pretrained(tmp_path / "saved") is None
    for name in (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE):
        assert (tmp_path / "saved" / name).read_bytes() == (exported / name).read_bytes(), name
    with pytest.raises(OutputError, match="overwrite=true"):
        model.save_pretrained(tmp_path / "saved")
    rows = partial_rows()
    expected = model.log_prob(rows, method="marginal")
    again = Model.from_pretrained(tmp_path / "saved")
    assert np.array_equal(again.log_prob(rows, method="marginal"), expected)
    resaved = tmp_path / "resaved"  # a model loaded from an export saves the same config (the origin is carried over)
    again.save_pretrained(resaved)
    assert (resaved / CONFIG_FILE).read_bytes() == (exported / CONFIG_FILE).read_bytes()

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub_cache" / "models--someone--tiny-mam"
    (repo / "snapshots" / revision).mkdir(parents=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE):
        (repo / "snapshots" / revision / name).write_bytes((exported / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = ("import json, sys, numpy as np, mamlib\n"
            "model = mamlib.load('someone/tiny-mam', device='cpu')\n"
            "rows = np.array(json.loads(sys.argv[1]))\n"
            "print(json.dumps([model.kind, model.step, model.log_prob(rows, method='marginal').tolist()]))\n"
            "try:\n    mamlib.load('someone/absent')\nexcept mamlib.api.CheckpointError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(rows.tolist())], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                              "HF_HUB_CACHE": str(tmp_path / "hub_cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    first, error = result.stdout.strip().splitlines()[-2:]
    kind, step, values = json.loads(first)
    assert (kind, step) == ("mam", 7) and np.array_equal(np.array(values), expected)
    assert error.startswith("someone/absent is not a local file or folder") and "Hugging Face Hub" in error
