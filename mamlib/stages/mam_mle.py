"""Stage 2: marginal networks by maximum likelihood on top of frozen stage-1 conditionals.

Modes: train, eval (paper-style table), generate (unconditional + conditional), score.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import arm
from ..checkpoint import CheckpointError
from ..evaluation import aggregate_correlations, bits_per_dim, correlation_summary, time_callable, write_report
from ..experiment import Experiment, batched, make_optimizer
from ..marginal import normalized_log_marginal, self_consistency_loss
from ..orders import random_order
from ..plots import save_image_grid, save_scatter
from ..runtime import maybe_compile, synchronize
from .ao_arm import first_rows
from .common import checkpoint_meta, fit_on_data, load_data, load_trained, net_from_checkpoint, run_modes, save_samples, score_file

log = logging.getLogger("mamlib")
KIND = "mam"
STAGE1_KIND = "ao_arm"


def load_stage1(exp: Experiment, dataset):
    """Stage-1 weights into a backbone with a marginal head: every stage-1 key must load; only marginal keys may be missing."""
    cfg = exp.cfg
    if not cfg.load_pretrain or not cfg.loadpath_pretrain:
        raise ValueError("stage 2 trains marginals on top of trained conditionals: pass load_pretrain=True "
                         "loadpath_pretrain=<stage-1 run dir>/checkpoints/last.pt")
    net, payload, missing = net_from_checkpoint(cfg.loadpath_pretrain, (STAGE1_KIND,), dataset.describe(), exp.device,
                                                image_shape=dataset.image_shape, marginal=True, allow_missing_marginal=True,
                                                arch_overrides=marginal_width(cfg))
    expected = {k for k in net.state_dict() if k.startswith(net.marginal_prefixes)}
    if set(missing) != expected:
        raise CheckpointError(f"{cfg.loadpath_pretrain}: expected exactly the marginal-head keys to be missing, "
                              f"got {sorted(set(missing) ^ expected)[:8]} differing")
    if cfg.freeze_conditional:
        for name, parameter in net.named_parameters():
            parameter.requires_grad = name.startswith(net.marginal_prefixes)
    return net, payload


def marginal_width(cfg) -> dict:
    """Stage 2 takes the architecture from the stage-1 checkpoint; only the marginal head's width comes from arch.*."""
    width = cfg.arch.get("marginal_hidden")
    return {} if width is None else {"marginal_hidden": width}


class MarginalObjective:
    """D * mean squared self-consistency residual + (f(empty) - 0)^2 on an even mix of data and model samples."""

    def __init__(self, net, cfg, dataset, device):
        self.net, self.cfg, self.dataset, self.device = net, cfg, dataset, device
        self.samples: torch.Tensor | None = None

    def on_epoch_start(self, epoch: int) -> None:
        if not self.cfg.include_onpolicy:
            return
        count = self.cfg.train.batch_size
        if self.cfg.onpolicy_init == "data":  # the original's image setting: start the chains at real data
            generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            index = torch.randperm(len(self.dataset.train), generator=generator)[:count]
            self.samples = torch.stack([self.dataset.train[int(i)] for i in index]).to(self.device)
        else:  # full ancestral samples from the conditionals
            self.net.eval()
            self.samples = arm.sample_unconditional(self.net, count, device=self.device)
            self.net.train()

    def loss(self, batch):
        x = batch
        if self.cfg.include_onpolicy:
            self.samples = arm.censor_and_resample(self.net, self.samples, self.cfg.gibbs_steps)
            x = torch.cat([batch, self.samples])
        loss, parts = self_consistency_loss(self.net, x, log_z=0.0)
        return loss, parts

    def state_dict(self) -> dict:
        return {"samples": None if self.samples is None else self.samples.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.samples = None if state.get("samples") is None else state["samples"].to(self.device)


@torch.no_grad()
def validation_metrics(net, rows: torch.Tensor, batch_size: int, device) -> dict:
    """Cheap checks: self-consistency on held-out data and the marginal network's NLL."""
    consistency, marginal_nll = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        x = rows[start:start + batch_size].to(device)
        _, parts = self_consistency_loss(net, x)
        consistency += parts["consistency"] * len(x)
        marginal_nll -= normalized_log_marginal(net, x, torch.ones_like(x, dtype=torch.bool)).sum().item()
    return {"consistency": consistency / len(rows), "bpd_marginal": float(bits_per_dim(-marginal_nll / len(rows), rows.shape[1]))}


def train(exp: Experiment, dataset) -> None:
    cfg = exp.cfg
    net, stage1 = load_stage1(exp, dataset)
    trainable = [p for p in net.parameters() if p.requires_grad]
    log.info("stage 2: %.2fM trainable of %.2fM parameters", sum(p.numel() for p in trainable) / 1e6,
             sum(p.numel() for p in net.parameters()) / 1e6)
    objective = MarginalObjective(maybe_compile(net, cfg.compile), cfg, dataset, exp.device)
    val_rows = first_rows(dataset.val, cfg.eval.val_examples)
    meta = {**checkpoint_meta(KIND, exp, dataset.describe(), OmegaConf.create(stage1["arch"]), has_marginal=True),
            "stage1_checkpoint": str(cfg.loadpath_pretrain)}
    fit_on_data(exp, dataset, net, objective, make_optimizer(trainable, cfg.train), meta,
                evaluate=lambda step: validation_metrics(net, val_rows, cfg.eval.batch_size, exp.device))


# -- evaluation ------------------------------------------------------------------------------------

def quality_groups(exp: Experiment, net, dataset):
    """Groups of related assignments whose log-likelihoods are compared across models.

    Images/text: one test example, masked along one random order by each of ``eval.mask_steps`` and regenerated.
    Molecules: groups of real test molecules.
    """
    cfg = exp.cfg.eval
    if dataset.kind == "molecule":
        rows = first_rows(dataset.test, cfg.group_size * cfg.num_groups)
        return [rows[i:i + cfg.group_size] for i in range(0, len(rows), cfg.group_size)]
    groups = []
    for row in first_rows(dataset.test, cfg.quality_examples):
        x = row.to(exp.device).unsqueeze(0)
        order = random_order(1, dataset.num_positions, device=exp.device)
        variants = [arm.censor_and_resample(net, x.repeat(cfg.variants_per_level, 1), int(steps), order.repeat(cfg.variants_per_level, 1))
                    for steps in cfg.mask_steps]
        groups.append(torch.cat(variants).cpu())
    return groups


@torch.no_grad()
def evaluate(exp: Experiment, dataset) -> dict:
    cfg = exp.cfg
    net = load_trained(exp, dataset, KIND)
    D, device, batch_size = dataset.num_positions, exp.device, cfg.eval.batch_size

    # 1. test NLL: conditionals (as the paper reports MaM) and marginal network.
    # AO-ARM-S is the first of the AO-ARM-E orders: one random order, computed once.
    def ensemble_and_single(rows):
        per_order = batched(lambda x, m: arm.per_order_log_probs(net, x, cfg.eval.mc_ll, m, cfg.eval.steps_per_pass).T,
                            rows, torch.ones_like(rows, dtype=torch.bool), batch_size, device, desc="chain rule").T
        return arm.combine_orders(per_order), per_order[0]

    rows = first_rows(dataset.test, cfg.eval.num_examples)
    full = torch.ones_like(rows, dtype=torch.bool)
    ensemble, single = ensemble_and_single(rows)
    # The paper reports MaM's NLL with its conditionals (one random order: the AO-ARM-S value); the marginal network's
    # own f(x) - f(empty) is a separate column, meaningful only as far as the marginals are self-consistent.
    nll = {"AO-ARM-E": -ensemble.mean().item(), "AO-ARM-S": -single.mean().item()}
    nll["MaM"] = nll["AO-ARM-S"]
    nll_marginal = -batched(lambda x, m: normalized_log_marginal(net, x, m), rows, full, batch_size, device).mean().item()

    # 2. marginal quality against AO-ARM-E
    groups = quality_groups(exp, net, dataset)
    reference, single, marginal = [], [], []
    for group in groups:
        group_ensemble, group_single = ensemble_and_single(group)
        reference.append(group_ensemble.numpy())
        single.append(group_single.numpy())
        marginal.append(batched(lambda x, m: normalized_log_marginal(net, x, m), group, torch.ones_like(group, dtype=torch.bool),
                                batch_size, device).numpy())
    threshold = cfg.eval.threshold
    quality = {"AO-ARM-S": aggregate_correlations(list(zip(reference, single)), threshold),
               "MaM": aggregate_correlations(list(zip(reference, marginal)), threshold)}
    pooled = correlation_summary(np.concatenate(reference), np.concatenate(marginal))

    # 3. marginal-inference time per batch (same run, same inputs)
    timing_batch = torch.cat(groups)[:cfg.eval.timing_batch].to(device)
    timing_mask = torch.ones_like(timing_batch, dtype=torch.bool)
    sync = lambda: synchronize(device)
    timings = {
        "MaM": time_callable(lambda: normalized_log_marginal(net, timing_batch, timing_mask), repeats=cfg.eval.timing_repeats, synchronize=sync),
        "AO-ARM-S": time_callable(lambda: arm.chain_rule_log_prob(net, timing_batch, timing_mask), repeats=cfg.eval.timing_repeats, warmup=0, synchronize=sync),
        "AO-ARM-E": time_callable(lambda: arm.ensemble_log_prob(net, timing_batch, cfg.eval.mc_ll, timing_mask), repeats=max(1, cfg.eval.timing_repeats // 2), warmup=0, synchronize=sync),
    }
    unit = "bpc" if dataset.kind == "text" else "bpd"
    table = []
    for model in ("AO-ARM-E", "AO-ARM-S", "MaM"):
        corr = quality.get(model, {"spearman": 1.0, "pearson": 1.0})
        table.append({"model": model, f"NLL ({unit})": float(bits_per_dim(-nll[model], D)),
                      f"NLL marginal net ({unit})": float(bits_per_dim(-nll_marginal, D)) if model == "MaM" else None,
                      "spearman": corr["spearman"], "pearson": corr["pearson"], "time (s)": timings[model]["median"],
                      "time std (s)": timings[model]["std"]})
    results = {"dataset": dataset.name, "num_test_examples": len(rows), "num_groups": len(groups), "orders": cfg.eval.mc_ll,
               "threshold": threshold, "pooled_marginal_vs_ensemble": pooled, "table": table,
               "speedup_vs_AO-ARM-S": timings["AO-ARM-S"]["median"] / timings["MaM"]["median"],
               "speedup_vs_AO-ARM-E": timings["AO-ARM-E"]["median"] / timings["MaM"]["median"], "timing_batch": len(timing_batch)}
    write_report(table, list(table[0].keys()), exp.run_dir, stem="results")
    exp.write_json("metrics.json", results)
    mam_row = table[-1]
    save_scatter(np.concatenate(reference), np.concatenate(marginal), exp.run_dir / "scatter_mam_vs_aoarm_e.png",
                 xlabel="AO-ARM-E log-likelihood (nats)", ylabel="MaM log-likelihood (nats)",
                 title=f"spearman {mam_row['spearman']:.3f}  pearson {mam_row['pearson']:.3f} (per group); pooled {pooled['spearman']:.3f}/{pooled['pearson']:.3f}")
    exp.logger.log({f"test/{row['model']}/{k}": v for row in table for k, v in row.items() if isinstance(v, float)}, 0)
    log.info("results:\n%s", (exp.run_dir / "results.md").read_text())
    return results


# -- generation ------------------------------------------------------------------------------------

def conditional_template(exp: Experiment, dataset) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x, observed_mask, description) for conditional generation, per data kind."""
    cfg = exp.cfg.generate
    D = dataset.num_positions
    if dataset.kind == "molecule":
        string = cfg.molecule
        if dataset.padding_symbol == "[nop]":  # a SELFIES dataset: the template is given as SMILES
            import selfies

            string = selfies.encoder(string)
        x = torch.as_tensor(dataset.encode(string), dtype=torch.long).unsqueeze(0)
        observed = torch.ones_like(x, dtype=torch.bool)
        observed[:, cfg.start:cfg.end] = False
        return x, observed, f"{cfg.molecule} with positions {cfg.start}:{cfg.end} masked"
    x = dataset.test[0].unsqueeze(0)
    observed = torch.ones_like(x, dtype=torch.bool)
    if dataset.kind == "image":
        height, width = dataset.image_shape
        observed[:, : (height // 2) * width] = False
        return x, observed, "top half completed from the bottom half of test image 0"
    start, end = cfg.start, min(cfg.end, D)
    observed[:, start:end] = False
    return x, observed, f"positions {start}:{end} of test example 0 infilled"


@torch.no_grad()
def generate(exp: Experiment, dataset) -> dict:
    cfg = exp.cfg
    net = load_trained(exp, dataset, KIND)
    count, device = cfg.generate.num_samples, exp.device
    unconditional = arm.sample_unconditional(net, count, temperature=cfg.generate.temperature, device=device)
    x, observed, description = conditional_template(exp, dataset)
    conditional = arm.sample(net, x.repeat(count, 1).to(device), observed.repeat(count, 1).to(device), temperature=cfg.generate.temperature)
    report = {}
    for name, samples in (("unconditional", unconditional), ("conditional", conditional)):
        full = torch.ones_like(samples, dtype=torch.bool)
        log_marginal = normalized_log_marginal(net, samples, full)
        log_chain = arm.chain_rule_log_prob(net, samples, full)
        metrics = save_samples(exp, dataset, samples.cpu(), stem=f"samples_{name}")
        np.savetxt(exp.run_dir / f"samples_{name}_loglik.txt", np.stack([log_marginal.cpu().numpy(), log_chain.cpu().numpy()], 1),
                   header="MaM_log_marginal AO-ARM-S_chain_rule (nats)")
        report[name] = {**metrics, "mean_log_marginal": log_marginal.mean().item(), "mean_log_chain_rule": log_chain.mean().item()}
    report["conditional"]["template"] = description
    if dataset.kind == "image":
        save_image_grid(torch.where(observed, x, torch.full_like(x, -1)).view(1, *dataset.image_shape).float(),
                        exp.run_dir / "conditional_template.png")
    exp.write_json("generate_metrics.json", report)
    log.info("generation: %s", report)
    return report


@torch.no_grad()
def score(exp: Experiment, dataset) -> None:
    cfg = exp.cfg
    net = load_trained(exp, dataset, KIND)
    if cfg.score.network == "marginal":
        function = lambda rows, mask: normalized_log_marginal(net, rows, mask)
    elif cfg.score.network == "conditional":
        function = lambda rows, mask: arm.ensemble_log_prob(net, rows, cfg.score.orders, mask, cfg.eval.steps_per_pass)
    else:
        raise ValueError(f"score.network={cfg.score.network!r} is unknown; use marginal or conditional")
    score_file(exp, dataset.num_positions, dataset.num_classes, function, f"{cfg.score.network} network")


MODES = {"train": train, "eval": evaluate, "generate": generate, "score": score}


def run(cfg, run_dir=None):
    return run_modes(cfg, run_dir, MODES, "stage 2", lambda exp: (load_data(exp),))
