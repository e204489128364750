"""Stage 1: any-order autoregressive conditionals p_phi. Modes: train, eval, generate, score, export."""
from __future__ import annotations

import logging

import torch

from .. import arm
from ..evaluation import bits_per_dim
from ..experiment import Experiment, batched, make_optimizer
from ..nets import build_backbone
from ..runtime import maybe_compile
from .common import (checkpoint_meta, export, fit_on_data, load_data, load_model, load_trained, run_modes, save_samples,
                     score_file, write_moses_metrics)

log = logging.getLogger("mamlib")
KIND = "ao_arm"


class AOARMObjective:
    def __init__(self, net):
        self.net = net

    def loss(self, batch):
        loss, nats_per_dim = arm.aoarm_loss(self.net, batch)
        return loss, {"bpd_bound": float(bits_per_dim(-nats_per_dim.mean().item(), 1))}

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def first_rows(dataset, count) -> torch.Tensor:
    count = len(dataset) if count is None else min(count, len(dataset))
    return torch.stack([dataset[i] for i in range(count)])


def one_step_bpd(net, rows: torch.Tensor, batch_size: int, device) -> float:
    """Validation: unbiased one-pass estimate of the order-averaged NLL in bits/dim."""
    total = 0.0
    for start in range(0, len(rows), batch_size):
        total += arm.one_step_log_prob(net, rows[start:start + batch_size].to(device)).sum().item()
    return float(bits_per_dim(total / len(rows), rows.shape[1]))


def train(exp: Experiment, dataset) -> None:
    cfg = exp.cfg
    net = build_backbone(cfg.arch, dataset.num_classes, dataset.num_positions, dataset.image_shape).to(exp.device)
    net.set_activation_checkpointing(cfg.train.activation_checkpointing)
    log.info("backbone %s: %.2fM parameters", cfg.arch.name, sum(p.numel() for p in net.parameters()) / 1e6)
    objective = AOARMObjective(maybe_compile(net, cfg.compile))  # the trainer saves the uncompiled module
    val_rows = first_rows(dataset.val, cfg.eval.val_examples)

    fit_on_data(exp, dataset, net, objective, make_optimizer(net.parameters(), cfg.train),
                checkpoint_meta(KIND, exp, dataset.describe(), cfg.arch, has_marginal=False),
                evaluate=lambda step: {"bpd_one_step": one_step_bpd(net, val_rows, cfg.eval.batch_size, exp.device)})


@torch.no_grad()
def evaluate(exp: Experiment, dataset) -> dict:
    """Test NLL: chain rule along ``eval.mc_ll`` random orders, combined by log-mean-exp."""
    cfg = exp.cfg
    net = load_trained(exp, dataset, KIND)
    rows = first_rows(dataset.test, cfg.eval.num_examples)
    full = torch.ones_like(rows, dtype=torch.bool)
    log_probs = batched(lambda x, m: arm.ensemble_log_prob(net, x, cfg.eval.mc_ll, m, cfg.eval.steps_per_pass),
                        rows, full, cfg.eval.batch_size, exp.device, desc="test NLL")
    nats = -log_probs.mean().item() / dataset.num_positions
    bpd = float(bits_per_dim(log_probs.mean().item(), dataset.num_positions))
    metrics = {"dataset": dataset.name, "num_examples": len(rows), "orders": cfg.eval.mc_ll,
               "nll_nats_per_dim": nats, "nll_bits_per_dim": bpd, "nll_nats_per_example": -log_probs.mean().item()}
    exp.write_json("metrics.json", metrics)
    exp.logger.log({f"test/{k}": v for k, v in metrics.items() if isinstance(v, float)}, 0)
    log.info("test NLL %.4f bits/dim over %d examples (%d orders)", metrics["nll_bits_per_dim"], len(rows), cfg.eval.mc_ll)
    return metrics


@torch.no_grad()
def generate(exp: Experiment, dataset) -> dict:
    cfg = exp.cfg
    model = load_model(exp, dataset.describe(), KIND, dataset.image_shape)
    samples = torch.from_numpy(model.sample(cfg.generate.num_samples, temperature=cfg.generate.temperature,
                                            batch_size=cfg.generate.batch_size))
    metrics = save_samples(exp, dataset, samples)
    exp.write_json("generate_metrics.json", {"num_samples": len(samples), **metrics})
    if dataset.kind == "molecule":
        write_moses_metrics(exp, exp.run_dir / "samples_smiles.txt")
    return metrics


@torch.no_grad()
def score(exp: Experiment, dataset) -> None:
    score_file(exp, load_model(exp, dataset.describe(), KIND, dataset.image_shape), "conditional")


MODES = {"train": train, "eval": evaluate, "generate": generate, "score": score, "export": lambda exp: export(exp, KIND)}


def run(cfg, run_dir=None):
    return run_modes(cfg, run_dir, MODES, "stage 1", lambda exp: (load_data(exp),))
