"""Energy-based training: fit p_theta to an unnormalised log f(x) without data (Ising lattices, molecule properties).

model=MAM: marginal + conditional MLPs trained jointly with the KL objective (REINFORCE with a standardised reward)
plus alpha x self-consistency, or with the squared-error objective. model=ARM: a fixed-order ARM baseline with the exact
D-pass likelihood, or the one-step Monte-Carlo variant (logp_mc=true).
Modes: train, evaluate, generate, score, export.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import arm
from ..checkpoint import CheckpointError, check_same_arch, check_same_data, load_checkpoint, load_model_state
from ..evaluation import all_assignments, bits_per_dim, enumerated_kl, time_callable, write_report
from ..errors import ConfigError
from ..experiment import Experiment, batched, make_optimizer, preset_choice
from ..files import save_npy_atomic, write_json_atomic, write_text_atomic
from ..marginal import log_marginal, log_normalizer, normalized_log_marginal, self_consistency_terms
from ..nets import build_backbone
from ..orders import fixed_order, random_order
from ..plots import save_histograms, save_image_grid
from ..runlog import RunLogger
from ..runtime import maybe_compile, seed_everything, synchronize
from ..trainer import Trainer
from .common import (checkpoint_meta, export, load_model, resolve_checkpoint, run_modes, score_file, validity_uniqueness,
                     write_moses_metrics)

log = logging.getLogger("mamlib")
KIND = "energy"


# -- targets ---------------------------------------------------------------------------------------

def build_target(exp: Experiment):
    """(target, info) where target has log_f(x), num_positions, num_classes and describe()."""
    cfg = exp.cfg
    if cfg.target == "ising":
        from ..energy.ising import IsingModel

        ising = cfg.ising_model
        target = IsingModel(ising.dim, ising.get("width") or ising.dim, sigma=ising.sigma, bias=ising.bias)
        return target, {"name": f"ising_{ising.dim}x{ising.get('width') or ising.dim}", "K": 2, "D": target.num_positions,
                        "alphabet": None, "target": target.describe()}
    if cfg.target == "molecule":
        from ..data import load_dataset
        from ..energy.molecules import MoleculePropertyTarget

        dataset = load_dataset(OmegaConf.create({"name": f"moses_{cfg.string_type.lower()}", "load_full": False, "max_len": cfg.L}),
                               exp.data_dir)
        target = MoleculePropertyTarget(dataset.alphabet, cfg.string_type, cfg.metric_name, cfg.target_value, cfg.tau,
                                        cfg.get("invalid_penalty"))
        target.num_positions, target.num_classes, target.dataset = dataset.num_positions, dataset.num_classes, dataset
        return target, {"name": f"molecule_{cfg.string_type.lower()}_L{dataset.num_positions}", "K": dataset.num_classes,
                        "D": dataset.num_positions, "alphabet": dataset.alphabet, "target": target.describe()}
    raise ValueError(f"target={cfg.target!r} is unknown; use ising or molecule")


def target_log_f(target, x) -> torch.Tensor:
    return target.log_f(x).to(x.device).float()


def pseudo_data(target, count: int, device) -> torch.Tensor:
    """The original's inputs for the squared objective: Ising lattices with iid Bernoulli(sigmoid(2 b)) spins, or random
    MOSES train strings for molecules."""
    if hasattr(target, "init_samples"):
        return target.init_samples(count).to(device)
    train = target.dataset.train
    index = torch.randint(len(train), (count,))
    return torch.stack([train[int(i)] for i in index]).to(device)


def standardized(values: torch.Tensor) -> torch.Tensor:
    """The REINFORCE weight of each sample (the original's): the reward minus the batch mean, over the batch std."""
    return (values - values.mean()) / (values.std() + torch.finfo(values.dtype).eps)


# -- objectives ------------------------------------------------------------------------------------

class MaMEnergyObjective:
    """KL(p_theta || f/Z) by REINFORCE on persistent chains + alpha (D x self-consistency + (f(empty) - log Z)^2)."""

    def __init__(self, net, target, cfg, device):
        self.net, self.target, self.cfg, self.device = net, target, cfg, device
        init = net.num_positions * math.log(net.num_classes)  # D ln K (the original used D ln 2 for any K)
        self.log_z = torch.nn.Parameter(torch.tensor(init, device=device), requires_grad=cfg.objective == "squared")
        self.samples: torch.Tensor | None = None
        self.samples_log_f: torch.Tensor | None = None  # mcmc_mle: log f of the chains, kept between steps
        if cfg.objective not in ("KL", "squared", "mcmc_mle"):
            raise ValueError(f"objective={cfg.objective!r} is unknown for model=MAM; use KL, squared or mcmc_mle")

    def on_epoch_start(self, epoch: int) -> None:
        # chains re-drawn by ancestral sampling with p_phi, or kept (keeps_chains), refreshed by censor-and-resample each
        # step; kept squared chains start uniform, as the original's FM objective
        kept = keeps_chains(self.cfg)
        if kept and self.samples is not None:
            return
        if kept and self.cfg.objective == "squared":
            shape = (self.cfg.train.batch_size, self.net.num_positions)
            self.samples = torch.randint(self.net.num_classes, shape, device=self.device)
            return
        self.net.eval()
        self.samples = arm.sample_unconditional(self.net, self.cfg.train.batch_size, device=self.device)
        self.samples_log_f = None
        self.net.train()

    def _penalty(self, x, conditional_grad: bool = True, extra_rows=None):
        """(mean squared self-consistency residual, (f(empty) - log Z)^2, the terms of :func:`self_consistency_terms`)."""
        terms = self_consistency_terms(self.net, x, conditional_grad=conditional_grad, extra_rows=extra_rows)
        consistency = terms["squared_residual"].mean()
        normalizer = (terms["f_empty"] - self.log_z).pow(2)
        return consistency, normalizer, terms

    def loss(self, batch):
        cfg, D = self.cfg, self.net.num_positions
        if cfg.objective == "mcmc_mle":
            return self._mcmc_mle_loss()
        self.samples = arm.censor_and_resample(self.net, self.samples, cfg.gibbs_steps)
        log_f = target_log_f(self.target, self.samples)
        metrics = {"log_f_mean": log_f.mean().item(), "log_f_std": log_f.std().item()}
        if cfg.objective == "KL":
            complete = (self.samples, torch.ones_like(self.samples, dtype=torch.bool))
            consistency, normalizer, terms = self._penalty(self.samples, extra_rows=complete)  # f(x) rides in its pass
            log_p = terms["f_extra"]
            weight = standardized(log_p.detach() - self.log_z.detach() - log_f)
            # logp_mc: the original's one-step estimate, of log p / D
            surrogate = arm.one_step_mean_log_prob(self.net, self.samples) if cfg.logp_mc else log_p
            fit = (weight * surrogate).mean()
            penalty = D * consistency + normalizer
            metrics["kl_estimate"] = (log_p.detach() - self.log_z.detach() - log_f).mean().item()
        else:  # squared error of f_theta on pseudo-data (the original's), log Z learnable
            random_x = pseudo_data(self.target, len(self.samples), self.device)
            f_random = log_marginal(self.net, random_x, torch.ones_like(random_x, dtype=torch.bool)).float()
            fit = 0.5 * (f_random - target_log_f(self.target, random_x)).pow(2).mean()
            consistency_random, _, _ = self._penalty(random_x)
            consistency_samples, normalizer, _ = self._penalty(self.samples)
            consistency = 0.5 * (consistency_random + consistency_samples)
            penalty = D * consistency + normalizer
        metrics.update(consistency=consistency.item(), normalizer=normalizer.item(), fit=fit.item(), log_z=self.log_z.item())
        return fit + cfg.alpha * penalty, metrics

    def _mcmc_mle_loss(self):
        """Not the paper's objective: Metropolis-corrected chains targeting f (the conditionals propose), the
        conditionals fitted to them by maximum likelihood (the AO-ARM loss), and f fitted to the conditionals by
        self-consistency with no gradient into them (stage 2 on the chains)."""
        if self.samples_log_f is None:  # fresh chains or a resumed run
            self.samples_log_f = target_log_f(self.target, self.samples)
        self.samples, accepted, self.samples_log_f = arm.metropolis_censor_and_resample(
            self.net, self.samples, self.cfg.gibbs_steps, lambda x: target_log_f(self.target, x),
            current_log_target=self.samples_log_f)
        fit, _ = arm.aoarm_loss(self.net, self.samples)
        consistency, normalizer, _ = self._penalty(self.samples, conditional_grad=False)
        penalty = self.net.num_positions * consistency + normalizer
        log_f = self.samples_log_f
        metrics = {"log_f_mean": log_f.mean().item(), "log_f_std": log_f.std().item(),
                   "acceptance": accepted.float().mean().item(), "consistency": consistency.item(),
                   "normalizer": normalizer.item(), "fit": fit.item(), "log_z": self.log_z.item()}
        return fit + self.cfg.alpha * penalty, metrics

    def state_dict(self) -> dict:
        return {"samples": None if self.samples is None else self.samples.cpu(), "log_z": self.log_z.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.samples = None if state["samples"] is None else state["samples"].to(self.device)
        self.samples_log_f = None
        with torch.no_grad():
            self.log_z.copy_(state["log_z"])


def keeps_chains(cfg) -> bool:
    """``keep_chains``, null = the original's choice: its squared (FM) objective keeps its chains, its KL objective re-draws
    them every epoch; mcmc_mle always keeps its Metropolis chains (re-drawing them would restart their convergence to f)."""
    keep = cfg.get("keep_chains")
    return cfg.objective == "mcmc_mle" or (cfg.objective == "squared" if keep is None else bool(keep))


PAPER_ALPHA = 4.0  # configs/eb_common.yaml's alpha, the paper's setting (preset=paper)


def method_fields(config) -> dict:
    """What trained a model, written into every result: ``objective``, ``warm_start`` (the first phase's objective or
    None), ``alpha`` (None for the ARM baseline, which has no penalty), ``preset`` and a ``method`` label saying whether
    that is the paper's. ``config``: the training run's (a checkpoint's ``config``) or this run's."""
    preset = preset_choice(config)
    if config.get("model") == "ARM":
        name = "ARM-MC" if config.get("logp_mc") else "ARM"
        return {"objective": "KL", "warm_start": None, "alpha": None, "preset": preset, "method": f"paper ({name} baseline)"}
    objective, alpha = config.get("objective"), float(config.get("alpha"))
    warm_start = (config.get("warm_start") or {}).get("objective")
    warm_start = None if warm_start == objective else warm_start  # its own objective is one phase
    name = {"squared": "squared, the original code's FM objective"}.get(objective, objective)
    name += " with the one-step log p of logp_mc" if objective == "KL" and config.get("logp_mc") else ""
    name = f"warm start {warm_start} -> {name}" if warm_start else name
    if name != "KL":
        method = f"{name} (not the paper's)"
    elif alpha == PAPER_ALPHA:
        method = "paper (MaM-KL)"
    else:
        method = f"MaM-KL at alpha={alpha:g} (the paper's objective; its alpha is {PAPER_ALPHA:g})"
    return {"objective": objective, "warm_start": warm_start, "alpha": alpha, "preset": preset, "method": method}


class ARMEnergyObjective:
    """Fixed-order ARM baseline: REINFORCE on fresh ancestral samples each step (:func:`reinforce_backward`).

    Exact: log p(x) by the D-pass chain rule, backpropagated one pass at a time. logp_mc: one random conditional, x D
    (high variance).
    """

    def __init__(self, net, target, cfg, device):
        if cfg.objective != "KL":
            raise ValueError("model=ARM supports objective=KL only")
        self.net, self.target, self.cfg, self.device = net, target, cfg, device
        self.log_z = None

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def loss_and_backward(self, batch, scale: float = 1.0) -> tuple[float, dict]:
        """The trainer calls this instead of ``loss``: the exact estimator's backward runs pass by pass."""
        cfg = self.cfg
        return reinforce_backward(self.net, self.target, "ARM-MC" if cfg.logp_mc else "ARM", cfg.train.batch_size,
                                  cfg.arm_order, cfg.eval.steps_per_pass, scale)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- modes -----------------------------------------------------------------------------------------

def is_mam(cfg) -> bool:
    if cfg.model not in ("MAM", "ARM"):
        raise ValueError(f"model={cfg.model!r} is unknown; use MAM or ARM")
    return cfg.model == "MAM"


def load_initial_weights(net, path, info: dict, arch_cfg, mam_model: bool) -> None:
    """``init_from=``: another run's weights for the same target, model and architecture (any objective), loaded strictly."""
    if not Path(path).is_file():
        raise ConfigError(f"init_from={path} is not a file: pass an energy-based run's checkpoints/best.pt or last.pt, "
                          "or drop init_from to start from random weights")
    payload = load_checkpoint(path, expected_kind=(KIND,))
    check_same_data(payload["dataset"], info, path)
    if payload["has_marginal"] != mam_model:
        raise CheckpointError(f"init_from={path} is a model={'MAM' if payload['has_marginal'] else 'ARM'} checkpoint, but "
                              f"this run trains model={'MAM' if mam_model else 'ARM'}; pick a checkpoint of the same model")
    check_same_arch(payload["arch"], OmegaConf.to_container(arch_cfg, resolve=True), path, "start from it")
    load_model_state(net, payload["model"], path)
    log.info("weights from %s (init_from; trained %s steps with objective=%s)", path, payload.get("step", "?"),
             payload.get("config", {}).get("objective", "?"))


def train(exp: Experiment, target, info) -> None:
    """``mode=train``. With ``warm_start.objective`` (model=MAM) in two phases, the two-command warm start as one: that
    objective for ``warm_start.fraction`` of the budget in ``run_dir/warm_start``, then ``objective`` from its last
    weights with a fresh optimizer, schedule and seed, as a second run with ``init_from=`` would."""
    cfg = exp.cfg
    first_objective = OmegaConf.select(cfg, "warm_start.objective", default=None)
    if first_objective is None or first_objective == cfg.objective or not is_mam(cfg):
        if first_objective is not None:  # like alpha and gibbs_steps, a MaM-only setting the ARM baseline ignores
            log.info("warm_start.objective=%s is ignored: %s", first_objective, "model=ARM trains with objective=KL only"
                     if not is_mam(cfg) else "it is the objective itself (one phase)")
        return train_phase(exp, target, info)
    first_dir, second_checkpoint = exp.run_dir / "warm_start", exp.run_dir / "checkpoints" / "last.pt"
    finished = first_dir / "finished.json"
    if second_checkpoint.exists() and not cfg.resume and not cfg.get("overwrite", False):  # before the first phase trains
        raise ConfigError(f"{second_checkpoint} already holds a checkpoint; continue it with resume=true, "
                          "or start over with overwrite=true (or choose another hydra.run.dir)")
    first_cfg, second_cfg = phase_configs(cfg, first_objective, str(first_dir / "checkpoints" / "last.pt"))
    if not (cfg.resume and (second_checkpoint.exists() or finished.exists())):
        if exp.dist.is_main:
            finished.unlink(missing_ok=True)
        # its curves go to warm_start/metrics.jsonl; wandb holds the second phase (one wandb run per process)
        logger = RunLogger(first_dir, first_cfg, mode="disabled", enabled=exp.dist.is_main)
        log.info("warm start: objective=%s for %s of the budget in %s", first_objective, cfg.warm_start.fraction, first_dir)
        train_phase(Experiment(first_cfg, first_dir, exp.dist, exp.device, logger), target, info)
        if exp.dist.is_main:
            write_json_atomic(finished, {"objective": first_objective, "checkpoint": str(first_dir / "checkpoints" / "last.pt")})
    seed_everything(cfg.seed, exp.dist.rank)  # a fresh second phase starts as its own run would; a resumed one restores its RNG
    log.info("warm start done: objective=%s from %s", cfg.objective, second_cfg.init_from)
    train_phase(Experiment(second_cfg, exp.run_dir, exp.dist, exp.device, exp.logger), target, info)


def phase_configs(cfg, first_objective: str, first_checkpoint: str):
    """The configs of the two phases: the budget (minutes, steps, epochs) split by ``warm_start.fraction``."""
    fraction = cfg.warm_start.fraction
    first_train, second_train = {}, {}
    if cfg.train.get("max_minutes"):
        first_train["max_minutes"] = cfg.train.max_minutes * fraction
        second_train["max_minutes"] = cfg.train.max_minutes * (1 - fraction)
    for key in ("max_steps", "n_epochs"):
        if cfg.train.get(key):
            first_train[key] = max(1, round(cfg.train[key] * fraction))
            second_train[key] = max(1, cfg.train[key] - first_train[key])
    first = OmegaConf.merge(cfg, {"objective": first_objective, "warm_start": {"objective": None}, "train": first_train})
    second = OmegaConf.merge(cfg, {"init_from": first_checkpoint, "train": second_train})
    return first, second


def train_phase(exp: Experiment, target, info) -> None:
    cfg = exp.cfg
    net = build_backbone(cfg.arch, info["K"], info["D"], marginal=is_mam(cfg)).to(exp.device)
    net.set_activation_checkpointing(cfg.train.activation_checkpointing)
    objective = (MaMEnergyObjective if is_mam(cfg) else ARMEnergyObjective)(maybe_compile(net, cfg.compile), target, cfg, exp.device)
    order_kind = None if is_mam(cfg) else cfg.arm_order
    log_z = target.log_partition() if hasattr(target, "log_partition") else None
    groups = [{"params": list(net.parameters())}]
    extra = []
    if objective.log_z is not None and objective.log_z.requires_grad:
        groups.append({"params": [objective.log_z], "lr": cfg.zlr})
        extra = [objective.log_z]
    meta = checkpoint_meta(KIND, exp, info, cfg.arch, has_marginal=is_mam(cfg))
    meta["config"]["preset"] = preset_choice(cfg)  # a group choice, not a config key: kept for the results of this model
    trainer = Trainer(
        train_cfg=cfg.train, model=net, objective=objective, optimizer=make_optimizer(groups, cfg.train),
        batches=lambda epoch, start: range(start, cfg.steps_per_epoch), batches_per_epoch=cfg.steps_per_epoch,
        run_dir=exp.run_dir, device=exp.device, dist_info=exp.dist, logger=exp.logger,
        checkpoint_meta=meta, extra_parameters=extra,
        evaluate=lambda step: training_evaluation(exp, net, target, order_kind, log_z),
        best_metric=best_metric(net, log_z))
    if cfg.get("init_from") and not (cfg.resume and trainer.checkpoint_path.exists()):  # a resumed run has its own weights
        load_initial_weights(net, cfg.init_from, info, cfg.arch, is_mam(cfg))
    trainer.run(resume=cfg.resume, overwrite=cfg.get("overwrite", False))
    if exp.dist.is_main:  # the final weights are evaluated too (and may become best.pt)
        trainer.run_evaluation()


def load_trained(exp: Experiment, info):
    """The checkpoint as a Model: a MaM (marginal network) or an ARM baseline with the fixed order it was trained with
    (``model.order``, from the checkpoint, not from this run's arm_order)."""
    return load_model(exp, info, KIND)


def draw_samples(exp, model, count, return_log_prob: bool = False):
    if return_log_prob:
        samples, log_prob = model.sample_with_log_prob(count, batch_size=exp.cfg.eval.batch_size)
        return torch.from_numpy(samples), torch.from_numpy(log_prob)
    return torch.from_numpy(model.sample(count, batch_size=exp.cfg.eval.batch_size))


def importance_summary(log_f: torch.Tensor, log_q: torch.Tensor, values=None) -> dict:
    """Self-normalised importance sampling of the target f / Z, with the model's own samples as the proposal.

    Weights w = f(x) / q(x), q the density of the draw (for a MaM, of the (sample, order) pair: valid because the order
    is drawn independently of x). ``log_z``: log of the mean weight (unbiased for Z, so biased low in log). ``ess_fraction``:
    (sum w)^2 / (N sum w^2), between 1/N (one sample carries all the weight: the other figures are then unreliable) and
    1 (q is the target). ``values``: a (N,) quantity per sample (NaN = left out, e.g. an invalid molecule, whose
    target mass is negligible); ``value_mean`` is its reweighted mean, an estimate of its mean under the target that is
    trustworthy only where the ESS is not tiny and q covers the target.
    """
    log_w = (log_f.double() - log_q.double()).cpu()
    count = len(log_w)
    log_z = float(torch.logsumexp(log_w, 0) - math.log(count))
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    summary = {"log_z": log_z, "ess": ess, "ess_fraction": ess / count,
               "max_weight_share": float(torch.exp(log_w.max() - torch.logsumexp(log_w, 0))), "num_samples": count}
    if values is not None:
        values = torch.as_tensor(np.asarray(values, dtype=np.float64))
        kept = torch.isfinite(values)
        weights = torch.softmax(log_w[kept], 0)
        summary["value_mean"] = float((weights * values[kept]).sum()) if kept.any() else float("nan")
    return summary


def ranks_of(order_kind: str | None, batch_size: int, num_positions: int, device):
    """The generation order: None (random per call) for a MaM, the ARM baseline's fixed order otherwise."""
    return None if order_kind is None else fixed_order(batch_size, num_positions, order_kind, device=device)


def chain_log_prob(net, order_kind: str | None, steps_per_pass: int):
    """``function(x, mask)``: the chain rule along the model's order (a MaM: a random order per row per call)."""
    return lambda x, m: arm.chain_rule_log_prob(net, x, m, order=ranks_of(order_kind, len(x), x.shape[1], x.device),
                                                steps_per_pass=steps_per_pass)


def mean_bits_per_dim(log_prob, rows: torch.Tensor, batch_size: int, device) -> float:
    """NLL of ``rows`` under ``log_prob(x, mask)`` (all positions observed), bits per dimension."""
    values = batched(log_prob, rows, torch.ones_like(rows, dtype=torch.bool), batch_size, device)
    return float(bits_per_dim(values.mean().item(), rows.shape[1]))


@torch.no_grad()
def training_evaluation(exp: Experiment, net, target, order_kind: str | None, log_z) -> dict:
    """Every train.eval_every: KL on eval.val_samples fresh model samples, exact by enumeration where the state space
    is small, and the NLL of as many ground-truth samples (Ising). The metric named by best_metric() picks best.pt."""
    cfg, device, D = exp.cfg, exp.device, net.num_positions
    mam_model, count, batch_size = order_kind is None, cfg.eval.val_samples, cfg.eval.batch_size
    samples = torch.cat([arm.sample_unconditional(net, min(batch_size, count - start), order=ranks_of(order_kind, min(batch_size, count - start), D, device),
                                                  device=device).cpu() for start in range(0, count, batch_size)])
    metrics = sampled_kls(net, order_kind, target, mam_model, samples, batch_size, cfg.eval.steps_per_pass, device, log_z)
    metrics.update(enumerated_kls(net, target, mam_model, order_kind, batch_size, cfg.eval.steps_per_pass, device))
    if cfg.target == "ising":
        metrics["NLL ground truth (bpd)"] = mean_bits_per_dim(chain_log_prob(net, order_kind, cfg.eval.steps_per_pass),
                                                              ground_truth(exp, target)[:count], batch_size, device)
    return metrics


def best_metric(net, log_z) -> str:
    """The evaluation figure that decides best.pt: the exact KL where it can be enumerated, else sampled."""
    if net.num_classes ** net.num_positions <= ENUMERATION_LIMIT:
        return "KL enumerated"
    return "KL sampled" if log_z is not None else "KL - log Z (paper form)"


def ground_truth(exp: Experiment, target) -> torch.Tensor:
    ising = exp.cfg.ising_model
    return target.ground_truth_samples(exp.data_dir, num_chains=ising.n_samples, num_steps=ising.gt_steps, seed=ising.gt_seed)


ENUMERATION_LIMIT = 2 ** 16  # K^D up to this: exact KL by enumerating every state (4x4 Ising: 65,536 states)


@torch.no_grad()
def enumerated_kls(net, target, mam_model: bool, order_kind: str | None, batch_size: int, steps_per_pass: int, device) -> dict:
    """Exact KL(p || f/Z) by enumeration (K^D <= ENUMERATION_LIMIT), normalised by logsumexp, for both networks.

    Conditionals: the chain rule along one order, a normalised distribution (the ARM's own order; for a MaM one seeded
    random order, the same for every state). Marginal network: exp(f(x) - f(empty)) normalised over all states, and its
    log total mass before normalising (0 when the network is normalised).
    """
    D, K = net.num_positions, net.num_classes
    if K ** D > ENUMERATION_LIMIT:
        return {}
    states = all_assignments(D, K)
    full = torch.ones_like(states, dtype=torch.bool)
    log_f = target.log_f(states).double()
    if order_kind is None:
        ranks = random_order(1, D, generator=torch.Generator().manual_seed(0)).expand(len(states), D)
    else:
        ranks = ranks_of(order_kind, len(states), D, "cpu")
    chain = lambda x, m, r: arm.chain_rule_log_prob(net, x, m, order=r, steps_per_pass=steps_per_pass)
    log_p = torch.cat([chain(states[i:i + batch_size].to(device), full[i:i + batch_size].to(device), ranks[i:i + batch_size].to(device)).cpu()
                       for i in range(0, len(states), batch_size)])
    result = {"KL enumerated": enumerated_kl(log_p, log_f)["kl"]}
    if mam_model:
        normalizer = log_normalizer(net, device)
        log_q = batched(lambda x, m: normalized_log_marginal(net, x, m, normalizer), states, full, batch_size, device)
        marginal = enumerated_kl(log_q, log_f)
        result.update({"KL enumerated marginal net": marginal["kl"], "log total mass marginal net": marginal["log_mass"]})
    return result


@torch.no_grad()
def sampled_kls(net, order_kind, target, mam_model: bool, samples, batch_size: int, steps_per_pass: int, device, log_z) -> dict:
    """KL(p || f/Z) estimated on model samples, in the paper's unnormalised form (KL - log Z) and, where log Z is known,
    as KL. Conditionals: log p of each sample along one order (the ARM's own; for a MaM one random order per sample, a
    single-order estimate). Marginal network: f(x) - f(empty), unnormalised."""
    mask = torch.ones_like(samples, dtype=torch.bool)
    log_f = target.log_f(samples).double()
    log_p = batched(chain_log_prob(net, order_kind, steps_per_pass), samples, mask, batch_size, device)
    row = {"KL - log Z (paper form)": (log_p - log_f).mean().item()}
    if log_z is not None:
        row["KL sampled"] = row["KL - log Z (paper form)"] + log_z
    if mam_model:
        normalizer = log_normalizer(net, device)
        log_q = batched(lambda x, m: normalized_log_marginal(net, x, m, normalizer), samples, mask, batch_size, device)
        row["KL - log Z marginal net (paper form)"] = (log_q - log_f).mean().item()
        if log_z is not None:
            row["KL sampled marginal net"] = row["KL - log Z marginal net (paper form)"] + log_z
    return row


@torch.no_grad()
def evaluate(exp: Experiment, target, info) -> dict:
    cfg = exp.cfg
    model = load_trained(exp, info)
    net, mam_model = model.net, model.has_marginal
    device, batch_size = exp.device, cfg.eval.batch_size
    log_z = target.log_partition() if hasattr(target, "log_partition") else None
    normalizer = log_normalizer(net, device) if mam_model else None  # frozen: f(empty) once, one pass per query
    marginal = lambda x, m: normalized_log_marginal(net, x, m, normalizer)
    method = method_fields(model.config)
    results: dict = {"target": info["target"], "model": "MAM" if mam_model else "ARM", **method, "log_z_exact": log_z}
    row = {"model": results["model"], **method}

    if cfg.target == "ising":  # NLL of ground-truth samples
        truth = ground_truth(exp, target)
        row["NLL conditional (bpd)"] = mean_bits_per_dim(chain_log_prob(net, model.order, cfg.eval.steps_per_pass), truth,
                                                         batch_size, device)
        if mam_model:
            row["NLL marginal (bpd)"] = mean_bits_per_dim(marginal, truth, batch_size, device)

    samples = draw_samples(exp, model, cfg.eval.num_samples)
    row.update(sampled_kls(net, model.order, target, mam_model, samples, batch_size, cfg.eval.steps_per_pass, device, log_z))
    row.update(enumerated_kls(net, target, mam_model, model.order, batch_size, cfg.eval.steps_per_pass, device))

    timing_x = samples[:cfg.eval.timing_batch].to(device)
    timing_mask = torch.ones_like(timing_x, dtype=torch.bool)
    sync = lambda: synchronize(device)
    # the paper's protocol: the D conditionals one pass after another (no step batching), same memory as one MaM pass
    sequential = lambda: arm.chain_rule_log_prob(net, timing_x, timing_mask, order=model.ranks(len(timing_x)))
    row["time ARM chain rule (s)"] = time_callable(sequential, repeats=cfg.eval.timing_repeats, synchronize=sync)["median"]
    if mam_model:
        row["time MaM (s)"] = time_callable(lambda: marginal(timing_x, timing_mask), repeats=cfg.eval.timing_repeats, synchronize=sync)["median"]
        row["speedup"] = row["time ARM chain rule (s)"] / row["time MaM (s)"]
    write_report([row], list(row.keys()), exp.run_dir, stem="results")
    results["table"] = row
    exp.write_json("metrics.json", results)
    plot_samples(exp, target, samples, "evaluate")
    exp.logger.log({f"test/{k}": v for k, v in row.items() if isinstance(v, float) and k not in method}, 0)
    log.info("results:\n%s", (exp.run_dir / "results.md").read_text())
    return results


def plot_samples(exp: Experiment, target, samples: torch.Tensor, stem: str) -> dict:
    cfg = exp.cfg
    log_f = target.log_f(samples).double().numpy()
    if cfg.target == "ising":
        ising = cfg.ising_model
        truth = target.ground_truth_samples(exp.data_dir, num_chains=ising.n_samples, num_steps=ising.gt_steps, seed=ising.gt_seed)
        save_histograms({"model samples": log_f, "ground truth (Gibbs)": target.log_f(truth).double().numpy()},
                        exp.run_dir / f"{stem}_log_f_hist.png", title="log f(x) of samples", xlabel="log f(x)")
        height = ising.dim
        save_image_grid(samples[:100].view(-1, height, samples.shape[1] // height).float(), exp.run_dir / f"{stem}_lattices.png")
        truth_log_f = target.log_f(truth).double().numpy()
        return {"log_f_mean": float(log_f.mean()), "log_f_std": float(log_f.std()),
                "ground_truth_log_f_mean": float(truth_log_f.mean()), "ground_truth_log_f_std": float(truth_log_f.std()),
                "magnetization": float((2 * samples.double() - 1).mean())}
    properties = target.properties(samples)
    save_histograms({f"model samples ({cfg.metric_name})": properties}, exp.run_dir / f"{stem}_property_hist.png",
                    title=f"{cfg.metric_name}, target {cfg.target_value}, tau {cfg.tau}", xlabel=cfg.metric_name)
    strings = target.strings(samples)
    smiles = target.smiles(samples)
    write_text_atomic(exp.run_dir / f"{stem}_{cfg.string_type.lower()}.txt", "\n".join(strings) + "\n")
    write_text_atomic(exp.run_dir / f"{stem}_smiles.txt", "\n".join(s or "INVALID" for s in smiles) + "\n")
    finite = properties[np.isfinite(properties)]
    summary = {**validity_uniqueness(smiles), "property_mean": float(finite.mean()) if len(finite) else float("nan"),
               "property_std": float(finite.std()) if len(finite) else float("nan"),
               "property_quantiles_10_50_90": np.quantile(finite, [0.1, 0.5, 0.9]).tolist() if len(finite) else []}
    return summary


@torch.no_grad()
def generate(exp: Experiment, target, info) -> dict:
    cfg = exp.cfg
    model = load_trained(exp, info)
    samples, log_q = draw_samples(exp, model, cfg.generate.num_samples, return_log_prob=True)
    save_npy_atomic(exp.run_dir / "samples.npy", samples.numpy())
    report = {**method_fields(model.config), "unconditional": plot_samples(exp, target, samples, "samples"),
              "num_samples": len(samples), "importance": target_importance(cfg, target, samples, log_q)}
    chains = metropolis_chains(exp, model)
    if chains is not None:  # what the conditionals were fitted to, beside what they generate
        report["metropolis_chains"] = {**plot_samples(exp, target, chains, "chains"), "num_chains": len(chains),
                                       **conditional_nll(exp, model, chains, samples)}
    if cfg.target == "molecule" and cfg.generate.molecule:
        report.update(conditional_molecules(exp, target, model))
    exp.write_json("generate_metrics.json", report)
    log.info("generation: %s", report)
    if cfg.target == "molecule":
        write_moses_metrics(exp, exp.run_dir / "samples_smiles.txt")
    return report


def target_importance(cfg, target, samples: torch.Tensor, log_q: torch.Tensor) -> dict:
    """The samples reweighted to the target (:func:`importance_summary`): the target's mean of the molecule property or
    of the Ising magnetisation, and log Z (beside the exact value where it is known)."""
    if cfg.target == "ising":
        values, name = (2 * samples.double() - 1).mean(1).numpy(), "magnetization"
    else:
        values, name = target.properties(samples), cfg.metric_name
    summary = importance_summary(target.log_f(samples), log_q, values)
    summary[f"target_{name}_mean"] = summary.pop("value_mean")
    if hasattr(target, "log_partition"):
        summary["log_z_exact"] = target.log_partition()
    return summary


def metropolis_chains(exp: Experiment, model) -> torch.Tensor | None:
    """The chains an ``objective=mcmc_mle`` run keeps in its checkpoint (Metropolis-corrected, so they follow f / Z);
    None for other runs, whose chains are p_phi's own samples (their checkpoint is not read again)."""
    if model.config.get("objective") != "mcmc_mle":
        return None
    return (load_checkpoint(resolve_checkpoint(exp)).get("objective") or {}).get("samples")


def conditional_nll(exp: Experiment, model, chains: torch.Tensor, samples: torch.Tensor) -> dict:
    """Mean -log p_phi (chain rule, one seeded random order per row) of the chains and of as many model samples: a
    model that has fitted its chains gives them about the NLL of its own samples; far less means its mass is elsewhere."""
    count = min(len(chains), len(samples))
    nll = lambda x: -float(model.log_prob(x[:count].numpy(), method="chain", batch_size=exp.cfg.eval.batch_size,
                                          seed=exp.cfg.seed, steps_per_pass=exp.cfg.eval.steps_per_pass).mean())
    return {"conditional_nll_chains": nll(chains), "conditional_nll_samples": nll(samples), "nll_rows": count}


def conditional_molecules(exp: Experiment, target, model) -> dict:
    """generate.molecule with positions [start, end) re-drawn by a MaM; an ARM baseline cannot (it is skipped)."""
    cfg = exp.cfg
    if model.order is not None:  # its conditionals exist only given a prefix of its order; the template masks a middle span
        reason = f"an ARM baseline ({model.order} order) completes only prefixes of its order"
        log.info("conditional generation skipped: %s", reason)
        return {"conditional_skipped": reason}
    import selfies

    string = selfies.encoder(cfg.generate.molecule) if cfg.string_type.upper() == "SELFIES" else cfg.generate.molecule
    template = torch.as_tensor(target.dataset.encode(string), dtype=torch.long).unsqueeze(0)
    observed = torch.ones_like(template, dtype=torch.bool)
    observed[:, cfg.generate.start:cfg.generate.end] = False
    count = cfg.generate.conditional_samples
    conditional = torch.from_numpy(model.infill(template.repeat(count, 1).numpy(), observed.repeat(count, 1).numpy(), batch_size=count))
    return {"conditional": {"template": string, "masked": [cfg.generate.start, cfg.generate.end],
                            **plot_samples(exp, target, conditional, "conditional")}}


@torch.no_grad()
def score(exp: Experiment, target, info) -> None:
    score_file(exp, load_trained(exp, info), exp.cfg.score.network)


# -- Figure 3: gradient variance -------------------------------------------------------------------

def reinforce_backward(net, target, estimator: str, batch_size: int, order_kind, steps_per_pass: int,
                       scale: float = 1.0) -> tuple[float, dict]:
    """Backpropagates one fresh minibatch's REINFORCE surrogate, scale * mean_b w_b log p(x_b) with the standardised
    reward w = standardise(log p - log f) held fixed: its gradient is the KL gradient estimate. Returns (surrogate
    value, logged figures).

    MaM: samples from the conditionals, log p = f(x) (one marginal pass). ARM: samples in its order; log p is the exact
    chain rule, which the sampling passes already computed (the weights), backpropagated one network pass at a time
    (memory of one pass, not D). ARM-MC: the same samples, log p estimated by D x one random conditional (an
    independent draw for the weight), which the paper shows has a far larger variance.
    """
    D, device = net.num_positions, next(net.parameters()).device
    order = ranks_of(order_kind, batch_size, D, device)
    was_training = net.training
    net.eval()
    samples, sample_log_prob = arm.sample_unconditional(net, batch_size, order=order, device=device, return_log_prob=True)
    net.train(was_training)
    log_f = target_log_f(target, samples)
    if estimator == "ARM":
        estimate = sample_log_prob.float()
        weight = standardized(estimate - log_f)
        arm.backward_chain_rule(net, samples, weight * (scale / batch_size), order=order, steps_per_pass=steps_per_pass)
    else:
        if estimator == "MaM":
            surrogate = log_marginal(net, samples, torch.ones_like(samples, dtype=torch.bool)).float()
            estimate = surrogate.detach()
        else:  # ARM-MC
            with torch.no_grad():
                estimate = arm.one_step_log_prob(net, samples, order=order).float()
            surrogate = arm.one_step_log_prob(net, samples, order=order).float()
        weight = standardized(estimate - log_f)
        ((weight * surrogate).mean() * scale).backward()
    value = (weight * estimate).mean().item()
    return value, {"log_f_mean": log_f.mean().item(), "log_f_std": log_f.std().item(), "kl_estimate": (estimate - log_f).mean().item()}


def gradient_statistics(net, backpropagate, num_batches: int, desc: str) -> dict:
    """Mean squared deviation of the flattened gradient over independent minibatches, and its ratio to the squared
    norm of the mean gradient (a scale-free noise-to-signal figure)."""
    from ..progress import progress

    gradients = []
    for _ in progress(range(num_batches), desc=desc, leave=False):
        net.zero_grad(set_to_none=True)
        backpropagate()
        gradients.append(torch.cat([p.grad.detach().flatten().double() for p in net.parameters() if p.grad is not None]))
    stacked = torch.stack(gradients)
    mean = stacked.mean(0)
    variance = (stacked - mean).pow(2).sum(1).mean().item()
    return {"gradient variance": variance, "squared mean norm": mean.pow(2).sum().item(),
            "variance / squared mean": variance / max(mean.pow(2).sum().item(), 1e-300), "minibatches": num_batches}


def grad_variance(exp: Experiment, target, info) -> dict:
    """Figure 3: the REINFORCE gradient's variance of MaM (loadpath) and of ARM / ARM-MC (grad_variance.arm_loadpath,
    or loadpath when that is an ARM checkpoint), each at its checkpoint's parameters."""
    cfg = exp.cfg
    settings = cfg.grad_variance
    batch_size = settings.batch_size or cfg.train.batch_size
    checkpoints = [("loadpath", load_trained(exp, info))]
    if settings.get("arm_loadpath"):
        from ..api import Model

        if not Path(settings.arm_loadpath).is_file():
            raise ConfigError(f"grad_variance.arm_loadpath={settings.arm_loadpath} is not a file: pass an ARM run's "
                              "checkpoints/last.pt (model=ARM), or drop the option to measure loadpath's model only")
        checkpoints.append(("grad_variance.arm_loadpath", Model.from_checkpoint(settings.arm_loadpath, device=exp.device,
                                                                                kinds=(KIND,), expected_data=info)))
    rows = []
    for source, model in checkpoints:
        net = model.net.train()
        estimators = ("MaM",) if model.has_marginal else ("ARM", "ARM-MC")
        for estimator in estimators:
            torch.manual_seed(cfg.seed)
            make = lambda: reinforce_backward(net, target, estimator, batch_size, model.order, cfg.eval.steps_per_pass)
            rows.append({"estimator": estimator, "checkpoint": source, "method": method_fields(model.config)["method"],
                         "step": model.step, "batch": batch_size,
                         **gradient_statistics(net, make, settings.num_batches, f"{estimator} gradients")})
    columns = ["estimator", "checkpoint", "method", "step", "batch", "minibatches", "gradient variance", "squared mean norm",
               "variance / squared mean"]
    write_report(rows, columns, exp.run_dir, stem="grad_variance")
    from ..plots import save_bars

    save_bars({row["estimator"]: row["variance / squared mean"] for row in rows}, exp.run_dir / "grad_variance.png",
              ylabel="gradient variance / squared mean norm (log scale)", title=f"REINFORCE gradient noise, {info['name']}",
              log_scale=True)
    log.info("gradient variance:\n%s", (exp.run_dir / "grad_variance.md").read_text())
    return {"rows": rows}


MODES = {"train": train, "evaluate": evaluate, "generate": generate, "score": score, "export": lambda exp: export(exp, KIND),
         "grad_variance": grad_variance}


def run(cfg, run_dir=None):
    return run_modes(cfg, run_dir, MODES, "energy-based training", build_target)
