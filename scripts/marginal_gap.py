"""Compare stage-2 checkpoints that share frozen conditionals: the marginal network's gap to AO-ARM-E, in nats.

    python scripts/marginal_gap.py RUN_A/checkpoints/last.pt RUN_B/checkpoints/last.pt [--examples 3] [--orders 3]
        [--fractions 1.0 0.5] [--data-dir data]

The AO-ARM-E reference is computed once (from the first checkpoint's conditionals) on seeded test examples of the
checkpoint's dataset and reused for every checkpoint; prints one JSON line per checkpoint. Used for the README ablations.
"""
from __future__ import annotations

import argparse
import json

import torch
from omegaconf import OmegaConf

from mamlib.calibration import CalibrationSet
from mamlib.checkpoint import load_checkpoint
from mamlib.data import load_dataset
from mamlib.runtime import default_data_dir
from mamlib.stages.common import net_from_checkpoint
from mamlib.stages.mam_mle import sample_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps-per-pass", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    dataset_cfg = dict(load_checkpoint(args.checkpoints[0], expected_kind="mam")["config"]["dataset"])
    dataset_cfg["name"] = dataset_cfg["name"].lower()  # moses_SMILES -> moses_smiles, as the scripts do
    dataset = load_dataset(OmegaConf.create(dataset_cfg), args.data_dir or default_data_dir())
    rows = sample_rows(dataset.test, args.examples, args.seed)
    calibration = None
    for path in args.checkpoints:
        net, payload, _ = net_from_checkpoint(path, ("mam",), dataset.describe(), device,
                                              image_shape=getattr(dataset, "image_shape", None))
        net.eval()
        if calibration is None:  # the conditionals are frozen in stage 2: one reference serves every checkpoint
            calibration = CalibrationSet(net, rows, args.fractions, args.orders, args.batch_size, device,
                                         args.steps_per_pass, seed=args.seed)
        print(json.dumps({"checkpoint": path, "step": payload["step"], **calibration.measure(net)}), flush=True)


if __name__ == "__main__":
    main()
