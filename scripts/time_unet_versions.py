"""Times two U-Net paths at issue 12's comparison sizes (64 channels x 2 blocks with attention) for whichever version of
``mamlib`` is imported, so that today's code and an old commit can be timed one after the other on the same machine
(README, "Against the original, estimated through our own first version"):

    git worktree add /tmp/old e38086c
    PYTHONPATH=/tmp/old python scripts/time_unet_versions.py --steps-per-pass 1 8
    python scripts/time_unet_versions.py --steps-per-pass 1 4 16
    python scripts/time_unet_versions.py --cases likelihood --steps-per-pass 4 16 --precision fp32 bf16

``likelihood``: the exact chain rule for 4 random binary images (``--steps`` of 784 steps timed, scaled to 784).
``stage2``: one stage-2 training step, 32 data + 32 on-policy rows (4 positions re-drawn), pooled marginal head, only
the marginal branch trainable. Medians of ``--repeats`` calls after one warm-up; peak resident memory of the process.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch
from omegaconf import OmegaConf

from mamlib import arm
from mamlib.nets import build_backbone
from mamlib.stages.mam_mle import MarginalObjective

ARCH = {"name": "unet", "channels": 64, "num_res_blocks": 2, "attention": True, "dropout": 0.0, "marginal_hidden": 1024}


def median_seconds(fn, repeats: int) -> float:
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def stage2_config(activation_checkpointing: bool):
    """Today's config (composed like the bench) or, for a version without ``mamlib.bench``, the fields it read."""
    try:
        from mamlib.bench import compose_config
    except ImportError:
        return OmegaConf.create({"include_onpolicy": True, "onpolicy_init": "data", "gibbs_steps": 4, "seed": 0,
                                 "train": {"batch_size": 32}}), {}
    cfg = compose_config("mam_image", ["preset=cpu", "dataset=mnist_offline", "arch.marginal_head=pooled",
                                       "step_surprise_share=0", "include_onpolicy=true", "onpolicy_init=data",
                                       "gibbs_steps=4", "anchor_weight=0",
                                       f"train.activation_checkpointing={str(activation_checkpointing).lower()}"])
    cfg.train.batch_size = 32
    return cfg, {"marginal_head": "pooled", "marginal_encoder": "shared"}


def time_stage2(repeats: int, activation_checkpointing: bool) -> float:
    cfg, extra_arch = stage2_config(activation_checkpointing)
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create({**ARCH, **extra_arch}), 2, 784, image_shape=(28, 28), marginal=True).train()
    if activation_checkpointing and hasattr(net, "set_activation_checkpointing"):
        net.set_activation_checkpointing(True)
    for name, parameter in net.named_parameters():
        parameter.requires_grad = name.startswith(net.marginal_prefixes)
    generator = torch.Generator().manual_seed(0)
    data = type("Data", (), {"train": torch.randint(0, 2, (64, 784), generator=generator)})()
    objective = MarginalObjective(net, cfg, data, torch.device("cpu"))
    objective.on_epoch_start(0)
    x = torch.randint(0, 2, (32, 784), generator=generator)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective.loss(x)[0].backward()
        optimizer.step()

    return median_seconds(step, repeats)


@torch.no_grad()
def time_likelihood(steps_per_pass: int, steps: int, repeats: int, precision: str = "fp32") -> float:
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create({**ARCH, "marginal_head": "pooled", "marginal_encoder": "shared"}), 2, 784,
                         image_shape=(28, 28), marginal=False).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (4, 784), generator=generator)
    order = torch.stack([torch.randperm(784, generator=generator) for _ in range(4)]).argsort(1)  # rank of each position
    observed = order < steps  # a |S| = steps query: the chain rule takes exactly `steps` steps
    def likelihood():
        with contextlib.ExitStack() as stack:
            if precision == "bf16":  # what eval.precision=bf16 does to every conditional pass (any version of the code)
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            return arm.chain_rule_log_prob(net, x, observed, order=order, steps_per_pass=steps_per_pass)

    return median_seconds(likelihood, repeats) * 784 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["likelihood", "stage2"], choices=["likelihood", "stage2"])
    parser.add_argument("--steps-per-pass", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=32, help="chain-rule steps timed (scaled to 784)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="likelihood: fp32 and/or bf16 autocast passes (eval.precision)")
    args = parser.parse_args()
    if "likelihood" in args.cases:
        for steps_per_pass in args.steps_per_pass:
            for precision in args.precision:
                seconds = time_likelihood(steps_per_pass, args.steps, args.repeats, precision)
                print(f"exact likelihood, 4 images x 784 steps, steps_per_pass={steps_per_pass}, {precision}: "
                      f"{seconds:.1f} s", flush=True)
    if "stage2" in args.cases:
        print(f"stage-2 step, 32 + 32 rows: {time_stage2(args.repeats, activation_checkpointing=True):.2f} s", flush=True)
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
