"""Training loop: exact resume, data-parallel processes end identical, checkpoint errors."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mamlib.checkpoint import CheckpointError, check_same_data, load_checkpoint, load_model_state, save_checkpoint
from mamlib.data.base import tensor_dataset
from mamlib.nets import Transformer
from mamlib.runtime import seed_everything
from mamlib.stages.ao_arm import AOARMObjective
from mamlib.trainer import Trainer, epoch_batches, num_epoch_batches

torch.set_num_threads(1)
DATA = tensor_dataset(torch.randint(0, 3, (96, 6), generator=torch.Generator().manual_seed(0)))


class ListLogger:
    def __init__(self):
        self.records = []

    def log(self, metrics, step):
        self.records.append((step, metrics))


def make_trainer(run_dir, max_steps, seed_for_init=0, ema_decay=None, log_every=1):
    seed_everything(seed_for_init)
    net = Transformer(3, 6, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
    cfg = OmegaConf.create({"n_epochs": 10, "max_steps": max_steps, "batch_size": 8, "effective_batch": 16, "clip": 1.0,
                            "log_every": log_every, "checkpoint_every": 2, "ema_decay": ema_decay})
    logger = ListLogger()
    trainer = Trainer(train_cfg=cfg, model=net, objective=AOARMObjective(net), optimizer=torch.optim.Adam(net.parameters(), 1e-2),
                      batches=lambda epoch, start: epoch_batches(DATA, 8, epoch, 0, start_batch=start),
                      batches_per_epoch=num_epoch_batches(DATA, 8), run_dir=run_dir, device=torch.device("cpu"),
                      logger=logger, checkpoint_meta={"kind": "test"})
    return trainer, logger


def losses(logger):
    return {step: metrics["train/loss"] for step, metrics in logger.records}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # 6 batches of 8 per epoch, 2 per step: 3 steps per epoch, so step 5 crosses an epoch boundary
    straight, straight_log = make_trainer(tmp_path / "straight", max_steps=6)
    straight.fit()
    first, _ = make_trainer(tmp_path / "split", max_steps=4)
    first.fit()
    resumed, resumed_log = make_trainer(tmp_path / "split", max_steps=6, seed_for_init=123)
    assert resumed.resume()
    assert resumed.step == 4
    resumed.fit()
    expected, got = losses(straight_log), losses(resumed_log)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not list((tmp_path / "split" / "checkpoints").glob("*.tmp"))  # atomic writes leave no temp files


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    path = save_checkpoint(tmp_path / "c.pt", {"kind": "ao_arm", "model": {}})
    with pytest.raises(CheckpointError, match="'ao_arm' checkpoint, expected"):
        load_checkpoint(path, expected_kind="mam")
    torch.save({"format_version": 999}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 999"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"K=2.*K=27"):
        check_same_data({"name": "x", "K": 2, "D": 4, "alphabet": None}, {"name": "x", "K": 27, "D": 4, "alphabet": None}, path)
    small = Transformer(3, 6, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
    big = Transformer(3, 6, d_model=32, num_layers=1, num_heads=2, mlp_dim=32)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_state(small, big.state_dict(), path)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model_state(small, {**small.state_dict(), "extra.weight": torch.zeros(1)}, path)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_end_with_identical_parameters(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(worker), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"params_rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == 2 and rank0["steps"] == 3
    assert not torch.equal(rank0["initial"], rank1["initial"])      # different seeds per rank...
    assert torch.equal(rank0["broadcast"], rank1["broadcast"])      # ...made identical by the broadcast
    assert torch.equal(rank0["final"], rank1["final"])              # and kept identical by gradient averaging
    assert not torch.allclose(rank0["final"], rank0["broadcast"])   # training did move them


def test_logged_gradient_norm_is_the_mean_over_the_logged_steps(tmp_path):
    """train/grad_norm (and train/lr_factor) average the optimizer steps since the last log, whatever the number of
    steps per log and of micro-batches per step (here 3 steps of 2 micro-batches each between logs)."""
    trainer, logger = make_trainer(tmp_path, max_steps=6, log_every=3)
    assert trainer.accumulation == 2
    norms, step_of_optimizer = [], trainer.optimizer_step
    trainer.optimizer_step = lambda lr_factor=1.0: norms.append(step_of_optimizer(lr_factor)) or norms[-1]
    trainer.fit()
    logged = {step: metrics["train/grad_norm"] for step, metrics in logger.records if "train/grad_norm" in metrics}
    assert sorted(logged) == [3, 6] and len(set(norms)) > 1
    for step in (3, 6):
        assert logged[step] == pytest.approx(sum(norms[step - 3:step]) / 3, rel=1e-6)
    assert all(metrics["train/lr_factor"] == pytest.approx(1.0) for _, metrics in logger.records if "train/lr_factor" in metrics)


def test_best_checkpoint_follows_the_lowest_evaluation(tmp_path):
    """best.pt holds the step whose evaluation was lowest; a worse later evaluation does not replace it, even after resume."""
    scores = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5}
    trainer, _ = make_trainer(tmp_path, max_steps=3)
    trainer.cfg.eval_every = 1
    trainer.evaluate, trainer.best_metric = (lambda step: {"score": scores[step]}), "score"
    trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 2
    resumed, _ = make_trainer(tmp_path, max_steps=4)
    resumed.cfg.eval_every = 1
    resumed.evaluate, resumed.best_metric = (lambda step: {"score": scores[step]}), "score"
    assert resumed.resume() and resumed.best_value == 1.0
    resumed.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 4


def test_moving_average_of_the_weights_is_saved_evaluated_and_resumed(tmp_path):
    """train.ema_decay: checkpoints' "model" is the average d_t * ema + (1 - d_t) * w_t over the weight trajectory
    (recomputed here from the raw weights after every step), evaluation sees it, and resuming continues both exactly."""
    decay = 0.7
    trainer, _ = make_trainer(tmp_path / "straight", max_steps=6, ema_decay=decay)
    expected = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    seen_by_evaluation = {}

    def record(step):
        seen_by_evaluation[step] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        return {}
    trainer.cfg.eval_every, trainer.evaluate = 1, record
    step_of_optimizer = trainer.optimizer_step

    def step_and_track(lr_factor=1.0):
        norm = step_of_optimizer(lr_factor)
        d = min(decay, (1 + trainer.step) / (10 + trainer.step))
        for name, p in trainer.model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
        return norm
    trainer.optimizer_step = step_and_track
    trainer.fit()
    saved = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    raw = dict(trainer.model.named_parameters())
    for name, value in expected.items():
        assert torch.allclose(saved["model"][name], value, atol=1e-6)
        assert torch.allclose(seen_by_evaluation[6][name], value, atol=1e-6)  # evaluation ran on the average
        assert torch.equal(saved["training_weights"][name], raw[name].detach())  # the model itself kept its own weights
    assert any(not torch.allclose(saved["model"][n], raw[n]) for n in expected)  # the average differs from the weights

    first, _ = make_trainer(tmp_path / "split", max_steps=4, ema_decay=decay)
    first.fit()
    resumed, _ = make_trainer(tmp_path / "split", max_steps=6, seed_for_init=123, ema_decay=decay)
    assert resumed.resume()
    resumed.fit()
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    for name in expected:
        assert torch.allclose(split["model"][name], saved["model"][name], atol=1e-6)
        assert torch.allclose(split["training_weights"][name], saved["training_weights"][name], atol=1e-6)


def test_moving_average_decay_out_of_range_is_refused(tmp_path):
    from mamlib.errors import ConfigError
    with pytest.raises(ConfigError, match="train.ema_decay=1.0 is out of range"):
        make_trainer(tmp_path, max_steps=1, ema_decay=1.0)


def test_precision_auto_follows_the_hardware(monkeypatch):
    from mamlib import runtime

    cpu = torch.device("cpu")
    assert runtime.resolve_precision("fp32", cpu) == "fp32" and runtime.resolve_precision("bf16", cpu) == "bf16"
    for amx, avx512_bf16, expected in [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value, raising=False)
        assert runtime.resolve_precision("auto", cpu) == expected
