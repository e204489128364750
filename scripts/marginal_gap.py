"""Compare stage-2 checkpoints that share frozen conditionals: the marginal network's gap to AO-ARM-E, in nats.

    python scripts/marginal_gap.py RUN_A/checkpoints/last.pt RUN_B/checkpoints/last.pt [--examples 3] [--orders 3]
        [--fractions 1.0 0.5] [--groups 4] [--data-dir data]

The AO-ARM-E reference is computed once (from the first checkpoint's conditionals) on seeded examples of the
checkpoint's dataset, validation rows by default (``--split``), and reused for every checkpoint; prints one JSON line per
checkpoint. With ``--groups N`` it also ranks: N examples of the same split masked and regenerated as in stage-2 ``eval``
(the checkpoint's ``eval.mask_steps``; images and text), scored once by AO-ARM-E, and every checkpoint's pooled and
per-group correlations with them (``eval.threshold``). Settings chosen by comparing runs on test rows would make the
test figures optimistic, so compare them on validation rows and keep the test split for the final evaluation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf

from mamlib import arm
from mamlib.calibration import CalibrationSet, gap_summary
from mamlib.evaluation import aggregate_correlations, correlation_summary
from mamlib.experiment import batched
from mamlib.marginal import normalized_log_marginal
from mamlib.checkpoint import load_checkpoint
from mamlib.data import load_dataset
from mamlib.runtime import default_data_dir
from mamlib.api import net_from_checkpoint
from mamlib.stages.mam_mle import regenerated_groups, sample_rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps-per-pass", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", type=int, default=0, help="regenerated examples of --split for correlations (0: none)")
    parser.add_argument("--cache", default=None, help=".npz for the AO-ARM-E references (made if missing, reused if present)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", choices=("val", "test", "train"), default="val",
                        help="split of the examples (default val: choosing settings on test rows makes the test figures "
                             "optimistic; train: is an offset a train/held-out difference?)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    first_config = load_checkpoint(args.checkpoints[0], expected_kind="mam")["config"]
    dataset_cfg = dict(first_config["dataset"])
    dataset_cfg["name"] = dataset_cfg["name"].lower()  # moses_SMILES -> moses_smiles, as the scripts do
    dataset = load_dataset(OmegaConf.create(dataset_cfg), args.data_dir or default_data_dir())
    if not len(getattr(dataset, args.split)):
        parser.error(f"this dataset has no {args.split} rows: pass --split train (or give it a validation split)")
    rows = sample_rows(getattr(dataset, args.split), args.examples, args.seed)
    calibration = groups = None
    for path in args.checkpoints:
        net, payload, _ = net_from_checkpoint(path, ("mam",), dataset.describe(), device,
                                              image_shape=getattr(dataset, "image_shape", None))
        net.eval()
        if calibration is None:  # the conditionals are frozen in stage 2: one reference serves every checkpoint
            cached = dict(np.load(args.cache)) if args.cache and Path(args.cache).exists() else {}
            calibration = CalibrationSet(net, rows, args.fractions, args.orders, args.batch_size, device,
                                         args.steps_per_pass, seed=args.seed, reference=cached.get("calibration"))
            if args.groups and "group_variants" in cached:
                groups = {"variants": torch.from_numpy(cached["group_variants"]), "reference": cached["group_reference"]}
            if args.cache and not args.groups and "calibration" not in cached:  # with --groups, saved with them below
                np.savez(args.cache, calibration=calibration.reference)
        result = {"checkpoint": path, "step": payload["step"], **calibration.measure(net)}
        if args.groups:
            if groups is None:
                groups = regenerated_reference(net, dataset, first_config["eval"], args, device)
                if args.cache:
                    np.savez(args.cache, calibration=calibration.reference, group_variants=groups["variants"].numpy(),
                             group_reference=groups["reference"])
            variants, reference = groups["variants"], groups["reference"]  # (groups, variants, D), (groups, variants)
            flat = variants.flatten(0, 1)
            marginal = batched(lambda x, m: normalized_log_marginal(net, x, m), flat, torch.ones_like(flat, dtype=torch.bool),
                               args.batch_size, device).numpy().reshape(reference.shape)
            result["pooled"] = correlation_summary(reference.ravel(), marginal.ravel())
            result["per_group"] = aggregate_correlations(list(zip(reference, marginal)), float(first_config["eval"]["threshold"]))
            result["groups_gap"] = gap_summary(marginal.ravel(), reference.ravel())
        print(json.dumps(result), flush=True)


def regenerated_reference(net, dataset, eval_cfg, args, device) -> dict:
    """The regenerated groups of stage-2 eval (the checkpoint's mask levels, one variant each) and their AO-ARM-E values."""
    cfg = OmegaConf.create({"seed": args.seed, "eval": {"variants_per_level": 1, "mask_steps": list(eval_cfg["mask_steps"])}})
    groups = regenerated_groups(SimpleNamespace(cfg=cfg, device=device), net,
                                sample_rows(getattr(dataset, args.split), args.groups, args.seed + 2))
    variants = torch.stack([group["variants"] for group in groups])
    flat = variants.flatten(0, 1)
    reference = batched(lambda x, m: arm.ensemble_log_prob(net, x, args.orders, m, args.steps_per_pass), flat,
                        torch.ones_like(flat, dtype=torch.bool), args.batch_size, device, desc="AO-ARM-E groups")
    return {"variants": variants, "reference": reference.numpy().reshape(variants.shape[:2])}


if __name__ == "__main__":
    main()
