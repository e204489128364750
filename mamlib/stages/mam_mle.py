"""Stage 2: marginal networks by maximum likelihood on top of frozen stage-1 conditionals.

Modes: train, eval (paper-style table), generate (unconditional + conditional), score, export.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import arm
from ..checkpoint import CheckpointError
from ..errors import ConfigError
from ..calibration import (CalibrationSet, consistency_drift, fit_cells, flat_gap_metrics, gap_summary, group_error_summary,
                           shift_level)
from ..evaluation import aggregate_correlations, bits_per_dim, correlation_summary, time_callable, write_report
from ..experiment import Experiment, batched, make_optimizer, preset_choice
from ..files import atomic_write, save_npz_atomic, write_text_atomic
from ..marginal import log_normalizer, normalized_log_marginal, self_consistency_loss
from ..orders import random_order
from ..plots import save_image_grid, save_regenerated_panel, save_scatter
from ..runtime import maybe_compile, synchronize
from .ao_arm import first_rows
from ..api import net_from_checkpoint
from .common import (checkpoint_meta, export, fit_on_data, load_data, load_model, run_modes, save_samples,
                     score_file, write_moses_metrics)

log = logging.getLogger("mamlib")
KIND = "mam"
STAGE1_KIND = "ao_arm"
LEVEL_FIT_CELL_PRIOR = 1.0  # pseudo-draws at the shared level per cell: shrinks rarely drawn cells toward it


def load_stage1(exp: Experiment, dataset):
    """Stage-1 weights into a backbone with a marginal head: every stage-1 key must load; only marginal keys may be missing."""
    cfg = exp.cfg
    if not cfg.load_pretrain or not cfg.loadpath_pretrain:
        raise ValueError("stage 2 trains marginals on top of trained conditionals: pass load_pretrain=True "
                         "loadpath_pretrain=<stage-1 run dir>/checkpoints/last.pt")
    net, payload, missing = net_from_checkpoint(cfg.loadpath_pretrain, (STAGE1_KIND,), dataset.describe(), exp.device,
                                                image_shape=dataset.image_shape, marginal=True, allow_missing_marginal=True,
                                                arch_overrides=marginal_arch(cfg))
    expected = {k for k in net.state_dict() if k.startswith(net.marginal_prefixes)}
    if set(missing) != expected:
        raise CheckpointError(f"{cfg.loadpath_pretrain}: expected exactly the marginal-head keys to be missing, "
                              f"got {sorted(set(missing) ^ expected)[:8]} differing")
    if cfg.get("marginal_init", "scratch") == "conditional" and net.warm_start_marginal():  # a resumed run then loads its own weights over these
        log.info("marginal branch initialised from the trained conditional layers (marginal_init=conditional)")
    if cfg.freeze_conditional:
        for name, parameter in net.named_parameters():
            parameter.requires_grad = name.startswith(net.marginal_prefixes)
    return net, payload


def marginal_arch(cfg) -> dict:
    """Stage 2 takes the architecture from the stage-1 checkpoint; only the marginal head (kind, width) comes from arch.*."""
    return {key: cfg.arch[key] for key in ("marginal_hidden", "marginal_head") if cfg.arch.get(key) is not None}


class MarginalObjective:
    """D * mean squared self-consistency residual + (f(empty) - 0)^2 on an even mix of data and model samples."""

    def __init__(self, net, cfg, dataset, device):
        self.net, self.cfg, self.dataset, self.device = net, cfg, dataset, device
        self.samples: torch.Tensor | None = None

    def on_epoch_start(self, epoch: int) -> None:
        if not self.cfg.include_onpolicy:
            return
        count = self.cfg.train.batch_size
        if self.cfg.onpolicy_init in ("data", "regenerated"):
            generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            index = torch.randperm(len(self.dataset.train), generator=generator)[:count]
            self.samples = torch.stack([self.dataset.train[int(i)] for i in index]).to(self.device)
            if self.cfg.onpolicy_init == "regenerated":  # data rows with the last n ~ U{1..D} steps of a random order re-drawn
                dim = self.samples.shape[1]
                redrawn = torch.randint(1, dim + 1, (count, 1), generator=generator)
                order = random_order(count, dim, generator=generator).to(self.device)  # kept positions come first
                self.net.eval()
                self.samples = arm.sample(self.net, self.samples, order < dim - redrawn.to(self.device), order=order)
                self.net.train()
        else:  # full ancestral samples from the conditionals
            self.net.eval()
            self.samples = arm.sample_unconditional(self.net, count, device=self.device)
            self.net.train()

    def loss(self, batch):
        x = batch
        if self.cfg.include_onpolicy:
            self.samples = arm.censor_and_resample(self.net, self.samples, self.cfg.gibbs_steps)
            x = torch.cat([batch, self.samples])
        return self_consistency_loss(self.net, x, log_z=0.0, surprise_share=self.cfg.get("step_surprise_share", 0.0))

    def state_dict(self) -> dict:
        return {"samples": None if self.samples is None else self.samples.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.samples = None if state.get("samples") is None else state["samples"].to(self.device)


@torch.no_grad()
def validation_metrics(net, rows: torch.Tensor, batch_size: int, device, calibration: CalibrationSet | None = None) -> dict:
    """Cheap checks: self-consistency on held-out data, the marginal network's NLL and its gap to AO-ARM-E."""
    consistency, marginal_nll = 0.0, 0.0
    normalizer = log_normalizer(net, device)
    for start in range(0, len(rows), batch_size):
        x = rows[start:start + batch_size].to(device)
        _, parts = self_consistency_loss(net, x)
        consistency += parts["consistency"] * len(x)
        marginal_nll -= normalized_log_marginal(net, x, torch.ones_like(x, dtype=torch.bool), normalizer).sum().item()
    metrics = {"consistency": consistency / len(rows), "bpd_marginal": float(bits_per_dim(-marginal_nll / len(rows), rows.shape[1]))}
    if calibration is not None:
        metrics.update(flat_gap_metrics(calibration.measure(net)))
    return metrics


def train(exp: Experiment, dataset) -> None:
    cfg = exp.cfg
    net, stage1 = load_stage1(exp, dataset)
    net.set_activation_checkpointing(cfg.train.activation_checkpointing)
    trainable = [p for p in net.parameters() if p.requires_grad]
    log.info("stage 2: %.2fM trainable of %.2fM parameters", sum(p.numel() for p in trainable) / 1e6,
             sum(p.numel() for p in net.parameters()) / 1e6)
    objective = MarginalObjective(maybe_compile(net, cfg.compile), cfg, dataset, exp.device)
    val_rows = first_rows(dataset.val, cfg.eval.val_examples)
    if cfg.level_fit_rows and not len(getattr(dataset, cfg.level_fit_split)):  # before training, not after it
        raise ConfigError(f"level_fit_split={cfg.level_fit_split}: this dataset has no {cfg.level_fit_split} rows; "
                          "use level_fit_split=train (or give the dataset a validation split)")
    if cfg.level_fit_size_buckets > net.num_positions:
        raise ConfigError(f"level_fit_size_buckets={cfg.level_fit_size_buckets} is more than the {net.num_positions} "
                          f"prefix sizes of this dataset: use at most {net.num_positions} (16 was measured on MNIST)")
    calibration = None
    if cfg.eval.gap_val_examples and exp.dist.is_main:  # frozen conditionals: the AO-ARM-E references are computed once
        net.eval()
        calibration = CalibrationSet(net, sample_rows(dataset.val, cfg.eval.gap_val_examples, cfg.seed), cfg.eval.gap_val_fractions,
                                     cfg.eval.mc_ll, cfg.eval.batch_size, exp.device, cfg.eval.steps_per_pass, seed=cfg.seed)
        net.train()
    meta = {**checkpoint_meta(KIND, exp, dataset.describe(), OmegaConf.create(stage1["arch"]), has_marginal=True),
            "stage1_checkpoint": str(cfg.loadpath_pretrain)}
    fit_on_data(exp, dataset, net, objective, make_optimizer(trainable, cfg.train), meta,
                evaluate=lambda step: validation_metrics(net, val_rows, cfg.eval.batch_size, exp.device, calibration),
                after_training=(lambda trainer: fit_level_after_training(exp, dataset, net, trainer))
                if cfg.level_fit_rows else None)


def fit_level_after_training(exp: Experiment, dataset, net, trainer) -> None:
    """``level_fit_rows=N``: measure the finished network's drift on N draws of ``level_fit_split`` rows (the whole
    split, again with fresh steps, when N is larger) and remove it (see :func:`mamlib.calibration.fit_level`); with
    ``level_fit_cells`` the same draws set one correction per (position, value) instead of one shared level
    (:func:`mamlib.calibration.fit_cells`). Then save last.pt again with all of it recorded."""
    cfg = exp.cfg
    rows = sample_rows(getattr(dataset, cfg.level_fit_split), cfg.level_fit_rows, cfg.seed + 4)
    bias = net.marginal_score_bias()
    name = next(name for name, parameter in net.named_parameters() if parameter is bias)
    net.eval()
    with torch.no_grad(), trainer.averaged_weights():  # the weights the checkpoint serves
        drift = consistency_drift(net, rows, max(cfg.eval.batch_size, 64), exp.device,
                                  generator=torch.Generator(device=exp.device).manual_seed(int(cfg.seed) + 4),
                                  draws=cfg.level_fit_rows, description="level fit", by_cell=cfg.level_fit_cells)
    removed = drift["drift_nats"]  # the level the fit takes out
    also_shift = [trainer.ema[name]] if trainer.ema is not None else ()
    cells = None
    if cfg.level_fit_cells:  # the cells take the drift out (level included), image by image
        cells = fit_cells(net, drift, LEVEL_FIT_CELL_PRIOR, cfg.level_fit_size_buckets)
        drift = {key: value for key, value in drift.items() if not torch.is_tensor(value)}  # the draws stay out of the meta
        log.info("level fit: one correction per (position, value) on %d of %d cells, standard deviation %.3f nats",
                 cells["cells_drawn"], cells["cells"], cells["cell_correction_sd_nats"])
        if cfg.level_fit_size_buckets:
            log.info("level fit: correction by |S| (%d buckets) at 25/50/75/100 %% observed: %s nats", cfg.level_fit_size_buckets,
                     " / ".join(f"{value:+.2f}" for value in cells["size_correction_nats"].values()))
    else:
        shift_level(net, removed, also_shift)
    net.train()
    log.info("level fit: the marginal network was %+.2f ± %.2f nats off the order-averaged chain rule on %d draws of %d "
             "%s rows", drift["drift_nats"], drift["drift_se_nats"], drift["n"], len(rows), cfg.level_fit_split)
    metrics = {"level_fit/drift_nats": drift["drift_nats"], "level_fit/drift_se_nats": drift["drift_se_nats"]}
    log.info("level fit: f(x) - f(empty) lowered by %+.2f nats on complete rows%s", removed,
             " (on average: each row by its own cells)" if cells else "")
    exp.logger.log(metrics, trainer.step)
    trainer.meta["level_fit"] = {**drift, **({"cells": cells} if cells else {}), "removed_nats": removed,
                                 "split": cfg.level_fit_split}
    trainer.save()


# -- evaluation ------------------------------------------------------------------------------------

def sample_rows(split, count, seed: int) -> torch.Tensor:
    """A seeded random subset of a split (all of it, shuffled, when count is None)."""
    count = len(split) if count is None else min(count, len(split))
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(int(seed) + 12345))[:count]
    return torch.stack([split[int(i)] for i in index])


def ensemble_and_single_order(net, rows, mask, orders: int, batch_size: int, device, steps_per_pass: int = 1):
    """AO-ARM-E (``orders`` random orders, log-mean-exp), AO-ARM-S along one more, independent random order, and the
    mean of E's per-order values (an estimate of E_sigma log p_sigma, the level of the self-consistency loss's fixed point).

    S must not reuse one of E's orders: a shared order is one of E's terms and inflates their agreement.
    """
    mask = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask
    per_order = batched(lambda x, m: arm.per_order_log_probs(net, x, orders + 1, m, steps_per_pass).T,
                        rows, mask, batch_size, device, desc="chain rule").T
    return arm.combine_orders(per_order[:-1]), per_order[-1], per_order[:-1].mean(0)


def regenerated_groups(exp: Experiment, net, rows: torch.Tensor) -> list[dict]:
    """Figure-4 groups: each example masked along one random order by each of ``eval.mask_steps`` and regenerated.

    The censored sets are nested (the last ``steps`` positions of one order). Returns per example
    {"variants": (L*V, D), "observed": (L*V, D) masks kept before regeneration, "steps": (L*V,)}.
    """
    cfg = exp.cfg.eval
    dim, repeats = rows.shape[1], cfg.variants_per_level
    generator = torch.Generator().manual_seed(int(exp.cfg.seed) + 777)
    orders = random_order(len(rows), dim, generator=generator).to(exp.device).repeat_interleave(repeats, 0)
    x = rows.to(exp.device).repeat_interleave(repeats, 0)
    levels = [min(int(count), dim) for count in cfg.mask_steps]
    # every example at once per level: one sampling pass per step for the whole set, not one per example
    variants = [arm.censor_and_resample(net, x, count, orders).cpu().view(len(rows), repeats, dim) for count in levels]
    observed = [(orders < dim - count).cpu().view(len(rows), repeats, dim) for count in levels]
    steps = torch.tensor(levels).repeat_interleave(repeats)
    return [{"variants": torch.cat([level[i] for level in variants]), "observed": torch.cat([level[i] for level in observed]),
             "steps": steps} for i in range(len(rows))]


def real_groups(exp: Experiment, dataset) -> list[torch.Tensor]:
    """Groups of real test examples (molecules; text chunks)."""
    cfg = exp.cfg.eval
    rows = sample_rows(dataset.test, cfg.group_size * cfg.num_groups, exp.cfg.seed + 1)
    return [rows[i:i + cfg.group_size] for i in range(0, len(rows), cfg.group_size)]


def score_groups(exp: Experiment, net, groups: list[torch.Tensor], ensemble_and_single, marginal_of) -> dict:
    """AO-ARM-E reference, AO-ARM-S and MaM on every group: correlations, calibration, per-group error."""
    reference, single, marginal = [], [], []
    for group in groups:
        group_ensemble, group_single, _ = ensemble_and_single(group)
        reference.append(group_ensemble.numpy())
        single.append(group_single.numpy())
        marginal.append(marginal_of(group).numpy())
    threshold = exp.cfg.eval.threshold
    mam_pairs = list(zip(reference, marginal))
    return {"reference": reference, "single": single, "marginal": marginal,
            "correlations": {"AO-ARM-S": aggregate_correlations(list(zip(reference, single)), threshold),
                             "MaM": aggregate_correlations(mam_pairs, threshold)},
            "pooled": correlation_summary(np.concatenate(reference), np.concatenate(marginal)),
            "calibration": gap_summary(np.concatenate(marginal), np.concatenate(reference)),
            "group_error": group_error_summary(mam_pairs)}


def save_figure4(exp: Experiment, dataset, groups: list[dict], scored: dict, count: int) -> None:
    """Per example: the original, its censored inputs and regenerated variants, annotated with MaM's and AO-ARM-E's
    log-likelihoods (PNG for images, text otherwise), plus figure4/groups.npz with every array."""
    folder = exp.run_dir / "figure4"
    folder.mkdir(exist_ok=True)
    save_npz_atomic(folder / "groups.npz", variants=np.stack([g["variants"].numpy() for g in groups]),
             observed=np.stack([g["observed"].numpy() for g in groups]), steps=np.stack([g["steps"].numpy() for g in groups]),
             ao_arm_e=np.stack(scored["reference"]), ao_arm_s=np.stack(scored["single"]), mam=np.stack(scored["marginal"]))
    for index, group in enumerate(groups[:count]):
        values = list(zip(group["steps"].tolist(), scored["marginal"][index], scored["reference"][index]))
        if dataset.kind == "image":
            save_regenerated_panel(group["variants"].numpy(), group["observed"].numpy(), values, dataset.image_shape,
                                   folder / f"example_{index}.png")
        else:
            lines = [f"masked {steps}: MaM {mam:.2f}  AO-ARM-E {ref:.2f}  |  {dataset.decode(row)}"
                     for (steps, mam, ref), row in zip(values, group["variants"].numpy())]
            write_text_atomic(folder / f"example_{index}.txt", "\n".join(lines) + "\n")


PAPER_SETTINGS = {"marginal_head": "pooled", "marginal_init": "scratch", "level_fit_rows": 0, "step_surprise_share": 0.0,
                  "include_onpolicy": True}  # mam_common.yaml's defaults (preset=paper)
LEVEL_FIT_KEYS = ("level_fit_split", "level_fit_cells", "level_fit_size_buckets")


def method_fields(config) -> dict:
    """The settings that make a stage-2 model's method, from its training config, with ``preset`` and a ``method`` label
    naming where they leave the paper's."""
    config = OmegaConf.create(config)
    fields = {key: OmegaConf.select(config, "arch.marginal_head" if key == "marginal_head" else key)
              for key in [*PAPER_SETTINGS, *LEVEL_FIT_KEYS]}
    changed = [f"{key}={fields[key]}" for key, value in PAPER_SETTINGS.items() if fields[key] != value]
    method = f"MaM with {', '.join(changed)} (not the paper's)" if changed else "paper (MaM)"
    return {**fields, "preset": preset_choice(config), "method": method}


@torch.no_grad()
def evaluate(exp: Experiment, dataset) -> dict:
    cfg = exp.cfg
    model = load_model(exp, dataset.describe(), KIND, getattr(dataset, "image_shape", None))
    net, method = model.net, method_fields(model.config)
    D, device, batch_size = dataset.num_positions, exp.device, cfg.eval.batch_size

    def ensemble_and_single(rows, mask=None):
        return ensemble_and_single_order(net, rows, mask, cfg.eval.mc_ll, batch_size, device, cfg.eval.steps_per_pass)

    normalizer = log_normalizer(net, device)  # frozen weights: f(empty) once, then one pass per query

    def marginal_of(rows, mask=None):
        mask = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask
        return batched(lambda x, m: normalized_log_marginal(net, x, m, normalizer), rows, mask, batch_size, device)

    # 1. test NLL: conditionals (as the paper reports MaM) and the marginal network
    rows = sample_rows(dataset.test, cfg.eval.num_examples, cfg.seed)
    ensemble, single, order_mean = ensemble_and_single(rows)
    marginal_full = marginal_of(rows)
    # The paper reports MaM's NLL with its conditionals (one random order: the AO-ARM-S value); the marginal network's
    # own f(x) - f(empty) is a separate column, a true NLL only as far as the marginals are normalised.
    nll = {"AO-ARM-E": -ensemble.mean().item(), "AO-ARM-S": -single.mean().item()}
    nll["MaM"] = nll["AO-ARM-S"]
    nll_marginal = -marginal_full.mean().item()

    # 2. calibration: full test examples, random subsets, and (below) the quality groups
    calibration = {"full test": gap_summary(marginal_full.numpy(), ensemble.numpy()),
                   "full test vs order mean": gap_summary(marginal_full.numpy(), order_mean.numpy())}
    drift = None
    if cfg.eval.drift_rows:  # the level without references: many cheap rows instead of a few chain rules
        drift = consistency_drift(net, sample_rows(dataset.test, cfg.eval.drift_rows, cfg.seed + 3), max(batch_size, 64), device,
                                  generator=torch.Generator(device=device).manual_seed(int(cfg.seed) + 3))
    if cfg.eval.gap_examples:
        subsets = CalibrationSet(net, rows[:cfg.eval.gap_examples], cfg.eval.gap_fractions, cfg.eval.mc_ll, batch_size, device,
                                 cfg.eval.steps_per_pass, seed=cfg.seed + 1)
        for label, summary in subsets.measure(net).items():
            calibration[label.replace("_", " ") + " %"] = summary

    # 3. marginal quality against AO-ARM-E on groups
    group_sets = {}
    if dataset.kind != "molecule":
        regenerated = regenerated_groups(exp, net, sample_rows(dataset.test, cfg.eval.quality_examples, cfg.seed + 2))
        group_sets["regenerated"] = score_groups(exp, net, [g["variants"] for g in regenerated], ensemble_and_single, marginal_of)
        save_figure4(exp, dataset, regenerated, group_sets["regenerated"], cfg.eval.figure_examples)
    if dataset.kind in ("molecule", "text"):
        group_sets["real"] = score_groups(exp, net, real_groups(exp, dataset), ensemble_and_single, marginal_of)
    main_groups = group_sets.get("regenerated") or group_sets["real"]
    for name, scored in group_sets.items():
        calibration[f"{name} groups"] = scored["calibration"]

    # 4. marginal-inference time per batch (same run, same inputs)
    timing_batch = rows[:cfg.eval.timing_batch].to(device)
    timing_mask = torch.ones_like(timing_batch, dtype=torch.bool)
    sync = lambda: synchronize(device)
    timings = {
        "MaM": time_callable(lambda: normalized_log_marginal(net, timing_batch, timing_mask, normalizer), repeats=cfg.eval.timing_repeats, synchronize=sync),
        "AO-ARM-S": time_callable(lambda: arm.chain_rule_log_prob(net, timing_batch, timing_mask), repeats=cfg.eval.timing_repeats, warmup=0, synchronize=sync),
        "AO-ARM-E": time_callable(lambda: arm.ensemble_log_prob(net, timing_batch, cfg.eval.mc_ll, timing_mask), repeats=max(1, cfg.eval.timing_repeats // 2), warmup=0, synchronize=sync),
    }
    unit = "bpc" if dataset.kind == "text" else "bpd"
    table = []
    for model in ("AO-ARM-E", "AO-ARM-S", "MaM"):
        corr = main_groups["correlations"].get(model, {"spearman": 1.0, "pearson": 1.0})
        row = {"model": model, f"NLL ({unit})": float(bits_per_dim(-nll[model], D)),
               f"NLL marginal net ({unit})": float(bits_per_dim(-nll_marginal, D)) if model == "MaM" else None,
               "spearman": corr["spearman"], "pearson": corr["pearson"], "time (s)": timings[model]["median"],
               "time std (s)": timings[model]["std"]}
        if "real" in group_sets and "regenerated" in group_sets:  # text: also real test chunks
            real = group_sets["real"]["correlations"].get(model, {"spearman": 1.0, "pearson": 1.0})
            row.update({"spearman (real chunks)": real["spearman"], "pearson (real chunks)": real["pearson"]})
        table.append(row)
    calibration_rows = [{"set": name, "gap (nats)": s["gap_nats"], "gap std error": s["gap_se_nats"],
                         "|gap| (nats)": s["abs_gap_nats"], "n": s["n"]} for name, s in calibration.items()]
    if drift is not None:  # signed level only: the drift estimate has no per-row values to take an |gap| of
        calibration_rows.append({"set": "test rows vs order mean, reference-free (drift)", "gap (nats)": drift["drift_nats"],
                                 "gap std error": drift["drift_se_nats"], "|gap| (nats)": None, "n": drift["n"]})
    mam_quality = main_groups["correlations"]["MaM"]
    results = {"dataset": dataset.name, **method, "num_test_examples": len(rows), "num_groups": len(main_groups["reference"]),
               "orders": cfg.eval.mc_ll, "threshold": cfg.eval.threshold, "table": table,
               "marginal_gap_nats": calibration["full test"]["gap_nats"],
               "marginal_abs_gap_nats": calibration["full test"]["abs_gap_nats"], "calibration": calibration,
               "jensen_gap_nats": float((ensemble - order_mean).mean()), "drift": drift,
               "pooled_marginal_vs_ensemble": main_groups["pooled"], "group_error": main_groups["group_error"],
               "num_groups_undefined_correlation": mam_quality["num_undefined"],
               "groups": {name: {"correlations": g["correlations"], "pooled": g["pooled"], "calibration": g["calibration"],
                                 "group_error": g["group_error"]} for name, g in group_sets.items()},
               "speedup_vs_AO-ARM-S": timings["AO-ARM-S"]["median"] / timings["MaM"]["median"],
               "speedup_vs_AO-ARM-E": timings["AO-ARM-E"]["median"] / timings["MaM"]["median"], "timing_batch": len(timing_batch)}
    columns = list(table[0].keys())
    write_report(table, columns, exp.run_dir, stem="results", extra_tables={
        "Method (from the checkpoint's training config)": ([method], list(method)),
        "Calibration: marginal network f(x_S) - f(empty) minus AO-ARM-E log p(x_S)": (calibration_rows, ["set", "gap (nats)", "gap std error", "|gap| (nats)", "n"])})
    exp.write_json("metrics.json", results)
    pooled = main_groups["pooled"]
    save_scatter(np.concatenate(main_groups["reference"]), np.concatenate(main_groups["marginal"]), exp.run_dir / "scatter_mam_vs_aoarm_e.png",
                 xlabel="AO-ARM-E log-likelihood (nats)", ylabel="MaM log-likelihood (nats)",
                 title=f"spearman {mam_quality['spearman']:.3f}  pearson {mam_quality['pearson']:.3f} (per group); pooled {pooled['spearman']:.3f}/{pooled['pearson']:.3f}")
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
    model = load_model(exp, dataset.describe(), KIND, dataset.image_shape)
    count, temperature = cfg.generate.num_samples, cfg.generate.temperature
    batch = min(count, cfg.generate.batch_size)   # molecules: 30,000 samples by default, far more than one batch
    unconditional = model.sample(count, temperature=temperature, batch_size=batch)
    x, observed, description = conditional_template(exp, dataset)
    conditional = model.infill(x.repeat(count, 1).numpy(), observed.repeat(count, 1).numpy(), temperature=temperature, batch_size=batch)
    report = {}
    for name, samples in (("unconditional", unconditional), ("conditional", conditional)):
        log_marginal = model.log_prob(samples, method="marginal", batch_size=batch)
        log_chain = model.log_prob(samples, method="chain", orders=1, batch_size=batch,  # AO-ARM-S: one random order
                                   steps_per_pass=cfg.eval.steps_per_pass)
        metrics = save_samples(exp, dataset, torch.from_numpy(samples), stem=f"samples_{name}")
        atomic_write(exp.run_dir / f"samples_{name}_loglik.txt", lambda handle, values=np.stack([log_marginal, log_chain], 1): np.savetxt(handle, values,
                     header="MaM_log_marginal AO-ARM-S_chain_rule (nats)"))
        report[name] = {**metrics, "mean_log_marginal": float(log_marginal.mean()), "mean_log_chain_rule": float(log_chain.mean())}
    report["conditional"]["template"] = description
    if dataset.kind == "image":
        save_image_grid(torch.where(observed, x, torch.full_like(x, -1)).view(1, *dataset.image_shape).float(),
                        exp.run_dir / "conditional_template.png")
    exp.write_json("generate_metrics.json", report)
    log.info("generation: %s", report)
    if dataset.kind == "molecule":
        write_moses_metrics(exp, exp.run_dir / "samples_unconditional_smiles.txt")
    return report


@torch.no_grad()
def score(exp: Experiment, dataset) -> None:
    score_file(exp, load_model(exp, dataset.describe(), KIND, dataset.image_shape), exp.cfg.score.network)


MODES = {"train": train, "eval": evaluate, "generate": generate, "score": score, "export": lambda exp: export(exp, KIND)}


def run(cfg, run_dir=None):
    return run_modes(cfg, run_dir, MODES, "stage 2", lambda exp: (load_data(exp),))
