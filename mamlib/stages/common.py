"""Pieces the stage runners share: data, checkpoint metadata, writing samples."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..api import Model, check_export_target
from ..errors import ConfigError
from ..files import save_npy_atomic, write_text_atomic
from ..experiment import Experiment, config_dict, read_score_input, score_output_path, setup, write_score_output
from ..runtime import resolve_precision
from ..trainer import Trainer, epoch_batches, num_epoch_batches

log = logging.getLogger("mamlib")


def load_data(exp: Experiment):
    from ..data import load_dataset

    dataset_cfg = OmegaConf.to_container(exp.cfg.dataset, resolve=True)
    dataset_cfg["name"] = dataset_cfg["name"].lower()  # moses_${string_type} -> moses_smiles / moses_selfies
    return load_dataset(OmegaConf.create(dataset_cfg), exp.data_dir)


def checkpoint_meta(kind: str, exp: Experiment, dataset_info: dict, arch_cfg, has_marginal: bool) -> dict:
    return {"kind": kind, "dataset": dataset_info, "arch": OmegaConf.to_container(arch_cfg, resolve=True),
            "has_marginal": has_marginal, "config": config_dict(exp.cfg)}


def molecule_smiles(strings: list[str], string_type: str) -> list[str | None]:
    """Canonical SMILES (no stereo) of SMILES or SELFIES strings; None where invalid."""
    import selfies

    from ..energy.molecules import canonical_smiles

    smiles = []
    for string in strings:
        if string_type.upper() == "SELFIES":
            try:
                string = selfies.decoder(string)
            except Exception:  # selfies raises its own DecoderError and friends
                string = None
        smiles.append(canonical_smiles(string) if string else None)
    return smiles


def validity_uniqueness(smiles: list[str | None]) -> dict:
    valid = [s for s in smiles if s]
    return {"validity": len(valid) / max(len(smiles), 1), "uniqueness": len(set(valid)) / max(len(valid), 1),
            "num_samples": len(smiles)}


def save_samples(exp: Experiment, dataset, samples: torch.Tensor, stem: str = "samples", observed_mask=None) -> dict:
    """Write samples in the form a person reads: PNG grid, text file or molecule file (+ validity). Returns metrics."""
    from ..plots import save_image_grid

    run_dir = exp.run_dir
    array = samples.cpu().numpy()
    save_npy_atomic(run_dir / f"{stem}.npy", array)
    metrics: dict = {}
    if dataset.kind == "image":
        height, width = dataset.image_shape
        images = array.reshape(-1, height, width).astype(np.float32)
        save_image_grid(images, run_dir / f"{stem}.png")
    elif dataset.kind in ("text", "molecule"):
        strings = [dataset.decode(row) for row in array]
        lines = strings
        if dataset.kind == "molecule":
            string_type = "SELFIES" if dataset.padding_symbol == "[nop]" else "SMILES"
            smiles = molecule_smiles(strings, string_type)
            metrics = validity_uniqueness(smiles)
            write_text_atomic(run_dir / f"{stem}_smiles.txt", "\n".join(s or "INVALID" for s in smiles) + "\n")
        write_text_atomic(run_dir / f"{stem}.txt", "\n".join(lines) + "\n")
    log.info("wrote %s samples to %s %s", len(array), run_dir / stem, metrics)
    return metrics


def write_moses_metrics(exp: Experiment, smiles_file: Path) -> dict:
    """``moses_metrics.json`` in the run dir: the MOSES metrics of the molecules in ``smiles_file`` (mamlib/moses_metrics.py).

    ``generate.moses_reference_size`` (molecule configs; preset=tiny sets it) limits the reference to the first molecules
    of the MOSES test sets: quick, but then the numbers are not comparable with MOSES's."""
    from ..moses_metrics import evaluate_file

    reference_size = exp.cfg.generate.get("moses_reference_size")
    metrics = evaluate_file(smiles_file, exp.run_dir / "moses_metrics.json", exp.data_dir, device=exp.device,
                            reference_size=reference_size)
    log.info("MOSES metrics%s: %s", f" (reference: first {reference_size} test molecules)" if reference_size else "",
             metrics)
    return metrics


def resolve_checkpoint(exp: Experiment) -> Path:
    path = exp.checkpoint_to_load()
    if not Path(path).is_file():
        raise ConfigError(f"no checkpoint at {path}: pass loadpath=<run dir>/checkpoints/last.pt of a trained run "
                                "(or run with mode=train first, with the same hydra.run.dir)")
    return Path(path)


SCORE_METHODS = {"marginal": "marginal", "conditional": "chain"}  # score.network -> Model.log_prob(method=)


def score_file(exp: Experiment, model: Model, network: str) -> None:
    """The score contract: ``score.input`` (M, D) ints with -1 = missing -> ``score.output`` float64 (M,) log-probabilities.

    ``network``: marginal (one pass of f) or conditional (the chain rule over ``score.orders`` random orders)."""
    cfg = exp.cfg
    if network not in SCORE_METHODS:
        raise ConfigError(f"score.network={network!r} is unknown; use marginal or conditional")
    x, observed = read_score_input(cfg.score.input, model.num_positions, model.num_classes)
    score_output_path(cfg.score.output)
    log_probs = model.log_prob(x.numpy(), observed.numpy(), method=SCORE_METHODS[network], orders=cfg.score.orders,
                               batch_size=cfg.eval.batch_size, steps_per_pass=cfg.eval.steps_per_pass)
    path = write_score_output(cfg.score.output, log_probs)
    log.info("wrote %d log-probabilities (%s network, %d orders for the chain rule) to %s", len(log_probs), network,
             cfg.score.orders, path)


def fit_on_data(exp: Experiment, dataset, net, objective, optimizer, meta: dict, evaluate, after_training=None) -> Trainer:
    """Train on ``dataset.train`` (resuming if asked), then evaluate once more on the main process.
    ``after_training(trainer)``: runs on the main process between the last step and that evaluation (it saves what it
    changes)."""
    cfg = exp.cfg
    trainer = Trainer(
        train_cfg=cfg.train, model=net, objective=objective, optimizer=optimizer,
        batches=lambda epoch, start: epoch_batches(dataset.train, cfg.train.batch_size, epoch, cfg.seed, exp.dist, start),
        batches_per_epoch=num_epoch_batches(dataset.train, cfg.train.batch_size, exp.dist), run_dir=exp.run_dir,
        device=exp.device, dist_info=exp.dist, logger=exp.logger, checkpoint_meta=meta, evaluate=evaluate)
    trainer.run(resume=cfg.resume, overwrite=cfg.get("overwrite", False))
    if exp.dist.is_main:
        if after_training is not None:
            after_training(trainer)
        trainer.run_evaluation()
    return trainer


def load_model(exp: Experiment, dataset_info: dict, kind: str, image_shape=None) -> Model:
    """The run's (or ``loadpath=``) checkpoint of this stage as a :class:`mamlib.api.Model` on the run's device, checked
    against the run's data; its conditional passes run at ``eval.precision``."""
    model = Model.from_checkpoint(resolve_checkpoint(exp), device=exp.device, kinds=(kind,), expected_data=dataset_info,
                                  image_shape=image_shape)
    model.net.set_conditional_precision(resolve_precision(exp.cfg.eval.get("precision", "fp32"), exp.device))
    return model


def load_trained(exp: Experiment, dataset, kind: str):
    """The run's (or ``loadpath=``) checkpoint of this stage: the network, in eval mode."""
    return load_model(exp, dataset.describe(), kind, getattr(dataset, "image_shape", None)).net


def export(exp: Experiment, kind: str) -> Path:
    """``mode=export``: the checkpoint as ``export.dir`` (model.safetensors, config.json, metrics.json, README.md)."""
    folder = exp.cfg.get("export", {}).get("dir")
    if not folder:
        raise ConfigError("mode=export needs export.dir=<folder> (it receives model.safetensors, config.json, "
                          "metrics.json and README.md)")
    checkpoint, path, overwrite = resolve_checkpoint(exp), Path(folder), bool(exp.cfg.get("overwrite", False))
    check_export_target(path, overwrite)  # refuse before loading anything
    Model.from_checkpoint(checkpoint, device="cpu", kinds=(kind,)).save_pretrained(path, overwrite=overwrite)
    log.info("exported %s to %s; load it with mamlib.load(%r) or Model.from_pretrained(%r)", checkpoint, path, str(path), str(path))
    return path


DATA_FREE_MODES = ("export",)  # read only the checkpoint: no data to load or download


def run_modes(cfg, run_dir, modes: dict, what: str, prepare):
    """Check ``mode``, set the run up, call ``modes[mode](exp, *prepare(exp))`` and always close the logger."""
    if cfg.mode not in modes:
        raise ConfigError(f"mode={cfg.mode!r} is unknown for {what}; use one of {sorted(modes)}")
    exp = setup(cfg, run_dir)
    try:
        return modes[cfg.mode](exp, *(() if cfg.mode in DATA_FREE_MODES else prepare(exp)))
    finally:
        exp.logger.close()
